"""Speed benchmark: RAVLT (ours) vs the plain reference and timm baselines, in one process.

Every measurement is interleaved: each round visits every (model, case) once, in the same order
(case-major: all models' batch-8 inference, then batch 1, then training), and a figure is the
median over rounds, so machine noise hits all models alike. Ratios to ``--baseline`` come three
ways: of the medians, the median of per-round ratios (paired samples taken seconds apart) and of
the best samples (load only slows a sample down); on a shared machine, quote the paired one.
``--compile`` raises dynamo's recompile limit to 64 (eval/train × batch sizes × resolutions each
need their own graph).
Cases: inference images/s at each --batch-sizes and --resolutions, and one training step
(forward + backward + AdamW) at --train-batch-size. All models use random weights; nothing is
downloaded.

Peak memory (``peak_mem_mb``) is the model's parameter bytes plus the peak of extra memory
allocated during the case's *first* call (so a training step counts its gradients and the
AdamW states it creates). On CUDA the extra is ``max_memory_allocated`` minus what was allocated
before the call; on CPU it is the running peak of the allocation/free events that
``torch.profiler`` records with ``profile_memory=True``, except for eager training steps on CPU:
there it is the peak resident set size a step adds over the built model, measured in a process of
its own per model (:mod:`ravlt_pl.benchmark.train_memory`; allocator slack included, as a user sees
it). ``train_step_mb`` is that figure without the parameter bytes.

Physical frame: a 2048² matmul (best of 3) gives the device's peak GFLOP/s; a model achieves
2 × multiply-adds × images/s, multiply-adds counted once per (model, resolution) with fvcore
(``torch.utils.flop_counter`` / 2 if fvcore is missing). fvcore does not see
``scaled_dot_product_attention``, so ``ravlt_t``/``ravlt_s`` are counted on the reference
architecture (same network, explicit matmuls; 4.90 G for RAVLT-S at 224², as RAVLT.md states).

Data loading (``--data-loading``): the training pipelines of ``ravlt_pl.data`` (ImageNet layout with
the DeiT/RandAugment transform at 224², COCO 1x at 1333×800, ADE20K 512×512 crops of 2048×512) on
synthetic sets written once under ``--out`` at typical source sizes (500×375, 640×480, 683×512 JPEG).
Each is timed in this process as one worker is (one thread, item + collate), interleaved over
rounds; images/s per worker are given per wall second and per CPU second (the latter is what a worker
on a core of its own reaches), then a DataLoader with ``--data-workers`` workers checks the scaling.
"Workers per GPU" = training images/s to feed ÷ images/s per worker (rounded up): the rates to feed
come from ``--feed-img-s`` and, for classification, from this run's RAVLT-S training row.

    python -m ravlt_pl benchmark --threads 2 --models ravlt_s ravlt_s_reference convnext_tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet the profiler's C++ log (takes effect before torch loads)
import torch  # noqa: E402
import torch.nn.functional as F

from ..reports import atomic_write
from .reference_ravlt import ReferenceRAVLT, reference_ravlt_s, reference_ravlt_t
from .train_memory import measure_in_subprocess

DEFAULT_MODELS = [
    "ravlt_t", "ravlt_s", "ravlt_t_reference", "ravlt_s_reference",
    "convnext_tiny", "swin_tiny_patch4_window7_224", "deit_small_patch16_224", "resnet50",
]  # fmt: skip
RAVLT_T_CFG = dict(
    embed_dims=[64, 128, 256, 512], depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8], mlp_ratios=3.5,
    layerscales=[True] * 4, layer_init_values=[1.0] * 4, projection=1024, num_classes=1000,
)  # fmt: skip


# ----------------------------------------------------------------------------- models
def build_model(name: str) -> torch.nn.Module:
    if name == "ravlt_t_reference":
        return reference_ravlt_t(num_classes=1000)
    if name == "ravlt_s_reference":
        return reference_ravlt_s(num_classes=1000)
    import timm

    if name.startswith("ravlt"):
        import ravlt_pl.models  # noqa: F401  (registers ravlt_* with timm)
    return timm.create_model(name, pretrained=False, num_classes=1000)


def build_ravlt_t(attention):
    """RAVLT-T with a given attention layout: ours if available, else the reference."""
    try:
        from ravlt_pl.models import RAVLT

        return RAVLT(**RAVLT_T_CFG, attention=attention), "ravlt_pl.models.RAVLT"
    except ImportError:
        return ReferenceRAVLT(**RAVLT_T_CFG, attention=attention), "ReferenceRAVLT"


REFERENCE_FOR_FLOPS = {"ravlt_t": "ravlt_t_reference", "ravlt_s": "ravlt_s_reference"}


def count_macs(model, res, device, name: str | None = None) -> tuple[float, str]:
    """Multiply-adds per image at res×res (eval, batch 1); ravlt_t/s on the reference architecture."""
    if name in REFERENCE_FOR_FLOPS:
        macs, counter = count_macs(build_model(REFERENCE_FOR_FLOPS[name]).to(device), res, device)
        return macs, f"{counter} (reference architecture)"
    model.eval()
    x = torch.randn(1, 3, res, res, device=device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit deprecation / tracer chatter from fvcore
            from fvcore.nn import FlopCountAnalysis

            fca = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return float(fca.total()), "fvcore"
    except ImportError:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(x)
        return fc.get_total_flops() / 2, "torch.utils.flop_counter/2"


# ----------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_ctx(device, dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def timed(fn, device, n=1) -> float:
    """Seconds per call, averaged over n back-to-back calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def peak_matmul_gflops(device, dtype=torch.float32, n=2048) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    times = [timed(lambda: a @ a, device) for _ in range(4)]  # the first call warms up
    return 2 * n**3 / min(times[1:]) / 1e9


