"""What a segmentation run writes for a person: the scores report, its image grid, and palette PNG masks.

:class:`~.segmentation.SegmentationTask` calls :func:`write_segmentation_report` when
``writes_reports`` says so (``validate``, ``test`` and ``fit``'s validations, rank 0) and
:func:`save_mask` from ``predict``. Every number is a fraction with 4 decimals; every report names
the weights it measured (:meth:`~.base.BaseTask.weights_source`). The writers themselves (atomic JSON, Markdown,
PNG) are the shared ones of :mod:`ravlt_pl.reports`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..data.ade20k import IGNORE_INDEX, palette
from ..reports import atomic_write, markdown_table, write_report

#: (image, ground truth, prediction) of one validation image: (H, W, 3) uint8, (H, W), (H, W) class indices
GridRow = tuple[np.ndarray, np.ndarray, np.ndarray]
SCORES = ("mIoU", "mAcc", "aAcc")
#: classes named in the grid's legend at most (ADE20K has 150), in this many columns
LEGEND_CLASSES, LEGEND_COLUMNS = 24, 4
#: the authors' ``tools/test.py`` default (``--aug-test``): these ratios of the test resize, each also flipped
AUTHORS_TEST_RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def protocol(mode: str, scales: Sequence[float], flip: bool, bound: Sequence[int] | None) -> str:
    """One sentence saying how the evaluation ran, naming the authors' protocol when it is theirs."""
    resize = f"the test resize to fit {max(bound)}×{min(bound)}" if bound else "the input"
    views = f"ratios {list(scales)} of {resize}" + (", each also flipped" if flip else "")
    if list(scales) == [1.0] and not flip:
        views = f"single scale ({resize}; mmseg's evaluation during training)"
    elif list(scales) == AUTHORS_TEST_RATIOS and flip and mode == "whole":
        views += " (the authors' tools/test.py default, --aug-test)"
    return f"{views}; {mode} inference; mean softmax at the original size; each image at its own size, unpadded"


def write_segmentation_report(
    out_dir: Path,
    stage: str,
    scores: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
    setup: Mapping[str, Any],
    weights: str,
    grid: Sequence[GridRow] = (),
) -> dict[str, Path]:
    """``segmentation_<stage>.json`` / ``.md`` (and ``_grid.png`` when ``grid`` has rows) in ``out_dir``.

    ``setup`` describes the run (``segmentor``, ``variant``, ``inference``: mode, scales, flip;
    ``protocol``: :func:`protocol`'s sentence) and is copied into the JSON; ``weights`` is
    :meth:`~.base.BaseTask.weights_source`'s line.
    """
    iou, acc = scores["IoU"].tolist(), scores["Acc"].tolist()
    overall = {k: float(scores[k]) for k in SCORES}
    inference = setup["inference"]
    data = {
        "headline": {"name": "mIoU", "value": _rounded(overall["mIoU"])},
        "task": "semantic_segmentation", "stage": stage, "weights": weights, **setup,
        **{k: _rounded(v) for k, v in overall.items()},
        "per_class": [{"class": n, "IoU": _rounded(i), "Acc": _rounded(a)} for n, i, a in zip(class_names, iou, acc)],
    }  # fmt: skip
    tta = f"{inference['mode']}, scales {list(inference['scales'])}{', flip' if inference['flip'] else ''}"
    markdown = (
        f"# Semantic segmentation ({stage})\n\n"
        f"RAVLT {setup['variant']} + {setup['segmentor']}, inference: {tta}.\n\nProtocol: {setup['protocol']}.\n\n"
        f"Weights: {weights}.\n\n"
        "Scores are fractions from 0 to 1.\n\n"
        + markdown_table(list(SCORES), [[_fraction(overall[k]) for k in SCORES]])
        + "\nPer class. '-': IoU of a class absent from ground truth and prediction, Acc of a class absent "
        "from the ground truth; both are left out of the means (mmseg's definition).\n\n"
        + markdown_table(
            ["class", "IoU", "Acc"], [[n, _fraction(i), _fraction(a)] for n, i, a in zip(class_names, iou, acc)]
        )
    )
    figures = {"grid": grid_figure(grid, class_names, f"{stage}, {weights}")} if grid else {}
    return write_report(out_dir, f"segmentation_{stage}", data, markdown, figures)


def grid_figure(grid: Sequence[GridRow], class_names: Sequence[str], caption: str) -> plt.Figure:
    """One row per image: the image, its ground truth and the prediction in the ADE20K palette; one legend
    names the classes shown, those covering most pixels first."""
    colours = palette() / 255.0
    cmap = ListedColormap(colours)
    values, pixels = np.unique(
        np.concatenate([a.ravel() for _, label, pred in grid for a in (label, pred)]), return_counts=True
    )
    classes = [int(v) for v in values[np.argsort(-pixels, kind="stable")] if v < len(class_names)]  # most pixels first
    shown = classes[:LEGEND_CLASSES] + ([IGNORE_INDEX] if IGNORE_INDEX in values else [])
    legend_height = 0.25 * math.ceil((len(shown) + (len(classes) > LEGEND_CLASSES)) / LEGEND_COLUMNS) + 0.2  # inches
    height = 2.9 * len(grid) + 0.5 + legend_height
    fig, axes = plt.subplots(len(grid), 3, figsize=(10, height), squeeze=False)
    for row, (image, label, pred) in zip(axes, grid):
        for ax, content, title in zip(row, (image, label, pred), ("image", "ground truth", "prediction")):
            if content.ndim == 3:
                ax.imshow(content)
            else:
                ax.imshow(content, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(title, fontsize=11)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[v]) for v in shown]
    labels = [class_names[v] if v < len(class_names) else "ignored" for v in shown]
    if len(classes) > LEGEND_CLASSES:
        handles.append(plt.Rectangle((0, 0), 1, 1, color="none"))
        labels.append(f"(+{len(classes) - LEGEND_CLASSES} more)")
    fig.suptitle(textwrap.fill(caption, 120), fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=LEGEND_COLUMNS, fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, legend_height / height, 1, 1 - 0.4 / height))
    return fig


def denormalize(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised with the ImageNet mean/std → (H, W, 3) uint8 for display."""
    mean = image.new_tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = image.new_tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def save_mask(path: Path, classes: torch.Tensor) -> Path:
    """(H, W) class indices → a palette PNG (pixel value = class index, ADE20K colours), written atomically."""
    mask = Image.fromarray(classes.to(torch.uint8).cpu().numpy(), mode="P")
    mask.putpalette(palette().ravel().tolist())
    return atomic_write(path, lambda tmp: mask.save(tmp, format="PNG"))


def _rounded(value: float) -> float | None:
    """4 decimals; NaN (a class absent everywhere) → None, so the JSON stays valid."""
    return None if math.isnan(value) else round(value, 4)


def _fraction(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"
