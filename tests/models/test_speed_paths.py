"""The backbone's fast paths (``ravlt_pl.models.fast``) compute what the reference forwards compute.

Each speed trick (complex-number RoPE, the folded ``+ 1`` of the feature maps, identity folded into
depthwise kernels, one-``addcmul`` residuals, channels-last execution, ``torch.compile``, float32
attention under bf16 autocast) is checked against the straightforward form, and the whole model with
``fast`` on against the same model with it off (``set_fast_path(False)``) and against the plain
second oracle in ``ravlt_pl/benchmark/``; the fixture tests in ``test_ravlt.py`` check the whole
against the authors' outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.layers import apply_rot_embed as apply_rope  # the plain path's rotation
from torch.utils.flop_counter import FlopCounterMode

from ravlt_pl.benchmark.authors_reference import ReferenceRAVLT
from ravlt_pl.models import RAVLT, RotaryTable
from ravlt_pl.models.attention import SoftmaxAttention
from ravlt_pl.models.fast import (
    IdentityFoldedKernel,
    _mkldnn_conv_pointwise,
    conv_gelu,
    elu,
    flop_counting,
    residual,
    rotate,
    rotation_forms,
)
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
    table = RotaryTable(16)
    table.fast = True
    sin, cos, forms = table(5, 7)
    assert forms.table is not None and forms.table.is_complex()
    assert table(5, 7).forms is forms  # cached with the tables
    x = torch.randn(3, 35, 2, 16) if heads else torch.randn(3, 35, 16)
    s, c = (sin[:, None], cos[:, None]) if heads else (sin, cos)
    expected = apply_rope(x + 1.0 if plus_one else x, s, c)
    fast = rotate(x, forms, plus_one)  # complex multiplication
    real = rotate(x, forms._replace(table=None, table_of_ones=None), plus_one)  # the compile path
    torch.testing.assert_close(fast, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(real, expected, rtol=1e-6, atol=1e-6)
    odd = x[..., 1:15]  # odd strides: no complex view, the real form runs
    torch.testing.assert_close(rotate(odd, rotation_forms(sin[:, :14], cos[:, :14]), plus_one),
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
    if _mkldnn_conv_pointwise() is not None:  # the one-kernel path ran, with no separate GELU
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
    sin, cos = table(3, 3)[:2]
    forms = rotation_forms(sin, cos)
    assert forms.table is None
    x = torch.randn(2, 9, 8)
    torch.testing.assert_close(rotate(x, forms), apply_rope(x, sin, cos))


def test_identity_folded_into_depthwise_kernel_in_inference():
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
    conv_plus_identity = IdentityFoldedKernel()
    x = torch.randn(2, 6, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = x + conv(x)
        torch.testing.assert_close(conv_plus_identity(conv, x), plain)
        kernel = conv_plus_identity._kernel
        conv_plus_identity(conv, x)
        assert conv_plus_identity._kernel is kernel  # cached: oneDNN is slow with a new weight every call
        conv.weight.mul_(2.0)  # an in-place update (EMA, optimizer step) invalidates it
        torch.testing.assert_close(conv_plus_identity(conv, x), x + conv(x))
        assert conv_plus_identity._kernel is not kernel
    x.requires_grad_()
    (gx,) = torch.autograd.grad(conv_plus_identity(conv, x).square().sum(), x)  # training: the plain sum
    (expected,) = torch.autograd.grad((x + conv(x)).square().sum(), x)
    torch.testing.assert_close(gx, expected)


def test_residual_with_drop_path_matches_timm_drop_path():
    drop_path, gamma = DropPath(0.5), torch.rand(1, 16, 1, 1)
    x, branch = torch.randn(6, 16, 4, 4), torch.randn(6, 16, 4, 4)
    torch.manual_seed(3)
    ours = residual(x, branch, gamma, drop_path, training=True)
    torch.manual_seed(3)
    expected = x + drop_path(gamma * branch)
    torch.testing.assert_close(ours, expected)
    assert not torch.equal(ours, x + gamma * branch)  # some samples were dropped


@pytest.mark.parametrize("layerscale", [True, False])
def test_residual_without_autograd_sums_into_the_branch(layerscale):
    gamma = torch.rand(1, 16, 1, 1) if layerscale else None
    x, branch = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    expected = x + branch if gamma is None else x + gamma * branch
    with torch.no_grad():
        x_before, out = x.clone(), residual(x, branch.clone(), gamma, torch.nn.Identity(), training=False)
        torch.testing.assert_close(out, expected)
        assert torch.equal(x, x_before)  # the block input (the shortcut) is never written
        half = residual(
            x, branch.bfloat16(), gamma, torch.nn.Identity(), training=False
        )  # mixed dtypes: the promoting sum, as with autograd
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


# -- the fast switch: every path equal to the reference forwards -------------------------------------
BOTH_KINDS = {**TINY, "num_heads": [1, 2, 2, 4], "num_classes": 5}


def _fast_and_reference(cfg: dict = BOTH_KINDS) -> tuple[RAVLT, RAVLT]:
    fast, _ = _random_pair(cfg)
    reference = copy.deepcopy(fast)
    reference.set_fast_path(False)
    return fast, reference


def test_set_fast_path_reaches_every_switch_and_the_environment_sets_the_default(monkeypatch):
    model = RAVLT(**TINY)
    switches = [m for m in model.modules() if hasattr(m, "fast")]
    kinds = {type(m).__name__ for m in switches}
    assert {"Block", "RankAugmentedLinearAttention", "SoftmaxAttention", "ConvFFN", "RotaryTable"} <= kinds
    assert all(m.fast for m in switches)
    model.set_fast_path(False)
    assert not any(m.fast for m in switches)
    monkeypatch.setenv("RAVLT_FAST_PATH", "0")
    assert not any(m.fast for m in RAVLT(**TINY).modules() if hasattr(m, "fast"))


def test_fast_and_reference_paths_agree_in_inference():
    fast, reference = _fast_and_reference()
    x = torch.randn(2, 3, 64, 48)
    with torch.inference_mode():
        assert rel_err(fast.eval()(x), reference.eval()(x)) < 1e-5


def test_fast_and_reference_paths_agree_in_training():
    fast, reference = _fast_and_reference({**BOTH_KINDS, "drop_path_rate": 0.3})
    x = torch.randn(3, 3, 64, 48)
    outputs = []
    for model in (fast, reference):
        torch.manual_seed(1)  # the same drop-path draws
        out = model.train()(x)
        out.square().sum().backward()
        outputs.append(out)
    assert rel_err(*outputs) < 1e-5
    floor = 1e-6 * max(q.grad.norm() for q in reference.parameters())  # biases before train-mode BN get ~0
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-4 * q.grad.norm() + floor, name


def test_fast_and_reference_paths_agree_under_bf16_autocast():
    fast, reference = _fast_and_reference()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fast.eval()(x).float(), reference.eval()(x).float()
    assert rel_err(a, b) < 1e-2  # bf16 convolutions on both sides; the attention is float32 on both


def test_reference_path_compiles_without_graph_breaks():
    fast, reference = _fast_and_reference()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(reference.eval(), backend="eager", fullgraph=True)
        assert rel_err(compiled(x), fast.eval()(x)) < 1e-5
    torch._dynamo.reset()


def test_reference_path_exports_to_standard_aten_ops_only():
    """No custom ops, no private oneDNN ops: what an ONNX/ExecuTorch exporter needs."""
    _, reference = _fast_and_reference()
    x = torch.randn(1, 3, 64, 64)
    program = torch.export.export(reference.eval(), (x,))
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    targets = {n.target for graph in graphs for n in graph.nodes if n.op == "call_function"}
    namespaces = {getattr(t, "namespace", None) or t.__module__ for t in targets}
    assert namespaces <= {"aten", "_operator"}, namespaces
    with torch.no_grad():
        assert rel_err(program.module()(x), reference(x)) < 1e-5


def test_flop_counting_counts_the_fused_conv_like_a_conv():
    fast, reference = _fast_and_reference()
    x = torch.randn(1, 3, 64, 64)
    counts = {}
    for name, model, mode in (("reference", reference, FlopCounterMode), ("fast", fast, flop_counting)):
        counter = mode(display=False)
        with torch.no_grad(), counter:
            model.eval()(x)
        counts[name] = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert "mkldnn._convolution_pointwise" in counts["fast"] or _mkldnn_conv_pointwise() is None
    convolutions = {name: sum(n for op, n in c.items() if "convolution" in op) for name, c in counts.items()}
    assert convolutions["fast"] == convolutions["reference"]


def test_low_precision_sdpa_stays_close_to_float32(monkeypatch):
    """The softmax stages' SDPA in bf16 (what CUDA autocast runs) against float32 SDPA, on CPU.

    Measured here (random N(0, 0.2) weights, 96², batch 2): bf16 autocast with float32 attention is
    0.51% (relative L2 of the logits) from float32, with bf16 SDPA 0.37%; the two differ by 0.22%.
    At timm-style init (128², batch 4) 1.05% and 1.15%. The linear stages stay float32 (feature
    maps and normaliser); the gap is that of the bf16 convolutions, not of the attention.
    """
    fast, _ = _random_pair({**BOTH_KINDS, "embed_dims": [32, 64, 96, 128], "num_heads": [1, 2, 3, 4]})
    fast.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        exact = fast(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            float32_attention = fast(x).float()
            monkeypatch.setattr(SoftmaxAttention, "low_precision_devices", ("cpu",))
            low = fast(x).float()
    assert rel_err(low, float32_attention) < 0.01
    assert rel_err(low, exact) < 2 * rel_err(float32_attention, exact) + 0.005


def test_parameters_are_channels_last_and_so_are_their_gradients():
    model = RAVLT(**TINY, num_classes=3)
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad.stride() == p.stride() for p in model.parameters())  # DDP's check (no stride warnings)
    plain = {k: v.contiguous() for k, v in model.state_dict().items()}  # a checkpoint saved contiguous
    fresh = RAVLT(**TINY, num_classes=3)
    fresh.load_state_dict(plain)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fresh.parameters() if p.dim() == 4)
