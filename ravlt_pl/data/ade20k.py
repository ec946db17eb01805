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

from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops import functional as fcrops
from albumentations.pytorch import ToTensorV2
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .base import AugmentedDataset, BaseDataModule
from .errors import DatasetError

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
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


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (n, 3) uint8: distinct colours by bit interleaving; 255 is a pale grey."""
    ids = np.arange(n)
    colours = np.zeros((n, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= (((ids >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return colours


# -- transforms: albumentations, plus two parameter rules it lacks ----------------------------------
class KeepRatioRescale(A.SmallestMaxSize):
    """mmseg's ``Resize(img_scale=(2048, 512), ratio_range, keep_ratio=True)``.

    A ratio r drawn from ``ratio_range`` scales the image by ``r · min(long/max(h, w), short/min(h, w))``
    (it fits inside long×short in either orientation). albumentations' max-size transforms
    bound one side only; this reuses their resizing (bilinear image, nearest mask) with mmseg's rule.
    """

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (1.0, 1.0)) -> None:
        super().__init__(
            max_size=min(scale), interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST, p=1.0
        )
        self.long_edge, self.short_edge = max(scale), min(scale)
        self.ratio_range = tuple(ratio_range)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(*self.ratio_range)
        return {"scale": ratio * min(self.long_edge / max(height, width), self.short_edge / min(height, width))}


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
        KeepRatioRescale(scale, ratio_range),
        CatMaxRatioCrop(crop_h, crop_w, cat_max_ratio),
        A.HorizontalFlip(p=0.5),
        *photometric_distortion(),
        A.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
        A.PadIfNeeded(crop_h, crop_w, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0,
                      fill_mask=IGNORE_INDEX),
        ToTensorV2(),
    ])  # fmt: skip


def eval_transform(scale: Sequence[int]) -> A.Compose:
    normalize = A.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return A.Compose([KeepRatioRescale(scale), normalize, ToTensorV2()])


# -- files -----------------------------------------------------------------------------------------
def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); grayscale images (ADE has a few) are expanded."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except OSError as err:
        raise DatasetError(f"{path}: cannot read image ({err})") from err


def read_label(path: Path, image_size: tuple[int, int], num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """Class indices (H, W) uint8 in 0..num_classes-1 or 255, checked against the image size (W, H)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise DatasetError(f"{path}: label must be a single-channel PNG of class indices, got mode {img.mode}")
            label = np.array(img)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read label ({err})") from err
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


class ADE20KDataset(AugmentedDataset):
    """(image, label) pairs; ``train`` applies the joint pipeline, eval keeps the label untouched.

    Items: ``image`` (3, h, w) float, ``label`` (H, W) uint8 (train: the crop; eval: original size),
    ``size`` (h, w) of the transformed image, ``name`` (file stem). Without labels (``predict``)
    ``label`` is absent and ``orig_size`` gives the size to predict at.
    """

    def __init__(self, samples: Sequence[tuple[Path, Path | None]], transform: A.Compose, train: bool,
                 num_classes: int, reduce_zero_label: bool) -> None:  # fmt: skip
        self.samples = list(samples)
        self.transform = transform
        self.train = train
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        item: dict[str, Any] = {"name": image_path.stem}
        if label_path is None:
            out = self.transform(image=image)
            item["orig_size"] = image.shape[:2]
        else:
            label = read_label(label_path, (image.shape[1], image.shape[0]), self.num_classes, self.reduce_zero_label)
            self.seed_transform()
            out = self.transform(image=image, mask=label) if self.train else self.transform(image=image)
            item["label"] = torch.as_tensor(out["mask"] if self.train else label)
        item["image"] = out["image"]
        item["size"] = tuple(out["image"].shape[-2:])
        return item


def collate_eval(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad images to the batch's largest (bottom/right, zeros); labels stay a list at their own sizes."""
    height = max(item["image"].shape[-2] for item in batch)
    width = max(item["image"].shape[-1] for item in batch)
    images = [F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2])) for x in (item["image"] for item in batch)]
    out = {"image": torch.stack(images), "size": [item["size"] for item in batch]}
    for key in ("label", "orig_size", "name"):
        if key in batch[0]:
            out[key] = [item[key] for item in batch]
    return out


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
        predict_root: folder of images for ``predict`` (default: ``root/images/validation``).
        global_batch_size, batch_size, num_workers, pin_memory, persistent_workers: see ``BaseDataModule``.
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
        predict_root: str | Path | None = None,
        global_batch_size: int | None = None,
        batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__(root, global_batch_size, batch_size, num_workers, pin_memory, persistent_workers)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self._class_names = class_names
        self.scale, self.ratio_range, self.crop_size = tuple(scale), tuple(ratio_range), tuple(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.eval_batch_size = eval_batch_size
        self.predict_root = Path(predict_root) if predict_root is not None else None
        self.train_dataset = self.val_dataset = self.predict_dataset = None

    @property
    def class_names(self) -> list[str]:
        if self._class_names is not None:
            return list(self._class_names)
        if self.num_classes == len(ADE20K_CLASSES):
            return list(ADE20K_CLASSES)
        return [f"class {i}" for i in range(self.num_classes)]

    def _dataset(self, split: str, train: bool) -> ADE20KDataset:
        transform = (train_transform(self.scale, self.ratio_range, self.crop_size, self.cat_max_ratio)
                     if train else eval_transform(self.scale))  # fmt: skip
        return ADE20KDataset(self.scan(split), transform, train, self.num_classes, self.reduce_zero_label)

    def scan(self, split: str) -> list[tuple[Path, Path]]:
        """(image, label) pairs of a split; every image must have a label PNG of its size."""
        folder = SPLIT_DIRS[split]
        image_dir, label_dir = self.root / "images" / folder, self.root / "annotations" / folder
        for directory in (image_dir, label_dir):
            if not directory.is_dir():
                raise DatasetError(f"{directory}: directory not found. {self.layout_hint}")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DatasetError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) found. {self.layout_hint}")
        labels = {p.name for p in label_dir.iterdir()}
        samples = []
        for image in images:
            label = label_dir / f"{image.stem}.png"
            if label.name not in labels:
                raise DatasetError(f"{image}: no label file; expected {label}")
            with Image.open(image) as img, Image.open(label) as lbl:  # headers only, no decoding
                if img.size != lbl.size:
                    raise DatasetError(
                        f"{label}: label is {lbl.size[0]}×{lbl.size[1]} px but its image {image.name} is "
                        f"{img.size[0]}×{img.size[1]}; a label must have its image's size"
                    )
            samples.append((image, label))
        return samples

    def setup(self, stage: str | None = None) -> None:
        self.check_root()
        if stage in (None, "fit"):
            self.train_dataset = self._dataset("train", train=True)
        if stage in (None, "fit", "validate", "test"):
            self.val_dataset = self._dataset("val", train=False)
        if stage == "predict":
            folder = self.predict_root or self.root / "images" / SPLIT_DIRS["val"]
            if not folder.is_dir():
                raise DatasetError(f"{folder}: predict folder not found; set --data.predict_root to a folder of images")
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) to predict")
            self.predict_dataset = ADE20KDataset([(p, None) for p in images], eval_transform(self.scale), False,
                                                 self.num_classes, self.reduce_zero_label)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self.make_loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.make_loader(self.val_dataset, train=False, collate_fn=collate_eval, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """ADE20K's test images have no public labels: ``test`` scores the validation split."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.make_loader(
            self.predict_dataset, train=False, collate_fn=collate_eval, batch_size=self.eval_batch_size
        )
