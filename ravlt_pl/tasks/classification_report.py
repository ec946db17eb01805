"""What a classification run writes for a person: the accuracy report with its confusion matrix, and predictions.

:class:`~.classification.ClassificationTask` calls :func:`write_classification_report` when
``writes_reports`` says so (``validate``, ``test`` and ``fit``'s last validation, rank 0) and
:func:`write_predictions` at the end of ``predict``. Accuracies and scores are fractions from 0 to
1 with 4 decimals; every report names the weights it measured. The writers themselves (atomic
JSON, Markdown, PNG) are the shared ones of :mod:`ravlt_pl.reports`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from ..reports import markdown_table, write_json, write_report

DECIMALS = 4
#: the confusion-matrix figure is left out above this many classes (its cells would be unreadable)
MAX_FIGURE_CLASSES = 50


def write_classification_report(
    out_dir: Path,
    stage: str,
    metrics: Mapping[str, float],
    confusion: torch.Tensor,
    class_names: Sequence[str],
    weights: str,
) -> dict[str, Path]:
    """``classification_<stage>.json`` / ``.md`` (and ``_confusion.png``) in ``out_dir``.

    ``metrics``: the logged values (``<stage>/top1``, ``<stage>/top5``, ``<stage>/loss`` and, with an
    EMA, ``<stage>/ema_top1``/``ema_top5``); ``confusion``: (K, K) counts, rows the true classes;
    ``weights``: which weights were measured (:meth:`~.base.BaseTask.weights_source`).
    """
    support = confusion.sum(1)
    accuracy = (confusion.diag() / support.clamp(min=1)).tolist()
    seen = [(n, round(a, DECIMALS), s) for n, a, s in zip(class_names, accuracy, support.tolist()) if s > 0]
    metrics = {k: round(v, DECIMALS) for k, v in metrics.items()}
    data = {
        "task": "classification", "stage": stage, "weights": weights,
        "headline": {"name": "top1", "value": metrics[f"{stage}/top1"]},
        "metrics": metrics,
        "num_samples": int(support.sum()),
        "per_class_accuracy": {n: a for n, a, _ in seen},
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
    }  # fmt: skip
    ema = " `ema_` rows measure the EMA of those weights." if any("/ema_" in k for k in metrics) else ""
    markdown = (
        f"# Classification report ({stage})\n\nWeights: {weights}.{ema}\n\n"
        f"{data['num_samples']} images. Accuracies are fractions from 0 to 1 (top-k: the share of images whose "
        "class is among the k highest scores); the loss is the mean cross-entropy in nats.\n\n"
        + markdown_table(["metric", "value"], list(metrics.items()))
        + "\n## Per-class accuracy (top-1)\n\n"
        + markdown_table(["class", "accuracy", "images"], seen)
    )
    figures = {}
    if len(class_names) <= MAX_FIGURE_CLASSES:
        figures["confusion"] = confusion_figure(confusion, class_names, f"{stage}, {weights}")
    return write_report(out_dir, f"classification_{stage}", data, markdown, figures)


def confusion_figure(confusion: torch.Tensor, class_names: Sequence[str], caption: str) -> plt.Figure:
    """Counts in the cells, each row coloured by its share of the row (the per-class recall on the diagonal)."""
    shares = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    for (i, j), count in zip(
        ((i, j) for i in range(len(class_names)) for j in range(len(class_names))), confusion.flatten().tolist()
    ):
        if count:
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    title = "Confusion matrix: counts; colour = share of the true class's images\n" + textwrap.fill(caption, 70)
    ax.set_title(title, fontsize=9)
    return fig


def write_predictions(path: Path, batches: Iterable[Mapping], class_names: Sequence[str]) -> tuple[Path, int]:
    """``path`` (JSON): per image its file and top-5 classes with their probabilities (fractions, 4 decimals).

    ``batches``: ``predict_step`` outputs, ``path`` (B file names), ``classes`` and ``scores`` (B, 5).
    Returns the path and the number of images.
    """
    rows = [
        {"file": file, "top5": [{"class": class_names[c], "score": round(float(s), DECIMALS)} for c, s in zip(classes.tolist(), scores)]}
        for batch in batches
        for file, classes, scores in zip(batch["path"], batch["classes"], batch["scores"])
    ]  # fmt: skip
    return write_json(path, rows), len(rows)
