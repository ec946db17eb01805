"""Faster R-CNN on RAVLT: the box-only two-stage detector, for data without masks (box-only exports)."""

from __future__ import annotations

from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from .backbone import ravlt_fpn
from .detectors import PresizedTransform, anchors


class RAVLTFasterRCNN(FasterRCNN):
    """Mask R-CNN's network without its mask branch: FPN on C2–C5 with a P6 max-pool, torchvision's RPN,
    2-fc box head. It reads boxes only, so the data's ``segmentation`` fields are ignored
    (``COCODataModule(with_masks=False)``).

    Args:
        num_classes: object classes, without the background (label 0 in torchvision's R-CNNs).
        variant, backbone_overrides, drop_path_rate: the RAVLT backbone (see ``build_backbone``);
            ``drop_path_rate=None`` keeps the variant's published rate.
        fpn_channels: FPN width (256 as Mask R-CNN's).
        representation_size: width of the box head's two fc layers (1024).
        anchor_scale: multiplies every anchor size (1: torchvision's).
        rpn_post_nms_top_n_train: proposals kept per image in training (mmdet's 1000; torchvision's 2000).
        kwargs: further arguments of torchvision's ``FasterRCNN`` (``box_batch_size_per_image``, ...).
    """

    label_offset = 1
    iou_types = ("bbox",)

    def __init__(
        self,
        num_classes: int,
        variant: str = "ravlt_s",
        backbone_overrides: dict | None = None,
        drop_path_rate: float | None = None,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        anchor_scale: float = 1.0,
        rpn_post_nms_top_n_train: int = 1000,
        **kwargs,
    ) -> None:
        backbone = ravlt_fpn(variant, backbone_overrides, (0, 1, 2, 3), fpn_channels, "maxpool", drop_path_rate)
        super().__init__(
            backbone, None,
            box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            rpn_anchor_generator=anchors(anchor_scale),
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            # torchvision's transform arguments, named so that they are no config arguments: PresizedTransform replaces it
            min_size=0, max_size=0, image_mean=None, image_std=None, size_divisible=32, fixed_size=None,
            **kwargs,
        )  # fmt: skip
        self.transform = PresizedTransform()
        self.variant = variant
