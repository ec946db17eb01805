"""The LightningCLI of every Lightning command (fit, validate, test, predict): :func:`build_cli`.

Subclass mode: the YAML's ``model.class_path`` picks the task (classification, detection,
segmentation) and ``data.class_path`` the dataset; ``data.num_classes`` (given, or counted from the
data when left out) and a data module's ``image_size`` are linked into the task.

Every run gets the callbacks of :data:`DEFAULT_CALLBACKS` as the default of ``trainer.callbacks``
(``--print_config`` shows them). Ours are added to, not replaced by, the config's: append with
``trainer.callbacks+:`` in a YAML or ``--trainer.callbacks+=Class`` on the command line; a YAML
that sets the whole ``trainer.callbacks`` list gets ours added back.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import ActionSubCommands, DefaultHelpFormatter
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from .callbacks import AtomicCheckpointIO, FaultTolerance, LastCheckpoint, find_last_checkpoint
from .config import PROG, ConfigError
from .data.base import BaseDataModule
from .data.errors import DatasetError
from .lightning_compat import config_section, private, set_kth_value, setup_train_data
from .models.checkpoint import CheckpointError, read_checkpoint
from .run_dir import AtomicSaveConfig, RunLogger, claim_version
from .tasks.base import BaseTask

DESCRIPTION = f"""RAVLT training, evaluation and tools. Lightning's subcommands (fit, validate, test, predict)
take --config NAME.yaml (a path, or a name under configs/) and --key.subkey overrides. Our own:
  summary       parameters and GFLOPs of a config's model, beside the published numbers
  benchmark     speed and memory of a variant (`{PROG} benchmark --help`)
  analyze-rank  rank of the attention maps of a trained backbone (`{PROG} analyze-rank --help`)
  export        a trained network to ONNX or a torch.export program (`{PROG} export --help`)"""


# -- parse errors that say what was meant ------------------------------------------------------
def _init_parameters(class_path: str) -> list[str]:
    """The constructor arguments jsonargparse accepts for ``class_path`` (following ``**kwargs`` up the MRO)."""
    module, _, name = class_path.rpartition(".")
    names = []
    for klass in getattr(importlib.import_module(module), name).__mro__:
        parameters = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return names
    return names


def _suggestion(parser: LightningArgumentParser, message: str) -> str | None:
    """``unknown option 'x' (did you mean 'y'?)`` for a jsonargparse error about an unknown key, else ``None``."""
    if unknown := re.search(r"Subcommand '([\w-]+)' does not accept option '([^']+)'", message):
        subcommands = next(a for a in parser._actions if isinstance(a, ActionSubCommands))
        known = [s.lstrip("-") for a in subcommands.choices[unknown[1]]._actions for s in a.option_strings]
        where, key = unknown[1], unknown[2]
    elif unknown := re.search(r"class_path '([\w.]+)':\s+Option '([^']+)' is not accepted", message):
        key_path = re.search(r'Parser key "([\w.]+)"', message)
        known = _init_parameters(unknown[1])
        where, key = f"{key_path[1] if key_path else 'init_args'} ({unknown[1]})", unknown[2]
    else:
        return None
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f"{where}: unknown option '{key}'" + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")


class RAVLTArgumentParser(LightningArgumentParser):
    """Lightning's parser; an unknown key is reported first, with the nearest known names, without the usage dump."""

    def error(self, message: str, ex: Exception | None = None):
        suggestion = _suggestion(self, message) if self.exit_on_error else None
        if suggestion is None:
            return super().error(message, ex)
        sys.stderr.write(f"error: {suggestion}\n{message}\n(every option: {self.prog} <subcommand> --help)\n")
        self.exit(2)


# -- the callbacks every run gets -------------------------------------------------------------
class BestCheckpoint(ModelCheckpoint):
    """``best-{epoch}-{step}.ckpt``: the best checkpoint by the task's own metric (its ``monitor`` and ``mode``)."""

    def __init__(self, dirpath: str | None = None, filename: str = "best-{epoch}-{step}", save_top_k: int = 1) -> None:
        super().__init__(dirpath=dirpath, filename=filename, save_top_k=save_top_k)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.monitor, self.mode = pl_module.monitor, pl_module.mode
        set_kth_value(self, torch.tensor(torch.inf if self.mode == "min" else -torch.inf))
        super().setup(trainer, pl_module, stage)


