"""Semantic segmentation from any folders of images and label masks, paired by file stem.

Default layout under ``root``: ``images/train/x.jpg`` + ``masks/train/x.png`` (and ``val``); every
folder can be set (``train_images``, ``train_masks``, ``val_…``, ``test_…``). A mask holds a class
index per pixel (0..K-1) and ``ignore_value`` where nothing is labelled. The classes: ``classes``,
a list of names or a file of them (``.txt`` one per line, ``.yaml``/``.json`` a list); without it,
the label values found in the training masks (0..max, named ``class 0`` ...). The ADE20K pipelines
(:mod:`.ade20k`) apply, without ``reduce_zero_label``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from .ade20k import IGNORE_INDEX, ADE20KDataModule, ADE20KDataset
from .errors import DatasetError
from .images import list_images

log = logging.getLogger(__name__)


def read_classes(spec: list[str] | str) -> list[str]:
    """Class names from a list, or from a ``.txt`` (one per line) / ``.yaml`` / ``.json`` file holding one."""
    if isinstance(spec, list):
        return [str(name) for name in spec]
    path = Path(spec)
    if not path.is_file():
        raise DatasetError(
            f"{path}: classes file not found (data.init_args.classes: a list of names or a file of them)"
        )
    text = path.read_text()
    if path.suffix in (".yaml", ".yml", ".json"):
        try:
            names = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as err:
            raise DatasetError(f"{path}: not a {path.suffix[1:]} file ({err})".splitlines()[0]) from None
        if isinstance(names, dict) and isinstance(names.get("names"), list):
            names = names["names"]
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise DatasetError(f"{path}: expected a list of class names (or {{names: [...]}})")
        return [str(n) for n in names]
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{path}: no class names (one per line)")
    return names


def label_values(masks: list[Path], ignore_value: int) -> list[int]:
    """The sorted label values of ``masks`` other than ``ignore_value``."""
    seen = np.zeros(2**16, dtype=bool)
    for path in masks:
        try:
            with Image.open(path) as mask:
                values = np.unique(np.asarray(mask))
        except (OSError, ValueError) as err:
            raise DatasetError(f"{path}: cannot be read as a label image ({err})") from None
        if values.ndim != 1 or values.min() < 0 or values.max() >= len(seen):
            raise DatasetError(f"{path}: not a single-channel mask of class indices")
        seen[values.astype(np.int64)] = True
    seen[ignore_value] = False
    return np.flatnonzero(seen).tolist()


class MaskFolderDataModule(ADE20KDataModule):
    """Images + label masks of one's own, with the ADE20K pipelines.

    Args:
        root: dataset directory.
        classes: class names, or a file of them (see the module docstring); ``None``: the label values
            of the training masks, 0..max (every mask read once, when the module is built).
        num_classes: classes expected, checked against ``classes``; ``None``: their count (the task
            gets it through the CLI link).
        ignore_value: the masks' value for "not labelled" (not a class; 255 by default).
        train_images, train_masks, val_images, val_masks, test_images, test_masks: the folders,
            relative to ``root`` or absolute; ``test`` without ``test_images`` is refused.
        **kwargs: the pipeline, batch and loader settings of :class:`~ravlt_pl.data.ade20k.ADE20KDataModule`
            (``scale``, ``crop_size``, ``ratio_range``, ``cat_max_ratio``, ``eval_batch_size``, ...).
    """

    layout_hint = (
        "Expected images/{train,val}/NAME.jpg and masks/{train,val}/NAME.png (or set data.init_args.*_images/*_masks)."
    )

    def __init__(
        self,
        root: str | Path,
        classes: list[str] | str | None = None,
        num_classes: int | None = None,
        ignore_value: int = IGNORE_INDEX,
        train_images: str = "images/train",
        train_masks: str = "masks/train",
        val_images: str = "images/val",
        val_masks: str = "masks/val",
        test_images: str | None = None,
        test_masks: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0 <= ignore_value <= 255:
            raise ValueError(f"data.init_args.ignore_value must be a uint8 label value (0..255), got {ignore_value}")
        self.folders = {"train": (train_images, train_masks), "val": (val_images, val_masks),
                        "test": (test_images, test_masks)}  # fmt: skip
        self.ignore_value = ignore_value
        root = Path(root)
        if classes is not None:
            names = read_classes(classes)
            source = str(classes) if isinstance(classes, str) else "data.init_args.classes"
        elif num_classes is not None:  # numbered classes; out-of-range mask values are refused when read
            names, source = [f"class {i}" for i in range(num_classes)], "data.init_args.num_classes"
        else:
            self.root = root
            self.check_root()
            values = label_values([label for _, label in self._pairs("train", root)], ignore_value)
            if not values:
                raise DatasetError(
                    f"{root / train_masks}: the masks hold no label values besides ignore {ignore_value}"
                )
            names = [f"class {i}" for i in range(values[-1] + 1)]
            source = str(root / train_masks)
            log.info("%s: label values %s: %d classes", source, values, len(names))
        if num_classes is not None and num_classes != len(names):
            raise DatasetError(f"{source}: {len(names)} classes, but num_classes is {num_classes}; "
                               "leave data.init_args.num_classes out to take them from the data")  # fmt: skip
        super().__init__(root, num_classes=len(names), reduce_zero_label=False, class_names=names, **kwargs)

    def split_dirs(self, split: str) -> tuple[Path, Path]:
        images, masks = self.folders[split]
        return self.root / images, self.root / masks

    def _pairs(self, split: str, root: Path) -> list[tuple[Path, Path]]:
        """(image, mask) by file stem, without the size checks (for counting label values)."""
        images, masks = (root / folder for folder in self.folders[split])
        for directory in (images, masks):
            if not directory.is_dir():
                raise DatasetError(f"{directory}: directory not found. {self.layout_hint}")
        by_stem = {p.stem: p for p in list_images(masks)}
        missing = [p for p in list_images(images) if p.stem not in by_stem]
        if missing:
            raise DatasetError(f"{missing[0]}: no mask named {missing[0].stem}.* in {masks}")
        return [(p, by_stem[p.stem]) for p in list_images(images)]

    def scan(self, split: str) -> list[tuple[Path, Path]]:
        samples = self._pairs(split, self.root)
        if not samples:
            raise DatasetError(f"{self.split_dirs(split)[0]}: no images found. {self.layout_hint}")
        return self.checked_sizes(samples)

    def test_dataset(self) -> ADE20KDataset:
        if self.folders["test"][0] is None or self.folders["test"][1] is None:
            raise DatasetError(f"{self.root}: no test split; set --data.init_args.test_images and "
                               "--data.init_args.test_masks (validate scores the val split)")  # fmt: skip
        return self._dataset("test", train=False)
