"""The demos: detection and segmentation start from the shipped classification backbone, as the
published dense recipes start from ImageNet; the classification demo keeps its best checkpoint."""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

from ravlt_pl import demo
from ravlt_pl.config import resolve_config
from ravlt_pl.data.synthetic import make_classification, make_detection, make_segmentation
from tests.conftest import TINY

TINY_JSON = json.dumps({k: v for k, v in TINY.items() if k not in ("layerscales", "layer_init_values")})
QUICK = ["--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--trainer.limit_val_batches", "1"]


@pytest.fixture
def small_demos(tmp_path, monkeypatch):
    """The demos on a few images (the classification one on a tiny backbone), run from ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(Path(resolve_config("demo/cls.yaml")).read_text())
    config["trainer"]["max_epochs"] = 1
    config["model"]["init_args"]["backbone_overrides"] = json.loads(TINY_JSON)
    config["data"]["init_args"].update(batch_size=4, num_workers=0)
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump(config))
    small = {
        "classification": dict(make=partial(make_classification, train_per_class=4, val_per_class=2, image_size=32),
                               config=str(tmp_path / "cls.yaml")),
        "detection": dict(make=partial(make_detection, num_train=4, num_val=2)),
        "segmentation": dict(make=partial(make_segmentation, num_train=4, num_val=2)),
    }  # fmt: skip
    for task, changes in small.items():
        monkeypatch.setitem(demo.DEMOS, task, dataclasses.replace(demo.DEMOS[task], **changes))
    return tmp_path


def checkpoint_state(folder: Path) -> dict[str, torch.Tensor]:
    (path,) = folder.glob("lightning_logs/version_0/checkpoints/best-*.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_segmentation_demo_starts_from_the_shipped_classification_backbone(small_demos, capsys):
    """At lr 0 the segmentor's backbone after training is exactly the shipped one: every tensor loaded."""
    demo.run("segmentation", ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                              "--data.init_args.eval_batch_size", "2",
                              "--model.init_args.optimizer.init_args.lr", "0", *QUICK])  # fmt: skip
    assert f"started from {demo.CLASSIFIER}" in capsys.readouterr().out
    shipped = torch.load(demo.CLASSIFIER, map_location="cpu", weights_only=True)
    segmentor = checkpoint_state(small_demos / "outputs/demo_seg")
    backbone = {k[len("model.backbone.") :]: v for k, v in segmentor.items() if k.startswith("model.backbone.")}
    weights = [k for k, v in shipped.items() if v.is_floating_point() and "running_" not in k]
    assert len(weights) > 100 and set(weights) <= backbone.keys()
    for key in weights:
        torch.testing.assert_close(backbone[key], shipped[key], rtol=0, atol=0)


def test_detection_demo_starts_from_your_classification_demo_or_from_scratch(small_demos, capsys):
    demo.run("classification", [])
    best = small_demos / "outputs/demo_cls/best.ckpt"
    assert f"best checkpoint copied to {Path('outputs/demo_cls/best.ckpt')}" in capsys.readouterr().out
    args = ["--model.init_args.detector.init_args.backbone_overrides", TINY_JSON, "--trainer.max_epochs", "1",
            "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_train_batches", "1", *QUICK]  # fmt: skip
    demo.run("detection", [*args, "--model.init_args.pretrained", str(best)])
    assert f"started from {best}" in capsys.readouterr().out
    demo.run("detection", [*args, "--model.init_args.pretrained", "null"])
    assert "started from scratch" in capsys.readouterr().out


def test_an_unreadable_demo_backbone_is_one_line(small_demos, monkeypatch):
    broken = small_demos / "demo_classifier.pt"
    broken.write_text("not a checkpoint")
    monkeypatch.setattr(demo, "CLASSIFIER", broken)
    with pytest.raises(SystemExit) as exit_:
        demo.run("segmentation", [])
    message = str(exit_.value)
    assert "\n" not in message and str(broken) in message and "reinstall" in message


def test_gives_pretrained_reads_both_spellings():
    assert demo.gives_pretrained(["--model.init_args.pretrained", "null"])
    assert demo.gives_pretrained(["--model.init_args.pretrained=x.ckpt"])
    assert not demo.gives_pretrained(["--model.init_args.pretrained_parts", "backbone"])
