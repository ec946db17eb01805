"""The backbone reproduces the authors' code and the published sizes."""

import json

import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import apply_rot_embed, rot

import ravlt_pl  # noqa: F401  (registers ravlt_* with timm)
from ravlt_pl.benchmark.authors_reference import ReferenceRAVLT
from ravlt_pl.models import RAVLT, RotaryTable, load_official
from tests.conftest import FIXTURES, TINY, rel_err


def test_classifier_reproduces_official_logits(official_cls):
    model = RAVLT(**official_cls["config"]).eval()
    load_official(model, official_cls["state_dict"])
    with torch.no_grad():
        logits = model(official_cls["input"])
    assert logits.shape == official_cls["logits"].shape
    assert rel_err(logits, official_cls["logits"]) < 1e-5


def test_dense_backbone_reproduces_official_features(official_dense):
    model = RAVLT(**official_dense["config"], out_indices=(0, 1, 2, 3)).eval()
    load_official(model, official_dense["state_dict"])
    with torch.no_grad():
        features = model(official_dense["input"])
    assert len(features) == 4
    for i, (ours, ref) in enumerate(zip(features, official_dense["features"])):
        assert ours.shape == ref.shape, f"stage {i}"
        assert rel_err(ours, ref) < 1e-5, f"stage {i}"


@pytest.mark.parametrize(
    "overrides, size",
    [
        (dict(), (67, 45)),
        (dict(attention=["linear"] * 4), (96, 64)),
        (dict(mlp_ratios=[2.0, 3.0, 4.0, 1.5], depths=[2, 1, 2, 1]), (64, 96)),
        (dict(embed_dims=[24, 48, 72, 96], num_heads=[2, 4, 6, 8], layerscales=[False, True, False, True]), (33, 129)),
    ],
)
def test_matches_plain_reference_for_other_shapes(overrides, size):
    """The plain implementation in ravlt_pl/benchmark/ is a second oracle for configurations beyond the fixtures."""
    cfg = {**TINY, "num_classes": 7, **overrides}
    torch.manual_seed(0)
    ours = RAVLT(**cfg).eval()
    for p in ours.parameters():  # random everything so every part counts
        p.data.normal_(0, 0.2)
    ref = ReferenceRAVLT(**cfg).eval()
    state = {k.replace(".rope.", ".RoPE."): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(state)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-5


def test_rope_angle_formula_on_fresh_model():
    table = RotaryTable(head_dim=16)
    expected = (1.0 / 10000 ** torch.linspace(0, 1, 4)).repeat_interleave(2)
    torch.testing.assert_close(table.angle, expected)
    sin, cos = table(3, 5)[:2]
    assert sin.shape == cos.shape == (15, 16)
    # row-major tokens: token (h=2, w=4) is index 14; first half encodes h, second half w.
    torch.testing.assert_close(sin[14, :8], torch.sin(2 * expected))
    torch.testing.assert_close(cos[14, 8:], torch.cos(4 * expected))


def test_rope_tables_are_cached_per_size_and_reset_by_loading():
    table = RotaryTable(head_dim=8)
    first = table(4, 4)
    assert table(4, 4).sin is first.sin
    assert table(4, 6)[0] is not first[0]
    table.load_state_dict({"angle": torch.ones(4)})
    torch.testing.assert_close(table(4, 4)[0][5], torch.sin(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])))


def test_timms_rotation_pairs_channels_as_ravlt_does():
    """RAVLT rotates channel pairs (2i, 2i+1): timm's ``rot`` / ``apply_rot_embed`` (non-``half``) are that."""
    assert rot(torch.arange(4.0)).tolist() == [-1.0, 0.0, -3.0, 2.0]
    x, sin, cos = torch.randn(3, 6), torch.randn(3, 6), torch.randn(3, 6)
    torch.testing.assert_close(apply_rot_embed(x, sin, cos), x * cos + rot(x) * sin)


@pytest.mark.parametrize(
    "variant, millions", [("ravlt_t", 14.90), ("ravlt_s", 25.59), ("ravlt_b", 48.24), ("ravlt_l", 95.24)]
)
def test_published_parameter_counts_and_key_set(variant, millions):
    with torch.device("meta"):
        model = timm.create_model(variant, num_classes=1000)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions
    expected = json.loads((FIXTURES / "official_ravlt_state_dict_keys.json").read_text())[variant.upper()]
    ours = {k.replace(".rope.", ".RoPE."): list(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected


def test_timm_features_only():
    model = timm.create_model("ravlt_t", features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.channels() == [128, 512]
    assert model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 128, 8, 12), (1, 512, 2, 3)]


def test_timm_classifier_conveniences():
    model = timm.create_model("ravlt_t", num_classes=5)
    assert model.pretrained_cfg["crop_pct"] == 0.875 and model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert model.no_weight_decay() == set()  # timm's 1-D rule alone: the layer-scale gammas decay
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1024)


def test_drop_path_rates_rise_over_all_blocks_as_the_authors_linspace():
    """timm's ``calculate_drop_path_rates``: the authors' ``torch.linspace(0, rate, sum(depths))``, within
    float32 rounding of the former ``rate * j / (blocks - 1)``."""
    model = RAVLT(**{**TINY, "drop_path_rate": 0.3})
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for stage in model.layers for b in stage.blocks]
    blocks = sum(TINY["depths"])
    assert rates == [x.item() for x in torch.linspace(0, 0.3, blocks)]
    assert rates == pytest.approx([0.3 * j / (blocks - 1) for j in range(blocks)], abs=1e-7)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = RAVLT(**TINY, num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_dense_form_freezes_batchnorm_in_train_mode():
    model = RAVLT(**TINY, out_indices=(0, 1, 2, 3)).train()
    stats = model.patch_embed.proj[1].running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(model.patch_embed.proj[1].running_mean, stats)
    assert not hasattr(model, "head") and model.out_channels == TINY["embed_dims"]


def test_rejects_bad_per_stage_lists():
    with pytest.raises(ValueError, match="mlp_ratios"):
        RAVLT(**{**TINY, "mlp_ratios": [1.0, 2.0]})
    with pytest.raises(ValueError, match="attention"):
        RAVLT(**TINY, attention=["linear", "linear", "linear", "flash"])


def test_tables_built_under_inference_mode_serve_training_later():
    """validate/test run under inference_mode; the RoPE caches they fill must not poison training."""
    model = RAVLT(**TINY, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)  # the cached tables, outside inference_mode
    model(x).sum().backward()  # reused with autograd on
    assert model.layers[0].blocks[0].attn.qkvo.weight.grad is not None


def test_a_new_attention_type_is_one_class_and_one_registry_entry(monkeypatch):
    from ravlt_pl.models.attention import ATTENTION_TYPES, RankAugmentedLinearAttention

    class PlainLinearAttention(RankAugmentedLinearAttention):
        def __init__(self, dim: int, num_heads: int) -> None:
            super().__init__(dim, num_heads, reweight_keys=False, gate=False)

    monkeypatch.setitem(ATTENTION_TYPES, "plain_linear", PlainLinearAttention)
    model = RAVLT(**TINY, attention=["plain_linear", "linear", "softmax", "softmax"]).eval()
    assert type(model.layers[0].blocks[0].attn) is PlainLinearAttention
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
