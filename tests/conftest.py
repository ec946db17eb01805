"""Shared test helpers: fixture files (copied from the authors' code outputs) and tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

# Small enough for CPU tests, every code path present (both attention types, layerscale on and off).
TINY = dict(
    embed_dims=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4], mlp_ratios=2.0,
    layerscales=True, layer_init_values=1.0, projection=64,
)  # fmt: skip


@pytest.fixture(scope="session")
def official_cls() -> dict:
    return torch.load(FIXTURES / "official_ravlt_cls_tiny.pt", weights_only=False)


@pytest.fixture(scope="session")
def official_dense() -> dict:
    return torch.load(FIXTURES / "official_ravlt_dense_tiny.pt", weights_only=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
