"""What every released-model family shares: :class:`ReleasedFamily`, the backbone read from the keys, the strict load.

The authors' mmdet 2.11 / mmseg 0.13 checkpoints hold ``{"state_dict": {...}}`` under their key names
(``backbone.*``, ``neck.*``, ``rpn_head.*``, ``roi_head.*``, ``bbox_head.*``, ``decode_head.*``,
``auxiliary_head.*``). Each model family says how to recognise its keys, how to build our module with
the widths, head counts and class count the tensors imply, and how to rename / convert the tensors
(background class last → first, layouts, ...). Loading is strict: every checkpoint tensor must land
on a tensor of our module with the same shape, and every tensor of our module must be given.

The families live beside their modules (``models/detection/released_*.py``,
``models/segmentation/released.py``) and import this module; :mod:`ravlt_pl.models.released` lists them
and loads a file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, checkpoint_filter_fn, read_checkpoint, variant_hint


@dataclass(frozen=True)
class ReleasedFamily:
    """One model family of the authors' release.

    ``matches(state)`` says whether an authors'-format state dict is of this family; ``build(state)``
    returns our module built with the sizes the tensors imply; ``convert(state, model)`` returns the
    tensors under our module's names (with every convention converted), ready for a strict load.
    """

    name: str
    matches: Callable[[Mapping[str, torch.Tensor]], bool]
    build: Callable[[Mapping[str, torch.Tensor]], nn.Module]
    convert: Callable[[Mapping[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


def infer_backbone(state: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> dict:
    """RAVLT constructor arguments implied by the authors' backbone tensors under ``prefix``.

    Widths from the blocks' norms, depths from the block count, head counts from the RoPE ``angle``
    buffer (it holds head_dim / 2 frequencies), MLP ratio from ``fc1``, layer scale from ``gamma_1``,
    the dense outputs from ``extra_norms``. Every released model uses linear attention in stages 1–2 and
    softmax attention in stages 3–4 (the two have the same tensors, so the keys cannot tell them apart).
    """
    stages = sorted({int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.blocks\.", k))})
    if stages != [0, 1, 2, 3]:
        raise CheckpointError(f"no RAVLT backbone under {prefix!r}: found stages {stages}, expected 0..3")
    embed_dims, depths, num_heads, mlp_ratios = [], [], [], []
    for i in stages:
        stage = f"{prefix}layers.{i}."
        dim = state[f"{stage}blocks.0.norm1.norm.weight"].shape[0]
        embed_dims.append(dim)
        depths.append(len({int(m[1]) for k in state if (m := re.match(re.escape(stage) + r"blocks\.(\d+)\.", k))}))
        angle = state.get(f"{stage}RoPE.angle", state.get(f"{stage}rope.angle"))
        if angle is None:
            raise CheckpointError(f"{stage}RoPE.angle is missing: the head width of stage {i} cannot be inferred")
        num_heads.append(dim // (2 * angle.shape[0]))
        mlp_ratios.append(state[f"{stage}blocks.0.ffn.fc1.weight"].shape[0] / dim)
    out_indices = sorted({int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"extra_norms\.(\d+)\.", k))})
    return dict(
        embed_dims=embed_dims, depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios,
        layerscales=f"{prefix}layers.0.blocks.0.gamma_1" in state,
        attention=["linear", "linear", "softmax", "softmax"],
        out_indices=tuple(out_indices) or None,
    )  # fmt: skip


def backbone_tensors(state: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """The backbone's tensors under our names (prefix removed, ``RoPE`` → ``rope``)."""
    return checkpoint_filter_fn({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def released_state(checkpoint: str | Path | Mapping) -> tuple[dict[str, torch.Tensor], str]:
    """The authors'-format state dict of a released file (``{"state_dict": ...}``) or of a plain dict."""
    raw, source = read_checkpoint(checkpoint)
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else raw
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{source}: holds no state dict")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{source}: entry {bad!r} is not a tensor; not an authors' mmdet/mmseg state dict")
    return dict(state), source


def load_converted(model: nn.Module, converted: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load of converted tensors: every key known with the same shape, every model tensor given."""
    own = model.state_dict()
    for key, value in converted.items():
        if key not in own:
            raise CheckpointError(
                f"{source}: {key} has no place in {type(model).__name__} (shape {tuple(value.shape)})"
            )
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} "
                f"in {type(model).__name__}; "
                f"{variant_hint(converted, own) or 'was it made for another variant or class count?'}"
            )
    missing = [k for k in own if k not in converted]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} tensors of {type(model).__name__} are not in the checkpoint, first {missing[0]} "
            f"(shape {tuple(own[missing[0]].shape)})"
        )
    model.load_state_dict(dict(converted), strict=True)
