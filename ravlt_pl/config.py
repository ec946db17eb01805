"""Where a config comes from: a path, or a bare name (``cls_s.yaml``, ``det/maskrcnn_s_1x.yaml``) looked up
in ``./configs`` and then in the package's; a file that is no readable YAML is one line naming it.

A leaf module: the CLI, ``export`` and the demo import it; it imports nothing of ours.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

import yaml

#: The published configs ship inside the package (``ravlt_pl/configs``; ``configs/`` in a clone links to it).
PACKAGE_CONFIGS = Path(str(resources.files("ravlt_pl") / "configs"))

PROG = "python -m ravlt_pl"


class ConfigError(ValueError):
    """A configuration value the run cannot use; the message names the option and the reason."""


# -- config lookup ------------------------------------------------------------------------------
def config_dirs() -> tuple[Path, ...]:
    """Where a bare config name is looked up: ``./configs`` of the working directory, then the package's."""
    folders = {folder.resolve(): folder for folder in (Path.cwd() / "configs", PACKAGE_CONFIGS)}  # one per real folder
    return tuple(folders.values())


def config_names() -> list[str]:
    """Every config name that :func:`resolve_config` finds (``cls_s.yaml``, ``det/maskrcnn_s_1x.yaml`` ...)."""
    return sorted({p.relative_to(d).as_posix() for d in config_dirs() if d.is_dir() for p in d.rglob("*.yaml")})


def resolve_config(name: str) -> str:
    """A config path as given if it exists, else the same name under ``configs/``."""
    if Path(name).exists():
        return name
    for folder in config_dirs():
        if (folder / name).is_file():
            return str(folder / name)
    names = config_names()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"available: {', '.join(names)}"
    raise FileNotFoundError(f"config {name!r} not found here nor in {', '.join(map(str, config_dirs()))}; {hint}")


def check_config_file(path: str) -> str:
    """``path`` if it is a readable YAML file, else :class:`ConfigError` naming the file (and a YAML error's line)."""
    if Path(path).is_dir():
        inside = sorted(p.name for p in Path(path).glob("*.y*ml"))[:5]
        listing = f" (in it: {', '.join(inside)})" if inside else ""
        raise ConfigError(f"--config {path}: is a directory; give a YAML file{listing}")
    try:
        with open(path, encoding="utf-8") as f:
            yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = str(getattr(err, "problem", None) or err).replace("character '\\t'", "a tab")
        hint = " (YAML indents with spaces, not tabs)" if "\\t" in str(err) else ""
        raise ConfigError(f"--config {path}{where}: not valid YAML: {problem}{hint}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot be read ({err})") from None
    return path


def resolve_config_args(args: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "--config") and i + 1 < len(args):
            out += [arg, check_config_file(resolve_config(args[i + 1]))]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + check_config_file(resolve_config(arg.split("=", 1)[1]))
        out.append(arg)
        i += 1
    return out
