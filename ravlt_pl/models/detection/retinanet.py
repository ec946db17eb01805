"""RetinaNet on RAVLT with the authors' (mmdet 2.11) inference rules, on torchvision's ``RetinaNet``.

torchvision provides the detector, the focal / L1 losses and the anchor matching. Where its
inference differs from the authors' ``RetinaNet`` + ``RetinaHead`` (the released checkpoints'
numbers depend on it), this module follows mmdet:

- P6 is a stride-2 conv on C5 and P7 a conv on P6 **without** a ReLU in between (``add_extra_convs='on_input'``,
  ``relu_before_extra_convs=False``); torchvision's ``LastLevelP6P7`` applies a ReLU;
- the head's towers may be narrower than the FPN (``feat_channels``) and have any depth (``stacked_convs``);
- anchors (:class:`.mmdet_boxes.MmdetAnchorGenerator`): sizes ``stride · 4 · 2^(i/3)`` (32, 40.32, 50.80
  on P3), **not rounded**, shifted by the level's nominal stride (8 ... 128) rather than ``image size // feature size``;
- decoding (:class:`.mmdet_boxes.DeltaXYWHCoder`) clamps dw/dh on both sides to ±log(1000/16), clips to the image;
- per level the 1000 anchors with the highest max-over-classes score keep all their class scores;
  then one class-wise NMS over every level's (anchor, class) pairs with score > 0.05, the first 100 kept.

:meth:`RAVLTRetinaNet.predict_preprocessed` runs a batch prepared exactly as the authors' test
pipeline does and rescales the boxes to the original images *before* NMS, as mmdet does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.misc import Conv2dNormActivation

from .backbone import ravlt_fpn
from .detectors import PresizedTransform
from .mmdet_boxes import DeltaXYWHCoder, MmdetAnchorGenerator, batched_nms, octave_scales


def retina_head(
    in_channels: int,
    num_anchors: int,
    num_classes: int,
    feat_channels: int,
    stacked_convs: int,
    prior_probability: float = 0.01,
) -> RetinaNetHead:
    """torchvision's ``RetinaNetHead`` (its losses, output layout a·K + c) with mmdet's tower width and depth."""
    head = RetinaNetHead(in_channels, num_anchors, num_classes)
    widths = [in_channels] + [feat_channels] * stacked_convs
    for branch, final, outputs in ((head.classification_head, "cls_logits", num_anchors * num_classes),
                                   (head.regression_head, "bbox_reg", num_anchors * 4)):  # fmt: skip
        branch.conv = nn.Sequential(*(Conv2dNormActivation(i, o, norm_layer=None) for i, o in zip(widths, widths[1:])))
        setattr(branch, final, nn.Conv2d(widths[-1], outputs, kernel_size=3, padding=1))
        for conv in branch.modules():
            if isinstance(conv, nn.Conv2d):  # torchvision's init
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)
    nn.init.constant_(head.classification_head.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))
    return head


def mmdet_detections(
    cls_logits: Sequence[Tensor],
    box_deltas: Sequence[Tensor],
    anchors: Sequence[Tensor],
    box_coder: DeltaXYWHCoder,
    image_size: tuple[int, int],
    scale_factor: tuple[float, float] = (1.0, 1.0),
    nms_pre: int = 1000,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    max_per_img: int = 100,
) -> dict[str, Tensor]:
    """One image's detections from per-level (N_l, K) logits, (N_l, 4) deltas and anchors (mmdet 2.11 rule),
    the deltas decoded by ``box_coder`` and clipped to ``image_size``.

    ``scale_factor`` (w, h): input pixels per original pixel; boxes are divided by it before NMS.
    """
    boxes, scores = [], []
    for logits, deltas, level_anchors in zip(cls_logits, box_deltas, anchors):
        probs = logits.sigmoid()  # (N_l, K)
        if torch.compiler.is_exporting() or probs.shape[0] > nms_pre:  # the anchors with the best class
            # (exported: always selected, as mmdet's ONNX export does; the order changes, not the set)
            top = probs.max(dim=1).values.topk(torch.sym_min(nms_pre, probs.shape[0])).indices
            probs, deltas, level_anchors = probs[top], deltas[top], level_anchors[top]
        boxes.append(box_coder.decode_single(deltas, level_anchors, max_shape=image_size))
        scores.append(probs)
    box, score = torch.cat(boxes), torch.cat(scores)
    w_scale, h_scale = (float(np.float32(s)) for s in scale_factor)  # mmdet's float32 scale factor
    box = box / box.new_tensor([w_scale, h_scale, w_scale, h_scale])
    candidate, label = (score > score_thresh).nonzero(as_tuple=True)  # (anchor, class) pairs, anchor-major
    box, score = box[candidate], score[candidate, label]
    keep = batched_nms(box, score, label, nms_thresh)[:max_per_img]
    return {"boxes": box[keep], "scores": score[keep], "labels": label[keep]}


class RAVLTRetinaNet(RetinaNet):
    """RetinaNet on RAVLT: FPN on C3–C5, P6/P7 from C5, focal loss; the authors' inference rules (see module doc).

    Args:
        num_classes: object classes (no background class: RetinaNet's labels are 0-based).
        variant, backbone_overrides, drop_path_rate: the RAVLT backbone (see ``build_backbone``);
            ``drop_path_rate=None`` keeps the variant's published rate.
        fpn_channels: FPN width (256 published; smaller for a CPU demo).
        feat_channels: width of the head's conv towers (mmdet ``feat_channels``; ``None``: the FPN width,
            as published).
        stacked_convs: convs per tower (4 published).
        anchor_scale: multiplies every anchor size (1 published); 0.5 suits images whose objects are
            half the usual size in pixels.
        detections_per_img: detections kept per image (mmdet ``max_per_img=100``).
        kwargs: further arguments of torchvision's ``RetinaNet`` (``score_thresh`` 0.05, ``nms_thresh`` 0.5,
            ``topk_candidates`` = mmdet ``nms_pre`` 1000, ...).
    """

    label_offset = 0
    iou_types = ("bbox",)

    def __init__(
        self,
        num_classes: int,
        variant: str = "ravlt_s",
        backbone_overrides: dict | None = None,
        drop_path_rate: float | None = None,
        fpn_channels: int = 256,
        feat_channels: int | None = None,
        stacked_convs: int = 4,
        anchor_scale: float = 1.0,
        detections_per_img: int = 100,
        **kwargs,
    ) -> None:
        backbone = ravlt_fpn(variant, backbone_overrides, (1, 2, 3), fpn_channels, "p6p7", drop_path_rate)
        anchor_generator = MmdetAnchorGenerator((8, 16, 32, 64, 128), octave_scales(4.0 * anchor_scale, 3))
        num_anchors = anchor_generator.num_anchors_per_location()[0]
        head = retina_head(fpn_channels, num_anchors, num_classes, feat_channels or fpn_channels, stacked_convs)
        super().__init__(
            backbone, num_classes, anchor_generator=anchor_generator, head=head, detections_per_img=detections_per_img,
            # torchvision's transform arguments, named so that they are no config arguments; replaced below
            min_size=0, max_size=0, image_mean=None, image_std=None, size_divisible=32, fixed_size=None,
            **kwargs,
        )  # fmt: skip
        self.box_coder = DeltaXYWHCoder()  # torchvision's encoding (weights 1) for the loss, mmdet's decoding
        self.transform = PresizedTransform()
        self.variant = variant

    def postprocess_detections(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """The authors' rule at the input scale (the task maps the boxes to the original images)."""
        logits, deltas = head_outputs["cls_logits"], head_outputs["bbox_regression"]
        return [
            self.detect_image([c[i] for c in logits], [r[i] for r in deltas], anchors[i], image_shapes[i])
            for i in range(len(image_shapes))
        ]

    def detect_image(self, logits, deltas, anchors, image_size, scale_factor=(1.0, 1.0)) -> dict[str, Tensor]:
        """One image's detections from its per-level head outputs (the authors' rule, this model's thresholds)."""
        return mmdet_detections(logits, deltas, anchors, self.box_coder, image_size, scale_factor, self.topk_candidates,
                                self.score_thresh, self.nms_thresh, self.detections_per_img)  # fmt: skip

    def head_outputs(self, batch: Tensor) -> tuple[list[Tensor], dict[str, list[Tensor]], list[Tensor]]:
        """FPN maps P3..P7, per-level head outputs ``cls_logits`` (B, H·W·A, K) / ``bbox_regression`` (B, H·W·A, 4),
        and per-level anchors (H·W·A, 4) for a normalised, padded batch (B, 3, H, W)."""
        features = list(self.backbone(batch).values())
        outputs = self.head(features)
        counts = [f.shape[-2] * f.shape[-1] * self.anchor_generator.num_anchors_per_location()[0] for f in features]
        split = {k: list(v.split(counts, dim=1)) for k, v in outputs.items()}
        anchors = self.anchor_generator.level_anchors([tuple(f.shape[-2:]) for f in features], batch.device)
        return features, split, anchors

    @torch.no_grad()
    def predict_preprocessed(
        self, batch: Tensor, image_sizes: Sequence[tuple[int, int]], original_sizes: Sequence[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Detections for a batch prepared as the authors' pipeline does (resized, normalised, zero-padded).

        ``image_sizes``: each image's (h, w) after the resize (its valid top-left region of ``batch``);
        ``original_sizes``: (H, W) before it. Boxes (xyxy) come back in original pixels, ``labels`` 0-based.
        """
        if batch.ndim != 4 or len(image_sizes) != len(batch) or len(original_sizes) != len(batch):
            raise ValueError(f"predict_preprocessed: a batch {tuple(batch.shape)} needs one image size and one "
                             f"original size per image, got {len(image_sizes)} and {len(original_sizes)}")  # fmt: skip
        _, outputs, anchors = self.head_outputs(batch)
        detections = []
        for i, ((h, w), (height, width)) in enumerate(zip(image_sizes, original_sizes)):
            scale = (w / width, h / height)
            logits, deltas = [c[i] for c in outputs["cls_logits"]], [r[i] for r in outputs["bbox_regression"]]
            detections.append(self.detect_image(logits, deltas, anchors, (h, w), scale))
        return detections
