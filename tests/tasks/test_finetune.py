"""The fine-tune recipes (configs/finetune/) end to end on generated data, as README "Fine-tune on your data"
shows them: classes counted from the data, one command to fit from a pretrained file, and the finished run
validated / predicted / resumed from its saved config.yaml after the pretrained file is gone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ravlt_pl.cli import main
from ravlt_pl.data.synthetic import SHAPES, make_classification, make_detection_export, make_mask_folders
from ravlt_pl.models import RAVLT
from ravlt_pl.models.variants import variant_kwargs
from tests.conftest import TINY

CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
       "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
       "--trainer.num_sanity_val_steps", "0"]  # fmt: skip
DETECTOR = {"backbone_overrides": json.dumps(TINY), "fpn_channels": "16", "representation_size": "32",
            "rpn_pre_nms_top_n_train": "200", "rpn_post_nms_top_n_train": "100", "rpn_pre_nms_top_n_test": "100",
            "rpn_post_nms_top_n_test": "50", "box_batch_size_per_image": "32"}  # fmt: skip


def _pretrained(path: Path) -> Path:
    """A classification checkpoint of the tiny backbone, saved as the authors' release is ({"model": ...})."""
    torch.manual_seed(1)
    torch.save({"model": RAVLT(**variant_kwargs("ravlt_t", **TINY), num_classes=10).state_dict()}, path)
    return path


def _data(config: str, tmp: Path) -> tuple[Path, list[str]]:
    """A generated dataset in the layout the recipe's header shows, and the arguments that shrink the run."""
    if config.startswith("cls"):
        root = make_classification(tmp / "mine", train_per_class=4, val_per_class=1, image_size=32)
        shutil.rmtree(root / "val")  # a tree without val/: a held-out fraction validates
        return root, [
            "--data.init_args.val_fraction",
            "0.25",
            "--data.init_args.image_size",
            "32",
            "--data.init_args.batch_size",
            "4",
            "--model.init_args.backbone_overrides",
            json.dumps(TINY),
        ]
    if config in ("maskrcnn", "faster_rcnn"):
        root = make_detection_export(tmp / "export", "roboflow", box_only=config == "faster_rcnn", num_train=4,
                                     num_val=3, image_size=(80, 64))  # fmt: skip
        small = dict(DETECTOR, **({"mask_channels": "8"} if config == "maskrcnn" else {}))
        return root, [
            "--data.init_args.scale",
            "[96, 64]",
            "--data.init_args.batch_size",
            "2",
            *[a for k, v in small.items() for a in (f"--model.init_args.detector.init_args.{k}", v)],
        ]
    root = make_mask_folders(tmp / "mine", num_train=4, num_val=2, image_size=(80, 64))
    head = {
        "fpn": {"fpn_channels": "16", "head_channels": "16"},
        "upernet": {"head_channels": "16", "aux_channels": "8"},
    }
    return root, [
        "--data.init_args.classes",
        str(root / "classes.txt"),
        "--data.init_args.scale",
        "[128, 64]",
        "--data.init_args.crop_size",
        "[64, 64]",
        "--data.init_args.batch_size",
        "2",
        "--model.init_args.backbone_overrides",
        json.dumps(TINY),
        *[a for k, v in head[config].items() for a in (f"--model.init_args.segmentor.init_args.{k}", v)],
    ]


@pytest.mark.parametrize("config", ["cls", "cls_linear_probe", "maskrcnn", "faster_rcnn", "fpn", "upernet"])
def test_recipe_fits_from_pretrained_and_the_run_stands_alone(config, tmp_path):
    root, small = _data(config, tmp_path)
    pretrained, out = _pretrained(tmp_path / "RAVLT_T.pth"), tmp_path / "run"
    main(["fit", "--config", f"finetune/{config}.yaml", "--data.init_args.root", str(root),
          "--model.init_args.pretrained", str(pretrained), "--trainer.default_root_dir", str(out),
          "--trainer.max_epochs", "1", "--data.init_args.num_workers", "0", *small, *CPU])  # fmt: skip
    saved = next((out / "lightning_logs").glob("version_0/config.yaml"))
    classes = len(SHAPES) + (1 if config in ("fpn", "upernet") else 0)  # + background
    assert yaml.safe_load(saved.read_text())["data"]["init_args"]["num_classes"] == classes  # counted, then recorded
    pretrained.unlink()  # the finished run needs it no more
    cli = main(["validate", "--config", str(saved), "--ckpt_path", "best"])  # the run's best-*.ckpt
    assert cli.model.hparams.num_classes == classes
    validated = next((out / "lightning_logs").glob("version_1/reports/validate/*_val.json"))
    assert "checkpoint " in json.loads(validated.read_text())["weights"] and "best-" in cli.trainer.ckpt_path


def test_predict_and_resume_of_a_finished_classifier_after_the_pretrained_file_is_gone(tmp_path, capsys):
    root, small = _data("cls", tmp_path)
    pretrained, out = _pretrained(tmp_path / "RAVLT_T.pth"), tmp_path / "run"
    main(["fit", "--config", "finetune/cls.yaml", "--data.init_args.root", str(root), "--model.init_args.pretrained",
          str(pretrained), "--trainer.default_root_dir", str(out), "--trainer.max_epochs", "1",
          "--data.init_args.num_workers", "0", *small, *CPU])  # fmt: skip
    saved = out / "lightning_logs" / "version_0" / "config.yaml"
    pretrained.unlink()
    main(
        ["predict", "--config", str(saved), "--ckpt_path", "last", "--data.init_args.predict_dir", str(root / "train")]
    )
    assert "predictions for 20 images written to" in capsys.readouterr().out
    cli = main(["fit", "--config", str(saved), "--ckpt_path", "last", "--trainer.max_epochs", "2"])  # a resume
    assert cli.trainer.current_epoch == 2


def test_a_missing_pretrained_file_is_named_when_the_fit_starts_not_when_built(tmp_path):
    root, small = _data("cls", tmp_path)
    args = ["--config", "finetune/cls.yaml", "--data.init_args.root", str(root), "--model.init_args.pretrained",
            str(tmp_path / "absent.pth"), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--data.init_args.num_workers", "0", *small, *CPU]  # fmt: skip
    main(["summary", *args])  # builds the task: reads no weights
    with pytest.raises(SystemExit, match=r"absent.pth: no such checkpoint file"):
        main(["fit", *args, "--trainer.max_steps", "1"])


def test_a_given_class_count_that_disagrees_names_both_and_the_folder(tmp_path):
    root, small = _data("cls", tmp_path)
    with pytest.raises(SystemExit, match=r"mine/train: 5 class folders but num_classes is 7"):
        main(["fit", "--config", "finetune/cls.yaml", "--data.init_args.root", str(root),
              "--data.init_args.num_classes", "7", "--trainer.default_root_dir", str(tmp_path / "run"),
              "--data.init_args.num_workers", "0", *small, *CPU])  # fmt: skip
