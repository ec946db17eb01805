"""Tests for the synthetic ImageNet / COCO / ADE20K dataset generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ravlt_pl.data import synthetic
from ravlt_pl.data.synthetic import SHAPES, make_classification, make_detection, make_segmentation


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_detection(tmp_path_factory.mktemp("coco") / "coco", num_train=24, num_val=6, seed=3)


def test_classification_imagefolder(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    root = make_classification(tmp_path / "imnet", train_per_class=3, val_per_class=2, image_size=32)
    for split, per_class in (("train", 3), ("val", 2)):
        ds = ImageFolder(str(root / split))
        assert ds.classes == sorted(SHAPES)
        assert len(ds) == per_class * len(SHAPES)
        assert sorted(np.bincount(ds.targets).tolist()) == [per_class] * len(SHAPES)
        img, _ = ds[0]
        assert img.size == (32, 32) and img.mode == "RGB"
        assert all(p.suffix == ".JPEG" for p in (root / split).rglob("*.*"))


def test_classification_non_square(tmp_path: Path) -> None:
    root = make_classification(tmp_path / "imnet", train_per_class=1, val_per_class=1, image_size=(48, 32))
    assert {Image.open(p).size for p in root.rglob("*.JPEG")} == {(48, 32)}


def test_coco_json_structure(coco_root: Path) -> None:
    image_ids: set[int] = set()
    for split, n in (("train", 24), ("val", 6)):
        data = json.loads((coco_root / "annotations" / f"instances_{split}2017.json").read_text())
        assert {"info", "licenses", "images", "annotations", "categories"} <= data.keys()
        cat_ids = [c["id"] for c in data["categories"]]
        assert [c["name"] for c in data["categories"]] == list(SHAPES)
        assert cat_ids != list(range(1, len(cat_ids) + 1)), "category ids must be non-contiguous"
        ids = [im["id"] for im in data["images"]]
        assert len(ids) == n and min(ids) >= 1 and ids != list(range(min(ids), min(ids) + n))
        assert not image_ids & set(ids), "image ids must be unique across splits"
        image_ids |= set(ids)
        for im in data["images"]:
            with Image.open(coco_root / f"{split}2017" / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"]) == (160, 128)
        annotated = {a["image_id"] for a in data["annotations"]}
        assert annotated < set(ids), "some images must have no annotations"
        assert any(a["iscrowd"] for a in data["annotations"]), "need at least one crowd object per split"
        assert all(a["category_id"] in cat_ids for a in data["annotations"])
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_masks_match_boxes_and_areas(coco_root: Path, split: str) -> None:
    coco = COCO(str(coco_root / "annotations" / f"instances_{split}2017.json"))
    assert coco.getCatIds() == list(synthetic.COCO_CATEGORY_IDS)
    anns = coco.loadAnns(coco.getAnnIds())
    kinds = {bool(a["iscrowd"]) for a in anns}
    assert kinds == {False, True}
    for ann in anns:
        mask = coco.annToMask(ann)
        img = coco.imgs[ann["image_id"]]
        assert mask.shape == (img["height"], img["width"])
        ys, xs = np.nonzero(mask)
        tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])  # x0, y0, x1, y1
        x, y, w, h = ann["bbox"]
        box = np.array([x, y, x + w, y + h])
        if ann["iscrowd"]:  # RLE is the exact mask
            assert isinstance(ann["segmentation"]["counts"], str)
            assert ann["segmentation"]["size"] == [img["height"], img["width"]]
            assert (tight == box).all() and mask.sum() == ann["area"]
        else:  # polygon rasterised by pycocotools vs. our anti-aliased PIL mask
            assert isinstance(ann["segmentation"], list) and len(ann["segmentation"][0]) >= 6
            assert np.abs(tight - box).max() <= 1, (tight, box)
            assert abs(mask.sum() - ann["area"]) <= max(0.15 * ann["area"], 4), (mask.sum(), ann["area"])
        assert all(isinstance(v, float) for v in ann["bbox"])


def test_ade_labels(tmp_path: Path) -> None:
    ade = make_segmentation(tmp_path / "ade", num_train=4, num_val=2, image_size=(96, 64), seed=1)
    assert ade.name == "ADEChallengeData2016"
    seen: set[int] = set()
    for folder, prefix, n in (("training", "ADE_train", 4), ("validation", "ADE_val", 2)):
        images = sorted((ade / "images" / folder).glob("*.jpg"))
        assert [p.name for p in images] == [f"{prefix}_{i:08d}.jpg" for i in range(1, n + 1)]
        for img_path in images:
            label = Image.open(ade / "annotations" / folder / f"{img_path.stem}.png")
            assert label.mode == "L"
            assert label.size == Image.open(img_path).size == (96, 64)
            values = set(np.unique(np.asarray(label)).tolist())
            assert values <= set(range(len(SHAPES) + 1)) and 0 in values and len(values) >= 2
            seen |= values
    assert len(seen) >= 3


@pytest.mark.parametrize("writer", [make_classification, make_detection, make_segmentation])
def test_deterministic_by_seed(tmp_path: Path, writer) -> None:
    kw = {"train_per_class": 1, "val_per_class": 1} if writer is make_classification else {"num_train": 3, "num_val": 2}
    a = _tree_bytes(writer(tmp_path / "a", seed=7, **kw))
    b = _tree_bytes(writer(tmp_path / "b", seed=7, **kw))
    c = _tree_bytes(writer(tmp_path / "c", seed=8, **kw))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_refuses_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ade"
    make_segmentation(out, num_train=1, num_val=1, seed=0)
    before = _tree_bytes(out)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_segmentation(out, num_train=2, num_val=1, seed=1)
    assert _tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ade"], "no temp dir left behind"
    make_segmentation(out, num_train=2, num_val=1, seed=1, overwrite=True)
    assert len(list((out / "ADEChallengeData2016" / "images" / "training").iterdir())) == 2
    (tmp_path / "empty").mkdir()
    make_classification(tmp_path / "empty", train_per_class=1, val_per_class=1)  # empty dir is fine


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "coco"
    synthetic.main(
        [
            "--task",
            "detection",
            "--out",
            str(out),
            "--num-train",
            "2",
            "--num-val",
            "1",
            "--image-size",
            "80",
            "64",
            "--seed",
            "5",
        ]
    )
    assert "2 train / 1 val" in capsys.readouterr().out
    assert Image.open(next((out / "train2017").glob("*.jpg"))).size == (80, 64)
    with pytest.raises(FileExistsError):
        synthetic.main(["--task", "detection", "--out", str(out)])
    synthetic.main(
        [
            "--task",
            "classification",
            "--out",
            str(out),
            "--overwrite",
            "--num-train",
            "1",
            "--num-val",
            "1",
            "--image-size",
            "24",
        ]
    )
    assert f"{len(SHAPES)} train / {len(SHAPES)} val" in capsys.readouterr().out
