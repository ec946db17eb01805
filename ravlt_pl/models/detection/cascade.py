"""Cascade Mask R-CNN (Cai & Vasconcelos, CVPR 2018) from torchvision's R-CNN parts.

torchvision ships Faster/Mask R-CNN but no cascade. This module adds only what is missing: a chain
of box stages, each trained on the refined boxes of the one before it with a stricter IoU threshold.
Every stage is a torchvision :class:`~torchvision.models.detection.roi_heads.RoIHeads`, so matching
(``Matcher``), sampling (``BalancedPositiveNegativeSampler``), box coding (``BoxCoder``), RoIAlign
(mmdet's, :class:`.rcnn_rules.MmdetRoIAlign`), the mask head and the mask loss/inference are torchvision's own code.

The published RAVLT configs (mmdet ``cascade_mask_rcnn`` 3x, Swin-style) fix the shape:

- 3 stages with IoU thresholds .5/.6/.7 and loss weights 1/.5/.25;
- per stage a box head "4 conv (3×3, BatchNorm, ReLU) + 1 fc (1024)" with box-coder weights
  (10,10,5,5), (20,20,10,10), (30,30,15,15) (mmdet stds .1/.2, .05/.1, .033/.067). Regression is
  per class (``reg_class_agnostic=False``) in the published config — that is what gives the
  published 82/105/152 M parameters; ``class_agnostic=True`` gives one box per RoI (~1 M fewer);
- GIoU box loss on the decoded boxes, weight 10, averaged over the sampled RoIs;
- a mask head per stage; at test time the stages' class probabilities are averaged and the boxes
  come from the last stage, and the stages' mask probabilities are averaged too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

from .mmdet_boxes import DeltaXYWHCoder, MmdetAnchorGenerator
from .rcnn_rules import (
    MmdetRoIAlign,
    MmdetRPN,
    class_detections,
    mask_probabilities,
    paste_masks_into,
    scale_factor,
)

STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
#: mmdet's ``target_stds`` per stage (torchvision weights 1/std: 10/5, 20/10, 30.3/14.9)
STAGE_BOX_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


class CascadeBoxPredictor(FastRCNNPredictor):
    """torchvision's class logits (background first) and box deltas: per class, or one box per RoI."""

    def __init__(self, in_channels: int, num_classes: int, class_agnostic: bool = False) -> None:
        super().__init__(in_channels, num_classes)
        if class_agnostic:
            self.bbox_pred = nn.Linear(in_channels, 4)


def conv_fc_box_head(
    in_channels: int = 256,
    resolution: int = 7,
    conv_channels: int = 256,
    num_convs: int = 4,
    representation_size: int = 1024,
) -> FastRCNNConvFCHead:
    """The published "4 conv with BN + 1 fc" box head (torchvision's ``FastRCNNConvFCHead``)."""
    return FastRCNNConvFCHead((in_channels, resolution, resolution), [conv_channels] * num_convs,
                              [representation_size], norm_layer=nn.BatchNorm2d)  # fmt: skip


