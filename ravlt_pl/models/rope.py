"""The RoPE maths both the plain path (:mod:`~ravlt_pl.models.attention`) and the fast kernels
(:mod:`~ravlt_pl.models.fast`) use: the 2-D tables and autocast off for the attention arithmetic. The
rotation itself is timm's ``apply_rot_embed`` (channel pairs (2i, 2i+1), ``x·cos + rot(x)·sin``).
A leaf: it imports nothing of ours, so both import it downward."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def rope_tables(angle: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sin, cos)`` of shape ``(H*W, d)``: the first half of each row encodes the row index h, the
    second half the column w (tokens row-major, h outer)."""
    rows = torch.arange(height, device=angle.device, dtype=angle.dtype)[:, None] * angle  # (H, d/2)
    cols = torch.arange(width, device=angle.device, dtype=angle.dtype)[:, None] * angle  # (W, d/2)
    half = angle.numel()
    phase = torch.cat(
        [rows[:, None, :].expand(height, width, half), cols[None, :, :].expand(height, width, half)], dim=-1
    ).reshape(height * width, 2 * half)  # (N, d)
    return phase.sin(), phase.cos()


def autocast_off(x: torch.Tensor):
    """Autocast disabled for the attention arithmetic; no context at all where autocast is off, so
    ``torch.export`` graphs hold plain aten ops and no autocast region (and meta tensors, which
    have no autocast, work)."""
    device = x.device.type
    autocasting = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return torch.autocast(device, enabled=False) if autocasting else nullcontext()
