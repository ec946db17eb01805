"""Detectors on RAVLT: torchvision contract of the FPN adapter, published sizes, the cascade's parts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.ops import MultiScaleRoIAlign, generalized_box_iou_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ravlt_pl.models.detection import (
    CascadeBoxPredictor,
    CascadeMaskRCNN,
    CascadeRoIHeads,
    DeltaXYWHCoder,
    MmdetAnchorGenerator,
    MmdetRoIAlign,
    PresizedTransform,
    RAVLTCascadeMaskRCNN,
    RAVLTFasterRCNN,
    RAVLTMaskRCNN,
    RAVLTRetinaNet,
    batched_nms,
    conv_fc_box_head,
    dummy_forward,
    mmdet_boxes,
    paste_masks,
    ravlt_fpn,
    rcnn_rules,
    rescale_detections,
)
from tests.conftest import TINY

SMALL_HEADS = dict(fpn_channels=16, representation_size=32, mask_channels=8)
# fewer proposals and sampled RoIs keep the R-CNN heads cheap on CPU
FEW_ROIS = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                rpn_post_nms_top_n_test=50, box_batch_size_per_image=32)  # fmt: skip

DETECTORS = {"retinanet": RAVLTRetinaNet, "faster_rcnn": RAVLTFasterRCNN, "maskrcnn": RAVLTMaskRCNN,
             "cascade_maskrcnn": RAVLTCascadeMaskRCNN}  # fmt: skip
# the paper's parameter counts (M) at 80 classes
PUBLISHED_PARAMS = {
    **{("retinanet", f"ravlt_{v}"): m for v, m in zip("tsbl", (24, 34, 57, 104))},
    **{("maskrcnn", f"ravlt_{v}"): m for v, m in zip("tsbl", (33, 44, 67, 114))},
    **{("cascade_maskrcnn", f"ravlt_{v}"): m for v, m in zip("sbl", (82, 105, 152))},
}


def tiny(detector: str, **kwargs) -> nn.Module:
    """A detector on the tiny test backbone with narrow heads (R-CNNs: few proposals and RoIs too)."""
    small = {"fpn_channels": 16} if detector == "retinanet" else dict(SMALL_HEADS, **FEW_ROIS)
    if detector == "faster_rcnn":
        small.pop("mask_channels")
    return DETECTORS[detector](5, "ravlt_t", TINY, **{**small, **kwargs})


def background_outputs(model: nn.Module) -> int:
    """Parameters of torchvision's R-CNN outputs for the background class, which mmdet's heads lack."""
    roi_heads = getattr(model, "roi_heads", None)
    stages = [] if roi_heads is None else getattr(roi_heads, "stages", [roi_heads])
    count = 0
    for stage in stages:
        if stage.box_predictor.bbox_pred.out_features > 4:  # per-class regression: a box for class 0
            count += 4 * (stage.box_predictor.bbox_pred.in_features + 1)
        count += stage.mask_predictor.mask_fcn_logits.in_channels + 1
    return count


@pytest.mark.parametrize(("detector", "variant"), list(PUBLISHED_PARAMS))
def test_full_size_parameter_count_matches_published(detector, variant):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = DETECTORS[detector](80, variant)
    params = sum(p.numel() for p in model.parameters())
    # Mask R-CNN T lands at 33.503 M with torchvision's unused background outputs, 33.498 M without
    published_layout = (params - background_outputs(model)) / 1e6
    assert abs(published_layout - PUBLISHED_PARAMS[detector, variant]) <= 0.5, f"{params / 1e6:.3f} M"


def test_fpn_adapter_follows_torchvision_backbone_contract():
    backbone = ravlt_fpn("ravlt_t", TINY, out_channels=32)
    features = backbone(torch.rand(1, 3, 64, 96))
    assert backbone.out_channels == 32
    assert list(features) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert {name for name, _ in backbone.named_children()} == {"body", "fpn"}


def test_retinanet_levels_p3_to_p7_with_p6_from_c5():
    c5_channels = TINY["embed_dims"][-1]
    backbone = ravlt_fpn("ravlt_t", dict(TINY, embed_dims=[16, 32, 48, 32]), (1, 2, 3), 32, "p6p7")
    extra = backbone.fpn.extra_blocks
    assert isinstance(extra, LastLevelP6P7) and not extra.use_P5  # C5, even when C5 has the FPN's width
    features = backbone(torch.rand(1, 3, 128, 128))
    assert list(features) == ["0", "1", "2", "p6", "p7"]
    assert [f.shape[-1] for f in features.values()] == [16, 8, 4, 2, 1]  # strides 8 ... 128
    default = ravlt_fpn("ravlt_t", TINY, (1, 2, 3), 32, "p6p7")
    assert default.fpn.extra_blocks.p6.in_channels == c5_channels


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_detector_trains_and_detects_at_input_size(detector):
    torch.manual_seed(0)
    model = tiny(detector)
    assert isinstance(model.transform, PresizedTransform)
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 64)]
    masks = torch.zeros(2, 64, 80, dtype=torch.uint8)
    masks[0, 10:30, 10:40] = masks[1, 30:60, 40:70] = 1
    targets = [
        {"boxes": torch.tensor([[10.0, 10, 40, 30], [40, 30, 70, 60]]), "labels": torch.tensor([1, 3]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 48, 64, dtype=torch.uint8)},
    ]  # fmt: skip
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    if detector in ("maskrcnn", "cascade_maskrcnn"):
        assert detections[1]["masks"].shape[-2:] == (48, 64)  # no resize: outputs live in input pixels


def test_presized_transform_normalises_and_pads_without_resizing():
    transform = PresizedTransform().eval()
    batch, _ = transform([torch.full((3, 50, 70), 0.5)])
    assert batch.image_sizes == [(50, 70)]
    assert batch.tensors.shape[-2:] == (64, 96)


def test_rescale_detections_maps_boxes_and_masks_to_original_size():
    masks = torch.zeros(1, 1, 40, 60)
    masks[0, 0, 10:20, 30:60] = 0.9
    det = {"boxes": torch.tensor([[30.0, 10, 60, 20]]), "labels": torch.tensor([0]), "scores": torch.tensor([1.0]),
           "masks": masks}  # fmt: skip
    (out,) = rescale_detections([det], [(40, 60)], [(80, 120)])
    torch.testing.assert_close(out["boxes"], torch.tensor([[60.0, 20, 120, 40]]))
    assert out["masks"].dtype == torch.bool and out["masks"].shape == (1, 80, 120)
    assert out["masks"][0, 20:40, 60:120].all() and out["masks"].sum() == 20 * 60


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_dummy_forward_runs_every_head(detector):
    model = tiny(detector).eval()
    with torch.no_grad():
        outputs = dummy_forward(model, torch.rand(1, 3, 64, 64), num_rois=8, num_mask_rois=4)
    if detector == "cascade_maskrcnn":  # rpn (2) + 3 stages × (scores, deltas, masks)
        assert len(outputs) == 2 + 3 * 3
        assert outputs[-1].shape == (4, 6, 28, 28)
    elif detector == "maskrcnn":
        assert len(outputs) == 2 + 3
    elif detector == "faster_rcnn":  # rpn (2) + scores, deltas
        assert len(outputs) == 2 + 2
    else:
        assert set(outputs) == {"cls_logits", "bbox_regression"}


# -- cascade parts --------------------------------------------------------------------------------
def test_cascade_box_head_is_four_conv_bn_and_one_fc():
    head = conv_fc_box_head()
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.out_channels == 256 and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in head.modules()) == 4
    fcs = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(256 * 7 * 7, 1024)]


def test_cascade_predictor_regresses_per_class_or_one_box():
    assert CascadeBoxPredictor(64, 6).bbox_pred.out_features == 6 * 4
    assert CascadeBoxPredictor(64, 6, class_agnostic=True).bbox_pred.out_features == 4


def test_cascade_mask_rcnn_has_published_stage_settings():
    model = tiny("cascade_maskrcnn")
    heads = model.roi_heads
    assert isinstance(model, CascadeMaskRCNN) and isinstance(heads, CascadeRoIHeads)
    assert [s.proposal_matcher.high_threshold for s in heads.stages] == [0.5, 0.6, 0.7]
    assert [s.proposal_matcher.low_threshold for s in heads.stages] == [0.5, 0.6, 0.7]
    # mmdet's target_stds (torchvision's weights are their inverses: 10/5, 20/10, 30.3/14.9)
    assert [s.box_coder.stds for s in heads.stages] == [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
                                                        (0.033, 0.033, 0.067, 0.067)]  # fmt: skip
    assert all(isinstance(s.box_roi_pool, MmdetRoIAlign) for s in heads.stages)
    assert heads.stage_loss_weights == [1.0, 0.5, 0.25] and heads.box_loss_weight == 10.0
    assert len({id(s.mask_head) for s in heads.stages}) == 3  # a mask head per stage
    assert len({id(s.box_roi_pool) for s in heads.stages}) == 1  # one shared RoIAlign


def _tiny_cascade(**kwargs) -> CascadeRoIHeads:
    pool = MultiScaleRoIAlign(["0"], 7, 2)
    return CascadeRoIHeads(
        pool, [conv_fc_box_head(8, conv_channels=8, representation_size=16) for _ in range(3)],
        [CascadeBoxPredictor(16, 4) for _ in range(3)], **kwargs,
    )  # fmt: skip


def _targets():
    return [{"boxes": torch.tensor([[4.0, 4, 20, 20], [30, 10, 60, 40]]), "labels": torch.tensor([1, 2])}]


def test_cascade_stage_losses_carry_the_stage_weights():
    features = {"0": torch.rand(1, 8, 16, 16)}
    proposals = [torch.tensor([[2.0, 2, 22, 22], [28, 8, 58, 44], [0, 0, 30, 30], [35, 5, 63, 30]])]
    losses = {}
    for weights in ((1.0, 0.5, 0.25), (1.0, 1.0, 1.0)):
        heads = _tiny_cascade(stage_loss_weights=weights).train()
        torch.manual_seed(0)
        heads.load_state_dict(_tiny_cascade().state_dict())
        torch.manual_seed(1)
        losses[weights] = heads(features, proposals, [(64, 64)], _targets())[1]
    published, ones = losses[(1.0, 0.5, 0.25)], losses[(1.0, 1.0, 1.0)]
    assert set(published) == {f"loss_{n}_s{i}" for n in ("classifier", "box_giou") for i in range(3)}
    for name in published:
        ratio = {"0": 1.0, "1": 0.5, "2": 0.25}[name[-1]]
        torch.testing.assert_close(published[name], ratio * ones[name])


def test_cascade_giou_loss_is_weighted_sum_over_sampled_rois():
    heads = _tiny_cascade()
    pred = torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 15]])
    gt = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    expected = 10.0 * generalized_box_iou_loss(pred, gt, reduction="sum") / 8
    torch.testing.assert_close(heads.giou_loss(pred, gt, num_sampled=8), expected)
    assert heads.giou_loss(pred[:1], gt[:1], 8) == 0


def test_cascade_inference_averages_the_stages_raw_logits():
    heads = _tiny_cascade(score_thresh=0.0).eval()
    stage_logits = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    for stage, logits in zip(heads.stages, stage_logits):
        nn.init.zeros_(stage.box_predictor.cls_score.weight)
        stage.box_predictor.cls_score.bias.data.copy_(logits)
        nn.init.zeros_(stage.box_predictor.bbox_pred.weight)  # zero deltas: boxes stay the proposals
        nn.init.zeros_(stage.box_predictor.bbox_pred.bias)
    proposal = torch.tensor([[4.0, 4, 20, 20]])
    with torch.no_grad():
        (result,), _ = heads({"0": torch.rand(1, 8, 16, 16)}, [proposal], [(64, 64)])
    expected = stage_logits.mean(0).softmax(-1)[1:]  # mmdet: softmax of the mean logits; one candidate per class
    order = result["labels"].argsort()
    torch.testing.assert_close(result["scores"][order], expected)
    torch.testing.assert_close(result["boxes"], proposal.expand(3, 4))


def test_cascade_refine_clips_and_drops_empty_boxes_in_training_only():
    boxes = torch.tensor([[-5.0, -5, 10, 10], [70, 70, 90, 90], [10, 10, 30, 30]])
    train = CascadeRoIHeads.refine(boxes, [3], [(64, 64)], drop_empty=True)[0]
    torch.testing.assert_close(train, torch.tensor([[0.0, 0, 10, 10], [10, 10, 30, 30]]))
    assert len(CascadeRoIHeads.refine(boxes, [3], [(64, 64)], drop_empty=False)[0]) == 3


def test_cascade_trains_on_an_image_without_objects():
    heads = _tiny_cascade().train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    _, losses = heads({"0": torch.rand(1, 8, 16, 16)}, [torch.tensor([[2.0, 2, 22, 22]])], [(64, 64)], empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(losses[f"loss_box_giou_s{i}"] == 0 for i in range(3))


def test_detectors_are_torchvision_detectors_with_their_label_offset_and_iou_types():
    retina, mask, cascade = tiny("retinanet"), tiny("maskrcnn"), tiny("cascade_maskrcnn")
    assert isinstance(retina, RetinaNet) and isinstance(mask, MaskRCNN) and isinstance(cascade, CascadeMaskRCNN)
    assert (retina.label_offset, retina.iou_types) == (0, ("bbox",))
    assert retina.head.classification_head.num_classes == 5  # no background class
    for model in (mask, cascade):
        assert (model.label_offset, model.iou_types) == (1, ("bbox", "segm"))
    assert mask.roi_heads.box_predictor.cls_score.out_features == 6  # + background
    assert all(isinstance(m.transform, PresizedTransform) for m in (retina, mask, cascade))


def test_training_proposals_per_image_follow_the_published_configs():
    # mmdet rpn_proposal max_per_img: 1000 in the Mask R-CNN configs, 2000 in the Cascade ones
    assert RAVLTMaskRCNN(5, "ravlt_t", TINY, **SMALL_HEADS).rpn._post_nms_top_n["training"] == 1000
    assert RAVLTCascadeMaskRCNN(5, "ravlt_t", TINY, **SMALL_HEADS).rpn._post_nms_top_n["training"] == 2000
    assert RAVLTRetinaNet(5, "ravlt_t", TINY, fpn_channels=16).detections_per_img == 100


def test_anchor_scale_multiplies_mmdets_anchor_sizes():
    # R-CNNs: one size 8 × stride per level (32 on P2 ... 512 on P6)
    assert tiny("maskrcnn").rpn.anchor_generator.sizes == ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))
    assert tiny("cascade_maskrcnn", anchor_scale=0.5).rpn.anchor_generator.sizes[0] == (16.0,)
    # RetinaNet: mmdet's unrounded octave sizes 4·2^(i/3) × stride (tests/models/test_released_retinanet.py)
    assert tiny("retinanet", anchor_scale=0.5).anchor_generator.sizes[0] == pytest.approx(
        (16.0, 20.159, 25.398), abs=1e-3
    )


# -- the authors' (mmdet) rules ----------------------------------------------------------------------
def test_mmdet_anchors_use_the_configured_strides_and_float_corners():
    generator = MmdetAnchorGenerator(scales=(8.0,))
    torch.testing.assert_close(generator.cell_anchors[0][0], torch.tensor([-22.6274, -11.3137, 22.6274, 11.3137]))
    # a 96×128 input: P6 is 2×2, whose stride torchvision would infer as 96 // 2 = 48 in y
    maps = [torch.zeros(1, 1, 96 // s + (96 % s > 0), 128 // s) for s in (4, 8, 16, 32, 64)]
    from torchvision.models.detection.image_list import ImageList

    (anchors_,) = generator(ImageList(torch.zeros(1, 3, 96, 128), [(96, 128)]), maps)
    p6 = anchors_[-12:].view(2, 2, 3, 4)
    torch.testing.assert_close(p6[1, 1] - p6[0, 0], torch.full((3, 4), 64.0))


def test_delta_coder_clamps_dw_dh_on_both_sides():
    coder = DeltaXYWHCoder((1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    shrunk = coder.decode_single(torch.tensor([[0.0, 0.0, -100.0, -100.0]]), box)
    width = 10 * 16 / 1000  # mmdet: exp(-log(1000/16)); torchvision would give 10·e^-100
    torch.testing.assert_close(shrunk, torch.tensor([[5 - width / 2, 5 - width / 2, 5 + width / 2, 5 + width / 2]]))


def test_batched_nms_gives_the_same_above_mmcvs_split_size(monkeypatch):
    boxes = torch.rand(300, 2) * 50
    boxes = torch.cat([boxes, boxes + torch.rand(300, 2) * 20 + 1], 1)
    scores, idxs = torch.rand(300), torch.randint(0, 4, (300,))
    offsets = batched_nms(boxes, scores, idxs, 0.5)
    monkeypatch.setattr(mmdet_boxes, "NMS_SPLIT", 10)
    torch.testing.assert_close(batched_nms(boxes, scores, idxs, 0.5), offsets)


def test_roi_levels_follow_mmdet_and_align_is_aligned_adaptive():
    pool = MmdetRoIAlign(["0", "1"], output_size=2, strides=[4, 8])
    features = {"0": torch.rand(1, 1, 16, 16), "1": torch.rand(1, 1, 8, 8)}
    boxes = [torch.tensor([[0.0, 0, 111, 111], [0, 0, 113, 113]])]  # sqrt(wh)/56 just under / over 2
    out = pool(features, boxes)
    from torchvision.ops import roi_align

    rois = torch.cat([torch.zeros(2, 1), boxes[0]], 1)
    torch.testing.assert_close(out[0], roi_align(features["0"], rois[:1], 2, 0.25, 0, True)[0])
    torch.testing.assert_close(out[1], roi_align(features["1"], rois[1:], 2, 0.125, 0, True)[0])


def test_paste_masks_samples_pixel_centres_in_the_float_box_and_stays_boolean():
    probs = torch.ones(2, 28, 28)
    masks = paste_masks(probs, torch.tensor([[2.0, 3.0, 6.0, 5.0], [0.0, 0.0, 0.0, 0.0]]), (8, 10))
    assert masks.dtype == torch.bool and masks.shape == (2, 8, 10)
    expected = torch.zeros(8, 10, dtype=torch.bool)
    expected[3:5, 2:6] = True  # pixel centres inside [2, 6] × [3, 5]
    assert torch.equal(masks[0], expected)
    # a zero-size box: mmdet maps its infinite grid coordinates to 0 (the map's centre) in its ±1 px region
    assert masks[1].nonzero().tolist() == [[0, 0]]


def test_mask_rcnn_trains_with_the_authors_l1_box_losses():
    model = tiny("maskrcnn").train()
    assert isinstance(model.roi_heads, rcnn_rules.L1RoIHeads) and model.rpn.l1_box_loss
    assert not tiny("cascade_maskrcnn").rpn.l1_box_loss  # the authors' cascade: smooth-L1 (β 1/9)
    heads, features = model.roi_heads, {"0": torch.rand(1, 16, 16, 16), "1": torch.rand(1, 16, 8, 8),
                                        "2": torch.rand(1, 16, 4, 4), "3": torch.rand(1, 16, 2, 2)}  # fmt: skip
    proposals = [torch.tensor([[2.0, 2, 22, 22], [28, 8, 58, 44], [0, 0, 30, 30], [35, 5, 63, 30]])]
    targets = [dict(_targets()[0], masks=torch.zeros(2, 64, 64, dtype=torch.uint8))]
    torch.manual_seed(0)
    _, losses = heads(features, proposals, [(64, 64)], targets)
    torch.manual_seed(0)
    sampled, _, labels, regression = heads.select_training_samples(proposals, targets)
    _, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, sampled, [(64, 64)])))
    labels, regression = labels[0], regression[0]
    pos = torch.where(labels > 0)[0]
    expected = (deltas.view(len(deltas), -1, 4)[pos, labels[pos]] - regression[pos]).abs().sum() / len(labels)
    torch.testing.assert_close(losses["loss_box_reg"], expected)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask"}
