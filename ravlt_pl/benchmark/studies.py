"""``--scaling`` (RAVLT-T at 224/448/896², published vs all-linear layout) and ``--profile`` (RAVLT-S operators)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ..reports import atomic_write
from .timing import autocast_ctx, run_interleaved
from .zoo import build_model, ravlt_t_with_attention


def benchmark_scaling(args, device: torch.device) -> dict:
    """Batch-1 inference of RAVLT-T at 224², 448², 896² in both layouts, interleaved: ms per megapixel."""
    entries = []
    for layout, attention in [
        ("published", ["linear", "linear", "softmax", "softmax"]),
        ("all-linear", ["linear"] * 4),
    ]:
        torch.manual_seed(0)
        model = ravlt_t_with_attention(attention).to(device).eval()
        for res in (224, 448, 896):
            x = torch.randn(1, 3, res, res, device=device)

            def fn(model=model, x=x):
                with torch.no_grad(), autocast_ctx(device, args.dtype):
                    model(x)

            entries.append((f"ravlt_t/{layout}", res, 1, fn))
    timings = run_interleaved(entries, args.warmup, args.rounds, args.min_sample_time)
    return {"implementation": "ravlt_pl.models.RAVLT", "batch_size": 1, "results": [
        {"model": row, "resolution": res, "img_s": t["img_s"], "ms": t["ms"], "ms_per_megapixel": t["ms"] / (res**2 / 1e6)}
        for (row, res), t in timings.items()]}  # fmt: skip


def profile_ravlt_s(args, device: torch.device, out_dir: Path) -> dict:
    """torch.profiler's top-25 operators of three RAVLT-S forward passes, printed and written to profile.txt."""
    name, model = "ravlt_s", build_model("ravlt_s").to(device).eval()
    x = torch.randn(args.batch_sizes[0], 3, args.resolutions[0], args.resolutions[0], device=device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), autocast_ctx(device, args.dtype):
        model(x)
        with profile(activities=acts) as prof:
            for _ in range(3):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=25)
    text = f"{name}, batch {x.shape[0]}, {x.shape[-1]}², 3 forward passes, sorted by {sort_by}\n{table}"
    print(text)
    atomic_write(out_dir / "profile.txt", lambda p: Path(p).write_text(text))
    return {"model": name, "file": "profile.txt", "sort_by": sort_by}
