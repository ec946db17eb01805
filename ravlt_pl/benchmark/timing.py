"""Timing: interleaved rounds over (model, case) entries, with ``torch.utils.benchmark``'s clock and statistics.

Every round visits every entry once, in the same order, and a figure is the median over rounds, so
machine noise hits all models alike (the ratios' trustworthiness rests on this). A sample is one timed
block of calls, its length calibrated in warm-up to ``--min-sample-time``. The clock is
``torch.utils.benchmark.timer`` (it synchronises an accelerator) and each entry's samples form a
``torch.utils.benchmark.Measurement``. ``Timer.blocked_autorange`` is not used per sample: its
block-size estimate runs one more call each time, which would double the cost of the second-long
training steps on a CPU; the matmul peak, a short op, uses it.
"""

from __future__ import annotations

import math
import timeit
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch.utils import benchmark


def autocast_ctx(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def seconds_per_call(fn: Callable[[], object], calls: int = 1) -> float:
    """Seconds per call, averaged over ``calls`` back-to-back calls."""
    return timeit.Timer(fn, timer=benchmark.timer).timeit(calls) / calls


def peak_matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """The device's peak GFLOP/s: the fastest block of 2048² matmuls (``Timer.blocked_autorange``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    timer = benchmark.Timer("a @ a", globals={"a": a}, num_threads=torch.get_num_threads())
    return 2 * n**3 / min(timer.blocked_autorange(min_run_time=0.2).times) / 1e9


def run_interleaved(entries: list[tuple], warmup: int, rounds: int, min_sample_time: float) -> dict:
    """``entries``: (row, case key, images per call, fn). Returns {(row, key): stats} (see the module docstring)."""
    calls = {}
    for _ in range(warmup):  # warm-up, round-robin too; the last call calibrates the calls per sample
        for row, key, _, fn in entries:
            calls[row, key] = max(1, math.ceil(min_sample_time / max(seconds_per_call(fn), 1e-6)))
    samples = {(row, key): [] for row, key, _, _ in entries}
    for r in range(rounds):
        for row, key, _, fn in entries:
            samples[row, key].append(seconds_per_call(fn, calls.get((row, key), 1)))
        print(f"  round {r + 1}/{rounds} done", flush=True)
    out = {}
    for row, key, images, _ in entries:
        n = calls.get((row, key), 1)
        task = benchmark.TaskSpec(stmt=f"{row} {key}", setup="pass", sub_label=row, description=str(key),
                                  num_threads=torch.get_num_threads())  # fmt: skip
        m = benchmark.Measurement(number_per_run=n, raw_times=[t * n for t in samples[row, key]], task_spec=task)
        best = min(m.times)
        out[row, key] = {"ms": m.median * 1e3, "img_s": images / m.median, "samples_ms": [t * 1e3 for t in m.times],
                         "best_ms": best * 1e3, "best_img_s": images / best, "iters_per_sample": n}  # fmt: skip
    return out
