"""ImageNet-1k (or any ImageFolder tree): ``root/{train,val}/<class>/*.JPEG`` with the DeiT pipelines;
WebDataset shards and Hugging Face parquet through the same pipelines (``format``, see ``formats.py``).

A tree without ``val/`` holds out a seeded, stratified ``val_fraction`` of ``train/`` instead; the
class count is the number of class folders unless ``num_classes`` is given (then checked).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.datasets import ImageFolder

from .base import BaseDataModule, DatasetInfo
from .errors import DatasetError
from .images import IMAGE_SUFFIXES, PredictFolder, is_image_file, read_rgb
from .transforms import repair_posterize


def class_folders(split_dir: str | Path) -> list[str]:
    """The class folders of an ImageFolder split, sorted; hidden ones (``.ipynb_checkpoints``) are no class."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


class ClassFolders(ImageFolder):
    """torchvision's ImageFolder read with :func:`read_rgb` in display orientation (EXIF applied: the
    class is what the labeller saw), blind to hidden folders and files."""

    def __init__(self, split_dir: Path, transform) -> None:
        loader = partial(read_rgb, exif_transpose=True)
        super().__init__(str(split_dir), transform, loader=loader, is_valid_file=is_image_file)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(directory)
        return classes, {name: i for i, name in enumerate(classes)}


