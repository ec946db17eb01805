"""``--data-loading``: images/s per worker of the ImageNet / COCO / ADE20K training pipelines.

The training pipelines of ``ravlt_pl.data`` (ImageNet layout with the DeiT/RandAugment transform at
224², COCO 1x at 1333×800, ADE20K 512×512 crops of 2048×512) on synthetic sets written once under
``--out`` at typical source sizes (500×375, 640×480, 683×512 JPEG). Each is timed in this process as
one worker is (one thread, item + collate), interleaved over rounds; images/s per worker are given per
wall second and per CPU second (the latter is what a worker on a core of its own reaches), then a
DataLoader with ``--data-workers`` workers checks the scaling. "Workers per GPU" = training images/s
to feed ÷ images/s per worker (rounded up): the rates to feed come from ``--feed-img-s`` and, for
classification, from this run's RAVLT-S training row.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

PIPELINES = {  # name: (synthetic source size (w, h), images to write)
    "imagenet": ((500, 375), 4),  # per class (5 classes)
    "coco": ((640, 480), 16),
    "ade20k": ((683, 512), 16),
}


def synthetic_sets(root: Path) -> dict[str, Path]:
    """Write (once) the synthetic sets the pipelines read; later runs reuse them."""
    from ravlt_pl.data.synthetic import make_classification, make_detection, make_segmentation

    paths = {"imagenet": root / "imagenet", "coco": root / "coco", "ade20k": root / "ade20k" / "ADEChallengeData2016"}
    makers = {
        "imagenet": lambda size, n: make_classification(paths["imagenet"], train_per_class=n, val_per_class=1, image_size=size),
        "coco": lambda size, n: make_detection(paths["coco"], num_train=n, num_val=2, image_size=size),
        "ade20k": lambda size, n: make_segmentation(root / "ade20k", num_train=n, num_val=2, image_size=size),
    }  # fmt: skip
    for name, (size, n) in PIPELINES.items():
        if not paths[name].is_dir():
            print(f"  writing synthetic {name} ({size[0]}×{size[1]}) under {root}", flush=True)
            makers[name](size, n)
    return paths


def training_pipelines(paths: dict[str, Path]) -> dict[str, tuple]:
    """name: (data module, train dataset, collate_fn, what it does) with the published train transforms."""
    from torch.utils.data import default_collate

    from ravlt_pl.data.ade20k import ADE20KDataModule
    from ravlt_pl.data.coco import COCODataModule, collate
    from ravlt_pl.data.imagenet import ImageNetDataModule

    dms = {
        "imagenet": (ImageNetDataModule(paths["imagenet"], num_classes=5, batch_size=8), default_collate,
                     "decode JPEG, RandomResizedCrop 224, flip, RandAugment m9, normalise, random erasing"),
        "coco": (COCODataModule(paths["coco"], num_classes=5, global_batch_size=None, batch_size=2), collate,
                 "decode JPEG + instance masks, resize to fit 1333×800, flip (1x)"),
        "ade20k": (ADE20KDataModule(paths["ade20k"], num_classes=5, batch_size=8), default_collate,
                   "decode JPEG + label PNG, resize 2048×512 × [.5, 2], cat-max-ratio crop 512, flip, photometric, normalise, pad"),
    }  # fmt: skip
    out = {}
    for name, (dm, collate_fn, what) in dms.items():
        dm.setup("fit")
        dataset = dm.datasets["train"]
        out[name] = (dm, CountingDataset(dataset), collate_fn, what)
    return out


class CountingDataset:
    """Retries an item whose transform raises (and counts it), so one rare failure does not end the run.

    Found this way: timm's RandAugment ``inc1`` posterize asks Pillow ≥ 10 for 0 bits at magnitude 10
    (m9, std .5 reaches it), which Pillow rejects — the count shows how often a training run would hit it.
    """

    def __init__(self, dataset, tries: int = 5) -> None:
        self.dataset, self.tries, self.errors, self.items = dataset, tries, {}, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        self.items += 1
        for attempt in range(self.tries):
            try:
                return self.dataset[index]
            except Exception as err:  # noqa: BLE001 - counted and re-raised after `tries`
                key = f"{type(err).__name__}: {err}"
                self.errors[key] = self.errors.get(key, 0) + 1
                if attempt == self.tries - 1:
                    raise


class OneWorker:
    """Run as a DataLoader worker does: torch and OpenCV on one thread (restored afterwards)."""

    def __enter__(self):
        import cv2

        self.saved = torch.get_num_threads(), cv2.getNumThreads()
        torch.set_num_threads(1)
        cv2.setNumThreads(1)

    def __exit__(self, *exc):
        import cv2

        torch.set_num_threads(self.saved[0])
        cv2.setNumThreads(self.saved[1])


def time_items(dataset, collate_fn, batch, seconds, start=0) -> tuple[int, float, float, int]:
    """Load batches for about ``seconds``: (images, wall s, CPU s, next index)."""
    n, i = 0, start
    w0, c0 = time.perf_counter(), time.process_time()
    while n == 0 or time.perf_counter() - w0 < seconds:
        collate_fn([dataset[(i + j) % len(dataset)] for j in range(batch)])
        n, i = n + batch, i + batch
    return n, time.perf_counter() - w0, time.process_time() - c0, i


def top_functions(dataset, collate_fn, batch, seconds=1.0, limit=8) -> list[dict]:
    """cProfile of a few batches: where a worker's time goes (own time per function)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    time_items(dataset, collate_fn, batch, seconds)
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values()) or 1.0
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:limit]
    return [{"function": f"{Path(f).name}:{line}({fn})", "share": v[2] / total} for (f, line, fn), v in rows]


