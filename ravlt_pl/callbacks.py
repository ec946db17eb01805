"""Fault tolerance for long and multi-node runs: atomic checkpoints, Slurm requeue at a step
boundary, a checkpoint on SIGTERM and before a data error stops training, a clear refusal of
another config's checkpoint, and a per-rank record of who ran where.

The CLI plugs :class:`AtomicCheckpointIO` and :class:`FaultTolerance` into every ``fit``; the
task's ``on_load_checkpoint`` calls :func:`check_checkpoint_compatible`. :class:`RunInfo` is
optional (``--trainer.callbacks+=ravlt_pl.callbacks.RunInfo``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .data.errors import DatasetError
from .lightning_compat import connector_cluster_environment, dump_checkpoint, requeue
from .models.checkpoint import CheckpointError, read_checkpoint
from .reports import atomic_write, os_error_of, stale_temps, write_json


# -- atomic checkpoint files ----------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, fsync, then ``os.replace``.

    A kill at any moment leaves either the previous complete file or the new complete file, never
    a truncated ``last.ckpt``. (Lightning's own save stages the bytes in the system temp dir and
    *copies* them over when that is another filesystem, which is not atomic.) A failed write (disk
    full, quota, I/O error) raises :class:`CheckpointError` naming the file and the OS error, with
    the previous file untouched. Remote paths (``s3://`` ...) go through Lightning's writer unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(str(path).removeprefix("file://"))
        try:
            atomic_write(path, lambda tmp: _save_synced(checkpoint, tmp))
        except (OSError, RuntimeError) as err:
            cause = os_error_of(err)
            if cause is None:
                raise
            # The temp file is gone; the error's own file name would be that temp file.
            reason = f"[Errno {cause.errno}] {cause.strerror}" if cause.errno else str(cause)
            raise CheckpointError(
                f"cannot write checkpoint {path}: {reason} (the previous {path.name}, if any, is unchanged)"
            ) from None
        _fsync_dir(path.parent)
        for stale in stale_temps(path):  # left by a save that was killed (not another run's save in progress)
            stale.unlink(missing_ok=True)


def _save_synced(checkpoint: dict[str, Any], path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())


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
    Slurm ``hpc_ckpt_*.ckpt``; ``None`` when there is none. One of global step 0 (a run that stopped
    before its first optimizer step) holds no progress and is passed over."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [p for p in root.rglob("last*.ckpt") if p.stem == "last" or p.stem.startswith("last-v")]
    found += list(root.glob("hpc_ckpt_*.ckpt"))
    return max((p for p in found if _global_step(p) != 0), key=lambda p: p.stat().st_mtime, default=None)


def _global_step(path: Path) -> int | None:
    """The checkpoint's ``global_step`` (its tensors mapped, not read); ``None`` if unreadable or absent."""
    try:
        checkpoint, _ = read_checkpoint(path, mmap=True)
    except CheckpointError:
        return None  # refused, naming the file, when it is loaded
    return checkpoint.get("global_step")


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: the latest training state, rewritten at every validation / epoch end.

    (``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when it also saves a best
    checkpoint, so after an epoch that did not improve the monitored metric a resume would go back
    epochs.) Its own class gives it a state key of its own beside other ``ModelCheckpoint``s.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename="last", save_top_k=1, enable_version_counter=False)


# -- refusing another config's checkpoint ---------------------------------------------------------
def check_checkpoint_compatible(
    module: LightningModule, checkpoint: Mapping[str, Any], source: str = "checkpoint"
) -> None:
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
        # Not where files are, nor LightningCLI's bookkeeping (_class_path, _instantiator).
        if k not in ("report_dir", "pretrained", "pretrained_strict")
        and not k.startswith("_")
        and theirs.get(k, "<unset>") != mine.get(k, "<unset>")
    ]
    if differing:
        problems.append("config differs: " + "; ".join(differing[:8]) + ("; ..." if len(differing) > 8 else ""))
    if shapes:
        problems.append(
            f"{len(shapes)} tensors differ in shape ("
            + "; ".join(shapes[:3])
            + ("; ..." if len(shapes) > 3 else "")
            + ")"
        )
    if missing:
        problems.append(
            f"{len(missing)} tensors of this model are absent ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensors are not in this model ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
        )
    raise CheckpointError(
        f"{source} was made with another configuration and cannot be resumed or evaluated with this one: "
        + "; ".join(problems)
        + ". Use the config the checkpoint was trained with, or initialise only the backbone with "
        "--model.init_args.pretrained."
    )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


