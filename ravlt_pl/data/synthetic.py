"""Small synthetic datasets in the real ImageNet / COCO / ADE20K on-disk formats (and, for the
fine-tuning examples, COCO as Roboflow / Label Studio / CVAT export it, and plain image + mask folders).

Scenes show a few shape classes (:data:`SHAPES`) with random colour, size, aspect,
rotation and position on a noisy colour-gradient background. Every shape is a polygon
drawn with PIL at 8x resolution: the coverage anti-aliases the image and, thresholded
at 0.5, gives the mask, so image, mask, box, area and COCO polygon agree. Output is a
pure function of the seed (same seed -> byte-identical files); each dataset is written
to a temporary sibling directory and renamed into place when finished.

CLI: ``python -m ravlt_pl.data.synthetic --task detection --out data/synth_coco``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COCO_CATEGORY_IDS: tuple[int, ...] = (1, 3, 7, 11, 16)  # non-contiguous, like COCO
IMAGE_ID_START, IMAGE_ID_STEP = 1000, 7  # COCO image ids are neither 0-based nor contiguous

Size = int | tuple[int, int]  # int -> square; tuple -> (width, height)
_SUPERSAMPLE = 8
_TASK_SEED = {"classification": 0, "detection": 1, "segmentation": 2}
_SPLIT_SEED = {"train": 0, "val": 1}


def _wh(size: Size) -> tuple[int, int]:
    """Normalise ``size`` to (width, height)."""
    w, h = (size, size) if isinstance(size, int) else size
    if min(w, h) < 16:
        raise ValueError(f"image_size must be at least 16 px, got {size}")
    return int(w), int(h)


def _unit_polygon(label: int, n_circle: int = 32) -> np.ndarray:
    """Vertices (N, 2) of shape ``SHAPES[label]`` with circumradius 1 around the origin."""
    name = SHAPES[label]
    if name == "cross":
        a, b = 1.0, 0.32
        return np.array(
            [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        )
    n = {"circle": n_circle, "square": 4, "triangle": 3, "star": 10}[name]
    radius = np.where(np.arange(n) % 2 == 1, 0.42, 1.0) if name == "star" else np.ones(n)
    angle = np.linspace(0.0, 2 * np.pi, n, endpoint=False) + (np.pi / 4 if name == "square" else -np.pi / 2)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Float (H, W, 3) linear gradient between two random colours in a random direction."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = np.cos(theta) * xx / w + np.sin(theta) * yy / h
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    return c0 + (c1 - c0) * t[..., None]


def _place(
    rng: np.random.Generator, labels: Sequence[int], w: int, h: int, radius_frac: tuple[float, float]
) -> list[tuple[int, np.ndarray]]:
    """Random non-overlapping polygons (label, vertices in pixel units) inside the image."""
    placed: list[tuple[int, np.ndarray, np.ndarray, float]] = []
    for label in labels:
        for _ in range(50):  # rejection sampling; an object that never fits is dropped
            r = rng.uniform(*radius_frac) * min(w, h)
            aspect = rng.uniform(0.8, 1.25)
            rot = rng.uniform(0, 2 * np.pi)
            verts = _unit_polygon(label) * r * np.array([aspect, 1 / aspect])
            verts = verts @ np.array([[np.cos(rot), np.sin(rot)], [-np.sin(rot), np.cos(rot)]])
            extent = float(np.linalg.norm(verts, axis=1).max())
            verts *= min(1.0, (min(w, h) / 2 - 2) / extent)
            extent = min(extent, min(w, h) / 2 - 2)
            centre = rng.uniform([extent + 1, extent + 1], [w - extent - 1, h - extent - 1])
            if all(np.linalg.norm(centre - c) > extent + e + 2 for _, _, c, e in placed):
                placed.append((label, verts + centre, centre, extent))
                break
    return [(label, verts) for label, verts, _, _ in placed]


def _coverage(verts: np.ndarray, w: int, h: int) -> np.ndarray:
    """Fraction (H, W) of each pixel covered by the polygon (pixel i spans [i, i + 1))."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (w * s, h * s), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in verts * s - 0.5], fill=255)
    return np.asarray(canvas, dtype=np.float32).reshape(h, s, w, s).mean(axis=(1, 3)) / 255.0


