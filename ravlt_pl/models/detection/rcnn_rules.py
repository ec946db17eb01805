"""The authors' (mmdet 2.11) R-CNN rules where torchvision's differ: RPN, RoI heads' loss, RoIAlign, masks.

Anchors, box coding and NMS, which RetinaNet shares, are in :mod:`.mmdet_boxes`. Each piece keeps
torchvision's interface so that it drops into torchvision's RPN / RoI heads (training included), and
the inference helpers give exactly the authors' detections:

- :class:`MmdetRPN`: torchvision's RPN without its small-box filter (mmdet ``min_bbox_size=0``), mmcv's NMS;
- :class:`MmdetRoIAlign`: mmdet's ``SingleRoIExtractor`` (level from ``sqrt(wh)/56``, ``aligned=True``,
  adaptive sampling), which ``MultiScaleRoIAlign`` cannot express;
- :func:`class_detections` and :func:`paste_masks`: mmdet's ``multiclass_nms`` on boxes at the original
  scale and its ``grid_sample`` mask paste, one detection at a time (memory: bool masks only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

from .mmdet_boxes import DeltaXYWHCoder, batched_nms


class MmdetRPN(RegionProposalNetwork):
    """torchvision's RPN choosing proposals as mmdet: per-level top-k, no small-box filter, mmcv's NMS per level.

    Same arguments as ``RegionProposalNetwork``; boxes are coded with :class:`DeltaXYWHCoder` (stds 1).
    ``l1_box_loss``: L1 on the positives' deltas (the authors' Mask R-CNN) instead of torchvision's
    smooth-L1 (β 1/9: the authors' Cascade), both summed over the sampled anchors' count.
    """

    def __init__(self, *args, l1_box_loss: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.box_coder = DeltaXYWHCoder()
        self.l1_box_loss = l1_box_loss

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        if not self.l1_box_loss:
            return super().compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
        positive, negative = (torch.where(torch.cat(m))[0] for m in self.fg_bg_sampler(labels))
        sampled = torch.cat([positive, negative])
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        box_loss = F.l1_loss(pred_bbox_deltas[positive], regression_targets[positive], reduction="sum")
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss / sampled.numel()

    @classmethod
    def like(cls, rpn: RegionProposalNetwork, anchor_generator: AnchorGenerator, **kwargs) -> MmdetRPN:
        """An ``MmdetRPN`` with ``rpn``'s head and settings and ``anchor_generator``."""
        return cls(
            anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold,
            rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction,
            dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n), rpn.nms_thresh, rpn.score_thresh, **kwargs,
        )  # fmt: skip

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=proposals.device)
                            for i, n in enumerate(num_anchors_per_level)]).expand_as(objectness)  # fmt: skip
        top = self._get_top_n_idx(objectness, num_anchors_per_level)  # (B, k) per-level best logits
        rows = torch.arange(num_images, device=proposals.device)[:, None]
        scores, levels, proposals = torch.sigmoid(objectness[rows, top]), levels[rows, top], proposals[rows, top]
        final_boxes, final_scores = [], []
        for boxes, score, level, shape in zip(proposals, scores, levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            keep = batched_nms(boxes, score, level, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(score[keep])
        return final_boxes, final_scores


class L1RoIHeads(RoIHeads):
    """torchvision's RoI heads trained with the authors' Mask R-CNN box loss: L1 on the positives' deltas of
    their class, summed over the sampled RoIs' count (torchvision: smooth-L1, β 1/9). Inference unchanged."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets are required in training mode")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        logits, deltas = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals, image_shapes)))
        positives = [torch.where(lab > 0)[0] for lab in labels]
        flat_labels, targets_ = torch.cat(labels), torch.cat(regression_targets)
        positive = torch.where(flat_labels > 0)[0]
        picked = deltas.reshape(len(deltas), -1, 4)[positive, flat_labels[positive]]
        box_loss = F.l1_loss(picked, targets_[positive], reduction="sum") / flat_labels.numel()
        losses = {"loss_classifier": F.cross_entropy(logits, flat_labels), "loss_box_reg": box_loss}
        if self.has_mask():
            rois = [p[k] for p, k in zip(proposals, positives)]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, rois, image_shapes)))
            losses["loss_mask"] = maskrcnn_loss(mask_logits, rois, [t["masks"] for t in targets],
                                                [t["labels"] for t in targets],
                                                [m[k] for m, k in zip(matched_idxs, positives)])  # fmt: skip
        return [], losses


class MmdetRoIAlign(nn.Module):
    """mmdet's ``SingleRoIExtractor`` with mmcv's ``RoIAlign`` defaults; ``MultiScaleRoIAlign``'s call contract.

    Level of a box = ``clamp(floor(log2(sqrt(w·h)/56 + 1e-6)), 0, L−1)``; each level pooled with
    ``roi_align(aligned=True, sampling_ratio=0, spatial_scale=1/stride)``.
    """

    def __init__(self, featmap_names: Sequence[str] = ("0", "1", "2", "3"), output_size: int = 7,
                 strides: Sequence[int] = (4, 8, 16, 32), finest_scale: int = 56) -> None:  # fmt: skip
        super().__init__()
        self.featmap_names, self.strides = list(featmap_names), list(strides)
        self.output_size, self.finest_scale = output_size, finest_scale

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes=None) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)])
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(0, len(feats) - 1).long()
        size = (self.output_size, self.output_size)
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], *size)
        for i, (feat, stride) in enumerate(zip(feats, self.strides)):
            members = torch.where(levels == i)[0]
            if torch.compiler.is_exporting() or len(members):  # exported: no data-dependent branch
                pooled = roi_align(feat, rois[members].to(feat.dtype), size, 1.0 / stride, 0, True)
                out[members] = pooled.to(out.dtype)
        return out  # (N, C, s, s)


def scale_factor(image_size: Sequence[int], original_size: Sequence[int], device=None) -> Tensor:
    """mmdet's ``scale_factor`` (w/W, h/H, w/W, h/H) as float32: resized size over original size."""
    (h, w), (height, width) = image_size, original_size
    return torch.tensor([w / width, h / height] * 2, dtype=torch.float32, device=device)


def class_detections(probs: Tensor, boxes: Tensor, image_size: Sequence[int], factor: Tensor,
                     score_thresh: float, nms_thresh: float, max_per_img: int) -> dict[str, Tensor]:  # fmt: skip
    """mmdet's ``get_bboxes`` + ``multiclass_nms`` for one image, background in column 0 (torchvision's layout).

    ``probs`` (N, K+1) softmax scores, ``boxes`` (N, K+1, 4) decoded at input scale: clipped to the
    image, divided by the scale factor **before** NMS; every (RoI, class) pair scoring > thr is a
    candidate; NMS per class; the first ``max_per_img``. Labels 0-based, boxes at the original scale.
    """
    num_classes = probs.shape[1] - 1
    boxes = box_ops.clip_boxes_to_image(boxes[:, 1:], tuple(image_size)) / factor
    scores = probs[:, 1:].reshape(-1)
    labels = torch.arange(num_classes, device=probs.device).expand(probs.shape[0], num_classes).reshape(-1)
    keep = torch.where(scores > score_thresh)[0]
    boxes, scores, labels = boxes.reshape(-1, 4)[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def mask_probabilities(results: list[dict[str, Tensor]], features: dict[str, Tensor], pool: nn.Module,
                       heads: Sequence[tuple[nn.Module, nn.Module]], image_sizes, factors: list[Tensor]) -> Tensor:  # fmt: skip
    """(N, 28, 28) mask probabilities of the detections in ``results`` (all images, in order), as mmdet computes them.

    The boxes go back to input scale (``boxes · scale_factor``) for the 14×14 RoIAlign; each
    ``(mask_head, mask_predictor)`` pair gives (N, K+1, 28, 28) logits (background first); the
    sigmoid maps of the detection's class are averaged over the heads (cascade: 3).
    """
    boxes = [r["boxes"] * f for r, f in zip(results, factors)]
    if not torch.compiler.is_exporting() and not sum(len(b) for b in boxes):
        return features[pool.featmap_names[0]].new_zeros(0, 28, 28)
    feats = pool(features, boxes, image_sizes)
    labels = torch.cat([r["labels"] for r in results]) + 1
    rows = torch.arange(labels.shape[0], device=labels.device)
    return sum(torch.sigmoid(predictor(head(feats))[rows, labels]) for head, predictor in heads) / len(heads)


def paste_masks_into(results: list[dict[str, Tensor]], probs: Tensor, factors: list[Tensor], original_sizes,
                     threshold: float = 0.5) -> None:  # fmt: skip
    """Each detection's mask, pasted (:func:`paste_masks`), into ``results[i]["masks"]`` ((N, H, W) bool, original size)."""
    for r, p, f, size in zip(results, probs.split([len(r["boxes"]) for r in results]), factors, original_sizes):
        r["masks"] = paste_masks(p, r["boxes"] * f / f, size, threshold)  # mmdet's rounding: rescaled there and back


def paste_masks(probs: Tensor, boxes: Tensor, size: Sequence[int], threshold: float = 0.5) -> Tensor:
    """mmdet's mask paste: (N, 28, 28) probabilities in ``boxes`` (original pixels) → (N, H, W) bool.

    Each pixel centre is sampled with ``grid_sample`` (bilinear, zero padding) at its position in the
    float box and thresholded ``>= threshold``; one detection at a time, inside the box ±1 px (outside
    it a sample is below half the map's border value), so memory is the boolean masks alone.
    """
    height, width = size
    out = torch.zeros(len(probs), height, width, dtype=torch.bool, device=probs.device)
    for i, (prob, box) in enumerate(zip(probs, boxes)):
        x0, y0 = (box[:2].floor() - 1).clamp(min=0).int().tolist()
        x1, y1 = int(box[2].ceil().clamp(max=width - 1) + 1), int(box[3].ceil().clamp(max=height - 1) + 1)
        xs = torch.arange(x0, x1, device=probs.device, dtype=torch.float32) + 0.5
        ys = torch.arange(y0, y1, device=probs.device, dtype=torch.float32) + 0.5
        xs, ys = (xs - box[0]) / (box[2] - box[0]) * 2 - 1, (ys - box[1]) / (box[3] - box[1]) * 2 - 1
        xs, ys = torch.where(xs.isinf(), 0.0, xs), torch.where(ys.isinf(), 0.0, ys)  # mmdet: a zero-width box
        grid = torch.stack([xs[None, :].expand(len(ys), -1), ys[:, None].expand(-1, len(xs))], dim=-1)
        sampled = F.grid_sample(prob[None, None].float(), grid[None], align_corners=False)[0, 0]
        out[i, y0:y1, x0:x1] = sampled >= threshold
    return out
