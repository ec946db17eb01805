"""Data loading by storage format: ImageFolder vs WebDataset shards vs HF parquet (``benchmark --data-loading``).

One synthetic ImageNet-sized set (500×375 JPEG, quality 90, written once under ``--out``) in the three
layouts (``ravlt_pl.data.shards`` converts it), read by :class:`~ravlt_pl.data.imagenet.ImageNetDataModule`
with the published DeiT training transform at 224² (RandomResizedCrop, flip, RandAugment m9, random
erasing). Per format, interleaved over ``--data-rounds``:

- **read**: samples/s (and MB/s) of the storage alone, bytes out, nothing decoded: one ``open`` per
  image for the folder, one per shard for tars and parquet (from the page cache here; on a shared file
  system the per-file metadata operations are what the shards remove);
- **per worker**: images/s of one worker (one thread: decode, transform, collate), per wall second and
  per CPU second (a worker on a core of its own);
- **loader**: images/s of a DataLoader with ``--data-workers`` workers, the scaling check.

"Workers per 1000 img/s" = 1000 ÷ images/s per CPU second; with ``--feed-img-s imagenet=R`` (a GPU's
training rate) it also gives the workers that rate needs, rounded up.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from .pipelines import OneWorker

FORMATS = ("folder", "wds", "parquet")
SOURCE_SIZE = (500, 375)  # ImageNet's typical JPEG
PER_CLASS = 20  # training images per class (5 classes)


def formatted_sets(root: Path) -> dict[str, Path]:
    """Write (once) the synthetic set and its shard and parquet copies; later runs reuse them."""
    from ravlt_pl.data.parquet import write_parquet
    from ravlt_pl.data.shards import write_shards
    from ravlt_pl.data.synthetic import make_classification

    paths = {"folder": root / "folder", "wds": root / "wds", "parquet": root / "parquet"}
    if not paths["folder"].is_dir():
        print(f"  writing synthetic ImageNet-sized JPEGs ({SOURCE_SIZE[0]}×{SOURCE_SIZE[1]}) under {root}", flush=True)
        make_classification(paths["folder"], train_per_class=PER_CLASS, val_per_class=1, image_size=SOURCE_SIZE)
    if not paths["wds"].is_dir():
        write_shards(paths["folder"], paths["wds"], shard_size=25)
    if not paths["parquet"].is_dir():
        write_parquet(paths["folder"], paths["parquet"], rows_per_file=50)
    return paths


class RetriedTransform:
    """Retries a transform that raises, counting it (pipelines.CountingDataset's rule, for streams too):
    timm's RandAugment ``inc1`` posterize at magnitude 10 asks Pillow for 0 bits, which it refuses."""

    def __init__(self, transform, tries: int = 5) -> None:
        self.transform, self.tries, self.errors, self.calls = transform, tries, {}, 0

    def __call__(self, image):
        self.calls += 1
        for attempt in range(self.tries):
            try:
                return self.transform(image)
            except Exception as err:  # noqa: BLE001 - counted and re-raised after `tries`
                key = f"{type(err).__name__}: {err}"
                self.errors[key] = self.errors.get(key, 0) + 1
                if attempt == self.tries - 1:
                    raise


def training_sets(paths: dict[str, Path], batch: int) -> dict[str, object]:
    """format: the training dataset of the published pipeline (ImageFolder dataset or shard stream)."""
    from ravlt_pl.data.imagenet import ImageNetDataModule

    out = {}
    for name, path in paths.items():
        dm = ImageNetDataModule(path, num_classes=5, batch_size=batch, num_workers=0, format=name)
        dm.setup("fit")
        out[name] = dm.datasets["train"]
        out[name].transform = RetriedTransform(out[name].transform)
    return out


def items(dataset) -> Iterator:
    """Training items without end: a stream epoch after epoch, a folder in a seeded random order."""
    for epoch in itertools.count():
        if hasattr(dataset, "set_position"):
            dataset.set_position(epoch)
            yield from dataset
        else:
            yield from (
                dataset[i] for i in torch.randperm(len(dataset), generator=torch.Generator().manual_seed(epoch))
            )


def raw_reads(name: str, path: Path) -> Iterator[int]:
    """Encoded sizes of every training sample, read from storage only, round after round."""
    from ravlt_pl.data.parquet import read_parquet, split_shards
    from ravlt_pl.data.shards import read_info, read_tar
    from ravlt_pl.data.shards import split_shards as tar_shards

    while True:
        if name == "folder":
            yield from (len(f.read_bytes()) for f in sorted((path / "train").rglob("*.JPEG")))
        else:
            shards = tar_shards(path, read_info(path), "train") if name == "wds" else split_shards(path, "train")
            read = read_tar if name == "wds" else read_parquet
            yield from (len(data) for s in shards for _, _, data, _ in read(s.path, 0, s.length))


def timed(source: Iterator, seconds: float, batch: int | None) -> tuple[int, float, float, int]:
    """Pull from ``source`` for about ``seconds`` (in batches when ``batch``): (items, wall s, CPU s, bytes)."""
    n, size = 0, 0
    w0, c0 = time.perf_counter(), time.process_time()
    while n == 0 or time.perf_counter() - w0 < seconds:
        if batch:
            default_collate(list(itertools.islice(source, batch)))
            n += batch
        else:
            size += next(source)
            n += 1
    return n, time.perf_counter() - w0, time.process_time() - c0, size


def loader_rate(dataset, batch: int, workers: int, seconds: float) -> float:
    """Images/s through a DataLoader with ``workers`` workers (stream epochs restarted as they end)."""
    stream = hasattr(dataset, "set_position")
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
                        shuffle=not stream, drop_last=True)  # fmt: skip

    def batches():
        for epoch in itertools.count():
            if stream:
                dataset.set_position(epoch)
            yield from loader

    it = batches()
    for _ in range(max(1, workers)):  # start-up (worker spawn, first batches) is not throughput
        next(it)
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        n += len(next(it)[1])
    return n / (time.perf_counter() - t0)


