"""The backbone's fast kernels: the same maths as the reference forwards, in fewer passes over memory.

Every module of :mod:`ravlt_pl.models` has one readable forward that is the paper's maths
(``docs/architecture.md``) and a bool attribute ``fast`` choosing the kernels here instead, as timm's
``fused_attn`` chooses SDPA. ``fast`` defaults to :func:`use_fast_path` (environment variable
``RAVLT_FAST_PATH``; ``0`` turns the fast kernels off) and :meth:`RAVLT.set_fast_path
<ravlt_pl.models.RAVLT.set_fast_path>` sets it on a built model. ``tests/models/test_speed_paths.py``
checks each kernel against the reference form. What each one saves (measured on CPU, RAVLT-S):

* **RoPE** as a complex multiplication of each channel pair by ``cos + i sin`` (one pass, no stacked
  copies); under ``torch.compile`` the real form ``x * cos + swap(x) * sin``, fused by the compiler.
* **Linear attention**: one batched matmul per step on a head's strided token slice (no copies);
  the key re-weighting ``k * a * N`` moves onto ``v`` (``rot(k * a)ᵀ v = rot(k)ᵀ (a * v)``: RoPE is
  linear, ``a`` is per token) and the normaliser uses ``mean_N(k * a * N) = aᵀ k``; the ``+ 1`` of the
  ``elu + 1`` feature maps joins the rotation (``rot(e + 1) = rot(e) + rot(1)``) and the small products.
* **ELU** in the exp form (ATen's CPU ``elu`` calls a scalar ``expm1``).
* **Softmax attention** through SDPA, in the autocast dtype on CUDA (flash kernels).
* **Convolutions**: ``fc1`` + GELU as one oneDNN kernel, the identity of ``x + dwconv(x)`` folded into
  the kernel centre, and residuals as one ``addcmul`` (in place when nothing needs the inputs).

In training, what autograd keeps of a fast-path block is cut down by :mod:`ravlt_pl.models.recompute`
(the GEMM outputs only; the elementwise work above is recomputed in backward).

The fused oneDNN convolution is a private ATen op that ``torch.utils.flop_counter`` does not know;
count FLOPs inside :func:`flop_counting`, which knows it (:mod:`ravlt_pl.flops` counts through it).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils import flop_counter

from .rope import autocast_off, rope_tables


def use_fast_path() -> bool:
    """The default of every module's ``fast`` switch: ``RAVLT_FAST_PATH`` unset or not ``0``."""
    return os.environ.get("RAVLT_FAST_PATH", "1") != "0"


def _mkldnn_conv_pointwise():
    ops = torch.ops.mkldnn
    if torch.backends.mkldnn.is_available() and hasattr(ops, "_convolution_pointwise"):
        return ops._convolution_pointwise
    return None


def _conv_pointwise_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def _sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)


def _sdpa_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def flop_counting(**kwargs) -> flop_counter.FlopCounterMode:
    """A ``FlopCounterMode`` (same arguments) that also counts the ops it does not know: the fused oneDNN
    conv+GELU as a conv, and SDPA's CPU flash kernel (forward and backward) as the other SDPA kernels."""
    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
    }
    if (fused := _mkldnn_conv_pointwise()) is not None:
        mapping[fused] = _conv_pointwise_flops
    return flop_counter.FlopCounterMode(custom_mapping={**mapping, **kwargs.pop("custom_mapping", {})}, **kwargs)