def loader_rate(dm, dataset, collate_fn, batch, workers, seconds) -> float:
    """Images/s through a real DataLoader (workers, persistent, pinned where CUDA exists)."""
    from torch.utils.data import DataLoader, RandomSampler

    sampler = RandomSampler(dataset, replacement=True, num_samples=10**6)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                        pin_memory=torch.cuda.is_available() and dm.pin_memory,
                        persistent_workers=workers > 0 and dm.persistent_workers)  # fmt: skip
    it = iter(loader)
    for _ in range(max(1, workers)):  # start-up (worker spawn, first batches) is not throughput
        next(it)
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        next(it)
        n += batch
    rate = n / (time.perf_counter() - t0)
    del it, loader
    return rate


def benchmark_data_loading(args, model_results) -> dict:
    paths = synthetic_sets(args.out / "synthetic_data")
    pipes = training_pipelines(paths)
    batch = {name: dm.per_device_batch_size() for name, (dm, *_rest) in pipes.items()}
    samples = {name: {"img_s": [], "cpu_img_s": []} for name in pipes}
    cursor = dict.fromkeys(pipes, 0)
    with OneWorker():
        for name, (_, ds, collate_fn, _) in pipes.items():  # warm-up: page cache, lazy imports
            cursor[name] = time_items(ds, collate_fn, batch[name], 0.0)[3]
        for r in range(args.data_rounds):
            for name, (_, ds, collate_fn, _) in pipes.items():
                n, wall, cpu, cursor[name] = time_items(ds, collate_fn, batch[name], args.data_seconds, cursor[name])
                samples[name]["img_s"].append(n / wall)
                samples[name]["cpu_img_s"].append(n / max(cpu, 1e-9))
            print(f"  data round {r + 1}/{args.data_rounds} done", flush=True)
        profiles = {name: top_functions(ds, fn, batch[name]) for name, (_, ds, fn, _) in pipes.items()}
    feed = dict(args.feed_img_s)
    ravlt = next(
        (r for r in model_results if r["model"] == "ravlt_s" and r["resolution"] == 224 and "train" in r), None
    )
    if ravlt is not None and "imagenet" not in feed:
        feed["imagenet"] = ravlt["train"]["img_s"]
    out = {"workers_checked": args.data_workers, "feed_img_s": feed,
           "feed_source": {k: "--feed-img-s" for k, _ in args.feed_img_s} | (
               {"imagenet": f"ravlt_s training row of this run ({args.device}, {args.dtype})"}
               if ravlt is not None and "imagenet" not in dict(args.feed_img_s) else {}),
           "pipelines": {}}  # fmt: skip
    for name, (dm, ds, collate_fn, what) in pipes.items():
        per_worker = statistics.median(samples[name]["img_s"])
        per_worker_cpu = statistics.median(samples[name]["cpu_img_s"])
        entry = {
            "pipeline": what,
            "source_size": PIPELINES[name][0],
            "batch": batch[name],
            "img_s_per_worker": per_worker,
            "img_s_per_worker_cpu": per_worker_cpu,
            "samples_img_s": samples[name]["img_s"],
            "top_functions": profiles[name],
            "workers_per_1000_img_s": 1000 / per_worker_cpu,
            "items_loaded": ds.items,
            "transform_errors": dict(ds.errors),  # in this process (not the DataLoader's)
            "loader_img_s": loader_rate(dm, ds, collate_fn, batch[name], args.data_workers, args.data_seconds),
        }
        if name in feed:
            entry["workers_to_feed"] = math.ceil(feed[name] / per_worker_cpu)
        out["pipelines"][name] = entry
    return out


def print_data_loading(data):
    print(f"\ndata loading (one worker = one thread; per CPU second = a core of its own; "
          f"DataLoader with {data['workers_checked']} workers):")  # fmt: skip
    for name, e in data["pipelines"].items():
        feed = (f"; feeding {data['feed_img_s'][name]:.1f} img/s needs {e['workers_to_feed']} worker(s)"
                if "workers_to_feed" in e else "")  # fmt: skip
        print(f"  {name:9s} {e['img_s_per_worker']:7.1f} img/s/worker (wall)  {e['img_s_per_worker_cpu']:7.1f} "
              f"(per CPU s)  loader {e['loader_img_s']:7.1f} img/s  -> {e['workers_per_1000_img_s']:5.1f} "
              f"workers per 1000 img/s{feed}")  # fmt: skip
        print("            " + ", ".join(f"{t['function']} {100 * t['share']:.0f}%" for t in e["top_functions"][:4]))
        for err, count in e["transform_errors"].items():
            print(f"            ! {count} of {e['items_loaded']} items raised (retried): {err}")
