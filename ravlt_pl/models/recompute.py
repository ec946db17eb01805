"""Training memory: each block keeps its GEMM outputs for backward and recomputes the rest.

Autograd, left alone, keeps ~32 activation-sized tensors per RAVLT block for backward (the feature
maps, rotations, re-weighting, normaliser and gate of the attention, float32 copies under autocast,
both LayerNorm outputs, GELU's input and output, the depthwise sums): RAVLT-S needed 1.7× the
training memory of ConvNeXt-T. On the fast path a training block runs under PyTorch's selective
activation checkpointing with the policy :func:`keep_gemm_outputs`: the outputs of the dense
convolutions whose output is at least as wide as their input (``qkvo``, ``proj``, ``fc1``) are kept,
everything else — LayerNorms, the whole attention core, LePE, GELU, the depthwise convolutions —
is recomputed from them in backward (one block at a time; ``fc2``'s GEMM never, the recomputation
stops at its input). What a block keeps: its input, ``qkvo(x)`` (4C), ``proj``'s output (C) and
``fc1``'s output (3.5C) — 9.5 maps of C channels instead of ~32.

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
    """Keep the outputs of dense convolutions with ``out_channels >= in_channels``; recompute the rest."""
    if op is torch.ops.aten.convolution.default:
        weight, groups = args[1], args[8]
        if groups == 1 and weight.shape[0] >= weight.shape[1]:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _contexts():
    return create_selective_checkpoint_contexts(keep_gemm_outputs)


def applies(x: torch.Tensor) -> bool:
    """Whether a block on ``x`` runs under the selective recomputation (eager, with autograd)."""
    return torch.is_grad_enabled() and not (torch.compiler.is_compiling() or torch.jit.is_scripting())


def run_block(block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
    """``block(x, *args)`` keeping only the GEMM outputs for backward (see the module notes)."""
    return checkpoint(block, x, *args, use_reentrant=False, context_fn=_contexts)
