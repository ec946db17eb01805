"""``--data-loading``'s training pipelines per worker (ravlt_pl/benchmark/pipelines.py), on tiny synthetic sets."""

import argparse
import math

from ravlt_pl.benchmark import pipelines


def test_each_pipeline_is_timed_per_worker_and_fed_from_the_ravlt_s_training_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        pipelines, "PIPELINES", {"imagenet": ((80, 60), 2), "coco": ((96, 64), 3), "ade20k": ((96, 64), 3)}
    )
    args = argparse.Namespace(out=tmp_path, data_rounds=1, data_seconds=0.05, data_workers=0, feed_img_s=[("coco", 9.0)],
                              device="cpu", dtype="float32")  # fmt: skip
    ravlt_s = {"model": "ravlt_s", "resolution": 224, "train": {"img_s": 50.0}}
    out = pipelines.benchmark_data_loading(args, [ravlt_s])
    assert out["feed_img_s"] == {"coco": 9.0, "imagenet": 50.0}
    assert set(out["pipelines"]) == {"imagenet", "coco", "ade20k"}
    for entry in out["pipelines"].values():
        assert entry["img_s_per_worker"] > 0 and entry["loader_img_s"] > 0 and entry["top_functions"]
    for name, rate in out["feed_img_s"].items():
        assert out["pipelines"][name]["workers_to_feed"] == math.ceil(
            rate / out["pipelines"][name]["img_s_per_worker_cpu"]
        )
    pipelines.print_data_loading(out)
    assert "workers per 1000 img/s; feeding 50.0 img/s needs" in capsys.readouterr().out
