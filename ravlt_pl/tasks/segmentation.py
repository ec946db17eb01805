"""Semantic segmentation (ADE20K): RAVLT + Semantic FPN or UperNet, mmseg's metrics, reports, palette masks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from matplotlib.colors import ListedColormap
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.optim import AdamW
from torchmetrics.classification import MulticlassConfusionMatrix

from ..data.ade20k import IGNORE_INDEX, palette
from ..models.segmentation import build_segmentor, resize
from ..reports import atomic_write, markdown_table, write_report
from .base import BaseTask, WarmupSchedule


def scores_from_confusion(confmat: torch.Tensor) -> dict[str, torch.Tensor]:
    """mmseg's metrics from a (K, K) confusion matrix (rows: ground truth, columns: prediction).

    Per class: IoU = TP / (TP + FP + FN), Acc = TP / (TP + FN). Classes absent from both the
    prediction and the ground truth (union 0) have IoU NaN and are left out of mIoU; classes absent
    from the ground truth have Acc NaN and are left out of mAcc. aAcc = all TP / all labelled pixels.
    """
    confmat = confmat.double()
    tp = confmat.diagonal()
    label_area, pred_area = confmat.sum(1), confmat.sum(0)
    iou = tp / (label_area + pred_area - tp)  # 0/0 → NaN
    acc = tp / label_area
    return {"mIoU": iou.nanmean(), "mAcc": acc.nanmean(), "aAcc": tp.sum() / label_area.sum(), "IoU": iou, "Acc": acc}


class SegmentationScores(MulticlassConfusionMatrix):
    """The whole set's confusion matrix (summed over processes), computed into :func:`scores_from_confusion`."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(num_classes, ignore_index=ignore_index, validate_args=False)

    def compute(self) -> dict[str, torch.Tensor]:
        return scores_from_confusion(super().compute())


