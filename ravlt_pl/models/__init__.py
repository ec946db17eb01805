"""Pure-PyTorch models (no Lightning): the RAVLT backbone, its attention, checkpoint loading."""

from .attention import RankAugmentedLinearAttention, RotaryTable, SoftmaxAttention
from .checkpoint import CheckpointError, LoadReport, checkpoint_filter_fn, load_official
from .ravlt import RAVLT
from .released import from_released
from .variants import VARIANTS, build_backbone, ravlt_b, ravlt_l, ravlt_s, ravlt_t, variant_kwargs

__all__ = [
    "RAVLT", "RankAugmentedLinearAttention", "SoftmaxAttention", "RotaryTable", "load_official",
    "LoadReport", "CheckpointError", "checkpoint_filter_fn", "VARIANTS", "variant_kwargs", "build_backbone",
    "ravlt_t", "ravlt_s", "ravlt_b", "ravlt_l", "from_released",
]  # fmt: skip
