"""Training-step cost by CPU time, for a machine other jobs are loading (wall-clock ratios then mislead).

    .venv/bin/python scripts/train_cpu_time.py ravlt_s ravlt_s:compile convnext_tiny
    .venv/bin/python scripts/train_cpu_time.py ravlt_s ravlt_s:no-recompute convnext_tiny --threads 1

One process, the models interleaved over rounds; a step is forward + cross-entropy + backward + AdamW at
batch 16, 224², float32. Per model it prints images per CPU-second (the process's user + system time of
the fastest step: time the scheduler gave other jobs does not count) and the ratio to the last model.
``:compile`` wraps the model in ``torch.compile`` (its compilation is not timed); ``:no-recompute`` turns
RAVLT's selective recomputation off. With one thread there is no thread spinning in the CPU time.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import ravlt_pl.models  # noqa: F401  (registers ravlt_* with timm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="timm names, each optionally :compile or :no-recompute")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch_size,))
    runs = {}
    for name in args.models:
        base, _, option = name.partition(":")
        model = timm.create_model(base, num_classes=1000).train()
        if option == "no-recompute":
            model.set_selective_recompute(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs[name] = (torch.compile(model) if option == "compile" else model, optimizer)

    def step(model, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for run in runs.values():  # warm-up (and compilation) untimed
        step(*run)
        step(*run)
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.process_time()
            step(*run)
            seconds[name].append(time.process_time() - start)
    last = args.models[-1]
    for name in args.models:
        ratio = min(seconds[last]) / min(seconds[name])
        print(f"{name:24s} {args.batch_size / min(seconds[name]):6.2f} img per CPU-s   x{ratio:.3f} vs {last}")


if __name__ == "__main__":
    main()
