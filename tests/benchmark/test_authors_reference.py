"""The authors'-arithmetic reference RAVLT (ravlt_pl/benchmark/authors_reference.py) against the authors' outputs."""

from pathlib import Path

import pytest
import torch

from ravlt_pl.benchmark.authors_reference import ReferenceRAVLT, reference_ravlt_s, reference_ravlt_t

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _load(name):
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"missing fixture {path}")
    return torch.load(path, weights_only=False)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_reference_reproduces_official_logits():
    fx = _load("official_ravlt_cls_tiny.pt")
    model = ReferenceRAVLT(**fx["config"]).eval()
    model.load_state_dict(fx["state_dict"], strict=True)
    with torch.no_grad():
        logits = model(fx["input"])
    assert logits.shape == fx["logits"].shape
    assert _rel(logits, fx["logits"]) < 1e-5


def test_reference_reproduces_official_dense_features():
    fx = _load("official_ravlt_dense_tiny.pt")
    model = ReferenceRAVLT(**fx["config"], out_indices=[0, 1, 2, 3]).eval()
    model.load_state_dict(fx["state_dict"], strict=True)
    with torch.no_grad():
        feats = model(fx["input"])
    assert len(feats) == len(fx["features"]) == 4
    for got, want in zip(feats, fx["features"]):
        assert got.shape == want.shape
        assert _rel(got, want) < 1e-5


def test_reference_rope_angle_formula_on_fresh_model():
    model = ReferenceRAVLT(**_load("official_ravlt_cls_tiny.pt")["config"])
    angle = model.layers[0].RoPE.angle  # head_dim 32 -> 16 entries
    base = 1.0 / 10000 ** torch.linspace(0, 1, 8)
    torch.testing.assert_close(angle, base.repeat_interleave(2))


@pytest.mark.parametrize("builder, params_m", [(reference_ravlt_t, 14.90), (reference_ravlt_s, 25.59)])
def test_reference_variant_param_counts(builder, params_m):
    model = builder(num_classes=1000)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(n, 2) == params_m
