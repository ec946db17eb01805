"""The authors' released Mask R-CNN and Cascade Mask R-CNN files → :class:`RAVLTMaskRCNN` / :class:`RAVLTCascadeMaskRCNN`
(and an mmdet Faster R-CNN file, the same keys without ``roi_head.mask_head``, → :class:`RAVLTFasterRCNN`).

Key names: mmdet 2.11 (``neck.lateral_convs.i.conv``, ``rpn_head.rpn_cls``, ``roi_head.bbox_head[.s].shared_fcs``,
``shared_convs.i.{conv,bn}``, ``fc_cls``, ``fc_reg``, ``roi_head.mask_head[.s].convs.i.conv``, ``upsample``,
``conv_logits``) → torchvision's. Conventions converted: the classifier's background row moves from last
(mmdet) to first (torchvision); the class-specific regression gets torchvision's background block (4·K → 4·(K+1),
zeros: never used); the mask logits get a background channel (K → K+1, zeros). Sizes — backbone, FPN width,
fc / conv widths, class count, stages — come from the shapes (:func:`build_mask_rcnn`, :func:`build_cascade`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError
from ..released_base import ReleasedFamily, backbone_tensors, infer_backbone
from ..variants import VARIANTS

_NECK_RPN = (
    (r"neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
    (r"neck\.fpn_convs\.(\d+)\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
    (r"rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
)


def _mask_head(src: str, dst: str, conv_group: int = 1) -> tuple[tuple[str, str], ...]:
    return (
        (src + r"convs\.(\d+)\.conv\.", dst + f"mask_head.\\{conv_group}.0."),
        (src + r"upsample\.", dst + "mask_predictor.conv5_mask."),
        (src + r"conv_logits\.", dst + "mask_predictor.mask_fcn_logits."),
    )


def _box_outputs(src: str, dst: str) -> tuple[tuple[str, str], ...]:
    return (
        (src + r"fc_cls\.", dst + "box_predictor.cls_score."),
        (src + r"fc_reg\.", dst + "box_predictor.bbox_pred."),
    )


MASK_RCNN_KEYS = (
    *_NECK_RPN,
    (r"roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc6."),
    (r"roi_head\.bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc7."),
    *_box_outputs(r"roi_head\.bbox_head\.", "roi_heads."),
    *_mask_head(r"roi_head\.mask_head\.", "roi_heads."),
)
# torchvision's FastRCNNConvFCHead: convs 0..3 (conv, BN), Flatten (4), Linear (5): the fc's index is filled in
CASCADE_KEYS = (
    *_NECK_RPN,
    (r"roi_head\.bbox_head\.(\d+)\.shared_convs\.(\d+)\.conv\.", r"roi_heads.stages.\1.box_head.\2.0."),
    (r"roi_head\.bbox_head\.(\d+)\.shared_convs\.(\d+)\.bn\.", r"roi_heads.stages.\1.box_head.\2.1."),
    (r"roi_head\.bbox_head\.(\d+)\.shared_fcs\.0\.", r"roi_heads.stages.\1.box_head.{fc}."),
    *_box_outputs(r"roi_head\.bbox_head\.(\d+)\.", r"roi_heads.stages.\1."),
    *_mask_head(r"roi_head\.mask_head\.(\d+)\.", r"roi_heads.stages.\1.", conv_group=2),
)


def _background_first(key: str, value: Tensor) -> Tensor:
    """mmdet's class layouts → torchvision's: classifier background last → first; regression and mask
    outputs without background → with a zero background block in front."""
    if "box_predictor.cls_score." in key:
        return torch.cat([value[-1:], value[:-1]])
    if "box_predictor.bbox_pred." in key and value.shape[0] > 4:
        return torch.cat([value.new_zeros(4, *value.shape[1:]), value])
    if "mask_fcn_logits." in key:
        return torch.cat([value.new_zeros(1, *value.shape[1:]), value])
    return value


def _convert(rules: tuple[tuple[str, str], ...], state: Mapping[str, Tensor], model: nn.Module, **fill) -> dict:
    out = {f"backbone.body.{k}": v for k, v in backbone_tensors(state).items()}
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        for pattern, target in rules:
            if re.match(pattern, key):
                ours = re.sub("^" + pattern, target, key).format(**fill)
                out[ours] = _background_first(ours, value)
                break
        else:
            raise CheckpointError(f"{key} (shape {tuple(value.shape)}) has no place in {type(model).__name__}")
    return out


def _backbone(state: Mapping[str, Tensor]) -> tuple[str, dict]:
    """The published variant with these widths and depths (else ravlt_t) and the inferred constructor arguments."""
    inferred = {k: v for k, v in infer_backbone(state).items() if k != "out_indices"}
    variant = next((name for name, v in VARIANTS.items()
                    if v["embed_dims"] == inferred["embed_dims"] and v["depths"] == inferred["depths"]), "ravlt_t")  # fmt: skip
    return variant, inferred


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    return len({m[1] for k in state if (m := re.match(pattern, k))})


def _has_masks(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("roi_head.mask_head.") for k in state)


def build_mask_rcnn(state: Mapping[str, Tensor]) -> nn.Module:
    """:class:`RAVLTMaskRCNN`, or :class:`RAVLTFasterRCNN` for a file without a mask head (mmdet's Faster R-CNN)."""
    from .detectors import RAVLTFasterRCNN, RAVLTMaskRCNN

    variant, backbone = _backbone(state)
    sizes = dict(
        fpn_channels=state["neck.lateral_convs.0.conv.weight"].shape[0],
        representation_size=state["roi_head.bbox_head.shared_fcs.0.weight"].shape[0],
    )
    num_classes = state["roi_head.bbox_head.fc_cls.weight"].shape[0] - 1
    if not _has_masks(state):
        return RAVLTFasterRCNN(num_classes, variant, backbone, **sizes)
    mask_channels = state["roi_head.mask_head.convs.0.conv.weight"].shape[0]
    return RAVLTMaskRCNN(num_classes, variant, backbone, **sizes, mask_channels=mask_channels)


def build_cascade(state: Mapping[str, Tensor]) -> nn.Module:
    from .detectors import RAVLTCascadeMaskRCNN

    variant, backbone = _backbone(state)
    return RAVLTCascadeMaskRCNN(
        state["roi_head.bbox_head.0.fc_cls.weight"].shape[0] - 1, variant, backbone,
        fpn_channels=state["neck.lateral_convs.0.conv.weight"].shape[0],
        representation_size=state["roi_head.bbox_head.0.shared_fcs.0.weight"].shape[0],
        mask_channels=state["roi_head.mask_head.0.convs.0.conv.weight"].shape[0],
        box_conv_channels=state["roi_head.bbox_head.0.shared_convs.0.conv.weight"].shape[0],
        num_stages=_count(state, r"roi_head\.bbox_head\.(\d+)\."),
    )  # fmt: skip


def convert_mask_rcnn(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    return _convert(MASK_RCNN_KEYS, state, model)


def convert_cascade(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    num_convs = _count(state, r"roi_head\.bbox_head\.0\.shared_convs\.(\d+)\.")
    return _convert(CASCADE_KEYS, state, model, fc=num_convs + 1)


mask_rcnn = ReleasedFamily(
    "mask_rcnn", lambda state: "roi_head.bbox_head.fc_cls.weight" in state and _has_masks(state), build_mask_rcnn,
    convert_mask_rcnn,
)  # fmt: skip
faster_rcnn = ReleasedFamily(
    "faster_rcnn", lambda state: "roi_head.bbox_head.fc_cls.weight" in state and not _has_masks(state),
    build_mask_rcnn, convert_mask_rcnn,
)  # fmt: skip
cascade_mask_rcnn = ReleasedFamily(
    "cascade_mask_rcnn", lambda state: "roi_head.bbox_head.0.fc_cls.weight" in state, build_cascade, convert_cascade
)
FAMILIES = (mask_rcnn, faster_rcnn, cascade_mask_rcnn)