# -- convolutions and residuals --------------------------------------------------------------------
def _float32_inference(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Eager float32 inference (no autograd, autocast or compiler): where weight folds and fused
    oneDNN kernels apply."""
    device = x.device.type
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling() or x.dtype != torch.float32
                or w.dtype != torch.float32 or device == "meta" or torch.is_autocast_enabled(device))  # fmt: skip


def conv_gelu(conv: nn.Conv2d, act: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    """``act(conv(x))``; on CPU in float32 inference one oneDNN kernel with GELU as its post-op.

    Written by hand because eager PyTorch has no public fused conv+GELU (``torch.compile`` with
    freezing uses this same oneDNN op); the separate GELU pass over the 3.5×-wide hidden map was
    a visible share of RAVLT-S inference (``benchmark --profile`` lists it). Equal to the two-step form to float32 rounding (erf GELU both ways).
    """
    if (x.device.type == "cpu" and act.approximate == "none" and _float32_inference(x, conv.weight)
            and isinstance(conv.padding, tuple) and (fused := _mkldnn_conv_pointwise()) is not None):  # fmt: skip
        return fused.default(x, conv.weight, conv.bias, list(conv.padding), list(conv.stride),
                             list(conv.dilation), conv.groups, "gelu", [], "none")  # fmt: skip
    return act(conv(x))


class IdentityFoldedKernel:
    """``x + conv(x)`` for a same-size depthwise conv as one conv pass in float32 inference.

    Without autograd, in float32 and outside autocast and ``torch.compile``, the identity joins the
    kernel centre (``conv(x, w + δ) == x + conv(x, w)``). The folded kernel is kept here (one per
    conv, owned by the module that calls it) per weight version: oneDNN is much slower with a freshly
    allocated weight on every call, so the fold is not used where the weight would be rebuilt each
    time (training, compiled graphs). Under autocast or in half precision the sum stays explicit, so
    the identity path keeps the residual's precision instead of being rounded to the conv's dtype.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._kernel: torch.Tensor | None = None

    def __call__(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        w = conv.weight
        if not _float32_inference(x, w):
            return x + conv(x)
        key = (w.data_ptr(), w._version, w.device)
        if self._key != key:
            with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
                folded = w.detach().clone()
                kh, kw = folded.shape[-2:]
                folded[..., kh // 2, kw // 2] += 1.0
            self._key, self._kernel = key, folded
        return F.conv2d(x, self._kernel, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def residual(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor | None, drop_path: nn.Module,
             training: bool) -> torch.Tensor:  # fmt: skip
    """``x + drop_path(gamma * branch)`` in one ``addcmul`` (the drop-path mask joins the gamma)."""
    if isinstance(drop_path, DropPath) and training and drop_path.drop_prob > 0.0:  # timm DropPath's draws
        keep = 1.0 - drop_path.drop_prob
        mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
        if keep > 0.0 and drop_path.scale_by_keep:
            mask.div_(keep)
        gamma = mask if gamma is None else gamma * mask
    if (not torch.is_grad_enabled() and branch.shape == x.shape and branch.dtype == x.dtype
            and (gamma is None or gamma.dtype == x.dtype)):  # fmt: skip
        # Without autograd the sum goes into the branch, the block's own fresh output: one
        # activation-sized allocation less per residual (fewer page faults on CPU).
        return branch.add_(x) if gamma is None else torch.addcmul(x, gamma, branch, out=branch)
    return x + branch if gamma is None else torch.addcmul(x, gamma, branch)


# -- RoPE ------------------------------------------------------------------------------------------
class RotationForms(NamedTuple):
    """RoPE tables ``(N, d)`` in the forms :func:`rotate` uses, built once per size by ``RotaryTable``.

    ``table`` is ``cos + i sin`` per channel pair ``(N, d/2)`` (complex) and ``table_of_ones`` the
    rotation of an all-ones vector, ``(1 + i) * table``; both None when the angles of a pair differ,
    under ``torch.compile`` or on the meta device (then the real form applies). ``signed_sin`` is ``sin`` with the sign
    of the pair rotation (timm's ``rot``) folded in (``-sin`` at even channels).
    """

    table: torch.Tensor | None
    table_of_ones: torch.Tensor | None
    cos: torch.Tensor
    signed_sin: torch.Tensor


def rotation_forms(sin: torch.Tensor, cos: torch.Tensor) -> RotationForms:
    """The :class:`RotationForms` of float32 tables ``(N, d)``."""
    signed = torch.stack((-sin[:, 0::2], sin[:, 1::2]), dim=-1).flatten(-2)
    table = ones = None
    paired = not (torch.compiler.is_compiling() or sin.is_meta)  # angles only comparable on real data
    if paired and torch.equal(sin[:, 0::2], sin[:, 1::2]) and torch.equal(cos[:, 0::2], cos[:, 1::2]):
        table = torch.complex(cos[:, 0::2].contiguous(), sin[:, 0::2].contiguous())
        ones = table * (1 + 1j)
    return RotationForms(table, ones, cos, signed)


def rotate(x: torch.Tensor, forms: RotationForms, plus_one: bool = False) -> torch.Tensor:
    """RoPE of tokens ``x (B, N, [heads,] d)``, of ``x + 1`` when ``plus_one`` (one pass either way).

    The tables broadcast as ``(N, 1, d)`` when x has a heads axis.
    """
    if x.dim() == 4:  # (B, N, heads, d)
        forms = RotationForms(*(None if f is None else f[:, None] for f in forms))
    table, ones, cos, signed = forms
    if (
        table is not None
        and x.stride(-1) == 1
        and x.storage_offset() % 2 == 0
        and all(s % 2 == 0 for s in x.stride()[:-1])
    ):
        xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        rotated = torch.addcmul(ones, xc, table) if plus_one else xc * table  # rot(x + 1) = rot(x) + rot(1)
        return torch.view_as_real(rotated).flatten(-2)
    if plus_one:
        x = x + 1.0
    return x * cos + x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * signed


@torch.library.custom_op("ravlt_pl::rope_tables", mutates_args=())
def build_rope_tables(angle: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``RotaryTable``'s tables under ``torch.compile`` as one opaque op: built once per stage and call.

    Traced as ordinary ops, inductor fuses the ``sin``/``cos`` into every block's consumer and
    recomputes them per element (a third of the compiled linear-attention kernels' time on CPU).
    A new operator in this package's own namespace; the reference path never calls it.
    """
    return rope_tables(angle, height, width)


@build_rope_tables.register_fake
def _(angle: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (height * width, angle.numel() * 2)
    return angle.new_empty(shape), angle.new_empty(shape)


# -- ELU -------------------------------------------------------------------------------------------
class _ExpFormElu(torch.autograd.Function):
    """``F.elu`` (alpha 1) as ``max(x, exp(min(x, 0)) - 1)``, for CPU.

    Written by hand because ATen's CPU ``elu`` evaluates ``expm1`` without SIMD: it is several times
    slower than ``exp`` (``benchmark --profile`` shows its share of a forward). ``exp(x) - 1`` differs from ``expm1(x)`` by
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


# -- attention -------------------------------------------------------------------------------------
# Inside, the attention works on *tokens*: the ``qkvo`` output read as ``(B, N, 4C)`` — a free view
# when the map is channels-last, as RAVLT runs its blocks — and a head is the channel slice
# ``[head * d, (head + 1) * d)``. Probes see heads as ``(B, heads, N, d)``, as on the reference path.
def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, N, C)`` (a view when x is channels-last)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def _as_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, N, C)`` → ``(B, C, H, W)`` (channels-last strides when the tokens are contiguous)."""
    return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


def _split(attn: nn.Module, x: torch.Tensor):
    """(B, C, H, W) → token views (B, N, ·) ``qk`` (2C), ``v`` (C), ``o`` (C), and LePE(v) as a map.

    One ``split`` (not four slices): its backward is a single concatenation.
    """
    c = x.shape[1]
    qk, v, o = _tokens(attn.qkvo(x)).split([2 * c, c, c], dim=-1)
    return qk, v, o, attn.lepe(_as_map(v, *x.shape[-2:]))


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


def _forms(sin: torch.Tensor, cos: torch.Tensor, forms: RotationForms | None) -> RotationForms:
    """The rotation forms ``RotaryTable`` built with the tables, or built here (float32) if it did not."""
    return forms if forms is not None else rotation_forms(sin.float(), cos.float())


def linear_attention(attn: nn.Module, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                     forms: RotationForms | None) -> torch.Tensor:  # fmt: skip
    """:class:`~ravlt_pl.models.attention.RankAugmentedLinearAttention` on tokens (see the module notes).

    Under autocast the feature maps, re-weighting, normaliser, RoPE and both products run in float32;
    ``qkvo``, ``lepe`` and ``proj`` in the autocast dtype.
    """
    d, heads = attn.head_dim, attn.num_heads
    qk, v, o, lepe = _split(attn, x)
    n_tokens = v.shape[1]
    with autocast_off(x):
        qk, v, o = qk.float(), v.float(), o.float()
        forms = _forms(sin, cos, forms)
        e = elu(qk).split(d, dim=-1)  # heads of the feature maps q' = e_q + 1, then of k' = e_k + 1
        outs, zs, kvs = [], [], []
        for h, v_h in enumerate(v.split(d, dim=-1)):  # each product one batched matmul on a strided slice
            eq, ek = e[h], e[heads + h]  # (B, N, d)
            if attn.reweight_keys:
                q_global = eq.mean(dim=1, keepdim=True) + 1.0  # mean_N(q'), (B, 1, d)
                logits = (ek @ q_global.transpose(-1, -2)).add_(q_global.sum(-1, keepdim=True))  # k'·q_global
                a = torch.softmax(logits.mul_(attn.scale), dim=1)  # (B, N, 1)
                k_mean = (a.transpose(-1, -2) @ ek).add_(a.sum(1, keepdim=True))  # mean_N(k' * a * N) = aᵀk'
                v_h = v_h * a  # rot(k' * a * N)ᵀ v / N == rot(k')ᵀ (a * v)
            else:
                k_mean = ek.mean(dim=1, keepdim=True) + 1.0
                v_h = v_h * (1.0 / n_tokens)
            z = (eq @ k_mean.transpose(-1, -2)).add_(k_mean.sum(-1, keepdim=True) + 1e-6).reciprocal_()  # (B, N, 1)
            kv = rotate(ek, forms, plus_one=True).transpose(-1, -2) @ v_h  # (B, d, d)
            outs.append(rotate(eq, forms, plus_one=True) @ kv)  # (B, N, d), before the normaliser
            zs.append(z)
            kvs.append(kv)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # (B, N, C)
        z = zs[0] if len(zs) == 1 else torch.cat(zs, dim=-1)  # (B, N, heads)
        if attn.probe is not None:
            attn.probe("kv", torch.stack(kvs, dim=1))
            attn.probe("out", (out.unflatten(-1, (heads, d)) * z[..., None]).transpose(1, 2))
        y = _combine(out, z, lepe, o if attn.gate else None)
    return attn.proj(y.to(x.dtype))  # autocast: proj runs in the low-precision dtype again


def softmax_attention(attn: nn.Module, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                      forms: RotationForms | None) -> torch.Tensor:  # fmt: skip
    """:class:`~ravlt_pl.models.attention.SoftmaxAttention` through SDPA on tokens.

    Under CUDA autocast SDPA runs in the autocast dtype (its flash kernels); elsewhere in float32.
    RoPE is computed in float32 either way.
    """
    heads = (attn.num_heads, attn.head_dim)
    qk, v, o, lepe = _split(attn, x)
    device = x.device.type
    low_precision = device in attn.low_precision_devices and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if low_precision else torch.float32
    with autocast_off(x):
        qk, o = qk.float(), o.float()
        forms = _forms(sin, cos, forms)
        q, k = (
            rotate(t.unflatten(-1, heads), forms).transpose(1, 2).to(dtype) for t in qk.chunk(2, dim=-1)
        )  # (B, heads, N, d)
        v = v.to(dtype).unflatten(-1, heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale).float()  # (B, heads, N, d)
        if attn.probe is not None:
            attn.probe("out", out)
        y = _combine(out.transpose(1, 2).flatten(2), None, lepe, o)
    return attn.proj(y.to(x.dtype))
