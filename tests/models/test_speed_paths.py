"""The backbone's fast paths compute what the plain reference computes.

Each speed trick (complex-number RoPE, the folded ``+ 1`` of the feature maps, identity folded into
depthwise kernels, one-``addcmul`` residuals, channels-last execution, ``torch.compile``, float32
attention under bf16 autocast) is checked against the straightforward form; the fixture tests in
``test_ravlt.py`` check the whole against the authors' outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath

from ravlt_pl.benchmark.reference_ravlt import ReferenceRAVLT
from ravlt_pl.models import RAVLT, RotaryTable
from ravlt_pl.models.attention import _rope_forms, _rotate, apply_rope, elu
from ravlt_pl.models.ravlt import _MKLDNN_POINTWISE, Block, conv_gelu, conv_plus_identity
from tests.conftest import TINY, rel_err


def _random_pair(cfg: dict, seed: int = 0) -> tuple[RAVLT, ReferenceRAVLT]:
    """Ours and the plain reference with the same random weights (large enough that every part counts)."""
    torch.manual_seed(seed)
    ours = RAVLT(**cfg)
    for p in ours.parameters():
        p.data.normal_(0, 0.2)
    ref = ReferenceRAVLT(**{k: v for k, v in cfg.items() if k != "drop_path_rate"})
    ref.load_state_dict({k.replace(".rope.", ".RoPE."): v for k, v in ours.state_dict().items()})
    return ours, ref


@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("plus_one", [False, True])
def test_complex_and_real_rotations_match_the_stacked_form(heads, plus_one):
    sin, cos = RotaryTable(16)(5, 7)
    forms = _rope_forms(sin, cos)
    assert forms[0] is not None and forms[0].is_complex()
    assert _rope_forms(sin, cos) is forms  # cached by identity
    x = torch.randn(3, 35, 2, 16) if heads else torch.randn(3, 35, 16)
    s, c = (sin[:, None], cos[:, None]) if heads else (sin, cos)
    expected = apply_rope(x + 1.0 if plus_one else x, s, c)
    fast = _rotate(x, forms, plus_one)  # complex multiplication
    real = _rotate(x, (None, None, *forms[2:]), plus_one)  # the compile path
    torch.testing.assert_close(fast, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(real, expected, rtol=1e-6, atol=1e-6)
    odd = x[..., 1:15]  # odd strides: no complex view, the real form runs
    torch.testing.assert_close(_rotate(odd, _rope_forms(sin[:, :14], cos[:, :14]), plus_one),
                               apply_rope(odd + 1.0 if plus_one else odd, s[..., :14], c[..., :14]))  # fmt: skip


def test_exp_form_elu_matches_elu_in_value_and_gradient():
    x = torch.cat([torch.linspace(-30, 30, 6001), torch.tensor([0.0, -1e-8, 1e-8, 80.0, -80.0])])
    x = x[torch.randperm(x.numel())].reshape(-1, 7)[:, 1:6]  # a strided view, as the attention passes
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = elu(ours)
    assert torch.allclose(out, F.elu(theirs), rtol=2.5e-7, atol=2.5e-7)  # x + 1 - 1 rounds large x
    grad = torch.randn_like(out)
    out.backward(grad)
    F.elu(theirs).backward(grad)
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # inference: the same formula in one buffer, the input untouched
        before = x.clone()
        assert torch.allclose(elu(x), F.elu(x), rtol=2.5e-7, atol=2.5e-7) and torch.equal(x, before)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_conv_gelu_matches_conv_then_gelu(channels_last):
    torch.manual_seed(0)
    conv, act = torch.nn.Conv2d(16, 56, 1), torch.nn.GELU()
    x = torch.randn(2, 16, 9, 7) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = act(conv(x)).detach()
    with torch.inference_mode():
        fused = conv_gelu(conv, act, x)
        with torch.profiler.profile() as prof:
            conv_gelu(conv, act, x)
    assert torch.allclose(fused, expected, rtol=1e-5, atol=1e-5), (fused - expected).abs().max()
    if _MKLDNN_POINTWISE is not None:  # the one-kernel path ran, with no separate GELU
        names = {e.key for e in prof.key_averages()}
        assert "aten::gelu" not in names and any("convolution_pointwise" in n for n in names), names


def test_rope_cache_keeps_the_most_recent_sizes():
    table = RotaryTable(8)
    first = table(4, 4)[0]
    for size in range(5, 5 + table.max_cached):
        table(size, 3)
    assert len(table._cache) == table.max_cached and table(4, 4)[0] is not first  # evicted, rebuilt
    assert table(4, 4)[0] is table(4, 4)[0]


def test_unpaired_angles_fall_back_to_the_exact_real_rotation():
    table = RotaryTable(8)
    table.load_state_dict({"angle": torch.tensor([1.0, 2.0, 3.0, 4.0])})  # pairs differ: not a rotation
    sin, cos = table(3, 3)
    forms = _rope_forms(sin, cos)
    assert forms[0] is None
    x = torch.randn(2, 9, 8)
    torch.testing.assert_close(_rotate(x, forms), apply_rope(x, sin, cos))


def test_identity_folded_into_depthwise_kernel_in_inference():
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
    x = torch.randn(2, 6, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = x + conv(x)
        torch.testing.assert_close(conv_plus_identity(conv, x), plain)
        kernel = conv._folded_kernel[1]
        conv_plus_identity(conv, x)
        assert conv._folded_kernel[1] is kernel  # cached: oneDNN is slow with a new weight every call
        conv.weight.mul_(2.0)  # an in-place update (EMA, optimizer step) invalidates it
        torch.testing.assert_close(conv_plus_identity(conv, x), x + conv(x))
        assert conv._folded_kernel[1] is not kernel
    assert "_folded_kernel" not in conv.state_dict()
    x.requires_grad_()
    (gx,) = torch.autograd.grad(conv_plus_identity(conv, x).square().sum(), x)  # training: the plain sum
    (expected,) = torch.autograd.grad((x + conv(x)).square().sum(), x)
    torch.testing.assert_close(gx, expected)


def test_residual_with_drop_path_matches_timm_drop_path():
    block = Block(16, 2, 2.0, "linear", drop_path=0.5).train()
    x, branch = torch.randn(6, 16, 4, 4), torch.randn(6, 16, 4, 4)
    torch.manual_seed(3)
    ours = block._residual(x, branch, block.gamma_1)
    torch.manual_seed(3)
    expected = x + DropPath(0.5)(block.gamma_1 * branch)
    torch.testing.assert_close(ours, expected)
    assert not torch.equal(ours, x + block.gamma_1 * branch)  # some samples were dropped


@pytest.mark.parametrize("layerscale", [True, False])
def test_residual_without_autograd_sums_into_the_branch(layerscale):
    block = Block(16, 2, 2.0, "linear", layerscale=layerscale).eval()
    gamma = torch.rand(1, 16, 1, 1) if layerscale else None
    x, branch = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    expected = x + branch if gamma is None else x + gamma * branch
    with torch.no_grad():
        x_before, out = x.clone(), block._residual(x, branch.clone(), gamma)
        torch.testing.assert_close(out, expected)
        assert torch.equal(x, x_before)  # the block input (the shortcut) is never written
        half = block._residual(x, branch.bfloat16(), gamma)  # mixed dtypes: the promoting sum, as with autograd
        assert half.dtype == torch.float32


@pytest.mark.parametrize("attention", [["linear", "linear", "softmax", "softmax"], ["linear"] * 4])
def test_training_gradients_match_the_reference(attention):
    cfg = {**TINY, "num_heads": [1, 2, 2, 4], "num_classes": 5, "attention": attention}
    ours, ref = _random_pair(cfg)
    ours.train(), ref.train()
    x = torch.randn(2, 3, 64, 48)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    ref_grads = {name.replace(".RoPE.", ".rope."): p.grad for name, p in ref.named_parameters()}
    floor = 1e-6 * max(g.norm() for g in ref_grads.values())  # biases before train-mode BN get ~0
    for name, p in ours.named_parameters():
        g = ref_grads[name]
        assert (p.grad - g).norm() <= 1e-4 * g.norm() + floor, name


def test_channels_last_input_gives_the_same_numbers_and_layout():
    ours, ref = _random_pair({**TINY, "num_classes": 5})
    dense = RAVLT(**TINY, out_indices=(0, 1, 2, 3)).eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        expected = ref.eval()(x)
        assert rel_err(ours.eval()(x), expected) < 1e-5
        assert rel_err(ours(x.contiguous(memory_format=torch.channels_last)), expected) < 1e-5
        plain = dense(x)
        fast = dense(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a, b)
        assert a.is_contiguous(memory_format=torch.channels_last)  # maps come back channels-last


def test_bf16_autocast_keeps_attention_arithmetic_in_float32():
    ours, _ = _random_pair({**TINY, "num_classes": 5})
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = ours(x)
    seen: dict[str, set] = {"probe": set(), "qkvo": set()}
    for stage in ours.layers:
        for block in stage.blocks:
            block.attn.probe = lambda name, t: seen["probe"].add((type(t).__name__, t.dtype))
            block.attn.qkvo.register_forward_hook(lambda m, a, out: seen["qkvo"].add(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = ours(x)
    assert seen["qkvo"] == {torch.bfloat16}  # the convolutions run in bf16 ...
    assert {dtype for _, dtype in seen["probe"]} == {torch.float32}  # ... the attention in float32
    assert rel_err(low.float(), reference) < 0.1
    # a pure-bf16 model runs too (attention still in float32 inside)
    with torch.no_grad():
        assert torch.isfinite(ours.to(torch.bfloat16)(x.bfloat16())).all()


def test_compiles_without_graph_breaks_and_matches_eager():
    """``fullgraph=True`` raises at any graph break; ``aot_eager`` also traces the backward."""
    ours, _ = _random_pair({**TINY, "num_classes": 5})
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    ours.train()
    torch.manual_seed(0)
    eager = ours(x)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    out = compiled(x)
    assert rel_err(out, eager) < 1e-5
    out.square().sum().backward()
    assert all(p.grad is not None for p in ours.parameters())
    ours.eval()  # eval mode under no_grad: another graph (dynamo only), still no break
    with torch.no_grad():
        assert rel_err(torch.compile(ours, backend="eager", fullgraph=True)(x), ours(x)) < 1e-5
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_forward_matches_eager():
    ours, ref = _random_pair({**TINY, "num_classes": 5, "attention": ["linear", "linear", "linear", "softmax"]})
    ours.eval()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), ref.eval()(x)) < 1e-5
    torch._dynamo.reset()
