"""The RAVLT backbone: convolutional stem, four stages of RoPE attention blocks, classifier or dense outputs.

State-dict names follow the authors' release (``patch_embed.proj.*``, ``layers.{i}.blocks.{j}.*``,
``proj``/``norm``/``head``, ``extra_norms.{i}``) except the rotary table, ``layers.{i}.rope`` here
(``RoPE`` there); :func:`ravlt_pl.models.checkpoint.checkpoint_filter_fn` maps the difference.

Speed: the network runs channels-last inside (the input is converted once; 1x1 convs are then plain
GEMMs, depthwise convs and LayerNorms read contiguous channels, and the attention reads tokens as
free views), so returned dense maps are channels-last too (memory format only; shapes as always).
In float32 inference the residual ``x + dwconv(x)`` of ``pos`` and of the FFN is one conv whose
(cached) kernel centre carries the identity, and layer-scale residuals are one ``addcmul``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils import flop_counter
from timm.layers import DropPath, trunc_normal_
from timm.models import FeatureInfo
from torch import nn

from .attention import AttentionType, RotaryTable, build_attention


_MKLDNN_POINTWISE = (
    torch.ops.mkldnn._convolution_pointwise.default
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    else None
)
if _MKLDNN_POINTWISE is not None and torch.ops.mkldnn._convolution_pointwise not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(torch.ops.mkldnn._convolution_pointwise)
    def _conv_pointwise_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        """So ``torch.utils.flop_counter`` (``summary``'s GFLOPs) counts the fused conv like a conv."""
        return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def _float32_inference(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Eager float32 inference (no autograd, autocast or compiler): where weight folds and fused
    oneDNN kernels apply."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling() or x.dtype != torch.float32
                or w.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type))  # fmt: skip


def conv_gelu(conv: nn.Conv2d, act: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    """``act(conv(x))``; on CPU in float32 inference one oneDNN kernel with GELU as its post-op.

    Written by hand because eager PyTorch has no public fused conv+GELU (``torch.compile`` with
    freezing uses this same oneDNN op); the separate GELU pass over the 3.5×-wide hidden map was
    ~6% of RAVLT-S inference. Equal to the two-step form to float32 rounding (erf GELU both ways).
    """
    if (x.device.type == "cpu" and act.approximate == "none" and _MKLDNN_POINTWISE is not None
            and _float32_inference(x, conv.weight) and isinstance(conv.padding, tuple)):  # fmt: skip
        return _MKLDNN_POINTWISE(x, conv.weight, conv.bias, list(conv.padding), list(conv.stride),
                                 list(conv.dilation), conv.groups, "gelu", [], "none")  # fmt: skip
    return act(conv(x))


def conv_plus_identity(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x + conv(x)`` for a same-size depthwise conv; one conv pass in float32 inference.

    Without autograd, in float32 and outside autocast and ``torch.compile``, the identity joins the
    kernel centre (``conv(x, w + δ) == x + conv(x, w)``). The folded kernel is cached on the module
    per weight version: oneDNN is much slower with a freshly allocated weight on every call, so the
    fold is not used where the weight would be rebuilt each time (training, compiled graphs). Under
    autocast or in half precision the sum stays explicit, so the identity path keeps the residual's
    precision instead of being rounded to the conv's dtype.
    """
    w = conv.weight
    if not _float32_inference(x, w):
        return x + conv(x)
    key = (w.data_ptr(), w._version, w.device)
    cached = conv.__dict__.get("_folded_kernel")
    if cached is None or cached[0] != key:
        with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
            folded = w.detach().clone()
            kh, kw = folded.shape[-2:]
            folded[..., kh // 2, kw // 2] += 1.0
        cached = conv.__dict__["_folded_kernel"] = (key, folded)
    return F.conv2d(x, cached[1], conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a ``(B, C, H, W)`` map; the ``nn.LayerNorm`` sits under ``.norm``.

    On a channels-last map both permutes are free views (no copies)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvFFN(nn.Module):
    """``fc1`` → GELU → ``h + dwconv(h)`` → ``fc2``, all on ``(B, C, H, W)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_gelu(self.fc1, self.act, x)
        return self.fc2(conv_plus_identity(self.dwconv, x))


class Block(nn.Module):
    """``x + pos(x)``, then pre-norm attention and FFN residuals with optional layer scale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        attention: AttentionType,
        drop_path: float = 0.0,
        layerscale: bool = True,
        layer_init_value: float = 1.0,
    ) -> None:
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm2d(dim)
        self.attn = build_attention(attention, dim, num_heads)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = ConvFFN(dim, int(mlp_ratio * dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layerscale = layerscale
        if layerscale:
            self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_init_value)))
            self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_init_value)))

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = conv_plus_identity(self.pos, x)
        x = self._residual(x, self.attn(self.norm1(x), sin, cos), self.gamma_1 if self.layerscale else None)
        return self._residual(x, self.ffn(self.norm2(x)), self.gamma_2 if self.layerscale else None)

    def _residual(self, x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        """``x + drop_path(gamma * branch)`` in one ``addcmul`` (the drop-path mask joins the gamma)."""
        dp = self.drop_path
        if isinstance(dp, DropPath) and self.training and dp.drop_prob > 0.0:  # same draws as timm's DropPath
            keep = 1.0 - dp.drop_prob
            mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
            if keep > 0.0 and dp.scale_by_keep:
                mask.div_(keep)
            gamma = mask if gamma is None else gamma * mask
        if (not torch.is_grad_enabled() and branch.shape == x.shape and branch.dtype == x.dtype
                and (gamma is None or gamma.dtype == x.dtype)):
            # Without autograd the sum goes into the branch, this block's own fresh output: one
            # activation-sized allocation less per residual (fewer page faults on CPU).
            return branch.add_(x) if gamma is None else torch.addcmul(x, gamma, branch, out=branch)
        return x + branch if gamma is None else torch.addcmul(x, gamma, branch)


class Downsample(nn.Module):
    """3x3 stride-2 conv (``reduction``) + BatchNorm (``norm``)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))


