"""Writing what a person reads: JSON, Markdown and PNG files, each written atomically.

Every writer puts the bytes in a temporary file beside the target and renames it into place, so
an interrupted run never leaves a truncated report and never clobbers the previous one half-way.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


#: The process's umask, read once at import (reading it means setting it): new files get 0o666 & ~umask.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` onto ``path`` (same directory, same filesystem).

    The file gets the permissions of one the process created directly (``mkstemp`` makes its
    temporary file 0600, which would hide reports and checkpoints from the rest of a group).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{temp_owner()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temp_owner() -> str:
    """``<host>-<pid>``: the writer named in its temporary files, so a cleanup removes only its own or a dead process's."""
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


def save_figure(path: str | Path, fig: "plt.Figure", dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".4f") -> str:
    """A GitHub Markdown table; floats formatted with ``floatfmt``."""

    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, name: str, data: Mapping[str, Any], markdown: str,
                 figures: Mapping[str, "plt.Figure"] | None = None) -> dict[str, Path]:
    """``out_dir/name.json``, ``out_dir/name.md`` and ``out_dir/name_<key>.png`` per figure."""
    out_dir = Path(out_dir)
    paths = {"json": write_json(out_dir / f"{name}.json", data), "md": write_text(out_dir / f"{name}.md", markdown)}
    for key, fig in (figures or {}).items():
        paths[key] = save_figure(out_dir / f"{name}_{key}.png", fig)
    return paths


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # tensors and numpy arrays / scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
