"""The speed benchmark end to end (ravlt_pl/benchmark/runner.py) with tiny settings."""

import json

import pytest

from ravlt_pl.benchmark.runner import main
from ravlt_pl.benchmark.train_memory import measure_in_subprocess


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench"
    report = main(["--device", "cpu", "--threads", "1", "--models", "resnet18", "--baseline", "resnet18",
                   "--resolutions", "64", "--batch-sizes", "1", "--train-batch-size", "2",
                   "--rounds", "1", "--warmup", "0", "--out", str(out)])  # fmt: skip
    data = json.loads((out / "benchmark.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = data["meta"]
    for key in ("device", "torch", "dtype", "threads", "rounds", "baseline", "peak_matmul_gflops", "memory_method"):
        assert key in meta
    assert meta["peak_matmul_gflops"] > 0
    (row,) = data["results"]
    assert row["model"] == "resnet18" and row["resolution"] == 64
    assert abs(row["params_m"] - 11.69) < 0.01 and row["gmacs"] > 0
    assert row["infer"]["1"]["img_s"] > 0 and len(row["infer"]["1"]["samples_ms"]) == 1
    assert row["train"]["img_s"] > 0
    assert set(row["peak_mem_mb"]) == {"infer_bs1", "train"}
    assert row["peak_mem_mb"]["train"] > row["peak_mem_mb"]["infer_bs1"] > 11.69 * 4 * 0.95  # >= weights
    # CPU training: the RSS a step adds, from a process of its own; it holds at least the gradients
    assert row["train_step_mb"] > 11.69 * 4 * 0.95 and "RSS" in meta["memory_method"]
    assert row["achieved_gflops"] > 0 and 0 < row["peak_share"]
    assert row["ratio_vs_baseline"] == {"infer_bs1": 1.0, "train": 1.0}


def test_benchmark_inference_only_with_tuned_malloc(tmp_path):
    out = tmp_path / "bench"
    report = main(["--device", "cpu", "--threads", "1", "--models", "resnet18", "--baseline", "resnet18",
                   "--resolutions", "64", "--batch-sizes", "1", "--train-batch-size", "0", "--malloc", "tuned",
                   "--rounds", "1", "--warmup", "0", "--out", str(out)])  # fmt: skip
    (row,) = report["results"]
    assert "train" not in row and row["infer"]["1"]["img_s"] > 0
    assert row["ratio_vs_baseline"] == {"infer_bs1": 1.0}
    assert report["meta"]["malloc"] == "tuned" and report["meta"]["malloc_settings"]["M_MMAP_THRESHOLD"] == 1 << 25


def test_training_memory_of_an_unknown_model_names_it():
    with pytest.raises(RuntimeError, match="'no_such_model' failed: .*no_such_model"):
        measure_in_subprocess("no_such_model", 32, 1)
