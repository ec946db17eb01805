"""The RAVLT backbone: convolutional stem, four stages of RoPE attention blocks, classifier or dense outputs.

State-dict names follow the authors' release (``patch_embed.proj.*``, ``layers.{i}.blocks.{j}.*``,
``proj``/``norm``/``head``, ``extra_norms.{i}``) except the rotary table, ``layers.{i}.rope`` here
(``RoPE`` there); :func:`ravlt_pl.models.checkpoint.checkpoint_filter_fn` maps the difference.

Each module's forward is the paper's maths (``docs/architecture.md``); with its ``fast`` switch on
(the default; :meth:`RAVLT.set_fast_path`, ``RAVLT_FAST_PATH=0``) the same computation runs through
the kernels of :mod:`ravlt_pl.models.fast`. The network runs channels-last inside (the input is
converted once; 1x1 convs are then plain GEMMs, depthwise convs and LayerNorms read contiguous
channels, and the fast attention reads tokens as free views), so returned dense maps are
channels-last too (memory format only; shapes as always).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.utils.checkpoint
from timm.layers import (
    DropPath,
    SelectAdaptivePool2d,
    calculate_drop_path_rates,
    register_notrace_module,
    trunc_normal_,
)
from timm.models import FeatureInfo
from timm.models._features import feature_take_indices
from timm.models._manipulate import adapt_input_conv
from torch import nn

from . import fast as fast_kernels
from . import recompute
from .attention import AttentionType, RopeTables, RotaryTable, build_attention
from .checkpoint import checkpoint_filter_fn, extract_backbone_state, load_official, read_checkpoint


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
        self.fast = fast_kernels.use_fast_path()
        self._dwconv_plus_identity = fast_kernels.IdentityFoldedKernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast:
            h = fast_kernels.conv_gelu(self.fc1, self.act, x)
            return self.fc2(self._dwconv_plus_identity(self.dwconv, h))
        h = self.act(self.fc1(x))
        return self.fc2(h + self.dwconv(h))


@register_notrace_module  # torch.fx: the fast path branches on dtypes and autograd state
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
        self.fast = fast_kernels.use_fast_path()
        self._pos_plus_identity = fast_kernels.IdentityFoldedKernel()

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        gamma_1, gamma_2 = (self.gamma_1, self.gamma_2) if self.layerscale else (None, None)
        if self.fast:
            x = self._pos_plus_identity(self.pos, x)
            attn = self.attn(self.norm1(x), rope.sin, rope.cos, forms=rope.forms)
            x = fast_kernels.residual(x, attn, gamma_1, self.drop_path, self.training)
            return fast_kernels.residual(x, self.ffn(self.norm2(x)), gamma_2, self.drop_path, self.training)
        x = x + self.pos(x)
        x = x + self.drop_path(_scaled(gamma_1, self.attn(self.norm1(x), rope.sin, rope.cos)))
        return x + self.drop_path(_scaled(gamma_2, self.ffn(self.norm2(x))))


def _scaled(gamma: torch.Tensor | None, branch: torch.Tensor) -> torch.Tensor:
    return branch if gamma is None else gamma * branch


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

    def __init__(
        self, dim: int, out_dim: int | None, depth: int, num_heads: int, drop_paths: Sequence[float], **block_kwargs
    ):
        super().__init__()
        self.rope = RotaryTable(dim // num_heads)
        self.blocks = nn.ModuleList(Block(dim, num_heads, drop_path=dp, **block_kwargs) for dp in drop_paths[:depth])
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else None
        self.grad_checkpointing = False  # full recomputation: blocks keep only their inputs
        self.selective_recompute = True  # fast training blocks keep only their GEMM outputs (models/recompute.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks only; the caller applies ``downsample`` (dense outputs are taken in between)."""
        rope = self.rope(x.shape[-2], x.shape[-1])
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            elif self.selective_recompute and block.fast and recompute.applies(x):
                x = recompute.run_block(block, x, rope)
            else:
                x = block(x, rope)
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
    stage indices (negative ones count from the end) builds the dense backbone (returns one
    normalised map per listed stage, strides 4/8/16/32) whose BatchNorms stay frozen in train mode
    when ``norm_eval`` is true. Following timm, ``num_features`` is the width of
    :meth:`forward_features` (the last stage) and ``head_hidden_size`` the pre-logits width after
    the 1×1 ``proj`` (``projection``); ``global_pool=""`` keeps the map unpooled.

    Parameters are channels-last, as the network runs (the input is converted once), so gradients
    have the parameters' strides (no DDP stride warnings); ``fast`` switches are set by
    :meth:`set_fast_path`.

    Training memory: with ``selective_recompute`` (the default) each fast-path block keeps only its
    input and its ``qkvo``/``proj``/``fc1``/``fc2`` outputs for backward and recomputes the rest
    (:mod:`ravlt_pl.models.recompute`); ``grad_checkpointing`` recomputes whole blocks from their
    inputs (timm's :meth:`set_grad_checkpointing`), for the largest detection/segmentation inputs.
    Both are ``backbone_overrides`` of every task.
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
        global_pool: str = "avg",
        drop_path_rate: float = 0.0,
        attention: Sequence[AttentionType] = ("linear", "linear", "softmax", "softmax"),
        out_indices: Sequence[int] | None = None,
        norm_eval: bool = True,
        in_chans: int = 3,
        grad_checkpointing: bool = False,
        selective_recompute: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
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
        self.in_chans = in_chans
        self.out_indices = _stage_indices(out_indices) if out_indices is not None else None
        self.norm_eval = norm_eval and self.out_indices is not None
        self.num_features = embed_dims[-1]
        self.head_hidden_size = projection

        with torch.device(device) if device is not None else nullcontext():
            self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
            rates = calculate_drop_path_rates(drop_path_rate, sum(depths))  # rising from 0 over all blocks
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
            self.feature_info = [
                dict(num_chs=c, reduction=4 * 2**i, module=f"layers.{i}") for i, c in enumerate(embed_dims)
            ]
            if self.out_indices is None:
                self.proj = nn.Conv2d(embed_dims[-1], projection, 1)
                self.norm = nn.BatchNorm2d(projection)
                self.act = nn.SiLU()
                self.global_pool = _global_pool(global_pool)
                self.head = nn.Conv2d(projection, num_classes, 1) if num_classes > 0 else nn.Identity()
            else:
                self.extra_norms = nn.ModuleDict({str(i): LayerNorm2d(embed_dims[i]) for i in self.out_indices})
                self.feature_info = FeatureInfo(
                    [dict(info, module=f"extra_norms.{i}") for i, info in enumerate(self.feature_info)],
                    self.out_indices,
                )
            self.apply(_init_weights)
        for m in self.modules():  # weights only: (1, C, 1, 1) gammas keep the strides of their gradients
            if isinstance(m, nn.Conv2d):
                m.to(memory_format=torch.channels_last)
        self.to(dtype=dtype)
        self.set_grad_checkpointing(grad_checkpointing)
        self.set_selective_recompute(selective_recompute)

    # -- timm-style conveniences ------------------------------------------------------------------
    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned map (dense form)."""
        return [self.embed_dims[i] for i in self.out_indices or ()]

    def set_fast_path(self, enabled: bool = True) -> None:
        """Switch every module between the fast kernels and the reference maths (``fast``)."""
        for module in self.modules():
            if hasattr(module, "fast"):
                module.fast = enabled

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Nothing beyond timm's 1-D rule (norms, biases): the (1, C, 1, 1) layer-scale gammas decay, as in the
        authors' recipes and our tasks' ``"1d"`` groups, so timm's ``create_optimizer_v2`` forms the same groups."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [(r"^layers\.(\d+)\.blocks\.(\d+)", None), (r"^layers\.(\d+)\.downsample", (0,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_selective_recompute(self, enable: bool = True) -> None:
        """Fast-path training blocks keep only their GEMM outputs for backward (see the class notes)."""
        for stage in self.layers:
            stage.selective_recompute = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` (0: none) on the device and dtype of the model; ``global_pool``
        replaces the pooling (``""``: none) when given."""
        if self.out_indices is not None:
            raise RuntimeError("the dense RAVLT (out_indices set) has no classifier")
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _global_pool(global_pool)
        if num_classes > 0:
            ref = next(self.parameters())
            self.head = nn.Conv2d(self.head_hidden_size, num_classes, 1, device=ref.device, dtype=ref.dtype)
            _init_weights(self.head)
            self.head.to(memory_format=torch.channels_last)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)
        self.global_pool.train(self.training)

    def train(self, mode: bool = True) -> RAVLT:
        super().train(mode)
        if mode and self.norm_eval:  # frozen BatchNorm statistics for dense fine-tuning
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str | Path) -> None:
        """timm's ``pretrained=True`` (``custom_load``): an authors' release through
        :func:`~ravlt_pl.models.checkpoint.load_official`; a classifier for other classes gets a new
        head, another ``in_chans`` an adapted stem (timm's ``adapt_input_conv``)."""
        raw, source = read_checkpoint(checkpoint_path)
        state = checkpoint_filter_fn(extract_backbone_state(raw, source), self)
        stem = "patch_embed.proj.0.weight"
        if stem in state and state[stem].shape[1] != self.in_chans:
            state[stem] = adapt_input_conv(self.in_chans, state[stem])
        head = "head.weight"
        keep_head = head in state and head in self.state_dict() and state[head].shape == self.state_dict()[head].shape
        load_official(self, state, exclude=() if keep_head else ("head.",))

    # -- forward ----------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Classifier: the last stage map (B, C3, H/32, W/32). Dense: the list of normalised maps."""
        if self.out_indices is not None:
            return self.forward_intermediates(x, self.out_indices, norm=True, stop_early=True, intermediates_only=True)
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for stage in self.layers:
            x = stage(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage outputs listed in ``indices`` (timm's meaning: an int n takes the last n stages),
        each before its downsample; ``norm`` applies the dense form's ``extra_norms`` where present.
        Returns ``(last stage map, intermediates)``, or only the intermediates."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.layers), indices)
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        intermediates = []
        stages = self.layers if not stop_early else self.layers[: last + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                extra_norms = getattr(self, "extra_norms", {})
                intermediates.append(extra_norms[str(i)](x) if norm and str(i) in extra_norms else x)
            if stage.downsample is not None and i + 1 < len(stages):
                x = stage.downsample(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices``; with ``prune_head`` the classifier's
        ``proj``/``norm``/``head`` and pooling too, so ``forward`` returns the last kept stage's map.
        (RAVLT has no norm after its last stage: ``prune_norm`` has nothing to drop.)"""
        take, last = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: last + 1]
        self.layers[-1].downsample = None
        self.num_features = self.embed_dims[last]
        if prune_head and self.out_indices is None:
            self.proj, self.norm, self.act = nn.Identity(), nn.Identity(), nn.Identity()
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(self.act(self.norm(self.proj(x))))  # (B, projection, 1, 1), or unpooled
        pooled = not self.global_pool.is_identity()
        if pre_logits:
            return x.flatten(1) if pooled else x
        x = self.head(x)
        return x.flatten(1) if pooled else x

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = self.forward_features(x)
        return x if self.out_indices is not None else self.forward_head(x)


def _stage_indices(indices: Sequence[int]) -> tuple[int, ...]:
    """Stage indices 0..3, negative ones counted from the end (timm's ``out_indices=(-1,)``)."""
    bad = [i for i in indices if not -4 <= i < 4]
    if bad:
        raise ValueError(f"out_indices must lie in -4..3, got {list(indices)}")
    return tuple(sorted({i % 4 for i in indices}))


def _global_pool(pool_type: str) -> SelectAdaptivePool2d:
    """timm's pooling, unflattened (the head is a 1×1 conv); concatenating pools would change its width."""
    if pool_type.startswith("cat"):
        raise ValueError(f"global_pool {pool_type!r} concatenates; RAVLT's head takes one pooled map")
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=False)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
