"""Fault tolerance outside Slurm: a checkpoint save on a full disk, an image that turns unreadable
mid-epoch, SIGUSR1 during and after training. (Slurm itself: tests/test_slurm.py.)"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from ravlt_pl import callbacks
from ravlt_pl.callbacks import AtomicCheckpointIO, find_last_checkpoint
from ravlt_pl.cli import main
from ravlt_pl.models.checkpoint import CheckpointError
from tests.conftest import tiny_cli_args

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 10  # 20 training images, batch 2


def fit_args(data: Path, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return tiny_cli_args("demo/cls.yaml", data, out, "--trainer.fast_dev_run", "0", "--trainer.max_epochs", str(epochs),
                         "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0", *extra)  # fmt: skip


def global_step(path: Path) -> int:
    return torch.load(path, weights_only=False)["global_step"]


# -- disk full at save ---------------------------------------------------------------------------------
class FileOnFullDisk(io.FileIO):
    """A file on a disk with ``free`` bytes left: the write that needs more fails with ENOSPC after
    writing what fits, as on a real full disk."""

    def __init__(self, path, mode: str, free: int) -> None:
        super().__init__(path, mode)
        self.free = free

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.free:
            super().write(data[: self.free])
            self.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.free -= len(data)
        return super().write(data)


def fill_disk_after(monkeypatch, saves: int) -> None:
    """The checkpoint writer's ``open``: the first ``saves`` files are written whole, later ones hit
    a full disk after 4 KiB."""
    opened = []

    def open_on_filling_disk(path, mode="r"):
        opened.append(path)
        return FileOnFullDisk(path, mode.replace("b", ""), free=2**62 if len(opened) <= saves else 4096)

    monkeypatch.setattr(callbacks, "open", open_on_filling_disk, raising=False)


def test_checkpoint_save_on_a_full_disk_names_the_file_and_os_error_and_keeps_the_previous(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "last.ckpt"
    fill_disk_after(monkeypatch, saves=1)
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(4096)}, target)
    before = target.read_bytes()
    with pytest.raises(CheckpointError) as error:
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(4096)}, target)
    assert str(error.value) == (f"cannot write checkpoint {target}: [Errno 28] No space left on device "
                                "(the previous last.ckpt, if any, is unchanged)")  # fmt: skip
    assert target.read_bytes() == before and torch.load(target)["step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # the half-written temp file is gone


def test_fit_on_a_filling_disk_stops_with_one_line_and_the_last_checkpoint_intact(synthetic_cls, tmp_path, monkeypatch):
    fill_disk_after(monkeypatch, saves=2)  # epoch 0's best and last checkpoints; epoch 1's do not fit
    with pytest.raises(SystemExit) as stop:
        main(fit_args(synthetic_cls, tmp_path, epochs=2))
    message = str(stop.value.code)
    failed = re.fullmatch(
        r"error: cannot write checkpoint (\S+\.ckpt): \[Errno 28\] No space left on device \(.*\)", message
    )
    assert failed and "\n" not in message, message
    assert not Path(failed[1]).exists() or global_step(Path(failed[1])) == STEPS_PER_EPOCH
    assert global_step(find_last_checkpoint(tmp_path)) == STEPS_PER_EPOCH  # epoch 0's last.ckpt, whole
    assert not list(tmp_path.rglob(".*.tmp"))


# -- an image that becomes unreadable mid-epoch --------------------------------------------------------
class CorruptImagesAt(Callback):
    """Test hook: at the end of global step ``step``, overwrite every image of ``split`` with bytes
    no decoder reads (a disk or copy gone bad while the run goes on)."""

    def __init__(self, step: int, root: str, split: str = "train") -> None:
        self.step, self.folder = step, Path(root) / split

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for image in self.folder.rglob("*.JPEG"):
                image.write_bytes(b"not an image")


@pytest.mark.parametrize(
    "split, step, saved_step, epochs",
    [
        # Batches 0-2 trained; reading batch 4 (read ahead while batch 3 is handed out) failed: the
        # checkpoint holds the 3 completed steps, and batch 3 is the first one a resume trains.
        ("train", 3, 3, 1),
        # Epoch 0 trained whole, its validation failed: the checkpoint holds the epoch's 10 steps.
        ("val", STEPS_PER_EPOCH, STEPS_PER_EPOCH, 2),
    ],
)
def test_unreadable_image_mid_epoch_checkpoints_the_steps_done_then_stops_and_resume_completes(
    synthetic_cls, tmp_path, split, step, saved_step, epochs
):
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(synthetic_cls, data)
    with pytest.raises(SystemExit) as stop:
        main(fit_args(data, out, "--trainer.callbacks+=tests.test_callbacks.CorruptImagesAt", f"--trainer.callbacks.step={step}",
                      f"--trainer.callbacks.root={data}", f"--trainer.callbacks.split={split}", epochs=epochs))  # fmt: skip
    message = str(stop.value.code)
    assert re.fullmatch(rf"error: {data}/{split}/\w+/\w+\.JPEG: cannot be read as an image \(.*\)", message), message
    saved = find_last_checkpoint(out)
    assert saved is not None and global_step(saved) == saved_step

    shutil.rmtree(data)
    shutil.copytree(synthetic_cls, data)  # the data fixed
    cli = main(fit_args(data, out, "--ckpt_path", "last", epochs=epochs))
    assert Path(cli.trainer.ckpt_path) == saved
    final = torch.load(find_last_checkpoint(out), weights_only=False)
    # Every step once: a restart of the epoch would end with more.
    steps = epochs * STEPS_PER_EPOCH
    assert final["global_step"] == steps and final["lr_schedulers"][0]["last_epoch"] == steps
    assert {float(s["step"]) for s in final["optimizer_states"][0]["state"].values()} == {float(steps)}


# -- SIGUSR1 outside Slurm -----------------------------------------------------------------------------
class SignalAfterFit(Callback):
    """Sends ``signum`` to this process once fit is over and Lightning has put its signal handlers
    back, as a Slurm time-limit signal that lands just after the last step would."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def teardown(self, trainer, pl_module, stage) -> None:
        os.kill(os.getpid(), self.signum)