def stratified_split(targets: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: ``fraction`` of each class (at least one while the class keeps one for
    training), drawn by ``seed``. Hand-written: torch's ``random_split`` is not stratified."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    train, val = [], []
    for indices in by_class.values():
        order = rng.permutation(indices).tolist()
        count = min(max(1, round(fraction * len(order))), len(order) - 1)
        val += order[:count]
        train += order[count:]
    return sorted(train), sorted(val)


class ImageFolderDataModule(BaseDataModule):
    """ImageFolder classification data (ImageNet-1k or any class-folder tree) with the published DeiT augmentation.

    Args:
        root: directory holding ``train/`` and ``val/`` (or ``train/`` alone, with ``val_fraction``), one
            sub-folder per class; ``test`` reads ``test/`` when there is one, else the validation images.
        num_classes: class folders expected (1000 for ImageNet-1k), checked against the tree; ``None``:
            the number of class folders in ``train/`` (the task gets it through the CLI link).
        val_fraction: without ``val/``, the share of each class of ``train/`` held out for validation.
        split_seed: seed of the ``val_fraction`` draw (the same seed gives the same split).
        image_size: training crop and evaluation size.
        crop_pct: evaluation centre-crop fraction (resize to ``image_size / crop_pct`` first).
        crop_scale: area range of the training RandomResizedCrop.
        interpolation: resize interpolation.
        auto_augment: timm RandAugment policy string (``None`` to disable).
        color_jitter: colour jitter strength (timm applies it only when RandAugment is off).
        reprob: random-erasing probability.
        repeated_aug: DeiT's repeated-augmentation sampler (3 augmented copies per image per epoch,
            sharded over processes). ImageFolder only: refused for shards and parquet, which stream.
        format: ``folder`` (ImageFolder), ``wds`` (WebDataset shards in the ``timm/imagenet-1k-wds``
            layout), ``parquet`` (Hugging Face ``imagenet-1k`` files); ``auto`` tells them apart by what
            ``root`` holds (``_info.json``/``*.tar``, ``data/*.parquet``, else a folder tree).
        shuffle_buffer: training samples each loader worker holds to shuffle a shard stream.
        **kwargs: ``predict_dir`` (default ``root/val``, read recursively), the batch and loader
            settings: see :class:`BaseDataModule`.
    """

    layout_hint = "Expected the ImageFolder layout ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG."

    def __init__(
        self,
        root: str | Path = "data/imagenet",
        num_classes: int | None = None,
        image_size: int = 224,
        crop_pct: float = 0.875,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        interpolation: str = "bicubic",
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.3,
        reprob: float = 0.25,
        repeated_aug: bool = False,
        format: Literal["auto", "folder", "wds", "parquet"] = "auto",
        shuffle_buffer: int = 2048,
        val_fraction: float | None = None,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise ValueError(f"data.init_args.val_fraction must be in (0, 1), got {val_fraction}")
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.format = format
        self.num_classes = num_classes if num_classes is not None else self._count_classes()
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.crop_scale = tuple(crop_scale)
        self.interpolation = interpolation
        self.auto_augment = auto_augment
        self.color_jitter = color_jitter
        self.reprob = reprob
        self.repeated_aug = repeated_aug
        self.shuffle_buffer = shuffle_buffer

    def _count_classes(self) -> int:
        """The class count of the data: class folders, or the class names stored with shards / parquet."""
        data_format = self.data_format()
        if data_format == "folder":
            return len(self._classes("train", check_root=True))
        from .formats import open_layout

        names = open_layout(self.root, data_format, ()).class_names
        if not names:
            raise DatasetError(
                f"{self.root}: the {data_format} data stores no class names; set --data.init_args.num_classes"
            )
        return len(names)

    # -- validation of the tree -------------------------------------------------------------------
    def _classes(self, split: str, check_root: bool = False) -> list[str]:
        if check_root:
            self.check_root()
        folder = self.root / split
        if not folder.is_dir():
            hint = (
                " Without val/, --data.init_args.val_fraction 0.1 holds out a tenth of train/."
                if split == "val"
                else ""
            )
            raise DatasetError(f"{folder}: split folder missing. {self.layout_hint}{hint}")
        classes = class_folders(folder)
        if not classes:
            raise DatasetError(f"{folder}: no class sub-folders. {self.layout_hint}")
        for name in classes:
            if not any(is_image_file(f) for f in (folder / name).iterdir() if f.is_file()):
                raise DatasetError(f"{folder / name}: class folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return classes

    def _check_tree(self) -> list[str]:
        self.check_root()
        train = self._classes("train")
        if len(train) != self.num_classes:
            raise DatasetError(
                f"{self.root / 'train'}: {len(train)} class folders but num_classes is {self.num_classes}; "
                f"set --data.init_args.num_classes {len(train)} for this dataset (or leave it out: it is counted)"
            )
        if self.val_fraction is not None:
            if (self.root / "val").is_dir():
                raise DatasetError(f"{self.root / 'val'}: a val/ folder and val_fraction {self.val_fraction} both "
                                   "give a validation set; remove --data.init_args.val_fraction or the folder")  # fmt: skip
            return train
        val = self._classes("val")
        if val != train:
            extra, absent = sorted(set(val) - set(train)), sorted(set(train) - set(val))
            raise DatasetError(
                f"{self.root / 'val'}: class folders differ from train/ (only in val: {extra[:5]}, missing: {absent[:5]})"
            )
        return train

    # -- transforms and datasets ------------------------------------------------------------------
    def transform(self, train: bool):
        if train:
            return repair_posterize(create_transform(
                self.image_size, is_training=True, scale=self.crop_scale, auto_augment=self.auto_augment, color_jitter=self.color_jitter,
                re_prob=self.reprob, re_mode="pixel", re_count=1, interpolation=self.interpolation,
            ))  # fmt: skip
        return create_transform(
            self.image_size, is_training=False, crop_pct=self.crop_pct, interpolation=self.interpolation
        )

    def data_format(self) -> str:
        """The layout of ``root``: ``folder``, ``wds`` or ``parquet``."""
        from .formats import detect_format

        return detect_format(self.root) if self.format == "auto" else self.format

    def setup(self, stage: str) -> None:
        if self.data_format() != "folder":
            from .formats import setup_stream

            return setup_stream(self, self.data_format(), stage)
        if stage == "predict":
            folder = self.predict_dir or self.root / "val"
            self.datasets["predict"] = PredictFolder(
                folder, self.transform(train=False), recursive=True, exif_transpose=True
            )
            # Class names for the predictions when the tree is at hand, else the label numbers.
            has_tree = (self.root / "train").is_dir()
            names = self._classes("train") if has_tree else [str(i) for i in range(self.num_classes)]
            self._info = DatasetInfo(tuple(names))
            return
        self._info = DatasetInfo(tuple(self._check_tree()))
        if self.val_fraction is None:
            if stage == "fit":
                self.datasets["train"] = ClassFolders(self.root / "train", self.transform(True))
            self.datasets["val"] = ClassFolders(self.root / "val", self.transform(False))
        else:
            evaluated = ClassFolders(self.root / "train", self.transform(False))
            train, val = stratified_split(evaluated.targets, self.val_fraction, self.split_seed)
            if stage == "fit":
                self.datasets["train"] = Subset(ClassFolders(self.root / "train", self.transform(True)), train)
            self.datasets["val"] = Subset(evaluated, val)
        self.datasets["test"] = self._test_dataset() if stage == "test" else self.datasets["val"]

    def _test_dataset(self) -> Dataset:
        """``test/`` when the tree has one (its classes those of ``train/``), else the validation images."""
        if not (self.root / "test").is_dir():
            return self.datasets["val"]
        if self._classes("test") != list(self.info.class_names):
            raise DatasetError(f"{self.root / 'test'}: class folders differ from train/")
        return ClassFolders(self.root / "test", self.transform(False))

    def _dataloader_factory(self, split: str) -> DataLoader:
        from .streams import ShardStream

        if isinstance(self.datasets.get(split), ShardStream):
            from .formats import stream_loader

            return stream_loader(self, split)
        return super()._dataloader_factory(split)

    def train_sampler(self, dataset: Dataset) -> Sampler | None:
        if not self.repeated_aug:
            return None
        world, rank = self._world()
        return RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True)


class ImageNetDataModule(ImageFolderDataModule):
    """The name :class:`ImageFolderDataModule` had, kept for configs and runs' saved ``config.yaml``: a subclass,
    not an assignment, so that the short ``class_path: ImageNetDataModule`` resolves as well as the dotted one."""
