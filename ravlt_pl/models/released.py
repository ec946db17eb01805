"""The authors' released detectors and segmentors, whole: :func:`from_released` (file or state dict → our module).

The authors' mmdet 2.11 / mmseg 0.13 checkpoints hold ``{"state_dict": {...}}`` under their key names
(``backbone.*``, ``neck.*``, ``rpn_head.*``, ``roi_head.*``, ``bbox_head.*``, ``decode_head.*``,
``auxiliary_head.*``). Each family (``models/detection/released_*.py``, ``models/segmentation/released.py``,
built on :mod:`~ravlt_pl.models.released_base`) says how to recognise its keys, build our module with the
sizes the tensors imply and convert the tensors; here the family is recognised and every tensor loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError
from .detection.released_rcnn import FAMILIES as RCNN_FAMILIES
from .detection.released_retinanet import FAMILIES as RETINANET_FAMILIES
from .released_base import ReleasedFamily, backbone_tensors, infer_backbone, load_converted, released_state
from .segmentation.released import FAMILIES as SEGMENTATION_FAMILIES

__all__ = [
    "FAMILIES", "ReleasedFamily", "backbone_tensors", "family_of", "from_released", "infer_backbone",
    "load_converted", "released_state",
]  # fmt: skip


#: Every family of the authors' release, in the order they are tried (keys decide; no two match the same file).
FAMILIES: tuple[ReleasedFamily, ...] = (*RCNN_FAMILIES, *RETINANET_FAMILIES, *SEGMENTATION_FAMILIES)


def family_of(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> ReleasedFamily:
    """The family whose keys ``state`` has; an error naming the file when none does."""
    for family in FAMILIES:
        if family.matches(state):
            return family
    heads = sorted({k.split(".")[0] for k in state})
    raise CheckpointError(
        f"{source}: not a released RAVLT detector or segmentor (top-level keys: {', '.join(heads)}); "
        "a backbone-only or classification file loads with load_official"
    )


def from_released(checkpoint: str | Path | Mapping) -> nn.Module:
    """Our detector or segmentor with every tensor of an authors' released file (path or state dict).

    The family, variant, widths, head counts and class count come from the keys and shapes. The module
    is returned in eval mode.
    """
    state, source = released_state(checkpoint)
    family = family_of(state, source)
    model = family.build(state)
    load_converted(model, family.convert(state, model), source)
    return model.eval()
