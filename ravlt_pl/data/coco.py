"""COCO-2017 instances (detection + instance masks): validation, the published 1x/3x pipelines, loaders.

Layout under ``root``: ``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``.
Files are read with pycocotools (polygons and RLE → masks with ``COCO.annToMask``). COCO's 80
category ids are not contiguous (1..90 with gaps); labels are their 0-based rank
(:attr:`COCODataModule.category_ids` maps back). Training skips images without usable annotations
and leaves ``iscrowd`` objects out of the targets (mmdet's behaviour); evaluation keeps every image
and annotation, in original image coordinates, so the metric sees exactly what COCOeval sees.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import albumentations as A
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.pytorch import ToTensorV2
import numpy as np
import torch
from pycocotools.coco import COCO

from .base import AugmentedDataset, BaseDataModule, DatasetInfo
from .errors import DatasetError
from .images import ImageOnly, PredictFolder, collate_lists, read_rgb
from .transforms import KeepRatioResize

log = logging.getLogger(__name__)
_REQUIRED = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


# -- annotation files ------------------------------------------------------------------------------
@dataclass
class CocoSplit:
    """A validated annotation file: the pycocotools index, the images used and their annotations."""

    ann_file: Path
    image_dir: Path
    coco: COCO
    image_ids: list[int]
    annotations: dict[int, list[dict]]  # image id → the annotations this split uses
    category_ids: list[int]  # label → COCO category id (sorted ids)
    category_names: list[str]


def read_split(ann_file: Path, image_dir: Path, train: bool, with_masks: bool) -> CocoSplit:
    """Read and check ``ann_file``; every problem is a :class:`DatasetError` naming file and record.

    ``train=True`` drops crowd objects and degenerate boxes (under 1 px, zero area, outside the
    image; the official files have a few), and images left without annotations.
    """
    data = _load_json(ann_file)
    name = ann_file.name
    required = dict(_REQUIRED, annotations=_REQUIRED["annotations"] + (("segmentation",) if with_masks else ()))
    for key, fields in required.items():
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: no {key!r} list; a COCO instances file has {', '.join(required)}")
        for i, record in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(record, dict) or f not in record]
            if missing:
                rid = record.get("id") if isinstance(record, dict) else None
                raise DatasetError(f"{name}: {key}[{i}] (id {rid}) lacks {', '.join(map(repr, missing))}; "
                                   f"each entry of {key!r} needs {', '.join(fields)}")  # fmt: skip
    categories = {c["id"]: c["name"] for c in data["categories"]}
    images: dict[int, int] = {}
    for i, img in enumerate(data["images"]):
        file_name = img["file_name"]
        if not isinstance(file_name, str) or Path(file_name).is_absolute() or ".." in Path(file_name).parts:
            raise DatasetError(f"{name}: images[{i}] (id {img['id']}) has file_name {file_name!r}; it must be a "
                               f"relative path inside {image_dir} (not absolute, no '..')")  # fmt: skip
        if img["id"] in images:
            first = data["images"][images[img["id"]]]
            raise DatasetError(f"{name}: image id {img['id']} is used twice (images[{images[img['id']]}] "
                               f"{first['file_name']!r} and images[{i}] {img['file_name']!r})")  # fmt: skip
        images[img["id"]] = i
    annotations: dict[int, list[dict]] = {image_id: [] for image_id in images}
    degenerate = 0
    for i, ann in enumerate(data["annotations"]):
        where = f"{name}: annotation {ann['id']} (annotations[{i}])"
        if ann["category_id"] not in categories:
            raise DatasetError(f"{where} has category_id {ann['category_id']}, which is not one of the "
                               f"categories {sorted(categories)}")  # fmt: skip
        if ann["image_id"] not in images:
            raise DatasetError(f"{where} refers to image_id {ann['image_id']}, which is not in 'images'")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise DatasetError(f"{where} has bbox {box!r}; expected [x, y, width, height]")
        if box[2] < 0 or box[3] < 0:
            raise DatasetError(f"{where} has bbox {box}; width and height must be positive")
        if with_masks:
            check_segmentation(ann["segmentation"], data["images"][images[ann["image_id"]]], where)
        if train and ann.get("iscrowd", 0):
            continue
        if train and _is_degenerate(ann, data["images"][images[ann["image_id"]]]):
            degenerate += 1
            continue
        annotations[ann["image_id"]].append(ann)
    image_ids = [image_id for image_id in images if annotations[image_id] or not train]
    if train:
        log.warning("%s: dropped %d degenerate boxes (under 1 px, zero area or outside the image); "
                    "skipped %d of %d images without usable annotations",
                    ann_file, degenerate, len(images) - len(image_ids), len(images))  # fmt: skip
    _check_image_files(image_dir, [data["images"][images[i]] for i in image_ids], images, name)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    ids = sorted(categories)
    return CocoSplit(ann_file, image_dir, coco, image_ids, annotations, ids, [categories[c] for c in ids])


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not a JSON file ({err})") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with images, annotations, categories")
    return data


def _is_degenerate(ann: dict, image: dict) -> bool:
    x, y, w, h = ann["bbox"]
    inside_w = min(x + w, image["width"]) - max(x, 0)
    inside_h = min(y + h, image["height"]) - max(y, 0)
    return w < 1 or h < 1 or ann.get("area", w * h) <= 0 or inside_w <= 0 or inside_h <= 0


def _check_image_files(image_dir: Path, records: list[dict], index: dict[int, int], name: str) -> None:
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: image folder not found (needed by {name})")
    present = set(os.listdir(image_dir))
    for img in records:
        file_name = img["file_name"]
        if file_name not in present and not (image_dir / file_name).is_file():
            raise DatasetError(f"{image_dir / file_name}: image file not found; {name} lists it as "
                               f"images[{index[img['id']]}] (id {img['id']})")  # fmt: skip


def check_segmentation(segmentation: Any, image: dict, where: str) -> None:
    """Refuse what pycocotools would turn into a wrong mask or a crash: polygons under 3 points or
    with an odd coordinate count (4 numbers it takes for a box), RLE not of the image's size or whose
    run lengths do not cover it exactly."""
    height, width = image["height"], image["width"]
    if isinstance(segmentation, list):
        if not segmentation:
            raise DatasetError(f"{where} has an empty segmentation list; expected polygons [[x1, y1, x2, y2, ...], ...]")
        for k, polygon in enumerate(segmentation):
            numbers = isinstance(polygon, list) and all(isinstance(v, (int, float)) for v in polygon)
            if not numbers or len(polygon) < 6 or len(polygon) % 2:
                count = len(polygon) if isinstance(polygon, list) else type(polygon).__name__
                raise DatasetError(f"{where}: polygon {k} has {count} coordinates; a polygon is an even "
                                   "count (x, y pairs) of at least 6 numbers")  # fmt: skip
        return
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise DatasetError(f"{where} has segmentation of type {type(segmentation).__name__}; expected polygons "
                           "or RLE {'size': [h, w], 'counts': ...}")  # fmt: skip
    if list(segmentation["size"]) != [height, width]:
        raise DatasetError(f"{where}: RLE size {segmentation['size']} differs from its image's [{height}, {width}]")
    counts = segmentation["counts"]
    runs = rle_string_runs(counts) if isinstance(counts, str) else counts
    valid = isinstance(runs, list) and all(isinstance(r, int) and r >= 0 for r in runs)
    if not valid or sum(runs) != height * width:
        covered = f"run lengths summing to {sum(runs)}" if valid else "malformed counts"
        raise DatasetError(f"{where}: RLE has {covered}; its {height}×{width} image needs {height * width} pixels")


def rle_string_runs(counts: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string, or None when it is malformed.

    pycocotools' ``rleFrString`` decodes it without checks (a short string leaves pixels unset, a
    cut one reads past its end) and has no Python API, so its format is read here: 6-bit characters
    from '0', 5 value bits each, bit 5 "more follows", the last one's bit 4 the sign; from the third
    run on, values are deltas to the run two before.
    """
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        code = ord(char) - 48
        if not 0 <= code < 64:
            return None
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value -= 1 << shift
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
        value = shift = 0
    return runs if shift == 0 else None


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
            folder = self.predict_dir or self.root / self.splits["val"]
            self.datasets["predict"] = PredictFolder(folder, ImageOnly(eval_transform(self.scale)))
            self._info = self._predict_info()

    def _predict_info(self) -> DatasetInfo:
        """Category ids/names from the val annotation file when there is one, else ``1..num_classes``."""
        ann_file = self.root / "annotations" / f"instances_{self.splits['val']}.json"
        if ann_file.is_file():
            categories = sorted((c["id"], c["name"]) for c in _load_json(ann_file).get("categories", []))
            if len(categories) == self.num_classes:
                return DatasetInfo(tuple(n for _, n in categories), tuple(c for c, _ in categories))
        ids = tuple(range(1, self.num_classes + 1))
        return DatasetInfo(tuple(f"class_{i}" for i in ids), ids)

    def collate_fn(self, split: str):
        return collate_lists if split == "predict" else collate
