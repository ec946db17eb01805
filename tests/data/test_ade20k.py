"""ADE20KDataModule: the published pipelines, label reduction, and every bad-input error naming its file."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from ravlt_pl.data.ade20k import ADE20K_CLASSES, IGNORE_INDEX, ADE20KDataModule, CatMaxRatioCrop, photometric_distortion
from ravlt_pl.data.base import DatasetInfo
from ravlt_pl.data.errors import DatasetError
from ravlt_pl.data.synthetic import make_segmentation


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_segmentation(tmp_path_factory.mktemp("ade") / "synth", num_train=4, num_val=3, image_size=(64, 48))


def datamodule(root: Path, **kwargs) -> ADE20KDataModule:
    args = dict(num_classes=5, scale=(64, 48), crop_size=(32, 32), batch_size=2, num_workers=0, pin_memory=False)
    return ADE20KDataModule(root, **{**args, **kwargs})


def copy_split(src: Path, dst: Path) -> Path:
    """A writable copy of the synthetic set for tests that break it."""
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return dst


def test_reduce_zero_label_ignores_other_and_shifts_classes(ade_root: Path) -> None:
    raw = np.array(Image.open(ade_root / "annotations/validation/ADE_val_00000001.png"))
    dm = datamodule(ade_root)
    dm.setup("validate")
    label = dm.datasets["val"][0]["label"].numpy()
    assert np.array_equal(label == IGNORE_INDEX, raw == 0)
    assert np.array_equal(label[raw > 0], raw[raw > 0] - 1)
    kept = datamodule(ade_root, num_classes=6, reduce_zero_label=False)
    kept.setup("validate")
    assert np.array_equal(kept.datasets["val"][0]["label"].numpy(), raw)


def test_eval_keeps_aspect_to_fit_2048x512_and_label_at_original_size(ade_root: Path) -> None:
    dm = datamodule(ade_root, scale=(2048, 512))
    dm.setup("validate")
    item = dm.datasets["val"][0]
    assert item["image"].shape == (3, 512, 683)  # 64×48 × min(2048/64, 512/48)
    assert item["label"].shape == (48, 64)
    assert item["image"].dtype == torch.float32 and abs(float(item["image"].mean())) < 3


def test_train_crop_pads_labels_with_ignore_and_images_with_zero(ade_root: Path) -> None:
    dm = datamodule(ade_root, ratio_range=(0.5, 0.5), crop_size=(32, 32))  # 64×48 → 32×24, below the crop
    dm.setup("fit")
    item = dm.datasets["train"][0]
    assert item["image"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
    assert (item["label"][24:] == IGNORE_INDEX).all() and (item["image"][:, 24:] == 0).all()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].shape == (2, 32, 32)


def test_cat_max_ratio_redraws_crops_dominated_by_one_class() -> None:
    label = np.zeros((40, 100), np.uint8)
    label[:, 50:] = 1  # a crop of 40×40 mixes both classes enough only near the border at x = 50

    def mixed_fraction(ratio: float) -> float:
        crop = CatMaxRatioCrop(40, 40, cat_max_ratio=ratio)
        crop.set_random_seed(0)
        outs = [crop(image=np.zeros((40, 100, 3), np.uint8), mask=label)["mask"] for _ in range(100)]
        return float(np.mean([np.bincount(m.ravel(), minlength=2).max() / m.size < 0.75 for m in outs]))

    assert mixed_fraction(0.75) > 0.9
    assert mixed_fraction(1.0) < 0.5


def test_cat_max_ratio_ignores_the_ignore_index() -> None:
    label = np.full((40, 40), IGNORE_INDEX, np.uint8)
    label[:, :4] = 0  # one class only (ignore excluded): every try fails, the last crop is used
    crop = CatMaxRatioCrop(20, 20)
    assert crop(image=np.zeros((40, 40, 3), np.uint8), mask=label)["mask"].shape == (20, 20)


def test_augmentations_follow_torch_seed(ade_root: Path) -> None:
    items = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        dm = datamodule(ade_root)
        dm.setup("fit")
        items.append(dm.datasets["train"][0]["image"])
    assert torch.equal(items[0], items[1]) and not torch.equal(items[0], items[2])


def test_predict_folder_items_carry_original_size(ade_root: Path) -> None:
    dm = datamodule(ade_root, scale=(128, 96), predict_dir=str(ade_root / "images/training"))
    dm.setup("predict")
    item = dm.datasets["predict"][0]
    assert "label" not in item and item["orig_size"] == (48, 64) and item["image"].shape == (3, 96, 128)
    assert item["path"] == str(ade_root / "images/training/ADE_train_00000001.jpg")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["path"] == [item["path"]] and batch["size"] == [(96, 128)]


def test_class_names_default_to_ade20k() -> None:
    assert ADE20KDataModule("x", batch_size=1).info == DatasetInfo(ADE20K_CLASSES) and len(ADE20K_CLASSES) == 150
    assert ADE20KDataModule("x", num_classes=2, batch_size=1).info.class_names == ("class 0", "class 1")
    assert ADE20KDataModule("x", num_classes=1, class_names=["sky"], batch_size=1).info.class_names == ("sky",)
    with pytest.raises(ValueError, match="class_names"):
        ADE20KDataModule("x", num_classes=2, class_names=["a"], batch_size=1)


# -- bad input --------------------------------------------------------------------------------------
def test_missing_root_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere: dataset directory not found"):
        datamodule(tmp_path / "nowhere").setup("fit")


def test_image_without_label_names_the_image(ade_root: Path, tmp_path: Path) -> None:
    root = copy_split(ade_root, tmp_path / "ade")
    (root / "annotations/training/ADE_train_00000002.png").unlink()
    with pytest.raises(
        DatasetError, match=r"ADE_train_00000002\.jpg: no label file; expected .*ADE_train_00000002\.png"
    ):
        datamodule(root).setup("fit")


def test_label_of_another_size_names_the_label(ade_root: Path, tmp_path: Path) -> None:
    root = copy_split(ade_root, tmp_path / "ade")
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(root / "annotations/validation/ADE_val_00000003.png")
    with pytest.raises(DatasetError, match=r"ADE_val_00000003\.png: label is 64×40 px but its image .* is 64×48"):
        datamodule(root).setup("validate")


def test_label_value_outside_the_classes_names_the_label(ade_root: Path, tmp_path: Path) -> None:
    root = copy_split(ade_root, tmp_path / "ade")
    path = root / "annotations/training/ADE_train_00000001.png"
    label = np.array(Image.open(path))
    label[0, 0] = 9  # 8 after reduce_zero_label, with 5 classes
    Image.fromarray(label).save(path)
    dm = datamodule(root)
    dm.setup("fit")  # values are checked when a label is decoded
    message = r"ADE_train_00000001\.png: label value 8 \(9 in the file, 0-based 8 after reduce_zero_label\) is neither a class in 0\.\.4 nor 255"
    with pytest.raises(DatasetError, match=message):
        dm.datasets["train"][0]
    with pytest.raises(DatasetError, match=message):
        list(dm.train_dataloader())


def test_raw_255_stays_ignored_after_reduction(ade_root: Path, tmp_path: Path) -> None:
    root = copy_split(ade_root, tmp_path / "ade")
    path = root / "annotations/validation/ADE_val_00000001.png"
    label = np.array(Image.open(path))
    label[0, 0] = 255
    Image.fromarray(label).save(path)
    dm = datamodule(root)
    dm.setup("validate")
    assert dm.datasets["val"][0]["label"][0, 0] == IGNORE_INDEX


def test_colour_label_is_rejected(ade_root: Path, tmp_path: Path) -> None:
    root = copy_split(ade_root, tmp_path / "ade")
    Image.new("RGB", (64, 48)).save(root / "annotations/validation/ADE_val_00000002.png")
    dm = datamodule(root)
    dm.setup("validate")
    with pytest.raises(DatasetError, match=r"ADE_val_00000002\.png: label must be a single-channel PNG"):
        dm.datasets["val"][1]


def test_empty_split_names_the_folder(ade_root: Path, tmp_path: Path) -> None:
    root = copy_split(ade_root, tmp_path / "ade")
    for path in (root / "images/validation").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"images/validation: no images"):
        datamodule(root).setup("validate")


def test_photometric_distortion_puts_contrast_first_or_last() -> None:
    """mmseg draws per image whether contrast comes before or after the colour steps."""
    brightness, orders = photometric_distortion()
    assert brightness.brightness_limit != (0.0, 0.0)
    first, last = ([type(t).__name__ for t in branch.transforms] for branch in orders.transforms)
    assert first[0] == last[-1] == "RandomBrightnessContrast" and first[1:] == last[:-1]
    pipeline = A.Compose(photometric_distortion(), seed=0)
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    outs = [pipeline(image=image)["image"] for _ in range(8)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert len({o.tobytes() for o in outs}) > 1


def test_crop_rejects_an_ignore_index_outside_uint8() -> None:
    with pytest.raises(ValueError, match="ignore_index"):
        CatMaxRatioCrop(8, 8, ignore_index=-1)


def test_sixteen_bit_label_within_uint8_is_read(ade_root: Path, tmp_path: Path) -> None:
    root = copy_split(ade_root, tmp_path / "ade")
    path = root / "annotations/validation/ADE_val_00000001.png"
    raw = np.array(Image.open(path))
    Image.fromarray(raw.astype(np.uint16)).save(path)  # a 16-bit PNG (Pillow mode I;16)
    dm = datamodule(root, num_classes=6, reduce_zero_label=False)
    dm.setup("validate")
    assert np.array_equal(dm.datasets["val"][0]["label"].numpy(), raw)


def test_sixteen_bit_label_beyond_uint8_is_refused_naming_the_file(ade_root: Path, tmp_path: Path) -> None:
    root = copy_split(ade_root, tmp_path / "ade")
    path = root / "annotations/validation/ADE_val_00000001.png"
    label = np.array(Image.open(path)).astype(np.uint16)
    label[0, 0] = 300
    Image.fromarray(label).save(path)
    dm = datamodule(root)
    dm.setup("validate")
    with pytest.raises(DatasetError, match=r"ADE_val_00000001\.png: label value 300 does not fit in 8 bits"):
        dm.datasets["val"][0]


@pytest.mark.parametrize(
    "which", ["images/training/ADE_train_00000002.jpg", "annotations/training/ADE_train_00000002.png"]
)
def test_image_or_label_that_is_no_image_names_the_file(ade_root: Path, tmp_path: Path, which: str) -> None:
    root = copy_split(ade_root, tmp_path / "ade")
    (root / which).write_text("not an image")
    with pytest.raises(DatasetError, match=rf"{which}: cannot be read as an image"):
        datamodule(root).setup("fit")


def test_sixteen_bit_grayscale_image_keeps_its_top_byte(ade_root: Path, tmp_path: Path) -> None:
    root = copy_split(ade_root, tmp_path / "ade")
    path = root / "images/validation/ADE_val_00000001.jpg"
    gray = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21  # 0..64491
    png = path.with_suffix(".png")
    path.unlink()
    Image.fromarray(gray).save(png)  # mode I;16
    dm = datamodule(root, scale=(64, 48))
    dm.setup("validate")
    image = dm.datasets["val"][0]["image"]  # normalised; undo it
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = (image * std[:, None, None] + mean[:, None, None]) * 255
    assert torch.allclose(pixels[0], torch.from_numpy((gray >> 8).astype(np.float32)), atol=0.01)
