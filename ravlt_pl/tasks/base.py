"""What every task shares: optimizer parameter groups, warmup schedules, EMA, pretrained backbones, reports."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from timm.models import group_parameters
from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..callbacks import check_checkpoint_compatible
from ..ema import EMA
from ..lightning_compat import attached_trainer
from ..models import RAVLT, load_official

log = logging.getLogger(__name__)


#: What mmcv's ``paramwise_cfg.norm_decay_mult`` counts as a normalisation layer.
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def layer_scales(model: nn.Module, layer_decay: float) -> dict[int, float]:
    """``id(parameter) → lr scale`` by timm's layer-wise decay rule (BEiT, ConvNeXt, Swin fine-tuning):
    ``layer_decay ** (last - layer)``, layers from RAVLT's ``group_matcher`` (stem 0, one per block,
    the final norm/projection/head last, as timm's ``param_groups_layer_decay``); every parameter
    outside the RAVLT (an FPN, a decode head) has scale 1."""
    backbone = find_backbone(model)
    layer_of = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
    last = max(layer_of.values())
    scales = {id(p): 1.0 for p in model.parameters()}
    scales.update({id(p): layer_decay ** (last - layer_of.get(n, last)) for n, p in backbone.named_parameters()})
    return scales


def find_backbone(model: nn.Module) -> RAVLT:
    """The RAVLT inside a task's network (the network itself for a classifier)."""
    backbone = next((m for m in model.modules() if isinstance(m, RAVLT)), None)
    if backbone is None:
        raise ValueError(f"{type(model).__name__} holds no RAVLT backbone")
    return backbone


