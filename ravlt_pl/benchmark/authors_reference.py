"""The authors' RAVLT as written: their layout and arithmetic, unoptimised, from ``docs/architecture.md``.

Two users, which is why it lives in the package: the speed benchmark builds it at run time for its
``ravlt_t_reference`` / ``ravlt_s_reference`` rows (:mod:`ravlt_pl.benchmark.zoo`), and the tests use it as
the second, independent oracle for the optimised model in ``ravlt_pl.models`` (it reproduces the authors'
outputs, ``tests/benchmark/test_authors_reference.py``). It is written for readability, not speed:

* the RoPE sin/cos tables are recomputed for every block's attention call (no cache);
* every layout change is an explicit ``permute``/``reshape``;
* ``rotate_every_two`` is the stack-based form;
* attention is explicit ``softmax(q kᵀ) v`` (no ``scaled_dot_product_attention``);
* LayerNorm2d is ``permute -> nn.LayerNorm -> permute``.

Parameter and buffer names are exactly the authors' (``patch_embed.proj.{0,1,3,...}``,
``layers.{i}.RoPE.angle``, ``layers.{i}.blocks.{j}.attn.qkvo`` ... ``extra_norms.{i}.norm``),
so an official state dict loads with ``strict=True``.

Drop path (stochastic depth) is deliberately omitted: this is an eval-only baseline, and in
eval mode drop path is the identity, so outputs are unaffected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReferenceRAVLT", "reference_ravlt_t", "reference_ravlt_s"]


def _per_stage(value, n: int = 4) -> list:
    """A scalar applies to every stage; a sequence must have one entry per stage."""
    if isinstance(value, (list, tuple)):
        assert len(value) == n, f"expected {n} per-stage values, got {value}"
        return list(value)
    return [value] * n


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a (B, C, H, W) map; the nn.LayerNorm sits under ``.norm``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.norm(x)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class RoPE(nn.Module):
    """2-D rotary table: H-part then W-part, flattened row-major (h outer, w inner)."""

    def __init__(self, head_dim: int):
        super().__init__()
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
        angle = angle.unsqueeze(-1).repeat(1, 2).flatten()  # [a0, a0, a1, a1, ...]
        self.register_buffer("angle", angle)  # persistent: part of the state dict

    def forward(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        angle = self.angle
        idx_h = torch.arange(H, device=angle.device, dtype=angle.dtype)
        idx_w = torch.arange(W, device=angle.device, dtype=angle.dtype)
        sin_h = torch.sin(idx_h[:, None] * angle)  # (H, hd/2)
        cos_h = torch.cos(idx_h[:, None] * angle)
        sin_w = torch.sin(idx_w[:, None] * angle)  # (W, hd/2)
        cos_w = torch.cos(idx_w[:, None] * angle)
        sin_h = sin_h[:, None, :].expand(H, W, -1)
        cos_h = cos_h[:, None, :].expand(H, W, -1)
        sin_w = sin_w[None, :, :].expand(H, W, -1)
        cos_w = cos_w[None, :, :].expand(H, W, -1)
        sin = torch.cat([sin_h, sin_w], dim=-1).reshape(H * W, -1)  # (N, hd)
        cos = torch.cat([cos_h, cos_w], dim=-1).reshape(H * W, -1)
        return sin, cos


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last dim."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    x = torch.stack([-x2, x1], dim=-1)
    return x.flatten(-2)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_every_two(x) * sin


class Attention(nn.Module):
    """RALA (``kind="linear"``, RAVLT.md §1.1) or softmax attention (``kind="softmax"``, §1.2)."""

    def __init__(self, dim: int, num_heads: int, kind: str = "linear"):
        super().__init__()
        assert kind in ("linear", "softmax"), kind
        assert dim % num_heads == 0
        self.kind = kind
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkvo = nn.Conv2d(dim, dim * 4, 1)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, n, N, d) with channel index head * d + j."""
        B, C, H, W = t.shape
        t = t.reshape(B, self.num_heads, self.head_dim, H * W)
        return t.permute(0, 1, 3, 2)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N = H * W
        qkvo = self.qkvo(x)
        q, k, v, o = torch.split(qkvo, C, dim=1)
        lepe = self.lepe(v)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, n, N, d)

        if self.kind == "linear":
            q = F.elu(q) + 1.0
            k = F.elu(k) + 1.0
            # key re-weighting ("rank augmentation")
            q_mean = q.mean(dim=2, keepdim=True)  # (B, n, 1, d)
            a = torch.softmax(self.scale * (q_mean @ k.transpose(-1, -2)), dim=-1)  # (B, n, 1, N)
            a = a.transpose(-1, -2)  # (B, n, N, 1)
            k = k * a * N
            q_rot = apply_rope(q, sin, cos)
            k_rot = apply_rope(k, sin, cos)
            # normaliser from the un-rotated q and re-weighted k
            z = 1.0 / (q @ k.mean(dim=2, keepdim=True).transpose(-1, -2) + 1e-6)  # (B, n, N, 1)
            kv = (k_rot.transpose(-1, -2) / math.sqrt(N)) @ (v / math.sqrt(N))  # (B, n, d, d)
            out = (q_rot @ kv) * z  # (B, n, N, d)
        else:
            q_rot = apply_rope(q, sin, cos)
            k_rot = apply_rope(k, sin, cos)
            attn = self.scale * (q_rot @ k_rot.transpose(-1, -2))  # (B, n, N, N)
            attn = torch.softmax(attn, dim=-1)
            out = attn @ v  # (B, n, N, d)

        out = out.permute(0, 1, 3, 2).reshape(B, C, H, W)
        out = out + lepe
        return self.proj(out * o)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        h = h + self.dwconv(h)
        return self.fc2(h)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, layerscale, init_value, kind):
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm2d(dim)
        self.attn = Attention(dim, num_heads, kind)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = FFN(dim, int(mlp_ratio * dim))
        self.layerscale = layerscale
        if layerscale:
            self.gamma_1 = nn.Parameter(init_value * torch.ones(1, dim, 1, 1))
            self.gamma_2 = nn.Parameter(init_value * torch.ones(1, dim, 1, 1))

    def forward(self, x, sin, cos):
        x = x + self.pos(x)
        if self.layerscale:
            x = x + self.gamma_1 * self.attn(self.norm1(x), sin, cos)
            x = x + self.gamma_2 * self.ffn(self.norm2(x))
        else:
            x = x + self.attn(self.norm1(x), sin, cos)
            x = x + self.ffn(self.norm2(x))
        return x


