"""Peak memory of a call on CPU from the profiler's public per-operator allocations."""

import torch

from ravlt_pl.benchmark.memory import cpu_peak_bytes, first_call_peak_mb


def test_cpu_peak_counts_tensors_alive_together_not_one_after_another():
    n = 1 << 20

    def two_alive():
        x = torch.zeros(n)
        y = x + 1
        return y.sum()

    def one_at_a_time():
        torch.zeros(n).sum()
        torch.zeros(n).sum()

    assert cpu_peak_bytes(two_alive) >= 8 * n
    assert 4 * n <= cpu_peak_bytes(one_at_a_time) < 8 * n


def test_first_call_peak_adds_the_parameter_bytes():
    assert abs(first_call_peak_mb(lambda: torch.zeros(1 << 18), torch.device("cpu"), 2**20) - 2) < 0.01
