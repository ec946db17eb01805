"""Analyses of trained or random-init RAVLT models (``python -m ravlt_pl analyze-rank``)."""

from .probe import FEATURES, KINDS, RankProbe, linear_attention_kind, native_kind
from .rank import analyze
from .spectrum import effective_rank, numerical_rank

__all__ = [
    "FEATURES", "KINDS", "RankProbe", "analyze", "effective_rank", "linear_attention_kind", "native_kind",
    "numerical_rank",
]  # fmt: skip
