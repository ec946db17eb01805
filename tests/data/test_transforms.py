"""The keep-ratio resize shared by the COCO and ADE20K pipelines (mmcv's rule)."""

from __future__ import annotations

import numpy as np
import pytest

from ravlt_pl.data.transforms import KeepRatioResize


def test_fits_coco_images_inside_1333x800():
    image = np.zeros((480, 640, 3), np.uint8)
    assert KeepRatioResize(1333, [800])(image=image)["image"].shape[:2] == (800, 1067)
    tall = np.zeros((1000, 200, 3), np.uint8)  # long side bounds it
    assert KeepRatioResize(1333, [800])(image=tall)["image"].shape[:2] == (1333, 267)


@pytest.mark.parametrize("hw,expected", [((512, 683), (512, 683)), ((683, 512), (683, 512)), ((300, 1000), (512, 1707)),
                                         ((1200, 1600), (512, 683)), ((100, 3000), (68, 2048))])  # fmt: skip
def test_fits_long_and_short_edge_in_either_orientation(hw, expected) -> None:
    out = KeepRatioResize(2048, [512])(image=np.zeros((*hw, 3), np.uint8), mask=np.zeros(hw, np.uint8))
    assert out["image"].shape[:2] == expected and out["mask"].shape == expected


def test_random_ratio_stays_in_range() -> None:
    transform = KeepRatioResize(2048, [512], ratio_range=(0.5, 2.0))
    transform.set_random_seed(0)
    heights = {transform(image=np.zeros((512, 683, 3), np.uint8))["image"].shape[0] for _ in range(50)}
    assert min(heights) >= 256 and max(heights) <= 1024 and len(heights) > 10


def test_multi_scale_draws_one_of_the_short_sides() -> None:
    transform = KeepRatioResize(1333, [480, 640, 800])
    transform.set_random_seed(0)
    shorts = {min(transform(image=np.zeros((480, 640, 3), np.uint8))["image"].shape[:2]) for _ in range(30)}
    assert shorts == {480, 640, 800}


def test_masks_are_resized_by_nearest_neighbour() -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[:, 2:] = 7
    out = KeepRatioResize(8, [8])(image=np.zeros((4, 4, 3), np.uint8), mask=mask)["mask"]
    assert set(np.unique(out).tolist()) == {0, 7}


def test_randaugment_posterize_at_magnitude_10_gives_black_not_a_pillow_error() -> None:
    """The DeiT recipe's RandAugment (``inc1``) keeps 0 bits at magnitude 10; Pillow >= 10 raised on it."""
    from PIL import Image
    from timm.data import create_transform

    from ravlt_pl.data.transforms import repair_posterize

    pipeline = repair_posterize(create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1"))
    (randaugment,) = [step for step in pipeline.transforms if hasattr(step, "ops")]
    (op,) = [op for op in randaugment.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op(image).getextrema() == ((0, 0), (0, 0), (0, 0))
    op.magnitude = 5  # 2 bits kept: timm's posterize as before
    assert op(image).getpixel((0, 0)) == (192, 64, 0)
