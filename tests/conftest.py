"""Shared test helpers: fixture files (copied from the authors' code outputs) and tiny configs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

# Tiny models: one intra-op thread beats two fighting the data loader on a 2-core machine.
torch.set_num_threads(1)

# Small enough for CPU tests, every code path present (both attention types, layerscale on and off).
TINY = dict(
    embed_dims=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4], mlp_ratios=2.0,
    layerscales=True, layer_init_values=1.0, projection=64,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same RNG state (torch, numpy, python), whatever ran before it:
    augmentations and initialisations repeat, so a threshold that passes once passes in CI."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def official_cls() -> dict:
    return torch.load(FIXTURES / "official_ravlt_cls_tiny.pt", weights_only=False)


@pytest.fixture(scope="session")
def official_dense() -> dict:
    return torch.load(FIXTURES / "official_ravlt_dense_tiny.pt", weights_only=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="session")
def synthetic_cls(tmp_path_factory) -> Path:
    """A tiny ImageFolder set (5 shape classes, 32 px) shared by the classification tests."""
    from ravlt_pl.data.synthetic import make_classification

    return make_classification(
        tmp_path_factory.mktemp("cls") / "shapes", train_per_class=4, val_per_class=3, image_size=32
    )


def tiny_cli_args(config: str, root: Path, out: Path, *extra: str) -> list[str]:
    """``fit`` of a config shrunk to a tiny backbone, tiny batches and one step on CPU."""
    import json

    tiny = {k: v for k, v in TINY.items() if k not in ("layerscales", "layer_init_values")}
    return [
        "fit", "--config", config,
        "--model.init_args.backbone_overrides", json.dumps(tiny),
        "--data.init_args.root", str(root), "--data.init_args.global_batch_size", "null",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.num_nodes", "1", "--trainer.precision", "32-true", "--trainer.default_root_dir", str(out),
        *extra,
    ]  # fmt: skip
