"""The authors' (mmdet 2.11) R-CNN rules where torchvision's differ: anchors, box coding, RPN, RoIAlign, NMS, masks.

Each piece keeps torchvision's interface so that it drops into torchvision's RPN / RoI heads (training
included), and the inference helpers give exactly the authors' detections:

- :class:`MmdetAnchorGenerator`: base anchors not rounded, the configs' fixed strides (torchvision
  rounds them and infers strides by integer division, which is wrong for P6 of a 96-px-high input);
- :class:`DeltaXYWHCoder`: mmdet's ``DeltaXYWHBBoxCoder`` (stds, dw/dh clamped on both sides);
- :class:`MmdetRPN`: torchvision's RPN without its small-box filter (mmdet ``min_bbox_size=0``), mmcv's NMS;
- :class:`MmdetRoIAlign`: mmdet's ``SingleRoIExtractor`` (level from ``sqrt(wh)/56``, ``aligned=True``,
  adaptive sampling), which ``MultiScaleRoIAlign`` cannot express;
- :func:`batched_nms`: mmcv's (coordinate offsets below 10000 boxes, one class at a time above);
- :func:`class_detections` and :func:`paste_masks`: mmdet's ``multiclass_nms`` on boxes at the original
  scale and its ``grid_sample`` mask paste, one detection at a time (memory: bool masks only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops
from torchvision.ops import nms, roi_align

#: mmdet ``wh_ratio_clip=16/1000``: |dw|, |dh| ≤ log(1000/16)
DELTA_CLIP = abs(math.log(16 / 1000))
#: mmcv ``batched_nms`` switches to one class at a time from this many boxes
NMS_SPLIT = 10000


class MmdetAnchorGenerator(AnchorGenerator):
    """mmdet's ``AnchorGenerator``: size = stride × scale, ratio-major order, float corners, fixed strides.

    Anchor ``a = r·len(scales) + s`` of cell (iy, ix) is ``base[a] + (ix, iy, ix, iy)·stride``; the
    anchors are float32 whatever the features' dtype.
    """

    def __init__(self, strides: Sequence[int] = (4, 8, 16, 32, 64), scales: Sequence[float] = (8.0,),
                 ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> None:  # fmt: skip
        super().__init__(tuple(tuple(s * k for k in scales) for s in strides), (tuple(ratios),) * len(strides))
        self.strides = tuple(strides)
        self.cell_anchors = [self.base_anchors(s, scales, ratios) for s in strides]

    @staticmethod
    def base_anchors(stride: int, scales: Sequence[float], ratios: Sequence[float]) -> Tensor:
        """(len(ratios)·len(scales), 4) corners centred on (0, 0), ``h = size·√r``, ``w = size/√r``."""
        h_ratios = torch.sqrt(torch.tensor(ratios, dtype=torch.float32))
        w_ratios = 1 / h_ratios
        scale = torch.tensor(scales, dtype=torch.float32)
        ws = (stride * w_ratios[:, None] * scale[None, :]).view(-1)
        hs = (stride * h_ratios[:, None] * scale[None, :]).view(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        levels = []
        for fmap, stride, base in zip(feature_maps, self.strides, self.cell_anchors):
            height, width = fmap.shape[-2:]
            ys, xs = torch.meshgrid(torch.arange(height, device=fmap.device) * stride,
                                    torch.arange(width, device=fmap.device) * stride, indexing="ij")  # fmt: skip
            shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4).float()
            levels.append((base.to(fmap.device)[None] + shifts).reshape(-1, 4))  # (h·w·A, 4), order (y, x, a)
        anchors = torch.cat(levels)
        return [anchors for _ in image_list.image_sizes]


class DeltaXYWHCoder(BoxCoder):
    """mmdet's ``DeltaXYWHBBoxCoder`` (means 0) behind torchvision's ``BoxCoder`` interface.

    Encoding is torchvision's with weights ``1/stds``; decoding is mmdet's: ``d = raw · stds``, dw/dh
    clamped to ±log(1000/16), centre ``(x1 + x2)/2``.
    """

    def __init__(self, stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> None:
        super().__init__(tuple(1.0 / s for s in stds), bbox_xform_clip=DELTA_CLIP)
        self.stds = tuple(float(s) for s in stds)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        boxes = boxes.to(rel_codes.dtype)
        deltas = rel_codes * rel_codes.new_tensor(self.stds).repeat(rel_codes.shape[-1] // 4)
        dx, dy = deltas[:, 0::4], deltas[:, 1::4]
        dw, dh = deltas[:, 2::4].clamp(-DELTA_CLIP, DELTA_CLIP), deltas[:, 3::4].clamp(-DELTA_CLIP, DELTA_CLIP)
        px, py = ((boxes[:, 0] + boxes[:, 2]) * 0.5)[:, None], ((boxes[:, 1] + boxes[:, 3]) * 0.5)[:, None]
        pw, ph = (boxes[:, 2] - boxes[:, 0])[:, None], (boxes[:, 3] - boxes[:, 1])[:, None]
        gw, gh = pw * dw.exp(), ph * dh.exp()
        gx, gy = px + pw * dx, py + ph * dy
        return torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=2).flatten(1)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """mmcv 1.x ``batched_nms``: indices kept, by descending score, NMS separately per ``idxs`` value.

    Boxes of different classes are shifted apart by more than the largest coordinate (coordinates are
    clipped to >= 0), so one NMS call gives per-class NMS; from :data:`NMS_SPLIT` candidates on, mmcv
    runs one call per class on the same shifted boxes instead, and so does this function, except while
    being exported. Written out because torchvision's ``batched_nms`` switches strategy at another size
    (4000 coordinates on CPU) and its offsets round IoUs differently.
    """
    largest = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()  # an empty input too (exported graphs)
    offset_boxes = boxes + (idxs.to(boxes) * (largest + 1))[:, None]
    if torch.compiler.is_exporting() or len(boxes) < NMS_SPLIT:
        return nms(offset_boxes, scores, iou_threshold)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for value in torch.unique(idxs):
        members = (idxs == value).nonzero().view(-1)
        kept[members[nms(offset_boxes[members], scores[members], iou_threshold)]] = True
    keep = kept.nonzero().view(-1)
    return keep[scores[keep].sort(descending=True).indices]


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
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(0, len(feats) - 1).long()
        size = (self.output_size, self.output_size)
        out = feats[0].new_zeros(len(rois), feats[0].shape[1], *size)
        for i, (feat, stride) in enumerate(zip(feats, self.strides)):
            members = torch.where(levels == i)[0]
            if len(members):
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
    labels = torch.arange(num_classes, device=probs.device).expand(len(probs), num_classes).reshape(-1)
    keep = torch.where(scores > score_thresh)[0]
    boxes, scores, labels = boxes.reshape(-1, 4)[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def add_masks(results: list[dict[str, Tensor]], features: dict[str, Tensor], pool: nn.Module,
              heads: Sequence[tuple[nn.Module, nn.Module]], image_sizes, factors: list[Tensor],
              original_sizes, threshold: float = 0.5) -> None:  # fmt: skip
    """Each detection's mask as mmdet computes it, into ``results[i]["masks"]`` ((N, H, W) bool, original size).

    The boxes go back to input scale (``boxes · scale_factor``) for the 14×14 RoIAlign; each
    ``(mask_head, mask_predictor)`` pair gives (N, K+1, 28, 28) logits (background first); the
    sigmoid maps of the detection's class are averaged over the heads (cascade: 3) and pasted.
    """
    boxes = [r["boxes"] * f for r, f in zip(results, factors)]
    counts = [len(b) for b in boxes]
    if sum(counts):
        feats = pool(features, boxes, image_sizes)
        labels = torch.cat([r["labels"] for r in results]) + 1
        rows = torch.arange(len(labels), device=labels.device)
        probs = sum(torch.sigmoid(predictor(head(feats))[rows, labels]) for head, predictor in heads) / len(heads)
    else:
        probs = features[pool.featmap_names[0]].new_zeros(0, 28, 28)
    for r, p, b, f, size in zip(results, probs.split(counts), boxes, factors, original_sizes):
        r["masks"] = paste_masks(p, b / f, size, threshold)


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
