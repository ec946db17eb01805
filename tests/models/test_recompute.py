"""Selective recomputation of training blocks (ravlt_pl/models/recompute.py): same numbers, less memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from ravlt_pl.models import RAVLT, recompute
from tests.conftest import TINY

CFG = {**TINY, "num_heads": [1, 2, 2, 4], "num_classes": 5, "drop_path_rate": 0.3}


def _pair() -> tuple[RAVLT, RAVLT]:
    """The same random model with selective recomputation on (the default) and off."""
    torch.manual_seed(0)
    on = RAVLT(**CFG)
    for p in on.parameters():
        p.data.normal_(0, 0.2)
    off = copy.deepcopy(on)
    off.set_selective_recompute(False)
    return on.train(), off.train()


def _grads(model: RAVLT, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same drop-path draws
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().sum().backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_recomputed_blocks_give_the_same_outputs_and_gradients(autocast):
    on, off = _pair()
    x = torch.randn(3, 3, 64, 48)
    out_on, grads_on = _grads(on, x, autocast)
    out_off, grads_off = _grads(off, x, autocast)
    torch.testing.assert_close(out_on, out_off, rtol=0, atol=0)  # the forward is the same computation
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_blocks_keep_exactly_the_qkvo_proj_fc1_and_fc2_outputs(monkeypatch):
    kept, policy_fn = [], recompute.keep_gemm_outputs

    def recording(ctx, op, *args, **kwargs):
        policy = policy_fn(ctx, op, *args, **kwargs)
        if policy == torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            kept.append(tuple(args[1].shape[:2]))  # (out, in) channels
        return policy

    monkeypatch.setattr(recompute, "keep_gemm_outputs", recording)
    on, _ = _pair()
    on(torch.randn(2, 3, 32, 32)).sum().backward()
    widths = [(c, 4 * c, int(CFG["mlp_ratios"] * c)) for c in CFG["embed_dims"]]
    assert kept == [shape for c, qkvo, hidden in widths for shape in ((qkvo, c), (c, c), (hidden, c), (c, hidden))]


def _held_after_forward(stage: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes allocated during the stage's forward and still held at its end (what backward will read)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = stage(x)
    held = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    del out
    return held


@pytest.mark.parametrize("stage", [0, 3], ids=["linear", "softmax"])
def test_recomputed_blocks_hold_under_half_the_activation_memory(stage):
    on, off = _pair()
    c = CFG["embed_dims"][stage]
    x = torch.randn(2, c, 24, 24, requires_grad=True).contiguous(memory_format=torch.channels_last)
    on.layers[stage](x), off.layers[stage](x)  # warm-up: the RoPE tables are cached, not activations
    held_on, held_off = _held_after_forward(on.layers[stage], x), _held_after_forward(off.layers[stage], x)
    assert held_on < 0.45 * held_off, (held_on, held_off)  # 10.5 maps of C channels instead of ~30


def test_not_used_without_autograd_or_when_switched_off():
    on, _ = _pair()
    x = torch.randn(1, 16, 8, 8, requires_grad=True)
    assert recompute.applies(x)
    with torch.no_grad():
        assert not recompute.applies(x)
    model = RAVLT(**TINY, selective_recompute=False, grad_checkpointing=True)
    assert all(not s.selective_recompute and s.grad_checkpointing for s in model.layers)
