"""``python -m ravlt_pl {fit,validate,test,predict,summary,benchmark,analyze-rank,export} --config X.yaml``.

Lightning's four commands go to the LightningCLI of :mod:`ravlt_pl.lightning_cli`; ours are the
modules of :data:`SUBCOMMANDS`, each a ``main(args)``. A user's mistake (a config, a checkpoint, the
data, a full disk) ends here as one line ``error: ...``, not a traceback.
"""

from __future__ import annotations

import importlib
import sys

from lightning.pytorch.utilities.exceptions import SIGTERMException

from .config import PROG, ConfigError, check_config_file, config_names, resolve_config, resolve_config_args
from .data.errors import DatasetError
from .lightning_cli import DEFAULT_CALLBACKS, RAVLTCLI, BestCheckpoint, RequireTrainingBatches, build_cli
from .models.checkpoint import CheckpointError
from .reports import WriteError

# ``ravlt_pl.cli.BestCheckpoint`` / ``RequireTrainingBatches`` stay importable here: runs' saved config.yaml name them so.
__all__ = [
    "PROG", "ConfigError", "check_config_file", "config_names", "resolve_config", "DEFAULT_CALLBACKS", "BestCheckpoint",
    "RAVLTCLI", "RequireTrainingBatches", "build_cli", "SUBCOMMANDS", "main",
]  # fmt: skip

#: Our subcommands: name → module with ``main(args)`` (imported when used: ``--help`` stays fast).
SUBCOMMANDS = {
    "summary": "ravlt_pl.summary",
    "benchmark": "ravlt_pl.benchmark.runner",
    "analyze-rank": "ravlt_pl.analysis.rank",
    "export": "ravlt_pl.export",
}


def main(args: list[str] | None = None) -> RAVLTCLI | dict | None:
    """Run a command; returns the LightningCLI (or a subcommand's result: the summary dict ...) for programmatic use."""
    args = list(sys.argv[1:] if args is None else args)
    try:
        args = resolve_config_args(args)
        if args and args[0] in SUBCOMMANDS:
            return importlib.import_module(SUBCOMMANDS[args[0]]).main(args[1:])
        return build_cli(args)
    except SIGTERMException as err:  # FaultTolerance names the signal, step and checkpoint when it stops a fit
        sys.exit(
            str(err)
            if str(err)
            else "stopped by SIGTERM; a requeued Slurm job resumes by itself, else rerun with --ckpt_path last"
        )
    except (DatasetError, CheckpointError, ConfigError, FileNotFoundError, WriteError) as err:
        message = str(err).split("Original Traceback")[0].strip()
        if "DataLoader worker" in message:  # keep the named file, drop the worker preamble
            message = str(err).strip().splitlines()[-1]
        sys.exit(f"error: {message}")


def run() -> None:
    """The ``ravlt_pl`` console script: :func:`main` without its return value (which ``sys.exit`` would print)."""
    main()
