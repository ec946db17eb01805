"""Hooks that record the rank of every attention block's KV buffer and output features.

:class:`RankProbe` watches every attention module of a :class:`~ravlt_pl.models.RAVLT`. The network
runs as built (its *native* attention kind per stage); at each linear-attention module the other
requested kinds are evaluated on the **same block input and weights** (their results are measured,
not propagated), so the kinds differ only in the attention itself:

- ``rala``: rank-augmented linear attention (key re-weighting and output gate on);
- ``plain``: the same module with ``reweight_keys`` and ``gate`` switched off (elu+1 feature maps,
  kᵀv, normaliser; LePE stays);
- ``softmax``: softmax attention — native on softmax stages; on linear stages computed with the
  linear stage's ``qkvo`` weights (RoPE, no elu) for reference, weights it was not trained with.

Per image and head three matrices are measured (see :data:`FEATURES`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..models.attention import RankAugmentedLinearAttention, SoftmaxAttention
from .spectrum import default_rtol, effective_rank_from_singular_values, rank_from_singular_values, singular_values

KINDS: tuple[str, ...] = ("rala", "plain", "softmax")
FEATURES: dict[str, str] = {
    "kv": "KV buffer kᵀv per head (d×d; linear attention only)",
    "out": "attention output per head (N×d), before LePE and gate",
    "pre_proj": "(output + LePE) ⊙ gate per head (N×d), the input of proj (no gate for plain)",
}
_SWITCHES = {"rala": (True, True), "plain": (False, False)}  # (reweight_keys, gate)


def native_kind(module: nn.Module) -> str:
    """The attention kind a module computes as it is set: ``rala``, ``plain``, ``softmax`` or a mix."""
    if isinstance(module, SoftmaxAttention):
        return "softmax"
    switches = (module.reweight_keys, module.gate)
    return next((k for k, v in _SWITCHES.items() if v == switches), f"reweight={switches[0]},gate={switches[1]}")


@contextmanager
def linear_attention_kind(module: RankAugmentedLinearAttention, kind: str) -> Iterator[None]:
    """Switch a linear-attention module to ``rala`` or ``plain`` for the duration of the block."""
    saved = module.reweight_keys, module.gate
    module.reweight_keys, module.gate = _SWITCHES[kind]
    try:
        yield
    finally:
        module.reweight_keys, module.gate = saved


def attention_blocks(model: nn.Module) -> list[tuple[str, int, int, nn.Module]]:
    """``(name, stage, block, attention module)`` for every block of a RAVLT."""
    return [
        (f"layers.{i}.blocks.{j}", i, j, block.attn)
        for i, stage in enumerate(model.layers)
        for j, block in enumerate(stage.blocks)
    ]


class RankProbe:
    """Context manager recording ranks (and, with ``keep_tensors``, the matrices) while the model runs.

    ``records[(block, kind, feature)]`` holds ``shape`` (m, n) and lists of ``(B, heads)`` tensors
    ``rank`` and ``effective_rank``, one per forward pass; ``tensors[...]`` the raw ``(B, heads, m, n)``
    matrices when ``keep_tensors`` is set (for inspection and tests).
    """

    def __init__(self, model: nn.Module, kinds: Sequence[str] = KINDS, rtol: float | None = None,
                 keep_tensors: bool = False) -> None:  # fmt: skip
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown attention kinds {unknown}; choose from {list(KINDS)}")
        self.model, self.kinds, self.rtol, self.keep_tensors = model, tuple(kinds), rtol, keep_tensors
        self.blocks = attention_blocks(model)
        self._by_name = {name: attn for name, _, _, attn in self.blocks}
        self.records: dict[tuple[str, str, str], dict] = {}
        self.tensors: dict[tuple[str, str, str], list[torch.Tensor]] = {}
        self._current: tuple[str, str] | None = None  # (block, kind) being measured
        self._handles: list = []

    def __enter__(self) -> RankProbe:
        for name, _, _, attn in self.blocks:
            attn.probe = self._record
            self._handles += [
                attn.register_forward_pre_hook(self._enter_block(name)),
                attn.register_forward_hook(self._other_kinds(name)),
                attn.proj.register_forward_pre_hook(self._record_pre_proj),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for _, _, _, attn in self.blocks:
            attn.probe = None
        self._current = None

    def kinds_of(self, attn: nn.Module) -> list[str]:
        """The kinds measured at a module: the native one first, then the alternatives."""
        native = native_kind(attn)
        if isinstance(attn, SoftmaxAttention):
            return [native] if native in self.kinds else []
        return [native] * (native in self.kinds) + [k for k in self.kinds if k != native]

    # -- hooks ------------------------------------------------------------------------------------
    def _enter_block(self, name: str):
        def hook(module: nn.Module, args) -> None:
            native = native_kind(module)
            self._current = (name, native) if native in self.kinds else None

        return hook

    def _other_kinds(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            try:
                for kind in self.kinds_of(module):
                    if kind == native_kind(module):
                        continue
                    self._current = (name, kind)
                    if kind == "softmax":  # shares qkvo/lepe/proj with the linear module
                        SoftmaxAttention.forward(module, *args)
                    else:
                        with linear_attention_kind(module, kind):
                            module.forward(*args)  # .forward: no hooks, no recursion
            finally:
                self._current = None

        return hook

    def _record_pre_proj(self, proj: nn.Module, args) -> None:
        if self._current is None:
            return
        x = args[0]  # (B, C, H, W), channel head * d + j
        attn = self._by_name[self._current[0]]
        heads = x.reshape(x.shape[0], attn.num_heads, attn.head_dim, -1).transpose(-1, -2)  # (B, heads, N, d)
        self._record("pre_proj", heads)

    def _record(self, feature: str, matrices: torch.Tensor) -> None:
        if self._current is None:
            return
        key = (*self._current, feature)
        sv = singular_values(matrices)  # (B, heads, min(m, n))
        rtol = default_rtol(matrices.shape) if self.rtol is None else self.rtol
        entry = self.records.setdefault(key, {"shape": tuple(matrices.shape[-2:]), "rank": [], "effective_rank": []})
        entry["rank"].append(rank_from_singular_values(sv, rtol))
        entry["effective_rank"].append(effective_rank_from_singular_values(sv))
        if self.keep_tensors:
            self.tensors.setdefault(key, []).append(matrices.detach().clone())
