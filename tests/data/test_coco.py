"""COCODataModule on a tiny synthetic COCO set: labels, filtering, pipelines and every bad-input error."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ravlt_pl.data.coco import COCODataModule, RandomRangeCrop, train_transform
from ravlt_pl.data.coco_files import rle_string_runs
from ravlt_pl.data.errors import DatasetError
from ravlt_pl.data.synthetic import COCO_CATEGORY_IDS, make_detection


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_detection(tmp_path_factory.mktemp("coco") / "synth", num_train=8, num_val=4, image_size=(80, 64))


@pytest.fixture
def broken_root(coco_root, tmp_path) -> Path:
    """A writable copy whose ``instances_train2017.json`` a test edits."""
    return Path(shutil.copytree(coco_root, tmp_path / "copy"))


def _datamodule(root, **kwargs) -> COCODataModule:
    args = dict(num_classes=5, scale=(96, 64), global_batch_size=None, batch_size=2, num_workers=0, pin_memory=False)
    return COCODataModule(root, **{**args, **kwargs})


def _edit(root: Path, edit, split: str = "train2017") -> None:
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _raw(root: Path, split: str = "train2017") -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


# -- labels and filtering ---------------------------------------------------------------------------
def test_category_ids_map_to_contiguous_labels_and_back(coco_root):
    dm = _datamodule(coco_root)
    dm.setup("fit")
    assert dm.info.category_ids == tuple(sorted(COCO_CATEGORY_IDS)) and dm.info.class_names[0] == "circle"
    dataset = dm.datasets["val"]
    raw = _raw(coco_root, "val2017")
    for index, image_id in enumerate(dataset.split.image_ids):
        _, target = dataset[index]
        expected = [a["category_id"] for a in raw["annotations"] if a["image_id"] == image_id]
        assert [dm.info.category_ids[label] for label in target["labels"].tolist()] == expected
        assert set(target["labels"].tolist()) <= set(range(5))


def test_train_skips_images_without_usable_annotations_and_crowds(coco_root):
    dm = _datamodule(coco_root)
    dm.setup("fit")
    raw = _raw(coco_root)
    usable = {a["image_id"] for a in raw["annotations"] if not a["iscrowd"]}
    split = dm.datasets["train"].split
    assert set(split.image_ids) == usable
    assert not any(a["iscrowd"] for anns in split.annotations.values() for a in anns)
    crowd_count = sum(a["iscrowd"] for a in raw["annotations"])
    assert sum(map(len, split.annotations.values())) == len(raw["annotations"]) - crowd_count


def test_val_keeps_every_image_and_annotation_in_original_pixels(coco_root):
    dm = _datamodule(coco_root)
    dm.setup("validate")
    raw = _raw(coco_root, "val2017")
    dataset = dm.datasets["val"]
    assert len(dataset) == len(raw["images"])
    targets = [dataset[i][1] for i in range(len(dataset))]
    assert sum(len(t["boxes"]) for t in targets) == len(raw["annotations"])
    assert sum(int(t["iscrowd"].sum()) for t in targets) == sum(a["iscrowd"] for a in raw["annotations"])
    first = next(t for t in targets if len(t["boxes"]))
    ann = next(a for a in raw["annotations"] if a["image_id"] == first["image_id"])
    x, y, w, h = ann["bbox"]
    torch.testing.assert_close(first["boxes"][0], torch.tensor([x, y, x + w, y + h]))
    assert first["orig_size"] == (64, 80) and first["masks"].shape[-2:] == (64, 80)


def test_degenerate_boxes_are_dropped_and_counted(broken_root, caplog):
    def shrink(data):
        data["annotations"][0]["bbox"][3] = 0.0  # as COCO train2017 annotation 918: height 0
        data["annotations"][1]["bbox"][2] = 0.4

    _edit(broken_root, shrink)
    dm = _datamodule(broken_root)
    with caplog.at_level(logging.WARNING, logger="ravlt_pl.data.coco_files"):
        dm.setup("fit")
    assert "dropped 2 degenerate boxes" in caplog.text
    kept = {a["id"] for anns in dm.datasets["train"].split.annotations.values() for a in anns}
    assert not kept & {a["id"] for a in _raw(broken_root)["annotations"][:2]}


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("categories"), r"instances_train2017.json: no 'categories' list"),
        (lambda d: d["annotations"][2].pop("bbox"), r"annotations\[2\] \(id 3\) lacks 'bbox'"),
        (lambda d: d["images"][1].pop("file_name"), r"images\[1\] \(id \d+\) lacks 'file_name'"),
        (lambda d: d["annotations"][2].update(bbox=[10, 10, -3, 5]),
         r"instances_train2017.json: annotation 3 \(annotations\[2\]\) has bbox \[10, 10, -3, 5\]; "
         r"width and height must be positive"),
        (lambda d: d["annotations"][2].update(category_id=99), r"annotation 3 \(annotations\[2\]\) has category_id 99"),
        (lambda d: d["images"][1].update(id=d["images"][0]["id"]), r"image id \d+ is used twice \(images\[0\]"),
    ],
    ids=["missing-top-level-key", "annotation-missing-bbox", "image-missing-file-name", "non-positive-box",
         "unknown-category", "duplicate-image-id"],
)  # fmt: skip
def test_bad_annotation_file_raises_naming_file_and_record(broken_root, edit, message):
    _edit(broken_root, edit)
    with pytest.raises(DatasetError, match=message):
        _datamodule(broken_root).setup("fit")


def test_missing_image_file_raises_naming_it(broken_root):
    image = _raw(broken_root)["images"][0]
    (broken_root / "train2017" / image["file_name"]).unlink()
    expected = rf"{image['file_name']}: image file not found; .*images\[0\] \(id {image['id']}\)"
    with pytest.raises(DatasetError, match=expected):
        _datamodule(broken_root).setup("fit")


def test_missing_root_and_wrong_class_count_are_reported(coco_root, tmp_path):
    with pytest.raises(DatasetError, match="dataset directory not found"):
        _datamodule(tmp_path / "nowhere").setup("fit")
    with pytest.raises(DatasetError, match="5 categories, but num_classes is 80"):
        _datamodule(coco_root, num_classes=80).setup("validate")


# -- pipelines --------------------------------------------------------------------------------------
def test_random_range_crop_stays_in_range():
    crop = RandomRangeCrop((384, 600))
    for _ in range(20):
        h, w = crop(image=np.zeros((700, 900, 3), np.uint8))["image"].shape[:2]
        assert 384 <= h <= 600 and 384 <= w <= 600
    assert crop(image=np.zeros((300, 900, 3), np.uint8))["image"].shape[0] == 300


def test_3x_pipeline_scales_short_side_with_the_published_sizes():
    transform = train_transform("3x", (1333, 800))
    shorts = set()
    for _ in range(40):
        out = transform(image=np.zeros((480, 640, 3), np.uint8), bboxes=np.zeros((0, 4)), labels=[], indices=[])
        h, w = out["image"].shape[:2]
        assert max(h, w) <= 1333
        shorts.add(min(h, w))
    assert shorts <= set(range(480, 801, 32)) and len(shorts) > 3


@pytest.mark.parametrize("recipe", ["1x", "3x"])
def test_augmented_boxes_and_masks_stay_aligned(coco_root, recipe):
    # The synthetic polygons' boxes and rasterised masks differ by up to 1 px; the pipelines upscale
    # the 80x64 images by at most 2 (1x: short 64 -> 128) or 3.15 (3x crop branch: x1.5, crop to 61 px
    # short, resize to 128), and nearest-neighbour mask resizing adds up to 1 px.
    box_mask_px, max_upscale, nearest_px = 1.0, {"1x": 2.0, "3x": 3.15}[recipe], 1.0
    tolerance = box_mask_px * max_upscale + nearest_px
    dm = _datamodule(coco_root, recipe=recipe, scale=(160, 128))
    dm.setup("fit")
    for seed in range(3):
        torch.manual_seed(seed)
        images, targets = next(iter(dm.train_dataloader()))
        for image, target in zip(images, targets):
            assert image.dtype == torch.uint8 and target["masks"].shape[-2:] == image.shape[-2:]
            assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
            for box, mask in zip(target["boxes"], target["masks"]):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                mask_box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
                assert (box - mask_box).abs().max() <= tolerance


def test_augmentations_follow_torch_seed(coco_root):
    dm = _datamodule(coco_root, recipe="3x", scale=(160, 128))
    dm.setup("fit")
    draws = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        dm.datasets["train"]._seed = None  # a fresh process: the dataset has not seeded yet
        draws.append([dm.datasets["train"][i][1]["boxes"] for i in range(4)])
    same = lambda a, b: all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert same(draws[0], draws[1]) and not same(draws[0], draws[2])


def test_workers_draw_different_augmentations(coco_root):
    """Forked workers must not share one copied albumentations stream."""
    dm = _datamodule(coco_root, recipe="3x", scale=(160, 128))
    dm.setup("fit")
    repeated = torch.utils.data.Subset(dm.datasets["train"], [0] * 8)  # worker 0 gets items 0,2,4,6; 1 gets 1,3,5,7
    loader = torch.utils.data.DataLoader(repeated, batch_size=None, num_workers=2)
    shapes = [tuple(image.shape) + tuple(target["boxes"].flatten().tolist()) for image, target in loader]
    assert shapes[0::2] != shapes[1::2]


def test_boxes_only_without_masks(coco_root):
    dm = _datamodule(coco_root, with_masks=False)
    dm.setup("fit")
    _, target = dm.datasets["train"][0]
    assert "masks" not in target


def test_predict_reads_a_folder_of_images(coco_root):
    dm = _datamodule(coco_root, predict_dir=str(coco_root / "val2017"), scale=(120, 96))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    first = sorted((coco_root / "val2017").iterdir())[0]
    assert batch["path"][0] == str(first) and batch["index"][:2] == [0, 1]
    assert batch["orig_size"][0] == (64, 80) and batch["image"][0].shape == (3, 96, 120)  # resized ×1.5
    assert dm.info.class_names[0] == "circle" and dm.info.category_ids == tuple(sorted(COCO_CATEGORY_IDS))


def test_predict_without_annotations_numbers_the_categories(coco_root, tmp_path):
    root = tmp_path / "bare"
    shutil.copytree(coco_root / "val2017", root / "val2017")
    dm = _datamodule(root, num_classes=3)
    dm.setup("predict")
    assert dm.info.category_ids == (1, 2, 3) and dm.info.class_names == ("class_1", "class_2", "class_3")


# -- bad records: one line naming the file and record ----------------------------------------------
@pytest.mark.parametrize("polygon,count", [([1, 1, 5, 1], 4), ([1, 1, 5, 1, 5, 5, 1], 7)])
def test_short_or_odd_polygon_names_the_annotation(broken_root, polygon, count):
    def edit(data):
        data["annotations"][2]["segmentation"] = [polygon]

    _edit(broken_root, edit)
    ann_id = _raw(broken_root)["annotations"][2]["id"]
    message = rf"instances_train2017\.json: annotation {ann_id} \(annotations\[2\]\): polygon 0 has {count} coordinates"
    with pytest.raises(DatasetError, match=message):
        _datamodule(broken_root).setup("fit")


@pytest.mark.parametrize("rle,problem", [
    ({"size": [10, 10], "counts": [100]}, r"RLE size \[10, 10\] differs from its image's \[64, 80\]"),
    ({"size": [64, 80], "counts": [5, 3]}, r"RLE has run lengths summing to 8; its 64×80 image needs 5120 pixels"),
    ({"size": [64, 80], "counts": "0"}, r"RLE has run lengths summing to 0"),
    ({"size": [64, 80], "counts": "zz~~"}, r"RLE has malformed counts"),
])  # fmt: skip
def test_rle_of_wrong_size_or_garbage_counts_names_the_annotation(broken_root, rle, problem):
    def edit(data):
        data["annotations"][1].update(segmentation=rle, iscrowd=1)

    _edit(broken_root, edit)
    ann_id = _raw(broken_root)["annotations"][1]["id"]
    with pytest.raises(DatasetError, match=rf"instances_train2017\.json: annotation {ann_id} .*: {problem}"):
        _datamodule(broken_root).setup("fit")


def test_rle_string_runs_decode_pycocotools_strings():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for shape in [(7, 5), (64, 80), (1, 1)]:
        mask = (rng.random(shape) < 0.3).astype(np.uint8)
        runs = rle_string_runs(mask_utils.encode(np.asfortranarray(mask))["counts"].decode())
        flat = mask.ravel(order="F")  # COCO runs go down columns, starting with zeros
        values = np.concatenate([np.full(n, k % 2) for k, n in enumerate(runs)])
        assert sum(runs) == mask.size and np.array_equal(values, flat)


@pytest.mark.parametrize("file_name", ["/etc/hostname", "../train2017/x.jpg", "a/../../x.jpg"])
def test_file_name_outside_the_image_folder_is_refused(broken_root, file_name):
    def edit(data):
        data["images"][3]["file_name"] = file_name

    _edit(broken_root, edit)
    image_id = _raw(broken_root)["images"][3]["id"]
    message = rf"instances_train2017\.json: images\[3\] \(id {image_id}\) has file_name '{re.escape(file_name)}'; it must be a relative path"
    with pytest.raises(DatasetError, match=message):
        _datamodule(broken_root).setup("fit")
