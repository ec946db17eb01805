"""The shared report writers: atomic, and files as readable as any the process creates."""

import os

import pytest

from ravlt_pl import reports


def test_written_files_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = reports.write_json(tmp_path / "deep" / "report.json", {"top1": 0.5})
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary file left


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = reports.write_text(tmp_path / "report.md", "old\n")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        reports.atomic_write(path, fail)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
