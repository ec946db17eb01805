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
