"""ImageNet-1k (or any ImageFolder tree): ``root/{train,val}/<class>/*.JPEG`` with the DeiT pipelines;
WebDataset shards and Hugging Face parquet through the same pipelines (``format``, see ``formats.py``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder

from .base import BaseDataModule, DatasetInfo
from .errors import DatasetError
from .images import IMAGE_SUFFIXES, PredictFolder, is_image_file, read_rgb


def class_folders(split_dir: str | Path) -> list[str]:
    """The class folders of an ImageFolder split, sorted; hidden ones (``.ipynb_checkpoints``) are no class."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


class ClassFolders(ImageFolder):
    """torchvision's ImageFolder read with :func:`read_rgb`, blind to hidden folders and files."""

    def __init__(self, split_dir: Path, transform) -> None:
        super().__init__(str(split_dir), transform, loader=read_rgb, is_valid_file=is_image_file)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(directory)
        return classes, {name: i for i, name in enumerate(classes)}


class ImageNetDataModule(BaseDataModule):
    """ImageFolder classification data with the published DeiT augmentation.

    Args:
        root: directory holding ``train/`` and ``val/``, one sub-folder per class.
        num_classes: class folders expected (1000 for ImageNet-1k); checked against the tree.
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
        num_classes: int = 1000,
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
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        self.num_classes = num_classes
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.crop_scale = tuple(crop_scale)
        self.interpolation = interpolation
        self.auto_augment = auto_augment
        self.color_jitter = color_jitter
        self.reprob = reprob
        self.repeated_aug = repeated_aug
        self.format = format
        self.shuffle_buffer = shuffle_buffer

    # -- validation of the tree -------------------------------------------------------------------
    def _classes(self, split: str) -> list[str]:
        folder = self.root / split
        if not folder.is_dir():
            raise DatasetError(f"{folder}: split folder missing. {self.layout_hint}")
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
                f"set --data.init_args.num_classes {len(train)} for this dataset"
            )
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
            return create_transform(
                self.image_size, is_training=True, scale=self.crop_scale, auto_augment=self.auto_augment, color_jitter=self.color_jitter,
                re_prob=self.reprob, re_mode="pixel", re_count=1, interpolation=self.interpolation,
            )  # fmt: skip
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
            self.datasets["predict"] = PredictFolder(folder, self.transform(train=False), recursive=True)
            # Class names for the predictions when the tree is at hand, else the label numbers.
            has_tree = (self.root / "train").is_dir()
            names = self._classes("train") if has_tree else [str(i) for i in range(self.num_classes)]
            self._info = DatasetInfo(tuple(names))
            return
        self._info = DatasetInfo(tuple(self._check_tree()))
        if stage == "fit":
            self.datasets["train"] = ClassFolders(self.root / "train", self.transform(True))
        self.datasets["val"] = self.datasets["test"] = ClassFolders(self.root / "val", self.transform(False))

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