def _scene(
    rng: np.random.Generator, labels: Sequence[int], size: Size, radius_frac: tuple[float, float]
) -> tuple[Image.Image, list[tuple[int, np.ndarray, np.ndarray]]]:
    """Draw one scene; returns the RGB image and (label, polygon, bool mask) per object."""
    w, h = _wh(size)
    img = _background(rng, w, h)
    objects = []
    for label, verts in _place(rng, labels, w, h, radius_frac):
        for _ in range(20):  # keep the shape visibly different from the background
            colour = rng.uniform(0, 255, size=3)
            if np.linalg.norm(colour - img.mean(axis=(0, 1))) > 90:
                break
        cov = _coverage(verts, w, h)
        if (cov >= 0.5).any():  # only tiny images can produce shapes that cover no pixel
            img = img * (1 - cov[..., None]) + colour * cov[..., None]
            objects.append((label, verts, cov >= 0.5))
    img += rng.normal(0, rng.uniform(3, 18), size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8)), objects


def _rng(seed: int, task: str, split: str, *index: int) -> np.random.Generator:
    """Independent generator per image, so an image does not depend on the dataset size."""
    return np.random.default_rng([seed, _TASK_SEED[task], _SPLIT_SEED[split], *index])


def _scene_labels(rng: np.random.Generator, max_objects: int) -> list[int]:
    """1..max_objects random class indices."""
    return rng.integers(0, len(SHAPES), size=rng.integers(1, max_objects + 1)).tolist()