# -- signals and data errors at a step boundary ---------------------------------------------------
class FaultTolerance(Callback):
    """Makes Slurm's time-limit signal, preemption and a bad image mid-epoch lose nothing and
    repeat nothing.

    Lightning acts on signals inside the signal handler, i.e. at whatever instruction they
    interrupt: under Slurm auto-requeue it saves ``hpc_ckpt_N.ckpt`` and runs ``scontrol requeue``
    there (possibly between ``optimizer.step`` and the step counter), and on SIGTERM it broadcasts
    a flag from the handler (a collective the other ranks are not in). During ``fit`` this callback
    takes the signals over and only notes them; at the next training-step boundary (after the EMA
    update, at the start of an accumulation window), agreed by all ranks through one small
    all-reduce per step, it

    - requeue signal under Slurm auto-requeue (SIGUSR1: ``--signal=SIGUSR1@90``,
      ``scancel --signal=USR1``): Lightning's requeue, so ``hpc_ckpt_N.ckpt`` holds exactly N
      completed steps and the requeued job resumes at step N; the older ``hpc_ckpt_*.ckpt`` are
      deleted (Lightning resumes from the highest number only), so one is kept however often the
      job is requeued;
    - SIGUSR1 outside Slurm (or without auto-requeue), SIGTERM (preemption, ``scancel``): writes
      ``last.ckpt`` beside the other checkpoints and stops, saying so; ``fit --ckpt_path last``
      resumes there. (SIGTERM after a requeue just stops: the job resumes from the hpc checkpoint.)

    Signals that arrive before training or during validation take effect at the next training
    step. Once training has finished, SIGUSR1 is reported and ignored for the rest of the process:
    the default action would kill it (exit code 138) and turn a finished Slurm job into a FAILED
    one. SIGUSR1 is taken over only where it has no handler (the default action); SIGTERM goes back
    to Lightning when training ends.

    A :class:`~ravlt_pl.data.errors.DatasetError` during training or its validation (an image that
    cannot be read mid-epoch) first writes ``last.ckpt`` at the current step, then propagates: fix
    the data and ``--ckpt_path last`` resumes without repeating the epoch's steps. (Inside an
    accumulation window, the micro-batches of that window already summed are not in the checkpoint.)

    Args:
        save_on_sigterm: take SIGTERM over as described (else Lightning's handling stays).
    """

    def __init__(self, save_on_sigterm: bool = True) -> None:
        self.save_on_sigterm = save_on_sigterm
        self._usr_signal: int | None = None  # SIGUSR1 (Slurm's requeue signal) while this callback handles it
        self._requeues = False  # under Slurm auto-requeue, the usr signal requeues; elsewhere it stops
        self._sigterm_handler: Any = None  # Lightning's, put back when training ends
        self._watching = False
        self._finished = False
        self._pending = {"requeue": False, "stop": False}
        self._stopped_by = "a signal"
        self._requeued = False
        self._launcher = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._finished = False
        env = cluster_environment(trainer)
        self._requeues = isinstance(env, SLURMEnvironment) and env.auto_requeue
        signum = env.requeue_signal if self._requeues else signal.SIGUSR1
        current = signal.getsignal(signum)
        # Before Lightning registers its handlers (it leaves a signal that has one alone, and puts
        # it back instead of the default action when fit ends). An earlier fit's handler is ours too.
        if current in (signal.SIG_DFL, None) or isinstance(getattr(current, "__self__", None), FaultTolerance):
            signal.signal(signum, self._note)
            self._usr_signal = signum

    def _note(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._finished:
            action = "training has finished, nothing to do"
        elif signum == self._usr_signal and self._requeues:
            self._pending["requeue"] = True
            action = "checkpoint + requeue at the next step boundary"
        else:
            self._pending["stop"], self._stopped_by = True, name
            action = "checkpoint + stop at the next step boundary"
            if signum == self._usr_signal:
                action = f"not a Slurm job with auto-requeue: {action}"
            if signum == signal.SIGTERM and self._launcher is not None:  # processes we started (local DDP) get it too
                self._launcher.kill(signum)
                self._launcher = None
        os.write(2, f"[pid {os.getpid()}] {name}: {action}\n".encode())

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_on_sigterm and threading.current_thread() is threading.main_thread():
            launcher = trainer.strategy.launcher
            self._launcher = launcher if trainer.is_global_zero and hasattr(launcher, "kill") else None
            self._sigterm_handler = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._note)
        # The same on every rank (same environment): all of them take part in the all-reduce or none.
        self._watching = self._usr_signal is not None or self._sigterm_handler is not None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if not self._watching:
            return
        flags = torch.tensor([float(self._pending["requeue"]), float(self._pending["stop"])],
                             device=trainer.strategy.root_device)  # fmt: skip
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            torch.distributed.all_reduce(flags)  # every rank learns what any rank received
        requeue, stop = (flags > 0).tolist()
        requeue = self._pending["requeue"] = self._pending["requeue"] or requeue
        stop = self._pending["stop"] = self._pending["stop"] or stop
        if batch_idx % trainer.accumulate_grad_batches:
            return  # a checkpoint inside an accumulation window would lose the gradients summed so far
        if requeue:
            self._pending["requeue"] = False
            self._checkpoint_and_requeue(trainer)
        if stop:
            where = "the job resumes from its hpc checkpoint"
            if not _has_progress(trainer):
                where = "nothing saved (no optimizer step yet, or checkpointing off)"
            elif not self._requeued:
                path = last_checkpoint_path(trainer)
                trainer.save_checkpoint(path)
                where = f"wrote {path}; rerun with --ckpt_path last to resume"
            raise SIGTERMException(f"stopped by {self._stopped_by} at global step {trainer.global_step}: {where}")

    def _checkpoint_and_requeue(self, trainer: Trainer) -> None:
        rank_zero_info(f"checkpoint for requeue at global step {trainer.global_step}")
        # Lightning's own requeue (hpc_ckpt_<highest + 1>.ckpt, `scontrol requeue` of the job or
        # array task), whose handler setup() kept from being installed.
        requeue(trainer, self._usr_signal)
        self._requeued = True
        if trainer.is_global_zero:
            numbers = {int(n): p for p in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")
                       if (n := p.stem.removeprefix("hpc_ckpt_")).isdigit()}  # fmt: skip
            for number in sorted(numbers)[:-1]:  # Lightning resumes from the highest number only
                numbers[number].unlink(missing_ok=True)

    def _finish(self) -> None:
        self._finished, self._watching = True, False
        if self._pending["requeue"] and not self._requeued:
            rank_zero_info("the requeue signal came after the last training step: training is complete, not requeued")
        if self._sigterm_handler is not None and signal.getsignal(signal.SIGTERM) == self._note:
            signal.signal(signal.SIGTERM, self._sigterm_handler)
        self._sigterm_handler = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # In fit, after a training step (Lightning resumes mid-epoch and mid-validation alike).
        fitting = (trainer.training or trainer.validating) and not trainer.sanity_checking and not self._finished
        self._finish()
        if isinstance(exception, DatasetError) and fitting and trainer.state.fn == "fit":
            self._checkpoint_before_failing(trainer)

    def _checkpoint_before_failing(self, trainer: Trainer) -> None:
        """``last.ckpt`` at the current step, written by this rank alone: a data error may stop one
        rank while the others wait in the step's gradient all-reduce, where the barriers of
        ``trainer.save_checkpoint`` would hang. Every DDP rank holds the same training state."""
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            return  # sharded states need every rank to save
        if not _has_progress(trainer):
            return
        path = last_checkpoint_path(trainer)
        try:
            trainer.strategy.checkpoint_io.save_checkpoint(dump_checkpoint(trainer), path)
        except Exception as err:  # the data error stays the one reported
            print(f"could not save a checkpoint before stopping: {err}", file=sys.stderr, flush=True)
            return
        print(f"data error at global step {trainer.global_step}: wrote {path}; after fixing the data, "
              "--ckpt_path last resumes there", file=sys.stderr, flush=True)  # fmt: skip


def _has_progress(trainer: Trainer) -> bool:
    """Whether a checkpoint now would hold anything: an optimizer step done, and checkpointing on."""
    return trainer.global_step > 0 and bool(trainer.checkpoint_callbacks)


def cluster_environment(trainer: Trainer) -> ClusterEnvironment | None:
    """Lightning's cluster environment of ``trainer`` (single-device strategies keep it on the connector only)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    return env or connector_cluster_environment(trainer)


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
        self.info.update(values)
        if self.path is not None:
            write_json(self.path, self.info)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        env = cluster_environment(trainer)
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
        self._write(
            resumed_from=str(trainer.ckpt_path) if trainer.ckpt_path else None, start_global_step=trainer.global_step
        )
        if trainer.is_global_zero:  # where this run's logs, checkpoints and reports go (rank 0 writes them)
            self._write(log_dir=getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._write(exception=type(exception).__name__, end_global_step=trainer.global_step)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._write(end_global_step=trainer.global_step)
