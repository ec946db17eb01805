"""``python -m ravlt_pl summary --config X.yaml``: a config's parameters and GFLOPs beside the published figures."""

from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import PROG
from .lightning_cli import build_cli, lightning_quiet
from .published import published_for
from .tasks.base import BaseTask


def main(args: list[str]) -> dict:
    """Build the config's task (no data read) and count parameters and GFLOPs (multiply-adds).

    FLOPs come from ``torch.utils.flop_counter`` (matmuls, convolutions, attention; not norms or
    element-wise ops), halved to multiply-adds as papers report them.
    """
    with lightning_quiet():  # its seed, GPU/TPU and tip lines: the output is the JSON line alone
        cli = build_cli(args + ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                                "--trainer.num_nodes", "1"], run=False, prog=f"{PROG} summary")  # fmt: skip
    task: BaseTask = cli.model
    config = next((a for a in args if a.endswith((".yaml", ".yml"))), None)
    height, width = task.summary_input_size
    params = sum(p.numel() for p in task.model.parameters())
    task.eval()
    for module in task.modules():  # count the reference maths: the fused kernels are opaque to the counter
        if hasattr(module, "set_fast_path"):
            module.set_fast_path(False)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        task.flops_forward(torch.randn(1, 3, height, width))
    result = {
        "config": config,
        "model": type(task).__name__,
        "params_m": round(params / 1e6, 2),
        "gflops": round(counter.get_total_flops() / 2e9, 2),
        "input_size": [height, width],
        "published": published_for(config),
    }
    print(json.dumps(result))
    return result
