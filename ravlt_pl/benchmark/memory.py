"""Peak memory of a case's first call, through public APIs (the training steps on CPU: :mod:`.train_memory`).

``peak_mem_mb`` is the model's parameter bytes plus the peak of extra memory allocated during the
call (so a training step counts its gradients and the AdamW states it creates). On CUDA the extra is
``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``) minus what was allocated
before. On CPU it is the running peak of live tensor bytes at operator boundaries: the profiler
(``profile_memory=True``) gives each top-level operator's net allocation and each allocation or free
between operators; an operator's scratch buffers, freed before it returns, are not in it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Running peak of the bytes ``fn`` allocates on the CPU, at operator boundaries (see the module docstring)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    top_level = sorted((e for e in prof.events() if e.cpu_parent is None), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in top_level:  # operators and the "[memory]" records of frees/allocations between them
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak


def first_call_peak_mb(fn: Callable[[], object], device: torch.device, param_bytes: int) -> float:
    """Parameter bytes + peak extra allocation during one call of ``fn``, in MB (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
    else:
        extra = cpu_peak_bytes(fn)
    return (param_bytes + extra) / 2**20
