"""ImageNet-1k (or any ImageFolder tree): ``root/{train,val}/<class>/*.JPEG`` with the DeiT pipelines."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .base import BaseDataModule
from .errors import DatasetError


def load_rgb(path: str) -> Image.Image:
    """PIL loader whose failure names the file (a worker's traceback otherwise hides it)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot be read as an image ({err})") from None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


class ImageFiles(Dataset):
    """The images of one folder (recursively), for ``predict``: yields ``(image, index)``."""

    def __init__(self, folder: Path, transform) -> None:
        if not folder.is_dir():
            raise DatasetError(f"{folder}: predict folder not found")
        self.files = sorted(p for p in folder.rglob("*") if p.is_file() and _is_image(p.name))
        if not self.files:
            raise DatasetError(f"{folder}: no image files ({', '.join(IMG_EXTENSIONS)}) found")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(str(self.files[index]))), index


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
            sharded over processes).
        predict_dir: folder of images for ``predict``.
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
        predict_dir: str | None = None,
        global_batch_size: int | None = None,
        batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__(root, global_batch_size, batch_size, num_workers, pin_memory, persistent_workers)
        self.num_classes = num_classes
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.crop_scale = tuple(crop_scale)
        self.interpolation = interpolation
        self.auto_augment = auto_augment
        self.color_jitter = color_jitter
        self.reprob = reprob
        self.repeated_aug = repeated_aug
        self.predict_dir = predict_dir
        self.class_names: list[str] = []
        self.datasets: dict[str, Dataset] = {}

    # -- validation of the tree -------------------------------------------------------------------
    def _classes(self, split: str) -> list[str]:
        folder = self.root / split
        if not folder.is_dir():
            raise DatasetError(f"{folder}: split folder missing. {self.layout_hint}")
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if not classes:
            raise DatasetError(f"{folder}: no class sub-folders. {self.layout_hint}")
        for name in classes:
            if not any(_is_image(f.name) for f in (folder / name).iterdir() if f.is_file()):
                raise DatasetError(f"{folder / name}: class folder holds no image files ({', '.join(IMG_EXTENSIONS)})")
        return classes

    def _check_tree(self) -> None:
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
        self.class_names = train

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

    def setup(self, stage: str) -> None:
        if stage == "predict":
            if not self.predict_dir:
                raise DatasetError("predict needs --data.init_args.predict_dir FOLDER (a folder of images)")
            self.datasets["predict"] = ImageFiles(Path(self.predict_dir), self.transform(train=False))
            if (self.root / "train").is_dir():  # class names for the predictions, when the tree is at hand
                self.class_names = self._classes("train")
            return
        self._check_tree()
        if stage == "fit":
            self.datasets["train"] = ImageFolder(str(self.root / "train"), self.transform(True), loader=load_rgb)
        self.datasets["val"] = ImageFolder(str(self.root / "val"), self.transform(False), loader=load_rgb)

    def train_dataloader(self):
        dataset = self.datasets["train"]
        sampler = None
        if self.repeated_aug:
            world, rank = self._world()
            sampler = RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True)
        return self.make_loader(dataset, train=True, sampler=sampler)

    def val_dataloader(self):
        return self.make_loader(self.datasets["val"], train=False)

    def test_dataloader(self):
        return self.make_loader(self.datasets["val"], train=False)

    def predict_dataloader(self):
        return self.make_loader(self.datasets["predict"], train=False)
