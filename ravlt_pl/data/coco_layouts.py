"""Where a COCO dataset's annotation files and images are: the official layout and labelling tools' exports.

A layout maps each split to an annotation file and an image folder (:class:`SplitFiles`):

- ``coco2017`` (the default when ``annotations/instances_<train_split>.json`` exists):
  ``annotations/instances_{split}.json`` + ``{split}/``; test scores ``val2017`` (test-dev has no labels).
- ``roboflow``: ``train/_annotations.coco.json`` beside its images, likewise ``valid/`` and ``test/``.
- ``label_studio``: ``result.json`` + ``images/``; file names carry a tool prefix (``images\\x.jpg``,
  ``../../media/upload/4/x.jpg``), so images are found by base name under ``images/``.
- ``cvat`` (COCO 1.0): ``annotations/instances_default.json`` + ``images/`` (also ``images/default/``),
  found by base name too.

``auto`` picks the first whose train file exists. Explicit ``train_annotations`` / ``train_images``
(and ``val_``, ``test_``) replace a layout's paths; a single-split export (Label Studio, CVAT) holds
out ``val_fraction`` of its images for validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import DatasetError

Layout = Literal["auto", "coco2017", "roboflow", "label_studio", "cvat"]
LAYOUTS: tuple[str, ...] = ("coco2017", "roboflow", "label_studio", "cvat")


@dataclass(frozen=True)
class SplitFiles:
    """One split's annotation file and image folder; ``by_name``: images found by base name under the folder."""

    annotations: Path
    images: Path
    by_name: bool = False


def layout_files(root: Path, layout: str, splits: dict[str, str]) -> dict[str, SplitFiles]:
    """The files of each split a layout has (``train``, and ``val``/``test`` when it has them)."""
    if layout == "coco2017":
        files = {name: SplitFiles(root / "annotations" / f"instances_{split}.json", root / split)
                 for name, split in splits.items()}  # fmt: skip
        return files
    if layout == "roboflow":
        folders = {"train": "train", "val": "valid", "test": "test"}
        return {name: SplitFiles(root / folder / "_annotations.coco.json", root / folder)
                for name, folder in folders.items() if name == "train" or (root / folder).is_dir()}  # fmt: skip
    if layout == "label_studio":
        return {"train": SplitFiles(root / "result.json", root / "images", by_name=True)}
    if layout == "cvat":
        return {"train": SplitFiles(root / "annotations" / "instances_default.json", root / "images", by_name=True)}
    raise ValueError(f"data.init_args.layout must be one of auto, {', '.join(LAYOUTS)}; got {layout!r}")


def detect_layout(root: Path, splits: dict[str, str]) -> str:
    """The first layout whose train annotation file exists under ``root``."""
    for layout in LAYOUTS:
        if layout_files(root, layout, splits)["train"].annotations.is_file():
            return layout
    expected = "; ".join(f"{name}: {layout_files(root, name, splits)['train'].annotations.relative_to(root)}"
                         for name in LAYOUTS)  # fmt: skip
    raise DatasetError(f"{root}: no COCO annotation file of a known layout ({expected}); set "
                       "--data.init_args.train_annotations and --data.init_args.train_images")  # fmt: skip


def split_files(root: Path, layout: str, splits: dict[str, str], explicit: dict[str, tuple[str | None, str | None]]
                ) -> tuple[str, dict[str, SplitFiles]]:  # fmt: skip
    """(the layout used, the files of every split it or the explicit paths give).

    ``explicit[split] = (annotations, images)``, relative to ``root`` or absolute: a given pair
    replaces the layout's; an annotation file without its image folder is refused.
    """
    for name, (json_file, images) in explicit.items():
        if (json_file is None) != (images is None):
            given, missing = ("annotations", "images") if images is None else ("images", "annotations")
            raise DatasetError(f"data.init_args.{name}_{given} is set but {name}_{missing} is not; set both")
    if explicit["train"][0] is not None:
        layout, files = "explicit", {}
    else:
        layout = detect_layout(root, splits) if layout == "auto" else layout
        files = layout_files(root, layout, splits)
    for name, (json_file, images) in explicit.items():
        if json_file is not None:
            files[name] = SplitFiles(root / json_file, root / images, by_name=False)
    return layout, files
