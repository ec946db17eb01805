"""Image classification with the published DeiT recipe: mixup/cutmix, label smoothing, EMA, top-1/top-5."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from ..lightning_compat import attached_trainer
from ..models import build_backbone
from .base import BaseTask
from .classification_report import write_classification_report, write_predictions


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
        image_size: input side used by ``summary`` for FLOPs; linked from ``data.image_size`` (one key for both).
        **kwargs: the :class:`~ravlt_pl.tasks.base.BaseTask` arguments (``optimizer``, ``scheduler``,
            ``ema_decay``, ``pretrained``, ``report_dir``, ``weight_decay_exempt``,
            ``float32_matmul_precision``). Here ``pretrained`` initialises all but the head, the
            EMA is evaluated alongside the model, and ``weight_decay_exempt`` ``None`` is DeiT's ``["1d"]``.
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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        extra = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
        self.model = build_backbone(variant, backbone_overrides, num_classes=num_classes, **extra)
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
        loss = self.losses[stage].compute()  # on every process: it syncs (Lightning logs the same cached value)
        if self.writes_reports:
            metrics = {k: float(v) for k, v in values.items()} | {f"{stage}/loss": float(loss)}
            paths = write_classification_report(
                self.report_dir(), stage, metrics, confusion.cpu(), self.class_names(), self.weights_source()
            )
            print(f"report: top-1 {metrics[f'{stage}/top1']:.4f}; written to {', '.join(map(str, paths.values()))}")
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
        info = getattr(self.trainer.datamodule, "info", None) if attached_trainer(self) else None
        return list(info.class_names) if info else [str(i) for i in range(self.hparams.num_classes)]

    def on_predict_epoch_end(self) -> None:
        """Write ``predictions.json`` (file → top-5 classes and probabilities) for the predict folder."""
        if self.trainer.is_global_zero:
            path, count = write_predictions(
                self.report_dir() / "predictions.json", self.trainer.predict_loop.predictions, self.class_names()
            )
            print(f"predictions for {count} images written to {path}")
