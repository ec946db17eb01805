"""The GPU check (``make gpu-check`` runs ``-m cuda``): each test runs on CPU in the normal suite too.

Every test is parametrised by device: the ``cpu`` case runs with the rest of the suite, so what the
``cuda`` case imports and calls is exercised everywhere; the ``cuda`` case is marked ``cuda`` and
skips where no CUDA device exists.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from ravlt_pl.cli import main
from ravlt_pl.data.synthetic import make_detection, make_segmentation
from ravlt_pl.models import RAVLT
from ravlt_pl.models.attention import SoftmaxAttention
from ravlt_pl.tasks.base import build_optimizer
from tests.conftest import TINY, rel_err, tiny_cli_args
from tests.tasks.test_detection import small_detector_args
from tests.tasks.test_segmentation import cli_args as seg_cli_args

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]
CFG = {**TINY, "num_heads": [1, 2, 2, 4], "num_classes": 5}


def _fast_and_reference(device: str) -> tuple[RAVLT, RAVLT]:
    torch.manual_seed(0)
    fast = RAVLT(**CFG)
    for p in fast.parameters():
        p.data.normal_(0, 0.2)
    reference = copy.deepcopy(fast)
    reference.set_fast_path(False)
    return fast.to(device).train(), reference.to(device).train()


@pytest.mark.parametrize("precision", ["float32", "bf16-autocast"])
@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_matches_the_reference_forward_and_gradients(device, precision):
    fast, reference = _fast_and_reference(device)
    x = torch.randn(2, 3, 64, 48, device=device)
    outs, grads = [], []
    for model in (fast, reference):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision != "float32"):
            out = model(x)
        out.float().square().sum().backward()
        outs.append(out.float())
        grads.append([p.grad.float() for p in model.parameters()])
    # float32 on CUDA: cuDNN convolutions may use TF32 (torch's default), as training does
    tol = {("cpu", "float32"): 1e-5, ("cuda", "float32"): 5e-3}.get((device, precision), 3e-2)
    assert rel_err(*outs) < tol
    floor = 1e-6 * max(g.norm() for g in grads[1])  # biases before train-mode BN get ~0
    for (name, _), g, h in zip(fast.named_parameters(), *grads):
        assert (g - h).norm() <= 10 * tol * h.norm() + floor, name


@pytest.mark.parametrize("device", DEVICES)
def test_adamw_is_fused_on_cuda_and_steps(device):
    model = RAVLT(**CFG).to(device)
    optimizer = build_optimizer(partial(torch.optim.AdamW, lr=1e-3), model, (), torch.device(device))
    assert bool(optimizer.defaults.get("fused")) == (device == "cuda")
    model(torch.randn(2, 3, 32, 32, device=device)).sum().backward()
    before = model.head.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.head.weight, before)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_maps_and_parameters_are_channels_last_on_the_device(device):
    model = RAVLT(**TINY, out_indices=(0, 1, 2, 3)).to(device)
    maps = model(torch.randn(2, 3, 64, 64, device=device))
    assert all(m.is_contiguous(memory_format=torch.channels_last) for m in maps)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_attention_takes_the_flash_sdpa_kernel(device):
    attn = SoftmaxAttention(64, 4).to(device)  # head width 16
    x = torch.randn(2, 64, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    sin, cos = torch.zeros(64, 16, device=device), torch.ones(64, 16, device=device)
    with torch.profiler.profile() as prof, torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        attn(x, sin, cos)  # CUDA: SDPA in bf16; CPU: float32 (the CPU flash kernel)
    names = {e.key for e in prof.key_averages()}
    assert any("flash" in n for n in names), sorted(n for n in names if "attention" in n)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_backbone_matches_eager_and_trains(device):
    fast, _ = _fast_and_reference(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    torch._dynamo.reset()
    eager = fast(x)
    compiled = torch.compile(fast, backend="inductor" if device == "cuda" else "aot_eager", fullgraph=True)
    out = compiled(x)
    assert rel_err(out, eager) < (5e-3 if device == "cuda" else 1e-5)
    out.square().sum().backward()
    assert all(p.grad is not None for p in fast.parameters())
    torch._dynamo.reset()


def _on_device_bf16(device: str) -> list[str]:
    return ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu", "--trainer.precision", "bf16-mixed",
            "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false",
            "--model.init_args.ema_decay", "0.9"]  # fmt: skip


@pytest.mark.parametrize("task", ["cls", "det", "seg"])
@pytest.mark.parametrize("device", DEVICES)
def test_one_bf16_mixed_training_step_of_each_demo_task_with_ema_on_the_device(device, task, tmp_path, synthetic_cls):
    if task == "cls":
        args = tiny_cli_args("demo/cls.yaml", synthetic_cls, tmp_path)
    elif task == "det":
        root = make_detection(tmp_path / "coco", num_train=4, num_val=2, image_size=(80, 64))
        args = ["fit", "--config", "demo/det.yaml", *small_detector_args(rcnn=True), "--data.init_args.root", str(root),
                "--data.init_args.num_classes", "5", "--data.init_args.scale", "[96, 64]",
                "--data.init_args.global_batch_size", "null", "--data.init_args.batch_size", "2",
                "--data.init_args.num_workers", "0", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    else:
        root = make_segmentation(tmp_path / "ade", num_train=4, num_val=2, image_size=(64, 48))
        args = ["fit", *seg_cli_args("configs/demo/seg.yaml", root, tmp_path)]
    cli = main([*args, *_on_device_bf16(device)])
    assert cli.trainer.global_step == 1 and cli.trainer.precision == "bf16-mixed"
    ema = cli.model.ema
    assert {p.device.type for p in ema.module.parameters()} == {device}
    assert all(torch.isfinite(p).all() for p in ema.module.parameters())
