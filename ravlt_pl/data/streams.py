"""Sharded image streams (WebDataset tars, parquet files): split over processes and workers with exact counts.

A split is a list of shards with known sample counts (``_info.json`` or parquet footers). Every epoch
the shards are put in an order (training: a permutation seeded by ``(seed, epoch)``, the same on every
process; evaluation: as listed) and read as one sequence of ``N`` samples. Process ``rank`` of
``world`` takes a contiguous range of it, and each of its DataLoader workers a contiguous run of whole
batches of that range; a worker reads only the shards under its run (a run starting mid-shard seeks to
it). Hence:

- training: every process gets ``N // (world × batch)`` batches (the same step count everywhere, no
  DDP hang), an epoch sees each sample at most once (the < ``world × batch`` left over differ by epoch);
  within a worker a shuffle buffer, seeded by ``(seed, epoch, rank, worker)``, mixes its run;
- evaluation: the processes' ranges partition the split: every sample is scored exactly once;
- resume: the epoch's order follows from ``(seed, epoch)``; resumed mid-epoch, each worker skips the
  batches it had delivered (DataLoader batch ``j`` is worker ``j % workers``'s batch ``j // workers``),
  so the rest of the epoch is exactly the unseen batches when world size and ``num_workers`` are unchanged.
"""

from __future__ import annotations

import io
import multiprocessing
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .base import ResumableLoader
from .errors import DatasetError
from .images import read_rgb

#: (where, key, encoded image, label) of one stored sample; ``where`` names the shard for messages.
RawSample = tuple[str, str, bytes, int]
#: reads samples ``start..stop-1`` of one shard file.
ShardReader = Callable[[Path, int, int], Iterator[RawSample]]


@dataclass(frozen=True)
class Shard:
    path: Path
    length: int


def rank_range(total: int, world: int, rank: int, batch: int, train: bool) -> tuple[int, int]:
    """Sample positions ``[start, stop)`` of the epoch's sequence that process ``rank`` reads."""
    if train:
        per_rank = total // (world * batch) * batch
        return rank * per_rank, (rank + 1) * per_rank
    return rank * total // world, (rank + 1) * total // world


def worker_batches(batches: int, workers: int, worker: int) -> tuple[int, int]:
    """Batches ``[first, stop)`` of a process's run that ``worker`` delivers: the DataLoader takes
    batches from its workers in turn, so the first ``batches % workers`` workers deliver one more."""
    per, extra = divmod(batches, workers)
    first = worker * per + min(worker, extra)
    return first, first + per + (worker < extra)


def skipped_batches(done: int, workers: int, worker: int) -> int:
    """Of the first ``done`` batches of an epoch, how many came from ``worker`` (round-robin)."""
    return done // workers + (worker < done % workers)


def pieces(shards: list[Shard], order: list[int], start: int, stop: int) -> list[tuple[Shard, int, int]]:
    """The (shard, first, stop) pieces covering positions ``[start, stop)`` of the shards read in ``order``."""
    out, offset = [], 0
    for i in order:
        shard = shards[i]
        lo, hi = max(start - offset, 0), min(stop - offset, shard.length)
        if lo < hi:
            out.append((shard, lo, hi))
        offset += shard.length
        if offset >= stop:
            break
    return out


