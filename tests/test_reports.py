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

    with pytest.raises(reports.WriteError, match=f"cannot write {path}: disk full"):
        reports.atomic_write(path, fail)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_report_set_is_written_as_a_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno

    import matplotlib.pyplot as plt

    old = reports.write_report(tmp_path, "r", {"v": 1}, "# old\n", {"fig": plt.figure()})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", disk_full)
    with pytest.raises(reports.WriteError) as err:
        reports.write_report(tmp_path, "r", {"v": 2}, "# new\n", {"fig": plt.figure()})
    assert str(err.value) == (f"cannot write {old['fig']}: [Errno 28] No space left on device "
                              "(the previous r_fig.png, if any, is unchanged)")  # fmt: skip
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # json and md old too, no temporaries
