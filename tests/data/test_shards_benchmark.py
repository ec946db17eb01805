"""The loader benchmark by storage format (ravlt_pl/benchmark/data_loading.py), on a tiny set."""

import argparse
import math

from ravlt_pl.benchmark import data_loading


def test_formats_are_timed_on_the_same_images_with_workers_to_feed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_loading, "SOURCE_SIZE", (80, 60))
    monkeypatch.setattr(data_loading, "PER_CLASS", 4)
    args = argparse.Namespace(out=tmp_path, data_rounds=1, data_seconds=0.05, data_workers=1)
    out = data_loading.benchmark_formats(args, {"imagenet": 500.0})
    assert out["images"] == 20 and out["source_size"] == (80, 60)
    assert set(out["formats"]) == {"folder", "wds", "parquet"}
    for entry in out["formats"].values():
        assert entry["img_s"] > 0 and entry["read_img_s"] > 0 and entry["loader_img_s"] > 0
        assert entry["workers_to_feed"] == math.ceil(500.0 / entry["cpu_img_s"])
        assert entry["transforms_run"] >= 8  # at least one batch through the real DeiT transform
    assert (tmp_path / "synthetic_formats" / "wds" / "_info.json").is_file()
    assert "workers per 1000 img/s; 500 img/s needs" in capsys.readouterr().out
