"""Counting a network's arithmetic: one counter and one definition for ``summary`` and the benchmark.

The counter is ``torch.utils.flop_counter.FlopCounterMode`` (through :func:`ravlt_pl.models.fast.flop_counting`,
which also knows the fused oneDNN convolution): it counts matrix products, convolutions and attention
(``scaled_dot_product_attention`` included), not norms or element-wise ops, and it counts a multiply-add
as **2 FLOPs**. Papers, fvcore and mmcv's ``get_flops`` count multiply-adds and call them FLOPs; so every
figure we print beside a published one is multiply-adds, named ``gmacs`` (``summary`` also keeps the
paper's name ``gflops`` for the same number). Rates are real FLOPs: the benchmark's ``achieved_gflops``
is 2 × multiply-adds × images/s, comparable to the measured matmul peak.

RAVLT is counted on its plain path (``fast`` off): the fast kernels compute the same maths in another
order with fewer products (``docs/architecture.md``, "Reference path and fast paths").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .models.fast import flop_counting


def multiply_adds(model: nn.Module, forward: Callable[[], object]) -> int:
    """Multiply-adds of ``forward()`` (a call of ``model`` or of a part of it) in eval mode, without
    autograd, on ``model``'s plain path; ``model``'s training mode and fast-path switches are restored."""
    fast = {module: module.fast for module in model.modules() if hasattr(module, "fast")}
    training = model.training
    model.eval()
    try:
        for module in fast:
            module.fast = False
        counter = flop_counting(display=False)
        with torch.no_grad(), counter:
            forward()
    finally:
        for module, enabled in fast.items():
            module.fast = enabled
        model.train(training)
    return counter.get_total_flops() // 2
