"""RAVLT attention: Rank-Augmented Linear Attention (RALA), softmax attention and RoPE tables.

Pure PyTorch; every tensor keeps the backbone's ``(B, C, H, W)`` shape at the module boundary.
Inside, the attention works on *tokens*: the ``qkvo`` output read as ``(B, N, 4C)`` — a free view
when the map is channels-last, which is how :class:`~ravlt_pl.models.RAVLT` runs its blocks — and a
head is the channel slice ``[head * d, (head + 1) * d)``. The probes see heads as ``(B, heads, N, d)``.

Speed notes (the arithmetic is that of ``shared/reference/RAVLT.md`` §1.1–1.2; only its order and
memory traffic differ, equal to float32 rounding):

* RoPE is a complex multiplication of each channel pair by ``cos + i sin`` (one pass, no stacked
  copies) in eager mode; under ``torch.compile`` the real form ``x * cos + swap(x) * sin`` is used and
  fused by the compiler. Both need the table's angle to be equal within each pair (the published
  ``angle`` is); otherwise the exact real form runs.
* Linear attention: each step is one batched matmul over a head's strided token slice (BLAS reads the
  row stride; no copies); the key re-weighting ``k * a * N`` is applied to ``v`` instead
  (``rot(k * a)ᵀ v = rot(k)ᵀ (a * v)``; RoPE is linear and ``a`` is per token), and the normaliser
  uses ``mean_N(k * a * N) = aᵀ k``. The ``+ 1`` of the ``elu + 1`` feature maps is never
  materialised: it joins the rotation (``rot(e + 1) = rot(e) + rot(1)``, one complex ``addcmul``)
  and the small products (``(e + 1)·u = e·u + sum(u)``).
* The normaliser ``z`` and LePE join in one ``addcmul``; under autocast the attention arithmetic
  (feature maps, re-weighting, normaliser, RoPE, both products, softmax attention) runs in float32,
  while ``qkvo``, ``lepe`` and ``proj`` run in the autocast dtype.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionType = Literal["linear", "softmax"]


class RotaryTable(nn.Module):
    """2-D rotary position tables (sin, cos) of shape ``(H*W, head_dim)``, cached per size.

    ``angle`` is a persistent buffer (the authors' checkpoints carry it as ``layers.{i}.RoPE.angle``):
    ``1 / 10000 ** linspace(0, 1, head_dim // 4)``, each value repeated twice in place. The first
    half of the table encodes the row (H), the second half the column (W). The cache keeps the
    ``max_cached`` most recently used sizes (multi-scale detection training sees many). Under
    ``torch.compile`` the tables are built inside the graph (no cache lookups, no graph breaks).
    """

    max_cached = 8

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs head_dim divisible by 4, got {head_dim}")
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
        self.register_buffer("angle", angle.repeat_interleave(2), persistent=True)
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _load_from_state_dict(self, *args, **kwargs):  # a loaded angle invalidates the tables
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda()/.half() invalidate them too
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():  # an opaque op: inductor would recompute sin/cos in every consumer
            return _rope_tables(self.angle, height, width)
        key = (height, width, self.angle.device, self.angle.dtype, self.angle._version)
        tables = self._cache.get(key)
        if tables is None:
            # Normal tensors even under inference_mode (validate/test): the cache outlives it and
            # is reused by training, where inference tensors cannot be saved for backward.
            with torch.inference_mode(False):
                tables = self._cache[key] = _build_tables(self.angle, height, width)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return tables


def _build_tables(angle: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(height, device=angle.device, dtype=angle.dtype)[:, None] * angle  # (H, d/2)
    cols = torch.arange(width, device=angle.device, dtype=angle.dtype)[:, None] * angle  # (W, d/2)
    half = angle.numel()
    phase = torch.cat(
        [rows[:, None, :].expand(height, width, half), cols[None, :, :].expand(height, width, half)], dim=-1
    ).reshape(height * width, 2 * half)  # (N, d), h outer, w inner
    return phase.sin(), phase.cos()


@torch.library.custom_op("ravlt_pl::rope_tables", mutates_args=())
def _rope_tables(angle: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables as one opaque operator for ``torch.compile``: built once per stage and call.

    Traced as ordinary ops, inductor fuses the ``sin``/``cos`` into every block's consumer and
    recomputes them per element (a third of the compiled linear-attention kernels' time on CPU).
    """
    return _build_tables(angle, height, width)


@_rope_tables.register_fake
def _(angle: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (height * width, angle.numel() * 2)
    return angle.new_empty(shape), angle.new_empty(shape)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)`` along the last axis."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """The reference rotation ``x * cos + rotate_every_two(x) * sin`` (stacked copies; for reading)."""
    return x * cos + rotate_every_two(x) * sin


# -- fast RoPE -----------------------------------------------------------------------------------
_ROPE_FORMS: "OrderedDict[tuple[int, int], tuple]" = OrderedDict()  # eager-mode cache, a few sizes
_ROPE_FORMS_MAX = 32


def _rope_forms(sin: torch.Tensor, cos: torch.Tensor) -> tuple:
    """``(table, table_of_ones, cos, signed_sin)`` for the tables ``(N, d)``.

    ``table`` is ``cos + i sin`` per channel pair ``(N, d/2)`` (complex) and ``table_of_ones`` the
    rotation of an all-ones vector, ``(1 + i) * table``; both ``None`` when the angles of a pair differ
    or under ``torch.compile`` (then the real form applies). ``signed_sin`` is ``sin`` with the sign of
    ``rotate_every_two`` folded in (``-sin`` at even channels). Cached by tensor identity in eager mode
    (the :class:`RotaryTable` cache hands out the same tensors every call).
    """
    compiling = torch.compiler.is_compiling()
    if not compiling:
        key = (id(sin), id(cos))
        hit = _ROPE_FORMS.get(key)
        if hit is not None and hit[0] is sin and hit[1] is cos and hit[2] == (sin._version, cos._version):
            _ROPE_FORMS.move_to_end(key)
            return hit[3]
    with torch.inference_mode(False):  # cached forms must stay usable outside inference_mode
        signed = torch.stack((-sin[:, 0::2], sin[:, 1::2]), dim=-1).flatten(-2)
        table = ones = None
        if not compiling and torch.equal(sin[:, 0::2], sin[:, 1::2]) and torch.equal(cos[:, 0::2], cos[:, 1::2]):
            table = torch.complex(cos[:, 0::2].contiguous(), sin[:, 0::2].contiguous())
            ones = table * (1 + 1j)
    forms = (table, ones, cos, signed)
    if not compiling:
        _ROPE_FORMS[key] = (sin, cos, (sin._version, cos._version), forms)  # holds sin/cos: ids stay unique
        while len(_ROPE_FORMS) > _ROPE_FORMS_MAX:
            _ROPE_FORMS.popitem(last=False)
    return forms


def _rotate(x: torch.Tensor, forms: tuple, plus_one: bool = False) -> torch.Tensor:
    """RoPE of tokens ``x (B, N, [heads,] d)``, of ``x + 1`` when ``plus_one`` (one pass either way).

    The tables broadcast as ``(N, 1, d)`` when x has a heads axis.
    """
    table, ones, cos, signed = forms
    if x.dim() == 4:  # (B, N, heads, d)
        table, ones, cos, signed = (None if f is None else f[:, None] for f in forms)
    if table is not None and x.stride(-1) == 1 and x.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in x.stride()[:-1]):
        xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        rotated = torch.addcmul(ones, xc, table) if plus_one else xc * table  # rot(x + 1) = rot(x) + rot(1)
        return torch.view_as_real(rotated).flatten(-2)
    if plus_one:
        x = x + 1.0
    return x * cos + x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * signed


class _ExpFormElu(torch.autograd.Function):
    """``F.elu`` (alpha 1) as ``max(x, exp(min(x, 0)) - 1)``, for CPU.

    Written by hand because ATen's CPU ``elu`` evaluates ``expm1`` without SIMD: on AVX-512 it is ~8×
    slower than ``exp`` and was ~10% of RAVLT-S inference. ``exp(x) - 1`` differs from ``expm1(x)`` by
    < 1.2e-7 absolute (every use adds the 1 back anyway). The factor ``exp(min(x, 0))`` is also the
    derivative, so the backward is one multiplication.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out, slope = _exp_form_elu(x, keep_slope=True)
        ctx.save_for_backward(slope)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (slope,) = ctx.saved_tensors
        return grad * slope


def _exp_form_elu(x: torch.Tensor, keep_slope: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(elu(x), exp(min(x, 0)))``: the slope is d elu / dx; without ``keep_slope`` its buffer
    becomes the output (one allocation) and None is returned in its place."""
    slope = torch.clamp(x, max=0.0).exp_()
    out = slope - 1.0 if keep_slope else slope.sub_(1.0)
    out = torch.maximum(out, x, out=out)  # elu(x) = max(x, exp(min(x, 0)) - 1), as e^x >= 1 + x
    return out, slope if keep_slope else None


def elu(x: torch.Tensor) -> torch.Tensor:
    """``F.elu``, in the exp form on CPU: eager through :class:`_ExpFormElu`; compiled as plain ops
    (inductor's CPU code also calls a scalar ``expm1`` for ``F.elu``, and once per fused consumer)."""
    if x.device.type != "cpu":
        return F.elu(x)
    if torch.compiler.is_compiling():  # the same formula, out of place (the compiler fuses it)
        return torch.maximum(torch.exp(torch.clamp(x, max=0.0)) - 1.0, x)
    if not (torch.is_grad_enabled() and x.requires_grad):  # nothing to save: one buffer, in place
        return _exp_form_elu(x, keep_slope=False)[0]
    return _ExpFormElu.apply(x)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, N, C)`` (a view when x is channels-last)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def _as_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, N, C)`` → ``(B, C, H, W)`` (channels-last strides when the tokens are contiguous)."""
    return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


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
        """(B, C, H, W) → token views (B, N, ·) ``qk`` (2C), ``v`` (C), ``o`` (C), and LePE(v) as a map.

        One ``split`` (not four slices): its backward is a single concatenation.
        """
        qk, v, o = _tokens(self.qkvo(x)).split([2 * x.shape[1], x.shape[1], x.shape[1]], dim=-1)
        return qk, v, o, self.lepe(_as_map(v, *x.shape[-2:]))

    @staticmethod
    def _combine(out: torch.Tensor, z: torch.Tensor | None, lepe: torch.Tensor, gate: torch.Tensor | None):
        """``(out * z + lepe) * gate`` as a map (the input of ``proj``); out and gate are tokens
        ``(B, N, C)``, z ``(B, N, heads)`` (None: 1), lepe a ``(B, C, H, W)`` map."""
        lepe_t = _tokens(lepe)
        if z is None:
            y = out + lepe_t
        else:
            heads = z.shape[-1]
            y = torch.addcmul(lepe_t.unflatten(-1, (heads, -1)), out.unflatten(-1, (heads, -1)), z[..., None])
            y = y.flatten(-2)
        if gate is not None:
            y = y * gate
        return _as_map(y, *lepe.shape[-2:])


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
        d, heads = self.head_dim, self.num_heads
        qk, v, o, lepe = self._split(x)
        n_tokens = v.shape[1]
        with torch.autocast(x.device.type, enabled=False):  # attention arithmetic in float32
            qk, v, o = qk.float(), v.float(), o.float()
            forms = _rope_forms(sin.float(), cos.float())
            e = elu(qk).split(d, dim=-1)  # heads of the feature maps q' = e_q + 1, then of k' = e_k + 1
            outs, zs, kvs = [], [], []
            for h, v in enumerate(v.split(d, dim=-1)):  # each product one batched matmul on a strided slice
                eq, ek = e[h], e[heads + h]  # (B, N, d)
                if self.reweight_keys:
                    q_global = eq.mean(dim=1, keepdim=True) + 1.0  # mean_N(q'), (B, 1, d)
                    logits = (ek @ q_global.transpose(-1, -2)).add_(q_global.sum(-1, keepdim=True))  # k'·q_global
                    a = torch.softmax(logits.mul_(self.scale), dim=1)  # (B, N, 1)
                    k_mean = (a.transpose(-1, -2) @ ek).add_(a.sum(1, keepdim=True))  # mean_N(k' * a * N) = aᵀk'
                    v = v * a  # rot(k' * a * N)ᵀ v / N == rot(k')ᵀ (a * v)
                else:
                    k_mean = ek.mean(dim=1, keepdim=True) + 1.0
                    v = v * (1.0 / n_tokens)
                z = (eq @ k_mean.transpose(-1, -2)).add_(k_mean.sum(-1, keepdim=True) + 1e-6).reciprocal_()  # (B, N, 1)
                kv = _rotate(ek, forms, plus_one=True).transpose(-1, -2) @ v  # (B, d, d)
                outs.append(_rotate(eq, forms, plus_one=True) @ kv)  # (B, N, d), before the normaliser
                zs.append(z)
                kvs.append(kv)
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # (B, N, C)
            z = zs[0] if len(zs) == 1 else torch.cat(zs, dim=-1)  # (B, N, heads)
            if self.probe is not None:
                self.probe("kv", torch.stack(kvs, dim=1))
                self.probe("out", (out.unflatten(-1, (self.num_heads, d)) * z[..., None]).transpose(1, 2))
            y = self._combine(out, z, lepe, o if self.gate else None)
        return self.proj(y.to(x.dtype))  # autocast: proj runs in the low-precision dtype again


class SoftmaxAttention(_GatedAttention):
    """Softmax attention with RoPE, the same gate and local position enhancement (stages 3–4)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.probe: Callable[[str, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        qk, v, o, lepe = self._split(x)
        with torch.autocast(x.device.type, enabled=False):  # attention arithmetic in float32
            qk, v, o = qk.float(), v.float(), o.float()
            forms = _rope_forms(sin.float(), cos.float())
            q, k = (_rotate(t.unflatten(-1, heads), forms).transpose(1, 2) for t in qk.chunk(2, dim=-1))  # (B, heads, N, d)
            v = v.unflatten(-1, heads).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, heads, N, d)
            if self.probe is not None:
                self.probe("out", out)
            y = self._combine(out.transpose(1, 2).flatten(2), None, lepe, o)
        return self.proj(y.to(x.dtype))


def build_attention(kind: AttentionType, dim: int, num_heads: int) -> nn.Module:
    if kind == "linear":
        return RankAugmentedLinearAttention(dim, num_heads)
    if kind == "softmax":
        return SoftmaxAttention(dim, num_heads)
    raise ValueError(f"attention must be 'linear' or 'softmax', got {kind!r}")
