"""What every DataModule shares: the data root, the global-batch rule, typed metadata and one loader factory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from ..lightning_compat import resume_position
from .errors import DatasetError


@dataclass(frozen=True)
class DatasetInfo:
    """What a task needs to know of its data: ``class_names[label]`` names model output ``label``;
    ``category_ids[label]`` is its id in the dataset's own files where those differ (COCO: 1..90 with gaps)."""

    class_names: tuple[str, ...]
    category_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.category_ids is not None and len(self.category_ids) != len(self.class_names):
            raise ValueError(f"{len(self.category_ids)} category ids for {len(self.class_names)} class names")


class BaseDataModule(LightningDataModule):
    """Holds ``root`` and the loader settings; derives the per-device batch from the global one.

    Subclasses fill :attr:`datasets` (``train``, ``val``, ``test``, ``predict``) and :attr:`info` in
    ``setup``; one loader factory (torchgeo's pattern) builds every split's DataLoader from them,
    with the hooks :meth:`collate_fn`, :meth:`loader_batch_size` and :meth:`train_sampler`.

    Args:
        root: dataset directory (the real layout, see ``data/README.md``).
        predict_dir: folder of images for ``predict`` (default: the validation images).
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
        predict_dir: str | Path | None = None,
        global_batch_size: int | None = None,
        batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        if global_batch_size is None and batch_size is None:
            raise ValueError("set data.batch_size (per device) or data.global_batch_size")
        for name, value in (("batch_size", batch_size), ("global_batch_size", global_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"--data.init_args.{name} {value}: must be a positive number of images")
        if num_workers < 0:
            raise ValueError(f"--data.init_args.num_workers {num_workers}: must be 0 (the main process loads) or more")
        self.root = Path(root)
        self.predict_dir = Path(predict_dir) if predict_dir is not None else None
        self.global_batch_size = global_batch_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.datasets: dict[str, Dataset] = {}
        self._info: DatasetInfo | None = None

    @property
    def info(self) -> DatasetInfo:
        """Class names (and dataset category ids) of the data; set by ``setup`` for every stage."""
        if self._info is None:
            raise RuntimeError(f"{type(self).__name__}.info is known after setup(stage)")
        return self._info

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
        return resume_position(self.trainer) if self.trainer is not None else None

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    # -- hooks of the loader factory -----------------------------------------------------------------
    def collate_fn(self, split: str) -> Callable | None:
        """How ``split``'s items form a batch (``None``: torch's default collate)."""
        return None

    def loader_batch_size(self, split: str) -> int:
        """Images per device per step for ``split``."""
        return self.per_device_batch_size()

    def train_sampler(self, dataset: Dataset) -> Sampler | None:
        """A training sampler that already shards over processes (``None``: a shuffling ``DistributedSampler``)."""
        return None

    # -- the loader factory --------------------------------------------------------------------------
    def _dataloader_factory(self, split: str) -> DataLoader:
        """The DataLoader of ``split``; it shards itself over processes (the CLI turns Lightning's sampler swap off).

        Training shards with a shuffling ``DistributedSampler`` (seeded by epoch, also on one
        process) unless :meth:`train_sampler` gives one (e.g. repeated augmentation), wrapped in a
        :class:`ResumableSampler` so a run resumed mid-epoch continues with the next unseen batch;
        evaluation and predict shard without padding, so every sample is seen exactly once whatever
        the world size.
        """
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__} has no {split!r} dataset; setup() for that stage builds it")
        dataset = self.datasets[split]
        world, rank = self._world()
        batch_size = self.loader_batch_size(split)
        train = split == "train"
        sampler: Sampler | None = None
        if train:
            # Seeded per epoch even on one process, so a resumed run sees the same order.
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            sampler = self.train_sampler(dataset) or DistributedSampler(
                dataset, world, rank, shuffle=True, seed=seed, drop_last=True
            )
            sampler = ResumableSampler(sampler, self._resume_position, batch_size)
        elif world > 1:
            if len(dataset) < world:  # Lightning's sampler asserts it: a process without a batch can hang DDP
                raise DatasetError(
                    f"{type(self).__name__}: the {split} split holds {len(dataset)} samples for {world} processes; "
                    "each needs at least one (run it on fewer devices)"
                )
            sampler = UnrepeatedDistributedSampler(dataset, world, rank, shuffle=False)  # rank, rank + world, ...
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            collate_fn=self.collate_fn(split),
        )

    def train_dataloader(self) -> DataLoader:
        return self._dataloader_factory("train")

    def val_dataloader(self) -> DataLoader:
        return self._dataloader_factory("val")

    def test_dataloader(self) -> DataLoader:
        return self._dataloader_factory("test")

    def predict_dataloader(self) -> DataLoader:
        return self._dataloader_factory("predict")


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


# Not torchdata's StatefulDataLoader: for a sampler without state it too skips the batches yielded (its README), but
# its state is per process ("not across ranks") and Lightning's checkpoint holds rank 0's (fit_loop.on_save_checkpoint);
# the loop counters read here are the same on every rank, so checkpoints need no loader state and no new dependency.
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
