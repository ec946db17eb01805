"""The authors' Mask R-CNN / Cascade Mask R-CNN files, whole: every stored output of their mmdet model reproduced.

Fixtures: ``tests/fixtures/official_full/`` (the authors' model on two images, tiny widths; README of the
reference set), and the key sets and shapes of the full-size released checkpoints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.models.detection.image_list import ImageList

from ravlt_pl.models import released
from ravlt_pl.models.checkpoint import CheckpointError
from ravlt_pl.models.detection import RAVLTCascadeMaskRCNN, RAVLTMaskRCNN
from ravlt_pl.models.detection.released_rcnn import FAMILIES

FIXTURES = Path(__file__).parents[1] / "fixtures" / "official_full"
FAMILY_FILES = {"mask_rcnn": "official_full_mask_rcnn.pt", "cascade_mask_rcnn": "official_full_cascade_mask_rcnn.pt"}


def assert_float32_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to float32 rounding: 1e-5 of the tensor's largest magnitude (the cascade's logits reach ~100)."""
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * max(1.0, theirs.abs().max().item()))


@pytest.fixture(scope="module", params=list(FAMILY_FILES))
def case(request):
    """(fixture dict, our model loaded from its state dict, our neck features on the stored batch)."""
    fx = torch.load(FIXTURES / FAMILY_FILES[request.param], weights_only=True)
    model = released.from_released(fx["state_dict"])
    with torch.no_grad():
        features = model.backbone(fx["inputs"]["batch"])
    return fx, model, features


def sizes(fx) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    metas = fx["inputs"]["img_metas"]
    return [tuple(m["img_shape"][:2]) for m in metas], [tuple(m["ori_shape"][:2]) for m in metas]


def mmdet_layout(logits: torch.Tensor, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (background first, 4·(K+1)) outputs in mmdet's layout (background last, 4·K)."""
    return torch.cat([logits[:, 1:], logits[:, :1]], 1), deltas[:, 4:]


def test_family_and_sizes_come_from_the_keys(case):
    fx, model, _ = case
    expected = RAVLTMaskRCNN if fx["family"] == "mask_rcnn" else RAVLTCascadeMaskRCNN
    assert type(model) is expected and not model.training
    assert model.backbone.out_channels == 16
    heads = model.roi_heads.stages if fx["family"] == "cascade_mask_rcnn" else [model.roi_heads]
    assert all(h.box_predictor.cls_score.out_features == 81 for h in heads)  # 80 classes + background


def test_neck_and_raw_rpn_outputs(case):
    fx, model, features = case
    out = fx["outputs"]
    for ours, theirs in zip(features.values(), out["neck"], strict=True):
        assert_float32_close(ours, theirs)
    with torch.no_grad():
        cls, reg = model.rpn.head(list(features.values()))
    for ours, theirs in zip(cls + reg, out["rpn_cls"] + out["rpn_reg"], strict=True):
        assert_float32_close(ours, theirs)
    for ours, theirs in zip(model.rpn.anchor_generator.cell_anchors, out["rpn_base_anchors"], strict=True):
        assert torch.equal(ours, theirs)


def test_proposals(case):
    fx, model, features = case
    image_sizes, _ = sizes(fx)
    with torch.no_grad():
        proposals, _ = model.rpn(ImageList(fx["inputs"]["batch"], image_sizes), features)
    assert [len(p) for p in proposals] == fx["outputs"]["num_proposals"]
    for ours, theirs in zip(proposals, fx["outputs"]["proposals"]):
        torch.testing.assert_close(ours[:100], theirs[:, :4], rtol=0, atol=1e-3)


def test_roi_head_outputs(case):
    fx, model, features = case
    out, (image_sizes, _) = fx["outputs"], sizes(fx)
    rois = [p[:12, :4] for p in out["proposals"]]
    if fx["family"] == "mask_rcnn":
        heads = model.roi_heads
        with torch.no_grad():
            logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, rois, image_sizes)))
        logits, deltas = mmdet_layout(logits, deltas)
        assert_float32_close(logits, out["roi_cls_score"].flatten(0, 1))
        assert_float32_close(deltas, out["roi_bbox_pred"].flatten(0, 1))
        return
    heads = model.roi_heads
    for s, stage in enumerate(heads.stages):
        for ours, theirs in zip(rois, out["stage_rois"][s]):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)
        with torch.no_grad():
            logits, deltas = stage.box_predictor(stage.box_head(stage.box_roi_pool(features, rois, image_sizes)))
            boxes = stage.box_coder.decode(deltas, rois)
        theirs_logits, theirs_deltas = out["stage_cls_score"][s].flatten(0, 1), out["stage_bbox_pred"][s].flatten(0, 1)
        for ours, theirs in zip(mmdet_layout(logits, deltas), (theirs_logits, theirs_deltas)):
            assert_float32_close(ours, theirs)
        rois = heads.refine(heads.pick(boxes, logits[:, 1:].argmax(1) + 1), [12, 12], image_sizes, drop_empty=False)


