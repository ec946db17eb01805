"""RAVLT attention: Rank-Augmented Linear Attention (RALA), softmax attention and RoPE tables.

Pure PyTorch; every tensor keeps the backbone's ``(B, C, H, W)`` layout at the module boundary.
Inside, a head's tokens are laid out as ``(B, heads, N, d)`` with channel ``head * d + j``.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionType = Literal["linear", "softmax"]


class RotaryTable(nn.Module):
    """2-D rotary position tables (sin, cos) of shape ``(H*W, head_dim)``, cached per size.

    ``angle`` is a persistent buffer (the authors' checkpoints carry it as ``layers.{i}.RoPE.angle``):
    ``1 / 10000 ** linspace(0, 1, head_dim // 4)``, each value repeated twice in place. The first
    half of the table encodes the row (H), the second half the column (W).
    """

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs head_dim divisible by 4, got {head_dim}")
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
        self.register_buffer("angle", angle.repeat_interleave(2), persistent=True)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _load_from_state_dict(self, *args, **kwargs):  # a loaded angle invalidates the tables
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda()/.half() invalidate them too
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (height, width, self.angle.device, self.angle.dtype, self.angle._version)
        tables = self._cache.get(key)
        if tables is None:
            tables = self._build(height, width)
            if not torch.compiler.is_compiling():
                self._cache[key] = tables
        return tables

    def _build(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        angle = self.angle
        rows = torch.arange(height, device=angle.device, dtype=angle.dtype)[:, None] * angle  # (H, d/2)
        cols = torch.arange(width, device=angle.device, dtype=angle.dtype)[:, None] * angle  # (W, d/2)
        half = angle.numel()
        phase = torch.cat(
            [rows[:, None, :].expand(height, width, half), cols[None, :, :].expand(height, width, half)], dim=-1
        ).reshape(height * width, 2 * half)  # (N, d), h outer, w inner
        return phase.sin(), phase.cos()


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)`` along the last axis."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_every_two(x) * sin


class _GatedAttention(nn.Module):
    """Shared parameters of both attention types: ``qkvo`` (C→4C), ``lepe`` (dw 5x5), ``proj`` (C→C)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkvo = nn.Conv2d(dim, 4 * dim, 1)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _split(self, x: torch.Tensor):
        """(B, C, H, W) → q, k, v as (B, heads, N, d), v map (B, C, H, W), gate o (B, C, H, W)."""
        b, _, h, w = x.shape
        q, k, v, o = self.qkvo(x).chunk(4, dim=1)
        heads = (b, self.num_heads, self.head_dim, h * w)
        return (
            q.reshape(heads).transpose(-1, -2),
            k.reshape(heads).transpose(-1, -2),
            v.reshape(heads).transpose(-1, -2),
            v,
            o,
        )

    @staticmethod
    def _merge(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) → (B, C, H, W), channel ``head * d + j``."""
        return out.transpose(-1, -2).reshape(like.shape)


class RankAugmentedLinearAttention(_GatedAttention):
    """RALA: linear attention whose keys are re-weighted by the global query (rank augmentation).

    ``reweight_keys=False`` and ``gate=False`` turn it into plain linear attention (elu+1 feature
    maps, kᵀv, normaliser) on the same weights, for the rank analysis.
    """

    def __init__(self, dim: int, num_heads: int, reweight_keys: bool = True, gate: bool = True) -> None:
        super().__init__(dim, num_heads)
        self.reweight_keys = reweight_keys
        self.gate = gate
        self.probe: Callable[[str, torch.Tensor], None] | None = None  # rank-analysis hook

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        q, k, v, v_map, o = self._split(x)
        n_tokens = q.shape[-2]
        q = F.elu(q) + 1.0
        k = F.elu(k) + 1.0
        if self.reweight_keys:
            q_global = q.mean(dim=-2, keepdim=True)  # (B, h, 1, d)
            weights = torch.softmax(self.scale * q_global @ k.transpose(-1, -2), dim=-1)  # (B, h, 1, N)
            k = k * (weights.transpose(-1, -2) * n_tokens)
        z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-1, -2) + 1e-6)  # (B, h, N, 1)
        inv_sqrt_n = n_tokens**-0.5
        kv = (apply_rope(k, sin, cos).transpose(-1, -2) * inv_sqrt_n) @ (v * inv_sqrt_n)  # (B, h, d, d)
        out = (apply_rope(q, sin, cos) @ kv) * z  # (B, h, N, d)
        if self.probe is not None:
            self.probe("kv", kv)
            self.probe("out", out)
        out = self._merge(out, v_map) + self.lepe(v_map)
        return self.proj(out * o if self.gate else out)


class SoftmaxAttention(_GatedAttention):
    """Softmax attention with RoPE, the same gate and local position enhancement (stages 3–4)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.probe: Callable[[str, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        q, k, v, v_map, o = self._split(x)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, h, N, d)
        if self.probe is not None:
            self.probe("out", out)
        out = self._merge(out, v_map) + self.lepe(v_map)
        return self.proj(out * o)


def build_attention(kind: AttentionType, dim: int, num_heads: int) -> nn.Module:
    if kind == "linear":
        return RankAugmentedLinearAttention(dim, num_heads)
    if kind == "softmax":
        return SoftmaxAttention(dim, num_heads)
    raise ValueError(f"attention must be 'linear' or 'softmax', got {kind!r}")
