"""COCO detection and instance segmentation: RetinaNet, Mask R-CNN, Cascade Mask R-CNN on RAVLT.

The loop only: torchvision's detectors compute their own losses; evaluation feeds torchmetrics'
``MeanAveragePrecision`` (COCOeval underneath) per step and computes it at epoch end; reports and
COCO-format result files are written at the end of ``validate``/``test``/``predict``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image
from pycocotools import mask as mask_utils
from torch import Tensor, nn
from torch.optim import AdamW
from torchmetrics.detection import MeanAveragePrecision
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .. import reports
from ..models.detection import HAS_MASKS, LABEL_OFFSET, DetectorName, build_detector, dummy_forward, rescale_detections
from .base import BaseTask, WarmupSchedule

#: torchmetrics key suffix → COCO's name, in COCOeval's order (the 12 numbers of ``summarize()``)
COCO_METRICS = {
    "map": "AP", "map_50": "AP50", "map_75": "AP75", "map_small": "APs", "map_medium": "APm", "map_large": "APl",
    "mar_1": "AR1", "mar_10": "AR10", "mar_100": "AR100", "mar_small": "ARs", "mar_medium": "ARm", "mar_large": "ARl",
}  # fmt: skip
Headline = Literal["bbox_map", "bbox_map_50", "segm_map", "segm_map_50"]


class DetectionTask(BaseTask):
    """A torchvision detector on a RAVLT backbone, trained with the published COCO recipe.

    Args:
        num_classes: object classes, without background (linked from the data module).
        detector: ``retinanet``, ``maskrcnn`` or ``cascade_maskrcnn``.
        variant: published RAVLT variant (``ravlt_t``/``s``/``b``/``l``).
        backbone_overrides: RAVLT constructor arguments replacing the variant's (e.g. a tiny model).
        drop_path_rate: stochastic depth; ``None`` keeps the variant's published rate (as the released configs).
        fpn_channels: FPN width (256 published).
        representation_size: box head fc width (1024 published).
        mask_channels: mask head width (256 published).
        anchor_scale: multiplies torchvision's anchor sizes (1 published; 0.5 for objects half the COCO size).
        detector_kwargs: further torchvision detector arguments (``box_batch_size_per_image``,
            ``rpn_post_nms_top_n_train``, ``box_score_thresh``, ...; Cascade: ``class_agnostic``).
        headline: metric named as the report's headline and monitored for the best checkpoint.
        draw_score_threshold: detections drawn in report/predict images score at least this.
        num_drawn_images: validation images drawn into the report figure.
        optimizer: optimizer (the recipe: AdamW lr 1e-4, weight decay .05; no decay on norms/biases).
        scheduler: learning-rate schedule (the recipe: 500 linear warmup steps, ×0.1 at epochs 8, 11 / 27, 33).
        pretrained: backbone checkpoint (ours or the authors' classification / mmdet release).
        report_dir: where reports go (default: the run's log dir).
        weight_decay_exempt: parameters without weight decay (``"1d"`` and/or name substrings, see
            :class:`~ravlt_pl.tasks.base.BaseTask`); ``None`` decays every parameter.
    """

    mode = "max"
    summary_input_size = (800, 1280)

    def __init__(
        self,
        num_classes: int = 80,
        detector: DetectorName = "maskrcnn",
        variant: str = "ravlt_s",
        backbone_overrides: dict | None = None,
        drop_path_rate: float | None = None,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        mask_channels: int = 256,
        anchor_scale: float = 1.0,
        detector_kwargs: dict | None = None,
        headline: Headline = "bbox_map",
        draw_score_threshold: float = 0.3,
        num_drawn_images: int = 4,
        optimizer: OptimizerCallable = AdamW,
        scheduler: LRSchedulerCallable = WarmupSchedule,
        pretrained: str | None = None,
        report_dir: str | None = None,
        weight_decay_exempt: list[str] | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, None, pretrained, report_dir, weight_decay_exempt)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = build_detector(
            detector, num_classes, variant, backbone_overrides, drop_path_rate,
            fpn_channels, representation_size, mask_channels, anchor_scale, **(detector_kwargs or {}),
        )  # fmt: skip
        self.load_pretrained_backbone(self.model.backbone.body)
        self.label_offset = LABEL_OFFSET[detector]
        self.iou_types = ("bbox", "segm") if HAS_MASKS[detector] else ("bbox",)
        if headline.split("_")[0] not in self.iou_types:
            raise ValueError(f"headline {headline!r} needs masks; {detector} predicts boxes only")
        self.headline = headline
        self.monitor = f"val/{headline}"
        # synced by gather_compute, not by torchmetrics (which needs equal image counts per process)
        self.metrics = nn.ModuleDict({
            stage: MeanAveragePrecision(iou_type=self.iou_types, class_metrics=True, sync_on_compute=False)
            for stage in ("val", "test")
        })  # fmt: skip
        self._results: list[dict] = []  # COCO-format detections of the epoch being reported
        self._drawn: list[tuple[Tensor, dict]] = []

    # -- inference ---------------------------------------------------------------------------------
    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections for uint8 or [0, 1] float images already resized by the data pipeline."""
        inputs = [img.float() / 255 if img.dtype == torch.uint8 else img for img in images]
        detections = self.model(inputs)
        for det in detections:
            det["labels"] = det["labels"] - self.label_offset  # 0-based class indices
        return detections

    def detect(self, images: Sequence[Tensor], original_sizes: Sequence[tuple[int, int]]):
        """Detections on the inputs and the same mapped to the original images (boolean masks)."""
        detections = self(images)
        sizes = [tuple(img.shape[-2:]) for img in images]
        return detections, rescale_detections(detections, sizes, [tuple(s) for s in original_sizes])

    def flops_forward(self, images: Tensor):
        return dummy_forward(self.model, images)

    # -- training ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, targets = batch
        inputs = [img.float() / 255 for img in images]
        targets = [dict(t, labels=t["labels"] + self.label_offset) for t in targets]
        losses = self.model(inputs, targets)
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    # -- evaluation --------------------------------------------------------------------------------
    def _reporting(self) -> bool:
        """Whether this epoch ends with reports (``writes_reports`` without the rank test: every rank gathers)."""
        trainer = self.trainer
        if trainer.sanity_checking:
            return False
        if trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING):
            return True
        return trainer.state.fn == TrainerFn.FITTING and trainer.current_epoch + 1 >= (trainer.max_epochs or 0)

    def _evaluate(self, batch, stage: str) -> None:
        images, targets = batch
        detections, original = self.detect(images, [t["orig_size"] for t in targets])
        self.metrics[stage].update(*metric_inputs(original, targets))
        if self._reporting():
            self._collect(images, detections, original, [t["image_id"] for t in targets])

    def _collect(self, images, detections, original, image_ids) -> None:
        category_ids = self.category_ids()
        for image, det, orig, image_id in zip(images, detections, original, image_ids):
            self._results += coco_results(orig, int(image_id), category_ids)
            if len(self._drawn) < self.hparams.num_drawn_images:  # only what is drawn: masks are large
                keep = det["scores"] >= self.hparams.draw_score_threshold
                self._drawn.append((image.cpu(), {k: v[keep].cpu() for k, v in det.items()}))

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def _epoch_end(self, stage: str) -> None:
        computed = gather_compute(self.metrics[stage])
        self.metrics[stage].reset()
        if len(self.iou_types) == 1:  # torchmetrics prefixes its keys with the IoU type only when there are two
            computed = {(f"{self.iou_types[0]}_{k}" if k != "classes" else k): v for k, v in computed.items()}
        values = {f"{iou}_{key}": float(computed[f"{iou}_{key}"]) for iou in self.iou_types for key in COCO_METRICS}
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()})
        if self._reporting():
            results = gather(self._results)
            if self.writes_reports:
                self.write_report(stage, values, computed, results)
        self._results, self._drawn = [], []

    # -- predict -----------------------------------------------------------------------------------
    def predict_step(self, batch, batch_idx):
        """Boxes, scores and labels in original-image pixels per image.

        Masks go (as RLE) to ``predictions_segm.json`` at the epoch end, drawn images to ``<report dir>/drawn/``.
        """
        images, metas = batch
        detections, original = self.detect(images, [m["orig_size"] for m in metas])
        category_ids, names = self.category_ids(), self.category_names()
        out = []
        for image, det, orig, meta in zip(images, detections, original, metas):
            self._results += coco_results(orig, int(meta["image_id"]), category_ids)
            drawn = draw_detections(image.cpu(), det, names, self.hparams.draw_score_threshold)
            save_png(self.report_dir() / "drawn" / f"{Path(meta['file_name']).stem}.png", drawn)
            out.append({"image_id": meta["image_id"], "file_name": meta["file_name"],
                        **{k: orig[k].cpu() for k in ("boxes", "scores", "labels")}})  # fmt: skip
        return out

    def on_predict_epoch_end(self) -> None:
        results = gather(self._results)
        self._results = []
        if self.trainer.is_global_zero:
            paths = self.write_results(self.report_dir(), results)
            print(f"{len(results)} detections written to {', '.join(map(str, paths))}; "
                  f"drawn images in {self.report_dir() / 'drawn'}")  # fmt: skip

    # -- reports -----------------------------------------------------------------------------------
    def category_ids(self) -> list[int]:
        """Label → dataset category id (the data module's mapping, else ``1..num_classes``)."""
        ids = getattr(self.trainer.datamodule, "category_ids", None) if self._trainer else None
        return list(ids) if ids else list(range(1, self.hparams.num_classes + 1))

    def category_names(self) -> list[str]:
        names = getattr(self.trainer.datamodule, "category_names", None) if self._trainer else None
        return list(names) if names else [str(i) for i in self.category_ids()]

    def write_results(self, out_dir: Path, results: list[dict]) -> list[Path]:
        """``predictions_bbox.json`` (and ``predictions_segm.json``) in the COCO results format, compact JSON."""
        paths = []
        for iou in self.iou_types:
            keys = ("image_id", "category_id", "bbox" if iou == "bbox" else "segmentation", "score")
            text = json.dumps([{k: r[k] for k in keys} for r in results])
            paths.append(reports.write_text(out_dir / f"predictions_{iou}.json", text))
        return paths

    def write_report(self, stage: str, values: dict[str, float], computed: dict, results: list[dict]) -> None:
        out_dir = self.report_dir()
        names = self.category_names()
        per_category = {iou: per_class_ap(computed, iou, names) for iou in self.iou_types}
        data = {
            "headline": {"name": self.headline, "value": values[self.headline]},
            "metrics": {iou: {COCO_METRICS[k]: values[f"{iou}_{k}"] for k in COCO_METRICS} for iou in self.iou_types},
            "per_category_ap": per_category,
            "num_detections": len(results),
            "predictions": [p.name for p in self.write_results(out_dir, results)],
        }
        md = f"# Detection report ({stage}, {self.hparams.detector}, {self.hparams.variant})\n\n"
        rows = [(iou, *data["metrics"][iou].values()) for iou in self.iou_types]
        md += reports.markdown_table(["type", *COCO_METRICS.values()], rows, ".3f")
        md += "\n## AP per category\n\n" + reports.markdown_table(
            ["category", *(f"{iou} AP" for iou in self.iou_types)],
            [(n, *(per_category[iou].get(n, float("nan")) for iou in self.iou_types)) for n in per_category["bbox"]],
            ".3f",
        )
        md += f"\nCOCO-format results: {', '.join(data['predictions'])}.\n"
        threshold = self.hparams.draw_score_threshold
        figures = {"predictions": drawn_figure(self._drawn, names, threshold)} if self._drawn else {}
        paths = reports.write_report(out_dir, f"detection_{stage}", data, md, figures)
        written = ", ".join(map(str, paths.values()))
        print(f"report: {self.headline} {data['headline']['value']:.4f}; written to {written}")


