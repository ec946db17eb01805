"""load_official understands every released checkpoint form and refuses mismatches clearly."""

import pytest
import timm
import torch

from ravlt_pl.models import RAVLT, CheckpointError, load_official
from tests.conftest import rel_err


@pytest.fixture()
def cls_model(official_cls):
    return RAVLT(**official_cls["config"]).eval()


def _logits(model, official_cls):
    with torch.no_grad():
        return model(official_cls["input"])


@pytest.mark.parametrize("wrap", ["bare", "model", "model_ema", "file"])
def test_classification_forms(wrap, cls_model, official_cls, tmp_path):
    state = official_cls["state_dict"]
    if wrap == "file":
        path = tmp_path / "RAVLT_tiny.pth"
        torch.save({"model": state, "args": {"lr": 5e-4}, "epoch": 299}, path)
        report = load_official(cls_model, path)
        assert report.source == str(path)
    elif wrap == "model_ema":
        report = load_official(cls_model, {"model": {}, "model_ema": state}, use_ema=True)
    else:
        report = load_official(cls_model, state if wrap == "bare" else {"model": state})
    assert not report.missing and not report.ignored
    assert rel_err(_logits(cls_model, official_cls), official_cls["logits"]) < 1e-5


def test_mmdet_checkpoint_into_dense_backbone(official_dense):
    full = {f"backbone.{k}": v for k, v in official_dense["state_dict"].items()}
    full["neck.fpn_convs.0.conv.weight"] = torch.zeros(1)
    model = RAVLT(**official_dense["config"], out_indices=(0, 1, 2, 3)).eval()
    report = load_official(model, {"state_dict": full, "meta": {}})
    assert not report.missing and not report.ignored
    with torch.no_grad():
        assert rel_err(model(official_dense["input"])[3], official_dense["features"][3]) < 1e-5


def test_imagenet_checkpoint_into_dense_backbone_reports_head_and_extra_norms(official_cls):
    model = RAVLT(**official_cls["config"], out_indices=(0, 1, 2, 3))
    report = load_official(model, {"model": official_cls["state_dict"]})
    assert "head.weight" in report.ignored and "proj.weight" in report.ignored
    assert "extra_norms.0.norm.weight" in report.missing
    assert all(k.startswith("extra_norms.") for k in report.missing)


def test_shape_mismatch_names_key_and_shapes():
    s_state = timm.create_model("ravlt_s").state_dict()
    tiny = timm.create_model("ravlt_t")
    with pytest.raises(
        CheckpointError, match=r"layers\.1\.downsample\.reduction\.weight .*\(320, 128, 3, 3\).*\(256, 128, 3, 3\)"
    ) as err:
        load_official(tiny, {"model": s_state})
    assert str(err.value).endswith(  # and says which shapes the file and the model are
        "the file holds a RAVLT of widths [64, 128, 320, 512], depths [3, 5, 9, 3], the model is one of "
        "widths [64, 128, 256, 512], depths [2, 2, 6, 2]: set the config's `variant` to the file's"
    )


def test_exclude_lets_a_head_of_another_size_be_dropped(official_cls):
    model = RAVLT(**{**official_cls["config"], "num_classes": 3})
    with pytest.raises(CheckpointError, match="head.weight"):
        load_official(model, official_cls["state_dict"])
    report = load_official(model, official_cls["state_dict"], exclude=("head.",))
    assert report.missing == ["head.bias", "head.weight"]


def test_bad_files_are_named(tmp_path, cls_model):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_official(cls_model, tmp_path / "absent.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth: cannot be read as a PyTorch checkpoint"):
        load_official(cls_model, broken)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_official(cls_model, tmp_path)
    with pytest.raises(CheckpointError, match="model_ema"):
        load_official(cls_model, {"model": {}}, use_ema=True)
    with pytest.raises(CheckpointError, match="backbone"):
        load_official(cls_model, {"state_dict": {"net.head.weight": torch.zeros(1)}})


def test_our_classification_checkpoint_initialises_a_dense_backbone(official_cls, official_dense):
    lightning_ckpt = {"state_dict": {f"model.{k}": v for k, v in official_cls["state_dict"].items()}, "epoch": 3}
    model = RAVLT(**official_cls["config"], out_indices=(0, 1, 2, 3))
    report = load_official(model, lightning_ckpt)
    assert "layers.0.blocks.0.attn.qkvo.weight" in report.loaded and "head.weight" in report.ignored


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_ddp_and_compile_prefixes_are_stripped(prefix, cls_model, official_cls):
    state = {prefix + k: v for k, v in official_cls["state_dict"].items()}
    report = load_official(cls_model, {"model": state})
    assert not report.missing and not report.ignored
    assert rel_err(_logits(cls_model, official_cls), official_cls["logits"]) < 1e-5


def test_compiled_submodule_in_a_lightning_checkpoint(official_cls):
    model = RAVLT(**official_cls["config"], out_indices=(0, 1, 2, 3))
    full = {f"model._orig_mod.{k}": v for k, v in official_cls["state_dict"].items()}
    report = load_official(model, {"state_dict": full})
    assert all(k.startswith("extra_norms.") for k in report.missing)


def test_a_file_that_fills_no_backbone_tensor_is_refused_in_one_line(cls_model, official_cls):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}
    total = len(cls_model.state_dict())
    with pytest.raises(
        CheckpointError, match=rf"0 of {total} backbone tensors load; first unmatched: patch_embed\..*conv1\.weight"
    ) as err:
        load_official(cls_model, resnet)
    assert "\n" not in str(err.value) and "pretrained_strict false" in str(err.value)
    detector = {"state_dict": {f"model.backbone.body.{k}": v for k, v in official_cls["state_dict"].items()}}
    with pytest.raises(CheckpointError, match="0 of"):
        load_official(cls_model, detector)


def test_a_partial_load_when_asked_warns_what_is_missing(cls_model, official_cls, caplog):
    state = {k: v for k, v in official_cls["state_dict"].items() if not k.startswith("layers.3.")}
    with pytest.raises(CheckpointError, match=r"first unmatched: layers\.3\..*\(absent from the file\)"):
        load_official(cls_model, state)
    with caplog.at_level("WARNING", logger="ravlt_pl.models.checkpoint"):
        report = load_official(cls_model, state, strict=False)
    assert report.loaded and any(k.startswith("layers.3.") for k in report.missing)
    assert "stay at init: layers.3." in caplog.text
