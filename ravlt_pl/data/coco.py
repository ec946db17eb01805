"""COCO-2017 instances (detection + instance masks): the published 1x/3x pipelines, datasets, loaders.

Layout under ``root``: ``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``.
Files are checked by :mod:`.coco_files` and read with pycocotools (polygons and RLE → masks with
``COCO.annToMask``). COCO's 80 category ids are not contiguous (1..90 with gaps); labels are their
0-based rank (``COCODataModule.info.category_ids`` maps back). Training skips images without usable annotations
and leaves ``iscrowd`` objects out of the targets (mmdet's behaviour); evaluation keeps every image
and annotation, in original image coordinates, so the metric sees exactly what COCOeval sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import albumentations as A
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.pytorch import ToTensorV2
import numpy as np
import torch

from .base import AugmentedDataset, BaseDataModule, DatasetInfo
from .coco_files import CocoSplit, load_json, read_split
from .errors import DatasetError
from .images import ImageOnly, PredictFolder, collate_lists, read_rgb
from .transforms import KeepRatioResize


def read_image(path: Path, expected_hw: tuple[int, int], record: str) -> np.ndarray:
    """RGB uint8 (H, W, 3); EXIF orientation is ignored, as the annotations are in stored pixels."""
    image = np.array(read_rgb(path))  # writable: torch refuses to wrap a read-only array
    if image.shape[:2] != tuple(expected_hw):
        raise DatasetError(f"{path}: image is {image.shape[1]}×{image.shape[0]} px but {record} says "
                           f"{expected_hw[1]}×{expected_hw[0]}")  # fmt: skip
    return image


# -- augmentation ----------------------------------------------------------------------------------
class RandomRangeCrop(BaseCrop):
    """mmdet ``RandomCrop(crop_type='absolute_range')``: height and width each uniform in [lo, hi] (≤ the image).

    Boxes left outside the crop are dropped by the pipeline's ``BboxParams`` (negative crops allowed).
    """

    def __init__(self, size_range: tuple[int, int], p: float = 1.0) -> None:
        super().__init__(p=p)
        self.size_range = size_range

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        lo, hi = self.size_range
        crop_h = self.py_random.randint(min(height, lo), min(height, hi))
        crop_w = self.py_random.randint(min(width, lo), min(width, hi))
        y0, x0 = self.py_random.randint(0, height - crop_h), self.py_random.randint(0, width - crop_w)
        return {"crop_coords": (x0, y0, x0 + crop_w, y0 + crop_h)}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size_range",)


Recipe = Literal["1x", "3x"]


def train_transform(recipe: Recipe, scale: tuple[int, int]) -> A.Compose:
    """The published training pipelines at ``scale = (long, short)`` ((1333, 800) in the papers).

    1x: keep-ratio resize to fit (1333, 800) + horizontal flip. 3x (DETR / Sparse R-CNN style): flip,
    then either a multi-scale resize (short side 480–800 step 32) or resize to short 400/500/600 →
    random crop 384–600 → multi-scale resize; all sizes scale with ``short``.
    """
    long, short = scale
    if recipe == "1x":
        steps: list = [KeepRatioResize(long, [short]), A.HorizontalFlip(p=0.5)]
    elif recipe == "3x":
        multi = [round(short * (0.6 + 0.04 * k)) for k in range(11)]  # 480, 512, ..., 800
        crop = A.Sequential([
            KeepRatioResize(long, [round(short * f) for f in (0.5, 0.625, 0.75)]),  # 400, 500, 600
            RandomRangeCrop((round(short * 0.48), round(short * 0.75))),  # 384–600
            KeepRatioResize(long, multi),
        ])  # fmt: skip
        steps = [A.HorizontalFlip(p=0.5), A.OneOf([KeepRatioResize(long, multi), crop], p=1.0)]
    else:
        raise ValueError(f"recipe must be '1x' or '3x', got {recipe!r}")
    return A.Compose(steps, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "indices"]))


def eval_transform(scale: tuple[int, int]) -> A.Compose:
    """Keep-ratio resize to fit ``scale = (long, short)``; out comes a (3, H, W) uint8 tensor."""
    return A.Compose([KeepRatioResize(scale[0], [scale[1]]), ToTensorV2()])


# -- datasets ---------------------------------------------------------------------------------------
def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # (3, H, W) uint8


def _xyxy(anns: list[dict]) -> np.ndarray:
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return boxes


class COCODetection(AugmentedDataset):
    """One split. Train items: augmented image + ``boxes``/``labels``/``masks`` in its pixels.
    Eval items: resized image + every annotation in original pixels (``iscrowd``, ``area``, ``image_id``,
    ``orig_size``), the form torchmetrics' ``MeanAveragePrecision`` compares against."""

    def __init__(self, split: CocoSplit, transform: A.Compose, train: bool, with_masks: bool) -> None:
        self.split, self.transform, self.train, self.with_masks = split, transform, train, with_masks
        self.label_of = {cid: label for label, cid in enumerate(split.category_ids)}

    def __len__(self) -> int:
        return len(self.split.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id = self.split.image_ids[index]
        info = self.split.coco.imgs[image_id]
        record = f"{self.split.ann_file.name} (image id {image_id})"
        image = read_image(self.split.image_dir / info["file_name"], (info["height"], info["width"]), record)
        anns = self.split.annotations[image_id]
        labels = np.array([self.label_of[a["category_id"]] for a in anns], dtype=np.int64)
        masks = np.stack([self.split.coco.annToMask(a) for a in anns]) if self.with_masks and anns else None
        if self.train:
            return self._augment(image, anns, labels, masks)
        target = {
            "image_id": image_id,
            "orig_size": image.shape[:2],
            "boxes": torch.from_numpy(_xyxy(anns)),
            "labels": torch.from_numpy(labels),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns]),
        }
        if self.with_masks:
            empty = np.zeros((0, *image.shape[:2]), np.uint8)
            target["masks"] = torch.from_numpy(masks if masks is not None else empty)
        return self.transform(image=image)["image"], target

    def _augment(self, image, anns, labels, masks) -> tuple[torch.Tensor, dict]:
        height, width = image.shape[:2]
        boxes = _xyxy(anns).clip(0, [width, height, width, height])
        extra = {"masks": masks} if masks is not None else {}
        self.seed_transform()
        out = self.transform(image=image, bboxes=boxes, labels=labels, indices=np.arange(len(anns)), **extra)
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # torchvision rejects empty boxes
        target = {
            "boxes": torch.from_numpy(boxes[keep]),
            "labels": torch.from_numpy(np.asarray(out["labels"], dtype=np.int64)[keep]),
        }
        if masks is not None:
            kept = np.asarray(out["indices"], dtype=np.int64)[keep]
            target["masks"] = torch.from_numpy(np.ascontiguousarray(np.asarray(out["masks"])[kept]))
        return _to_tensor(out["image"]), target


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images keep their own sizes: a batch is a list of images and a list of targets."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# -- data module -----------------------------------------------------------------------------------
class COCODataModule(BaseDataModule):
    """COCO-2017 instances with the published detection pipelines.

    Args:
        root: dataset directory (``annotations/``, ``train2017/``, ``val2017/``).
        num_classes: categories expected in the annotation files (80 for COCO).
        recipe: ``1x`` (resize + flip) or ``3x`` (multi-scale + random-crop branch) training pipeline.
        scale: ``(long, short)`` bound of the keep-ratio resize used for evaluation and 1x training;
            the 3x sizes scale with ``short`` (published: (1333, 800)). Small values suit tests and demos.
        with_masks: decode instance masks (Mask R-CNN models); off for RetinaNet.
        train_split: training split name (``annotations/instances_<split>.json`` and the ``<split>/`` image folder).
        val_split: validation split name.
        test_split: test split name; COCO's test-dev has no public labels, so test uses val2017.
        **kwargs: ``predict_dir`` (default: the val images), the batch and loader settings: see
            :class:`BaseDataModule`.
    """

    layout_hint = "Expected the COCO-2017 layout: annotations/instances_{train,val}2017.json, train2017/, val2017/."

    def __init__(
        self,
        root: str | Path = "data/coco",
        num_classes: int = 80,
        recipe: Recipe = "1x",
        scale: tuple[int, int] = (1333, 800),
        with_masks: bool = True,
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str = "val2017",
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        if recipe not in ("1x", "3x"):
            raise ValueError(f"recipe must be '1x' or '3x', got {recipe!r}")
        self.num_classes, self.recipe, self.scale, self.with_masks = num_classes, recipe, tuple(scale), with_masks
        self.splits = {"train": train_split, "val": val_split, "test": test_split}

    def _dataset(self, name: str, train: bool) -> COCODetection:
        split = self.splits[name]
        ann_file = self.root / "annotations" / f"instances_{split}.json"
        result = read_split(ann_file, self.root / split, train, self.with_masks)
        if len(result.category_ids) != self.num_classes:
            raise DatasetError(f"{result.ann_file}: {len(result.category_ids)} categories, but num_classes is "
                               f"{self.num_classes}; set --data.init_args.num_classes")  # fmt: skip
        self._info = DatasetInfo(tuple(result.category_names), tuple(result.category_ids))
        transform = train_transform(self.recipe, self.scale) if train else eval_transform(self.scale)
        return COCODetection(result, transform, train, self.with_masks)

    def setup(self, stage: str | None = None) -> None:
        self.check_root()
        if stage in ("fit", None) and "train" not in self.datasets:
            self.datasets["train"] = self._dataset("train", train=True)
        if stage in ("fit", "validate", None) and "val" not in self.datasets:
            self.datasets["val"] = self._dataset("val", train=False)
        if stage == "test" and "test" not in self.datasets:
            self.datasets["test"] = self._dataset("test", train=False)
        if stage == "predict" and "predict" not in self.datasets:
            self.datasets["predict"] = self._predict_folder()
            self._info = self._predict_info()

    def _predict_folder(self) -> PredictFolder:
        """``predict_dir`` with its sub-folders; without one, the val split's images as its annotation file lists
        them (their COCO ids, ``file_name`` sub-folders included), or all images under the val folder."""
        transform = ImageOnly(eval_transform(self.scale))
        if self.predict_dir is not None:
            return PredictFolder(self.predict_dir, transform, recursive=True)
        folder = self.root / self.splits["val"]
        ann_file = self.root / "annotations" / f"instances_{self.splits['val']}.json"
        images = load_json(ann_file).get("images") if ann_file.is_file() else None
        listed = isinstance(images, list) and all(isinstance(i, dict) and {"id", "file_name"} <= set(i) for i in images)
        if not listed:
            return PredictFolder(folder, transform, recursive=True)
        return PredictFolder(folder, transform, files=[folder / i["file_name"] for i in images],
                             image_ids=[int(i["id"]) for i in images])  # fmt: skip

    def _predict_info(self) -> DatasetInfo:
        """Category ids/names from the val annotation file when there is one, else ``1..num_classes``."""
        ann_file = self.root / "annotations" / f"instances_{self.splits['val']}.json"
        if ann_file.is_file():
            categories = sorted((c["id"], c["name"]) for c in load_json(ann_file).get("categories", []))
            if len(categories) == self.num_classes:
                return DatasetInfo(tuple(n for _, n in categories), tuple(c for c, _ in categories))
        ids = tuple(range(1, self.num_classes + 1))
        return DatasetInfo(tuple(f"class_{i}" for i in ids), ids)

    def collate_fn(self, split: str):
        return collate_lists if split == "predict" else collate
