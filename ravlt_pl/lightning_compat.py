"""Every private Lightning API ravlt_pl uses, behind one function each, so an upgrade fails here, loudly.

Lightning offers no public way to do these (requeue at a step boundary, a checkpoint from one rank,
the resume position of the fit loop ...). Each access goes through :func:`private`, which names
the attribute and the installed Lightning version when it is gone; :data:`PRIVATE_ATTRIBUTES`
lists them all, and ``tests/test_lightning_compat.py`` checks each against the installed Lightning
(``constraints.txt`` holds the version the suite passed with).
"""

from __future__ import annotations

from typing import Any

import lightning
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

#: (owner, dotted attribute path) of every private or internal Lightning API used in ravlt_pl.
PRIVATE_ATTRIBUTES: tuple[tuple[type, str], ...] = (
    (LightningCLI, "_parse_ckpt_path"),  # the hook RAVLTCLI replaces (LightningCLI calls it right after parsing)
    (LightningCLI, "_get"),  # a section of the parsed config, subcommand or not
    (Trainer, "_signal_connector._slurm_sigusr_handler_fn"),  # Lightning's requeue: hpc checkpoint + scontrol
    (Trainer, "_checkpoint_connector.dump_checkpoint"),  # the checkpoint dict, without the saving collectives
    (Trainer, "_accelerator_connector.cluster_environment"),  # single-device strategies keep it there only
    (Trainer, "fit_loop.setup_data"),  # builds the train loader (num_training_batches) before the loop does
    (Trainer, "fit_loop.restarting"),
    (Trainer, "fit_loop.epoch_progress.current.processed"),  # epochs done, restored from a checkpoint
    (Trainer, "fit_loop.epoch_loop.batch_progress.current.processed"),  # batches of the epoch done
    (ModelCheckpoint, "kth_value"),  # the score a new checkpoint must beat (set from monitor/mode at init)
    (LightningModule, "_trainer"),  # the trainer or None, where .trainer raises when detached
)


class LightningCompatError(RuntimeError):
    """The installed Lightning lacks a private attribute ravlt_pl relies on."""


def private(obj: Any, path: str) -> Any:
    """``obj.<path>`` (dotted), or :class:`LightningCompatError` naming the attribute and the Lightning version."""
    value = obj
    for i, name in enumerate(path.split(".")):
        try:
            value = getattr(value, name)
        except AttributeError:
            owner = type(obj).__name__ if not isinstance(obj, type) else obj.__name__
            missing = ".".join(path.split(".")[: i + 1])
            raise LightningCompatError(
                f"Lightning {lightning.__version__}: {owner}.{missing} is gone (ravlt_pl uses {owner}.{path}); "
                "install the version of constraints.txt (make venv)"
            ) from None
    return value


def config_section(cli: LightningCLI, config: Any, key: str, default: Any = None) -> Any:
    """``key`` of the parsed ``config`` under the running subcommand (LightningCLI's ``_get``)."""
    return private(cli, "_get")(config, key, default=default)


def requeue(trainer: Trainer, signum: int) -> None:
    """Lightning's Slurm requeue: ``hpc_ckpt_<N>.ckpt`` and ``scontrol requeue`` (its SIGUSR1 handler)."""
    private(trainer, "_signal_connector._slurm_sigusr_handler_fn")(signum, None)


def dump_checkpoint(trainer: Trainer) -> dict:
    """The checkpoint dict ``trainer.save_checkpoint`` would write, built by this rank alone (no barriers)."""
    return private(trainer, "_checkpoint_connector.dump_checkpoint")()


def connector_cluster_environment(trainer: Trainer) -> Any:
    """The cluster environment the trainer's accelerator connector picked (``None`` if it has none)."""
    connector = getattr(trainer, "_accelerator_connector", None)
    return private(connector, "cluster_environment") if connector is not None else None


def setup_train_data(trainer: Trainer) -> None:
    """What the fit loop does before its first batch: build the train loader and count its batches."""
    private(trainer, "fit_loop.setup_data")()


def resume_position(trainer: Trainer) -> tuple[int, int] | None:
    """(epoch, batches of it already trained) while ``fit`` restarts from a checkpoint, else None."""
    if not private(trainer, "fit_loop.restarting"):
        return None
    return (private(trainer, "fit_loop.epoch_progress.current.processed"),
            private(trainer, "fit_loop.epoch_loop.batch_progress.current.processed"))  # fmt: skip


def fit_epoch(trainer: Trainer) -> int:
    """The epoch ``fit`` is in (the count of epochs done; what Lightning gives a sampler's ``set_epoch``)."""
    return private(trainer, "fit_loop.epoch_progress.current.processed")


def set_kth_value(callback: ModelCheckpoint, value: Any) -> None:
    """The score a new top-k checkpoint must beat (Lightning sets it from ``mode`` in ``__init__`` only)."""
    private(callback, "kth_value")
    callback.kth_value = value


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The module's trainer, or ``None`` when it is not attached to one (``module.trainer`` raises then)."""
    return private(module, "_trainer")
