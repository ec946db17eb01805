"""Peak memory of one training step over the built model, measured in a process of its own.

On CPU the figure is the peak resident set size (``VmHWM``) during two training steps (forward,
cross-entropy, backward, AdamW; the first creates the gradients and AdamW states) minus the resident
size just before them, after building the model and its input: what the step adds over the model,
allocator slack included. Linux resets ``VmHWM`` through ``/proc/self/clear_refs``. On CUDA it is
``torch.cuda.max_memory_allocated`` over the same two steps minus what was allocated before.
One model per process, so one model's freed-but-kept memory does not lower the next one's figure.

    python -m ravlt_pl.benchmark.train_memory --model ravlt_s --resolution 224 --batch-size 16
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from .options import OptionParser
from .zoo import build_model

PROG = "python -m ravlt_pl.benchmark.train_memory"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def training_step_peak_mb(model: torch.nn.Module, resolution: int, batch_size: int, device: torch.device,
                          dtype: str = "float32", steps: int = 2) -> tuple[float, float, float]:  # fmt: skip
    """(MB a training step adds over the built model (see the module docstring), wall and CPU seconds
    of the last step); ``model`` is on ``device``."""
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, resolution, resolution, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = _status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_kb("VmHWM") * 1024
    return (peak - before) / 2**20, wall, cpu


def measure_in_subprocess(model: str, resolution: int, batch_size: int, device: str = "cpu",
                          dtype: str = "float32", threads: int | None = None) -> float:  # fmt: skip
    """:func:`training_step_peak_mb` of ``model`` (a benchmark model name) in a fresh Python process."""
    cmd = [sys.executable, "-m", "ravlt_pl.benchmark.train_memory", "--model", model, "--resolution",
           str(resolution), "--batch-size", str(batch_size), "--device", device, "--dtype", dtype]  # fmt: skip
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"training-memory measurement of {model!r} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])["train_peak_mb"]


def build_parser() -> OptionParser:
    p = OptionParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--model", type=str, required=True, help="a name python -m ravlt_pl benchmark --models accepts")
    p.add_argument("--resolution", type=int, default=224, help="square input side (px)")
    p.add_argument("--batch-size", type=int, default=16, help="training batch")
    p.add_argument("--device", type=Literal["cpu", "cuda"], default="cpu", help="where the step runs")
    p.add_argument("--dtype", type=Literal["float32", "bfloat16"], default="float32", help="bfloat16 via autocast")
    p.add_argument("--threads", type=int | None, default=None, help="torch.set_num_threads")
    p.add_argument("--grad-checkpointing", action="store_true", help="model.set_grad_checkpointing(True)")
    p.add_argument(
        "--no-selective-recompute",
        action="store_true",
        help="RAVLT: model.set_selective_recompute(False) (autograd keeps every activation)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    try:
        model = build_model(args.model).to(device)
    except RuntimeError as err:  # timm: "Unknown model (name)"
        parser.error(f"--model {args.model!r}: {err}")
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.no_selective_recompute:
        if not hasattr(model, "set_selective_recompute"):
            parser.error(f"--no-selective-recompute: {args.model!r} has no selective recompute (RAVLT only)")
        model.set_selective_recompute(False)
    mb, wall, cpu = training_step_peak_mb(model, args.resolution, args.batch_size, device, args.dtype)
    result = {"model": args.model, "resolution": args.resolution, "batch_size": args.batch_size,
              "device": args.device, "dtype": args.dtype, "grad_checkpointing": args.grad_checkpointing,
              "selective_recompute": not args.no_selective_recompute,
              "train_peak_mb": mb, "last_step_s": wall, "last_step_cpu_s": cpu}  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
