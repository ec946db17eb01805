"""Fault tolerance for long and multi-node runs: atomic checkpoints, Slurm requeue at a step
boundary, a checkpoint on SIGTERM, a clear refusal of another config's checkpoint, and a per-rank
record of who ran where.

The CLI plugs :class:`AtomicCheckpointIO` and :class:`FaultTolerance` into every ``fit``; the
task's ``on_load_checkpoint`` calls :func:`check_checkpoint_compatible`. :class:`RunInfo` is
optional (``--trainer.callbacks+=ravlt_pl.callbacks.RunInfo``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .models.checkpoint import CheckpointError


# -- atomic checkpoint files ----------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, fsync, then ``os.replace``.

    A kill at any moment leaves either the previous complete file or the new complete file, never
    a truncated ``last.ckpt``. (Lightning's own save stages the bytes in the system temp dir and
    *copies* them over when that is another filesystem, which is not atomic.) Remote paths
    (``s3://`` ...) go through Lightning's writer unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Hidden and not ending in .ckpt: no checkpoint search (last*, hpc_ckpt_*) ever picks it up.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was killed
            stale.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_last_checkpoint(root: str | Path) -> Path | None:
    """The newest resumable checkpoint under ``root``: ``last*.ckpt`` of any logger version, or a
    Slurm ``hpc_ckpt_*.ckpt``; ``None`` when there is none."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [p for p in root.rglob("last*.ckpt") if p.stem == "last" or p.stem.startswith("last-v")]
    found += list(root.glob("hpc_ckpt_*.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: the latest training state, rewritten at every validation / epoch end.

    (``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when it also saves a best
    checkpoint, so after an epoch that did not improve the monitored metric a resume would go back
    epochs.) Its own class gives it a state key of its own beside other ``ModelCheckpoint``s.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename="last", save_top_k=1, enable_version_counter=False)


# -- refusing another config's checkpoint ---------------------------------------------------------
def check_checkpoint_compatible(module: LightningModule, checkpoint: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming what differs when ``checkpoint`` cannot load onto
    ``module`` strictly (other variant, other number of classes, other task, EMA on/off).

    Lists the differing hyper-parameters and the first mismatched tensors with both shapes,
    instead of ``load_state_dict``'s size-mismatch traceback.
    """
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: not a Lightning checkpoint of this project (no 'state_dict')")
    ours = module.state_dict()
    shapes = [
        f"{k}: {list(v.shape)} in the checkpoint, {list(ours[k].shape)} here"
        for k, v in state.items()
        if k in ours and hasattr(v, "shape") and tuple(v.shape) != tuple(ours[k].shape)
    ]
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    if not module.strict_loading:
        missing = unexpected = []
    saved_task, our_task = checkpoint.get("task_class"), f"{type(module).__module__}.{type(module).__qualname__}"
    if not (shapes or missing or unexpected or (saved_task and saved_task != our_task)):
        return
    problems = []
    if saved_task and saved_task != our_task:
        problems.append(f"it was made by {saved_task}, this run is {our_task}")
    theirs, mine = dict(checkpoint.get("hyper_parameters") or {}), dict(module.hparams)
    differing = [
        f"{k}={_short(theirs.get(k, '<unset>'))} there, {_short(mine.get(k, '<unset>'))} here"
        for k in sorted(set(theirs) | set(mine))
        if k not in ("report_dir", "pretrained") and theirs.get(k, "<unset>") != mine.get(k, "<unset>")
    ]
    if differing:
        problems.append("config differs: " + "; ".join(differing[:8]) + ("; ..." if len(differing) > 8 else ""))
    if shapes:
        problems.append(f"{len(shapes)} tensors differ in shape (" + "; ".join(shapes[:3]) + ("; ..." if len(shapes) > 3 else "") + ")")
    if missing:
        problems.append(f"{len(missing)} tensors of this model are absent ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are not in this model ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    raise CheckpointError(
        f"{source} was made with another configuration and cannot be resumed or evaluated with this one: "
        + "; ".join(problems)
        + ". Use the config the checkpoint was trained with, or initialise only the backbone with "
        "--model.init_args.pretrained."
    )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


# -- Slurm requeue and SIGTERM at a step boundary -------------------------------------------------
class FaultTolerance(Callback):
    """Makes Slurm's time-limit signal and preemption lose nothing and repeat nothing.

    Lightning acts on these signals inside the signal handler, i.e. at whatever instruction they
    interrupt: under Slurm auto-requeue it saves ``hpc_ckpt_N.ckpt`` and runs ``scontrol requeue``
    there (possibly between ``optimizer.step`` and the step counter), and on SIGTERM it broadcasts
    a flag from the handler (a collective the other ranks are not in). During training this
    callback takes both signals over and only notes them; at the next training-step boundary
    (after the EMA update, at the start of an accumulation window), agreed by all ranks through
    one small all-reduce per step, it

    - requeue signal (SIGUSR1, ``--signal=SIGUSR1@90``, ``scancel --signal=USR1``): runs
      Lightning's own handler, so the checkpoint holds exactly N completed steps and the requeued
      job resumes at step N;
    - SIGTERM (preemption, ``scancel``): writes ``last.ckpt`` beside the other checkpoints and stops;
      ``fit --ckpt_path last`` resumes there. (After a requeue it just stops: the job resumes from
      the hpc checkpoint.)

    Signals that arrive during validation take effect at the next training step. Lightning's
    handlers are put back when training ends.

    Args:
        save_on_sigterm: take SIGTERM over as described (else Lightning's handling stays).
    """

    def __init__(self, save_on_sigterm: bool = True) -> None:
        self.save_on_sigterm = save_on_sigterm
        self._previous: dict[int, Any] = {}  # signal → the handler it had (Lightning's)
        self._requeue_signal: int | None = None
        self._pending = {"requeue": False, "terminate": False}
        self._requeued = False
        self._launcher = None

    def _note(self, signum, frame) -> None:
        kind = "requeue" if signum == self._requeue_signal else "terminate"
        self._pending[kind] = True
        if kind == "terminate" and self._launcher is not None:  # processes we started (local DDP) get it too
            self._launcher.kill(signum)
            self._launcher = None
        os.write(2, f"[pid {os.getpid()}] signal {signum}: {'checkpoint + requeue' if kind == 'requeue' else 'checkpoint + stop'} "
                    "at the next step boundary\n".encode())  # fmt: skip

    def _take_over(self, signum: int) -> None:
        previous = signal.getsignal(signum)
        if previous != self._note:
            self._previous[signum] = previous
            signal.signal(signum, self._note)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        env = getattr(trainer.strategy, "cluster_environment", None)
        if env is None:  # single-device strategies keep it on the connector only
            env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and callable(signal.getsignal(env.requeue_signal)):
            self._requeue_signal = env.requeue_signal
            self._take_over(self._requeue_signal)
        if self.save_on_sigterm:
            launcher = trainer.strategy.launcher
            self._launcher = launcher if trainer.is_global_zero and hasattr(launcher, "kill") else None
            self._take_over(signal.SIGTERM)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if not self._previous:
            return
        flags = torch.tensor([float(self._pending["requeue"]), float(self._pending["terminate"])],
                             device=trainer.strategy.root_device)  # fmt: skip
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            torch.distributed.all_reduce(flags)  # every rank learns what any rank received
        requeue, terminate = (flags > 0).tolist()
        requeue = self._pending["requeue"] = self._pending["requeue"] or requeue
        terminate = self._pending["terminate"] = self._pending["terminate"] or terminate
        if batch_idx % trainer.accumulate_grad_batches:
            return  # a checkpoint inside an accumulation window would lose the gradients summed so far
        if requeue:
            self._pending["requeue"] = False
            rank_zero_info(f"checkpoint for requeue at global step {trainer.global_step}")
            self._previous[self._requeue_signal](self._requeue_signal, None)  # Lightning: hpc_ckpt_N + scontrol requeue
            self._requeued = True
        if terminate:
            if not self._requeued:
                path = last_checkpoint_path(trainer)
                trainer.save_checkpoint(path)
                rank_zero_info(f"SIGTERM: wrote {path} at global step {trainer.global_step}")
            raise SIGTERMException()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._note:
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()


def last_checkpoint_path(trainer: Trainer) -> Path:
    """Where ``last.ckpt`` goes: the checkpoint folder of the run (``fit --ckpt_path last`` finds it)."""
    ours = [c for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)]
    callback = ours[0] if ours else trainer.checkpoint_callback
    folder = callback.dirpath if callback is not None and callback.dirpath else trainer.default_root_dir
    return Path(folder) / "last.ckpt"


# -- who ran where --------------------------------------------------------------------------------
class RunInfo(Callback):
    """Writes ``<default_root_dir>/run_info/<stage>-[job<ID>-]restart<N>-rank<R>.json`` for every process:
    world size, ranks, cluster environment, host, Slurm job id and restart count, the checkpoint
    resumed from and the global step at start and end. Handy when debugging a multi-node job.
    """

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.path: Path | None = None

    def _write(self, **values) -> None:
        from .reports import write_json

        self.info.update(values)
        if self.path is not None:
            write_json(self.path, self.info)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        env = getattr(trainer.strategy, "cluster_environment", None) or getattr(
            getattr(trainer, "_accelerator_connector", None), "cluster_environment", None
        )
        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        stage = str(getattr(stage, "value", stage))
        job = f"job{os.environ['SLURM_JOB_ID']}-" if os.environ.get("SLURM_JOB_ID") else ""
        name = f"{stage}-{job}restart{restart}-rank{trainer.global_rank}.json"
        self.path = Path(trainer.default_root_dir) / "run_info" / name
        self._write(
            stage=stage, world_size=trainer.world_size, global_rank=trainer.global_rank,
            local_rank=trainer.local_rank, node_rank=trainer.node_rank,
            cluster_environment=type(env).__name__ if env is not None else None,
            strategy=type(trainer.strategy).__name__, host=socket.gethostname(), pid=os.getpid(),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"), slurm_node=os.environ.get("SLURMD_NODENAME"),
            slurm_restart_count=restart,
        )  # fmt: skip

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(resumed_from=str(trainer.ckpt_path) if trainer.ckpt_path else None, start_global_step=trainer.global_step)
        if trainer.is_global_zero:  # where this run's logs, checkpoints and reports go (rank 0 writes them)
            self._write(log_dir=getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._write(exception=type(exception).__name__, end_global_step=trainer.global_step)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._write(end_global_step=trainer.global_step)