class SegmentationTask(BaseTask):
    """Semantic segmentation with an encoder–decoder on a RAVLT backbone.

    Args:
        num_classes: classes (150 for ADE20K; linked from the data module).
        variant: RAVLT variant (``ravlt_t/s/b/l``).
        backbone_overrides: constructor arguments replacing the variant's (e.g. a tiny test backbone).
        drop_path_rate: stochastic depth of the backbone; ``None`` keeps the variant's published rate.
        norm_eval: freeze the backbone's BatchNorm statistics in training (published, for a backbone
            initialised from ImageNet); ``false`` when training from scratch, as the demo does.
        decoder: ``fpn`` (Semantic FPN: FPN 256 ch + FPNHead 128 ch) or ``upernet`` (UPerHead 512 ch
            + auxiliary FCN head on stage 3, 256 ch).
        head_channels: decode head width; ``None`` is the published 128 (FPNHead) or 512 (UPerHead).
        fpn_channels: Semantic FPN's FPN width (published 256).
        aux_channels: UperNet's auxiliary FCN head width (published 256).
        aux_loss_weight: weight of the auxiliary head's loss (UperNet; published 0.4).
        inference: ``whole`` image (published) or ``slide`` windows of ``crop_size`` every ``stride``.
        crop_size: sliding-window size (h, w).
        stride: sliding-window stride (h, w).
        test_scales: image ratios averaged at validate/test/predict; ``[0.5, 0.75, 1.0, 1.25, 1.5,
            1.75]`` with ``test_flip`` is the published multi-scale + flip setting.
        test_flip: also average horizontally flipped views.
        class_names: names for the report (default: the data module's ``class_names``).
        report_images: how many validation images the report's image / ground truth / prediction grid shows.
        predict_dir: where ``predict`` writes palette PNG masks (default: ``<report dir>/masks``).
        optimizer, scheduler, ema_decay, pretrained, report_dir, weight_decay_exempt: see :class:`BaseTask`
            (``weight_decay_exempt``: ``None`` decays every parameter)
            (``pretrained``: a classification checkpoint loaded into the backbone before ``fit``).
    """

    monitor = "val/mIoU"
    mode = "max"

    def __init__(
        self,
        num_classes: int = 150,
        variant: str = "ravlt_s",
        backbone_overrides: dict | None = None,
        drop_path_rate: float | None = None,
        norm_eval: bool = True,
        decoder: Literal["fpn", "upernet"] = "fpn",
        head_channels: int | None = None,
        fpn_channels: int = 256,
        aux_channels: int = 256,
        aux_loss_weight: float = 0.4,
        inference: Literal["whole", "slide"] = "whole",
        crop_size: tuple[int, int] = (512, 512),
        stride: tuple[int, int] = (341, 341),
        test_scales: list[float] = [1.0],  # noqa: B006 (a list is what LightningCLI shows and parses)
        test_flip: bool = False,
        class_names: list[str] | None = None,
        report_images: int = 4,
        predict_dir: str | None = None,
        optimizer: OptimizerCallable = AdamW,
        scheduler: LRSchedulerCallable = WarmupSchedule,
        ema_decay: float | None = None,
        pretrained: str | None = None,
        report_dir: str | None = None,
        weight_decay_exempt: list[str] | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, ema_decay, pretrained, report_dir, weight_decay_exempt)
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.decoder = decoder
        self.model = build_segmentor(
            decoder, num_classes, variant, backbone_overrides, drop_path_rate,
            head_channels, fpn_channels, aux_channels, norm_eval,
        )  # fmt: skip
        self.metric = SegmentationScores(num_classes)
        self._grid: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.init_ema()

    #: The input of the published FLOPs, 512×2048 for both heads: at it the measured Semantic FPN
    #: T/S/B/L 137/182/300/432 G match the published 136/180/292/424 G (at 512×512 they are a quarter:
    #: 34/46/75/108 G), as UperNet S/B/L match theirs (939 G vs 937 for S).
    summary_input_size = (512, 2048)

    def flops_forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_decode(images)

    def setup(self, stage: str) -> None:
        if stage == "fit":  # a resumed run's checkpoint is restored after this and overrides it
            self.load_pretrained_backbone(self.model.backbone)

    # -- training -----------------------------------------------------------------------------------
    def pixel_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits upsampled to the label size, averaged over labelled pixels (0 if none)."""
        logits = resize(logits, labels.shape[-2:])
        total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        labels = batch["label"].long()
        out = self.model.forward_train(batch["image"])
        losses = {"decode": self.pixel_loss(out["decode"], labels)}
        if "aux" in out:
            losses["aux"] = self.hparams.aux_loss_weight * self.pixel_loss(out["aux"], labels)
        loss = sum(losses.values())
        size = labels.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if len(losses) > 1:
            self.log_dict({f"train/loss_{k}": v for k, v in losses.items()}, batch_size=size)
        return loss

    # -- evaluation ---------------------------------------------------------------------------------
    def predict_probs(
        self, images: torch.Tensor, sizes: Sequence[Sequence[int]], out_sizes: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Class probabilities per image (K, *out_size); ``sizes`` crop each image out of its padded batch."""
        net = self.ema.module if self.ema is not None else self.model
        h = self.hparams
        kwargs = dict(mode=h.inference, scales=h.test_scales, flip=h.test_flip, crop_size=h.crop_size, stride=h.stride)
        unpadded = all(tuple(s) == tuple(images.shape[-2:]) for s in sizes)
        if unpadded and len({tuple(o) for o in out_sizes}) == 1:
            return list(net.predict(images, out_sizes[0], **kwargs))  # one batched pass
        crops = (images[i : i + 1, :, : s[0], : s[1]] for i, s in enumerate(sizes))  # each without its padding
        return [net.predict(crop, out, **kwargs)[0] for crop, out in zip(crops, out_sizes)]

    def on_validation_epoch_start(self) -> None:
        self.metric.reset()
        self._grid = []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        labels = [label.long() for label in batch["label"]]
        probs = self.predict_probs(batch["image"], batch["size"], [label.shape for label in labels])
        for i, (p, label) in enumerate(zip(probs, labels)):
            pred = p.argmax(0)
            self.metric.update(pred[None], label[None])
            if len(self._grid) < self.hparams.report_images and self.trainer.is_global_zero:
                h, w = batch["size"][i]
                self._grid.append((_denormalize(batch["image"][i, :, :h, :w]), label.cpu().numpy(), pred.cpu().numpy()))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def _finish(self, stage: str) -> None:
        scores = self.metric.compute()
        self.metric.reset()
        self.log_dict({f"{stage}/{k}": scores[k].float() for k in ("mIoU", "mAcc", "aAcc")}, sync_dist=True)
        if self.writes_reports:
            self.write_segmentation_report(stage, scores)

    # -- reports and masks --------------------------------------------------------------------------
    def class_names(self) -> list[str]:
        if self.hparams.class_names:
            return list(self.hparams.class_names)
        names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
        return list(names) if names else [f"class {i}" for i in range(self.num_classes)]

    def write_segmentation_report(self, stage: str, scores: dict[str, torch.Tensor]) -> dict[str, Path]:
        names, h = self.class_names(), self.hparams
        iou, acc = scores["IoU"].tolist(), scores["Acc"].tolist()
        overall = {k: float(scores[k]) for k in ("mIoU", "mAcc", "aAcc")}
        per_class = [{"class": n, "IoU": _finite(i), "Acc": _finite(a)} for n, i, a in zip(names, iou, acc)]
        data = {
            "headline": {"name": "mIoU", "value": _finite(overall["mIoU"])},
            "task": "semantic_segmentation", "stage": stage, "decoder": self.decoder, "variant": h.variant,
            "inference": {"mode": h.inference, "scales": list(h.test_scales), "flip": h.test_flip},
            **{k: _finite(v) for k, v in overall.items()}, "per_class": per_class,
        }  # fmt: skip
        tta = f"{h.inference}, scales {list(h.test_scales)}{', flip' if h.test_flip else ''}"
        markdown = (
            f"# Semantic segmentation ({stage})\n\nRAVLT {h.variant} + {self.decoder}, inference: {tta}.\n\n"
            + markdown_table(["mIoU", "mAcc", "aAcc"], [[_pct(overall[k]) for k in ("mIoU", "mAcc", "aAcc")]])
            + "\nPer class (%). '-': IoU of a class absent from ground truth and prediction, Acc of a class absent "
            "from the ground truth; both are left out of the means (mmseg's definition).\n\n"
            + markdown_table(["class", "IoU", "Acc"], [[n, _pct(i), _pct(a)] for n, i, a in zip(names, iou, acc)])
        )
        figures = {"grid": self._grid_figure(names)} if self._grid else {}
        paths = write_report(self.report_dir(), f"segmentation_{stage}", data, markdown, figures)
        print(f"report: mIoU {overall['mIoU']:.4f}; written to {', '.join(map(str, paths.values()))}")
        return paths

    def _grid_figure(self, names: list[str]) -> plt.Figure:
        colours = palette() / 255.0
        cmap = ListedColormap(colours)
        fig, axes = plt.subplots(len(self._grid), 3, figsize=(9, 2.6 * len(self._grid)), squeeze=False)
        for row, (image, label, pred) in zip(axes, self._grid):
            for ax, content, title in zip(row, (image, label, pred), ("image", "ground truth", "prediction")):
                if content.ndim == 3:
                    ax.imshow(content)
                else:
                    ax.imshow(content, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
                ax.set_title(title, fontsize=9)
                ax.axis("off")
        values = np.unique(np.concatenate([a.ravel() for _, label, pred in self._grid for a in (label, pred)]))
        shown = [int(v) for v in values if v < len(names)][:20] + ([IGNORE_INDEX] if IGNORE_INDEX in values else [])
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[v]) for v in shown]
        labels = [names[v] if v < len(names) else "ignored" for v in shown]
        fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        return fig

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        """Write one palette PNG per image (pixel value = class index) at the image's original size."""
        out_dir = Path(self.hparams.predict_dir) if self.hparams.predict_dir else self.report_dir() / "masks"
        probs = self.predict_probs(batch["image"], batch["size"], batch["orig_size"])
        colours = palette().ravel().tolist()
        paths = []
        for name, p in zip(batch["name"], probs):
            mask = Image.fromarray(p.argmax(0).to(torch.uint8).cpu().numpy(), mode="P")
            mask.putpalette(colours)
            paths.append(str(atomic_write(out_dir / f"{name}.png", lambda tmp, m=mask: m.save(tmp, format="PNG"))))
        return paths


def _denormalize(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised → (H, W, 3) uint8 for display."""
    mean = image.new_tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = image.new_tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _finite(value: float) -> float | None:
    """NaN (a class absent everywhere) → None, so the JSON stays valid."""
    return None if math.isnan(value) else value


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}"
