"""Training memory: each block keeps its GEMM outputs for backward and recomputes the rest.

Autograd, left alone, keeps ~32 activation-sized tensors per RAVLT block for backward (the feature
maps, rotations, re-weighting, normaliser and gate of the attention, float32 copies under autocast,
both LayerNorm outputs, GELU's input and output, the depthwise sums): RAVLT-S needed 1.7× the
training memory of ConvNeXt-T. On the fast path a training block runs under PyTorch's selective
activation checkpointing with the policy :func:`keep_gemm_outputs`: the outputs of the dense
(1×1) convolutions ``qkvo``, ``proj``, ``fc1`` and ``fc2`` are kept, everything else — LayerNorms,
the whole attention core, LePE, GELU, the depthwise convolutions — is recomputed from them in
backward, one block at a time; no GEMM runs twice. What a block keeps: its input, ``qkvo(x)`` (4C),
the outputs of ``proj`` (C), ``fc1`` (3.5C) and ``fc2`` (C; the layer-scale gradient reads it) —
10.5 maps of C channels instead of ~32.

The gradients are autograd's gradients of the same forward (drop-path masks replayed from the saved
RNG state), so they equal the plain fast path's; ``tests/models/test_speed_paths.py`` checks them
against the reference path. Not used under ``torch.compile`` (its partitioner chooses what to
recompute) or without autograd; :meth:`RAVLT.set_grad_checkpointing
<ravlt_pl.models.RAVLT.set_grad_checkpointing>` (full recomputation, the blocks' inputs only) takes
precedence.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def keep_gemm_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of dense (ungrouped) convolutions; recompute the rest."""
    if op is torch.ops.aten.convolution.default and args[8] == 1:  # args[8]: groups
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _contexts():
    return create_selective_checkpoint_contexts(keep_gemm_outputs)


def applies(x: torch.Tensor) -> bool:
    """Whether a block on ``x`` runs under the selective recomputation (eager, with autograd)."""
    return torch.is_grad_enabled() and not (torch.compiler.is_compiling() or torch.jit.is_scripting())


def run_block(block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
    """``block(x, *args)`` keeping only its input and GEMM outputs for backward (see the module notes)."""
    return checkpoint(block, x, *args, use_reentrant=False, context_fn=_contexts)
