"""Speed benchmark: RAVLT (ours) vs the plain reference and timm baselines, in one process.

Every measurement is interleaved: each round visits every (model, case) once, in the same order
(case-major: all models' batch-8 inference, then batch 1, then training), and a figure is the
median over rounds, so machine noise hits all models alike. ``--compile`` raises dynamo's
recompile limit to 64 (eval/train × batch sizes × resolutions each need their own graph).
Cases: inference images/s at each --batch-sizes and --resolutions, and one training step
(forward + backward + AdamW) at --train-batch-size. All models use random weights; nothing is
downloaded.

Peak memory (``peak_mem_mb``) is the model's parameter bytes plus the peak of extra memory
allocated during the case's *first* call (so a training step counts its gradients and the
AdamW states it creates). On CUDA the extra is ``max_memory_allocated`` minus what was allocated
before the call; on CPU it is the running peak of the allocation/free events that
``torch.profiler`` records with ``profile_memory=True`` (no tracemalloc, no RSS).

Physical frame: a 2048² matmul (best of 3) gives the device's peak GFLOP/s; a model achieves
2 × multiply-adds × images/s, multiply-adds counted once per (model, resolution) with fvcore
(``torch.utils.flop_counter`` / 2 if fvcore is missing).

    python benchmarks/benchmark.py --threads 2 --models ravlt_s ravlt_s_reference convnext_tiny
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet the profiler's C++ log (takes effect before torch loads)
import torch  # noqa: E402
import torch.nn.functional as F

try:
    from benchmarks.reference_ravlt import ReferenceRAVLT, reference_ravlt_s, reference_ravlt_t
except ImportError:  # run as `python benchmarks/benchmark.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.reference_ravlt import ReferenceRAVLT, reference_ravlt_s, reference_ravlt_t

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


def count_macs(model, res, device) -> tuple[float, str]:
    """Multiply-adds per image at res×res (eval, batch 1)."""
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


def make_cases(model, args, device):
    """(key, images per call, fn): inference at each (res, bs) and one training step per res."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    cases = []
    for res in args.resolutions:
        for bs in args.batch_sizes:
            x = torch.randn(bs, 3, res, res, device=device).contiguous(memory_format=fmt)

            def infer(x=x):
                model.eval()
                with torch.no_grad(), autocast_ctx(device, args.dtype):
                    model(x)

            cases.append((("infer", res, bs), bs, infer))
        tb = args.train_batch_size
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
                           "iters_per_sample": iters.get((row, key), 1)}  # fmt: skip
    return out


# ----------------------------------------------------------------------------- main parts
def benchmark_models(args, device, peak):
    rows, entries, info, skipped, macs = [], [], {}, {}, {}
    for base in args.models:
        for row in [base] + ([base + "+compile"] if args.compile else []):
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
                    macs[base, res] = count_macs(m, res, device)
            pbytes = sum(p.numel() * p.element_size() for p in m.parameters())
            info[row] = {"params_m": sum(p.numel() for p in m.parameters()) / 1e6, "mem": {}}
            if row != base:
                m = torch.compile(m)
            for key, images, fn in make_cases(m, args, device):
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
                 "flop_counter": counter, "train": timings[row, train_key],
                 "infer": {str(bs): timings[row, ("infer", res, bs)] for bs in args.batch_sizes},
                 "peak_mem_mb": {"train": mem[train_key],
                                 **{f"infer_bs{bs}": mem["infer", res, bs] for bs in args.batch_sizes}}}  # fmt: skip
            r["achieved_gflops"] = 2 * n_macs * r["infer"][str(max(args.batch_sizes))]["img_s"] / 1e9
            r["peak_share"] = r["achieved_gflops"] / peak
            results.append(r)
    for r in results:  # ratios to the baseline at the same resolution (>1: faster than baseline)
        base = next((b for b in results if b["model"] == args.baseline and b["resolution"] == r["resolution"]), None)
        r["ratio_vs_baseline"] = None if base is None else {
            **{f"infer_bs{bs}": r["infer"][bs]["img_s"] / base["infer"][bs]["img_s"] for bs in r["infer"]},
            "train": r["train"]["img_s"] / base["train"]["img_s"],
        }  # fmt: skip
    return results, skipped


