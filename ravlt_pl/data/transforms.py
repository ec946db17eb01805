"""The keep-ratio resize shared by the detection and segmentation pipelines (albumentations lacks its rule),
and the repair of timm's RandAugment posterize for current Pillow."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
from albumentations.augmentations.geometric.resize import MaxSizeTransform
from PIL import Image
from timm.data import auto_augment


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with 0 bits kept giving the black image it meant (Pillow < 10 did; >= 10 raises)."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def repair_posterize(transform: Callable) -> Callable:
    """``transform`` (a timm ``create_transform`` pipeline) with every RandAugment posterize op repaired.

    timm's ``PosterizeIncreasing`` (RandAugment ``inc1``, the DeiT recipe) keeps ``4 - int(m / 10 * 4)`` bits:
    0 at magnitude 10, which ``mstd0.5`` reaches about once in 700 images; Pillow >= 10 refuses 0 bits
    (``ValueError``) and stopped training. Keeping 0 bits is the black image old Pillow (the authors'
    runs) gave. Only the ops of this pipeline change; timm's module is left as it is.
    """
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


class KeepRatioResize(MaxSizeTransform):
    """mmcv's ``Resize(keep_ratio=True)``: the largest scale with short side ≤ ``short`` and long side ≤ ``long_side``.

    As in mmcv, the target is drawn one of two ways: with ``ratio_range`` (mmseg) the fit to
    ``short_sides[0]`` is multiplied by a ratio uniform in it; otherwise ``short`` is one of
    ``short_sides`` at random (mmdet's multi-scale training; no draw when there is one).
    albumentations' ``LongestMaxSize``/``SmallestMaxSize`` bound one side only. Images are resized
    bilinearly, masks by nearest neighbour.
    """

    def __init__(
        self, long_side: int, short_sides: Sequence[int], ratio_range: Sequence[float] | None = None, p: float = 1.0
    ) -> None:
        super().__init__(max_size=long_side, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST, p=p)
        self.long_side, self.short_sides = long_side, list(short_sides)
        self.ratio_range = tuple(ratio_range) if ratio_range is not None else None

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        short, ratio = self.short_sides[0], 1.0
        if self.ratio_range is not None:
            ratio = self.py_random.uniform(*self.ratio_range)
        elif len(self.short_sides) > 1:
            short = self.py_random.choice(self.short_sides)
        return {"scale": ratio * min(short / min(height, width), self.long_side / max(height, width))}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("long_side", "short_sides", "ratio_range")
