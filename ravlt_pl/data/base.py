"""What every DataModule shares: the data root, the global-batch rule and the DataLoader settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

from lightning.pytorch import LightningDataModule
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from .errors import DatasetError


class BaseDataModule(LightningDataModule):
    """Holds ``root`` and the loader settings; derives the per-device batch from the global one.

    Args:
        root: dataset directory (the real layout, see ``data/README.md``).
        global_batch_size: the published batch over all devices and accumulation steps. When set,
            ``batch_size`` is derived as ``global / (devices × nodes × accumulate_grad_batches)``,
            or checked against it if also given.
        batch_size: images per device per step.
        num_workers: DataLoader worker processes per device.
        pin_memory: page-locked host memory (faster host→GPU copies).
        persistent_workers: keep workers alive between epochs (decode pools are not rebuilt).
    """

    #: what the error says when ``root`` is missing; subclasses name their expected layout.
    layout_hint = ""

    def __init__(
        self,
        root: str | Path,
        global_batch_size: int | None = None,
        batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        if global_batch_size is None and batch_size is None:
            raise ValueError("set data.batch_size (per device) or data.global_batch_size")
        self.root = Path(root)
        self.global_batch_size = global_batch_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers

    def check_root(self) -> None:
        if not self.root.is_dir():
            raise DatasetError(
                f"{self.root}: dataset directory not found. {self.layout_hint} "
                f"Point at it with --data.root PATH (see data/README.md)."
            )

    def per_device_batch_size(self) -> int:
        """The batch each device loads, so that the global batch follows the published recipe."""
        if self.global_batch_size is None:
            return int(self.batch_size)
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        shards = world * accumulate
        if self.batch_size is None:
            if self.global_batch_size % shards:
                raise ValueError(
                    f"global batch {self.global_batch_size} cannot be split over {world} processes × "
                    f"{accumulate} accumulation steps; change --trainer.accumulate_grad_batches or the device count"
                )
            return self.global_batch_size // shards
        if self.batch_size * shards != self.global_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} × {world} processes × {accumulate} accumulation steps = "
                f"{self.batch_size * shards}, but the recipe's global batch is {self.global_batch_size}; "
                f"set --trainer.accumulate_grad_batches {max(1, self.global_batch_size // (self.batch_size * world))} "
                "or leave data.batch_size unset to derive it"
            )
        return self.batch_size

    def _resume_position(self) -> tuple[int, int] | None:
        """(epoch, batches of it already trained) while ``fit`` restarts from a checkpoint, else None."""
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.restarting:
            return None
        loop = trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def make_loader(
        self,
        dataset: Dataset,
        train: bool,
        collate_fn: Callable | None = None,
        sampler: Sampler | None = None,
        batch_size: int | None = None,
    ) -> DataLoader:
        """A DataLoader that shards itself over processes (the CLI turns Lightning's sampler swap off).

        Training shards with a shuffling ``DistributedSampler`` (seeded by epoch, also on one
        process) unless ``sampler`` is given (e.g. repeated augmentation, already distributed), wrapped
        in a :class:`ResumableSampler` so a run resumed mid-epoch continues with the next unseen
        batch; evaluation shards without padding, so every sample is scored exactly once whatever
        the world size.
        """
        world, rank = self._world()
        if train:
            # Seeded per epoch even on one process, so a resumed run sees the same order.
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            if sampler is None:
                sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
            sampler = ResumableSampler(sampler, self._resume_position, batch_size or self.per_device_batch_size())
        elif sampler is None and world > 1:
            sampler = ShardedEvalSampler(len(dataset), world, rank)
        workers = self.num_workers
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=batch_size or self.per_device_batch_size(),
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=collate_fn,
        )


class AugmentedDataset(Dataset):
    """A dataset whose albumentations pipeline draws from torch's per-worker seed.

    albumentations' ``Compose`` keeps its own RNG, seeded from OS entropy and blind to
    ``seed_everything``; forked workers would also share one copied stream and draw the same
    augmentations. :meth:`seed_transform` (called before each training transform) reseeds it from
    the worker's seed (each epoch's seed with non-persistent workers) or, without workers, from
    ``torch.initial_seed()``, so runs repeat under a seed and workers differ.
    """

    transform: Any
    _seed: int | None = None

    def seed_transform(self) -> None:
        info = get_worker_info()
        seed = info.seed if info is not None else torch.initial_seed()
        if seed != self._seed:
            self.transform.set_random_seed(seed % 2**32)
            self._seed = seed


class ShardedEvalSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every sample on exactly one process, no padding duplicates.

    torch's ``DistributedSampler`` pads the last shard with repeats (counted twice by metrics) or
    drops samples; evaluation needs neither, and per-process batches may differ in size.
    """

    def __init__(self, size: int, world: int, rank: int) -> None:
        self.indices = list(range(rank, size, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning counts as resumable mid-epoch: its :class:`ResumableSampler`
    takes the position from the restored loop counters, so there is no state of its own to save."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ResumableSampler(Sampler[int]):
    """A training sampler that continues an epoch part-way through after a resume.

    Lightning restores the loop counters (epoch, batches done) but not the position inside a plain
    sampler, and it may build the loader before restoring them. So the position is asked for when
    iteration starts: ``position()`` gives ``(epoch, batches already trained)`` while ``fit`` is
    resuming (``None`` otherwise); the wrapper then starts that epoch's order after those batches,
    so no batch is seen twice or missed. ``set_epoch`` (Lightning, each epoch) reaches the wrapped
    sampler.
    """

    def __init__(self, sampler: Sampler[int], position: Callable[[], tuple[int, int] | None], batch_size: int) -> None:
        self.sampler = sampler
        self.position = position
        self.batch_size = batch_size
        self.epoch = 0
        self._resumed_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        skip = 0
        position = self.position()
        if position is not None and position != self._resumed_at:  # the first pass after a resume
            self._resumed_at = position
            epoch, batches = position
            self.set_epoch(epoch)
            skip = batches * self.batch_size
        for i, index in enumerate(self.sampler):
            if i >= skip:
                yield index

    def __len__(self) -> int:
        return len(self.sampler)
