"""Faster R-CNN, Mask R-CNN and Cascade Mask R-CNN on RAVLT: one class each, torchvision's detector underneath.

RAVLTRetinaNet lives in :mod:`.retinanet` (with the authors' inference rules it follows). Faster and
Mask R-CNN are one network (:class:`RAVLTTwoStage`), with or without the mask branch.

Each detector is one class whose constructor builds the whole network from a RAVLT variant, like
torchvision's ``retinanet_resnet50_fpn``: ``RAVLTMaskRCNN(80, "ravlt_s")``. A config names it by
``class_path`` (``DetectionTask``'s ``detector`` argument) and sets its ``init_args``; torchvision's
own constructor arguments (``box_batch_size_per_image``, ``score_thresh``, ...) pass through
``**kwargs``, and jsonargparse lists them in ``--help``. A fourth detector is one more class here
with the two attributes the task reads:

- ``label_offset``: what to add to a 0-based class index to get the detector's label.
  torchvision's R-CNNs reserve label 0 for the background, RetinaNet does not;
- ``iou_types``: what it predicts, ``("bbox",)`` or ``("bbox", "segm")`` (COCO's IoU types).

``num_classes`` counts object classes only, without background. Images arrive already resized by
the data pipeline (the published recipes resize, flip and crop there), so every detector's
transform only normalises and pads (:class:`PresizedTransform`). The R-CNNs' ``predict_preprocessed``
returns detections at the original sizes by the authors' rules; for the torchvision forward,
:func:`rescale_detections` maps outputs back to the original image sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from .backbone import ravlt_fpn
from .cascade import CascadeMaskRCNN, CascadeRoIHeads
from .mmdet_boxes import DeltaXYWHCoder, MmdetAnchorGenerator
from .rcnn_rules import (
    L1RoIHeads,
    MmdetRoIAlign,
    MmdetRPN,
    class_detections,
    mask_probabilities,
    paste_masks_into,
    scale_factor,
)

#: mmdet's ``target_stds`` of the Mask R-CNN box head (torchvision's weights 10, 10, 5, 5)
BOX_STDS = (0.1, 0.1, 0.2, 0.2)


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


class RAVLTTwoStage(FasterRCNN):
    """Faster / Mask R-CNN on RAVLT: FPN on C2–C5 with a P6 max-pool, RPN, 2-fc box head[, 4-conv mask head].

    torchvision's modules with the authors' (mmdet) anchors, box coding, RoIAlign and L1 box losses
    (:mod:`.mmdet_boxes`, :mod:`.rcnn_rules`); :meth:`predict_preprocessed` is the authors' test path, which
    the task evaluates. The configs name :class:`RAVLTMaskRCNN` or :class:`RAVLTFasterRCNN` (the same
    network without the mask branch), not this class.

    Args:
        num_classes: object classes, without the background (label 0 in torchvision's R-CNNs).
        variant, backbone_overrides, drop_path_rate: the RAVLT backbone (see ``build_backbone``);
            ``drop_path_rate=None`` keeps the variant's published rate.
        fpn_channels: FPN width (256 published).
        representation_size: width of the box head's two fc layers (1024 published).
        mask_channels: width of the mask head's four convs (256 published); ``None``: no mask branch.
        anchor_scale: multiplies every anchor size (1 published).
        rpn_post_nms_top_n_train: proposals kept per image in training (mmdet ``max_per_img=1000``;
            torchvision keeps 2000).
        kwargs: further arguments of torchvision's ``FasterRCNN`` (``box_batch_size_per_image``, ...).
    """

    label_offset = 1

    def __init__(
        self,
        num_classes: int,
        variant: str = "ravlt_s",
        backbone_overrides: dict | None = None,
        drop_path_rate: float | None = None,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        mask_channels: int | None = 256,
        anchor_scale: float = 1.0,
        rpn_post_nms_top_n_train: int = 1000,
        **kwargs,
    ) -> None:
        backbone = ravlt_fpn(variant, backbone_overrides, (0, 1, 2, 3), fpn_channels, "maxpool", drop_path_rate)
        classes = num_classes + 1
        box_head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
        box_predictor = FastRCNNPredictor(representation_size, classes)
        if mask_channels is not None:  # built before the RPN head: a seeded initialisation draws in this order
            mask_head = MaskRCNNHeads(fpn_channels, [mask_channels] * 4, dilation=1)
            mask_predictor = MaskRCNNPredictor(mask_channels, mask_channels, classes)
        # FasterRCNN's, not the next class's: for RAVLTMaskRCNN that is torchvision's MaskRCNN, whose constructor
        # only builds default mask modules and sets them on roi_heads, as done below
        FasterRCNN.__init__(
            self, backbone, None, box_head=box_head, box_predictor=box_predictor,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            # torchvision's transform arguments, named so that they are no config arguments: PresizedTransform replaces it
            min_size=0, max_size=0, image_mean=None, image_std=None, size_divisible=32, fixed_size=None,
            **kwargs,
        )  # fmt: skip
        self.rpn = MmdetRPN.like(self.rpn, MmdetAnchorGenerator(scales=(8.0 * anchor_scale,)), l1_box_loss=True)
        self.roi_heads.__class__ = L1RoIHeads  # same state, the authors' L1 box loss (torchvision builds RoIHeads)
        self.roi_heads.box_coder = DeltaXYWHCoder(BOX_STDS)
        # after construction: torchvision's constructor accepts MultiScaleRoIAlign only
        self.roi_heads.box_roi_pool = MmdetRoIAlign(output_size=7)
        if mask_channels is not None:
            self.roi_heads.mask_roi_pool = MmdetRoIAlign(output_size=14)
            self.roi_heads.mask_head, self.roi_heads.mask_predictor = mask_head, mask_predictor
        self.transform = PresizedTransform()
        self.variant = variant

    def predict_preprocessed(self, batch: Tensor, image_sizes, original_sizes) -> list[dict[str, Tensor]]:
        """The authors' test path (mmdet ``simple_test``, ``rescale=True``) on a normalised, padded batch.

        ``batch`` (B, 3, H, W) as mmdet's pipeline builds it, ``image_sizes`` [(h, w)] after the resize,
        ``original_sizes`` [(h, w)]. Per image ``boxes`` (xyxy, original pixels), ``scores``, ``labels``
        (0-based), and with a mask branch ``masks`` (N, H, W) bool at the original size.
        """
        image_sizes = [tuple(int(v) for v in s) for s in image_sizes]
        features = self.backbone(batch)
        proposals, _ = self.rpn(ImageList(batch, image_sizes), features)
        factors = [scale_factor(s, o, batch.device) for s, o in zip(image_sizes, original_sizes)]
        results = self.box_detections(features, proposals, image_sizes, factors)
        if self.roi_heads.has_mask():
            paste_masks_into(results, self.mask_probabilities(features, results, image_sizes, factors), factors,
                             original_sizes)  # fmt: skip
        return results

    def box_detections(self, features, proposals: list[Tensor], image_sizes, factors) -> list[dict[str, Tensor]]:
        """Per image the authors' detections from its RPN ``proposals``: ``boxes`` divided by ``factors[i]``."""
        heads = self.roi_heads
        logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, proposals, image_sizes)))
        # mmdet zeroes the outputs of every RoI with y2 == 0 (meant for its batch padding: no detection)
        empty = torch.cat(proposals)[:, 3:4] == 0
        logits, deltas = logits.masked_fill(empty, 0), deltas.masked_fill(empty, 0)
        boxes = heads.box_coder.decode(deltas, proposals)  # (N, K+1, 4) at input scale
        counts = [p.shape[0] for p in proposals]  # sizes, symbolic while exporting
        return [
            class_detections(F.softmax(lg, -1), b, size, f, heads.score_thresh, heads.nms_thresh,
                             heads.detections_per_img)
            for lg, b, size, f in zip(logits.split(counts), boxes.split(counts), image_sizes, factors)
        ]  # fmt: skip

    def mask_probabilities(self, features, results: list[dict[str, Tensor]], image_sizes, factors) -> Tensor:
        """(N, 28, 28) mask probabilities of every image's detections, in order (see :func:`.rcnn_rules.mask_probabilities`)."""
        heads = self.roi_heads
        return mask_probabilities(results, features, heads.mask_roi_pool, [(heads.mask_head, heads.mask_predictor)],
                                  image_sizes, factors)  # fmt: skip


