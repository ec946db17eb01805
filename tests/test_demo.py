"""The demos: the classification demo keeps its best checkpoint, and the detection and segmentation
demos start from it (trained first when missing), as the published dense recipes start from ImageNet."""

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
    """The demos on a few images and a tiny backbone, run from ``tmp_path`` (outputs/ and data/ go there)."""
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


def test_segmentation_demo_starts_from_the_classification_demo_trained_first(small_demos, capsys):
    """With no classifier yet, the classification demo runs first; at lr 0 the segmentor's backbone
    after training is exactly the classifier's (the weights were loaded, every one of them)."""
    demo.run("segmentation", ["--model.init_args.backbone_overrides", TINY_JSON, "--trainer.max_steps", "2",
                              "--trainer.val_check_interval", "2", "--data.init_args.eval_batch_size", "2",
                              "--model.init_args.optimizer.init_args.lr", "0", *QUICK])  # fmt: skip
    out = capsys.readouterr().out
    assert "outputs/demo_cls/best.ckpt is missing: training it first" in out
    assert "started from outputs/demo_cls/best.ckpt" in out
    classifier = torch.load(demo.CLASSIFIER, map_location="cpu", weights_only=True)["state_dict"]
    segmentor = checkpoint_state(small_demos / "outputs/demo_seg")
    shared = [k for k in classifier if "model.backbone." + k[len("model.") :] in segmentor]
    convs = [k for k in shared if k.endswith(".weight") and classifier[k].dim() == 4]
    assert len(convs) >= 10  # stem, every block's convolutions, the downsamples
    for key in convs:
        torch.testing.assert_close(segmentor["model.backbone." + key[len("model.") :]], classifier[key], rtol=0, atol=0)


def test_detection_demo_reuses_the_classifier_and_null_trains_from_scratch(small_demos, capsys):
    demo.run("classification", [])
    made = demo.CLASSIFIER.stat().st_mtime_ns
    args = ["--model.init_args.detector.init_args.backbone_overrides", TINY_JSON, "--trainer.max_epochs", "1",
            "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_train_batches", "1", *QUICK]  # fmt: skip
    demo.run("detection", args)
    assert "started from outputs/demo_cls/best.ckpt" in capsys.readouterr().out
    assert demo.CLASSIFIER.stat().st_mtime_ns == made  # reused, not trained again
    demo.CLASSIFIER.unlink()
    demo.run("detection", [*args, "--model.init_args.pretrained", "null"])
    assert "started from scratch" in capsys.readouterr().out
    assert not demo.CLASSIFIER.exists()  # scratch asked for: no classifier trained


def test_an_unreadable_classifier_is_one_line(small_demos):
    demo.CLASSIFIER.parent.mkdir(parents=True)
    demo.CLASSIFIER.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        demo.run("segmentation", [])
    message = str(exit_.value)
    assert "\n" not in message and "outputs/demo_cls/best.ckpt" in message and "delete it" in message


def test_gives_pretrained_reads_both_spellings():
    assert demo.gives_pretrained(["--model.init_args.pretrained", "null"])
    assert demo.gives_pretrained(["--model.init_args.pretrained=x.ckpt"])
    assert not demo.gives_pretrained(["--model.init_args.pretrained_parts", "backbone"])
