"""The authors' released RetinaNet, whole: keys, shapes and outputs against their mmdet 2.11 model.

``tests/fixtures/official_full/official_full_retinanet.pt`` holds a tiny authors'-format RetinaNet
(random weights), two images as the authors' test pipeline prepares them and their model's neck,
raw head outputs, base anchors and final detections (batched and one image at a time).
``released_state_dict_shapes.json`` lists the keys and shapes of the full-size released files.
"""

from __future__ import annotations

import json

import pytest
import torch

from ravlt_pl.models.checkpoint import CheckpointError
from ravlt_pl.models.detection.mmdet_boxes import batched_nms
from ravlt_pl.models.detection.released_retinanet import retinanet
from ravlt_pl.models.detection.retinanet import RAVLTRetinaNet
from ravlt_pl.models.released import load_converted

from ..conftest import FIXTURES

OFFICIAL = FIXTURES / "official_full"
STRIDES = (8, 16, 32, 64, 128)


def released(state: dict) -> RAVLTRetinaNet:
    """What ``from_released`` does for this family: build from the shapes, strict load, eval mode."""
    assert retinanet.matches(state)
    model = retinanet.build(state)
    load_converted(model, retinanet.convert(state, model), "<test>")
    return model.eval()


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(OFFICIAL / "official_full_retinanet.pt", weights_only=True)


@pytest.fixture(scope="module")
def model(fixture) -> RAVLTRetinaNet:
    return released(fixture["state_dict"])


@pytest.fixture(scope="module")
def ours(fixture, model) -> dict:
    """Our neck, per-level head outputs in the authors' layout and base anchors on the fixture batch."""
    with torch.no_grad():
        features, outputs, _ = model.head_outputs(fixture["inputs"]["batch"])
    cls, reg = [], []
    for feature, logits, deltas in zip(features, outputs["cls_logits"], outputs["bbox_regression"]):
        height, width = feature.shape[-2:]
        cls.append(logits.reshape(2, height, width, 9, 80).permute(0, 3, 4, 1, 2))  # (B, A, K, H, W)
        reg.append(deltas.reshape(2, height, width, 36).permute(0, 3, 1, 2))  # (B, 4A, H, W): channel 4a + j
    return dict(neck=features, cls=cls, reg=reg)


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding: 1e-5 of the tensor's scale."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def image_args(metas: list[dict]) -> tuple[list, list]:
    return [tuple(m["img_shape"][:2]) for m in metas], [tuple(m["ori_shape"][:2]) for m in metas]


def same_detections(got: dict, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> None:
    assert len(got["boxes"]) == len(boxes) > 0
    assert torch.equal(got["labels"], labels)
    torch.testing.assert_close(got["boxes"], boxes, rtol=0, atol=1e-3)
    torch.testing.assert_close(got["scores"], scores, rtol=0, atol=1e-5)


def test_the_fixture_builds_the_authors_sizes(model):
    head = model.head.classification_head
    assert model.variant == "ravlt_t" and model.backbone.body.embed_dims == [8, 16, 24, 32]
    assert model.backbone.out_channels == 16 and head.num_classes == 80 and head.num_anchors == 9
    assert len(head.conv) == 4 and head.cls_logits.in_channels == 8  # feat_channels 8 < FPN 16


def test_from_released_recognises_a_retinanet_among_all_families(fixture):
    from ravlt_pl.models.released import from_released

    model = from_released({"state_dict": fixture["state_dict"]})
    assert isinstance(model, RAVLTRetinaNet) and not model.training


def test_neck_p3_to_p7_matches(fixture, ours):
    assert len(ours["neck"]) == 5
    for got, expected in zip(ours["neck"], fixture["outputs"]["neck"]):
        close(got, expected)


def test_raw_head_outputs_match_in_the_authors_channel_layout(fixture, ours):
    out = fixture["outputs"]
    for cls, reg, first_k, cls_max, cls_argmax, expected_reg in zip(
        ours["cls"], ours["reg"], out["cls_first_k"], out["cls_max"], out["cls_argmax"], out["reg"]
    ):
        close(cls[:, :, :6], first_k)
        close(cls.max(2).values, cls_max)
        top2 = cls.topk(2, dim=2).values
        clear = (top2[:, :, 0] - top2[:, :, 1]) > 1e-4  # arg-max is defined where the best two classes differ
        assert clear.float().mean() > 0.99
        assert torch.equal(cls.argmax(2)[clear], cls_argmax.long()[clear])
        close(reg, expected_reg)


def test_base_anchors_are_mmdets_unrounded_octave_anchors(fixture, model):
    generator = model.anchor_generator
    assert generator.strides == STRIDES
    for base, expected in zip(generator.cell_anchors, fixture["outputs"]["base_anchors"], strict=True):
        torch.testing.assert_close(base, expected)
    assert generator.cell_anchors[0][4].tolist() == pytest.approx(
        [-20.158737, -20.158737, 20.158737, 20.158737]
    )  # 40.32 = 32 · 2^(1/3), not torchvision's int(40.3) = 40


def test_final_detections_of_the_padded_batch_match(fixture, model):
    inputs, out = fixture["inputs"], fixture["outputs"]
    detections = model.predict_preprocessed(inputs["batch"], *image_args(inputs["img_metas"]))
    assert [len(d["boxes"]) for d in detections] == [84, 100]  # image 1 hits max_per_img
    for i, det in enumerate(detections):
        same_detections(det, out["det_bboxes"][i], out["det_scores"][i], out["det_labels"][i])


def test_each_image_alone_matches_the_authors_single_image_test(fixture, model):
    inputs, out = fixture["inputs"], fixture["outputs"]
    for i, meta in enumerate(inputs["img_metas"]):
        pad_h, pad_w = meta["pad_shape"][:2]
        alone = inputs["batch"][i : i + 1, :, :pad_h, :pad_w]  # padded to 32 only
        (det,) = model.predict_preprocessed(alone, *image_args([meta]))
        expected = out["single_image"][i]
        same_detections(det, expected["det_bboxes"], expected["det_scores"], expected["det_labels"])
    assert len(out["single_image"][1]["det_bboxes"]) == 28  # the padding changes the result (100 in the batch)


def test_forward_at_input_scale_gives_the_same_detections_as_the_authors_rule(fixture, model):
    inputs, out = fixture["inputs"], fixture["outputs"]
    meta = inputs["img_metas"][0]
    h, w = meta["img_shape"][:2]
    pad_h, pad_w = meta["pad_shape"][:2]
    std = torch.tensor(inputs["std"]).view(3, 1, 1)
    mean = torch.tensor(inputs["mean"]).view(3, 1, 1)
    image = (inputs["batch"][0, :, :h, :w] * std + mean).round() / 255  # the resized uint8 image, as [0, 1]
    with torch.no_grad():
        (det,) = model([image])
    assert model.transform([image])[0].tensors.shape[-2:] == (pad_h, pad_w)  # zero-padded to 32 like mmdet
    scale = torch.tensor(meta["scale_factor"])
    assert len(det["boxes"]) == len(out["single_image"][0]["det_bboxes"])
    torch.testing.assert_close(det["boxes"] / scale, out["single_image"][0]["det_bboxes"], rtol=0, atol=0.05)


def test_mmcv_nms_keeps_classes_apart_and_loops_over_them_from_10000_candidates():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]])
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1])
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [0, 2]
    many = boxes.repeat(4000, 1) + (torch.arange(12000.0) * 20)[:, None]  # 12000 disjoint boxes
    many_scores, many_labels = torch.rand(12000), torch.arange(12000) % 3
    keep = batched_nms(many, many_scores, many_labels, 0.5)  # all kept, by descending score
    assert len(keep) == 12000 and torch.equal(keep, many_scores.argsort(descending=True))