def shuffled(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer of ``size`` items: each output is a random one of the buffered items."""
    buffer: list[Any] = []
    for item in samples:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def decode(data: bytes, where: str, key: str):
    """The encoded image as 8-bit RGB; a bad one is a :class:`DatasetError` naming shard and key."""
    try:
        return read_rgb(io.BytesIO(data))
    except DatasetError as err:
        reason = str(err).split(": ", 1)[-1]
        raise DatasetError(f"{where}: sample {key!r}: {reason}") from None


class ShardStream(IterableDataset):
    """One split of a sharded dataset as (image, label) items, this process's share (see the module doc).

    Args:
        shards: the split's shards with their sample counts.
        read: reads a range of one shard (a module-level function: workers may be spawned).
        transform: PIL image -> tensor.
        num_classes: labels outside ``0..num_classes-1`` stop the run naming shard and sample.
        train: shuffle shards and samples per epoch, equal batch counts on every process.
        batch_size: per process; workers deliver whole batches.
        world, rank: processes and this one's rank.
        seed: shuffling seed (with the epoch).
        shuffle_buffer: samples each training worker holds to shuffle (memory: that many encoded images).
    """

    def __init__(
        self,
        shards: list[Shard],
        read: ShardReader,
        transform: Callable,
        num_classes: int,
        train: bool,
        batch_size: int,
        world: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 2048,
    ) -> None:
        self.shards, self.read, self.transform, self.num_classes = shards, read, transform, num_classes
        self.train, self.batch_size, self.world, self.rank = train, batch_size, world, rank
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.total = sum(s.length for s in shards)
        self.start, self.stop = rank_range(self.total, world, rank, batch_size, train)
        if train and self.stop == 0:
            raise DatasetError(
                f"{shards[0].path.parent}: {self.total} training samples make no batch of "
                f"{batch_size} on each of {world} processes; lower the batch size"
            )
        #: yield ``(image, label, key)``: which samples a process read (for checks).
        self.keys = False
        # Shared with the workers (persistent ones too): set in the main process before each epoch.
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self._skip = multiprocessing.Value("q", 0, lock=False)

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        """The epoch to read next and how many of its batches were already trained (a resume)."""
        self._epoch.value, self._skip.value = epoch, batches_done

    def __len__(self) -> int:
        return self.stop - self.start

    def order(self, epoch: int) -> list[int]:
        """The shard order of ``epoch``: a permutation seeded by (seed, epoch) for training."""
        if not self.train:
            return list(range(len(self.shards)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def worker_run(self, epoch: int, worker: int, workers: int) -> list[tuple[Shard, int, int]]:
        """The shard pieces ``worker`` of this process reads in ``epoch``."""
        batches = -(-len(self) // self.batch_size)
        first, stop = worker_batches(batches, workers, worker)
        lo = self.start + first * self.batch_size
        hi = min(self.start + stop * self.batch_size, self.stop)
        return pieces(self.shards, self.order(epoch), lo, hi)

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, done = int(self._epoch.value), int(self._skip.value)
        run = self.worker_run(epoch, worker, workers)
        samples = chain.from_iterable(self.read(shard.path, lo, hi) for shard, lo, hi in run)
        if self.train:
            samples = shuffled(samples, self.shuffle_buffer, random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}"))
        skip = skipped_batches(done, workers, worker) * self.batch_size
        for i, (where, key, data, label) in enumerate(samples):
            if i < skip:
                continue
            if not 0 <= label < self.num_classes:
                raise DatasetError(f"{where}: sample {key!r}: label {label} outside 0..{self.num_classes - 1} "
                                   f"(num_classes {self.num_classes})")  # fmt: skip
            image = self.transform(decode(data, where, key))
            yield (image, label, key) if self.keys else (image, label)


class StreamLoader(ResumableLoader):
    """A DataLoader over a :class:`ShardStream` that tells it, as each epoch starts, which epoch it is.

    ``epoch()`` is the epoch Lightning is starting; ``resume()`` gives ``(epoch, batches trained)`` while
    ``fit`` restarts from a checkpoint (the first pass after a resume skips those batches). Both are asked
    at the first batch, not at ``iter()``: Lightning makes the first epoch's iterator (to count the
    batches) before it restores a checkpoint's loop state, and workers read the position as they start.
    """

    def __init__(
        self,
        dataset: ShardStream,
        epoch: Callable[[], int],
        resume: Callable[[], tuple[int, int] | None],
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch, self.resume = epoch, resume
        self._resumed_at: tuple[int, int] | None = None

    def _start(self) -> Iterator:
        position = self.resume()
        if position is not None and position != self._resumed_at:
            self._resumed_at = position
            self.dataset.set_position(*position)
        else:
            self.dataset.set_position(self.epoch())
        return super().__iter__()

    def __iter__(self) -> Iterator:
        return _Deferred(self._start)


class _Deferred:
    """An iterator made by ``start()`` at the first ``next()``."""

    def __init__(self, start: Callable[[], Iterator]) -> None:
        self.start, self.iterator = start, None

    def __iter__(self) -> _Deferred:
        return self

    def __next__(self):
        if self.iterator is None:
            self.iterator = self.start()
        return next(self.iterator)