def test_mask_probabilities(case):
    fx, model, features = case
    out, (image_sizes, _) = fx["outputs"], sizes(fx)
    heads = model.roi_heads.stages if fx["family"] == "cascade_mask_rcnn" else [model.roi_heads]
    boxes = [b[:12] for b in out["mask_boxes_input_scale"]]
    labels = torch.cat([lab[:12] for lab in out["det_labels"]]) + 1
    with torch.no_grad():
        pooled = heads[0].mask_roi_pool(features, boxes, image_sizes)
        probs = sum(
            torch.sigmoid(h.mask_predictor(h.mask_head(pooled))[torch.arange(len(labels)), labels]) for h in heads
        )
    assert_float32_close(probs / len(heads), torch.cat(out["mask_probs"]))


def unpack_masks(packed: torch.Tensor, width: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), axis=-1, count=width, bitorder="big").astype(bool))


def assert_same_detections(ours: dict, boxes, scores, labels, masks=None) -> None:
    assert len(ours["boxes"]) == len(boxes)
    assert torch.equal(ours["labels"], labels)
    torch.testing.assert_close(ours["boxes"], boxes, rtol=0, atol=1e-3)
    torch.testing.assert_close(ours["scores"], scores, rtol=0, atol=1e-5)
    if masks is not None:
        inter = (ours["masks"] & masks).flatten(1).sum(1)
        union = (ours["masks"] | masks).flatten(1).sum(1)
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones(()))  # both empty: the same mask
        assert iou.min() >= 0.99, iou.min()


def test_final_detections_in_a_batch(case):
    fx, model, _ = case
    out, (image_sizes, original) = fx["outputs"], sizes(fx)
    with torch.no_grad():
        results = model.predict_preprocessed(fx["inputs"]["batch"], image_sizes, original)
    for i, ours in enumerate(results):
        masks = unpack_masks(out["masks"][i], original[i][1])
        assert ours["masks"].shape == (len(ours["boxes"]), *original[i]) and ours["masks"].dtype == torch.bool
        assert_same_detections(ours, out["det_bboxes"][i], out["det_scores"][i], out["det_labels"][i], masks)


def test_final_detections_one_image_at_a_time(case):
    fx, model, _ = case
    image_sizes, original = sizes(fx)
    for i, meta in enumerate(fx["inputs"]["img_metas"]):
        pad_h, pad_w = meta["pad_shape"][:2]
        with torch.no_grad():
            (ours,) = model.predict_preprocessed(fx["inputs"]["batch"][i : i + 1, :, :pad_h, :pad_w],
                                                 image_sizes[i : i + 1], original[i : i + 1])  # fmt: skip
        alone = fx["outputs"]["single_image"][i]
        assert_same_detections(ours, alone["det_bboxes"], alone["det_scores"], alone["det_labels"])


