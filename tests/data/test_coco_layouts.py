"""COCO from labelling tools' exports: layouts detected, classes from the train file, box-only data, splits."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from ravlt_pl.data.coco import COCODataModule
from ravlt_pl.data.errors import DatasetError
from ravlt_pl.data.synthetic import SHAPES, make_detection, make_detection_export

LOADER = dict(scale=(96, 64), global_batch_size=None, batch_size=2, num_workers=0, pin_memory=False)


@pytest.fixture(scope="module", params=["roboflow", "label_studio", "cvat"])
def export(request, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(request.param) / "export"
    return request.param, make_detection_export(root, request.param, num_train=4, num_val=3, image_size=(80, 64))


def test_each_tool_export_loads_without_renaming(export):
    tool, root = export
    dm = COCODataModule(root, val_fraction=None if tool == "roboflow" else 0.4, **LOADER)
    assert dm.layout == tool and dm.num_classes == len(SHAPES)  # Roboflow's placeholder category is no class
    dm.setup("fit")
    assert list(dm.info.class_names) == list(SHAPES)
    image, target = dm.datasets["train"][0]
    assert image.dtype == torch.uint8 and target["masks"].shape[0] == len(target["labels"])
    if tool != "roboflow":  # one file: a seeded share of its images validates, the rest trains
        train, val = set(dm.datasets["train"].split.image_ids), set(dm.datasets["val"].split.image_ids)
        assert val and not train & val and len(dm.datasets["val"]) == round(0.4 * 7)


def test_predict_defaults_to_the_exports_validation_images(tmp_path):
    root = make_detection_export(tmp_path / "rf", "roboflow", num_train=3, num_val=2, image_size=(80, 64))
    dm = COCODataModule(root, **LOADER)
    dm.setup("predict")
    assert dm.datasets["predict"].folder == root / "valid" and len(dm.datasets["predict"]) == 2
    assert list(dm.info.class_names) == list(SHAPES)


def test_a_single_split_export_without_val_fraction_names_the_key(tmp_path):
    root = make_detection_export(tmp_path / "cvat", "cvat", num_train=3, num_val=2, image_size=(80, 64))
    with pytest.raises(DatasetError, match=r"\(cvat layout\) has no val split; set --data.init_args.val_annotations"):
        COCODataModule(root, **LOADER).setup("fit")


def test_test_without_a_test_split_names_the_keys(tmp_path):
    root = make_detection_export(tmp_path / "rf", "roboflow", num_train=3, num_val=2, image_size=(80, 64))
    with pytest.raises(DatasetError, match="no test split; set --data.init_args.test_annotations and test_images"):
        COCODataModule(root, **LOADER).setup("test")


def test_box_only_export_loads_for_a_box_detector_and_points_a_mask_detector_at_it(tmp_path):
    root = make_detection_export(
        tmp_path / "rf", "roboflow", box_only=True, num_train=3, num_val=2, image_size=(80, 64)
    )
    boxes = COCODataModule(root, with_masks=False, **LOADER)
    boxes.setup("fit")
    assert "masks" not in boxes.datasets["train"][0][1]
    with pytest.raises(DatasetError, match=r"no polygon or RLE segmentation .*configs/finetune/faster_rcnn.yaml"):
        COCODataModule(root, **LOADER).setup("fit")


def test_explicit_files_replace_the_layout_and_classes_come_from_the_train_file(tmp_path, caplog):
    coco = make_detection(tmp_path / "coco", num_train=3, num_val=2, image_size=(80, 64))
    train = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    train["categories"].append({"id": 99, "name": "unused"})
    (tmp_path / "mine.json").write_text(json.dumps(train))
    paths = dict(train_annotations=str(tmp_path / "mine.json"), train_images=str(coco / "train2017"),
                 val_annotations="annotations/instances_val2017.json", val_images="val2017")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        dm = COCODataModule(coco, **paths, **LOADER)
    assert dm.num_classes == len(SHAPES) + 1 and re.search(
        r"categories on no annotation \(still classes\): .*unused", caplog.text
    )
    with pytest.raises(
        DatasetError, match=r"instances_val2017.json: categories differ from the train file .*mine.json"
    ):
        dm.setup("fit")
    with pytest.raises(DatasetError, match=rf"mine.json: {len(SHAPES) + 1} categories, but num_classes is 3"):
        COCODataModule(coco, **paths, num_classes=3, **LOADER).setup("fit")
    with pytest.raises(DatasetError, match="train_annotations is set but train_images is not"):
        COCODataModule(coco, train_annotations="mine.json", **LOADER)


def test_unknown_layout_lists_the_known_ones(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DatasetError,
        match=r"no COCO annotation file of a known layout \(coco2017: .*roboflow: .*"
        r"train/_annotations.coco.json.*set --data.init_args.train_annotations",
    ):
        COCODataModule(tmp_path / "empty", **LOADER)
