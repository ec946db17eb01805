"""RAVLT attention: Rank-Augmented Linear Attention (RALA), softmax attention and RoPE tables.

Each module's forward *is* the paper's maths (``docs/architecture.md``), written on heads
``(B, heads, N, d)`` with ``N = H·W``; a module whose ``fast`` switch is on (the default, see
:mod:`ravlt_pl.models.fast`) hands the same computation to the fast kernels there instead.
Every tensor keeps the backbone's ``(B, C, H, W)`` shape at the module boundary.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed, register_notrace_module
from torch import nn

from . import fast as fast_kernels
from .rope import autocast_off, rope_tables

AttentionType = Literal["linear", "softmax"]


class RopeTables(NamedTuple):
    """The rotary tables of one map size: ``sin``/``cos`` ``(N, d)`` and, for the fast path, their
    :class:`~ravlt_pl.models.fast.RotationForms` (None when the table's ``fast`` is off)."""

    sin: torch.Tensor
    cos: torch.Tensor
    forms: fast_kernels.RotationForms | None = None


@register_notrace_module  # torch.fx: the size-keyed cache is Python control flow
class RotaryTable(nn.Module):
    """2-D rotary position tables (:func:`rope_tables`) for the map size asked, cached per size.

    ``angle`` is a persistent buffer (the authors' checkpoints carry it as ``layers.{i}.RoPE.angle``):
    ``1 / 10000 ** linspace(0, 1, head_dim // 4)``, each value repeated twice in place. In eager mode
    the ``max_cached`` most recently used sizes are kept (multi-scale detection training sees many);
    under ``torch.compile``/``torch.export`` the tables are built inside the graph.
    """

    max_cached = 8

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs head_dim divisible by 4, got {head_dim}")
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
        self.register_buffer("angle", angle.repeat_interleave(2), persistent=True)
        self.fast = fast_kernels.use_fast_path()
        self._cache: OrderedDict[tuple, RopeTables] = OrderedDict()

    def _load_from_state_dict(self, *args, **kwargs):  # a loaded angle invalidates the tables
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda()/.half() invalidate them too
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, height: int, width: int) -> RopeTables:
        if torch.compiler.is_compiling():
            if self.fast:  # one opaque op, so the compiler does not recompute sin/cos in every consumer
                return RopeTables(*fast_kernels.build_rope_tables(self.angle, height, width))
            return RopeTables(*rope_tables(self.angle, height, width))
        key = (height, width, self.fast, self.angle.device, self.angle.dtype, self.angle._version)
        tables = self._cache.get(key)
        if tables is None:
            # Normal tensors even under inference_mode (validate/test): the cache outlives it and
            # is reused by training, where inference tensors cannot be saved for backward.
            with torch.inference_mode(False):
                sin, cos = rope_tables(self.angle, height, width)
                forms = fast_kernels.rotation_forms(sin.float(), cos.float()) if self.fast else None
                tables = self._cache[key] = RopeTables(sin, cos, forms)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return tables


class _GatedAttention(nn.Module):
    """Shared parameters of both attention types: ``qkvo`` (C→4C), ``lepe`` (dw 5x5), ``proj`` (C→C).

    ``low_precision_devices``: where the fast softmax attention runs SDPA in the autocast dtype
    (CUDA: flash kernels); everywhere else, and on the reference path, attention runs in float32.
    """

    low_precision_devices: tuple[str, ...] = ("cuda",)

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
        self.fast = fast_kernels.use_fast_path()
        self.probe: Callable[[str, torch.Tensor], None] | None = None  # rank-analysis hook

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → ``(B, heads, N, d)``, channel ``head * d + j``, tokens row-major."""
        return t.flatten(2).unflatten(1, (self.num_heads, self.head_dim)).transpose(-1, -2)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``qkvo(x)`` → q, k, v as float32 heads ``(B, heads, N, d)``, the gate o and LePE(v) as
        float32 maps (the convolutions run in the autocast dtype, if any)."""
        q, k, v, o = self.qkvo(x).chunk(4, dim=1)  # each (B, C, H, W)
        lepe = self.lepe(v)
        return *(self._heads(t).float() for t in (q, k, v)), o.float(), lepe.float()