def first_call_peak_mb(fn, device, param_bytes) -> float:
    """Parameter bytes + peak extra allocation during one call of fn (see module docstring)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        extra = torch.cuda.max_memory_allocated(device) - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        cur = extra = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            cur += e.nbytes()
            extra = max(extra, cur)
    return (param_bytes + extra) / 2**20


def make_cases(model, args, device, infer_model=None):
    """(key, images per call, fn): inference at each (res, bs) and one training step per res.

    ``infer_model`` (default: ``model``) runs the inference cases: a separate compiled copy under
    ``--freezing``, whose constants must not go stale when ``model`` trains.
    """
    infer_model = model if infer_model is None else infer_model
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    cases = []
    for res in args.resolutions:
        for bs in args.batch_sizes:
            x = torch.randn(bs, 3, res, res, device=device).contiguous(memory_format=fmt)

            def infer(x=x):
                infer_model.eval()
                with torch.no_grad(), autocast_ctx(device, args.dtype):
                    infer_model(x)

            cases.append((("infer", res, bs), bs, infer))
        tb = args.train_batch_size
        if tb <= 0:  # inference only: no training step between the inference samples
            continue
        x = torch.randn(tb, 3, res, res, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 1000, (tb,), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05)

        def train(x=x, y=y, opt=opt):
            model.train()
            with autocast_ctx(device, args.dtype):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        cases.append((("train", res, tb), tb, train))
    return cases


def run_interleaved(entries, args, device):
    """entries: list of (row, case_key, images, fn). Returns {(row, key): stats}."""
    iters = {}
    for _ in range(args.warmup):  # warm-up, round-robin too; the last call calibrates iters
        for row, key, _, fn in entries:
            iters[row, key] = max(1, math.ceil(args.min_sample_time / max(timed(fn, device), 1e-6)))
    samples = {(row, key): [] for row, key, _, _ in entries}
    for r in range(args.rounds):
        for row, key, _, fn in entries:
            samples[row, key].append(timed(fn, device, iters.get((row, key), 1)))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    out = {}
    for row, key, images, _ in entries:
        s = samples[(row, key)]
        med = statistics.median(s)
        out[(row, key)] = {"ms": med * 1e3, "img_s": images / med, "samples_ms": [t * 1e3 for t in s],
                           "best_ms": min(s) * 1e3, "best_img_s": images / min(s),
                           "iters_per_sample": iters.get((row, key), 1)}  # fmt: skip
    return out


# ----------------------------------------------------------------------------- main parts
def benchmark_models(args, device, peak):
    rows, entries, info, skipped, macs, pbytes_mb = [], [], {}, {}, {}, {}
    for base in args.models:
        compiled = args.compile is not None and (not args.compile or base in args.compile)
        for row in [base] + ([base + "+compile"] if compiled else []):
            try:
                torch.manual_seed(0)
                m = build_model(base).to(device)  # a fresh model per row (training updates weights)
            except Exception as e:  # e.g. a name timm does not know
                skipped[row] = f"{type(e).__name__}: {e}"
                print(f"skipping {row}: {skipped[row]}")
                continue
            if args.channels_last:
                m = m.to(memory_format=torch.channels_last)
            for res in args.resolutions:  # counted once per (model, resolution), on the eager model
                if (base, res) not in macs:
                    macs[base, res] = count_macs(m, res, device, base)
            pbytes = sum(p.numel() * p.element_size() for p in m.parameters())
            pbytes_mb[row] = pbytes / 2**20
            info[row] = {"params_m": sum(p.numel() for p in m.parameters()) / 1e6, "mem": {}}
            infer_m = None
            if row != base:
                infer_m = torch.compile(copy.deepcopy(m).eval()) if args.freezing else None
                m = torch.compile(m)
            for key, images, fn in make_cases(m, args, device, infer_m):
                if key[0] == "train" and device.type == "cpu" and row == base:  # RSS, one process per model
                    step_mb = measure_in_subprocess(base, key[1], key[2], "cpu", args.dtype, args.threads)
                    info[row]["mem"][key] = pbytes / 2**20 + step_mb
                else:
                    info[row]["mem"][key] = first_call_peak_mb(fn, device, pbytes)
                entries.append((row, key, images, fn))
            rows.append(row)
    case_rank = {}  # case-major order: a noise burst hits one case of adjacent models, not one model
    entries.sort(key=lambda e: case_rank.setdefault(e[1], len(case_rank)))
    print(f"timing {len(rows)} models x {len(case_rank)} cases, {args.rounds} rounds")
    timings = run_interleaved(entries, args, device)
    results = []
    for row in rows:
        base, mem = row.removesuffix("+compile"), info[row]["mem"]
        for res in args.resolutions:
            n_macs, counter = macs[base, res]
            train_key = ("train", res, args.train_batch_size)
            r = {"model": row, "resolution": res, "params_m": info[row]["params_m"], "gmacs": n_macs / 1e9,
                 "flop_counter": counter,
                 "infer": {str(bs): timings[row, ("infer", res, bs)] for bs in args.batch_sizes},
                 "peak_mem_mb": {f"infer_bs{bs}": mem["infer", res, bs] for bs in args.batch_sizes}}  # fmt: skip
            if args.train_batch_size > 0:
                r["train"] = timings[row, train_key]
                r["peak_mem_mb"]["train"] = mem[train_key]
                r["train_step_mb"] = mem[train_key] - pbytes_mb[row]
            r["achieved_gflops"] = 2 * n_macs * r["infer"][str(max(args.batch_sizes))]["img_s"] / 1e9
            r["peak_share"] = r["achieved_gflops"] / peak
            results.append(r)
    for r in results:  # ratios to the baseline at the same resolution (>1: faster than baseline)
        base = next((b for b in results if b["model"] == args.baseline and b["resolution"] == r["resolution"]), None)
        cases = {f"infer_bs{bs}": (r["infer"][bs], base and base["infer"][bs]) for bs in r["infer"]}
        if "train" in r:
            cases["train"] = (r["train"], base and base["train"])
        r["ratio_vs_baseline"] = None if base is None else {k: t["img_s"] / b["img_s"] for k, (t, b) in cases.items()}
        # Paired: the median over rounds of the ratio within a round (neighbouring samples share the
        # machine's load); best: ratio of the fastest samples (load only ever slows a sample down).
        r["ratio_vs_baseline_paired"] = (
            None
            if base is None
            else {
                k: statistics.median(bt / tt for bt, tt in zip(b["samples_ms"], t["samples_ms"]))
                for k, (t, b) in cases.items()
            }
        )
        r["ratio_vs_baseline_best"] = None if base is None else {
            k: t["best_img_s"] / b["best_img_s"] for k, (t, b) in cases.items()}  # fmt: skip
    return results, skipped


def benchmark_scaling(args, device):
    entries, impl = [], None
    for layout, attention in [
        ("published", ["linear", "linear", "softmax", "softmax"]),
        ("all-linear", ["linear"] * 4),
    ]:
        torch.manual_seed(0)
        model, impl = build_ravlt_t(attention)
        model = model.to(device).eval()
        for res in (224, 448, 896):
            x = torch.randn(1, 3, res, res, device=device)

            def fn(model=model, x=x):
                with torch.no_grad(), autocast_ctx(device, args.dtype):
                    model(x)

            entries.append((f"ravlt_t/{layout}", res, 1, fn))
    timings = run_interleaved(entries, args, device)
    return {"implementation": impl, "batch_size": 1, "results": [
        {"model": row, "resolution": res, "img_s": t["img_s"], "ms": t["ms"], "ms_per_megapixel": t["ms"] / (res**2 / 1e6)}
        for (row, res), t in timings.items()]}  # fmt: skip


def profile_ravlt_s(args, device, out_dir):
    from torch.profiler import ProfilerActivity, profile

    try:
        name, model = "ravlt_s", build_model("ravlt_s")
    except Exception:
        name, model = "ravlt_s_reference", build_model("ravlt_s_reference")
    model = model.to(device).eval()
    x = torch.randn(args.batch_sizes[0], 3, args.resolutions[0], args.resolutions[0], device=device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), autocast_ctx(device, args.dtype):
        model(x)
        with profile(activities=acts) as prof:
            for _ in range(3):
                model(x)
            sync(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=25)
    text = f"{name}, batch {x.shape[0]}, {x.shape[-1]}², 3 forward passes, sorted by {sort_by}\n{table}"
    print(text)
    atomic_write(out_dir / "profile.txt", lambda p: Path(p).write_text(text))
    return {"model": name, "file": "profile.txt", "sort_by": sort_by}


# ----------------------------------------------------------------------------- data loading
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


class _OneWorker:
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
    with _OneWorker():
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


# ----------------------------------------------------------------------------- output
def print_table(results, args, peak):
    bss = [str(b) for b in args.batch_sizes]
    train = args.train_batch_size > 0
    head = (["model", "res", "params M", "GMACs"] + [f"img/s bs{b}" for b in bss]
            + ([f"train img/s bs{args.train_batch_size}", "train ms"] if train else []) + ["mem inf MB"]
            + (["mem train MB"] if train else []) + ["GFLOP/s", "% peak"] + [f"x base bs{b}" for b in bss]
            + (["x base train"] if train else []))  # fmt: skip
    lines = []
    for r in results:
        ratio = r["ratio_vs_baseline"]
        mem_inf = r["peak_mem_mb"][f"infer_bs{max(args.batch_sizes)}"]
        lines.append([r["model"], str(r["resolution"]), f"{r['params_m']:.2f}", f"{r['gmacs']:.2f}"]
                     + [f"{r['infer'][b]['img_s']:.1f}" for b in bss]
                     + ([f"{r['train']['img_s']:.1f}", f"{r['train']['ms']:.0f}"] if train else [])
                     + [f"{mem_inf:.0f}"] + ([f"{r['peak_mem_mb']['train']:.0f}"] if train else [])
                     + [f"{r['achieved_gflops']:.1f}", f"{100 * r['peak_share']:.1f}"]
                     + ([f"{ratio[f'infer_bs{b}']:.2f}" for b in bss] + ([f"{ratio['train']:.2f}"] if train else [])
                        if ratio else ["-"] * (len(bss) + train)))  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)] if lines else []
    print(f"\npeak matmul: {peak:.1f} GFLOP/s; ratios: x baseline {args.baseline} (>1 = faster)")
    for row in [head] + lines:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if any(r["ratio_vs_baseline"] for r in results):
        keys = [f"infer_bs{b}" for b in bss] + (["train"] if train else [])
        print(
            f"\nratios x {args.baseline}, three estimators (median of medians | median of per-round ratios | best sample):"
        )
        for r in results:
            if r["ratio_vs_baseline"]:
                cells = [f"{k} {r['ratio_vs_baseline'][k]:.2f} | {r['ratio_vs_baseline_paired'][k]:.2f} | "
                         f"{r['ratio_vs_baseline_best'][k]:.2f}" for k in keys]  # fmt: skip
                print(f"  {r['model']:>{widths[0]}} {r['resolution']}  " + "    ".join(cells))


def plot(results, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res0 = args.resolutions[0]
    rs = [r for r in results if r["resolution"] == res0]
    metrics = [(f"inference img/s, batch {b}", lambda r, b=str(b): r["infer"][b]["img_s"]) for b in args.batch_sizes]
    if args.train_batch_size > 0:
        metrics.append((f"training img/s, batch {args.train_batch_size}", lambda r: r["train"]["img_s"]))
        metrics.append((f"training peak memory MB, batch {args.train_batch_size}", lambda r: r["peak_mem_mb"]["train"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 0.45 * len(rs) + 1.8), squeeze=False)
    for ax, (title, get) in zip(axes[0], metrics):
        colors = ["tab:red" if r["model"] == args.baseline else
                  "tab:blue" if r["model"].startswith("ravlt") else "tab:gray" for r in rs]  # fmt: skip
        ax.barh([r["model"] for r in rs], [get(r) for r in rs], color=colors)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{args.device}, {args.dtype}, {res0}², threads={torch.get_num_threads()}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m ravlt_pl benchmark",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # each help shows its default
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the models run (cuda when a GPU is visible)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16 via autocast")
    p.add_argument("--channels-last", action="store_true", help="inputs and weights in channels_last memory format")
    p.add_argument(
        "--compile",
        nargs="*",
        default=None,
        metavar="MODEL",
        help="add '<name>+compile' rows (torch.compile): for the listed models, or all when none is listed",
    )
    p.add_argument(
        "--freezing",
        action="store_true",
        help="with --compile: inductor freezing for inference (weights as constants, oneDNN "
        "prepacking and conv+pointwise fusion; the standard CPU inference setting), on "
        "a separate compiled copy so training rows stay correct",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None keeps torch's choice")
    p.add_argument(
        "--malloc",
        choices=["default", "tuned"],
        default="default",
        help="tuned: glibc keeps freed memory for reuse (see tune_glibc_malloc); all models alike",
    )
    p.add_argument("--resolutions", type=int, nargs="+", default=[224], metavar="SIDE", help="square input sides (px)")
    p.add_argument(
        "--models",
        nargs="*",
        default=DEFAULT_MODELS,
        metavar="MODEL",
        help="models to time: ours (ravlt_t/s/b/l, *_reference) or timm names; none listed: no timing rows",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1], metavar="N", help="inference batch sizes")
    p.add_argument(
        "--train-batch-size",
        type=int,
        default=8,
        help="training-step batch; 0: no training rows (an inference-only process: the allocator never "
        "sees a training step)",
    )
    p.add_argument("--rounds", type=int, default=5, help="timing rounds over all models (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per model and case before timing")
    p.add_argument(
        "--min-sample-time",
        type=float,
        default=0.2,
        help="seconds per timing sample (iterations per sample calibrated during warm-up)",
    )
    p.add_argument("--baseline", default="ravlt_s_reference", metavar="MODEL", help="the model ratios are taken to")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("reports/benchmark"),
        metavar="DIR",
        help="folder of the JSON, Markdown and PNG results",
    )
    p.add_argument("--profile", action="store_true", help="torch.profiler top-25 operators for RAVLT-S")
    p.add_argument("--scaling", action="store_true", help="RAVLT-T at 224/448/896², published vs all-linear")
    p.add_argument(
        "--data-loading",
        action="store_true",
        help="images/s per worker of the ImageNet/COCO/ADE20K training pipelines (synthetic sets)",
    )
    p.add_argument("--data-seconds", type=float, default=3.0, help="seconds per pipeline per data round")
    p.add_argument("--data-rounds", type=int, default=3, help="rounds of the data-loading benchmark")
    p.add_argument("--data-workers", type=int, default=2, help="DataLoader workers for the scaling check")
    p.add_argument(
        "--feed-img-s",
        nargs="*",
        default=[],
        metavar="PIPELINE=IMG_S",
        type=_feed,
        help="training images/s to feed, e.g. imagenet=1200 coco=25 ade20k=60 (a GPU's rates)",
    )
    return p.parse_args(argv)


def _feed(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in PIPELINES or not value:
        raise argparse.ArgumentTypeError(f"expected PIPELINE=IMG_S with PIPELINE in {sorted(PIPELINES)}, got {text!r}")
    return name, float(value)


def tune_glibc_malloc() -> dict[str, int]:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel.

    By default glibc serves blocks above a (dynamic) threshold with fresh ``mmap`` pages and trims
    the heap top soon after a free, so a CPU forward pass page-faults (and the kernel zeroes) much of
    its activation memory every call. Measured here in an inference-only process (batch 8): RAVLT-S
    +6%, the plain baseline +19%, Swin-T +35% images/s with this setting. The environment variables
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456``
    do the same for any command (``python -m ravlt_pl ...`` included), as does preloading jemalloc
    or tcmalloc. Cost: up to ~1.3 GB of freed memory stays with the process.
    """
    import ctypes
    import ctypes.util

    # name: (mallopt parameter code from malloc.h, value)
    params = {"M_TRIM_THRESHOLD": (-1, 1 << 30), "M_TOP_PAD": (-2, 1 << 28), "M_MMAP_THRESHOLD": (-3, 1 << 25)}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as err:
        raise SystemExit(f"--malloc tuned needs glibc's mallopt: {err}") from None
    for name, (code, value) in params.items():
        if mallopt(code, value) != 1:
            raise SystemExit(f"--malloc tuned: mallopt({name}, {value}) failed")
    return {name: value for name, (_, value) in params.items()}


