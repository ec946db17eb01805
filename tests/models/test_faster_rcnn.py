"""RAVLTFasterRCNN is RAVLTMaskRCNN without the mask branch: same modules, rules, losses and detections."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN

from ravlt_pl.models import released
from ravlt_pl.models.checkpoint import CheckpointError
from ravlt_pl.models.detection import MmdetAnchorGenerator, MmdetRoIAlign, RAVLTFasterRCNN, RAVLTMaskRCNN, rcnn_rules
from tests.conftest import TINY

from .test_detection import FEW_ROIS, SMALL_HEADS
from .test_released_rcnn import assert_same_detections, sizes

MASK_RCNN_FIXTURE = Path(__file__).parents[1] / "fixtures" / "official_full" / "official_full_mask_rcnn.pt"


def without_masks(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".mask_head." not in k and ".mask_predictor." not in k}


def targets() -> list[dict]:
    masks = torch.zeros(2, 64, 80, dtype=torch.uint8)
    masks[0, 10:30, 10:40] = masks[1, 30:60, 40:70] = 1
    return [
        {"boxes": torch.tensor([[10.0, 10, 40, 30], [40, 30, 70, 60]]), "labels": torch.tensor([1, 3]), "masks": masks},
        {"boxes": torch.tensor([[5.0, 5, 50, 40]]), "labels": torch.tensor([2]), "masks": masks[:1, :48, :64]},
    ]


@pytest.fixture(scope="module")
def pair() -> tuple[RAVLTMaskRCNN, RAVLTFasterRCNN]:
    """A tiny Mask R-CNN and the Faster R-CNN holding its weights but for the mask branch."""
    torch.manual_seed(0)
    mask = RAVLTMaskRCNN(5, "ravlt_t", TINY, **SMALL_HEADS, **FEW_ROIS)
    arguments = {k: v for k, v in SMALL_HEADS.items() if k != "mask_channels"}
    faster = RAVLTFasterRCNN(5, "ravlt_t", TINY, **arguments, **FEW_ROIS)
    faster.load_state_dict(without_masks(mask.state_dict()))  # strict: the very same tensors but the mask branch's
    return mask, faster


def test_faster_rcnn_has_mask_rcnns_modules_and_rules_without_the_mask_branch(pair):
    mask, faster = pair
    assert isinstance(faster, FasterRCNN) and not isinstance(faster, MaskRCNN) and isinstance(mask, MaskRCNN)
    assert (faster.label_offset, faster.iou_types) == (1, ("bbox",))
    assert not faster.roi_heads.has_mask() and mask.roi_heads.has_mask()
    assert set(mask.state_dict()) - set(faster.state_dict()) == set(mask.state_dict()) - set(
        without_masks(mask.state_dict())
    )
    for model in (mask, faster):
        assert isinstance(model.rpn, rcnn_rules.MmdetRPN) and model.rpn.l1_box_loss
        assert isinstance(model.rpn.anchor_generator, MmdetAnchorGenerator)
        assert isinstance(model.roi_heads, rcnn_rules.L1RoIHeads)
        assert isinstance(model.roi_heads.box_roi_pool, MmdetRoIAlign)
        assert model.roi_heads.box_coder.stds == (0.1, 0.1, 0.2, 0.2)
        assert model.rpn._post_nms_top_n["training"] == 100  # FEW_ROIS (1000 by default, as mmdet)


def test_faster_rcnn_trains_with_mask_rcnns_box_losses(pair):
    mask, faster = pair
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 64)]
    losses = {}
    for model in pair:
        model.train()
        torch.manual_seed(1)  # the same anchor and RoI samples
        losses[model] = model(images, targets())
    assert set(losses[mask]) == set(losses[faster]) | {"loss_mask"}
    for name, value in losses[faster].items():
        torch.testing.assert_close(value, losses[mask][name], rtol=0, atol=0)
    sum(losses[faster].values()).backward()


def test_faster_rcnn_detects_as_mask_rcnn_by_the_authors_rules(pair):
    images = torch.rand(1, 3, 64, 96)
    results = []
    for model in pair:
        model.eval()
        with torch.no_grad():
            results.append(model.predict_preprocessed(images, [(60, 90)], [(120, 180)])[0])
    mask, faster = results
    assert "masks" in mask and "masks" not in faster and len(faster["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(faster[key], mask[key])


def test_the_authors_mask_rcnn_boxes_from_its_file_without_masks():
    """Their Mask R-CNN's keys without ``roi_head.mask_head`` (mmdet's Faster R-CNN layout) load into our
    Faster R-CNN, whose detections are theirs (their box branch does not depend on the masks)."""
    fx = torch.load(MASK_RCNN_FIXTURE, weights_only=True)
    state = {k: v for k, v in fx["state_dict"].items() if not k.startswith("roi_head.mask_head.")}
    model = released.from_released(state)
    assert type(model) is RAVLTFasterRCNN and released.family_of(state).name == "faster_rcnn"
    image_sizes, original = sizes(fx)
    with torch.no_grad():
        results = model.predict_preprocessed(fx["inputs"]["batch"], image_sizes, original)
    out = fx["outputs"]
    for i, ours in enumerate(results):
        assert_same_detections(ours, out["det_bboxes"][i], out["det_scores"][i], out["det_labels"][i])


def test_a_mask_rcnn_file_into_a_faster_rcnn_fails_naming_the_mask_key():
    fx = torch.load(MASK_RCNN_FIXTURE, weights_only=True)
    faster = released.from_released({k: v for k, v in fx["state_dict"].items() if ".mask_head." not in k})
    family = released.family_of(fx["state_dict"])
    with pytest.raises(CheckpointError, match=r"file\.pth: .*mask_head"):
        released.load_converted(faster, family.convert(fx["state_dict"], faster), "file.pth")
