"""``ravlt_pl.published``: the authors' released file names → our configs, and wrong pairings in one line."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ravlt_pl.cli import resolve_config
from ravlt_pl.published import RELEASED_FILES, _config_variant, pairing_error, released_config

from .conftest import FIXTURES

SHAPES = json.loads((FIXTURES / "official_full" / "released_state_dict_shapes.json").read_text())
#: the backbone tensors a variant is inferred from (widths, depths, head widths, MLP ratio)
TELLING = re.compile(r"backbone\.(layers\.\d+\.(blocks\.\d+\.norm1\.norm\.weight|RoPE\.angle"
                     r"|blocks\.0\.ffn\.fc1\.weight)|extra_norms\.\d+\.norm\.weight)$")  # fmt: skip


def release(tmp_path, name: str, layout: str, classification: bool = False):
    """A file named ``name`` holding the backbone of ``layout`` (an authors' config in the shapes file), in the
    mmdet form ``{"state_dict": {"backbone.*": ...}}`` or the ImageNet form ``{"model": {...}}``."""
    backbone = {k: torch.zeros(shape) for k, shape in SHAPES[layout].items() if TELLING.match(k)}
    if classification:
        checkpoint = {"model": {k.removeprefix("backbone."): v for k, v in backbone.items()}}
    else:
        checkpoint = {"state_dict": backbone, "meta": {"epoch": 12}}
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def test_the_table_holds_the_25_released_files_each_with_an_existing_config_of_its_variant():
    assert len(RELEASED_FILES) == 25
    assert released_config("/downloads/Casmaskrcnn_b_3x_36_epoch.pth") == "det/cascade_maskrcnn_b_3x.yaml"
    assert released_config("uper_l_2x.pth") == "seg/upernet_l_160k.yaml"
    assert released_config("something_else.pth") is None
    for name, config in RELEASED_FILES.items():
        resolve_config(config)
        letter = re.search(r"(?:^|_)([tsbl])(?:_|\.)", name.lower())[1]
        assert _config_variant(config) == f"ravlt_{letter}", name


def test_a_b_detector_into_an_s_config_is_one_line_naming_both(tmp_path):
    path = release(tmp_path, "maskrcnn_b_1x_12_epoch.pth", "maskrcnn_m_1x.py")
    message = pairing_error(path, "det/maskrcnn_s_1x.yaml")
    assert message == (f"{path} holds RAVLT-B, but det/maskrcnn_s_1x.yaml builds RAVLT-S; "
                       "it pairs with det/maskrcnn_b_1x.yaml")  # fmt: skip
    assert pairing_error(path, "det/maskrcnn_b_1x.yaml") is None
    assert pairing_error(path, "det/maskrcnn_b_3x.yaml") is None  # the same model, another schedule


def test_a_released_detector_into_another_detectors_config_is_named(tmp_path):
    path = release(tmp_path, "retinanet_b_1x_12_epoch.pth", "retinanet_m_1x.py")
    message = pairing_error(path, "det/maskrcnn_b_1x.yaml")
    assert message == (f"{path} is the authors' retinanet (det/retinanet_b_1x.yaml), "
                       "but det/maskrcnn_b_1x.yaml builds a maskrcnn")  # fmt: skip
    assert pairing_error(path, "seg/upernet_b_160k.yaml") is None  # as a backbone init for another task


def test_the_imagenet_release_pairs_with_every_config_of_its_variant(tmp_path):
    path = release(tmp_path, "RAVLT_B.pth", "maskrcnn_m_1x.py", classification=True)
    for config in ("cls_b.yaml", "det/cascade_maskrcnn_b_3x.yaml", "seg/upernet_b_160k.yaml"):
        assert pairing_error(path, config) is None
    assert pairing_error(path, "seg/upernet_s_160k.yaml").endswith(
        "builds RAVLT-S; it pairs with cls_b.yaml")  # fmt: skip


def test_a_renamed_file_is_judged_by_the_tensors_it_holds(tmp_path):
    path = release(tmp_path, "my_weights.pth", "retinanet_t_1x.py")
    assert pairing_error(path, "det/retinanet_t_1x.yaml") is None
    assert pairing_error(path, "det/retinanet_s_1x.yaml") == (
        f"{path} holds RAVLT-T, but det/retinanet_s_1x.yaml builds RAVLT-S")  # fmt: skip


def test_a_config_without_a_variant_is_an_error(tmp_path):
    config = tmp_path / "plain.yaml"
    config.write_text("trainer: {max_epochs: 1}\n")
    with pytest.raises(ValueError, match="plain.yaml: sets no RAVLT variant"):
        _config_variant(config)
