"""``python -m ravlt_pl {fit,validate,test,predict,summary,...} --config X.yaml``.

LightningCLI in subclass mode: the YAML's ``model.class_path`` picks the task (classification,
detection, segmentation) and ``data.class_path`` the dataset; ``data.num_classes`` is linked into
the task. A bare config name (``cls_s.yaml``, ``det/maskrcnn_s_1x.yaml``) is looked up in
``configs/`` when it is not a path from the working directory.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks import AtomicCheckpointIO, FaultTolerance, LastCheckpoint, find_last_checkpoint
from .data.base import BaseDataModule
from .data.errors import DatasetError
from .models.checkpoint import CheckpointError
from .published import published_for
from .tasks.base import BaseTask

#: The published configs ship inside the package (``ravlt_pl/configs``; ``configs/`` in a clone links to it).
PACKAGE_CONFIGS = Path(str(resources.files("ravlt_pl") / "configs"))


def config_dirs() -> tuple[Path, ...]:
    """Where a bare config name is looked up: ``./configs`` of the working directory, then the package's."""
    return tuple(dict.fromkeys([Path.cwd() / "configs", PACKAGE_CONFIGS]))


def resolve_config(name: str) -> str:
    """A config path as given if it exists, else the same name under ``configs/``."""
    if Path(name).exists():
        return name
    for folder in config_dirs():
        if (folder / name).is_file():
            return str(folder / name)
    raise FileNotFoundError(f"config {name!r} not found here nor in {', '.join(map(str, config_dirs()))}")


def _resolve_config_args(args: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "--config") and i + 1 < len(args):
            out += [arg, resolve_config(args[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


class RAVLTCLI(LightningCLI):
    """LightningCLI with our defaults: best-checkpoint on the task's monitor, lr logging, linked classes."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # DataModules shard their own loaders (exactly-once evaluation, repeated augmentation).
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def instantiate_trainer(self, **kwargs):
        task = self.model
        config = self._get(self.config_init, "trainer", default={})
        # Ours are added to (not in place of) the config's trainer.callbacks.
        configured = config.get("callbacks") or []
        callbacks = kwargs.setdefault("callbacks", list(configured) if isinstance(configured, list) else [configured])
        callbacks.append(ModelCheckpoint(monitor=task.monitor, mode=task.mode, filename="best-{epoch}-{step}"))
        callbacks.append(LastCheckpoint())  # last.ckpt: the latest state at every validation/epoch end
        if self.subcommand == "fit":
            callbacks.append(LearningRateMonitor(logging_interval="step"))
            callbacks.append(FaultTolerance())  # Slurm requeue / SIGTERM checkpoints at step boundaries
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # checkpoints written temp + rename
            kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        # `--ckpt_path last`: the newest last/hpc checkpoint under the run's root, whichever logger
        # version wrote it (Lightning looks in the new run's version folder only).
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last" and (found := find_last_checkpoint(self.trainer.default_root_dir)):
            config["ckpt_path"] = str(found)


def build_cli(args: list[str], run: bool = True) -> RAVLTCLI:
    return RAVLTCLI(
        BaseTask,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def summary(args: list[str]) -> dict:
    """Build the config's task (no data read) and count parameters and GFLOPs (multiply-adds).

    FLOPs come from ``torch.utils.flop_counter`` (matmuls, convolutions, attention; not norms or
    element-wise ops), halved to multiply-adds as papers report them.
    """
    cli = build_cli(args + ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                            "--trainer.num_nodes", "1"], run=False)  # fmt: skip
    task: BaseTask = cli.model
    config = next((a for a in args if a.endswith((".yaml", ".yml"))), None)
    height, width = task.summary_input_size
    params = sum(p.numel() for p in task.model.parameters())
    task.eval()
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        task.flops_forward(torch.randn(1, 3, height, width))
    result = {
        "config": config,
        "model": type(task).__name__,
        "params_m": round(params / 1e6, 2),
        "gflops": round(counter.get_total_flops() / 2e9, 2),
        "input_size": [height, width],
        "published": published_for(config),
    }
    print(json.dumps(result))
    return result


def main(args: list[str] | None = None) -> RAVLTCLI | dict | None:
    """Run a command; returns the LightningCLI (or the summary dict) for programmatic use."""
    # We pass sys.argv on ourselves, with config names resolved.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    args = list(sys.argv[1:] if args is None else args)
    try:
        args = _resolve_config_args(args)
        if args and args[0] == "summary":
            return summary(args[1:])
        if args and args[0] == "benchmark":
            from .benchmark.runner import main as benchmark

            benchmark(args[1:])
            return
        if args and args[0] == "analyze-rank":
            from .analysis.rank import main as analyze_rank

            analyze_rank(args[1:])
            return
        return build_cli(args)
    except SIGTERMException:
        sys.exit("stopped by SIGTERM; a requeued Slurm job resumes by itself, else rerun with --ckpt_path last")
    except (DatasetError, CheckpointError, FileNotFoundError) as err:
        message = str(err).split("Original Traceback")[0].strip()
        if "DataLoader worker" in message:  # keep the named file, drop the worker preamble
            message = str(err).strip().splitlines()[-1]
        sys.exit(f"error: {message}")
