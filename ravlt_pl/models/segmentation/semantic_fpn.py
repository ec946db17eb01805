"""Semantic FPN (Kirillov et al. 2019) as mmsegmentation builds it: an FPN neck, ``FPNHead``, and the segmentor.

Every head takes the list of backbone maps (strides 4/8/16/32, finest first) and returns class
logits at stride 4 (the wrapper upsamples them). The FPN is torchvision's
``FeaturePyramidNetwork`` (1×1 laterals and 3×3 outputs with bias, nearest top-down upsampling —
the same layers and parameter count as mmdet's ``FPN``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from .heads import NormLayer, PixelClassifier
from .segmentor import EncoderDecoder


class FPNNeck(nn.Module):
    """torchvision's ``FeaturePyramidNetwork`` over a list of maps (it wants and returns dicts)."""

    def __init__(self, in_channels: Sequence[int], channels: int = 256) -> None:
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), channels)
        self.out_channels = [channels] * len(in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
        return list(out.values())


class FPNHead(nn.Module):
    """Semantic FPN's head (mmseg ``FPNHead``).

    Level ``i`` (stride ``4·2^i``) gets ``max(1, i)`` blocks of 3×3 conv-BN-ReLU to ``channels``,
    each followed by a 2× bilinear upsampling while the level is coarser than stride 4; the levels
    are summed at stride 4 and classified.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 128,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for level, cin in enumerate(in_channels):
            layers: list[nn.Module] = []
            for k in range(max(1, level)):
                layers.append(Conv2dNormActivation(cin if k == 0 else channels, channels, 3, norm_layer=norm_layer))
                if level > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.classifier = PixelClassifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](features[0])  # (B, channels, H/4, W/4)
        for head, x in zip(self.scale_heads[1:], features[1:]):
            # odd input sizes make the 2^k upsampled map differ by a pixel: resize as mmseg does
            out = out + F.interpolate(head(x), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(out)


class SemanticFPN(EncoderDecoder):
    """Backbone + FPN + ``FPNHead``; the defaults are the published widths (FPN 256, head 128, dropout 0.1).

    Args:
        backbone: returns maps at strides 4/8/16/32 and lists their widths in ``out_channels``.
        num_classes: classes the head predicts.
        fpn_channels: width of the FPN's outputs.
        head_channels: width of ``FPNHead``'s conv blocks.
        dropout: ``Dropout2d`` rate before the pixel classifier.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, fpn_channels: int = 256, head_channels: int = 128,
        dropout: float = 0.1,
    ) -> None:  # fmt: skip
        neck = FPNNeck(backbone.out_channels, fpn_channels)
        super().__init__(backbone, FPNHead(neck.out_channels, num_classes, head_channels, dropout), neck=neck)
