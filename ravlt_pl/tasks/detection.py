"""COCO detection and instance segmentation: RetinaNet, Mask R-CNN, Cascade Mask R-CNN on RAVLT.

The loop only: torchvision's detectors compute their own losses; evaluation feeds torchmetrics'
``MeanAveragePrecision`` (COCOeval underneath) per step and computes it at epoch end; reports and
COCO-format result files are written at the end of ``validate``/``test``/``predict``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import Params
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

from ..lightning_compat import attached_trainer
from ..models import released
from ..models.checkpoint import read_checkpoint
from ..models.detection import dummy_forward, rescale_detections
from . import detection_report
from .base import BaseTask, log

#: torchmetrics key suffix → COCO's name, in COCOeval's order (the 12 numbers of ``summarize()``)
COCO_METRICS = {
    "map": "AP", "map_50": "AP50", "map_75": "AP75", "map_small": "APs", "map_medium": "APm", "map_large": "APl",
    "mar_1": "AR1", "mar_10": "AR10", "mar_100": "AR100", "mar_small": "ARs", "mar_medium": "ARm", "mar_large": "ARl",
}  # fmt: skip
# COCOeval's float64 thresholds; torchmetrics' defaults come from a float32 linspace and move AP by up to ~2e-3
COCO_IOU_THRESHOLDS: list[float] = Params(iouType="bbox").iouThrs.tolist()  # .50:.05:.95
COCO_RECALL_THRESHOLDS: list[float] = Params(iouType="bbox").recThrs.tolist()  # 0:.01:1
Headline = Literal["bbox_map", "bbox_map_50", "segm_map", "segm_map_50"]
#: what validate / test / predict run, said in every report
PROTOCOL = ("one image per forward, padded alone to a multiple of 32 (the authors' tools/test.py: padding changes "
            "the global attention's outputs), float32, the authors' mmdet test rules for the R-CNNs")  # fmt: skip
#: top-level modules of our detectors → the part named when a whole released model is loaded
PARTS = {"backbone.body": "backbone", "backbone.fpn": "FPN", "rpn": "RPN", "roi_heads": "RoI heads", "head": "head"}


class DetectionTask(BaseTask):
    """A torchvision detector on a RAVLT backbone, trained with the published COCO recipe.

    Args:
        detector: the detector class, called with ``num_classes``; a config names it by ``class_path``
            with its ``init_args`` (RAVLT variant, FPN and head widths, torchvision's arguments):
            :class:`~ravlt_pl.models.detection.RAVLTRetinaNet`, :class:`~ravlt_pl.models.detection.RAVLTMaskRCNN`
            or :class:`~ravlt_pl.models.detection.RAVLTCascadeMaskRCNN`. No default: jsonargparse would
            carry a default class's ``init_args`` over to the class a config names.
        num_classes: object classes, without background (linked from the data module).
        headline: metric named as the report's headline and monitored for the best checkpoint.
        draw_score_threshold: detections drawn in report/predict images score at least this.
        num_drawn_images: validation images drawn into the report figure.
        **kwargs: the :class:`~ravlt_pl.tasks.base.BaseTask` arguments (``optimizer``, ``scheduler``,
            ``ema_decay``, ``pretrained``, ``report_dir``, ``weight_decay_exempt``, ``float32_matmul_precision``).
            The recipes: AdamW lr 1e-4, weight decay .05 for the R-CNNs, 1e-4 for RetinaNet; 500 linear
            warmup steps, ×0.1 at epochs 8, 11 / 27, 33; ``weight_decay_exempt`` the authors'
            ``paramwise_cfg`` per detector (``None`` decays every parameter). ``pretrained``: a backbone
            checkpoint (ours or the authors' classification / mmdet release), or the authors' whole
            released detector (see ``pretrained_parts``). The EMA (when set) is what validate/test/predict evaluate.
        pretrained_parts: what ``pretrained`` initialises: ``auto`` the whole detector when the file is
            one of the authors' released detectors (backbone, FPN, RPN, RoI / RetinaNet heads; it must then
            fit the config: variant, widths, class count), else the backbone; ``backbone`` the backbone
            only (fine-tuning on other classes); ``all`` the whole detector or an error.
    """

    mode = "max"
    summary_input_size = (800, 1280)

    def __init__(
        self,
        detector: Callable[[int], nn.Module],
        num_classes: int = 80,
        headline: Headline = "bbox_map",
        draw_score_threshold: float = 0.3,
        num_drawn_images: int = 4,
        pretrained_parts: Literal["auto", "backbone", "all"] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # records every argument as a hyper-parameter
        if callable(self.hparams.detector):  # built in Python, not from a config: checkpoints keep its name only
            self.hparams.detector = class_spec(detector)
        self.model = detector(num_classes)
        self.released_source: str | None = None  # the released detector file loaded whole, if one was
        self.label_offset: int = self.model.label_offset
        self.iou_types: tuple[str, ...] = tuple(self.model.iou_types)
        if headline.split("_")[0] not in self.iou_types:
            raise ValueError(f"headline {headline!r} needs masks; {type(self.model).__name__} predicts boxes only")
        self.headline = headline
        self.monitor = f"val/{headline}"
        self.metrics = nn.ModuleDict({stage: coco_metric(self.iou_types) for stage in ("val", "test")})
        self._results: list[dict] = []  # COCO-format detections of the epoch being reported
        self._drawn: list[tuple[Tensor, dict, dict]] = []  # (image, ground truth, detections) to draw

    def load_pretrained(self) -> None:
        """The whole detector from an authors' released file whose heads fit, else the backbone."""
        self.released_source = self.load_pretrained_whole(self.hparams.pretrained_parts)
        if self.released_source is None:
            self.load_pretrained_backbone(self.model.backbone.body)

    # -- inference ---------------------------------------------------------------------------------
    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections for uint8 or [0, 1] float images already resized by the data pipeline."""
        inputs = [img.float() / 255 if img.dtype == torch.uint8 else img for img in images]
        detections = (self.ema.module if self.ema is not None else self.model)(inputs)
        for det in detections:
            det["labels"] = det["labels"] - self.label_offset  # 0-based class indices
        return detections

    def detect(self, images: Sequence[Tensor], original_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Detections in original pixels (0-based labels, masks (N, H, W) bool), one image per forward.

        The authors test one image at a time, and the zero padding of a batch changes every output of
        the global-attention backbone, so the results do not depend on the evaluation batch size.
        """
        model = self.ema.module if self.ema is not None else self.model
        out = []
        for image, size in zip(images, original_sizes):
            size = tuple(int(v) for v in size)
            inputs = [image.float() / 255 if image.dtype == torch.uint8 else image]
            if hasattr(model, "predict_preprocessed"):  # the authors' test path, masks pasted at the original size
                batch, _ = model.transform(inputs)
                out += model.predict_preprocessed(batch.tensors, batch.image_sizes, [size])
            else:  # torchvision's post-processing at input size, mapped back
                (det,) = model(inputs)
                det["labels"] = det["labels"] - self.label_offset
                out += rescale_detections([det], [tuple(image.shape[-2:])], [size])
        return out

    def flops_forward(self, images: Tensor):
        return dummy_forward(self.model, images)

    # -- pretrained weights ------------------------------------------------------------------------
    def load_pretrained_whole(self, parts: str) -> str | None:
        """Load ``pretrained`` into the whole detector when it is an authors' released detector; its name, or
        ``None`` when only the backbone is to be initialised (``parts="backbone"``, or a backbone-only file)."""
        if not self.pretrained or parts == "backbone":
            return None
        raw, source = read_checkpoint(self.pretrained)
        inner = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
        heads = isinstance(inner, dict) and any(k.startswith(("rpn_head.", "roi_head.", "bbox_head.")) for k in inner)
        if not heads:
            if parts == "all":
                raise ValueError(f"pretrained_parts=all: {source} is no released detector (it has no detection heads)")
            return None
        state, _ = released.released_state(raw)
        family = released.family_of(state, source)
        released.load_converted(self.model, family.convert(state, self.model), source)
        counts: dict[str, int] = {}
        for key in self.model.state_dict():
            part = next((name for prefix, name in PARTS.items() if key.startswith(prefix + ".")), key.split(".")[0])
            counts[part] = counts.get(part, 0) + 1
        log.info("pretrained: the whole %s from %s (%s): %s", type(self.model).__name__, source, family.name,
                 ", ".join(f"{part} {n} tensors" for part, n in counts.items()))  # fmt: skip
        return source

    def weights_source(self, ema: bool = False) -> str:
        trainer = self.trainer
        if self.released_source and trainer.state.fn != TrainerFn.FITTING and not trainer.ckpt_path:
            return f"the authors' released model {self.released_source} (every tensor)" + (", EMA" if ema else "")
        return super().weights_source(ema)

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
        original = self.detect(images, [t["orig_size"] for t in targets])
        self.metrics[stage].update(*metric_inputs(original, targets))
        if self._reporting():
            self._collect(images, original, targets)

    def _collect(self, images, original, targets) -> None:
        category_ids = self.category_ids()
        for image, orig, target in zip(images, original, targets):
            self._results += coco_results(orig, int(target["image_id"]), category_ids)
            if len(self._drawn) < self.hparams.num_drawn_images:  # only what is drawn: masks are large
                size = tuple(image.shape[-2:])
                truth = detection_report.truth_at_input_size(target, size)
                shown = at_input_size(orig, target["orig_size"], size, self.hparams.draw_score_threshold)
                self._drawn.append((image.cpu(), truth, shown))

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
        images = batch["image"]  # a list of (3, h, w) uint8, with their ``path``, ``index`` and ``orig_size``
        original = self.detect(images, batch["orig_size"])
        category_ids, names = self.category_ids(), self.category_names()
        out = []
        threshold = self.hparams.draw_score_threshold
        for image, orig, size, path, file_name, image_id in zip(images, original, batch["orig_size"], batch["path"],
                                                                batch["file_name"], batch["image_id"]):  # fmt: skip
            self._results += [dict(r, file_name=file_name) for r in coco_results(orig, image_id, category_ids)]
            shown = at_input_size(orig, size, tuple(image.shape[-2:]), threshold)
            drawn = detection_report.draw_detections(image.cpu(), shown, names, threshold)
            # drawn/<file name>.png: one per source file (a.jpg and a.png, sub/a.jpg do not meet)
            detection_report.save_drawn(self.report_dir() / "drawn" / f"{file_name}.png", drawn)
            out.append({"image_id": image_id, "path": str(path), "file_name": file_name,
                        **{k: orig[k].cpu() for k in ("boxes", "scores", "labels")}})  # fmt: skip
        return out

    def on_predict_epoch_end(self) -> None:
        results = gather(self._results)
        self._results = []
        if self.trainer.is_global_zero:
            paths = detection_report.write_results(self.report_dir(), results, self.iou_types)
            print(f"{len(results)} detections written to {', '.join(map(str, paths))}; "
                  f"drawn images in {self.report_dir() / 'drawn'}")  # fmt: skip

    # -- reports -----------------------------------------------------------------------------------
    def category_ids(self) -> list[int]:
        """Label → dataset category id (the data module's mapping, else ``1..num_classes``)."""
        info = getattr(self.trainer.datamodule, "info", None) if attached_trainer(self) else None
        ids = info.category_ids if info else None
        return list(ids) if ids else list(range(1, self.hparams.num_classes + 1))

    def category_names(self) -> list[str]:
        info = getattr(self.trainer.datamodule, "info", None) if attached_trainer(self) else None
        return list(info.class_names) if info else [str(i) for i in self.category_ids()]

    def write_report(self, stage: str, values: dict[str, float], computed: dict, results: list[dict]) -> None:
        """The report of this evaluation (rank 0; see :mod:`.detection_report`)."""
        names = self.category_names()
        detection_report.write_report(
            self.report_dir(), stage,
            model=type(self.model).__name__ + (f" ({self.model.variant})" if hasattr(self.model, "variant") else ""),
            weights=self.weights_source(ema=self.ema is not None), protocol=PROTOCOL,
            headline=(self.headline, values[self.headline]),
            metrics={iou: {name: values[f"{iou}_{k}"] for k, name in COCO_METRICS.items()} for iou in self.iou_types},
            per_category={iou: per_class_ap(computed, iou, names) for iou in self.iou_types},
            results=results, drawn=self._drawn, names=names, draw_threshold=self.hparams.draw_score_threshold,
        )  # fmt: skip


# -- helpers ---------------------------------------------------------------------------------------
def class_spec(detector: Callable) -> dict:
    """A detector class (or a ``functools.partial`` of one) as a config names it: ``class_path``, ``init_args``."""
    cls, init_args = (detector.func, dict(detector.keywords)) if isinstance(detector, partial) else (detector, {})
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def coco_metric(iou_types: Sequence[str]) -> MeanAveragePrecision:
    """COCOeval's AP/AR, per class too, with COCOeval's own float64 IoU and recall thresholds.

    Synced by :func:`gather_compute`, not by torchmetrics (which needs equal image counts per process).
    """
    return MeanAveragePrecision(iou_type=tuple(iou_types), class_metrics=True, sync_on_compute=False,
                                iou_thresholds=COCO_IOU_THRESHOLDS, rec_thresholds=COCO_RECALL_THRESHOLDS)  # fmt: skip


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
        for record, mask in zip(records, detection["masks"]):  # one at a time: full-size masks are large
            (rle,) = mask_utils.encode(np.asfortranarray(mask.detach().cpu().numpy().astype(np.uint8)[:, :, None]))
            record["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return records


def at_input_size(detection: dict[str, Tensor], original_size, size: tuple[int, int], threshold: float) -> dict:
    """The detections scoring ≥ ``threshold`` (original pixels) at the input image's ``size``, for drawing.

    Masks are resized one at a time (nearest): a full-size float copy of them all would be large.
    """
    keep = torch.where(detection["scores"] >= threshold)[0]
    height, width = (int(v) for v in original_size)
    scale = torch.tensor([size[1] / width, size[0] / height] * 2)
    shown = {"boxes": detection["boxes"][keep].cpu() * scale, "scores": detection["scores"][keep].cpu(),
             "labels": detection["labels"][keep].cpu()}  # fmt: skip
    if "masks" in detection:
        masks = [F.interpolate(detection["masks"][i][None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
                 for i in keep.tolist()]  # fmt: skip
        shown["masks"] = torch.stack(masks).cpu() if masks else torch.zeros(0, *size, dtype=torch.bool)
    return shown


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
