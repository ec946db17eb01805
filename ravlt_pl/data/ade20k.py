"""ADE20K (SceneParsing, ``ADEChallengeData2016``) with mmsegmentation's published pipelines.

Layout: ``root/{images,annotations}/{training,validation}/ADE_*.{jpg,png}``; a label pixel holds
0 ("other", ignored) or class k+1. With ``reduce_zero_label`` (the ADE20K convention) 0 becomes the
ignore index 255 and every other value drops by one, giving classes 0..149.

Train: random keep-ratio resize of 2048×512 by a ratio in .5–2, random 512×512 crop retried until no
class covers more than 75 % (``cat_max_ratio``), horizontal flip, photometric distortion,
normalise, pad to the crop (labels with 255). Eval: keep-ratio resize to fit 2048×512; the label
stays at its original size, and the task scores the prediction resized back to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops import functional as fcrops
from albumentations.pytorch import ToTensorV2
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .base import AugmentedDataset, BaseDataModule, DatasetInfo
from .errors import DatasetError
from .images import SIXTEEN_BIT_MODES, ImageOnly, PredictFolder, collate_padded, list_images, read_rgb
from .transforms import KeepRatioResize

IGNORE_INDEX = 255
SPLIT_DIRS = {"train": "training", "val": "validation"}

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """The ADE20K names for its 150 classes, else ``class 0``, ``class 1``, ..."""
    if num_classes == len(ADE20K_CLASSES):
        return ADE20K_CLASSES
    return tuple(f"class {i}" for i in range(num_classes))


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (n, 3) uint8: distinct colours by bit interleaving; 255 is a pale grey."""
    ids = np.arange(n)
    colours = np.zeros((n, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= (((ids >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return colours


# -- transforms: albumentations, plus the crop rule it lacks ----------------------------------------
class CatMaxRatioCrop(A.RandomCrop):
    """mmseg's ``RandomCrop(crop_size, cat_max_ratio)``: up to ``tries`` random crops until no class
    (ignore excluded) covers ``cat_max_ratio`` or more of the crop and at least two classes show.

    Crops larger than the image are clipped to it (padding comes later, after normalisation).
    """

    def __init__(
        self, height: int, width: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX, tries: int = 10
    ) -> None:
        super().__init__(height, width, p=1.0)
        if not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore_index must be a uint8 label value (0..255), got {ignore_index}")
        self.cat_max_ratio, self.ignore_index, self.tries = cat_max_ratio, ignore_index, tries

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        shape = params["shape"][:2]
        mask = data.get("mask")
        for _ in range(self.tries):
            start_y, start_x = self.py_random.random(), self.py_random.random()
            coords = fcrops.get_crop_coords(shape, (self.height, self.width), start_y, start_x)
            if mask is None or self.cat_max_ratio >= 1:
                break
            x1, y1, x2, y2 = coords
            # A histogram, not np.unique: unique sorts the crop (it was half the pipeline's time).
            counts = np.bincount(mask[y1:y2, x1:x2].ravel(), minlength=self.ignore_index + 1)
            counts[self.ignore_index] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return {"crop_coords": coords, "pad_params": None}


def photometric_distortion() -> list[A.BasicTransform]:
    """mmseg's ``PhotoMetricDistortion`` from albumentations parts, each applied with p .5:
    brightness ±32, then contrast ×[.5, 1.5] either first or last (a coin flip per image, as in
    mmseg) around saturation ×[.5, 1.5] and hue ±18 (OpenCV hue units).

    One difference, minor: saturation blends with grey as torchvision does (mmseg scales HSV's S).
    """

    def contrast() -> A.BasicTransform:
        return A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.5, p=0.5)

    def colour() -> list[A.BasicTransform]:
        return [
            A.ColorJitter(brightness=0.0, contrast=0.0, saturation=(0.5, 1.5), hue=0.0, p=0.5),
            A.HueSaturationValue(hue_shift_limit=18, sat_shift_limit=0, val_shift_limit=0, p=0.5),
        ]

    return [
        A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.0, p=0.5),
        A.OneOf([A.Sequential([contrast(), *colour()]), A.Sequential([*colour(), contrast()])], p=1.0),
    ]


def train_transform(
    scale: Sequence[int], ratio_range: Sequence[float], crop_size: Sequence[int], cat_max_ratio: float
) -> A.Compose:
    crop_h, crop_w = crop_size
    return A.Compose([
        KeepRatioResize(max(scale), [min(scale)], ratio_range),
        CatMaxRatioCrop(crop_h, crop_w, cat_max_ratio),
        A.HorizontalFlip(p=0.5),
        *photometric_distortion(),
        A.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
        A.PadIfNeeded(crop_h, crop_w, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0,
                      fill_mask=IGNORE_INDEX),
        ToTensorV2(),
    ])  # fmt: skip


def eval_transform(scale: Sequence[int]) -> A.Compose:
    """Keep-ratio resize to fit ``scale`` (mmseg's ``Resize(img_scale, keep_ratio=True)``), normalise."""
    normalize = A.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return A.Compose([KeepRatioResize(max(scale), [min(scale)]), normalize, ToTensorV2()])


# -- files -----------------------------------------------------------------------------------------
def read_label(path: Path, image_size: tuple[int, int], num_classes: int, reduce_zero_label: bool,
               ignore_value: int = IGNORE_INDEX) -> np.ndarray:  # fmt: skip
    """Class indices (H, W) uint8 in 0..num_classes-1 or 255, checked against the image size (W, H).

    Labels are 8-bit by the ADE20K spec; a 16-bit PNG is accepted while its values fit in 8 bits.
    ``ignore_value``: the file's value for "not labelled", read as 255 (ignore).
    """
    try:
        with Image.open(path) as img:
            mode, label = img.mode, np.array(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: cannot be read as a label image ({err})") from None
    if mode not in ("L", "P", "I", *SIXTEEN_BIT_MODES):
        raise DatasetError(f"{path}: label must be a single-channel PNG of class indices, got mode {mode}")
    if label.dtype != np.uint8:
        if label.max() > 255 or label.min() < 0:
            raise DatasetError(f"{path}: label value {int(label.max())} does not fit in 8 bits; ADE20K labels are "
                               "uint8 class indices (0 = other, 255 = ignore)")  # fmt: skip
        label = label.astype(np.uint8)
    if ignore_value != IGNORE_INDEX:
        label = np.where(label == ignore_value, np.uint8(IGNORE_INDEX), label)
    if label.shape[::-1] != tuple(image_size):
        raise DatasetError(
            f"{path}: label is {label.shape[1]}×{label.shape[0]} px but its image is "
            f"{image_size[0]}×{image_size[1]}; a label must have its image's size"
        )
    if reduce_zero_label:  # 0 ("other") → ignore, k → k - 1 (uint8 arithmetic: 0 - 1 wraps to 255)
        label = label - np.uint8(1)
        label[label == 254] = IGNORE_INDEX  # a raw 255 stays ignored
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        value = int(label[bad][0])
        raw = f" ({value + 1} in the file, 0-based {value} after reduce_zero_label)" if reduce_zero_label else ""
        raise DatasetError(
            f"{path}: label value {value}{raw} is neither a class in 0..{num_classes - 1} nor {IGNORE_INDEX} (ignore)"
        )
    return label


def header_size(path: Path) -> tuple[int, int]:
    """(W, H) from the file's header (no decoding); a :class:`DatasetError` naming it when it is no image."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: cannot be read as an image ({err})") from None


class ADE20KDataset(AugmentedDataset):
    """(image, label) pairs; ``train`` applies the joint pipeline, eval keeps the label untouched.

    Items: ``image`` (3, h, w) float, ``label`` (H, W) uint8 (train: the crop; eval: original size),
    ``path`` (the image file).
    """

    def __init__(self, samples: Sequence[tuple[Path, Path]], transform: A.Compose, train: bool,
                 num_classes: int, reduce_zero_label: bool, ignore_value: int = IGNORE_INDEX) -> None:  # fmt: skip
        self.samples = list(samples)
        self.ignore_value = ignore_value
        self.transform = transform
        self.train = train
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.samples[index]
        image = np.asarray(read_rgb(image_path))  # ADE has a few grayscale images: expanded to RGB
        label = read_label(label_path, (image.shape[1], image.shape[0]), self.num_classes, self.reduce_zero_label,
                           self.ignore_value)  # fmt: skip
        if self.train:
            self.seed_transform()
            out = self.transform(image=image, mask=label)
            return {"image": out["image"], "label": torch.as_tensor(out["mask"]), "path": str(image_path)}
        return {"image": self.transform(image=image)["image"], "label": torch.as_tensor(label), "path": str(image_path)}


# -- the DataModule --------------------------------------------------------------------------------
class ADE20KDataModule(BaseDataModule):
    """ADE20K semantic segmentation (150 classes) in its release layout.

    Args:
        root: the ``ADEChallengeData2016`` directory (``images/`` and ``annotations/`` inside).
        num_classes: classes after ``reduce_zero_label`` (150 for ADE20K).
        reduce_zero_label: label 0 is "other": ignore it (255) and shift the rest down by one.
        class_names: names for reports (default: the ADE20K names when ``num_classes`` is 150).
        scale: (long, short) edge bounds of the keep-ratio resize; eval fits the image inside, train
            multiplies the fit by a ratio from ``ratio_range`` (published: 2048, 512).
        ratio_range: train resize ratio range (published: 0.5–2.0).
        crop_size: (height, width) of the train crop (published: 512×512).
        cat_max_ratio: a train crop is redrawn (up to 10 times) while one class covers this much of it.
        eval_batch_size: images per device in validate/test/predict; 1 (published) runs every image at
            its own size, larger values pad each batch to its largest image.
        **kwargs: ``predict_dir`` (default: ``root/images/validation``), the batch and loader
            settings: see :class:`BaseDataModule`.
    """

    layout_hint = "Expected ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png}."

    def __init__(
        self,
        root: str | Path,
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        class_names: list[str] | None = None,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        crop_size: tuple[int, int] = (512, 512),
        cat_max_ratio: float = 0.75,
        eval_batch_size: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self._info = DatasetInfo(tuple(class_names) if class_names is not None else default_class_names(num_classes))
        self.scale, self.ratio_range, self.crop_size = tuple(scale), tuple(ratio_range), tuple(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.eval_batch_size = eval_batch_size

    def _dataset(self, split: str, train: bool) -> ADE20KDataset:
        transform = (train_transform(self.scale, self.ratio_range, self.crop_size, self.cat_max_ratio)
                     if train else eval_transform(self.scale))  # fmt: skip
        return ADE20KDataset(self.scan(split), transform, train, self.num_classes, self.reduce_zero_label,
                             self.ignore_value)  # fmt: skip

    #: the label files' value for "not labelled" (read as 255, ignore)
    ignore_value = IGNORE_INDEX

    def split_dirs(self, split: str) -> tuple[Path, Path]:
        """(image folder, label folder) of ``split``."""
        folder = SPLIT_DIRS[split]
        return self.root / "images" / folder, self.root / "annotations" / folder

    def scan(self, split: str) -> list[tuple[Path, Path]]:
        """(image, label) pairs of a split, paired by file stem; every image must have a label PNG of its size."""
        image_dir, label_dir = self.split_dirs(split)
        for directory in (image_dir, label_dir):
            if not directory.is_dir():
                raise DatasetError(f"{directory}: directory not found. {self.layout_hint}")
        images = list_images(image_dir)
        if not images:
            raise DatasetError(f"{image_dir}: no images found. {self.layout_hint}")
        labels = {p.name for p in label_dir.iterdir()}
        samples = []
        for image in images:
            label = label_dir / f"{image.stem}.png"
            if label.name not in labels:
                raise DatasetError(f"{image}: no label file; expected {label}")
            samples.append((image, label))
        return self.checked_sizes(samples)

    @staticmethod
    def checked_sizes(samples: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
        """``samples`` once every label is known to have its image's size (read from the headers)."""
        for image, label in samples:
            image_size, label_size = header_size(image), header_size(label)
            if image_size != label_size:
                raise DatasetError(
                    f"{label}: label is {label_size[0]}×{label_size[1]} px but its image {image.name} is "
                    f"{image_size[0]}×{image_size[1]}; a label must have its image's size"
                )
        return samples

    def setup(self, stage: str | None = None) -> None:
        self.check_root()
        if stage in (None, "fit"):
            self.datasets["train"] = self._dataset("train", train=True)
        if stage in (None, "fit", "validate", "test"):
            self.datasets["val"] = self.datasets["test"] = self._dataset("val", train=False)
        if stage == "test":
            self.datasets["test"] = self.test_dataset()
        if stage == "predict":
            folder = self.predict_dir or self.split_dirs("val")[0]
            self.datasets["predict"] = PredictFolder(folder, ImageOnly(eval_transform(self.scale)))

    def test_dataset(self) -> ADE20KDataset:
        """What ``test`` scores: ADE20K's test images have no public labels, so the validation split."""
        return self.datasets["val"]

    def collate_fn(self, split: str) -> Callable | None:
        return None if split == "train" else collate_padded

    def loader_batch_size(self, split: str) -> int:
        return self.per_device_batch_size() if split == "train" else self.eval_batch_size
