"""Detection on RAVLT with torchvision: FPN adapter, RetinaNet / Faster R-CNN / Mask R-CNN / Cascade Mask R-CNN, cascade RoI heads."""

from .backbone import RAVLTWithFPN, ravlt_fpn
from .cascade import CascadeBoxPredictor, CascadeMaskRCNN, CascadeRoIHeads, conv_fc_box_head
from .detectors import (
    PresizedTransform,
    RAVLTCascadeMaskRCNN,
    RAVLTFasterRCNN,
    RAVLTMaskRCNN,
    RAVLTTwoStage,
    dummy_forward,
    rescale_detections,
)
from .mmdet_boxes import DeltaXYWHCoder, MmdetAnchorGenerator, batched_nms, octave_scales
from .rcnn_rules import MmdetRoIAlign, MmdetRPN, paste_masks
from .retinanet import RAVLTRetinaNet

__all__ = [
    "RAVLTWithFPN", "ravlt_fpn", "CascadeBoxPredictor", "CascadeMaskRCNN", "CascadeRoIHeads", "conv_fc_box_head",
    "PresizedTransform", "RAVLTRetinaNet", "RAVLTFasterRCNN", "RAVLTMaskRCNN", "RAVLTCascadeMaskRCNN", "RAVLTTwoStage",
    "dummy_forward", "rescale_detections", "DeltaXYWHCoder", "MmdetAnchorGenerator", "MmdetRoIAlign", "MmdetRPN",
    "batched_nms", "octave_scales", "paste_masks",
]  # fmt: skip