def benchmark_scaling(args, device):
    entries, impl = [], None
    for layout, attention in [("published", ["linear", "linear", "softmax", "softmax"]), ("all-linear", ["linear"] * 4)]:
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


# ----------------------------------------------------------------------------- output
def atomic_write(path: Path, writer):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=path.suffix)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def print_table(results, args, peak):
    bss = [str(b) for b in args.batch_sizes]
    head = (["model", "res", "params M", "GMACs"] + [f"img/s bs{b}" for b in bss]
            + [f"train img/s bs{args.train_batch_size}", "train ms", "mem inf MB", "mem train MB",
               "GFLOP/s", "% peak"] + [f"x base bs{b}" for b in bss] + ["x base train"])  # fmt: skip
    lines = []
    for r in results:
        ratio = r["ratio_vs_baseline"]
        mem_inf = r["peak_mem_mb"][f"infer_bs{max(args.batch_sizes)}"]
        lines.append([r["model"], str(r["resolution"]), f"{r['params_m']:.2f}", f"{r['gmacs']:.2f}"]
                     + [f"{r['infer'][b]['img_s']:.1f}" for b in bss]
                     + [f"{r['train']['img_s']:.1f}", f"{r['train']['ms']:.0f}", f"{mem_inf:.0f}",
                        f"{r['peak_mem_mb']['train']:.0f}", f"{r['achieved_gflops']:.1f}",
                        f"{100 * r['peak_share']:.1f}"]
                     + ([f"{ratio[f'infer_bs{b}']:.2f}" for b in bss] + [f"{ratio['train']:.2f}"]
                        if ratio else ["-"] * (len(bss) + 1)))  # fmt: skip
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)] if lines else []
    print(f"\npeak matmul: {peak:.1f} GFLOP/s; ratios: x baseline {args.baseline} (>1 = faster)")
    for l in [head] + lines:
        print("  ".join(c.rjust(w) for c, w in zip(l, widths)))


def plot(results, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res0 = args.resolutions[0]
    rs = [r for r in results if r["resolution"] == res0]
    metrics = [(f"inference img/s, batch {b}", lambda r, b=str(b): r["infer"][b]["img_s"]) for b in args.batch_sizes]
    metrics.append((f"training img/s, batch {args.train_batch_size}", lambda r: r["train"]["img_s"]))
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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16 via autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="add '<name>+compile' rows (torch.compile)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--resolutions", type=int, nargs="+", default=[224])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    p.add_argument("--train-batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-sample-time", type=float, default=0.2,
                   help="seconds per timing sample (iterations per sample calibrated during warm-up)")
    p.add_argument("--baseline", default="ravlt_s_reference")
    p.add_argument("--out", type=Path, default=Path("reports/benchmark"))
    p.add_argument("--profile", action="store_true", help="torch.profiler top-25 operators for RAVLT-S")
    p.add_argument("--scaling", action="store_true", help="RAVLT-T at 224/448/896², published vs all-linear")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.compile:  # eval/train x batch sizes x resolutions (x graph breaks) need more than 8 graphs
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
            else "torch.profiler(profile_memory=True) peak allocation delta + param bytes",
            "skipped": skipped,
        },
        "results": results,
    }  # fmt: skip
    if args.scaling:
        print("\nscaling (RAVLT-T, batch 1):")
        report["scaling"] = benchmark_scaling(args, device)
        for s in report["scaling"]["results"]:
            print(f"  {s['model']:22s} {s['resolution']:4d}²  {s['img_s']:8.2f} img/s  {s['ms_per_megapixel']:8.1f} ms/MP")
    if args.profile:
        report["profile"] = profile_ravlt_s(args, device, args.out)
    # --data-loading (decode + augment throughput of the ravlt_pl data pipelines) belongs here, as a
    # further section of `report`; it is deliberately not implemented in this file yet.
    atomic_write(args.out / "benchmark.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    if results:
        plot(results, args, args.out / "benchmark.png")
    print(f"\nwrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.png'}")
    return report


if __name__ == "__main__":
    main()
