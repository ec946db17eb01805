"""The run's own directory: a version claimed atomically, its config.yaml and TensorBoard logs written
so that a full disk stops the run with one line naming the file, not a traceback or a 0-byte file."""

from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from .reports import WriteError, os_error_of, write_text


def claim_version(folder: str | Path) -> int:
    """The next free ``version_N`` under ``folder``, created by this call: ``mkdir`` fails for all but one
    claimant, so two runs started into one root get a version directory each."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(m[1]) for p in folder.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (folder / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


class RunLogger(TensorBoardLogger):
    """Lightning's default logger (TensorBoard), whose failed writes (disk full: raised from its writer
    thread at the next call) are a :class:`~ravlt_pl.reports.WriteError` naming the log dir."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if threading.excepthook is not _quiet_writer_thread:
            _quiet_writer_thread.previous = threading.excepthook
            threading.excepthook = _quiet_writer_thread

    @contextlib.contextmanager
    def _named(self):
        try:
            yield
        except (OSError, RuntimeError) as err:
            cause = os_error_of(err)
            if cause is None or isinstance(err, WriteError):
                raise
            reason = f"[Errno {cause.errno}] {cause.strerror}" if cause.errno else str(cause)
            raise WriteError(f"cannot write the TensorBoard logs in {self.log_dir}: {reason}") from err

    @property
    def experiment(self):
        with self._named():  # its first access writes the event file's header
            return super().experiment

    def log_metrics(self, *args, **kwargs) -> None:
        with self._named():
            super().log_metrics(*args, **kwargs)

    def log_hyperparams(self, *args, **kwargs) -> None:
        with self._named():
            super().log_hyperparams(*args, **kwargs)

    def log_graph(self, *args, **kwargs) -> None:
        with self._named():
            super().log_graph(*args, **kwargs)

    def save(self) -> None:
        with self._named():
            super().save()

    def finalize(self, status: str) -> None:
        with self._named():
            super().finalize(status)


def _quiet_writer_thread(args) -> None:
    """TensorBoard's writer thread dies on a failed write and re-raises it at the logger's next call, where
    :class:`RunLogger` names it in one line: the thread's own traceback is not printed as well."""
    if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
        return
    _quiet_writer_thread.previous(args)


_quiet_writer_thread.previous = threading.excepthook


class AtomicSaveConfig(SaveConfigCallback):
    """``config.yaml`` of the run in its log dir, written temp + rename: a full disk leaves no 0-byte
    file and stops with one line. (Rank 0 only; remote log dirs: Lightning's own writer.)"""

    def __init__(self, parser, config, **kwargs) -> None:
        super().__init__(parser, config, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = trainer.logger  # not trainer.log_dir: a collective, and this runs on rank 0 alone
        log_dir = str(getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir)
        path = os.path.join(log_dir, self.config_filename)
        if "://" in log_dir:
            self.parser.save(self.config, path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile)
        else:
            write_text(path, self.parser.dump(self.config, skip_none=False))