# -- full-size released layouts ------------------------------------------------------------------
SHAPES = json.loads((OFFICIAL / "released_state_dict_shapes.json").read_text())
RETINANET_CONFIGS = sorted(name for name in SHAPES if name.startswith("retinanet_"))
VARIANT = {"t": "ravlt_t", "s": "ravlt_s", "m": "ravlt_b", "l": "ravlt_l"}  # the authors' "m" is RAVLT-B


def synthetic_release(config: str, num_classes: int = 80) -> dict[str, torch.Tensor]:
    """An authors'-format state dict with exactly the keys and shapes of ``config``'s released file."""
    state = {}
    for key, shape in SHAPES[config].items():
        if key.startswith("bbox_head.retina_cls.") and num_classes != 80:
            shape = [9 * num_classes, *shape[1:]]
        state[key] = torch.randn(shape) * 0.02
    return state


def test_the_shapes_file_lists_the_four_released_retinanets():
    assert RETINANET_CONFIGS == [f"retinanet_{v}_1x.py" for v in "lmst"]


@pytest.mark.parametrize("config", RETINANET_CONFIGS)
def test_every_released_layout_builds_loads_whole_and_detects(config):
    model = released(synthetic_release(config))
    assert model.variant == VARIANT[config.split("_")[1]]
    assert model.backbone.out_channels == 256 and model.head.classification_head.num_classes == 80
    with torch.no_grad():
        (det,) = model.predict_preprocessed(torch.randn(1, 3, 64, 96), [(64, 90)], [(50, 70)])
    assert det["boxes"].shape[1:] == (4,) and len(det["boxes"]) == len(det["scores"]) == len(det["labels"])


def test_a_checkpoint_of_another_variant_fails_naming_the_key_and_both_shapes():
    tiny_state = torch.load(OFFICIAL / "official_full_retinanet.pt", weights_only=True)["state_dict"]
    model = retinanet.build(tiny_state)
    other = synthetic_release("retinanet_t_1x.py")
    mismatch = r"retinanet_t_1x_12_epoch.pth: backbone\.body\.\S+ has shape \(\d+,.*\) in the checkpoint but \(\d+,.*\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_converted(model, retinanet.convert(other, model), "retinanet_t_1x_12_epoch.pth")


def test_a_checkpoint_with_another_class_count_fails_at_the_classifier(fixture):
    model = retinanet.build(fixture["state_dict"])
    state = dict(fixture["state_dict"])
    state["bbox_head.retina_cls.weight"] = torch.zeros(9 * 20, 8, 3, 3)
    state["bbox_head.retina_cls.bias"] = torch.zeros(9 * 20)
    with pytest.raises(CheckpointError, match=r"cls_logits\.weight has shape \(180, 8, 3, 3\).*\(720, 8, 3, 3\)"):
        load_converted(model, retinanet.convert(state, model), "file.pth")
    assert retinanet.build(state).head.classification_head.num_classes == 20  # built from it: 20 classes


def test_a_key_the_authors_retinanet_does_not_have_is_an_error(fixture, model):
    state = dict(fixture["state_dict"], **{"bbox_head.retina_iou.weight": torch.zeros(9, 8, 3, 3)})
    with pytest.raises(CheckpointError, match=r"bbox_head\.retina_iou\.weight \(shape \(9, 8, 3, 3\)\) is not part"):
        retinanet.convert(state, model)