def main(argv=None):
    args = parse_args(argv)
    malloc_settings = tune_glibc_malloc() if args.malloc == "tuned" else {}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.freezing:
        if args.compile is None:
            raise SystemExit("--freezing applies to compiled rows: add --compile")
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # applies to graphs compiled without autograd only
    if args.compile is not None:  # eval/train x batch sizes x resolutions (x graph breaks) need more than 8 graphs
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    args.out.mkdir(parents=True, exist_ok=True)
    peak32 = peak_matmul_gflops(device)
    peak = peak_matmul_gflops(device, torch.bfloat16) if args.dtype == "bfloat16" else peak32
    results, skipped = benchmark_models(args, device, peak)
    print_table(results, args, peak)
    report = {
        "meta": {
            "device": args.device,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__, "python": platform.python_version(), "dtype": args.dtype,
            "channels_last": args.channels_last, "compile": args.compile, "threads": torch.get_num_threads(),
            "rounds": args.rounds, "warmup": args.warmup, "resolutions": args.resolutions,
            "batch_sizes": args.batch_sizes, "train_batch_size": args.train_batch_size, "baseline": args.baseline,
            "peak_matmul_gflops": peak, "peak_matmul_gflops_float32": peak32,
            "memory_method": "cuda max_memory_allocated delta + param bytes" if device.type == "cuda"
            else "torch.profiler(profile_memory=True) peak allocation delta + param bytes; eager training: "
                 "peak RSS delta of two steps in a process per model (train_memory.py) + param bytes",
            "skipped": skipped, "malloc": args.malloc, "malloc_settings": malloc_settings,
        },
        "results": results,
    }  # fmt: skip
    if args.scaling:
        print("\nscaling (RAVLT-T, batch 1):")
        report["scaling"] = benchmark_scaling(args, device)
        for s in report["scaling"]["results"]:
            print(
                f"  {s['model']:22s} {s['resolution']:4d}²  {s['img_s']:8.2f} img/s  {s['ms_per_megapixel']:8.1f} ms/MP"
            )
    if args.profile:
        report["profile"] = profile_ravlt_s(args, device, args.out)
    if args.data_loading:
        print("\ndata loading:")
        report["data_loading"] = benchmark_data_loading(args, results)
        print_data_loading(report["data_loading"])
        from .data_loading import benchmark_formats  # folder vs shards vs parquet

        report["data_formats"] = benchmark_formats(args, report["data_loading"]["feed_img_s"])
    atomic_write(args.out / "benchmark.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    if results:
        plot(results, args, args.out / "benchmark.png")
    print(f"\nwrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.png'}")
    return report


if __name__ == "__main__":
    main()