def test_another_class_count_fails_naming_the_key_and_both_shapes(case):
    fx, model, _ = case
    family = next(f for f in FAMILIES if f.matches(fx["state_dict"]))
    state = dict(fx["state_dict"])
    key = next(k for k in state if k.endswith("fc_cls.weight"))
    state[key] = state[key][:11]  # 10 classes + background
    with pytest.raises(CheckpointError, match=r"cls_score\.weight has shape \(11, \d+\) .* but \(81, \d+\)"):
        released.load_converted(model, family.convert(state, model), "file.pth")


def test_a_key_of_another_family_fails_naming_it():
    fx = torch.load(FIXTURES / FAMILY_FILES["cascade_mask_rcnn"], weights_only=True)
    model = RAVLTMaskRCNN(80, "ravlt_t", dict(embed_dims=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_heads=[1, 2, 3, 4]),
                          fpn_channels=16, representation_size=16, mask_channels=8)  # fmt: skip
    with pytest.raises(
        CheckpointError, match=r"roi_head\.bbox_head\.0\.\S+ \(shape .*\) has no place in RAVLTMaskRCNN"
    ):
        FAMILIES[0].convert(fx["state_dict"], model)


# -- the full-size released layouts ---------------------------------------------------------------
SHAPES = json.loads((FIXTURES / "released_state_dict_shapes.json").read_text())
RCNN_CONFIGS = sorted(name for name in SHAPES if re.match(r"(maskrcnn|casrcnn)_", name))


def synthetic_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """An authors'-format state dict with exactly these keys and shapes: random values, valid BN statistics."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.02
    return state


CONFIGS = Path(__file__).parents[2] / "ravlt_pl" / "configs" / "det"


def our_config(release: str) -> Path:
    """Our config of a released layout: ``casrcnn_s_3x.py`` → ``cascade_maskrcnn_s_3x.yaml``, ``m`` → ``b``."""
    family, size, schedule = release.removesuffix(".py").split("_")
    name = {"casrcnn": "cascade_maskrcnn"}.get(family, family)
    return CONFIGS / f"{name}_{ {'m': 'b'}.get(size, size) }_{schedule}.yaml"


def detector_of(config: Path):
    """The config's detector, built as the task builds it (80 COCO classes)."""
    spec = yaml.safe_load(config.read_text())["model"]["init_args"]["detector"]
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(__import__(module, fromlist=[name]), name)(80, **spec["init_args"])


@pytest.mark.parametrize("release", RCNN_CONFIGS)
def test_full_size_release_layout_loads_whole_into_our_config_and_runs(release):
    state = synthetic_state(SHAPES[release])
    model = released.from_released(state)
    assert type(model) is (RAVLTCascadeMaskRCNN if release.startswith("casrcnn") else RAVLTMaskRCNN)
    assert model.variant == {"t": "ravlt_t", "s": "ravlt_s", "m": "ravlt_b", "l": "ravlt_l"}[release.split("_")[1]]
    ours = detector_of(our_config(release)).eval()  # the published config fits the released file exactly
    family = released.family_of(state)
    released.load_converted(ours, family.convert(state, ours), release)
    with torch.no_grad():
        (result,) = ours.predict_preprocessed(torch.randn(1, 3, 64, 64), [(64, 60)], [(48, 45)])
    assert result["masks"].shape[1:] == (48, 45) and len(result["boxes"]) == len(result["labels"])


def test_a_released_file_of_another_variant_fails_naming_key_and_both_shapes():
    state = synthetic_state(SHAPES["maskrcnn_s_1x.py"])
    ours = detector_of(CONFIGS / "maskrcnn_t_1x.yaml")
    with pytest.raises(
        CheckpointError, match=r"maskrcnn_s_1x\.pth: \S+ has shape \(\d+.*\) in the checkpoint but \("
    ) as err:
        released.load_converted(ours, released.family_of(state).convert(state, ours), "maskrcnn_s_1x.pth")
    assert str(err.value).endswith(  # and which RAVLT each is (the backbone found under the detector's prefix)
        "the file holds a RAVLT of widths [64, 128, 320, 512], depths [3, 5, 9, 3], the model is one of "
        "widths [64, 128, 256, 512], depths [2, 2, 6, 2]: set the config's `variant` to the file's"
    )