class RequireTrainingBatches(Callback):
    """Refuses a ``fit`` that would train nothing (Lightning would end it at once with success)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.limit_train_batches == 0:
            raise ConfigError("--trainer.limit_train_batches 0: fit would train nothing (to evaluate, use validate)")
        setup_train_data(trainer)  # what the fit loop does next (done already if the task read the stepping batches)
        if trainer.num_training_batches == 0:
            loader = trainer.train_dataloader
            size = len(loader.dataset) if hasattr(getattr(loader, "dataset", None), "__len__") else "?"
            raise DatasetError(
                f"fit has no training batches: {size} training samples at batch size {getattr(loader, 'batch_size', '?')}"
                f"{' with drop_last' if getattr(loader, 'drop_last', False) else ''} per device; check the data root and batch size"
            )


#: ``trainer.callbacks`` of every run: (class, init arguments).
DEFAULT_CALLBACKS = (
    (BestCheckpoint, {}),
    (LastCheckpoint, {}),  # last.ckpt: the latest state at every validation/epoch end
    (LearningRateMonitor, {"logging_interval": "step"}),
    (FaultTolerance, {}),  # Slurm requeue / SIGTERM checkpoints at step boundaries
    (RequireTrainingBatches, {}),
)


def _data_image_size(data) -> int | None:
    return getattr(data, "image_size", None)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class RAVLTCLI(LightningCLI):
    """LightningCLI with our defaults: visible default callbacks, linked classes, trusted checkpoints only."""

    def add_arguments_to_parser(self, parser) -> None:
        # The data module knows its classes (given, or counted from the data when it is built).
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.image_size", compute_fn=_data_image_size, apply_on="instantiate")
        parser.set_defaults({
            # DataModules shard their own loaders (exactly-once evaluation, repeated augmentation).
            "trainer.use_distributed_sampler": False,
            "trainer.callbacks": [{"class_path": _class_path(c), "init_args": dict(a)} for c, a in DEFAULT_CALLBACKS],
        })  # fmt: skip

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # Always our own arguments (config names resolved): Lightning's warning about args beside sys.argv does not apply.
        self.config = parser.parse_args(args)
        private(LightningCLI, "_parse_ckpt_path")  # the hook replaced below: were it gone, its checks would never run

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` (and find ``last``) before anything is built; the model stays the config's.

        LightningCLI would replace the config's model section with the hyper-parameters saved in the
        checkpoint, silently dropping the config and its overrides, and letting a checkpoint point
        ``pretrained`` or ``report_dir`` at other files. Here the config and its overrides apply; a
        checkpoint of another task is refused now, one of another architecture when it is loaded
        (``BaseTask.on_load_checkpoint``), both naming what differs. (Replaces LightningCLI's hook of
        the same name, which it calls right after parsing.)
        """
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if config is not None and config.get("weights_only") is None:
            config["weights_only"] = True  # Lightning's own load of the checkpoint unpickles no objects either
        if ckpt_path == "best" and subcommand != "fit":
            # A finished run's best checkpoint (this process has not trained, so Lightning knows none).
            root = Path(config.get("trainer", {}).get("default_root_dir") or os.getcwd())
            candidates = root.rglob("best-*.ckpt") if root.is_dir() else []
            found = max(candidates, key=lambda p: p.stat().st_mtime, default=None)
            if found is None:
                raise ConfigError(f"--ckpt_path best: no best-*.ckpt under {root}; give a checkpoint path or 'last'")
            config["ckpt_path"] = ckpt_path = str(found)
        if (
            ckpt_path in (None, "best", "hpc", "registry")
            or "://" in str(ckpt_path)
            or str(ckpt_path).startswith("registry:")
        ):
            return
        if ckpt_path == "last":
            # The newest last/hpc checkpoint under the run's root, whichever logger version wrote it
            # (Lightning looks in the new run's version folder only, and starts from scratch if none).
            root = config.get("trainer", {}).get("default_root_dir") or os.getcwd()
            found = find_last_checkpoint(root)
            if found is None:
                raise ConfigError(
                    f"--ckpt_path last: no last*.ckpt or hpc_ckpt_*.ckpt under {root}; leave --ckpt_path out to start afresh"
                )
            config["ckpt_path"] = ckpt_path = str(found)
        checkpoint, source = read_checkpoint(ckpt_path, mmap=True)
        if "pytorch-lightning_version" not in checkpoint or "state_dict" not in checkpoint:
            raise CheckpointError(
                f"{source}: not a Lightning checkpoint of this project; to initialise a backbone from other "
                "weights (the authors' release) use --model.init_args.pretrained"
            )
        saved_task = checkpoint.get("task_class") or (checkpoint.get("hyper_parameters") or {}).get("_class_path")
        configured = (config.get("model") or {}).get("class_path")
        if saved_task and configured and saved_task != configured:
            raise CheckpointError(f"{source} was made by {saved_task}, this config's model is {configured}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            self._record_counted_classes()
        except ValueError as err:  # jsonargparse wraps what a constructor raised in "Does not validate against ..."
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            if cause is err or not isinstance(cause, (ValueError, FileNotFoundError)):
                raise
            raise (
                cause if isinstance(cause, (DatasetError, CheckpointError, ConfigError)) else ConfigError(str(cause))
            ) from err

    def _record_counted_classes(self) -> None:
        """The class count the data gave (``num_classes`` left out) goes into the run's saved config.yaml,
        so that validate/predict/export of the run build the same model without reading the data."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        data = (config or {}).get("data") or {}
        init_args = data.get("init_args") if "init_args" in data else None
        counted = getattr(self.datamodule, "num_classes", None)
        if init_args is not None and init_args.get("num_classes") is None and counted is not None:
            init_args["num_classes"] = counted

    def instantiate_trainer(self, **kwargs):
        config = config_section(self, self.config_init, "trainer", default={})
        configured = config.get("callbacks") or []
        callbacks = kwargs.setdefault("callbacks", list(configured) if isinstance(configured, list) else [configured])
        # A YAML's own `trainer.callbacks:` list replaces the default one: ours come back beside it.
        callbacks += [cls(**args) for cls, args in DEFAULT_CALLBACKS if not any(type(c) is cls for c in callbacks)]
        if config.get("enable_checkpointing") is False:  # honoured: our checkpoint callbacks stay out
            callbacks[:] = [c for c in callbacks if type(c) not in (BestCheckpoint, LastCheckpoint)]
            if theirs := [type(c).__name__ for c in callbacks if isinstance(c, ModelCheckpoint)]:
                raise ConfigError(f"--trainer.enable_checkpointing false, but trainer.callbacks has "
                                  f"{', '.join(theirs)}; drop one of the two")  # fmt: skip
        if config.get("logger") in (None, True) and not config.get("fast_dev_run") and rank_zero_only.rank == 0:
            root = str(config.get("default_root_dir") or os.getcwd())
            if "://" not in root:  # Lightning's default logger, in a version directory claimed now (not at first log)
                kwargs["logger"] = RunLogger(root, version=claim_version(Path(root) / "lightning_logs"))
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # checkpoints written temp + rename
            kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _check_masks(self) -> None:
        """A mask detector on data read without masks: one line, not torchvision's traceback from the first step."""
        iou_types = getattr(self.model, "iou_types", ())
        if "segm" in iou_types and getattr(self.datamodule, "with_masks", True) is False:
            detector = type(getattr(self.model, "model", self.model)).__name__
            raise ConfigError(f"--data.init_args.with_masks false, but {detector} predicts instance masks "
                              f"(iou_types {', '.join(iou_types)}): give it data with masks, or use a box-only "
                              "detector config (configs/finetune/...)")  # fmt: skip

    def before_validate(self) -> None:
        self._check_masks()

    def before_test(self) -> None:
        self._check_masks()

    def before_fit(self) -> None:
        self._check_masks()
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps == -1:
            raise ConfigError("--trainer.max_epochs -1 (no end) needs --trainer.max_steps N: the learning-rate "
                              "schedule is laid out over the run's steps")  # fmt: skip
        try:  # a bad optimizer argument (a negative lr ...) now, not as a traceback from configure_optimizers
            self.model.optimizer(self.model.parameters())
        except ValueError as err:
            raise ConfigError(f"model.init_args.optimizer: {err}") from err


def build_cli(args: list[str], run: bool = True, prog: str = PROG) -> RAVLTCLI:
    return RAVLTCLI(
        BaseTask,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_callback=AtomicSaveConfig,
        save_config_kwargs={"overwrite": True},
        parser_class=RAVLTArgumentParser,
        parser_kwargs={"prog": prog, "description": DESCRIPTION, "formatter_class": _RawDescription},
    )


class _RawDescription(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the description's lines kept (the list of our subcommands)."""


@contextlib.contextmanager
def lightning_quiet():
    """Lightning's INFO lines (seed, devices, tips) and its hint to run under ``srun`` (a one-process count
    needs no Slurm) held back; its other warnings and errors still show."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The `srun` command is available on your system")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
