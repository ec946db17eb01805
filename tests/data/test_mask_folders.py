"""Segmentation from plain image + mask folders: pairing by stem, classes from a file or the values, ignore."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ravlt_pl.data.errors import DatasetError
from ravlt_pl.data.mask_folders import MaskFolderDataModule, read_classes
from ravlt_pl.data.synthetic import SHAPES, make_mask_folders

LOADER = dict(scale=(128, 64), crop_size=(64, 64), batch_size=2, num_workers=0, pin_memory=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    return make_mask_folders(tmp_path_factory.mktemp("seg") / "mine", num_train=4, num_val=2, image_size=(80, 64))


def test_classes_from_the_file_and_the_ignore_value_read_as_ignore(folders):
    dm = MaskFolderDataModule(folders, classes=str(folders / "classes.txt"), **LOADER)
    assert dm.num_classes == len(SHAPES) + 1 and dm.info.class_names[0] == "background"
    dm.setup("validate")
    label = dm.datasets["val"][0]["label"].numpy()
    assert label[0, 0] == 255 and set(np.unique(label)) <= set(range(6)) | {255}


def test_classes_left_out_are_the_label_values_found(folders, tmp_path):
    root = shutil.copytree(folders, tmp_path / "copy")
    for mask in (root / "masks").rglob("*.png"):  # the border is 0 here and 200 means "not labelled"
        label = np.array(Image.open(mask))
        Image.fromarray(np.where(label == 255, 200, label).astype(np.uint8)).save(mask)
    dm = MaskFolderDataModule(root, ignore_value=200, **LOADER)
    assert dm.num_classes == 6 and dm.info.class_names[-1] == "class 5"
    dm.setup("fit")
    assert 255 in dm.datasets["val"][0]["label"].numpy()
    with pytest.raises(DatasetError, match=r"classes.txt: 6 classes, but num_classes is 4"):
        MaskFolderDataModule(root, classes=str(root / "classes.txt"), num_classes=4, **LOADER)


def test_a_missing_mask_and_a_missing_test_split_are_named(folders, tmp_path):
    root = shutil.copytree(folders, tmp_path / "copy")
    dm = MaskFolderDataModule(root, classes=str(root / "classes.txt"), **LOADER)
    with pytest.raises(DatasetError, match="no test split; set --data.init_args.test_images"):
        dm.setup("test")
    victim = sorted((root / "masks" / "val").iterdir())[0]
    victim.unlink()
    with pytest.raises(DatasetError, match=rf"{victim.stem}.jpg: no mask named {victim.stem}"):
        dm.setup("validate")


@pytest.mark.parametrize(
    ("name", "text"), [("c.txt", "a\nb\n"), ("c.yaml", "names: [a, b]\n"), ("c.json", '["a", "b"]')]
)
def test_class_files(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert read_classes(str(tmp_path / name)) == ["a", "b"]
