"""What a detection run writes for a person: the report (JSON, Markdown, a figure), COCO results, drawn images.

:class:`~ravlt_pl.tasks.detection.DetectionTask` calls :func:`write_report` where
``BaseTask.writes_reports`` says so (rank 0, at the end of ``validate``/``test`` and of ``fit``'s
last validation) and :func:`write_results` / :func:`save_drawn` in ``predict``. Every number is a
fraction in [0, 1] with 4 decimals; the files are written atomically by :mod:`ravlt_pl.reports`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import font_manager
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .. import reports

#: COCOeval's −1 in a Markdown table, and what it means.
MISSING = "n/a"
MISSING_NOTE = (
    f"{MISSING}: COCOeval's −1, no ground-truth objects of that size in the evaluated images "
    "(small: area < 32², medium: 32²–96², large: > 96² pixels)."
)
#: Images drawn into the report figure are at least this many pixels on their longer side.
MIN_DRAWN_SIDE = 480


def results_files(results: Sequence[dict], iou_types: Sequence[str]) -> dict[str, Callable[[Path], None]]:
    """``predictions_bbox.json`` (and ``predictions_segm.json``) in the COCO results format, compact JSON:
    file name → writer, for :func:`~ravlt_pl.reports.write_files`."""
    files = {}
    for iou in iou_types:
        keys = ("image_id", "category_id", "bbox" if iou == "bbox" else "segmentation", "score", "file_name")
        text = json.dumps([{k: r[k] for k in keys if k in r} for r in results])  # file_name: predict's source file
        files[f"predictions_{iou}.json"] = lambda tmp, text=text: tmp.write_text(text, encoding="utf-8")
    return files


def write_results(out_dir: Path, results: Sequence[dict], iou_types: Sequence[str]) -> list[Path]:
    """The COCO results files of :func:`results_files` in ``out_dir``, written as one set."""
    return reports.write_files({out_dir / name: write for name, write in results_files(results, iou_types).items()})


def write_report(
    out_dir: Path,
    stage: str,
    model: str,
    weights: str,
    headline: tuple[str, float],
    metrics: Mapping[str, Mapping[str, float]],
    per_category: Mapping[str, Mapping[str, float]],
    results: Sequence[dict],
    drawn: Sequence[tuple[Tensor, dict, dict]],
    names: Sequence[str],
    draw_threshold: float,
    protocol: str = "",
) -> dict[str, Path]:
    """``detection_<stage>.{json,md}``, the COCO results and ``detection_<stage>_predictions.png``.

    Args:
        model: what was evaluated, e.g. ``"RAVLTMaskRCNN (ravlt_s)"``.
        weights: where its weights came from (:meth:`~.base.BaseTask.weights_source`).
        protocol: how the images were run (one image per forward, ...).
        headline: the monitored metric's name and value.
        metrics: per IoU type (``bbox``/``segm``), COCO's 12 numbers by name (``AP``, ``AP50``, ...).
        per_category: per IoU type, AP per category present in the ground truth.
        results: COCO-format detections of every evaluated image.
        drawn: ``(image, ground truth, detections)`` of the first images, in input pixels.
    """
    iou_types = list(metrics)
    data = {
        "stage": stage,
        "model": model,
        "weights": weights,
        "protocol": protocol,
        "units": "fractions in [0, 1], 4 decimals; -1 = no ground-truth objects of that size (COCOeval)",
        "headline": {"name": headline[0], "value": round(headline[1], 4)},
        "metrics": {iou: {k: round(v, 4) for k, v in values.items()} for iou, values in metrics.items()},
        "per_category_ap": {iou: {k: round(v, 4) for k, v in aps.items()} for iou, aps in per_category.items()},
        "num_detections": len(results),
        "predictions": list(predictions := results_files(results, iou_types)),
    }
    md = f"# Detection report ({stage})\n\n{model}, weights: {weights}.\n\n"
    md += f"Protocol: {protocol}.\n\n" if protocol else ""
    md += f"Headline {headline[0]} = {headline[1]:.4f}. Values are fractions in [0, 1] (COCOeval).\n\n"
    columns = list(next(iter(metrics.values())))
    md += reports.markdown_table(["type", *columns], [(iou, *map(_cell, metrics[iou].values())) for iou in iou_types])
    if any(v < 0 for values in metrics.values() for v in values.values()):
        md += f"\n{MISSING_NOTE}\n"
    categories = list(dict.fromkeys(n for aps in per_category.values() for n in aps))
    md += "\n## AP per category\n\n" + reports.markdown_table(
        ["category", *(f"{iou} AP" for iou in iou_types)],
        [(n, *(_cell(per_category[iou].get(n, -1.0)) for iou in iou_types)) for n in categories],
    )
    md += f"\nCOCO-format results ({len(results)} detections): {', '.join(data['predictions'])}.\n"
    figures = {}
    if drawn:
        figures["predictions"] = drawn_figure(drawn, names, draw_threshold)
        md += (f"\nFigure `detection_{stage}_predictions.png`: ground truth (left) beside the detections "
               f"scoring ≥ {draw_threshold:.2f} (right), first {len(drawn)} images.\n")  # fmt: skip
    paths = reports.write_report(out_dir, f"detection_{stage}", data, md, figures, extra=predictions)
    print(f"report: {headline[0]} {headline[1]:.4f}; written to {', '.join(map(str, paths.values()))}")
    return paths


def _cell(value: float) -> str:
    return MISSING if value < 0 else f"{value:.4f}"


# -- drawing -----------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def label_font() -> str:
    """A TrueType font (matplotlib's DejaVu Sans), so label sizes can follow the image size."""
    return font_manager.findfont("DejaVu Sans")


def draw_detections(image: Tensor, det: Mapping[str, Tensor], names: Sequence[str], threshold: float = 0.0) -> Tensor:
    """uint8 (3, H, W) image with the detections scoring ≥ ``threshold`` drawn (boxes, labels, masks).

    Ground truth draws the same way (no ``scores``: every object, its caption without a score).
    """
    keep = det["scores"] >= threshold if "scores" in det else torch.ones(len(det["boxes"]), dtype=torch.bool)
    labels = det["labels"][keep].tolist()
    colours = [_colour(c) for c in labels]
    if "masks" in det and keep.any():
        masks = det["masks"][keep].reshape(-1, *image.shape[-2:]) > 0.5
        image = draw_segmentation_masks(image, masks, alpha=0.45, colors=colours)
    captions = [names[c] if 0 <= c < len(names) else str(c) for c in labels]
    if "scores" in det:
        captions = [f"{caption} {s:.2f}" for caption, s in zip(captions, det["scores"][keep].tolist())]
    font_size = max(12, round(max(image.shape[-2:]) / 32))  # ~15 px on a 480-px image, ~42 on 1333
    return draw_bounding_boxes(image, det["boxes"][keep], captions, colors=colours, width=max(2, font_size // 6),
                               font=label_font(), font_size=font_size, label_colors="black", fill_labels=True)  # fmt: skip


def _colour(label: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(label)
    return tuple(int(v) for v in rng.integers(64, 256, size=3))


def drawn_figure(drawn: Sequence[tuple[Tensor, dict, dict]], names: Sequence[str], threshold: float):
    """One row per image: ground truth on the left, detections scoring ≥ ``threshold`` on the right."""
    import matplotlib.pyplot as plt

    aspect = max(image.shape[-2] / image.shape[-1] for image, _, _ in drawn)  # height / width
    fig, axes = plt.subplots(len(drawn), 2, figsize=(10, (5 * aspect + 0.4) * len(drawn)), squeeze=False)
    for row, (image, truth, det) in zip(axes, drawn):
        image, truth, det = enlarged(image, truth, det)
        row[0].imshow(draw_detections(image, truth, names).permute(1, 2, 0).numpy())
        row[0].set_title(f"ground truth: {_count(len(truth['boxes']), 'object')}")
        row[1].imshow(draw_detections(image, det, names, threshold).permute(1, 2, 0).numpy())
        row[1].set_title(f"{_count(int((det['scores'] >= threshold).sum()), 'detection')} ≥ {threshold:.2f}")
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    return fig


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def enlarged(image: Tensor, *annotations: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """Small images (the synthetic sets) scaled up by an integer factor with their boxes and masks."""
    factor = -(-MIN_DRAWN_SIDE // max(image.shape[-2:]))  # ceil
    if factor <= 1:
        return (image, *annotations)
    scaled = []
    for ann in annotations:
        ann = dict(ann, boxes=ann["boxes"] * factor)
        if "masks" in ann:
            ann["masks"] = ann["masks"].repeat_interleave(factor, -2).repeat_interleave(factor, -1)
        scaled.append(ann)
    return (image.repeat_interleave(factor, -2).repeat_interleave(factor, -1), *scaled)


def truth_at_input_size(target: Mapping[str, Tensor], size: tuple[int, int]) -> dict[str, Tensor]:
    """An evaluation target (original pixels) at the input image's ``size``: boxes scaled, masks resized."""
    height, width = (int(v) for v in target["orig_size"])
    scale = torch.tensor([size[1] / width, size[0] / height] * 2)
    truth = {"boxes": target["boxes"].cpu() * scale, "labels": target["labels"].cpu()}
    if "masks" in target:
        masks = target["masks"].cpu()[:, None].float()  # (N, 1, H, W)
        truth["masks"] = (
            F.interpolate(masks, size=size, mode="nearest")[:, 0] > 0.5
            if len(masks)
            else torch.zeros(0, *size, dtype=torch.bool)
        )
    return truth


def save_drawn(path: Path, image: Tensor) -> Path:
    """A drawn uint8 (3, H, W) image as PNG."""
    pixels = image.permute(1, 2, 0).numpy()  # (H, W, 3) uint8
    return reports.atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
