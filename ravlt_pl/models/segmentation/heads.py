"""What every decode head shares: mmseg's pixel classifier, and the FCN head UperNet uses as its auxiliary head.

Conv-BN-ReLU blocks are torchvision's ``Conv2dNormActivation`` (bias off when a norm follows, as
mmcv's ``ConvModule``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

NormLayer = Callable[[int], nn.Module]


class PixelClassifier(nn.Sequential):
    """mmseg's ``BaseDecodeHead.cls_seg``: ``Dropout2d`` then a 1×1 conv initialised N(0, 0.01)."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        conv = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        super().__init__(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(), conv)


class FCNHead(nn.Module):
    """mmseg's ``FCNHead`` (one 3×3 conv-BN-ReLU, no input concat): UperNet's auxiliary head on one stage."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 1,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(
            *(Conv2dNormActivation(cin, cout, 3, norm_layer=norm_layer) for cin, cout in zip(widths, widths[1:]))
        )
        self.classifier = PixelClassifier(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.convs(x))