class CascadeRoIHeads(nn.Module):
    """A cascade of torchvision ``RoIHeads`` stages sharing one box RoIAlign and one mask RoIAlign.

    Same call contract as ``RoIHeads``: ``forward(features, proposals, image_shapes, targets)``
    returns ``(detections, losses)`` — losses named ``loss_{classifier,box_giou,mask}_s{stage}``
    and already multiplied by the stage weights.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_heads: Sequence[nn.Module],
        box_predictors: Sequence[nn.Module],
        mask_roi_pool: nn.Module | None = None,
        mask_heads: Sequence[nn.Module] | None = None,
        mask_predictors: Sequence[nn.Module] | None = None,
        iou_thresholds: Sequence[float] = STAGE_IOUS,
        stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
        bbox_reg_stds: Sequence[Sequence[float]] = STAGE_BOX_STDS,
        box_loss_weight: float = 10.0,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__()
        n = len(box_heads)
        per_stage = [box_predictors, iou_thresholds, stage_loss_weights, bbox_reg_stds]
        per_stage += [mask_heads, mask_predictors] if mask_roi_pool is not None else []
        if any(len(v) != n for v in per_stage):
            raise ValueError(f"every per-stage argument needs {n} entries (one per box head)")
        self.stages = nn.ModuleList(
            RoIHeads(
                box_roi_pool, box_heads[i], box_predictors[i],
                fg_iou_thresh=iou_thresholds[i], bg_iou_thresh=iou_thresholds[i],  # no ignore band, as mmdet
                batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction,
                bbox_reg_weights=None, score_thresh=score_thresh, nms_thresh=nms_thresh,
                detections_per_img=detections_per_img, mask_roi_pool=mask_roi_pool,
                mask_head=mask_heads[i] if mask_roi_pool is not None else None,
                mask_predictor=mask_predictors[i] if mask_roi_pool is not None else None,
            )
            for i in range(n)
        )  # fmt: skip
        for stage, stds in zip(self.stages, bbox_reg_stds):
            stage.box_coder = DeltaXYWHCoder(stds)
        self.stage_loss_weights = list(stage_loss_weights)
        self.box_loss_weight = box_loss_weight
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    def has_mask(self) -> bool:
        return self.stages[0].has_mask()

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    # -- shared ------------------------------------------------------------------------------------
    @staticmethod
    def box_forward(stage: RoIHeads, features, proposals: list[Tensor], image_shapes) -> tuple[Tensor, Tensor]:
        """Class logits (N, K + 1) and decoded boxes (N, K + 1, 4), or (N, 1, 4) when class-agnostic."""
        x = stage.box_head(stage.box_roi_pool(features, proposals, image_shapes))
        logits, deltas = stage.box_predictor(x)
        return logits, stage.box_coder.decode(deltas, proposals)

    @staticmethod
    def pick(boxes: Tensor, labels: Tensor) -> Tensor:
        """(N, C, 4) → (N, 4): each RoI's box for ``labels`` (its only box when class-agnostic)."""
        if boxes.shape[1] == 1:
            return boxes[:, 0]
        return boxes[torch.arange(len(boxes), device=boxes.device), labels]

    @staticmethod
    def mask_forward(stage: RoIHeads, mask_features: Tensor) -> Tensor:
        return stage.mask_predictor(stage.mask_head(mask_features))  # (N, K + 1, 28, 28) logits

    @staticmethod
    def refine(boxes: Tensor, counts: list[int], image_shapes, drop_empty: bool) -> list[Tensor]:
        """One stage's boxes as the next stage's proposals: clipped to the image, split per image."""
        out = []
        for b, shape in zip(boxes.split(counts), image_shapes):
            b = box_ops.clip_boxes_to_image(b, shape)
            out.append(b[box_ops.remove_small_boxes(b, 1e-2)] if drop_empty else b)
        return out

    # -- training ----------------------------------------------------------------------------------
    def losses(self, features, proposals, image_shapes, targets) -> dict[str, Tensor]:
        if targets is None:
            raise ValueError("targets are required in training mode")
        losses = {}
        for i, (stage, weight) in enumerate(zip(self.stages, self.stage_loss_weights)):
            # torchvision adds the ground truth to the proposals, matches at this stage's IoU and samples.
            proposals, matched_idxs, labels, _ = stage.select_training_samples(proposals, targets)
            logits, boxes = self.box_forward(stage, features, proposals, image_shapes)
            gt = torch.cat([t["boxes"][m[lab > 0]] for t, m, lab in zip(targets, matched_idxs, labels)])
            labels = torch.cat(labels)
            positive = labels > 0
            losses[f"loss_classifier_s{i}"] = weight * F.cross_entropy(logits, labels)
            losses[f"loss_box_giou_s{i}"] = weight * self.giou_loss(self.pick(boxes, labels)[positive], gt, len(labels))
            if stage.has_mask():
                losses[f"loss_mask_s{i}"] = weight * self.mask_loss(
                    stage, features, proposals, image_shapes, labels, matched_idxs, targets
                )
            if i + 1 < len(self.stages):
                # the next stage trains on these boxes (no gradient through them); background RoIs
                # follow their most likely object class, as mmdet does
                guess = logits[:, 1:].argmax(1) + 1
                refined = self.pick(boxes, torch.where(positive, labels, guess)).detach()
                proposals = self.refine(refined, [len(p) for p in proposals], image_shapes, drop_empty=True)
        return losses

    def giou_loss(self, boxes: Tensor, gt: Tensor, num_sampled: int) -> Tensor:
        """GIoU loss of the positives' decoded boxes, summed and divided by the sampled RoIs' count."""
        loss = generalized_box_iou_loss(boxes, gt.to(boxes.dtype), reduction="sum")
        return self.box_loss_weight * loss / max(num_sampled, 1)

    def mask_loss(self, stage, features, proposals, image_shapes, labels, matched_idxs, targets) -> Tensor:
        positives = [torch.where(lab > 0)[0] for lab in labels.split([len(p) for p in proposals])]
        rois = [p[k] for p, k in zip(proposals, positives)]
        logits = self.mask_forward(stage, stage.mask_roi_pool(features, rois, image_shapes))
        return maskrcnn_loss(
            logits, rois, [t["masks"] for t in targets], [t["labels"] for t in targets],
            [m[k] for m, k in zip(matched_idxs, positives)],
        )  # fmt: skip

    # -- inference ---------------------------------------------------------------------------------
    def box_stages(self, features, proposals, image_shapes) -> tuple[Tensor, Tensor]:
        """mmdet's cascade test: the stages' mean raw logits (N, K+1) and the last stage's boxes (N, K+1, 4).

        Each stage runs on the previous stage's boxes regressed with the deltas of its arg-max
        foreground class, clipped to the image (one-to-one with the RoIs: nothing dropped).
        """
        counts = [len(p) for p in proposals]
        stage_logits = []
        for i, stage in enumerate(self.stages):
            logits, boxes = self.box_forward(stage, features, proposals, image_shapes)
            stage_logits.append(logits)
            if i + 1 < len(self.stages):
                refined = self.pick(boxes, logits[:, 1:].argmax(1) + 1)
                proposals = self.refine(refined, counts, image_shapes, drop_empty=False)
        return sum(stage_logits) / float(len(stage_logits)), boxes

    def predict(self, features, proposals, image_sizes, original_sizes) -> list[dict[str, Tensor]]:
        """Detections at the original sizes by the authors' rules (:func:`.rcnn_rules.class_detections`,
        masks averaged over the stages' heads and pasted by :func:`.rcnn_rules.paste_masks_into`)."""
        logits, boxes = self.box_stages(features, proposals, image_sizes)
        factors = [scale_factor(s, o, logits.device) for s, o in zip(image_sizes, original_sizes)]
        counts = [len(p) for p in proposals]
        results = [
            class_detections(F.softmax(lg, -1), b, s, f, self.score_thresh, self.nms_thresh, self.detections_per_img)
            for lg, b, s, f in zip(logits.split(counts), boxes.split(counts), image_sizes, factors)
        ]
        if self.has_mask():
            heads = [(s.mask_head, s.mask_predictor) for s in self.stages]
            probs = mask_probabilities(results, features, self.stages[0].mask_roi_pool, heads, image_sizes, factors)
            paste_masks_into(results, probs, factors, original_sizes)
        return results

    def detect(self, features, proposals, image_shapes) -> list[dict[str, Tensor]]:
        """torchvision-style detections at input scale (``forward`` in eval mode); the task uses :meth:`predict`."""
        counts = [len(p) for p in proposals]
        logits, boxes = self.box_stages(features, proposals, image_shapes)
        probs = F.softmax(logits, -1)
        results = [
            self.postprocess(p, b, shape) for p, b, shape in zip(probs.split(counts), boxes.split(counts), image_shapes)
        ]
        if self.has_mask():
            mask_features = self.stages[0].mask_roi_pool(features, [r["boxes"] for r in results], image_shapes)
            labels = [r["labels"] for r in results]
            per_stage = [maskrcnn_inference(self.mask_forward(s, mask_features), labels) for s in self.stages]
            for j, r in enumerate(results):
                r["masks"] = torch.stack([masks[j] for masks in per_stage]).mean(0)  # (n, 1, 28, 28)
        return results

    def postprocess(self, probs: Tensor, boxes: Tensor, image_shape: tuple[int, int]) -> dict[str, Tensor]:
        """Per-class score threshold, NMS and top-k for one image (``probs`` (N, K + 1), ``boxes`` (N, C, 4)).

        Written out rather than reusing ``RoIHeads.postprocess_detections``, which takes one stage's
        logits and deltas; here the scores are the stages' averaged probabilities.
        """
        num_classes = probs.shape[1]
        boxes = box_ops.clip_boxes_to_image(boxes.expand(-1, num_classes, 4), image_shape)
        labels = torch.arange(num_classes, device=probs.device).expand_as(probs)
        # every (RoI, object class) pair is a candidate; the background column is dropped
        boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), probs[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


class CascadeMaskRCNN(GeneralizedRCNN):
    """Cascade Mask R-CNN: torchvision's RPN (same defaults as its Mask R-CNN) + :class:`CascadeRoIHeads`.

    Args:
        backbone: module with ``out_channels`` returning FPN maps ``"0"``–``"3"`` and ``"pool"``.
        num_classes: classes including the background (label 0), as in torchvision.
        transform: image normalisation/batching (and resizing, for torchvision's own transform).
        representation_size: width of each stage's fc layer (1024 published).
        mask_channels: width of each stage's 4-conv mask head (256 published).
        box_conv_channels: width of each stage's 4 box-head convs (256 published).
        class_agnostic: one regressed box per RoI instead of one per class (published: per class).
        anchor_generator: RPN anchors (torchvision's Faster/Mask R-CNN default when ``None``).
        The remaining arguments are torchvision's ``MaskRCNN`` arguments of the same names.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        transform: GeneralizedRCNNTransform,
        representation_size: int = 1024,
        mask_channels: int = 256,
        box_conv_channels: int = 256,
        class_agnostic: bool = False,
        anchor_generator: AnchorGenerator | None = None,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_batch_size_per_image: int = 256,
        box_batch_size_per_image: int = 512,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        num_stages: int = 3,
    ) -> None:
        channels = backbone.out_channels
        anchors = anchor_generator or MmdetAnchorGenerator()
        rpn = MmdetRPN(
            anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=rpn_batch_size_per_image, positive_fraction=0.5,
            pre_nms_top_n=dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            post_nms_top_n=dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
            nms_thresh=rpn_nms_thresh,
        )  # fmt: skip
        levels = ["0", "1", "2", "3"]
        roi_heads = CascadeRoIHeads(
            MmdetRoIAlign(levels, output_size=7),
            [conv_fc_box_head(channels, conv_channels=box_conv_channels, representation_size=representation_size)
             for _ in range(num_stages)],
            [CascadeBoxPredictor(representation_size, num_classes, class_agnostic) for _ in range(num_stages)],
            MmdetRoIAlign(levels, output_size=14),
            [MaskRCNNHeads(channels, [mask_channels] * 4, dilation=1) for _ in range(num_stages)],
            [MaskRCNNPredictor(mask_channels, mask_channels, num_classes) for _ in range(num_stages)],
            iou_thresholds=STAGE_IOUS[:num_stages], stage_loss_weights=STAGE_LOSS_WEIGHTS[:num_stages],
            bbox_reg_stds=STAGE_BOX_STDS[:num_stages], batch_size_per_image=box_batch_size_per_image,
            score_thresh=box_score_thresh, nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img,
        )  # fmt: skip
        super().__init__(backbone, rpn, roi_heads, transform)
