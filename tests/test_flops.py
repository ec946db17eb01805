"""One FLOP counter: multiply-adds on the plain path, the model's switches left as they were."""

import timm
import torch
from torch import nn

from ravlt_pl.benchmark.authors_reference import ReferenceRAVLT
from ravlt_pl.flops import multiply_adds
from ravlt_pl.models import RAVLT
from tests.conftest import TINY


def test_a_convolution_is_its_multiply_adds():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(1, 3, 16, 16)
    assert multiply_adds(conv, lambda: conv(x)) == 8 * 16 * 16 * 3 * 3 * 3


def test_ravlt_is_counted_on_its_plain_path_and_its_switches_are_restored():
    model = RAVLT(**TINY, num_classes=10).train()
    model.layers[0].blocks[0].attn.fast = True
    switches = [m.fast for m in model.modules() if hasattr(m, "fast")]
    x = torch.randn(1, 3, 64, 64)
    counted = multiply_adds(model, lambda: model(x))
    assert model.training and [m.fast for m in model.modules() if hasattr(m, "fast")] == switches
    reference = ReferenceRAVLT(**TINY, num_classes=10)
    assert counted == multiply_adds(reference, lambda: reference(x))  # the authors' arithmetic, same products


def test_sdpa_attention_is_counted():
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10)
    x = torch.randn(1, 3, 224, 224)
    fused = multiply_adds(model, lambda: model(x))
    for block in model.blocks:
        block.attn.fused_attn = False  # explicit q kᵀ and softmax · v
    assert fused == multiply_adds(model, lambda: model(x))


def test_the_cpu_sdpa_kernel_is_counted_forward_and_backward():
    from torch.nn.functional import scaled_dot_product_attention

    from ravlt_pl.models.fast import flop_counting

    q, k, v = (torch.randn(2, 3, 50, 16, requires_grad=True) for _ in range(3))
    with flop_counting(display=False) as counter:
        scaled_dot_product_attention(q, k, v).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["aten._scaled_dot_product_flash_attention_for_cpu"] == 2 * 2 * 3 * 50 * 50 * 16 * 2
    assert counts["aten._scaled_dot_product_flash_attention_for_cpu_backward"] > 0
