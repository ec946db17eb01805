"""COCO-2017 instances (detection + instance masks): the published 1x/3x pipelines, datasets, loaders.

Layout under ``root``: ``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``, or a
labelling tool's export (Roboflow, Label Studio, CVAT; see :mod:`.coco_layouts`). Files are checked
by :mod:`.coco_files` and read with pycocotools (polygons and RLE → masks with ``COCO.annToMask``).
COCO's 80 category ids are not contiguous (1..90 with gaps); labels are their 0-based rank
(``COCODataModule.info.category_ids`` maps back). Training skips images without usable annotations and
leaves ``iscrowd`` objects out of the targets (mmdet's behaviour); evaluation keeps every image and
annotation, in original image coordinates, so the metric sees exactly what COCOeval sees.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.pytorch import ToTensorV2

from .base import AugmentedDataset, BaseDataModule, DatasetInfo
from .coco_files import CocoSplit, load_json, read_split
from .coco_layouts import Layout, SplitFiles, split_files
from .errors import DatasetError
from .images import ImageOnly, PredictFolder, collate_lists, displayed_size, read_rgb
from .transforms import KeepRatioResize

log = logging.getLogger(__name__)


def read_image(path: Path, expected_hw: tuple[int, int], record: str) -> np.ndarray:
    """RGB uint8 (H, W, 3); EXIF orientation is ignored, as the annotations are in stored pixels."""
    image = np.array(read_rgb(path))  # writable: torch refuses to wrap a read-only array
    if image.shape[:2] != tuple(expected_hw):
        turned = displayed_size(path) == (expected_hw[1], expected_hw[0])
        why = (
            "; that is its size as displayed (its EXIF orientation turns it by 90°): annotations must refer to "
            "the stored pixels, so export them from the unturned image or save it turned, without the tag"
        )
        raise DatasetError(f"{path}: image is {image.shape[1]}×{image.shape[0]} px but {record} says "
                           f"{expected_hw[1]}×{expected_hw[0]}{why if turned else ''}")  # fmt: skip
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
        image = read_image(self.split.paths[image_id], (info["height"], info["width"]), record)
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
    """COCO-format instances with the published detection pipelines, in the official or a tool's layout.

    Args:
        root: dataset directory: COCO-2017 (``annotations/``, ``train2017/``, ``val2017/``) or a
            labelling tool's export (see :mod:`.coco_layouts`).
        num_classes: categories expected in the train annotation file (80 for COCO), checked; ``None``:
            the categories it declares (the task gets the number through the CLI link).
        recipe: ``1x`` (resize + flip) or ``3x`` (multi-scale + random-crop branch) training pipeline.
        scale: ``(long, short)`` bound of the keep-ratio resize used for evaluation and 1x training;
            the 3x sizes scale with ``short`` (published: (1333, 800)). Small values suit tests and demos.
        with_masks: decode instance masks (Mask R-CNN models); off for box detectors (RetinaNet,
            Faster R-CNN), which then ignore ``segmentation`` fields (a box-only export has none).
            ``None``: what the trained detector predicts (its ``iou_types``), masks without one.
        layout: ``auto`` (detected), ``coco2017``, ``roboflow``, ``label_studio`` or ``cvat``.
        train_split, val_split, test_split: the ``coco2017`` layout's split names
            (``annotations/instances_<split>.json``, ``<split>/``); COCO's test-dev has no public labels,
            so its test scores val2017.
        train_annotations, train_images: an annotation file and its image folder (relative to ``root``
            or absolute), replacing the layout's; likewise ``val_…`` and ``test_…``.
        val_fraction: for an export without a validation split (Label Studio, CVAT), the share of its
            images held out for validation, drawn by ``split_seed``.
        **kwargs: ``predict_dir`` (default: the val images), the batch and loader settings: see
            :class:`BaseDataModule`.
    """

    layout_hint = "Expected the COCO-2017 layout: annotations/instances_{train,val}2017.json, train2017/, val2017/."

    def __init__(
        self,
        root: str | Path = "data/coco",
        num_classes: int | None = None,
        recipe: Recipe = "1x",
        scale: tuple[int, int] = (1333, 800),
        with_masks: bool | None = None,
        layout: Layout = "auto",
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str = "val2017",
        train_annotations: str | None = None,
        train_images: str | None = None,
        val_annotations: str | None = None,
        val_images: str | None = None,
        test_annotations: str | None = None,
        test_images: str | None = None,
        val_fraction: float | None = None,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        if recipe not in ("1x", "3x"):
            raise ValueError(f"recipe must be '1x' or '3x', got {recipe!r}")
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise ValueError(f"data.init_args.val_fraction must be in (0, 1), got {val_fraction}")
        self.recipe, self.scale, self.with_masks = recipe, tuple(scale), with_masks
        self.layout, self.val_fraction, self.split_seed = layout, val_fraction, split_seed
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.explicit = {"train": (train_annotations, train_images), "val": (val_annotations, val_images),
                         "test": (test_annotations, test_images)}  # fmt: skip
        self._files: dict[str, SplitFiles] | None = None
        self._train_categories: tuple[list[int], list[str]] | None = None
        self._placeholders: set[int] = set()  # Roboflow's unused dataset-name category
        self.num_classes = num_classes if num_classes is not None else len(self.categories()[0])

    # -- files and categories ----------------------------------------------------------------------
    def files(self) -> dict[str, SplitFiles]:
        """Each split's annotation file and image folder (the layout detected once)."""
        if self._files is None:
            self.check_root()
            self.layout, self._files = split_files(self.root, self.layout, self.splits, self.explicit)
        return self._files

    def categories(self) -> tuple[list[int], list[str]]:
        """(ids, names) the labels stand for: the train file's categories, sorted by id.

        Roboflow's placeholder (id 0, the other categories' supercategory, on no annotation) is no class.
        A category no annotation uses stays a class, and is reported.
        """
        if self._train_categories is None:
            files = self.files()["train"]
            data = load_json(files.annotations)
            declared = data.get("categories")
            if not isinstance(declared, list) or not all(
                isinstance(c, dict) and "id" in c and "name" in c for c in declared
            ):
                raise DatasetError(f"{files.annotations}: no 'categories' list of {{'id', 'name'}} records")
            used = {a.get("category_id") for a in data.get("annotations") or [] if isinstance(a, dict)}
            supers = {c.get("supercategory") for c in declared}
            if self.layout == "roboflow":
                placeholder = [
                    c["id"] for c in declared if c["id"] == 0 and c["id"] not in used and c["name"] in supers
                ]
                self._placeholders = set(placeholder)
                declared = [c for c in declared if c["id"] not in self._placeholders]
            unused = sorted(c["name"] for c in declared if c["id"] not in used)
            if unused:
                log.warning("%s: %d categories on no annotation (still classes): %s",
                            files.annotations, len(unused), ", ".join(unused))  # fmt: skip
            ordered = sorted((c["id"], c["name"]) for c in declared)
            self._train_categories = [i for i, _ in ordered], [n for _, n in ordered]
        return self._train_categories

    def _read(self, files: SplitFiles, train: bool) -> CocoSplit:
        split = read_split(files.annotations, files.images, train, self.with_masks, files.by_name)
        ids, names = self.categories()
        kept = [(i, n) for i, n in zip(split.category_ids, split.category_names) if i not in self._placeholders]
        split.category_ids, split.category_names = [i for i, _ in kept], [n for _, n in kept]
        if split.category_ids != ids or split.category_names != names:
            train_file = self.files()["train"].annotations
            only = sorted(set(zip(split.category_ids, split.category_names)) ^ set(zip(ids, names)))
            raise DatasetError(f"{split.ann_file}: categories differ from the train file {train_file} "
                               f"((id, name) in one only: {only[:5]}); the labels must be the same")  # fmt: skip
        return split

    def _splits(self, name: str) -> CocoSplit:
        """The checked annotations of ``name`` (a held-out part of train for ``val`` with ``val_fraction``)."""
        files = self.files()
        train = name == "train"
        if self.val_fraction is not None and name in ("train", "val"):
            if "val" in files:
                raise DatasetError(f"{files['val'].annotations}: a validation split and val_fraction "
                                   f"{self.val_fraction} both given; remove --data.init_args.val_fraction")  # fmt: skip
            split = self._read(files["train"], train)
            every = list(split.coco.imgs)
            order = np.random.default_rng(self.split_seed).permutation(len(every))
            held_out = {every[i] for i in order[: max(1, round(self.val_fraction * len(every)))]}
            split.image_ids = [i for i in split.image_ids if (i in held_out) != train]
            return split
        if name not in files:
            key = {"val": "val_annotations (and val_images), or val_fraction to hold out part of train",
                   "test": "test_annotations and test_images"}[name]  # fmt: skip
            raise DatasetError(f"{self.root}: this dataset ({self.layout} layout) has no {name} split; "
                               f"set --data.init_args.{key}")  # fmt: skip
        return self._read(files[name], train)

    def _dataset(self, name: str, train: bool) -> COCODetection:
        result = self._splits(name)
        if len(result.category_ids) != self.num_classes:
            raise DatasetError(f"{result.ann_file}: {len(result.category_ids)} categories, but num_classes is "
                               f"{self.num_classes}; set --data.init_args.num_classes {len(result.category_ids)} "
                               "(or leave it out: it is read from the train file)")  # fmt: skip
        self._info = DatasetInfo(tuple(result.category_names), tuple(result.category_ids))
        transform = train_transform(self.recipe, self.scale) if train else eval_transform(self.scale)
        return COCODetection(result, transform, train, self.with_masks)

    def setup(self, stage: str | None = None) -> None:
        self.check_root()
        if self.with_masks is None:  # as the detector needs: box detectors ignore segmentation fields
            task = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            self.with_masks = "segm" in getattr(task, "iou_types", ("segm",))
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
        """``predict_dir`` with its sub-folders; without one, the validation images (of the train file where
        there is no val split) as their annotation file lists them (their COCO ids, ``file_name`` sub-folders
        included), or all images under that folder; COCO-2017's ``val2017/`` when there are no annotation
        files at all (predict needs none)."""
        transform = ImageOnly(eval_transform(self.scale))
        if self.predict_dir is not None:
            return PredictFolder(self.predict_dir, transform, recursive=True)
        try:
            files = self.files()
        except DatasetError:
            return PredictFolder(self.root / self.splits["val"], transform, recursive=True)
        split = files.get("val") or files["train"]
        images = load_json(split.annotations).get("images")
        listed = isinstance(images, list) and all(isinstance(i, dict) and {"id", "file_name"} <= set(i) for i in images)
        if not listed or not all((split.images / i["file_name"]).is_file() for i in images):
            return PredictFolder(split.images, transform, recursive=True)
        return PredictFolder(split.images, transform, files=[split.images / i["file_name"] for i in images],
                             image_ids=[int(i["id"]) for i in images])  # fmt: skip

    def _predict_info(self) -> DatasetInfo:
        """Category ids/names from the train annotation file when there is one, else ``1..num_classes``."""
        try:
            ids, names = self.categories()
        except DatasetError:
            ids, names = [], []
        if len(ids) == self.num_classes:
            return DatasetInfo(tuple(names), tuple(ids))
        ids = tuple(range(1, self.num_classes + 1))
        return DatasetInfo(tuple(f"class_{i}" for i in ids), ids)

    def collate_fn(self, split: str):
        return collate_lists if split == "predict" else collate
