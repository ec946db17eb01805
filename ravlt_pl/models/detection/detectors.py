"""RetinaNet, Mask R-CNN and Cascade Mask R-CNN on RAVLT, assembled from torchvision.

Conventions shared by the three builders:

- ``num_classes`` counts object classes only. torchvision's R-CNNs reserve label 0 for the
  background, RetinaNet does not; :data:`LABEL_OFFSET` says what to add to a 0-based class index.
- Images arrive already resized by the data pipeline (the published recipes resize, flip and crop
  there), so the detector's transform only normalises and pads (:class:`PresizedTransform`);
  :func:`rescale_detections` maps outputs back to the original image sizes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from .backbone import ravlt_fpn
from .cascade import CascadeMaskRCNN, CascadeRoIHeads

DetectorName = Literal["retinanet", "maskrcnn", "cascade_maskrcnn"]
DETECTORS: tuple[str, ...] = ("retinanet", "maskrcnn", "cascade_maskrcnn")
LABEL_OFFSET = {"retinanet": 0, "maskrcnn": 1, "cascade_maskrcnn": 1}
HAS_MASKS = {"retinanet": False, "maskrcnn": True, "cascade_maskrcnn": True}


class PresizedTransform(GeneralizedRCNNTransform):
    """torchvision's transform minus the resize: normalise with ImageNet statistics, pad to ×32, batch."""

    def __init__(self, size_divisible: int = 32) -> None:
        super().__init__(min_size=0, max_size=0, image_mean=list(IMAGENET_DEFAULT_MEAN),
                         image_std=list(IMAGENET_DEFAULT_STD), size_divisible=size_divisible)  # fmt: skip

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mean={self.image_mean}, std={self.image_std}, "
                f"pad to ×{self.size_divisible}, no resize)")  # fmt: skip


def build_detector(
    detector: DetectorName,
    num_classes: int,
    variant: str = "ravlt_s",
    backbone_overrides: dict | None = None,
    drop_path_rate: float | None = None,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    mask_channels: int = 256,
    anchor_scale: float = 1.0,
    **kwargs,
) -> nn.Module:
    """A torchvision detector around a RAVLT variant with a ``fpn_channels``-wide FPN.

    Args:
        detector: ``retinanet`` (FPN on C3–C5 + P6/P7 from C5), ``maskrcnn`` (FPN on C2–C5 + P6
            max-pool) or ``cascade_maskrcnn`` (same FPN, 3 cascade stages).
        num_classes: object classes, without background.
        variant, backbone_overrides, drop_path_rate: the RAVLT backbone (see ``build_backbone``).
        fpn_channels, representation_size, mask_channels: widths of the FPN, the box head's fc
            layers and the mask head (256/1024/256 published; smaller for a CPU demo).
        anchor_scale: multiplies every anchor size (torchvision's defaults, 1 published); 0.5 suits
            images whose objects are half the usual size in pixels.
        kwargs: further arguments of torchvision's ``RetinaNet`` / ``MaskRCNN`` (or
            :class:`CascadeMaskRCNN`), e.g. ``box_batch_size_per_image``.
    """
    if detector == "retinanet":
        backbone = ravlt_fpn(variant, backbone_overrides, (1, 2, 3), fpn_channels, "p6p7", drop_path_rate)
        model = RetinaNet(backbone, num_classes, anchor_generator=anchors(detector, anchor_scale),
                          **{"detections_per_img": 100, **kwargs})  # fmt: skip
    elif detector == "maskrcnn":
        backbone = ravlt_fpn(variant, backbone_overrides, (0, 1, 2, 3), fpn_channels, "maxpool", drop_path_rate)
        classes = num_classes + 1
        model = MaskRCNN(
            backbone, None,
            box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, classes),
            mask_head=MaskRCNNHeads(fpn_channels, [mask_channels] * 4, dilation=1),
            mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, classes),
            rpn_anchor_generator=anchors(detector, anchor_scale),
            **{"rpn_post_nms_top_n_train": 1000, **kwargs},  # mmdet keeps 1000 proposals per image in training
        )  # fmt: skip
    elif detector == "cascade_maskrcnn":
        backbone = ravlt_fpn(variant, backbone_overrides, (0, 1, 2, 3), fpn_channels, "maxpool", drop_path_rate)
        model = CascadeMaskRCNN(
            backbone, num_classes + 1, PresizedTransform(), representation_size, mask_channels,
            anchor_generator=anchors(detector, anchor_scale), **{"rpn_post_nms_top_n_train": 1000, **kwargs},
        )  # fmt: skip
    else:
        raise ValueError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    model.transform = PresizedTransform()
    return model


def anchors(detector: str, scale: float = 1.0) -> AnchorGenerator:
    """torchvision's default anchors for ``detector``, every size multiplied by ``scale``.

    R-CNN: one size per level, 32 on P2 ... 512 on P6; RetinaNet: three octave scales per level from
    32 on P3 ... 512 on P7 (mmdet ``octave_base_scale=4``); aspect ratios .5, 1, 2 everywhere.
    """
    octaves = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)) if detector == "retinanet" else (1.0,)
    sizes = tuple(tuple(float(int(base * o)) * scale for o in octaves) for base in (32, 64, 128, 256, 512))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def rescale_detections(
    detections: list[dict[str, Tensor]],
    input_sizes: list[tuple[int, int]],
    original_sizes: list[tuple[int, int]],
    mask_threshold: float = 0.5,
) -> list[dict[str, Tensor]]:
    """Detections on the resized inputs → the original images: boxes scaled, masks resized and binarised.

    Masks come in as torchvision pastes them, ``(N, 1, h, w)`` probabilities at the input size, and
    leave as ``(N, H, W)`` booleans at the original size.
    """
    out = []
    for det, size, original in zip(detections, input_sizes, original_sizes):
        det = dict(det, boxes=resize_boxes(det["boxes"], list(size), list(original)))
        if "masks" in det:
            masks = det["masks"]
            if tuple(masks.shape[-2:]) != tuple(original) and len(masks):
                masks = F.interpolate(masks, size=tuple(original), mode="bilinear", align_corners=False)
            det["masks"] = masks.reshape(len(masks), *original) > mask_threshold
        out.append(det)
    return out


def dummy_forward(model: nn.Module, images: Tensor, num_rois: int = 1000, num_mask_rois: int = 100):
    """Backbone, FPN and every head on fixed RoIs: what the published FLOPs count (mmdet ``forward_dummy``).

    No post-processing, NMS or data-dependent shapes, so the count depends on the input size only.
    """
    features = model.backbone(images)
    levels = list(features.values())
    if isinstance(model, RetinaNet):
        return model.head(levels)
    outputs = list(model.rpn.head(levels))
    height, width = images.shape[-2:]
    rois = [torch.tensor([[0.0, 0.0, width, height]], device=images.device).expand(num_rois, 4)]
    sizes = [(height, width)]
    roi_heads = model.roi_heads
    stages = roi_heads.stages if isinstance(roi_heads, CascadeRoIHeads) else [roi_heads]
    for stage in stages:
        outputs += stage.box_predictor(stage.box_head(stage.box_roi_pool(features, rois, sizes)))
        if stage.has_mask():
            mask_features = stage.mask_roi_pool(features, [rois[0][:num_mask_rois]], sizes)
            outputs.append(stage.mask_predictor(stage.mask_head(mask_features)))
    return outputs
