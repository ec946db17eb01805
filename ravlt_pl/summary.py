"""``python -m ravlt_pl summary --config X.yaml``: a config's parameters and GFLOPs beside the published figures."""

from __future__ import annotations

import json

import torch

from .config import PROG
from .flops import multiply_adds
from .lightning_cli import build_cli, lightning_quiet
from .published import published_for
from .tasks.base import BaseTask


def main(args: list[str]) -> dict:
    """Build the config's task (no data read) and count parameters and multiply-adds.

    ``gmacs`` (and ``gflops``, the paper's name for the same number) are billions of multiply-adds of
    the task's inference forward, as :mod:`ravlt_pl.flops` defines them: comparable to the published figures.
    """
    with lightning_quiet():  # its seed, GPU/TPU and tip lines: the output is the JSON line alone
        cli = build_cli(args + ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                                "--trainer.num_nodes", "1"], run=False, prog=f"{PROG} summary")  # fmt: skip
    task: BaseTask = cli.model
    config = next((a for a in args if a.endswith((".yaml", ".yml"))), None)
    height, width = task.summary_input_size
    params = sum(p.numel() for p in task.model.parameters())
    images = torch.randn(1, 3, height, width)
    gmacs = round(multiply_adds(task, lambda: task.flops_forward(images)) / 1e9, 2)
    result = {
        "config": config,
        "model": type(task).__name__,
        "params_m": round(params / 1e6, 2),
        "gmacs": gmacs,
        "gflops": gmacs,
        "input_size": [height, width],
        "published": published_for(config),
    }
    print(json.dumps(result))
    return result
