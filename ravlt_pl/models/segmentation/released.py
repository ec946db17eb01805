"""The authors' released Semantic FPN and UperNet segmentors (mmseg 0.13 ``state_dict``) → ours, every tensor.

The mmseg names differ from ours only in spelling: mmcv's ``ConvModule`` holds ``conv`` / ``bn``
where torchvision's ``Conv2dNormActivation`` holds ``0`` / ``1`` (SyncBN and BatchNorm have the same
tensors), ``conv_seg`` is our ``classifier.1`` (after the dropout), and mmdet's ``FPN`` neck is
torchvision's ``FeaturePyramidNetwork`` (``lateral_convs`` = ``inner_blocks``, ``fpn_convs`` =
``layer_blocks``). No tensor changes layout. Widths, class count and the backbone come from the shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..ravlt import RAVLT
from ..released_base import ReleasedFamily, backbone_tensors, infer_backbone
from ..variants import VARIANTS
from .semantic_fpn import SemanticFPN
from .upernet import UperNet

#: (authors' pattern, ours) for every non-backbone tensor, applied in order
RENAMES = (
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"neck.fpn.inner_blocks.\1.0."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", r"neck.fpn.layer_blocks.\1.0."),
    (r"\.conv_seg\.", ".classifier.1."),
    (r"\.conv\.", ".0."),
    (r"\.bn\.", ".1."),
)
#: UPerHead's pyramid-pooling grid sizes: pooling has no tensors, so the count is all a file shows
PUBLISHED_POOL_SCALES = {4: (1, 2, 3, 6)}


def variant_name(backbone: Mapping) -> str | None:
    """The published variant (``ravlt_t`` ...) with these widths, depths and head counts, if any."""
    for name, spec in VARIANTS.items():
        if all(list(spec[k]) == list(backbone[k]) for k in ("embed_dims", "depths", "num_heads")):
            return name
    return None


def released_backbone(state: Mapping[str, torch.Tensor]) -> RAVLT:
    """The dense RAVLT (maps at strides 4–32) the ``backbone.*`` tensors describe."""
    kwargs = infer_backbone(state)
    if kwargs["out_indices"] != (0, 1, 2, 3):
        raise CheckpointError(f"segmentor backbone has extra_norms {kwargs['out_indices']}, expected (0, 1, 2, 3)")
    return RAVLT(**kwargs)


def _shape(state: Mapping[str, torch.Tensor], key: str, dim: int = 0) -> int:
    if key not in state:
        raise CheckpointError(f"{key} is missing: the segmentor's widths cannot be inferred")
    return state[key].shape[dim]


def build_semantic_fpn(state: Mapping[str, torch.Tensor]) -> SemanticFPN:
    fpn_channels = _shape(state, "neck.lateral_convs.0.conv.weight")
    head_channels = _shape(state, "decode_head.scale_heads.0.0.conv.weight")
    num_classes = _shape(state, "decode_head.conv_seg.weight")
    return SemanticFPN(released_backbone(state), num_classes, fpn_channels, head_channels)


def build_upernet(state: Mapping[str, torch.Tensor]) -> UperNet:
    backbone = released_backbone(state)
    pools = len({m[1] for k in state if (m := re.match(r"decode_head\.psp_modules\.(\d+)\.", k))})
    if pools not in PUBLISHED_POOL_SCALES:
        raise CheckpointError(f"UPerHead has {pools} pyramid-pooling branches; only the published 4 are known")
    aux_in = _shape(state, "auxiliary_head.convs.0.conv.weight", 1)
    widths = backbone.out_channels
    if aux_in not in widths:
        raise CheckpointError(f"auxiliary_head reads {aux_in} channels, which no backbone stage has ({widths})")
    return UperNet(
        backbone,
        num_classes=_shape(state, "decode_head.conv_seg.weight"),
        head_channels=_shape(state, "decode_head.bottleneck.conv.weight"),
        pool_scales=PUBLISHED_POOL_SCALES[pools],
        aux_channels=_shape(state, "auxiliary_head.convs.0.conv.weight"),
        aux_index=len(widths) - 1 - widths[::-1].index(aux_in),  # the deepest stage of that width (mmseg: 2)
    )


def rename_head(key: str) -> str:
    for pattern, ours in RENAMES:
        key = re.sub(pattern, ours, key)
    return key


def convert(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor under our names: the backbone's (``RoPE`` → ``rope``), the neck's and the heads'."""
    converted = {f"backbone.{k}": v for k, v in backbone_tensors(state).items()}
    converted.update({rename_head(k): v for k, v in state.items() if not k.startswith("backbone.")})
    return converted


def _is_semantic_fpn(state: Mapping[str, torch.Tensor]) -> bool:
    return "decode_head.scale_heads.0.0.conv.weight" in state and "neck.lateral_convs.0.conv.weight" in state


def _is_upernet(state: Mapping[str, torch.Tensor]) -> bool:
    return "decode_head.psp_modules.0.1.conv.weight" in state and "decode_head.fpn_bottleneck.conv.weight" in state


semantic_fpn = ReleasedFamily("semantic_fpn", _is_semantic_fpn, build_semantic_fpn, convert)
upernet = ReleasedFamily("upernet", _is_upernet, build_upernet, convert)
FAMILIES = (semantic_fpn, upernet)
#: the segmentor class each family builds
SEGMENTOR_CLASS = {semantic_fpn.name: SemanticFPN, upernet.name: UperNet}
