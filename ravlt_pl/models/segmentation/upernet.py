"""UperNet (Xiao et al. 2018): mmsegmentation's ``UPerHead`` exactly, and the segmentor with its auxiliary head.

Written here because no installed library has it whole: torchvision has no UperNet, and
segmentation_models_pytorch's lacks the pyramid-pooling bottleneck on the last stage and the
fused 3×3 bottleneck over all levels, so neither its layers nor its parameter count match the
published UperNet rows. The layer names follow mmseg (``psp_modules``, ``bottleneck``,
``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``) so its checkpoints map one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from .heads import FCNHead, NormLayer, PixelClassifier
from .segmentor import EncoderDecoder, resize


class PyramidPoolingModule(nn.ModuleList):
    """PSPNet's pooling pyramid: per scale ``s``, adaptive average pool to s×s and a 1×1 conv-BN-ReLU."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, norm_layer: NormLayer) -> None:
        super().__init__(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(s), Conv2dNormActivation(in_channels, channels, 1, norm_layer=norm_layer)
            )
            for s in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(stage(x), x.shape[-2:]) for stage in self]  # each (B, channels, H, W)


class UPerHead(nn.Module):
    """Pyramid pooling on the last map, an FPN over all maps, and a fused 3×3 bottleneck.

    1. ``psp``: the last map and its pooled pyramid (scales 1, 2, 3, 6) concatenated, then a 3×3
       ``bottleneck`` to ``channels``; it is the coarsest FPN level.
    2. 1×1 ``lateral_convs`` on the other maps; top-down sum with bilinear upsampling;
       3×3 ``fpn_convs`` on every level except the coarsest.
    3. All levels upsampled to stride 4, concatenated, fused by the 3×3 ``fpn_bottleneck``, classified.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        self.psp_modules = PyramidPoolingModule(pool_scales, in_channels[-1], channels, norm_layer)
        self.bottleneck = Conv2dNormActivation(
            in_channels[-1] + len(pool_scales) * channels, channels, 3, norm_layer=norm_layer
        )
        self.lateral_convs = nn.ModuleList(
            Conv2dNormActivation(c, channels, 1, norm_layer=norm_layer) for c in in_channels[:-1]
        )
        self.fpn_convs = nn.ModuleList(
            Conv2dNormActivation(channels, channels, 3, norm_layer=norm_layer) for _ in in_channels[:-1]
        )
        self.fpn_bottleneck = Conv2dNormActivation(len(in_channels) * channels, channels, 3, norm_layer=norm_layer)
        self.classifier = PixelClassifier(channels, num_classes, dropout)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        laterals.append(self.psp_forward(features[-1]))  # each (B, channels, H_i, W_i)
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = torch.cat([outs[0]] + [resize(x, size) for x in outs[1:]], dim=1)  # (B, L·channels, H/4, W/4)
        return self.classifier(self.fpn_bottleneck(fused))


class UperNet(EncoderDecoder):
    """Backbone + ``UPerHead`` + an auxiliary ``FCNHead`` for training; the defaults are the published ones.

    Args:
        backbone: returns maps at strides 4/8/16/32 and lists their widths in ``out_channels``.
        num_classes: classes both heads predict.
        head_channels: width of ``UPerHead`` (published 512).
        pool_scales: pyramid pooling grid sizes on the last map.
        aux_channels: width of the auxiliary ``FCNHead`` (published 256).
        aux_index: the backbone map the auxiliary head reads (2 = stage 3, stride 16).
        aux_loss_weight: the auxiliary loss's weight (published 0.4).
        dropout: ``Dropout2d`` rate before both pixel classifiers.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head_channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        aux_channels: int = 256,
        aux_index: int = 2,
        aux_loss_weight: float = 0.4,
        dropout: float = 0.1,
    ) -> None:
        channels = backbone.out_channels
        super().__init__(
            backbone,
            UPerHead(channels, num_classes, head_channels, pool_scales, dropout),
            auxiliary_head=FCNHead(channels[aux_index], num_classes, aux_channels, dropout=dropout),
            auxiliary_index=aux_index,
            auxiliary_weight=aux_loss_weight,
        )
