"""Whole detectors as one traceable forward, for ``torch.export`` / ONNX (:mod:`ravlt_pl.export`).

Normalised images (B, 3, H, W), zero-padded to ×32 → per image the first ``detections_per_img``
detections by the authors' rules, zero-padded to that count so that the output shapes are fixed:
boxes (B, N, 4) xyxy in input pixels (clipped to the input), scores (B, N), labels (B, N) 0-based,
−1 where none; a mask detector adds each detection's mask probabilities (B, N, 28, 28) in its box,
which the caller pastes (:func:`.rcnn_rules.paste_masks`): mmdet's paste crops each box by
data-dependent pixel bounds, which a traced graph cannot hold.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from .detectors import RAVLTTwoStage
from .retinanet import RAVLTRetinaNet


def padded(values: Tensor, count: int, fill: float = 0) -> Tensor:
    """The first ``count`` rows of ``values``, ``fill`` rows after them: a fixed size whatever the (data-dependent)
    number found (padded by concatenation, then cut: no data-dependent shape reaches the output)."""
    return torch.cat([values, values.new_full((count, *values.shape[1:]), fill)])[:count]


class WholeRetinaNet(nn.Module):
    """A RetinaNet's whole inference: backbone, FPN, head, anchors, box decoding, candidate selection, NMS."""

    def __init__(self, detector: RAVLTRetinaNet) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _, outputs, anchors = self.detector.head_outputs(images)
        size, count = (images.shape[-2], images.shape[-1]), self.detector.detections_per_img
        boxes, scores, labels = [], [], []
        for i in range(images.shape[0]):
            det = self.detector.detect_image([c[i] for c in outputs["cls_logits"]],
                                             [r[i] for r in outputs["bbox_regression"]], anchors, size)  # fmt: skip
            boxes.append(padded(det["boxes"], count))
            scores.append(padded(det["scores"], count))
            labels.append(padded(det["labels"], count, -1))
        return torch.stack(boxes), torch.stack(scores), torch.stack(labels)


class WholeTwoStage(nn.Module):
    """A Faster / Mask R-CNN's whole inference: backbone, FPN, RPN (anchors, decoding, per-level top-k, NMS),
    RoIAlign, box head, decoding, class-wise NMS[, mask head on the detections]."""

    def __init__(self, detector: RAVLTTwoStage) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        detector, count = self.detector, self.detector.roi_heads.detections_per_img
        sizes = [(images.shape[-2], images.shape[-1])] * images.shape[0]
        features = detector.backbone(images)
        proposals, _ = detector.rpn(ImageList(images, sizes), features)
        factors = [images.new_ones(4)] * images.shape[0]  # boxes stay in input pixels
        results = detector.box_detections(features, proposals, sizes, factors)
        outputs = [
            torch.stack([padded(r["boxes"], count) for r in results]),
            torch.stack([padded(r["scores"], count) for r in results]),
            torch.stack([padded(r["labels"], count, -1) for r in results]),
        ]
        if detector.roi_heads.has_mask():
            probs = detector.mask_probabilities(features, results, sizes, factors)
            per_image = probs.split([r["boxes"].shape[0] for r in results])
            outputs.append(torch.stack([padded(p, count) for p in per_image]))
        return tuple(outputs)