@contextmanager
def _staging(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temp dir next to ``out``; on success it replaces ``out`` in one rename."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        yield tmp
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_classification(
    out: str | Path,
    *,
    train_per_class: int = 200,
    val_per_class: int = 50,
    image_size: Size = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """ImageNet-style ImageFolder tree: ``out/{train,val}/<shape>/<shape>_<i>.JPEG``, one shape per image."""
    with _staging(out, overwrite) as root:
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            for label, name in enumerate(SHAPES):
                (root / split / name).mkdir(parents=True)
                for i in range(per_class):
                    rng = _rng(seed, "classification", split, label, i)
                    img, _ = _scene(rng, [label], image_size, radius_frac=(0.22, 0.45))
                    img.save(root / split / name / f"{name}_{i:05d}.JPEG", quality=90)
    return Path(out)


def make_detection(
    out: str | Path,
    *,
    num_train: int = 200,
    num_val: int = 50,
    image_size: Size = (160, 128),
    max_objects: int = 4,
    seed: int = 0,
    empty_frac: float = 0.05,
    crowd_frac: float = 0.05,
    overwrite: bool = False,
) -> Path:
    """COCO-2017 layout: ``annotations/instances_{train,val}2017.json`` + ``{train,val}2017/*.jpg``.

    Objects are polygon-annotated; about ``crowd_frac`` of them (at least one per split) are
    ``iscrowd=1`` with RLE segmentation, and about ``empty_frac`` of the images (at least one
    per split when it has two or more images) have no objects.
    """
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(COCO_CATEGORY_IDS, SHAPES)]
    ann_id = 1
    with _staging(out, overwrite) as root:
        (root / "annotations").mkdir()
        for split, n, first in (("train", num_train, 0), ("val", num_val, num_train)):
            (root / f"{split}2017").mkdir()
            split_rng = np.random.default_rng([seed, _TASK_SEED["detection"], _SPLIT_SEED[split]])
            n_empty = max(1, round(empty_frac * n)) if n >= 2 else 0
            empty = set(split_rng.choice(n, size=n_empty, replace=False).tolist())
            images, anns, masks = [], [], []
            for i in range(n):
                rng = _rng(seed, "detection", split, i)
                labels = [] if i in empty else _scene_labels(rng, max_objects)
                img, objects = _scene(rng, labels, image_size, radius_frac=(0.06, 0.2))
                image_id = IMAGE_ID_START + IMAGE_ID_STEP * (first + i)
                file_name = f"{image_id:012d}.jpg"
                img.save(root / f"{split}2017" / file_name, quality=90)
                images.append(
                    {"id": image_id, "file_name": file_name, "width": img.width, "height": img.height, "license": 1}
                )
                for label, verts, mask in objects:
                    ys, xs = np.nonzero(mask)
                    anns.append(
                        {
                            "id": ann_id,
                            "image_id": image_id,
                            "category_id": COCO_CATEGORY_IDS[label],
                            "bbox": [
                                float(xs.min()),
                                float(ys.min()),
                                float(xs.max() - xs.min() + 1),
                                float(ys.max() - ys.min() + 1),
                            ],
                            "area": float(mask.sum()),
                            "iscrowd": 0,
                            "segmentation": [np.round(verts, 2).ravel().tolist()],
                        }
                    )
                    masks.append(mask)
                    ann_id += 1
            n_crowd = min(len(anns), max(1, round(crowd_frac * len(anns))))
            for k in split_rng.choice(len(anns), size=n_crowd, replace=False).tolist():
                rle = mask_utils.encode(np.asfortranarray(masks[k], dtype=np.uint8))
                anns[k].update(
                    iscrowd=1,
                    segmentation={"counts": rle["counts"].decode("ascii"), "size": [int(v) for v in rle["size"]]},
                )
            coco = {
                "info": {
                    "description": "ravlt_pl synthetic shapes",
                    "version": "1.0",
                    "year": 2017,
                    "contributor": "ravlt_pl",
                    "url": "",
                    "date_created": "2017/01/01",
                },
                "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
                "images": images,
                "annotations": anns,
                "categories": categories,
            }
            (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
    return Path(out)


def make_segmentation(
    out: str | Path,
    *,
    num_train: int = 200,
    num_val: int = 50,
    image_size: Size = (160, 128),
    max_objects: int = 4,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """ADE20K layout under ``out/ADEChallengeData2016``; labels: 0 = background, shape k -> k + 1."""
    with _staging(out, overwrite) as root:
        ade = root / "ADEChallengeData2016"
        for split, folder, prefix, n in (
            ("train", "training", "ADE_train", num_train),
            ("val", "validation", "ADE_val", num_val),
        ):
            (ade / "images" / folder).mkdir(parents=True)
            (ade / "annotations" / folder).mkdir(parents=True)
            for i in range(n):
                rng = _rng(seed, "segmentation", split, i)
                img, objects = _scene(rng, _scene_labels(rng, max_objects), image_size, radius_frac=(0.08, 0.25))
                label_map = np.zeros((img.height, img.width), dtype=np.uint8)
                for label, _, mask in objects:
                    label_map[mask] = label + 1
                stem = f"{prefix}_{i + 1:08d}"
                img.save(ade / "images" / folder / f"{stem}.jpg", quality=90)
                Image.fromarray(label_map, mode="L").save(ade / "annotations" / folder / f"{stem}.png")
    return Path(out) / "ADEChallengeData2016"


def make_detection_export(out: str | Path, tool: str, *, box_only: bool = False, overwrite: bool = False,
                          **kwargs) -> Path:  # fmt: skip
    """The :func:`make_detection` set as a labelling tool exports it (what :mod:`.coco_layouts` reads):

    - ``roboflow``: ``{train,valid}/_annotations.coco.json`` beside the images, categories renumbered
      1..5 under a placeholder category 0 named after the dataset (their supercategory);
    - ``label_studio``: one ``result.json`` (every image) + ``images/``, ``file_name`` ``images\\<name>``
      (Windows separators, as it writes them), category ids from 0;
    - ``cvat``: one ``annotations/instances_default.json`` + ``images/default/``.

    ``box_only``: ``segmentation: []`` everywhere, crowds made plain (a box-only export).
    """
    with _staging(out, overwrite) as root:
        coco = make_detection(root / ".coco", **kwargs)
        splits = {split: json.loads((coco / "annotations" / f"instances_{split}2017.json").read_text())
                  for split in ("train", "val")}  # fmt: skip
        for data in splits.values():
            for ann in data["annotations"] if box_only else ():
                ann.update(segmentation=[], iscrowd=0)
        shift = {"roboflow": {c: i + 1 for i, c in enumerate(COCO_CATEGORY_IDS)},
                 "label_studio": {c: i for i, c in enumerate(COCO_CATEGORY_IDS)},
                 "cvat": {c: c for c in COCO_CATEGORY_IDS}}[tool]  # fmt: skip
        for data in splits.values():
            for ann in data["annotations"]:
                ann["category_id"] = shift[ann["category_id"]]
            data["categories"] = [dict(c, id=shift[c["id"]], supercategory="shapes") for c in data["categories"]]
        if tool == "roboflow":
            for split, folder in (("train", "train"), ("val", "valid")):
                data = splits[split]
                data["categories"].insert(0, {"id": 0, "name": "shapes", "supercategory": "none"})
                os.replace(coco / f"{split}2017", root / folder)
                (root / folder / "_annotations.coco.json").write_text(json.dumps(data))
        else:
            merged = dict(
                splits["train"],
                images=splits["train"]["images"] + splits["val"]["images"],
                annotations=splits["train"]["annotations"] + splits["val"]["annotations"],
            )
            images = root / "images" / ("default" if tool == "cvat" else "")
            images.mkdir(parents=True)
            for split in ("train", "val"):
                for file in (coco / f"{split}2017").iterdir():
                    os.replace(file, images / file.name)
            if tool == "label_studio":
                for image in merged["images"]:
                    image["file_name"] = "images\\" + image["file_name"]
                (root / "result.json").write_text(json.dumps(merged))
            else:
                (root / "annotations").mkdir()
                (root / "annotations" / "instances_default.json").write_text(json.dumps(merged))
        shutil.rmtree(coco)
    return Path(out)


def make_mask_folders(out: str | Path, *, overwrite: bool = False, **kwargs) -> Path:
    """The :func:`make_segmentation` set as plain folders: ``images/{train,val}/*.jpg``,
    ``masks/{train,val}/*.png`` (0 background, shape k → k + 1, a 2 px border of 255 = not labelled)
    and ``classes.txt`` (background and the shape names, one per line)."""
    with _staging(out, overwrite) as root:
        ade = make_segmentation(root / ".ade", **kwargs)
        (root / "images").mkdir()
        for split, folder in (("train", "training"), ("val", "validation")):
            os.replace(ade / "images" / folder, root / "images" / split)
            (root / "masks" / split).mkdir(parents=True)
            for mask in sorted((ade / "annotations" / folder).iterdir()):
                label = np.array(Image.open(mask))
                label[:2], label[-2:], label[:, :2], label[:, -2:] = 255, 255, 255, 255
                Image.fromarray(label, mode="L").save(root / "masks" / split / mask.name)
        (root / "classes.txt").write_text("\n".join(("background", *SHAPES)) + "\n")
        shutil.rmtree(root / ".ade")
    return Path(out)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=sorted(_TASK_SEED))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, help="images (per class for classification)")
    parser.add_argument("--num-val", type=int, help="images (per class for classification)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="PX", help="SIZE or WIDTH HEIGHT")
    parser.add_argument("--max-objects", type=int, help="detection/segmentation only")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.image_size is not None and len(args.image_size) not in (1, 2):
        parser.error("--image-size takes SIZE or WIDTH HEIGHT")
    kwargs: dict = {"seed": args.seed, "overwrite": args.overwrite}
    if args.image_size is not None:
        kwargs["image_size"] = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    if args.task == "classification":
        if args.max_objects is not None:
            parser.error("--max-objects does not apply to classification")
        names = ("train_per_class", "val_per_class")
        writer = make_classification
    else:
        names = ("num_train", "num_val")
        writer = make_detection if args.task == "detection" else make_segmentation
        if args.max_objects is not None:
            kwargs["max_objects"] = args.max_objects
    for name, value in zip(names, (args.num_train, args.num_val)):
        if value is not None:
            kwargs[name] = value
    path = writer(args.out, **kwargs)
    counts = {"train": 0, "val": 0}
    for file in path.rglob("*"):
        if file.suffix.lower() in (".jpg", ".jpeg"):  # split dirs: train*/val* (ADE: training/validation)
            is_train = any(part.startswith("train") for part in file.relative_to(path).parts)
            counts["train" if is_train else "val"] += 1
    print(f"wrote synthetic {args.task} dataset to {path}: {counts['train']} train / {counts['val']} val images")


if __name__ == "__main__":
    main()
