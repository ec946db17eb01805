"""Semantic segmentation (ADE20K): RAVLT + a segmentor named by class path, mmseg's metrics, reports, masks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from ..data.ade20k import IGNORE_INDEX, ADE20KDataModule, eval_transform
from ..data.images import read_rgb
from ..lightning_compat import attached_trainer
from ..models.checkpoint import CheckpointError, read_checkpoint
from ..models.released import infer_backbone, load_converted
from ..models.segmentation import EncoderDecoder, SemanticFPN, resize
from ..models.segmentation.released import FAMILIES, SEGMENTOR_CLASS, variant_name
from ..models.variants import build_backbone
from .base import BaseTask
from .segmentation_report import GridRow, denormalize, protocol, save_mask, write_segmentation_report

#: A segmentor class (or its partial with the config's ``init_args``) called as ``segmentor(backbone, num_classes)``.
SegmentorBuilder = Callable[[nn.Module, int], EncoderDecoder]


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


def describe_backbone(spec: Mapping) -> str:
    """``ravlt_s`` (a published variant) or its widths and depths."""
    return variant_name(spec) or f"RAVLT of widths {list(spec['embed_dims'])}, depths {list(spec['depths'])}"


def load_released_segmentor(model: EncoderDecoder, checkpoint: str | Mapping) -> list[str]:
    """Load an authors' released segmentor file (mmseg ``state_dict`` with its heads) into ``model``, every tensor.

    Returns the parts loaded (``backbone``, ``neck``, ``decode_head``, ``auxiliary_head``), or ``[]`` when
    the file has no decode head (an ImageNet or backbone-only checkpoint, for the backbone path). A file of
    another segmentor, variant or class count is an error naming it; nothing is loaded then.
    """
    raw, source = read_checkpoint(checkpoint, mmap=True)
    state = raw.get("state_dict") if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or not any(str(k).startswith("decode_head.") for k in state):
        return []
    family = next((f for f in FAMILIES if f.matches(state)), None)
    if family is None:
        raise CheckpointError(f"{source}: has a decode head but is neither a released Semantic FPN nor UperNet")
    if not isinstance(model, SEGMENTOR_CLASS[family.name]):
        raise CheckpointError(
            f"{source}: is a released {SEGMENTOR_CLASS[family.name].__name__}, but the config builds "
            f"{type(model).__name__}; use the config of that segmentor"
        )
    theirs = infer_backbone(state)
    ours = {k: list(getattr(model.backbone, k)) for k in ("embed_dims", "depths", "num_heads")}
    if any(list(theirs[k]) != ours[k] for k in ours):
        raise CheckpointError(
            f"{source}: a released {type(model).__name__} on {describe_backbone(theirs)}, but the config builds it on "
            f"{describe_backbone(ours)}; use the config of that variant"
        )
    try:
        load_converted(model, family.convert(state, model), source)
    except CheckpointError as err:
        hint = "to fine-tune on other classes load only its backbone: --model.init_args.pretrained_backbone_only true"
        raise CheckpointError(f"{err}; {hint}") from None
    return sorted({k.split(".")[0] for k in state}, key=["backbone", "neck", "decode_head", "auxiliary_head"].index)


class SegmentationScores(MulticlassConfusionMatrix):
    """The whole set's confusion matrix (summed over processes), computed into :func:`scores_from_confusion`."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(num_classes, ignore_index=ignore_index, validate_args=False)

    def compute(self) -> dict[str, torch.Tensor]:
        return scores_from_confusion(super().compute())


def mask_names(file_names: Sequence[str]) -> dict[str, str]:
    """Each image's mask file (relative path): the image's with ``.png`` for its suffix (mmseg's and
    ADE20K's pairing), or its whole name + ``.png`` where two images would share one (``a.jpg`` and
    ``a.png`` give ``a.jpg.png`` and ``a.png.png``), so no mask overwrites another."""
    stem_of = {name: str(PurePosixPath(name).with_suffix("")) for name in file_names}
    shared = Counter(stem_of.values())
    return {name: f"{stem}.png" if shared[stem] == 1 else f"{name}.png" for name, stem in stem_of.items()}


