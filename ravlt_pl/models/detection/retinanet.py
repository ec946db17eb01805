"""RetinaNet on RAVLT with the authors' (mmdet 2.11) inference rules, on torchvision's ``RetinaNet``.

torchvision provides the detector, the focal / L1 losses and the anchor matching. Where its
inference differs from the authors' ``RetinaNet`` + ``RetinaHead`` (the released checkpoints'
numbers depend on it), this module follows mmdet:

- P6 is a stride-2 conv on C5 and P7 a conv on P6 **without** a ReLU in between (``add_extra_convs='on_input'``,
  ``relu_before_extra_convs=False``); torchvision's ``LastLevelP6P7`` applies a ReLU;
- the head's towers may be narrower than the FPN (``feat_channels``) and have any depth (``stacked_convs``);
- anchors: sizes ``stride · 4 · 2^(i/3)`` (32, 40.32, 50.80 on P3), **not rounded**, shifted by the
  level's nominal stride (8 ... 128) rather than ``image size // feature size``;
- decoding clamps dw/dh on both sides to ±log(1000/16);
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
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.misc import Conv2dNormActivation

from .backbone import ravlt_fpn
from .detectors import PresizedTransform
from .rcnn_rules import batched_nms

#: mmdet ``DeltaXYWHBBoxCoder``'s clamp of dw/dh: ``|log(wh_ratio_clip)|`` with ``wh_ratio_clip = 16/1000``.
MAX_LOG_RATIO = float(np.abs(np.log(16 / 1000)))


class MMDetAnchorGenerator(AnchorGenerator):
    """mmdet's ``AnchorGenerator`` for RetinaNet: octave scales, float base anchors, nominal strides.

    Anchor ``a = ratio · scales_per_octave + scale`` of a level, centred on the cell's top-left
    corner; per level ordered (y, x, a) like torchvision's and like the head's outputs.
    """

    def __init__(
        self,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        octave_base_scale: float = 4.0,
        scales_per_octave: int = 3,
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
    ) -> None:
        # float64 octave scales cast to float32, as mmdet builds them
        octaves = [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        self.scales = [float(np.float32(s)) for s in octaves]
        self.ratios = [float(r) for r in ratios]
        sizes = tuple(tuple(stride * s for s in self.scales) for stride in strides)  # 32, 40.32, 50.80 on P3
        super().__init__(sizes, aspect_ratios=(tuple(self.ratios),) * len(strides))
        self.strides = tuple(strides)
        self.cell_anchors = []  # torchvision's rounded ones are not used: see base_anchors

    def num_anchors_per_location(self) -> list[int]:
        return [len(self.scales) * len(self.ratios)] * len(self.strides)

    def base_anchors(self, stride: int, device: torch.device) -> Tensor:
        """(A, 4) anchors of one level centred on (0, 0), in mmdet's float32 arithmetic."""
        scales = torch.tensor(self.scales, dtype=torch.float32, device=device)
        h_ratios = torch.sqrt(torch.tensor(self.ratios, dtype=torch.float32, device=device))
        w_ratios = 1 / h_ratios
        ws = (stride * w_ratios[:, None] * scales[None, :]).view(-1)  # ratio-major, then scale
        hs = (stride * h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def grid_anchors_mmdet(self, feature_sizes: Sequence[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Per level (H·W·A, 4) float32 anchors over the padded batch grid."""
        if len(feature_sizes) != len(self.strides):
            raise ValueError(f"{len(feature_sizes)} feature levels for {len(self.strides)} anchor strides")
        levels = []
        for (height, width), stride in zip(feature_sizes, self.strides):
            base = self.base_anchors(stride, device)
            shift_x = torch.arange(width, device=device) * stride
            shift_y = torch.arange(height, device=device) * stride
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 4).to(base)
            levels.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))  # (H·W·A, 4)
        return levels

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        anchors = torch.cat(self.grid_anchors_mmdet(sizes, feature_maps[0].device))
        return [anchors for _ in image_list.image_sizes]


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


def decode_boxes(deltas: Tensor, anchors: Tensor, image_size: tuple[int, int]) -> Tensor:
    """mmdet ``delta2bbox`` with means 0, stds 1: (N, 4) deltas on (N, 4) anchors → boxes clipped to the image."""
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw, dh = deltas[:, 2].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO), deltas[:, 3].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    px, py = (anchors[:, 0] + anchors[:, 2]) * 0.5, (anchors[:, 1] + anchors[:, 3]) * 0.5
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + pw * dx, py + ph * dy
    height, width = image_size  # ints, or symbolic sizes while exporting
    x1, x2 = (gx - gw * 0.5).clamp(0, width), (gx + gw * 0.5).clamp(0, width)
    y1, y2 = (gy - gh * 0.5).clamp(0, height), (gy + gh * 0.5).clamp(0, height)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def mmdet_detections(
    cls_logits: Sequence[Tensor],
    box_deltas: Sequence[Tensor],
    anchors: Sequence[Tensor],
    image_size: tuple[int, int],
    scale_factor: tuple[float, float] = (1.0, 1.0),
    nms_pre: int = 1000,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    max_per_img: int = 100,
) -> dict[str, Tensor]:
    """One image's detections from per-level (N_l, K) logits, (N_l, 4) deltas and anchors (mmdet 2.11 rule).

    ``scale_factor`` (w, h): input pixels per original pixel; boxes are divided by it before NMS.
    """
    boxes, scores = [], []
    for logits, deltas, level_anchors in zip(cls_logits, box_deltas, anchors):
        probs = logits.sigmoid()  # (N_l, K)
        if torch.compiler.is_exporting() or probs.shape[0] > nms_pre:  # the anchors with the best class
            # (exported: always selected, as mmdet's ONNX export does; the order changes, not the set)
            top = probs.max(dim=1).values.topk(torch.sym_min(nms_pre, probs.shape[0])).indices
            probs, deltas, level_anchors = probs[top], deltas[top], level_anchors[top]
        boxes.append(decode_boxes(deltas, level_anchors, image_size))
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
        anchor_generator = MMDetAnchorGenerator(octave_base_scale=4.0 * anchor_scale)
        num_anchors = anchor_generator.num_anchors_per_location()[0]
        head = retina_head(fpn_channels, num_anchors, num_classes, feat_channels or fpn_channels, stacked_convs)
        super().__init__(
            backbone, num_classes, anchor_generator=anchor_generator, head=head, detections_per_img=detections_per_img,
            # torchvision's transform arguments, named so that they are no config arguments; replaced below
            min_size=0, max_size=0, image_mean=None, image_std=None, size_divisible=32, fixed_size=None,
            **kwargs,
        )  # fmt: skip
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
        return mmdet_detections(logits, deltas, anchors, image_size, scale_factor, self.topk_candidates,
                                self.score_thresh, self.nms_thresh, self.detections_per_img)  # fmt: skip

    def head_outputs(self, batch: Tensor) -> tuple[list[Tensor], dict[str, list[Tensor]], list[Tensor]]:
        """FPN maps P3..P7, per-level head outputs ``cls_logits`` (B, H·W·A, K) / ``bbox_regression`` (B, H·W·A, 4),
        and per-level anchors (H·W·A, 4) for a normalised, padded batch (B, 3, H, W)."""
        features = list(self.backbone(batch).values())
        outputs = self.head(features)
        counts = [f.shape[-2] * f.shape[-1] * self.anchor_generator.num_anchors_per_location()[0] for f in features]
        split = {k: list(v.split(counts, dim=1)) for k, v in outputs.items()}
        anchors = self.anchor_generator.grid_anchors_mmdet([tuple(f.shape[-2:]) for f in features], batch.device)
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