def param_groups(model: nn.Module, exempt: Sequence[str], layer_decay: float | None = None) -> list[dict]:
    """AdamW groups: parameters that decay, and those ``exempt`` names with weight decay 0; with
    ``layer_decay``, one such pair per lr scale (``lr_scale``, see :func:`layer_scales`).

    An entry of ``exempt`` is ``"1d"``, every parameter of at most one dimension and every bias
    (timm's ``create_optimizer`` rule that DeiT trains with: RAVLT's layer-scale gammas are
    (1, C, 1, 1) and so still decay); ``"norm_layers"``, the parameters of every normalisation layer
    (mmcv's ``norm_decay_mult=0``: BatchNorm, SyncBatchNorm, GroupNorm, LayerNorm, whatever their
    names); or a substring of the parameter name (mmcv's ``custom_keys`` with ``decay_mult=0``, e.g.
    ``"norm"``). An empty ``exempt`` decays everything.
    """
    # Not timm's param_groups_weight_decay / _layer_decay (same "1d" rule and layer scales: tests/tasks/test_base.py):
    # they write the weight-decay value into the groups (ours is the config's optimizer's), know no norm-layer or name
    # exemptions (mmcv's), and need the group_matcher on the module grouped (a detector's is on its backbone).
    keys = [key for key in exempt if key not in ("1d", "norm_layers")]
    in_norm_layers = set()
    if "norm_layers" in exempt:
        in_norm_layers = {
            id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)
        }
    scales = layer_scales(model, layer_decay) if layer_decay is not None else {}
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        one_dim = "1d" in exempt and (param.ndim <= 1 or name.rsplit(".", 1)[-1] == "bias")
        exempted = one_dim or id(param) in in_norm_layers or any(key in name for key in keys)
        scale = scales.get(id(param), 1.0)
        group = groups.setdefault(
            (-scale, exempted),
            {
                "params": [],
                **({"weight_decay": 0.0} if exempted else {}),
                **({"lr_scale": scale} if layer_decay is not None else {}),
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(
    factory: OptimizerCallable,
    model: nn.Module,
    exempt: Sequence[str],
    device: torch.device,
    layer_decay: float | None = None,
) -> Optimizer:
    """``factory`` on :func:`param_groups`, each group's lr times its ``lr_scale``; on CUDA, torch's
    Adam/AdamW/SGD that the config leaves at ``fused=None`` (and ``foreach`` unset) get their fused
    kernel: one launch per step for all parameters."""
    optimizer = factory(param_groups(model, exempt, layer_decay))
    defaults = optimizer.defaults
    if device.type == "cuda" and "fused" in defaults and defaults["fused"] is None and not defaults.get("foreach"):
        # Anew, on new groups: the first optimizer wrote its defaults (fused None) into its group dicts.
        optimizer = factory(param_groups(model, exempt, layer_decay), fused=True)
    for group in optimizer.param_groups:  # before the schedule records each group's initial lr
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return optimizer


# Not torch's SequentialLR(LinearLR, CosineAnnealingLR | PolynomialLR | MultiStepLR) nor timm's schedulers: torch's
# eta_min is one absolute lr for all groups (ours a ratio of each layer-decay group's), PolynomialLR has no floor and
# SequentialLR switches schedules where mmcv's warmup multiplies the poly/step lr; timm's warmup replaces the lr by
# warmup_lr_init + t * step (timm/scheduler/cosine_lr.py _get_lr) and its schedulers are no torch LRScheduler.
class WarmupSchedule(LambdaLR):
    """Per-step linear warmup, then ``cosine``, ``step`` (×gamma at epoch milestones), ``poly`` or ``constant``.

    ``total_steps`` and ``steps_per_epoch`` are filled in by the task from the trainer; configs set
    the shape: ``warmup_steps``, ``warmup_epochs`` or ``warmup_fraction`` (of the run's optimizer
    steps: the same recipe for 500 or 500k images; the longest of the three applies), ``decay``,
    ``milestones``, ``power``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        decay: Literal["cosine", "step", "poly", "constant"] = "cosine",
        warmup_steps: int = 0,
        warmup_epochs: float = 0.0,
        warmup_fraction: float = 0.0,
        warmup_start_factor: float = 1e-3,
        min_lr_ratio: float = 0.0,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        power: float = 1.0,
        total_steps: int = 1,
        steps_per_epoch: int = 1,
    ) -> None:
        self.decay = decay
        self.warmup = max(int(warmup_steps), int(round(warmup_epochs * steps_per_epoch)),
                          int(round(warmup_fraction * total_steps)))  # fmt: skip
        self.start_factor = warmup_start_factor
        self.min_lr_ratio = min_lr_ratio
        self.milestone_steps = sorted(int(m) * steps_per_epoch for m in milestones)
        self.gamma, self.power = gamma, power
        self.total_steps = max(int(total_steps), 1)
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        main = self._decay_factor(step)
        if step < self.warmup:
            return main * (self.start_factor + (1 - self.start_factor) * step / self.warmup)
        return main

    def _decay_factor(self, step: int) -> float:
        if self.decay == "step":
            return self.gamma ** sum(step >= m for m in self.milestone_steps)
        progress = min(
            max(step - (self.warmup if self.decay == "cosine" else 0), 0)
            / max(self.total_steps - (self.warmup if self.decay == "cosine" else 0), 1),
            1.0,
        )
        if self.decay == "cosine":
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.decay == "poly":
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * (1 - progress) ** self.power
        return 1.0


class BaseTask(LightningModule):
    """A thin training loop around a pure-torch model built by the subclass's ``__init__``.

    Subclasses pass these arguments on through ``**kwargs``, set ``self.model`` (the network) and
    ``monitor``/``mode`` (the metric that picks the best checkpoint), implement the steps, and write
    their reports from their epoch ends when :attr:`writes_reports` says so. Every argument, the
    subclass's and these, is a hyper-parameter (``self.hparams``, saved in checkpoints).

    Args:
        optimizer: optimizer class and arguments, given the parameter groups of :func:`param_groups`.
        scheduler: learning-rate schedule, stepped per optimizer step.
        ema_decay: decay of the weight EMA per 512 training images, raised to (images per optimizer
            step / 512) for each step, as the authors derive it (see :mod:`ravlt_pl.ema`); ``None``: no EMA.
        ema_horizon: instead of ``ema_decay``, the EMA's horizon as a fraction of the run's optimizer
            steps: decay per step ``1 - 1 / (ema_horizon × steps)``, so that a fine-tune of 200 steps
            and one of 200k average over the same share of their run.
        pretrained: checkpoint to initialise the backbone from (the authors' release or a state dict).
            Read when a ``fit`` starts from it (not on a resume: the checkpoint holds the weights) and
            by ``validate``/``test``/``predict`` without ``--ckpt_path``; never when the task is built.
        freeze_backbone: train everything but the RAVLT backbone (a linear probe for a classifier,
            whose head still trains); its BatchNorm statistics stay fixed too.
        layer_decay: layer-wise lr decay: each RAVLT block's lr × ``layer_decay ** (blocks after it)``
            (timm's ``layer_decay``, see :func:`layer_scales`); ``None``: one lr.
        pretrained_strict: refuse a ``pretrained`` file that does not fill every backbone tensor (``False``:
            load what matches and warn about the rest).
        report_dir: where ``validate``/``test``/``predict`` write reports (default: the run's log dir).
        weight_decay_exempt: parameters trained without weight decay: ``"1d"`` (every parameter of at
            most one dimension and every bias) and/or parameter-name substrings (see :func:`param_groups`);
            ``None`` is the task's ``default_weight_decay_exempt``, ``[]`` decays every parameter.
        float32_matmul_precision: ``torch.set_float32_matmul_precision`` for the process, set when
            the task is built: ``high`` lets float32 matrix products use TF32 on CUDA (``None``: torch's
            default, ``highest``). Mixed-precision runs compute most products in bf16 regardless.
    """

    monitor = "val/loss"
    mode: Literal["min", "max"] = "min"
    #: ``weight_decay_exempt`` when the config leaves it ``None`` (see :func:`param_groups`).
    default_weight_decay_exempt: tuple[str, ...] = ()
    #: (H, W) at which ``summary`` counts FLOPs.
    summary_input_size: tuple[int, int] = (224, 224)

    def __init__(
        self,
        optimizer: OptimizerCallable = AdamW,
        scheduler: LRSchedulerCallable = WarmupSchedule,
        ema_decay: float | None = None,
        pretrained: str | None = None,
        report_dir: str | None = None,
        weight_decay_exempt: list[str] | None = None,
        float32_matmul_precision: Literal["highest", "high", "medium"] | None = None,
        ema_horizon: float | None = None,
        freeze_backbone: bool = False,
        layer_decay: float | None = None,
        pretrained_strict: bool = True,
    ) -> None:
        super().__init__()
        # Here, not in the subclasses: the frames of both __init__ are read, so every argument is recorded
        # (the subclass's own, and these with their defaults even when its **kwargs did not carry them).
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if float32_matmul_precision:
            torch.set_float32_matmul_precision(float32_matmul_precision)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.pretrained = pretrained
        self.pretrained_strict = pretrained_strict
        self._report_dir = report_dir
        self.weight_decay_exempt = (
            list(self.default_weight_decay_exempt) if weight_decay_exempt is None else list(weight_decay_exempt)
        )
        if ema_decay and ema_horizon:
            raise ValueError("set model.init_args.ema_decay or ema_horizon, not both")
        if ema_horizon is not None and not 0 < ema_horizon <= 1:
            raise ValueError(
                f"model.init_args.ema_horizon is a fraction of the run's steps in (0, 1], got {ema_horizon}"
            )
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"model.init_args.layer_decay must be in (0, 1], got {layer_decay}")
        self.ema_horizon, self.freeze_backbone, self.layer_decay = ema_horizon, freeze_backbone, layer_decay
        self.ema = (
            EMA(ema_decay or 0.5) if ema_decay or ema_horizon else None
        )  # a horizon sets the decay at train start
        self._pretrained_pending = False

    def configure_callbacks(self):
        return [self.ema] if self.ema is not None else []

    # -- model helpers ----------------------------------------------------------------------------
    def load_pretrained_backbone(self, backbone: nn.Module, exclude: Sequence[str] = ("head.",)) -> None:
        """Initialise ``backbone`` from ``self.pretrained`` (the authors' checkpoint or a bare state dict)."""
        if self.pretrained:
            report = load_official(backbone, self.pretrained, exclude=exclude, strict=self.pretrained_strict)
            log.info("pretrained backbone: %s", report)

    def load_pretrained(self) -> None:
        """Initialise the network from ``self.pretrained``; each task loads into its own part."""
        self.load_pretrained_backbone(self.model)

    # -- when pretrained weights are read ----------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._pretrained_pending = bool(self.pretrained)  # until a checkpoint brings the weights instead

    def _load_pending_pretrained(self) -> None:
        """Read ``pretrained`` once per run when no checkpoint was restored; the EMA restarts from it."""
        if not self._pretrained_pending:
            return
        self._pretrained_pending = False
        self.load_pretrained()
        averaged = self.ema.averaged if self.ema is not None else None
        if averaged is not None:
            averaged.module.load_state_dict(self.model.state_dict())

    def on_validation_start(self) -> None:
        self._load_pending_pretrained()

    def on_test_start(self) -> None:
        self._load_pending_pretrained()

    def on_predict_start(self) -> None:
        self._load_pending_pretrained()

    def train(self, mode: bool = True) -> BaseTask:
        super().train(mode)
        if mode and self.freeze_backbone:  # a frozen backbone keeps its BatchNorm statistics
            find_backbone(self.model).eval()
        return self

    def flops_forward(self, images: torch.Tensor):
        """The inference forward whose FLOPs ``summary`` counts (one image, eval mode)."""
        return self.model(images)

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["task_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if self.ema is not None:
            self.ema.save_to(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another config with what differs, not a size-mismatch traceback.
        Its weights replace ``pretrained``, which is then not read."""
        self._pretrained_pending = False
        trainer = attached_trainer(self)
        source = str(trainer.ckpt_path) if trainer is not None and trainer.ckpt_path else "checkpoint"
        if self.ema is not None:
            self.ema.load_from(checkpoint, source)
        check_checkpoint_compatible(self, checkpoint, source)

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        self._load_pending_pretrained()  # a fit's start: after a resume's restore, before the EMA copies the model
        if self.freeze_backbone:
            backbone = find_backbone(self.model)
            head = backbone.get_classifier() if backbone.out_indices is None else None
            backbone.requires_grad_(False)
            if isinstance(head, nn.Module):
                head.requires_grad_(True)
        optimizer = build_optimizer(self.optimizer, self.model, self.weight_decay_exempt, self.device, self.layer_decay)
        total = int(self.trainer.estimated_stepping_batches)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = self.scheduler(optimizer, total_steps=total, steps_per_epoch=max(total // epochs, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        if self.ema_horizon is not None:  # after the EMA's own on_train_start (callbacks run first)
            steps = max(int(self.trainer.estimated_stepping_batches), 1)
            self.ema.step_decay = 1 - 1 / max(self.ema_horizon * steps, 1.0)

    # -- reports ----------------------------------------------------------------------------------
    @property
    def writes_reports(self) -> bool:
        """Reports are written by ``validate`` and ``test`` (and ``fit``'s last validation)."""
        trainer = self.trainer
        if trainer.sanity_checking or not trainer.is_global_zero:
            return False
        if trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING):
            return True
        return trainer.state.fn == TrainerFn.FITTING and trainer.current_epoch + 1 >= (trainer.max_epochs or 0)

    def weights_source(self, ema: bool = False) -> str:
        """Which weights an evaluation measured, for its report: the checkpoint given to ``validate``/``test``,
        or the fit's weights where it stands (not its best checkpoint); ``ema``: the report is of the
        averaged weights (detection and segmentation evaluate the EMA when there is one)."""
        trainer = self.trainer
        if trainer.state.fn == TrainerFn.FITTING:
            source = (f"this fit's weights at optimizer step {trainer.global_step}, epoch {trainer.current_epoch} "
                      "(not the best checkpoint)")  # fmt: skip
        elif trainer.ckpt_path:
            source = f"checkpoint {trainer.ckpt_path}"
        else:
            source = (
                "the weights the config builds (no checkpoint given: its pretrained backbone, or random initialisation)"
            )
        return source + (", EMA weights" if ema else "")

    def report_dir(self) -> Path:
        if self._report_dir:
            return Path(self._report_dir)
        # Not trainer.log_dir: it is a collective (broadcast), and reports are written on rank 0 only.
        logger = self.trainer.logger
        base = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or self.trainer.default_root_dir
        stage = {TrainerFn.FITTING: "fit", TrainerFn.VALIDATING: "validate", TrainerFn.TESTING: "test"}.get(
            self.trainer.state.fn, "predict"
        )
        return Path(base) / "reports" / stage