class Stage(nn.Module):
    """Blocks at one resolution sharing one rotary table; the downsample (if any) follows."""

    def __init__(self, dim: int, out_dim: int | None, depth: int, num_heads: int, drop_paths: Sequence[float], **block_kwargs):
        super().__init__()
        self.rope = RotaryTable(dim // num_heads)
        self.blocks = nn.ModuleList(Block(dim, num_heads, drop_path=dp, **block_kwargs) for dp in drop_paths[:depth])
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks only; the caller applies ``downsample`` (dense outputs are taken in between)."""
        sin, cos = self.rope(x.shape[-2], x.shape[-1])
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, sin, cos, use_reentrant=False)
            else:
                x = block(x, sin, cos)
        return x


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    half = dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, stride=2, padding=1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, padding=1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, padding=1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim),
    )  # fmt: skip


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = _stem(in_chans, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _per_stage(value, name: str, n: int = 4) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} needs one value per stage ({n}), got {values}")
    return values


class RAVLT(nn.Module):
    """Rank-Augmented Vision Linear Transformer.

    ``out_indices=None`` builds the classifier (returns logits ``(B, num_classes)``); a tuple of
    stage indices builds the dense backbone (returns one normalised map per listed stage, strides
    4/8/16/32) whose BatchNorms stay frozen in train mode when ``norm_eval`` is true.
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (3, 5, 9, 3),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: float | Sequence[float] = 3.5,
        layerscales: bool | Sequence[bool] = True,
        layer_init_values: float | Sequence[float] = 1.0,
        projection: int = 1024,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        attention: Sequence[AttentionType] = ("linear", "linear", "softmax", "softmax"),
        out_indices: Sequence[int] | None = None,
        norm_eval: bool = True,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        embed_dims, depths, num_heads = list(embed_dims), list(depths), list(num_heads)
        mlp_ratios = _per_stage(mlp_ratios, "mlp_ratios")
        layerscales = _per_stage(layerscales, "layerscales")
        layer_init_values = _per_stage(layer_init_values, "layer_init_values")
        attention = _per_stage(attention, "attention")
        for seq, name in ((embed_dims, "embed_dims"), (depths, "depths"), (num_heads, "num_heads")):
            _per_stage(seq, name)
        self.embed_dims, self.depths, self.num_heads = embed_dims, depths, num_heads
        self.attention = attention
        self.num_classes = num_classes
        self.out_indices = tuple(out_indices) if out_indices is not None else None
        self.norm_eval = norm_eval and self.out_indices is not None
        self.num_features = self.head_hidden_size = projection

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        total = sum(depths)  # stochastic depth rises linearly from 0 over all blocks
        rates = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]
        self.layers = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.layers.append(
                Stage(
                    embed_dims[i],
                    embed_dims[i + 1] if i < 3 else None,
                    depths[i],
                    num_heads[i],
                    rates[start : start + depths[i]],
                    mlp_ratio=mlp_ratios[i],
                    attention=attention[i],
                    layerscale=layerscales[i],
                    layer_init_value=layer_init_values[i],
                )
            )

        if self.out_indices is None:
            self.proj = nn.Conv2d(embed_dims[-1], projection, 1)
            self.norm = nn.BatchNorm2d(projection)
            self.act = nn.SiLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Conv2d(projection, num_classes, 1) if num_classes > 0 else nn.Identity()
            self.feature_info = [
                dict(num_chs=c, reduction=4 * 2**i, module=f"layers.{i}") for i, c in enumerate(embed_dims)
            ]
        else:
            bad = [i for i in self.out_indices if not 0 <= i < 4]
            if bad:
                raise ValueError(f"out_indices must lie in 0..3, got {list(self.out_indices)}")
            self.extra_norms = nn.ModuleDict({str(i): LayerNorm2d(embed_dims[i]) for i in self.out_indices})
            self.feature_info = FeatureInfo(
                [dict(num_chs=c, reduction=4 * 2**i, module=f"extra_norms.{i}") for i, c in enumerate(embed_dims)],
                self.out_indices,
            )
        self.apply(_init_weights)

    # -- timm-style conveniences ------------------------------------------------------------------
    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned map (dense form)."""
        return [self.embed_dims[i] for i in self.out_indices or ()]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Layer-scale gammas (norms and biases are excluded by their 1-D shape)."""
        return {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1].startswith("gamma")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [(r"^layers\.(\d+)\.blocks\.(\d+)", None), (r"^layers\.(\d+)\.downsample", (0,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if self.out_indices is not None:
            raise RuntimeError("the dense RAVLT (out_indices set) has no classifier")
        self.num_classes = num_classes
        self.head = nn.Conv2d(self.num_features, num_classes, 1) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)

    def train(self, mode: bool = True) -> "RAVLT":
        super().train(mode)
        if mode and self.norm_eval:  # frozen BatchNorm statistics for dense fine-tuning
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- forward ----------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Classifier: the last stage map (B, C3, H/32, W/32). Dense: the list of normalised maps."""
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if self.out_indices is not None and i in self.out_indices:
                outs.append(self.extra_norms[str(i)](x))
            if stage.downsample is not None:
                if self.out_indices is not None and i >= max(self.out_indices):
                    break
                x = stage.downsample(x)
        return outs if self.out_indices is not None else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(self.act(self.norm(self.proj(x))))  # (B, projection, 1, 1)
        return x.flatten(1) if pre_logits else self.head(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = self.forward_features(x)
        return x if self.out_indices is not None else self.forward_head(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
