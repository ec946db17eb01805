"""Image files: the one reader (RGB, 16-bit aware, errors naming the file), the suffixes, predict folders.

EXIF orientation, per task, the same in train, eval and predict: classification applies it (the class
is what a person saw; a rotated photo is still a cat), detection and segmentation ignore it, as
pycocotools and torchvision's ``CocoDetection`` do: COCO boxes, polygons and label masks refer to the
stored pixels, which a rotation would no longer match.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import DatasetError

#: what counts as an image file (torchvision's list, also used by its ImageFolder).
IMAGE_SUFFIXES: tuple[str, ...] = IMG_EXTENSIONS
#: Pillow's modes for 16-bit single-channel images (16-bit RGB(A) PNGs already open as 8-bit RGB(A)).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def is_image_file(path: str | Path) -> bool:
    """An image by its suffix, and not hidden: macOS ``._x.jpg`` resource forks are no images."""
    name = os.path.basename(path)
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def read_rgb(path: str | Path, exif_transpose: bool = False) -> Image.Image:
    """The image at ``path`` as 8-bit RGB; every failure is a :class:`DatasetError` naming the file.

    ``exif_transpose``: turn it as its EXIF orientation tag says (as displayed); else the stored pixels.
    16-bit grayscale keeps its top 8 bits (Pillow's own ``convert`` clips it to 255: all white);
    32-bit integer and float images have no agreed 8-bit mapping and are refused.
    """
    try:
        with Image.open(path) as image:
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            mode = image.mode
            if mode in SIXTEEN_BIT_MODES:
                top_bits = (np.asarray(image) >> 8).astype(np.uint8)  # (H, W)
                return Image.fromarray(top_bits, mode="L").convert("RGB")
            if mode not in ("I", "F"):
                return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: cannot be read as an image ({err})") from None
    raise DatasetError(f"{path}: a 32-bit {'float' if mode == 'F' else 'integer'} image (Pillow mode {mode}); "
                       "save it as 8- or 16-bit")  # fmt: skip


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (and its non-hidden sub-folders when ``recursive``), sorted."""
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    files = []
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        files += [Path(directory) / n for n in names if is_image_file(n)]
    return sorted(files)


class PredictFolder(Dataset):
    """The images of a folder, for ``predict``.

    Items: ``image`` (``transform`` of the RGB image, a torchvision-style callable on PIL images),
    ``path`` (str), ``file_name`` (the path relative to the folder), ``index`` (the position in the
    listing), ``image_id`` and ``orig_size`` (H, W). ``files`` and ``image_ids`` may be given (a COCO
    annotation file's images); else the folder is listed, and the ids are the file names where every
    name is a distinct number (COCO's ``000000000139.jpg``), else 1..N, one per file.
    ``exif_transpose``: as :func:`read_rgb` (the task's training orientation).
    """

    def __init__(self, folder: str | Path, transform: Callable[[Image.Image], Any], recursive: bool = False,
                 files: list[Path] | None = None, image_ids: list[int] | None = None,
                 exif_transpose: bool = False) -> None:  # fmt: skip
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DatasetError(
                f"{self.folder}: folder of images to predict not found; set --data.init_args.predict_dir"
            )
        self.files = list(files) if files is not None else list_images(self.folder, recursive)
        if not self.files:
            raise DatasetError(f"{self.folder}: no images ({', '.join(IMAGE_SUFFIXES)}) to predict")
        self.image_ids = list(image_ids) if image_ids is not None else _ids_from_names(self.files)
        self.transform = transform
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.files)

    def file_names(self) -> list[str]:
        """Every item's ``file_name`` (the path relative to the folder), in order."""
        return [path.relative_to(self.folder).as_posix() for path in self.files]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        image = read_rgb(path, self.exif_transpose)
        return {"image": self.transform(image), "path": str(path),
                "file_name": path.relative_to(self.folder).as_posix(), "index": index,
                "image_id": self.image_ids[index], "orig_size": (image.height, image.width)}  # fmt: skip


def _ids_from_names(files: list[Path]) -> list[int]:
    numbers = [int(p.stem) if p.stem.isdigit() else None for p in files]
    if None not in numbers and len(set(numbers)) == len(numbers):
        return numbers
    return list(range(1, len(files) + 1))


class ImageOnly:
    """An albumentations pipeline as a torchvision-style ``image → image`` callable (as
    :class:`PredictFolder` takes it)."""

    def __init__(self, pipeline: Callable[..., dict]) -> None:
        self.pipeline = pipeline

    def __call__(self, image: Image.Image) -> Any:
        return self.pipeline(image=np.array(image))["image"]  # writable: torch refuses to wrap a read-only array


def collate_lists(batch: list[dict[str, Any]]) -> dict[str, list]:
    """Dict items → one dict of lists: images keep their own sizes (detectors take a list)."""
    return {key: [item[key] for item in batch] for key in batch[0]}


def collate_padded(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Dict items → one dict: ``image`` zero-padded (bottom/right) to the batch's largest and stacked
    (B, 3, H, W), ``size`` each image's (h, w) before padding, every other key a list."""
    out = collate_lists(batch)
    images = out["image"]
    height, width = max(x.shape[-2] for x in images), max(x.shape[-1] for x in images)
    out["image"] = torch.stack([F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2])) for x in images])
    out["size"] = [tuple(x.shape[-2:]) for x in images]
    return out


def displayed_size(path: str | Path) -> tuple[int, int] | None:
    """(W, H) as displayed when the file's EXIF orientation turns it by 90°, else ``None``."""
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(0x0112, 1)  # the EXIF Orientation tag
            return (image.height, image.width) if orientation in (5, 6, 7, 8) else None
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
