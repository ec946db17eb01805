"""A run's directory: its own version, its own config.yaml, and a full disk named in one line."""

import errno
import os
from pathlib import Path

import pytest

from ravlt_pl.cli import main
from ravlt_pl.run_dir import claim_version
from tests.test_callbacks import fit_args


def test_concurrent_claims_get_a_version_directory_each(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda _: claim_version(tmp_path), range(16)))
    assert sorted(versions) == list(range(16))


def test_a_run_claims_its_version_before_training_and_writes_its_own_config(synthetic_cls, tmp_path):
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)  # another run, started a moment ago
    cli = main(fit_args(synthetic_cls, tmp_path, "--trainer.max_steps", "1", "--trainer.fast_dev_run", "false"))
    assert cli.trainer.logger.version == 1 and Path(cli.trainer.log_dir) == tmp_path / "lightning_logs" / "version_1"
    assert "max_steps: 1" in (tmp_path / "lightning_logs" / "version_1" / "config.yaml").read_text()
    assert not list((tmp_path / "lightning_logs" / "version_0").iterdir())


def test_a_full_disk_under_the_tensorboard_logs_stops_in_one_line(synthetic_cls, tmp_path, monkeypatch, capfd):
    from tensorboard.summary.writer import record_writer

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "write", disk_full)
    with pytest.raises(SystemExit) as stop:
        main(fit_args(synthetic_cls, tmp_path, "--trainer.max_steps", "2", "--trainer.fast_dev_run", "false"))
    assert str(stop.value.code) == (f"error: cannot write the TensorBoard logs in {tmp_path}/lightning_logs/version_0: "
                                    "[Errno 28] No space left on device")  # fmt: skip
    assert "Traceback" not in capfd.readouterr().err  # nor the writer thread's
