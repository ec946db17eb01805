"""The dense RAVLT behind torchvision's detector contract: an FPN over its stage maps.

torchvision's detectors take any module with an ``out_channels`` attribute whose forward returns an
``OrderedDict`` of feature maps. Its own :class:`~torchvision.models.detection.backbone_utils.BackboneWithFPN`
extracts those maps with ``IntermediateLayerGetter``, which only works for backbones that are a plain
sequence of children; RAVLT returns its normalised stage maps itself, so this adapter calls it and
hands the maps to torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` under the same
``body`` / ``fpn`` names (checkpoints and parameter names look like torchvision's).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from ..ravlt import RAVLT
from ..variants import build_backbone


class P6P7FromC5(LastLevelP6P7):
    """P6 = 3×3/2 conv on C5, P7 = 3×3/2 conv on P6 without a ReLU between: mmdet's FPN as the published
    RetinaNet configs set it (``add_extra_convs='on_input'``, ``relu_before_extra_convs=False``).

    torchvision's ``LastLevelP6P7`` applies a ReLU before P7 and switches to P5 when C5 has the FPN width.
    """

    def __init__(self, c5_channels: int, out_channels: int) -> None:
        super().__init__(c5_channels, out_channels)
        self.use_P5 = False

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(c[-1])
        p7 = self.p7(p6)
        return [*p, p6, p7], [*names, "p6", "p7"]


class RAVLTWithFPN(nn.Module):
    """``body`` (a dense :class:`RAVLT`) → ``fpn`` (torchvision's FPN); ``out_channels`` as torchvision expects.

    Args:
        body: dense RAVLT (``out_indices`` set); its maps become FPN levels ``"0"``, ``"1"``, ...
        out_channels: FPN width (256 in every published config).
        extra_blocks: extra levels after the last one (P6 max-pool for R-CNN, P6/P7 convs for RetinaNet).
    """

    def __init__(self, body: RAVLT, out_channels: int = 256, extra_blocks: ExtraFPNBlock | None = None) -> None:
        super().__init__()
        if body.out_indices is None:
            raise ValueError("RAVLTWithFPN needs the dense RAVLT (build it with out_indices)")
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.body(x)  # strides 4/8/16/32 for the stages in out_indices
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def ravlt_fpn(
    variant: str = "ravlt_s",
    overrides: dict | None = None,
    stages: Sequence[int] = (0, 1, 2, 3),
    out_channels: int = 256,
    extra: str = "maxpool",
    drop_path_rate: float | None = None,
) -> RAVLTWithFPN:
    """A RAVLT variant with an FPN over ``stages``.

    ``extra="maxpool"`` adds P6 by max-pooling P5 (torchvision's Mask R-CNN, for the RPN);
    ``extra="p6p7"`` adds P6/P7 by stride-2 convs on the last *backbone* map C5, not on P5, and no ReLU
    before P7, as the published RetinaNet configs do (:class:`P6P7FromC5`).
    """
    kwargs = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
    body = build_backbone(variant, overrides, out_indices=tuple(stages), **kwargs)
    if extra == "maxpool":
        extra_blocks: ExtraFPNBlock = LastLevelMaxPool()
    elif extra == "p6p7":
        extra_blocks = P6P7FromC5(body.out_channels[-1], out_channels)
    else:
        raise ValueError(f"extra must be 'maxpool' or 'p6p7', got {extra!r}")
    return RAVLTWithFPN(body, out_channels, extra_blocks)
