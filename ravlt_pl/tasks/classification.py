"""Image classification with the published DeiT recipe: mixup/cutmix, label smoothing, EMA, top-1/top-5."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.optim import AdamW
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from .. import reports
from ..models import build_backbone
from .base import BaseTask, WarmupSchedule


def _accuracy_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        }
    )


class ClassificationTask(BaseTask):
    """RAVLT image classifier.

    Args:
        num_classes: output classes (linked from the data module).
        variant: published RAVLT variant (``ravlt_t``/``s``/``b``/``l``).
        backbone_overrides: RAVLT constructor arguments replacing the variant's (e.g. a tiny
            model, or ``attention: [linear, linear, linear, linear]``).
        drop_path_rate: stochastic depth; ``None`` keeps the variant's published rate.
        mixup: mixup alpha (0 disables).
        cutmix: cutmix alpha (0 disables).
        mixup_prob: probability of applying mixup or cutmix to a batch.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        label_smoothing: label smoothing of the (mixed) targets.
        image_size: input side used by ``summary`` for FLOPs.
        optimizer: optimizer class and arguments (AdamW lr 5e-4 × batch/512, wd .05 in the recipe).
        scheduler: learning-rate schedule (per-step warmup + cosine in the recipe).
        ema_decay: decay per 512 images of the weight EMA evaluated alongside the model (DeiT's
            0.99996; see :class:`~ravlt_pl.tasks.base.BaseTask`); ``None``: no EMA.
        pretrained: checkpoint to initialise from (authors' release or a state dict), head excluded.
        report_dir: where ``validate``/``test`` write reports (default: the run's log dir).
        weight_decay_exempt: parameters without weight decay; ``None`` is DeiT's ``["1d"]`` (norms and
            biases; the (1, C, 1, 1) layer-scale gammas decay). See :class:`~ravlt_pl.tasks.base.BaseTask`.
    """

    monitor = "val/top1"
    mode = "max"
    default_weight_decay_exempt = ("1d",)

    def __init__(
        self,
        num_classes: int = 1000,
        variant: str = "ravlt_s",
        backbone_overrides: dict | None = None,
        drop_path_rate: float | None = None,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        image_size: int = 224,
        optimizer: OptimizerCallable = AdamW,
        scheduler: LRSchedulerCallable = WarmupSchedule,
        ema_decay: float | None = None,
        pretrained: str | None = None,
        report_dir: str | None = None,
        weight_decay_exempt: list[str] | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, ema_decay, pretrained, report_dir, weight_decay_exempt)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        extra = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
        self.model = build_backbone(variant, backbone_overrides, num_classes=num_classes, **extra)
        self.load_pretrained_backbone(self.model)
        self.mixup = (
            Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=mixup_switch_prob,
                  label_smoothing=label_smoothing, num_classes=num_classes)
            if mixup > 0 or cutmix > 0 else None
        )  # fmt: skip
        self.label_smoothing = label_smoothing
        self.soft_loss = SoftTargetCrossEntropy()
        self.summary_input_size = (image_size, image_size)
        self.metrics = nn.ModuleDict({stage: _accuracy_metrics(num_classes) for stage in ("val", "test")})
        # A metric, not a sync_dist mean: weighted by images, exact over uneven shards.
        self.losses = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self.ema_metrics = nn.ModuleDict({stage: _accuracy_metrics(num_classes) for stage in ("val", "test")})
        self.confusion = MulticlassConfusionMatrix(num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        if self.mixup is not None:
            images, soft = self.mixup(images, targets)
            loss = self.soft_loss(self.model(images), soft)
        else:
            loss = F.cross_entropy(self.model(images), targets, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        images, targets = batch
        logits = self.model(images)
        self.losses[stage].update(F.cross_entropy(logits, targets), weight=len(targets))
        self.log(f"{stage}/loss", self.losses[stage], on_step=False, on_epoch=True)
        self.metrics[stage].update(logits, targets)
        self.confusion.update(logits.argmax(1), targets)
        if self.ema is not None:
            self.ema_metrics[stage].update(self.ema.module(images), targets)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def _epoch_end(self, stage: str) -> None:
        values = {f"{stage}/{k}": v for k, v in self.metrics[stage].compute().items()}
        if self.ema is not None:
            values.update({f"{stage}/ema_{k}": v for k, v in self.ema_metrics[stage].compute().items()})
            self.ema_metrics[stage].reset()
        self.log_dict(values, prog_bar=True)
        confusion = self.confusion.compute()
        if self.writes_reports:
            self.write_report(stage, {k: float(v) for k, v in values.items()}, confusion.cpu())
        self.metrics[stage].reset()
        self.confusion.reset()

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def predict_step(self, batch, batch_idx):
        """Top-5 classes of each image; ``batch``: ``image`` (B, 3, H, W) and ``path`` (B file names)."""
        probs = self.model(batch["image"]).softmax(-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1)
        return {"path": batch["path"], "classes": top.indices, "scores": top.values}

    def class_names(self) -> list[str]:
        """The data module's class names (``info``), else the label numbers (no data module attached)."""
        info = getattr(self.trainer.datamodule, "info", None) if self._trainer else None
        return list(info.class_names) if info else [str(i) for i in range(self.hparams.num_classes)]

    def on_predict_epoch_end(self) -> None:
        """Write ``predictions.json`` (file → top-5 classes and probabilities) for the predict folder."""
        names = self.class_names()
        rows = []
        for batch in self.trainer.predict_loop.predictions:
            for path, classes, scores in zip(batch["path"], batch["classes"], batch["scores"]):
                rows.append({
                    "file": path,
                    "top5": [{"class": names[c], "score": round(float(s), 5)} for c, s in zip(classes.tolist(), scores)],
                })  # fmt: skip
        if self.trainer.is_global_zero:
            path = reports.write_json(self.report_dir() / "predictions.json", rows)
            print(f"predictions for {len(rows)} images written to {path}")

    # -- report -----------------------------------------------------------------------------------
    def write_report(self, stage: str, values: dict[str, float], confusion: torch.Tensor) -> None:
        names = self.class_names()
        support = confusion.sum(1)
        per_class = (confusion.diag() / support.clamp(min=1)).tolist()
        data = {
            "headline": {"name": "top1", "value": values[f"{stage}/top1"]},
            "metrics": values,
            "num_samples": int(support.sum()),
            "per_class_accuracy": {n: a for n, a, s in zip(names, per_class, support.tolist()) if s > 0},
            "confusion_matrix": confusion.tolist(),
            "class_names": names,
        }
        md = f"# Classification report ({stage})\n\n" + reports.markdown_table(
            ["metric", "value"], [(k, v) for k, v in values.items()]
        )
        md += f"\n{data['num_samples']} images.\n\n## Per-class accuracy\n\n"
        md += reports.markdown_table(["class", "accuracy", "images"],
                                     [(n, a, s) for n, a, s in zip(names, per_class, support.tolist()) if s > 0])  # fmt: skip
        figures = {"confusion": confusion_figure(confusion, names)} if len(names) <= 50 else {}
        paths = reports.write_report(self.report_dir(), f"classification_{stage}", data, md, figures)
        print(f"report: top-1 {values[f'{stage}/top1']:.4f}; written to {', '.join(map(str, paths.values()))}")


def confusion_figure(confusion: torch.Tensor, names: Sequence[str]):
    import matplotlib.pyplot as plt

    rows = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for (i, j), v in zip(((i, j) for i in range(len(names)) for j in range(len(names))), confusion.flatten().tolist()):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", color="white" if rows[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalised colour, counts in cells)")
    return fig
