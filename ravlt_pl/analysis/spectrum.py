"""Numerical rank and effective rank of (batches of) matrices, from their singular values.

Singular values are computed in float64 from the float32 matrices the model produced. The
numerical rank counts ``σ_i > σ_max · rtol`` with the default ``rtol = max(m, n) · eps(float32)``,
the rule of ``torch.linalg.matrix_rank`` for float32 inputs. The effective rank (Roy & Vetterli,
2007) is ``exp(H(p))`` with ``p_i = σ_i / Σ_j σ_j``: it is ``r`` for ``r`` equal singular values and
falls smoothly as the spectrum decays, so it shows what the integer rank hides.
"""

from __future__ import annotations

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps


def default_rtol(shape: torch.Size | tuple[int, ...]) -> float:
    """``max(m, n) · eps(float32)`` for matrices of ``shape[-2:] = (m, n)``."""
    return max(shape[-2:]) * FLOAT32_EPS


def singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """``(..., m, n)`` → ``(..., min(m, n))`` in float64, descending."""
    return torch.linalg.svdvals(matrices.detach().to(torch.float64))


def rank_from_singular_values(sv: torch.Tensor, rtol: float) -> torch.Tensor:
    """Count of ``σ_i > σ_max · rtol`` per matrix (an all-zero matrix has rank 0)."""
    return (sv > sv[..., :1] * rtol).sum(-1)


def effective_rank_from_singular_values(sv: torch.Tensor) -> torch.Tensor:
    """``exp(-Σ p_i log p_i)`` with ``p = σ / Σσ``; 0 for an all-zero matrix."""
    total = sv.sum(-1, keepdim=True)
    p = sv / total.clamp_min(torch.finfo(sv.dtype).tiny)
    entropy = -(p * p.clamp_min(torch.finfo(sv.dtype).tiny).log()).sum(-1)
    return torch.where(total[..., 0] > 0, entropy.exp(), torch.zeros_like(entropy))


def numerical_rank(matrices: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Numerical rank of each ``(m, n)`` matrix in ``(..., m, n)``; ``rtol`` defaults to :func:`default_rtol`."""
    return rank_from_singular_values(singular_values(matrices), default_rtol(matrices.shape) if rtol is None else rtol)


def effective_rank(matrices: torch.Tensor) -> torch.Tensor:
    """Effective rank of each ``(m, n)`` matrix in ``(..., m, n)``."""
    return effective_rank_from_singular_values(singular_values(matrices))