class RAVLTMaskRCNN(RAVLTTwoStage, MaskRCNN):
    """Mask R-CNN on RAVLT with the authors' rules (:class:`RAVLTTwoStage`, ``mask_channels`` 256 published)."""

    iou_types = ("bbox", "segm")


class RAVLTFasterRCNN(RAVLTTwoStage):
    """Faster R-CNN on RAVLT: :class:`RAVLTMaskRCNN` without its mask branch, for data without masks.

    The same network, rules and defaults (:class:`RAVLTTwoStage`, all its arguments but ``mask_channels``).
    It reads boxes only, so the data's ``segmentation`` fields are ignored (``COCODataModule(with_masks=None)``
    follows the detector).
    """

    iou_types = ("bbox",)

    def __init__(self, num_classes: int, *args, **kwargs) -> None:
        super().__init__(num_classes, *args, mask_channels=None, **kwargs)


class RAVLTCascadeMaskRCNN(CascadeMaskRCNN):
    """Cascade Mask R-CNN on RAVLT: Mask R-CNN's FPN and RPN, then 3 cascade stages (see :mod:`.cascade`).

    Args:
        num_classes: object classes, without the background.
        variant, backbone_overrides, drop_path_rate: the RAVLT backbone (see ``build_backbone``).
        fpn_channels: FPN width (256 published).
        representation_size: width of each stage's fc layer (1024 published).
        mask_channels: width of each stage's mask head (256 published).
        box_conv_channels: width of each stage's four box-head convs (256 published).
        anchor_scale: multiplies every anchor size (1 published).
        kwargs: further arguments of :class:`CascadeMaskRCNN` (``rpn_post_nms_top_n_train``: 2000
            proposals per image in training, as the published config; ``class_agnostic``, ...).
    """

    label_offset = 1
    iou_types = ("bbox", "segm")

    def __init__(
        self,
        num_classes: int,
        variant: str = "ravlt_s",
        backbone_overrides: dict | None = None,
        drop_path_rate: float | None = None,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        mask_channels: int = 256,
        box_conv_channels: int = 256,
        anchor_scale: float = 1.0,
        **kwargs,
    ) -> None:
        backbone = ravlt_fpn(variant, backbone_overrides, (0, 1, 2, 3), fpn_channels, "maxpool", drop_path_rate)
        super().__init__(backbone, num_classes + 1, PresizedTransform(), representation_size, mask_channels,
                         box_conv_channels=box_conv_channels,
                         anchor_generator=MmdetAnchorGenerator(scales=(8.0 * anchor_scale,)), **kwargs)  # fmt: skip
        self.variant = variant

    def predict_preprocessed(self, batch: Tensor, image_sizes, original_sizes) -> list[dict[str, Tensor]]:
        """The authors' cascade test path on a normalised, padded batch (as ``RAVLTMaskRCNN.predict_preprocessed``)."""
        image_sizes = [tuple(int(v) for v in s) for s in image_sizes]
        features = self.backbone(batch)
        proposals, _ = self.rpn(ImageList(batch, image_sizes), features)
        return self.roi_heads.predict(features, proposals, image_sizes, original_sizes)


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
