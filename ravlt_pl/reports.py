"""Writing what a person reads: JSON, Markdown and PNG files, each written atomically.

Every writer puts the bytes in a temporary file beside the target and renames it into place, so
an interrupted run never leaves a truncated report and never clobbers the previous one half-way.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: The process's umask, read once at import (reading it means setting it): new files get 0o666 & ~umask.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class WriteError(RuntimeError):
    """A file could not be written (disk full, quota, permissions); the message names it and the OS error."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` onto ``path`` (same directory, same filesystem).

    The file gets the permissions of one the process created directly (``mkstemp`` makes its
    temporary file 0600, which would hide reports and checkpoints from the rest of a group). A write
    that fails on an OS error (disk full ...) raises :class:`WriteError`; the temporary file is removed.
    """
    return write_files({Path(path): write})[0]


def write_files(files: Mapping[Path, Callable[[Path], None]]) -> list[Path]:
    """Write a set of files as a whole: every ``write(tmp_path)`` first, then the renames, so a failure
    (disk full, an error, a kill while writing) leaves all the previous files and no temporary one."""
    temps: dict[Path, Path] = {}
    try:
        for path, write in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{temp_owner()}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps[path] = Path(tmp)
            write(temps[path])
            os.chmod(tmp, 0o666 & ~_UMASK)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException as err:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        cause = os_error_of(err)
        if cause is None or isinstance(err, WriteError):
            raise
        last = list(temps)[-1] if temps else None
        failed = next((p for p, t in temps.items() if cause.filename in (str(t), t)), last)
        reason = f"[Errno {cause.errno}] {cause.strerror}" if cause.errno else str(cause)
        raise WriteError(f"cannot write {failed}: {reason} (the previous {failed.name}, if any, is unchanged)") from err
    return list(files)


def os_error_of(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err``: when a write fails inside ``torch.save``, closing its zip
    archive raises a RuntimeError ("unexpected pos ...") over the real cause (disk full)."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def temp_owner() -> str:
    """``<host>-<pid>``: the writer its temporary files name, so a cleanup removes its own or a dead process's only."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def stale_temps(path: Path) -> list[Path]:
    """The temporary files of ``path`` left by this process or by a dead one on this host (a killed save);
    never those of a write still running in another process (another run, another host)."""
    host = socket.gethostname().replace(".", "_")
    stale = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        owner = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        name, _, pid = owner.rpartition("-")
        if name == host and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            stale.append(tmp)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def save_figure(path: str | Path, fig: plt.Figure, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    try:
        return atomic_write(path, partial(_save_png, fig, dpi=dpi))
    finally:
        plt.close(fig)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".4f") -> str:
    """A GitHub Markdown table; floats formatted with ``floatfmt``."""

    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | Path,
    name: str,
    data: Mapping[str, Any],
    markdown: str,
    figures: Mapping[str, plt.Figure] | None = None,
    extra: Mapping[str, Callable[[Path], None]] | None = None,
) -> dict[str, Path]:
    """``out_dir/name.json``, ``out_dir/name.md``, ``out_dir/name_<key>.png`` per figure and the ``extra``
    files (file name → writer), written as one set (:func:`write_files`)."""
    out_dir = Path(out_dir)
    json_text = json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n"
    files = {"json": (out_dir / f"{name}.json", lambda tmp: tmp.write_text(json_text, encoding="utf-8")),
             "md": (out_dir / f"{name}.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))}  # fmt: skip
    for key, fig in (figures or {}).items():
        files[key] = (out_dir / f"{name}_{key}.png", partial(_save_png, fig))
    for file_name, write in (extra or {}).items():
        files[file_name] = (out_dir / file_name, write)
    try:
        write_files(dict(files.values()))
    finally:
        for fig in (figures or {}).values():
            plt.close(fig)
    return {key: path for key, (path, _) in files.items()}


def _save_png(fig: plt.Figure, tmp: Path, dpi: int = 120) -> None:
    fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # tensors and numpy arrays / scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
