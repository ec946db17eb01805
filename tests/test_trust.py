"""Checkpoints are data, never code; ``--ckpt_path`` keeps the config; bad input fails in one line."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ravlt_pl.analysis.loading import build_model, load_weights
from ravlt_pl.cli import main
from ravlt_pl.models import RAVLT, CheckpointError, load_official
from tests.conftest import TINY

TINY_ARGS = json.dumps({k: v for k, v in TINY.items() if k not in ("layerscales", "layer_init_values")})


class WritesMarker:
    """A pickled payload: unpickling it runs ``os.system`` (here: creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture()
def malicious(tmp_path) -> tuple[Path, Path]:
    """A checkpoint that looks like the authors' release, with a payload beside the weights."""
    marker, path = tmp_path / "pwned", tmp_path / "RAVLT_tiny.pth"
    torch.save({"model": {"head.bias": torch.zeros(3)}, "args": WritesMarker(marker)}, path)
    return path, marker


def run_args(subcommand: str, root: Path, out: Path, *extra: str) -> list[str]:
    return [
        subcommand, "--config", "demo/cls.yaml", "--model.init_args.backbone_overrides", TINY_ARGS,
        "--data.init_args.root", str(root), "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
        "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0", *extra,
    ]  # fmt: skip


def error_of(args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return str(exit_info.value.code)


@pytest.fixture(scope="module")
def trained(synthetic_cls, tmp_path_factory) -> Path:
    """The last.ckpt of a one-epoch tiny classification fit (5 steps)."""
    out = tmp_path_factory.mktemp("trained")
    cli = main(run_args("fit", synthetic_cls, out, "--trainer.max_epochs", "1"))
    return Path(cli.trainer.default_root_dir).glob("**/last.ckpt").__next__()


# -- no pickled code runs -------------------------------------------------------------------------
def test_malicious_pickle_never_runs_and_is_named(malicious, synthetic_cls, tmp_path):
    path, marker = malicious
    with pytest.raises(CheckpointError, match=rf"{path}: refused, it pickles the Python object posix\.system"):
        load_official(RAVLT(**TINY, num_classes=3), path)
    with pytest.raises(CheckpointError, match="posix.system"):  # analyze-rank --ckpt
        load_weights(build_model("ravlt_t", json.loads(TINY_ARGS)), path)
    # --model.init_args.pretrained is read when a fit starts from it.
    message = error_of(run_args("fit", synthetic_cls, tmp_path / "run", "--model.init_args.pretrained", str(path)))
    assert message.startswith(f"error: {path}: refused") and "posix.system" in message and "\n" not in message
    message = error_of(["validate", "--config", "demo/cls.yaml", "--ckpt_path", str(path)])
    assert message.startswith(f"error: {path}: refused")
    assert not marker.exists()


def test_authors_release_with_its_argparse_namespace_loads(official_cls, tmp_path):
    path = tmp_path / "RAVLT_T.pth"
    torch.save(
        {"model": official_cls["state_dict"], "args": argparse.Namespace(lr=5e-4, model="RAVLT_T"), "epoch": 299}, path
    )
    report = load_official(RAVLT(**official_cls["config"]), path)
    assert not report.missing and not report.ignored


# -- a pretrained file fills the whole backbone, or says so ---------------------------------------
def test_pretrained_from_a_ddp_or_compiled_run_loads_every_backbone_tensor(tmp_path):
    from ravlt_pl.tasks.classification import ClassificationTask

    source = RAVLT(**json.loads(TINY_ARGS), num_classes=3)
    for prefix in ("module.", "_orig_mod."):
        path = tmp_path / f"{prefix.strip('.')}.pth"
        torch.save({"model": {prefix + k: v for k, v in source.state_dict().items()}}, path)
        task = ClassificationTask(num_classes=3, backbone_overrides=json.loads(TINY_ARGS), pretrained=str(path))
        task.load_pretrained()  # what the start of a fit (or of validate without a checkpoint) does
        assert all(
            torch.equal(v, source.state_dict()[k])
            for k, v in task.model.state_dict().items()
            if k.startswith("layers.")
        )


def test_pretrained_that_does_not_fit_stops_in_one_line_unless_partial_is_asked(synthetic_cls, tmp_path, caplog):
    resnet = tmp_path / "resnet50.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, resnet)
    # validate without --ckpt_path evaluates the config's weights: pretrained is read at its start
    args = run_args("validate", synthetic_cls, tmp_path / "run", "--model.init_args.pretrained", str(resnet))
    message = error_of(args)
    assert (
        message.startswith(f"error: {resnet}: 0 of ")
        and "backbone tensors load; first unmatched: patch_embed." in message
    )
    assert "\n" not in message and "pretrained_strict false" in message
    with caplog.at_level("WARNING", logger="ravlt_pl.models.checkpoint"):
        assert main([*args, "--model.init_args.pretrained_strict", "false"]).trainer.state.finished
    assert "stay at init: patch_embed." in caplog.text


# -- --ckpt_path keeps the config -----------------------------------------------------------------
def test_ckpt_path_applies_the_config_and_its_overrides(trained, synthetic_cls, tmp_path):
    cli = main(run_args("validate", synthetic_cls, tmp_path, "--ckpt_path", str(trained),
                        "--model.init_args.label_smoothing", "0.3"))  # fmt: skip
    assert cli.model.hparams.label_smoothing == 0.3


def test_ckpt_path_of_another_architecture_is_refused_naming_what_differs(trained, synthetic_cls, tmp_path):
    args = run_args("validate", synthetic_cls, tmp_path, "--ckpt_path", str(trained))
    args[args.index(TINY_ARGS)] = json.dumps({**json.loads(TINY_ARGS), "embed_dims": [8, 16, 24, 32]})
    message = error_of(args)
    assert message.startswith(f"error: {trained} was made with another configuration")
    assert '"embed_dims": [16, 32, 48, 64]' in message and "differ in shape" in message
    assert (
        "_class_path" not in message and "_instantiator" not in message
    )  # LightningCLI's bookkeeping is no difference


def test_classification_checkpoint_into_detection_says_so(trained, tmp_path):
    message = error_of(["validate", "--config", "demo/det.yaml", "--ckpt_path", str(trained),
                        "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert message == (f"error: {trained} was made by ravlt_pl.tasks.classification.ClassificationTask, "
                       "this config's model is ravlt_pl.tasks.detection.DetectionTask")  # fmt: skip


def test_saved_hyper_parameters_cannot_point_at_other_files(trained, synthetic_cls, tmp_path, malicious):
    checkpoint = torch.load(trained, weights_only=True)
    elsewhere = tmp_path / "elsewhere"
    checkpoint["hyper_parameters"].update(pretrained=str(malicious[0]), report_dir=str(elsewhere))
    doctored = tmp_path / "doctored.ckpt"
    torch.save(checkpoint, doctored)
    cli = main(run_args("validate", synthetic_cls, tmp_path / "run", "--ckpt_path", str(doctored)))
    assert cli.model.hparams.pretrained is None and cli.model.hparams.report_dir is None
    assert not elsewhere.exists() and (tmp_path / "run").is_dir()


# -- one clear line for bad input -----------------------------------------------------------------
def test_bad_ckpt_paths_fail_in_one_line(trained, synthetic_cls, tmp_path, official_cls):
    text, truncated, authors = tmp_path / "notes.ckpt", tmp_path / "cut.ckpt", tmp_path / "RAVLT_T.pth"
    text.write_text("not a checkpoint\n")
    truncated.write_bytes(trained.read_bytes()[:4096])
    torch.save({"model": official_cls["state_dict"]}, authors)
    expected = {
        text: "cannot be read as a PyTorch checkpoint",
        truncated: "cannot be read as a PyTorch checkpoint",
        tmp_path: "is a directory",
        authors: "not a Lightning checkpoint of this project; to initialise a backbone",
        "last": f"--ckpt_path last: no last*.ckpt or hpc_ckpt_*.ckpt under {tmp_path / 'fresh'}",
    }
    for ckpt_path, reason in expected.items():
        message = error_of(run_args("fit", synthetic_cls, tmp_path / "fresh", "--ckpt_path", str(ckpt_path)))
        assert reason in message and "\n" not in message, message
    assert not (tmp_path / "fresh").exists()  # refused before anything ran


@pytest.mark.parametrize(
    "override, reason",
    [
        (
            ["--model.init_args.optimizer.init_args.lr", "-0.1"],
            "error: model.init_args.optimizer: Invalid learning rate: -0.1",
        ),
        (["--model.init_args.variant", "ravlt_x"], "error: unknown RAVLT variant 'ravlt_x'; choose one of"),
        (["--model.init_args.pretrained", "absent.pth"], "error: absent.pth: no such checkpoint file"),
        (["--data.init_args.batch_size", "0"], "error: --data.init_args.batch_size 0: must be a positive number"),
        (["--data.init_args.batch_size", "-1"], "error: --data.init_args.batch_size -1: must be a positive number"),
        (["--data.init_args.num_workers", "-2"], "error: --data.init_args.num_workers -2: must be 0"),
        (
            ["--trainer.max_steps", "-1", "--trainer.max_epochs", "-1"],
            "error: --trainer.max_epochs -1 (no end) needs --trainer.max_steps",
        ),
        (
            ["--trainer.enable_checkpointing", "false", "--trainer.callbacks+=ModelCheckpoint"],
            "error: --trainer.enable_checkpointing false, but trainer.callbacks has ModelCheckpoint",
        ),
    ],
)
def test_bad_values_fail_in_one_line(override, reason, synthetic_cls, tmp_path):
    message = error_of(run_args("fit", synthetic_cls, tmp_path, "--trainer.max_steps", "1", *override))
    assert message.startswith(reason) and "\n" not in message, message


def test_fit_without_training_batches_is_refused(synthetic_cls, tmp_path):
    # 20 training images, batch 32, the last partial batch dropped: nothing to train on.
    args = run_args("fit", synthetic_cls, tmp_path, "--data.init_args.batch_size", "32")
    assert error_of(args) == ("error: fit has no training batches: 20 training samples at batch size 32 with drop_last "
                              "per device; check the data root and batch size")  # fmt: skip
    assert "fit would train nothing" in error_of(
        run_args("fit", synthetic_cls, tmp_path, "--trainer.limit_train_batches", "0")
    )


def test_ckpt_path_last_resumes_the_newest_last_checkpoint(trained, synthetic_cls, tmp_path):
    saved = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved.parent.mkdir(parents=True)
    shutil.copy(trained, saved)
    cli = main(run_args("fit", synthetic_cls, tmp_path, "--ckpt_path", "last", "--trainer.max_epochs", "2"))
    assert Path(cli.trainer.ckpt_path) == saved and cli.trainer.global_step == 10


def test_enable_checkpointing_false_is_honoured(synthetic_cls, tmp_path):
    cli = main(
        run_args("fit", synthetic_cls, tmp_path, "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "false")
    )
    assert cli.trainer.global_step == 2 and not cli.trainer.checkpoint_callbacks
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("command", ["fit", "analyze-rank"])
def test_config_files_that_are_not_yaml_files_fail_in_one_line_naming_file_and_line(command, tmp_path):
    tab, bracket = tmp_path / "tab.yaml", tmp_path / "bracket.yaml"
    tab.write_text("model:\n  init_args:\n\tvariant: ravlt_t\n")
    bracket.write_text("model:\n  init_args: {variant: [ravlt_t\ntrainer:\n  max_steps: 1\n")
    expected = {
        tab: f"error: --config {tab}, line 3 column 1: not valid YAML: found a tab that cannot start any token (YAML indents with spaces, not tabs)",
        bracket: f"error: --config {bracket}, line 3 column 8: not valid YAML: expected ',' or ']', but got ':'",
        tmp_path: f"error: --config {tmp_path}: is a directory; give a YAML file (in it: bracket.yaml, tab.yaml)",
    }
    for path, message in expected.items():
        assert error_of([command, "--config", str(path)]) == message


def test_a_full_disk_while_writing_config_or_reports_stops_in_one_line(synthetic_cls, tmp_path, monkeypatch):
    import errno

    real_write_text = Path.write_text

    def fill_disk(names):
        def write_text(self, *args, **kwargs):
            if any(self.name.startswith(f".{name}.") for name in names):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)

    fill_disk(["config.yaml"])
    message = error_of(run_args("fit", synthetic_cls, tmp_path / "a", "--trainer.max_steps", "1"))
    assert message.startswith("error: cannot write ") and message.endswith(
        "config.yaml: [Errno 28] No space left on device (the previous config.yaml, if any, is unchanged)"
    )
    assert not list((tmp_path / "a").rglob("config.yaml")) and not list((tmp_path / "a").rglob("*.tmp"))
    fill_disk(["classification_val.md"])
    message = error_of(run_args("validate", synthetic_cls, tmp_path / "b"))
    assert "classification_val.md: [Errno 28] No space left on device" in message and "\n" not in message
    assert not list((tmp_path / "b").rglob("classification_val*")) and not list((tmp_path / "b").rglob("*.tmp"))


# -- box-only data and a mask detector --------------------------------------------------------------
def test_box_only_data_with_mask_rcnn_names_the_file_and_the_way_out(tmp_path):
    from ravlt_pl.data.synthetic import make_detection
    from tests.tasks.test_detection import small_detector_args

    root = make_detection(tmp_path / "boxes", num_train=2, num_val=2, image_size=(80, 64))
    for ann_file in (root / "annotations").glob("*.json"):
        data = json.loads(ann_file.read_text())
        for ann in data["annotations"]:
            del ann["segmentation"]
        ann_file.write_text(json.dumps(data))
    args = ["fit", "--config", "demo/det.yaml", *small_detector_args(rcnn=True), "--data.init_args.root", str(root),
            "--data.init_args.num_classes", "5", "--data.init_args.num_workers", "0", "--trainer.max_steps", "1",
            "--trainer.default_root_dir", str(tmp_path / "run")]  # fmt: skip
    message = error_of(args)
    assert message.startswith(f"error: {root / 'annotations' / 'instances_train2017.json'}: annotations[0]")
    assert "box-only detector config (configs/finetune/...) with --data.init_args.with_masks false" in message
    assert error_of([*args, "--data.init_args.with_masks", "false"]) == (
        "error: --data.init_args.with_masks false, but RAVLTMaskRCNN predicts instance masks (iou_types bbox, segm): "
        "give it data with masks, or use a box-only detector config (configs/finetune/...)")  # fmt: skip
