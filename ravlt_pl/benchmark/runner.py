"""Speed benchmark: RAVLT (ours) vs the authors' arithmetic and timm baselines, in one process.

Every measurement is interleaved (:mod:`.timing`): each round visits every (model, case) once, in the
same order (case-major: all models' batch-8 inference, then batch 1, then training), and a figure is the
median over rounds, so machine noise hits all models alike. Ratios to ``--baseline`` come three ways:
of the medians, the median of per-round ratios (paired samples taken seconds apart) and of the best
samples (load only slows a sample down); on a shared machine, quote the paired one. ``--compile``
raises dynamo's recompile limit to 64 (eval/train × batch sizes × resolutions each need their own graph).
Cases: inference images/s at each --batch-sizes and --resolutions, and one training step (forward +
backward + AdamW) at --train-batch-size (:mod:`.speed`). All models use random weights (:mod:`.zoo`);
nothing is downloaded.

Peak memory (``peak_mem_mb``, :mod:`.memory`): parameter bytes plus the peak extra allocation of a
case's first call (CUDA: ``max_memory_allocated``; CPU: the profiler's per-operator allocations), except
for eager training steps on CPU: there it is the peak resident set size a step adds over the built
model, measured in a process of its own per model (:mod:`.train_memory`; allocator slack included, as
a user sees it). ``train_step_mb`` is that figure without the parameter bytes.

Physical frame: a 2048² matmul gives the device's peak GFLOP/s; a model achieves 2 × multiply-adds ×
images/s, multiply-adds (``gmacs``) counted once per (model, resolution) as :mod:`ravlt_pl.flops` defines them.
``--scaling`` and ``--profile``: :mod:`.studies`; ``--data-loading``: :mod:`.pipelines` (the training
pipelines per worker) and :mod:`.data_loading` (folder vs shards vs parquet); ``--malloc``: :mod:`.malloc`.
Options also come from a YAML file (``--config``; ``--print_config`` writes one).

    python -m ravlt_pl benchmark --threads 2 --models ravlt_s ravlt_s_reference convnext_tiny
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Literal

import torch

from ..reports import atomic_write
from .data_loading import benchmark_formats
from .malloc import tune_glibc_malloc
from .options import OptionParser
from .pipelines import PIPELINES, benchmark_data_loading, print_data_loading
from .report import plot, print_scaling, print_table
from .speed import benchmark_models
from .studies import benchmark_scaling, profile_ravlt_s
from .timing import peak_matmul_gflops
from .zoo import DEFAULT_MODELS

PROG = "python -m ravlt_pl benchmark"


def build_parser() -> OptionParser:
    p = OptionParser(prog=PROG, description=__doc__.split("\n")[0])  # each help shows its default
    p.add_argument(
        "--device",
        type=Literal["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the models run (cuda when a GPU is visible)",
    )
    p.add_argument("--dtype", type=Literal["float32", "bfloat16"], default="float32", help="bfloat16 via autocast")
    p.add_argument("--channels-last", action="store_true", help="inputs and weights in channels_last memory format")
    p.add_argument(
        "--compile",
        type=str,
        nargs="*",
        default=None,
        metavar="MODEL",
        help="add '<name>+compile' rows (torch.compile): for the listed models, or all when none is listed",
    )
    p.add_argument(
        "--freezing",
        action="store_true",
        help="with --compile: inductor freezing for inference (weights as constants, oneDNN prepacking and "
        "conv+pointwise fusion; the standard CPU inference setting), on a separate compiled copy so "
        "training rows stay correct",
    )
    p.add_argument("--threads", type=int | None, default=None, help="torch.set_num_threads; None keeps torch's choice")
    p.add_argument(
        "--malloc",
        type=Literal["default", "tuned"],
        default="default",
        help="tuned: glibc keeps freed memory for reuse (see tune_glibc_malloc); all models alike",
    )
    p.add_argument("--resolutions", type=int, nargs="+", default=[224], metavar="SIDE", help="square input sides (px)")
    p.add_argument(
        "--models",
        type=str,
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
    p.add_argument(
        "--baseline", type=str, default="ravlt_s_reference", metavar="MODEL", help="the model ratios are taken to"
    )
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
        type=str,
        nargs="*",
        default=[],
        metavar="PIPELINE=IMG_S",
        help="training images/s to feed, e.g. imagenet=1200 coco=25 ade20k=60 (a GPU's rates)",
    )
    return p


def parse_args(argv: list[str] | None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.feed_img_s = [_feed(parser, text) for text in args.feed_img_s]
    if args.freezing and args.compile is None:
        parser.error("--freezing applies to compiled rows: add --compile")
    return args


def _feed(parser: OptionParser, text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        if name in PIPELINES:
            return name, float(value)
    except ValueError:
        pass
    parser.error(f"--feed-img-s: expected PIPELINE=IMG_S with PIPELINE in {sorted(PIPELINES)}, got {text!r}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    malloc_settings = tune_glibc_malloc() if args.malloc == "tuned" else {}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.freezing:
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
            else "torch.profiler(profile_memory=True) peak allocation at operator boundaries + param bytes; eager "
                 "training: peak RSS delta of two steps in a process per model (train_memory.py) + param bytes",
            "skipped": skipped, "malloc": args.malloc, "malloc_settings": malloc_settings,
        },
        "results": results,
    }  # fmt: skip
    if args.scaling:
        print("\nscaling (RAVLT-T, batch 1):")
        report["scaling"] = benchmark_scaling(args, device)
        print_scaling(report["scaling"])
    if args.profile:
        report["profile"] = profile_ravlt_s(args, device, args.out)
    if args.data_loading:
        print("\ndata loading:")
        report["data_loading"] = benchmark_data_loading(args, results)
        print_data_loading(report["data_loading"])
        report["data_formats"] = benchmark_formats(args, report["data_loading"]["feed_img_s"])
    atomic_write(args.out / "benchmark.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    if results:
        plot(results, args, args.out / "benchmark.png")
    print(f"\nwrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.png'}")
    return report


if __name__ == "__main__":
    main()
