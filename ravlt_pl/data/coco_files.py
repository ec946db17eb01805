"""COCO instances files: reading and checking ``instances_*.json`` before any image is decoded.

Every problem is a :class:`DatasetError` of one line naming the file and the record; pycocotools
itself would crash later in a DataLoader worker or, worse, build a wrong mask.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from .errors import DatasetError

log = logging.getLogger(__name__)
_REQUIRED = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


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
    paths: dict[int, Path]  # image id → its file
    used_category_ids: set[int]  # the categories some annotation has


def box_only_hint(where: str) -> str:
    """The refusal of box-only records by a mask detector, pointing at the box-only recipe."""
    return (
        f"{where} has no polygon or RLE segmentation (a box-only export?); a mask detector needs masks: train "
        "the box-only Faster R-CNN instead (configs/finetune/faster_rcnn.yaml)"
    )


def read_split(ann_file: Path, image_dir: Path, train: bool, with_masks: bool, by_name: bool = False) -> CocoSplit:
    """Read and check ``ann_file``; every problem is a :class:`DatasetError` naming file and record.

    ``train=True`` drops crowd objects and degenerate boxes (under 1 px, zero area, outside the
    image; the official files have a few), and images left without annotations. ``by_name``: an
    image is the file of its ``file_name``'s base name anywhere under ``image_dir`` (tools' exports
    prefix it with their own folders); else ``file_name`` is a relative path inside ``image_dir``.
    """
    data = load_json(ann_file)
    name = ann_file.name
    required = dict(_REQUIRED, annotations=_REQUIRED["annotations"] + (("segmentation",) if with_masks else ()))
    for key, fields in required.items():
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: no {key!r} list; a COCO instances file has {', '.join(required)}")
        for i, record in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(record, dict) or f not in record]
            if missing:
                rid = record.get("id") if isinstance(record, dict) else None
                if missing == ["segmentation"]:  # box-only data, a mask-reading data module
                    raise DatasetError(
                        f"{ann_file}: {key}[{i}] (id {rid}) has no 'segmentation': box-only annotations, but this "
                        "config trains instance masks; for box-only data use a box-only detector config "
                        "(configs/finetune/...) with --data.init_args.with_masks false"
                    )
                raise DatasetError(f"{name}: {key}[{i}] (id {rid}) lacks {', '.join(map(repr, missing))}; "
                                   f"each entry of {key!r} needs {', '.join(fields)}")  # fmt: skip
    categories = {c["id"]: c["name"] for c in data["categories"]}
    images: dict[int, int] = {}
    for i, img in enumerate(data["images"]):
        file_name = img["file_name"]
        if not isinstance(file_name, str) or (
            not by_name and (Path(file_name).is_absolute() or ".." in Path(file_name).parts)
        ):
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
            if ann["segmentation"] in ([], None, {}):
                raise DatasetError(box_only_hint(where))
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
    records = [data["images"][images[i]] for i in image_ids]
    paths = (
        _find_by_name(image_dir, records, images, name)
        if by_name
        else _check_image_files(image_dir, records, images, name)
    )
    used = {ann["category_id"] for ann in data["annotations"]}
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    ids = sorted(categories)
    return CocoSplit(ann_file, image_dir, coco, image_ids, annotations, ids, [categories[c] for c in ids], paths, used)


def load_json(path: Path) -> dict:
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


def _check_image_files(image_dir: Path, records: list[dict], index: dict[int, int], name: str) -> dict[int, Path]:
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: image folder not found (needed by {name})")
    present = set(os.listdir(image_dir))
    for img in records:
        file_name = img["file_name"]
        if file_name not in present and not (image_dir / file_name).is_file():
            raise DatasetError(f"{image_dir / file_name}: image file not found; {name} lists it as "
                               f"images[{index[img['id']]}] (id {img['id']})")  # fmt: skip
    return {img["id"]: image_dir / img["file_name"] for img in records}


def _find_by_name(image_dir: Path, records: list[dict], index: dict[int, int], name: str) -> dict[int, Path]:
    """Image id → the file under ``image_dir`` (any depth) named as its ``file_name``'s base name
    (``/`` or Windows ``\\`` separators); a missing or ambiguous name is refused."""
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: image folder not found (needed by {name})")
    found: dict[str, Path] = {}
    for directory, subdirs, files in os.walk(image_dir):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for file in files:
            if file in found:
                raise DatasetError(f"{image_dir}: two images named {file} ({found[file]}, {Path(directory) / file}); "
                                   f"{name} names images by base name")  # fmt: skip
            found[file] = Path(directory) / file
    paths = {}
    for img in records:
        base = img["file_name"].replace("\\", "/").rsplit("/", 1)[-1]
        if base not in found:
            raise DatasetError(f"{image_dir}: no image named {base} under it; {name} lists {img['file_name']!r} as "
                               f"images[{index[img['id']]}] (id {img['id']})")  # fmt: skip
        paths[img["id"]] = found[base]
    return paths


def check_segmentation(segmentation: Any, image: dict, where: str) -> None:
    """Refuse what pycocotools would turn into a wrong mask or a crash: polygons under 3 points or
    with an odd coordinate count (4 numbers it takes for a box), RLE not of the image's size or whose
    run lengths do not cover it exactly."""
    height, width = image["height"], image["width"]
    if isinstance(segmentation, list):
        if not segmentation:
            raise DatasetError(
                f"{where} has an empty segmentation list; expected polygons [[x1, y1, x2, y2, ...], ...]"
            )
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
