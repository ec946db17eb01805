"""Exponential moving average of a task's network, kept outside DDP and updated once per optimizer step.

The authors' DeiT-derived recipe (docs/recipes.md) states the decay for 512 images and raises it
to the number of images each optimizer step sees: ``0.99996 ** (global_batch / 512)``, so the
averaging horizon in images stays the same on any hardware (0.99996² ≈ 0.99992 per step at the
published global batch of 1024).

Why not Lightning's ``WeightAveraging``: it swaps the average into the trained model for
validation and writes it over the checkpoint's ``state_dict``; the recipes evaluate the raw
model and its EMA side by side, and ``validate``/``test`` from a checkpoint need both.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .models.checkpoint import CheckpointError

#: The batch the configured decay is stated for (DeiT's, as its learning rate's ``× batch / 512``).
REFERENCE_BATCH = 512
#: Checkpoint ``state_dict`` keys of the average: ``ema.module.<network key>`` and ``ema.n_averaged``.
PREFIX = "ema."


class EMA(Callback):
    """The EMA of ``pl_module.model`` (parameters and buffers), which the task evaluates as ``ema.module``.

    Not a submodule of the task, so DDP never sees it (its parameters take no part in the loss);
    updated after each optimizer step, not each micro-batch, so ``accumulate_grad_batches`` does not
    shorten its horizon. Every process updates its own copy from the same synchronised weights.

    Args:
        decay: decay per :data:`REFERENCE_BATCH` training images; per optimizer step it is
            ``decay ** (images per step / 512)``, images per step = per-device batch × processes ×
            ``accumulate_grad_batches``.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.step_decay: float | None = None  # set when training starts, from the trainer's batch
        self.averaged: AveragedModel | None = None
        self._restored: dict[str, torch.Tensor] | None = None  # a checkpoint's average, until the copy exists
        self._updated_at_step = 0

    @property
    def module(self) -> nn.Module:
        """The averaged network (eval mode), shaped as ``pl_module.model``."""
        if self.averaged is None:
            raise RuntimeError("the EMA exists once fit/validate/test/predict has started")
        return self.averaged.module

    # -- the copy: made after the strategy has moved (and SyncBatchNorm-converted) the model ----------
    @torch.inference_mode(False)  # validate/test/predict start inside inference mode: the copy must stay updatable
    def _make(self, pl_module: LightningModule) -> None:
        if self.averaged is None:
            self.averaged = AveragedModel(pl_module.model, multi_avg_fn=self._average, use_buffers=True)
            self.averaged.requires_grad_(False)
            self.averaged.module.eval()
            if self._restored is not None:
                self.averaged.load_state_dict(self._restored)
                self._restored = None
        self.averaged.to(pl_module.device)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._make(pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._make(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._make(pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._make(pl_module)

    # -- updates ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batch = getattr(trainer.train_dataloader, "batch_size", None)
        if not batch:
            raise ValueError("ema_decay needs the training DataLoader's batch_size to derive the decay per step")
        images_per_step = batch * trainer.world_size * trainer.accumulate_grad_batches
        self.step_decay = self.decay ** (images_per_step / REFERENCE_BATCH)
        self._updated_at_step = trainer.global_step  # a resumed run's average already holds the steps before

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step > self._updated_at_step:  # an optimizer step ended this micro-batch
            self.averaged.update_parameters(pl_module.model)
            self._updated_at_step = trainer.global_step

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        """torch's EMA update at the decay per step (known only once training starts)."""
        get_ema_multi_avg_fn(self.step_decay)(averaged, current, num_averaged)

    # -- checkpoints (called by the task's hooks: loading must take the keys out before the model's strict load) --
    def save_to(self, checkpoint: dict[str, Any]) -> None:
        """Add the average to ``checkpoint["state_dict"]`` under ``ema.``."""
        if self.averaged is not None:
            checkpoint["state_dict"].update({PREFIX + k: v for k, v in self.averaged.state_dict().items()})

    def load_from(self, checkpoint: dict[str, Any], source: str) -> None:
        """Take the ``ema.`` keys out of ``checkpoint["state_dict"]`` and restore the average from them."""
        state = checkpoint["state_dict"]
        restored = {k[len(PREFIX) :]: state.pop(k) for k in [k for k in state if k.startswith(PREFIX)]}
        if not restored:
            raise CheckpointError(
                f"{source} has no EMA weights (trained without ema_decay); set --model.init_args.ema_decay null"
            )
        restored.setdefault("n_averaged", torch.tensor(1))  # checkpoints of timm's ModelEmaV3 had no count
        if self.averaged is not None:
            self.averaged.load_state_dict(restored)
        else:
            self._restored = restored