TWO_FITS = """
import json, sys
from ravlt_pl.cli import main
stopped, resumed = json.loads(sys.argv[1])
try:
    main(stopped)
except SystemExit as stop:
    print("first fit:", stop.code, flush=True)
main(resumed)
"""


def test_a_data_error_before_the_first_step_writes_nothing_and_last_stays_the_real_progress(synthetic_cls, tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(synthetic_cls, data)
    main(fit_args(data, out, "--trainer.max_steps", "4"))
    progress = find_last_checkpoint(out)
    assert global_step(progress) == 4
    before = sorted(out.rglob("*.ckpt"))
    for image in (data / "train").rglob("*.JPEG"):  # the second run cannot read its first batch
        image.write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="cannot be read as an image"):
        main(fit_args(data, out))
    assert sorted(out.rglob("*.ckpt")) == before  # no step-0 last.ckpt
    assert find_last_checkpoint(out) == progress


def test_ckpt_path_last_passes_over_a_checkpoint_of_step_0(tmp_path):
    real, empty = tmp_path / "version_0" / "last.ckpt", tmp_path / "version_1" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 4}, real)
    AtomicCheckpointIO().save_checkpoint({"global_step": 0}, empty)  # newer
    assert find_last_checkpoint(tmp_path) == real


def test_sigusr1_outside_slurm_checkpoints_and_stops_saying_so_and_is_ignored_after_training(synthetic_cls, tmp_path):
    """In a child process, which the default action of SIGUSR1 would kill (exit code -10, no word):
    a fit that gets SIGUSR1 after step 3, then ``--ckpt_path last`` with a SIGUSR1 after training."""
    usr1 = str(int(signal.SIGUSR1))
    stopped = fit_args(synthetic_cls, tmp_path, "--trainer.callbacks+=tests.test_distributed.SignalAt",
                       "--trainer.callbacks.step=3", f"--trainer.callbacks.signum={usr1}")  # fmt: skip
    resumed = fit_args(synthetic_cls, tmp_path, "--ckpt_path", "last", "--trainer.callbacks+=tests.test_callbacks.SignalAfterFit",
                       f"--trainer.callbacks.signum={usr1}")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    child = subprocess.run([sys.executable, "-c", TWO_FITS, json.dumps([stopped, resumed])], cwd=REPO,
                           env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    assert "SIGUSR1: not a Slurm job with auto-requeue: checkpoint + stop at the next step boundary" in child.stderr
    assert "first fit: " in child.stdout and "--ckpt_path last" in child.stdout
    assert "SIGUSR1: training has finished, nothing to do" in child.stderr
    checkpoints = sorted(tmp_path.rglob("last.ckpt"))  # version_0: the stop; version_1: the resumed run's end
    assert [global_step(c) for c in checkpoints] == [3, STEPS_PER_EPOCH]


# -- two runs into one root ---------------------------------------------------------------------------
def test_stale_temp_cleanup_spares_another_process_save_in_progress(tmp_path):
    from ravlt_pl.reports import temp_owner

    target = tmp_path / "last.ckpt"
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = temp_owner().rpartition("-")[0]
        theirs = tmp_path / f".last.ckpt.{host}-{running.pid}.abc.tmp"  # another run's save, still being written
        dead = tmp_path / f".last.ckpt.{host}-{2**22 + 17}.abc.tmp"  # a killed save
        other_host = tmp_path / ".last.ckpt.elsewhere-1.abc.tmp"
        for path in (theirs, dead, other_host):
            path.write_bytes(b"partial")
        AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
        assert theirs.exists() and other_host.exists() and not dead.exists()
    finally:
        running.kill()
        running.wait()