def benchmark_formats(args, feed_img_s: dict[str, float]) -> dict:
    """The three formats' read, per-worker and loader rates (see the module doc)."""
    batch = 8
    paths = formatted_sets(args.out / "synthetic_formats")
    sets = training_sets(paths, batch)
    sources = {name: items(ds) for name, ds in sets.items()}
    reads = {name: raw_reads(name, path) for name, path in paths.items()}
    samples = {name: {"img_s": [], "cpu_img_s": [], "read_img_s": [], "read_mb_s": []} for name in sets}
    with OneWorker():
        for name in sets:  # warm-up: page cache, lazy imports
            timed(sources[name], 0.0, batch)
            timed(reads[name], 0.0, None)
        for r in range(args.data_rounds):
            for name in sets:
                n, wall, cpu, _ = timed(sources[name], args.data_seconds, batch)
                samples[name]["img_s"].append(n / wall)
                samples[name]["cpu_img_s"].append(n / max(cpu, 1e-9))
                n, wall, _, size = timed(reads[name], args.data_seconds / 3, None)
                samples[name]["read_img_s"].append(n / wall)
                samples[name]["read_mb_s"].append(size / wall / 1e6)
            print(f"  format round {r + 1}/{args.data_rounds} done", flush=True)
    files = sorted((paths["folder"] / "train").rglob("*.JPEG"))
    out = {"source_size": SOURCE_SIZE, "images": len(files), "mean_kb": sum(f.stat().st_size for f in files) / len(files) / 1e3,
           "batch": batch, "workers_checked": args.data_workers, "feed_img_s": feed_img_s.get("imagenet"), "formats": {}}  # fmt: skip
    for name, ds in sets.items():
        median = {k: statistics.median(v) for k, v in samples[name].items()}
        entry = {**median, "samples": samples[name], "workers_per_1000_img_s": 1000 / median["cpu_img_s"],
                 "transform_errors": dict(ds.transform.errors), "transforms_run": ds.transform.calls,
                 "loader_img_s": loader_rate(ds, batch, args.data_workers, args.data_seconds)}  # fmt: skip
        if out["feed_img_s"]:
            entry["workers_to_feed"] = math.ceil(out["feed_img_s"] / median["cpu_img_s"])
        out["formats"][name] = entry
    print_formats(out)
    return out


def print_formats(data: dict) -> None:
    print(f"\ndata formats ({data['images']} training JPEGs {data['source_size'][0]}×{data['source_size'][1]}, "
          f"mean {data['mean_kb']:.0f} kB; DeiT train transform 224²; one worker = one thread; "
          f"DataLoader with {data['workers_checked']} workers):")  # fmt: skip
    for name, e in data["formats"].items():
        feed = f"; {data['feed_img_s']:.0f} img/s needs {e['workers_to_feed']}" if "workers_to_feed" in e else ""
        print(f"  {name:8s} read {e['read_img_s']:8.0f} samples/s ({e['read_mb_s']:6.0f} MB/s)  "
              f"{e['img_s']:6.1f} img/s/worker (wall)  {e['cpu_img_s']:6.1f} (per CPU s)  loader {e['loader_img_s']:6.1f} "
              f"img/s  -> {e['workers_per_1000_img_s']:5.1f} workers per 1000 img/s{feed}")  # fmt: skip
        for err, count in e["transform_errors"].items():
            print(f"           ! {count} of {e['transforms_run']} transforms raised (retried): {err}")
