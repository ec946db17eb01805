"""``--malloc tuned``: glibc keeps freed memory for reuse instead of returning it to the kernel."""

from __future__ import annotations

import ctypes
import ctypes.util

# name: (mallopt parameter code from malloc.h, value)
TUNED = {"M_TRIM_THRESHOLD": (-1, 1 << 30), "M_TOP_PAD": (-2, 1 << 28), "M_MMAP_THRESHOLD": (-3, 1 << 25)}


def tune_glibc_malloc() -> dict[str, int]:
    """Set :data:`TUNED` through glibc's ``mallopt`` (ctypes: Python has no binding); returns the settings.

    By default glibc serves blocks above a (dynamic) threshold with fresh ``mmap`` pages and trims
    the heap top soon after a free, so a CPU forward pass page-faults (and the kernel zeroes) much of
    its activation memory every call; what this costs each model is measured in ``docs/benchmark.md``
    ("Allocator"), with its command. The environment variables
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456``
    do the same for any command (``python -m ravlt_pl ...`` included), as does preloading jemalloc
    or tcmalloc. Cost: up to about 1.3 GB of freed memory (the three values) stays with the process.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as err:
        raise SystemExit(f"--malloc tuned needs glibc's mallopt: {err}") from None
    for name, (code, value) in TUNED.items():
        if mallopt(code, value) != 1:
            raise SystemExit(f"--malloc tuned: mallopt({name}, {value}) failed")
    return {name: value for name, (_, value) in TUNED.items()}
