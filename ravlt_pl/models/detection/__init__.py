"""Detection on RAVLT with torchvision: FPN adapter, RetinaNet / Mask R-CNN builders, Cascade RoI heads."""

from .backbone import RAVLTWithFPN, ravlt_fpn
from .cascade import CascadeBoxPredictor, CascadeMaskRCNN, CascadeRoIHeads, conv_fc_box_head
from .detectors import (
    DETECTORS, HAS_MASKS, LABEL_OFFSET, DetectorName, PresizedTransform, anchors, build_detector, dummy_forward,
    rescale_detections,
)

__all__ = [
    "RAVLTWithFPN", "ravlt_fpn", "CascadeBoxPredictor", "CascadeMaskRCNN", "CascadeRoIHeads", "conv_fc_box_head",
    "DETECTORS", "HAS_MASKS", "LABEL_OFFSET", "DetectorName", "PresizedTransform", "build_detector",
    "anchors", "dummy_forward", "rescale_detections",
]  # fmt: skip