# -- helpers ---------------------------------------------------------------------------------------
def metric_inputs(detections: list[dict], targets: list[dict]) -> tuple[list[dict], list[dict]]:
    """``MeanAveragePrecision.update`` arguments from detections and eval targets, both in original pixels.

    Crowd flags and COCO's ``area`` go along, so the evaluation is COCOeval's on the annotation file.
    """
    preds = [{k: d[k] for k in ("boxes", "scores", "labels", "masks") if k in d} for d in detections]
    gts = [
        {"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"], "area": t["area"],
         **({"masks": t["masks"].bool()} if "masks" in t else {})}
        for t in targets
    ]  # fmt: skip
    return preds, gts


def coco_results(detection: dict[str, Tensor], image_id: int, category_ids: Sequence[int]) -> list[dict]:
    """One image's detections (original pixels, 0-based labels) as COCO result records (xywh boxes, RLE masks)."""
    boxes = detection["boxes"].detach().cpu().double()
    boxes[:, 2:] -= boxes[:, :2]
    scores, labels = detection["scores"].tolist(), detection["labels"].tolist()
    records = [
        {"image_id": image_id, "category_id": int(category_ids[c]), "bbox": b, "score": s}
        for b, s, c in zip(boxes.tolist(), scores, labels)
    ]
    if "masks" in detection and records:
        masks = detection["masks"].detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0)  # (H, W, N)
        for record, rle in zip(records, mask_utils.encode(np.asfortranarray(masks))):
            record["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return records


def gather_compute(metric: MeanAveragePrecision) -> dict:
    """``compute`` over every process's images.

    torchmetrics' own sync all-gathers the per-image states tensor by tensor, which needs the same
    image count on every process; evaluation shards are uneven (each image is scored exactly once),
    so the states travel as Python objects instead.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        state = metric.metric_state  # lists with one entry per image
        local = {k: [v.cpu() if isinstance(v, Tensor) else v for v in values] for k, values in state.items()}
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        for key in local:
            setattr(metric, key, [item for part in parts for item in part[key]])
    return metric.compute()


def gather(items: list) -> list:
    """Every process's list, concatenated (each process evaluated its own shard of the images)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def per_class_ap(computed: dict, iou: str, names: Sequence[str]) -> dict[str, float]:
    """AP per category present in the ground truth (torchmetrics' ``map_per_class`` over ``classes``)."""
    classes = computed["classes"].reshape(-1).tolist()
    aps = computed[f"{iou}_map_per_class"].reshape(-1).tolist()
    return {names[c]: ap for c, ap in zip(classes, aps) if 0 <= c < len(names) and ap >= 0}


def draw_detections(image: Tensor, det: dict[str, Tensor], names: Sequence[str], threshold: float) -> Tensor:
    """uint8 (3, H, W) image with the detections scoring ≥ ``threshold`` drawn (boxes, labels, masks)."""
    keep = det["scores"] >= threshold
    labels = det["labels"][keep].tolist()
    colours = [_colour(c) for c in labels]
    if "masks" in det and keep.any():
        masks = det["masks"][keep].reshape(-1, *image.shape[-2:]) > 0.5
        image = draw_segmentation_masks(image, masks, alpha=0.45, colors=colours)
    scores = det["scores"][keep].tolist()
    captions = [f"{names[c] if 0 <= c < len(names) else c} {s:.2f}" for c, s in zip(labels, scores)]
    return draw_bounding_boxes(image, det["boxes"][keep], captions, colors=colours, width=2)


def _colour(label: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(label)
    return tuple(int(v) for v in rng.integers(64, 256, size=3))


def drawn_figure(drawn: list[tuple[Tensor, dict]], names: Sequence[str], threshold: float):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(drawn), figsize=(4.5 * len(drawn), 4.5), squeeze=False)
    for ax, (image, det) in zip(axes[0], drawn):
        ax.imshow(draw_detections(*enlarged(image, det), names, threshold).permute(1, 2, 0).numpy())
        ax.set_title(f"{int((det['scores'] >= threshold).sum())} detections ≥ {threshold:.2f}")
        ax.axis("off")
    return fig


def enlarged(image: Tensor, det: dict[str, Tensor], min_side: int = 480) -> tuple[Tensor, dict[str, Tensor]]:
    """Small images (the synthetic sets) scaled up by an integer factor, so drawn labels stay legible."""
    factor = -(-min_side // max(image.shape[-2:]))  # ceil
    if factor <= 1:
        return image, det
    det = dict(det, boxes=det["boxes"] * factor)
    if "masks" in det:
        det["masks"] = det["masks"].repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    return image.repeat_interleave(factor, -2).repeat_interleave(factor, -1), det


def save_png(path: Path, image: Tensor) -> Path:
    pixels = image.permute(1, 2, 0).numpy()  # (H, W, 3) uint8
    return reports.atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
