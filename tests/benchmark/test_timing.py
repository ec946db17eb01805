"""Interleaved timing: every entry sampled once per round, calls per sample calibrated in warm-up."""

import time

from ravlt_pl.benchmark.timing import peak_matmul_gflops, run_interleaved, seconds_per_call


def test_seconds_per_call_averages_back_to_back_calls():
    assert 0.009 < seconds_per_call(lambda: time.sleep(0.01), calls=3) < 0.05


def test_rounds_alternate_between_entries_and_samples_are_per_call():
    order = []
    entries = [(name, ("infer", 32, 2), 2, lambda name=name: order.append(name) or time.sleep(0.005))
               for name in ("a", "b")]  # fmt: skip
    stats = run_interleaved(entries, warmup=1, rounds=3, min_sample_time=0.02)
    calls = stats["a", ("infer", 32, 2)]["iters_per_sample"]
    assert 2 <= calls <= 5 and order[:2] == ["a", "b"]  # warm-up: one call each, round-robin
    assert order[2:] == (["a"] * calls + ["b"] * stats["b", ("infer", 32, 2)]["iters_per_sample"]) * 3
    a = stats["a", ("infer", 32, 2)]
    assert len(a["samples_ms"]) == 3 and all(4 < ms < 50 for ms in a["samples_ms"])
    assert a["best_ms"] == min(a["samples_ms"]) and abs(a["img_s"] - 2 / (a["ms"] / 1e3)) < 1e-6


def test_peak_matmul_is_positive():
    import torch

    assert peak_matmul_gflops(torch.device("cpu"), n=128) > 0
