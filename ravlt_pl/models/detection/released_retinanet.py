"""The authors' released RetinaNet (mmdet 2.11 ``RetinaNet`` + ``FPN`` + ``RetinaHead``) → :class:`RAVLTRetinaNet`.

Key mapping (the conventions already agree: the head's channel ``a·K + c`` for anchor a, class c, and
``4a + j`` for the deltas, anchors ratio-major in both, no background class):

=====================================  ================================================
authors'                               ours
=====================================  ================================================
``backbone.*``                         ``backbone.body.*`` (``RoPE`` → ``rope``)
``neck.lateral_convs.{i}.conv``        ``backbone.fpn.inner_blocks.{i}.0``
``neck.fpn_convs.{i}.conv``, i < 3     ``backbone.fpn.layer_blocks.{i}.0``
``neck.fpn_convs.3`` / ``.4``          ``backbone.fpn.extra_blocks.p6`` / ``.p7``
``bbox_head.cls_convs.{i}.conv``       ``head.classification_head.conv.{i}.0``
``bbox_head.reg_convs.{i}.conv``       ``head.regression_head.conv.{i}.0``
``bbox_head.retina_cls`` / ``_reg``    ``head.classification_head.cls_logits`` / ``head.regression_head.bbox_reg``
=====================================  ================================================

``backbone.extra_norms.0`` (the norm of stage 1's output) is in every released file but unused by
the authors' model too: their FPN starts at stage 2 (``start_level=1``), so our backbone has no such norm.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..checkpoint import CheckpointError
from ..released_base import ReleasedFamily, backbone_tensors, infer_backbone
from ..variants import variant_of
from .retinanet import RAVLTRetinaNet

NECK_AND_HEAD = [
    (r"neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
    (r"neck\.fpn_convs\.([0-2])\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
    (r"neck\.fpn_convs\.3\.conv\.", "backbone.fpn.extra_blocks.p6."),
    (r"neck\.fpn_convs\.4\.conv\.", "backbone.fpn.extra_blocks.p7."),
    (r"bbox_head\.cls_convs\.(\d+)\.conv\.", r"head.classification_head.conv.\1.0."),
    (r"bbox_head\.reg_convs\.(\d+)\.conv\.", r"head.regression_head.conv.\1.0."),
    (r"bbox_head\.retina_cls\.", "head.classification_head.cls_logits."),
    (r"bbox_head\.retina_reg\.", "head.regression_head.bbox_reg."),
]
#: the backbone tensors the authors' model holds and never uses (see the module doc)
UNUSED_BACKBONE = re.compile(r"extra_norms\.0\.")


def matches(state: Mapping[str, torch.Tensor]) -> bool:
    return "bbox_head.retina_cls.weight" in state


def head_sizes(state: Mapping[str, torch.Tensor]) -> dict:
    """FPN width, tower width and depth, anchors per location and class count from the head's shapes."""
    cls = state["bbox_head.retina_cls.weight"]  # (A·K, feat, 3, 3)
    reg = state["bbox_head.retina_reg.weight"]  # (A·4, feat, 3, 3)
    stacked = len({k.split(".")[2] for k in state if k.startswith("bbox_head.cls_convs.")})
    num_anchors = reg.shape[0] // 4
    if num_anchors != 9:
        raise CheckpointError(f"bbox_head.retina_reg.weight has {reg.shape[0]} outputs: expected 9 anchors × 4")
    return dict(
        fpn_channels=state["neck.fpn_convs.0.conv.weight"].shape[0], feat_channels=cls.shape[1],
        stacked_convs=stacked, num_classes=cls.shape[0] // num_anchors,
    )  # fmt: skip


def build(state: Mapping[str, torch.Tensor]) -> RAVLTRetinaNet:
    """Our RetinaNet with the backbone, FPN, head widths and class count the tensors imply."""
    backbone = infer_backbone(state)
    backbone.pop("out_indices")  # the detector picks its stages (C3–C5)
    # another shape than a published variant: every size comes from the overrides
    variant = variant_of(backbone["embed_dims"], backbone["depths"]) or "ravlt_t"
    sizes = head_sizes(state)
    return RAVLTRetinaNet(sizes.pop("num_classes"), variant, backbone_overrides=backbone, **sizes)


def convert(state: Mapping[str, torch.Tensor], model: RAVLTRetinaNet) -> dict[str, torch.Tensor]:
    """The authors' tensors under our names; a key that maps nowhere is an error naming it."""
    converted = {f"backbone.body.{k}": v for k, v in backbone_tensors(state).items() if not UNUSED_BACKBONE.match(k)}
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        for pattern, target in NECK_AND_HEAD:
            if re.match(pattern, key):
                converted[re.sub(pattern, target, key)] = value
                break
        else:
            raise CheckpointError(f"{key} (shape {tuple(value.shape)}) is not part of the authors' RetinaNet")
    return converted


retinanet = ReleasedFamily("retinanet", matches, build, convert)
FAMILIES = (retinanet,)