class SegmentationTask(BaseTask):
    """Semantic segmentation with an encoder–decoder on a RAVLT backbone.

    Args:
        num_classes: classes (150 for ADE20K; linked from the data module).
        variant: RAVLT variant (``ravlt_t/s/b/l``).
        backbone_overrides: constructor arguments replacing the variant's (e.g. a tiny test backbone).
        drop_path_rate: stochastic depth of the backbone; ``None`` keeps the variant's published rate.
        norm_eval: freeze the backbone's BatchNorm statistics in training (mmseg's ``norm_eval``); off
            by default, as in the authors' runs (see the recipe configs' headers) and from scratch (the demo).
        segmentor: the encoder–decoder built around the backbone, by class path with its ``init_args``:
            ``ravlt_pl.models.segmentation.SemanticFPN`` (FPN 256 ch + FPNHead 128 ch) or
            ``ravlt_pl.models.segmentation.UperNet`` (UPerHead 512 ch + auxiliary FCN head on stage 3,
            256 ch, loss weight 0.4); the defaults of each are the published widths.
        inference: ``whole`` image (published) or ``slide`` windows of ``crop_size`` every ``stride``.
        crop_size: sliding-window size (h, w).
        stride: sliding-window stride (h, w).
        test_scales: image ratios averaged at validate/test/predict (mmseg's ``aug_test``: each ratio
            scales the data's test resize bound, each view's softmax is taken at the original size, the
            mean is the prediction); ``[0.5, 0.75, 1.0, 1.25, 1.5, 1.75]`` with ``test_flip`` is the
            authors' ``tools/test.py`` default and the published configs'. Fit's periodic validations
            run single-scale, as mmseg's evaluation hook.
        test_flip: also average horizontally flipped views.
        class_names: names for the report (default: the data module's ``info.class_names``).
        report_images: how many validation images the report's image / ground truth / prediction grid shows.
        predict_dir: where ``predict`` writes palette PNG masks (default: ``<report dir>/masks``).
        pretrained_backbone_only: of a released segmentor given as ``pretrained``, load only the
            backbone (fine-tuning on other classes); by default such a file loads whole.
        **kwargs: the :class:`BaseTask` arguments (``optimizer``, ``scheduler``, ``ema_decay``,
            ``pretrained``, ``report_dir``, ``weight_decay_exempt``, ``float32_matmul_precision``).
            Here ``pretrained`` is either the authors' released segmentor (their ``fpn_*_1x.pth`` /
            ``uper_*_2x.pth``: every tensor is loaded, for ``fit``, ``validate``, ``test`` and ``predict``)
            or a classification checkpoint loaded into the backbone before ``fit``; the EMA (when set)
            is what validate/test/predict evaluate, and ``weight_decay_exempt`` ``None`` decays every parameter.
    """

    monitor = "val/mIoU"
    mode = "max"

    def __init__(
        self,
        num_classes: int = 150,
        variant: str = "ravlt_s",
        backbone_overrides: dict | None = None,
        drop_path_rate: float | None = None,
        norm_eval: bool = False,
        segmentor: SegmentorBuilder = SemanticFPN,
        inference: Literal["whole", "slide"] = "whole",
        crop_size: tuple[int, int] = (512, 512),
        stride: tuple[int, int] = (341, 341),
        test_scales: list[float] = [1.0],  # noqa: B006 (a list is what LightningCLI shows and parses)
        test_flip: bool = False,
        class_names: list[str] | None = None,
        report_images: int = 4,
        predict_dir: str | None = None,
        pretrained_backbone_only: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # records every argument as a hyper-parameter
        self.num_classes = num_classes
        rate = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
        backbone = build_backbone(variant, backbone_overrides, out_indices=(0, 1, 2, 3), norm_eval=norm_eval, **rate)
        self.model = segmentor(backbone, num_classes)
        self.metric = SegmentationScores(num_classes)
        self._grid: list[GridRow] = []
        self._released_parts: list[str] | None = None  # what load_released_segmentor loaded (None: not tried)

    #: The input of the published FLOPs, 512×2048 for both heads: at it the measured Semantic FPN
    #: T/S/B/L 137/182/300/432 G match the published 136/180/292/424 G (at 512×512 they are a quarter:
    #: 34/46/75/108 G), as UperNet S/B/L match theirs (939 G vs 937 for S).
    summary_input_size = (512, 2048)

    def flops_forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_decode(images)

    def load_pretrained(self) -> None:
        """The whole segmentor from an authors' released file (unless ``pretrained_backbone_only``), else the backbone."""
        if not self.pretrained:
            return
        self._released_parts = (
            [] if self.hparams.pretrained_backbone_only else load_released_segmentor(self.model, self.pretrained)
        )
        if self._released_parts:
            rank_zero_info(f"pretrained: {self.pretrained}: the authors' released {type(self.model).__name__}, "
                           f"every tensor of {', '.join(self._released_parts)}")  # fmt: skip
        else:
            self.load_pretrained_backbone(self.model.backbone)

    def weights_source(self, ema: bool = False) -> str:
        trainer = self.trainer
        if self._released_parts and trainer.state.fn != TrainerFn.FITTING and not trainer.ckpt_path:
            source = f"the authors' released {type(self.model).__name__} {self.pretrained}"
            return source + (", EMA weights" if ema else "")
        return super().weights_source(ema)

    # -- training -----------------------------------------------------------------------------------
    def pixel_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits upsampled to the label size, averaged over labelled pixels (0 if none)."""
        logits = resize(logits, labels.shape[-2:])
        total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        labels = batch["label"].long()
        out = self.model.forward_train(batch["image"])
        losses = {k: self.model.loss_weights[k] * self.pixel_loss(logits, labels) for k, logits in out.items()}
        loss = sum(losses.values())
        size = labels.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if len(losses) > 1:
            self.log_dict({f"train/loss_{k}": v for k, v in losses.items()}, batch_size=size)
        return loss

    # -- evaluation ---------------------------------------------------------------------------------
    def predict_probs(
        self,
        images: torch.Tensor,
        sizes: Sequence[Sequence[int]],
        out_sizes: Sequence[Sequence[int]],
        paths: Sequence[str] | None = None,
    ) -> list[torch.Tensor]:
        """Class probabilities per image (K, *out_size); ``sizes`` crop each image out of its padded batch.

        ``out_sizes`` are the original image sizes (the labels'). With several test scales and the image
        files at hand (``paths``, ADE20K-format data), each view is made from the file as mmseg makes it
        (:meth:`test_inputs`); otherwise the input is resized by the ratios. Every forward is one image,
        or a batch of images of one size that needs no padding.
        """
        net = self.ema.module if self.ema is not None else self.model
        h = self.hparams
        scales, flip = self.test_views()
        kwargs = dict(mode=h.inference, flip=flip, crop_size=h.crop_size, stride=h.stride)
        bound = self.test_resize_bound()
        if paths is not None and bound is not None and scales != [1.0]:
            return [net.aug_test(self.test_inputs(path, scales, bound), out, **kwargs)[0]
                    for path, out in zip(paths, out_sizes)]  # fmt: skip
        unpadded = all(tuple(s) == tuple(images.shape[-2:]) for s in sizes)
        if unpadded and len({tuple(o) for o in out_sizes}) == 1:
            return list(net.predict(images, out_sizes[0], scales=scales, **kwargs))  # one batched pass
        crops = (images[i : i + 1, :, : s[0], : s[1]] for i, s in enumerate(sizes))  # each without its padding
        return [net.predict(crop, out, scales=scales, **kwargs)[0] for crop, out in zip(crops, out_sizes)]

    def test_views(self) -> tuple[list[float], bool]:
        """This evaluation's scales and flip: ``test_scales`` / ``test_flip`` in validate, test and predict
        (the authors' ``tools/test.py``); single-scale in fit's validations (mmseg's evaluation hook)."""
        trainer = attached_trainer(self)
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            return [1.0], False
        return list(self.hparams.test_scales), self.hparams.test_flip

    def test_inputs(self, path: str, scales: Sequence[float], bound: Sequence[int]) -> list[torch.Tensor]:
        """mmseg's test views of an image file, (1, 3, h, w) each: its ``MultiScaleFlipAug`` scales the test
        resize bound by each ratio (truncated), and the original uint8 image is resized (cv2 bilinear) to fit
        inside, then normalised: the data module's own eval pipeline at that bound."""
        image = np.asarray(read_rgb(path))
        long_edge, short_edge = max(bound), min(bound)
        return [eval_transform((int(long_edge * r), int(short_edge * r)))(image=image)["image"][None].to(self.device)
                for r in scales]  # fmt: skip

    def test_resize_bound(self) -> Sequence[int] | None:
        """The ADE20K data's test resize bound (long, short edge; published 2048 × 512), if that is the data."""
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        return datamodule.scale if isinstance(datamodule, ADE20KDataModule) else None

    def on_validation_epoch_start(self) -> None:
        self.metric.reset()
        self._grid = []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        labels = [label.long() for label in batch["label"]]
        probs = self.predict_probs(batch["image"], batch["size"], [label.shape for label in labels], batch.get("path"))
        for i, (p, label) in enumerate(zip(probs, labels)):
            pred = p.argmax(0)
            self.metric.update(pred[None], label[None])
            if len(self._grid) < self.hparams.report_images and self.trainer.is_global_zero:
                h, w = batch["size"][i]
                self._grid.append((denormalize(batch["image"][i, :, :h, :w]), label.cpu().numpy(), pred.cpu().numpy()))

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
            h = self.hparams
            scales, flip = self.test_views()
            setup = {
                "segmentor": type(self.model).__name__, "variant": h.variant,
                "inference": {"mode": h.inference, "scales": scales, "flip": flip},
                "protocol": protocol(h.inference, scales, flip, self.test_resize_bound()),
            }  # fmt: skip
            weights = self.weights_source(ema=self.ema is not None)
            paths = write_segmentation_report(
                self.report_dir(), stage, scores, self.class_names(), setup, weights, self._grid
            )
            print(
                f"report: mIoU {float(scores['mIoU']):.4f} ({weights}); written to {', '.join(map(str, paths.values()))}"
            )

    # -- reports and masks --------------------------------------------------------------------------
    def class_names(self) -> list[str]:
        if self.hparams.class_names:
            return list(self.hparams.class_names)
        info = getattr(getattr(self.trainer, "datamodule", None), "info", None)
        return list(info.class_names) if info else [f"class {i}" for i in range(self.num_classes)]

    def predict_out_dir(self) -> Path:
        return Path(self.hparams.predict_dir) if self.hparams.predict_dir else self.report_dir() / "masks"

    def on_predict_start(self) -> None:
        super().on_predict_start()
        loaders = self.trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        names = [n for loader in loaders for n in getattr(loader.dataset, "file_names", lambda: [])()]
        self._mask_names = mask_names(names)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        """Write one palette PNG per image (pixel value = class index) at the image's original size."""
        out_dir = self.predict_out_dir()
        probs = self.predict_probs(batch["image"], batch["size"], batch["orig_size"], batch.get("path"))
        names = batch.get("file_name") or [Path(path).name for path in batch["path"]]
        mask_of = getattr(self, "_mask_names", {})
        masks = (out_dir / (mask_of.get(name) or mask_names([name])[name]) for name in names)
        return [str(save_mask(mask, p.argmax(0))) for mask, p in zip(masks, probs)]

    def on_predict_epoch_end(self) -> None:
        if self.trainer.is_global_zero:
            written = sum(len(batch) for batch in self.trainer.predict_loop.predictions)
            print(f"masks of {written} images written to {self.predict_out_dir()} (pixel value = class index)")
