"""The authors' (mmdet 2.11 / mmcv 1.x) box rules every detector here shares: anchors, delta coding, NMS.

torchvision's parts differ from them in ways the released checkpoints' outputs depend on:

- :class:`MmdetAnchorGenerator`: base anchors not rounded, the configs' fixed strides (torchvision
  rounds the sizes and infers strides by integer division, wrong for P6 of a 96-px-high input);
  R-CNN one scale per level, RetinaNet three octave scales (:func:`octave_scales`);
- :class:`DeltaXYWHCoder`: mmdet's ``DeltaXYWHBBoxCoder`` (stds, dw/dh clamped on both sides, optional
  clip to the image);
- :func:`batched_nms`: mmcv's (coordinate offsets below 10000 boxes, one class at a time above).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import nms

#: mmdet ``wh_ratio_clip=16/1000``: |dw|, |dh| ≤ log(1000/16)
DELTA_CLIP = abs(math.log(16 / 1000))
#: mmcv ``batched_nms`` switches to one class at a time from this many boxes
NMS_SPLIT = 10000


def octave_scales(octave_base_scale: float = 4.0, scales_per_octave: int = 3) -> tuple[float, ...]:
    """RetinaNet's anchor scales ``base · 2^(i/n)``: float64 powers rounded to float32, as mmdet builds them."""
    return tuple(float(np.float32(octave_base_scale * 2 ** (i / scales_per_octave))) for i in range(scales_per_octave))


class MmdetAnchorGenerator(AnchorGenerator):
    """mmdet's ``AnchorGenerator``: size = stride × scale, ratio-major order, float corners, fixed strides.

    Anchor ``a = r·len(scales) + s`` of cell (iy, ix) is ``base[a] + (ix, iy, ix, iy)·stride``, per level
    ordered (y, x, a) like torchvision's and like the heads' outputs; float32 whatever the features' dtype.
    The defaults are the R-CNNs' (P2–P6, one scale 8); RetinaNet's are strides 8 ... 128 and
    ``octave_scales(4, 3)`` (sizes 32, 40.32, 50.80 on P3).
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

    def level_anchors(self, feature_sizes: Sequence[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Per level (H·W·A, 4) anchors over the padded batch grid of ``feature_sizes`` [(H, W)]."""
        if len(feature_sizes) != len(self.strides):
            raise ValueError(f"{len(feature_sizes)} feature levels for {len(self.strides)} anchor strides")
        levels = []
        for (height, width), stride, base in zip(feature_sizes, self.strides, self.cell_anchors):
            ys, xs = torch.meshgrid(torch.arange(height, device=device) * stride,
                                    torch.arange(width, device=device) * stride, indexing="ij")  # fmt: skip
            shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4).float()
            levels.append((base.to(device)[None] + shifts).reshape(-1, 4))  # (h·w·A, 4), order (y, x, a)
        return levels

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        anchors = torch.cat(self.level_anchors(sizes, feature_maps[0].device))
        return [anchors for _ in image_list.image_sizes]


class DeltaXYWHCoder(BoxCoder):
    """mmdet's ``DeltaXYWHBBoxCoder`` (means 0) behind torchvision's ``BoxCoder`` interface.

    Encoding is torchvision's with weights ``1/stds``; decoding is mmdet's: ``d = raw · stds``, dw/dh
    clamped to ±log(1000/16), centre ``(x1 + x2)/2``, and with ``max_shape`` (h, w) the corners clipped to
    the image (mmdet's ``max_shape``; RetinaNet decodes so, the R-CNNs clip later).
    """

    def __init__(self, stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> None:
        super().__init__(tuple(1.0 / s for s in stds), bbox_xform_clip=DELTA_CLIP)
        self.stds = tuple(float(s) for s in stds)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor, max_shape: Sequence[int] | None = None) -> Tensor:
        """(N, 4·C) deltas on (N, 4) boxes → (N, 4·C) boxes."""
        boxes = boxes.to(rel_codes.dtype)
        deltas = rel_codes * rel_codes.new_tensor(self.stds).repeat(rel_codes.shape[-1] // 4)
        dx, dy = deltas[:, 0::4], deltas[:, 1::4]
        dw, dh = deltas[:, 2::4].clamp(-DELTA_CLIP, DELTA_CLIP), deltas[:, 3::4].clamp(-DELTA_CLIP, DELTA_CLIP)
        px, py = ((boxes[:, 0] + boxes[:, 2]) * 0.5)[:, None], ((boxes[:, 1] + boxes[:, 3]) * 0.5)[:, None]
        pw, ph = (boxes[:, 2] - boxes[:, 0])[:, None], (boxes[:, 3] - boxes[:, 1])[:, None]
        gw, gh = pw * dw.exp(), ph * dh.exp()
        gx, gy = px + pw * dx, py + ph * dy
        x1, y1, x2, y2 = gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5
        if max_shape is not None:
            height, width = max_shape  # ints, or symbolic sizes while exporting
            x1, x2 = x1.clamp(0, width), x2.clamp(0, width)
            y1, y2 = y1.clamp(0, height), y2.clamp(0, height)
        return torch.stack([x1, y1, x2, y2], dim=2).flatten(1)


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