@register_notrace_module  # torch.fx: the fast path branches on dtypes and strides
class RankAugmentedLinearAttention(_GatedAttention):
    """RALA: linear attention whose keys are re-weighted by the global query (rank augmentation).

    ``reweight_keys=False`` and ``gate=False`` turn it into plain linear attention (elu+1 feature
    maps, kᵀv, normaliser) on the same weights, for the rank analysis.
    """

    def __init__(self, dim: int, num_heads: int, reweight_keys: bool = True, gate: bool = True) -> None:
        super().__init__(dim, num_heads)
        self.reweight_keys = reweight_keys
        self.gate = gate

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                forms: fast_kernels.RotationForms | None = None) -> torch.Tensor:  # fmt: skip
        """RALA of ``x (B, C, H, W)``; with N = H·W, n heads of width d and ``scale = d^-1/2``:

        1. ``q, k, v, o = qkvo(x)`` (channel blocks of C), ``lepe = lepe_conv(v)``;
        2. feature maps ``q = elu(q) + 1``, ``k = elu(k) + 1`` on heads ``(B, n, N, d)``;
        3. key re-weighting: ``a = softmax_N(scale · mean_N(q) kᵀ)``, ``k = k · a · N``;
        4. normaliser from the un-rotated q and k: ``z = 1 / (q · mean_N(k)ᵀ + 1e-6)``;
        5. ``kv = (rot(k)ᵀ / √N) (v / √N)`` ``(B, n, d, d)``, ``out = (rot(q) kv) · z``;
        6. ``proj((out + lepe) · o)``.

        Under autocast steps 2–6 before ``proj`` run in float32 (the feature maps enter sums over all
        N tokens and a reciprocal); ``qkvo``, ``lepe`` and ``proj`` run in the autocast dtype.
        ``sin``/``cos`` are the RoPE tables ``(N, d)``; ``forms`` the same tables prepared for the
        fast path (:attr:`RopeTables.forms`), built from them when not given.
        """
        if self.fast:
            return fast_kernels.linear_attention(self, x, sin, cos, forms)
        n_tokens = x.shape[-2] * x.shape[-1]
        q, k, v, o, lepe = self._split(x)  # heads (B, n, N, d)
        with autocast_off(x):
            q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
            if self.reweight_keys:
                a = torch.softmax(
                    self.scale * q.mean(dim=2, keepdim=True) @ k.transpose(-1, -2), dim=-1
                )  # (B, n, 1, N)
                k = k * a.transpose(-1, -2) * n_tokens
            z = 1.0 / (q @ k.mean(dim=2, keepdim=True).transpose(-1, -2) + 1e-6)  # (B, n, N, 1)
            sin, cos = sin.float(), cos.float()
            kv = (apply_rot_embed(k, sin, cos).transpose(-1, -2) / n_tokens**0.5) @ (v / n_tokens**0.5)  # (B, n, d, d)
            out = (apply_rot_embed(q, sin, cos) @ kv) * z  # (B, n, N, d)
            if self.probe is not None:
                self.probe("kv", kv)
                self.probe("out", out)
            y = out.transpose(-1, -2).reshape(x.shape) + lepe  # (B, C, H, W)
            if self.gate:
                y = y * o
        return self.proj(y.to(x.dtype))  # autocast: proj runs in the low-precision dtype again


@register_notrace_module
class SoftmaxAttention(_GatedAttention):
    """Softmax attention with RoPE, the same gate and local position enhancement (stages 3–4)."""

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                forms: fast_kernels.RotationForms | None = None) -> torch.Tensor:  # fmt: skip
        """``proj((softmax(scale · rot(q) rot(k)ᵀ) v + lepe) · o)`` on heads ``(B, n, N, d)``,
        with q, k, v, o, lepe as in :meth:`RankAugmentedLinearAttention.forward` (no elu)."""
        if self.fast:
            return fast_kernels.softmax_attention(self, x, sin, cos, forms)
        q, k, v, o, lepe = self._split(x)  # heads (B, n, N, d)
        with autocast_off(x):
            sin, cos = sin.float(), cos.float()
            q, k = apply_rot_embed(q, sin, cos), apply_rot_embed(k, sin, cos)
            attn = torch.softmax(self.scale * q @ k.transpose(-1, -2), dim=-1)  # (B, n, N, N)
            out = attn @ v  # (B, n, N, d)
            if self.probe is not None:
                self.probe("out", out)
            y = (out.transpose(-1, -2).reshape(x.shape) + lepe) * o
        return self.proj(y.to(x.dtype))


ATTENTION_TYPES: dict[str, type[_GatedAttention]] = {
    "linear": RankAugmentedLinearAttention,
    "softmax": SoftmaxAttention,
}


def build_attention(kind: AttentionType, dim: int, num_heads: int) -> nn.Module:
    """The attention module registered in :data:`ATTENTION_TYPES` under ``kind``."""
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"attention must be one of {sorted(ATTENTION_TYPES)}, got {kind!r}")
    return ATTENTION_TYPES[kind](dim, num_heads)
