"""The benchmark's models by name: ours (``ravlt_t/s/b/l``), the authors' arithmetic (``*_reference``), any timm model.

All are built with random weights and 1000 classes; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch

from ..flops import multiply_adds
from ..models import RAVLT
from ..models.variants import variant_kwargs
from .authors_reference import reference_ravlt_s, reference_ravlt_t

DEFAULT_MODELS = [
    "ravlt_t", "ravlt_s", "ravlt_t_reference", "ravlt_s_reference",
    "convnext_tiny", "swin_tiny_patch4_window7_224", "deit_small_patch16_224", "resnet50",
]  # fmt: skip
REFERENCES = {"ravlt_t_reference": reference_ravlt_t, "ravlt_s_reference": reference_ravlt_s}


def build_model(name: str) -> torch.nn.Module:
    """A benchmark model by name (``ravlt_*`` are registered with timm by importing ``ravlt_pl``)."""
    if name in REFERENCES:
        return REFERENCES[name](num_classes=1000)
    return timm.create_model(name, pretrained=False, num_classes=1000)


def ravlt_t_with_attention(attention: Sequence[str]) -> RAVLT:
    """RAVLT-T with another per-stage attention layout (``--scaling``: published vs all-linear)."""
    return RAVLT(**variant_kwargs("ravlt_t", attention=list(attention)))


def image_multiply_adds(model: torch.nn.Module, resolution: int, device: torch.device) -> int:
    """Multiply-adds of one res×res image through ``model`` (:mod:`ravlt_pl.flops`'s definition)."""
    x = torch.randn(1, 3, resolution, resolution, device=device)
    return multiply_adds(model, lambda: model(x))