class Downsample(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x):
        return self.norm(self.reduction(x))


class Stage(nn.Module):
    def __init__(self, dim, out_dim, depth, num_heads, mlp_ratio, layerscale, init_value, kind):
        super().__init__()
        self.RoPE = RoPE(dim // num_heads)
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, mlp_ratio, layerscale, init_value, kind) for _ in range(depth)]
        )
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else None

    def forward(self, x):
        """Returns (block output before the downsample, input of the next stage)."""
        H, W = x.shape[-2:]
        for blk in self.blocks:
            sin, cos = self.RoPE(H, W)  # recomputed for every attention call, on purpose
            x = blk(x, sin, cos)
        x_down = self.downsample(x) if self.downsample is not None else x
        return x, x_down


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        half = dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim),
        )  # fmt: skip

    def forward(self, x):
        return self.proj(x)


class ReferenceRAVLT(nn.Module):
    """RAVLT classification model (``out_indices=None``) or dense backbone (list of stages).

    The dense form has no ``proj/norm/head`` and returns ``extra_norms.{i}(x)`` of each requested
    stage's block output (before the downsample); ``extra_norms`` exists for all four stages.
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        mlp_ratios=3.5,
        layerscales=(True, True, True, True),
        layer_init_values=(1.0, 1.0, 1.0, 1.0),
        projection: int = 1024,
        num_classes: int = 1000,
        attention: Sequence[str] = ("linear", "linear", "softmax", "softmax"),
        out_indices: Sequence[int] | None = None,
        in_chans: int = 3,
    ):
        super().__init__()
        mlp_ratios = _per_stage(mlp_ratios)
        layerscales = _per_stage(layerscales)
        layer_init_values = _per_stage(layer_init_values)
        attention = _per_stage(attention)
        self.out_indices = None if out_indices is None else list(out_indices)

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        for i in range(4):
            self.layers.append(
                Stage(
                    embed_dims[i],
                    embed_dims[i + 1] if i < 3 else None,
                    depths[i],
                    num_heads[i],
                    mlp_ratios[i],
                    layerscales[i],
                    layer_init_values[i],
                    attention[i],
                )
            )
        if self.out_indices is None:
            self.proj = nn.Conv2d(embed_dims[-1], projection, 1)
            self.norm = nn.BatchNorm2d(projection)
            self.head = nn.Conv2d(projection, num_classes, 1)
        else:
            self.extra_norms = nn.ModuleList([LayerNorm2d(d) for d in embed_dims])
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor):
        x = self.patch_embed(x)
        outs = []
        for i, layer in enumerate(self.layers):
            x_out, x = layer(x)
            if self.out_indices is not None and i in self.out_indices:
                outs.append(self.extra_norms[i](x_out))
        if self.out_indices is not None:
            return outs
        x = self.norm(self.proj(x))
        x = x * torch.sigmoid(x)  # swish
        x = x.mean(dim=(2, 3), keepdim=True)
        return self.head(x).flatten(1)


def reference_ravlt_t(num_classes: int = 1000, **kwargs) -> ReferenceRAVLT:
    cfg = dict(
        embed_dims=[64, 128, 256, 512], depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8],
        mlp_ratios=3.5, layerscales=[True] * 4, layer_init_values=[1.0] * 4,
        projection=1024, num_classes=num_classes,
    )  # fmt: skip
    cfg.update(kwargs)
    return ReferenceRAVLT(**cfg)


def reference_ravlt_s(num_classes: int = 1000, **kwargs) -> ReferenceRAVLT:
    cfg = dict(
        embed_dims=[64, 128, 320, 512], depths=[3, 5, 9, 3], num_heads=[1, 2, 5, 8],
        mlp_ratios=3.5, layerscales=[True] * 4, layer_init_values=[1.0] * 4,
        projection=1024, num_classes=num_classes,
    )  # fmt: skip
    cfg.update(kwargs)
    return ReferenceRAVLT(**cfg)
