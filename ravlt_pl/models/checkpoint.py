"""Loading the authors' released RAVLT checkpoints onto :class:`~ravlt_pl.models.RAVLT`.

Forms understood: a bare state dict; DeiT-style ``{"model": ..., "model_ema": ...}`` (ImageNet);
mmdet / mmseg ``{"state_dict": {"backbone.<name>": ...}}`` (COCO / ADE20K). Our own Lightning
checkpoints load through Lightning (``--ckpt_path``), not through here; the CLI checks them first
with :func:`read_checkpoint`, which every user file goes through: tensors and plain containers only.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded onto the model, with the file and the reason."""


@dataclass
class LoadReport:
    """What :func:`load_official` did: keys loaded, model keys left at init, checkpoint keys dropped."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors, {len(self.missing)} missing "
            f"({_preview(self.missing)}), {len(self.ignored)} ignored ({_preview(self.ignored)})"
        )


def _preview(keys: Sequence[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") if keys else "none"


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the unwrapped module names them: without DDP's / DataParallel's leading ``module.`` and
    ``torch.compile``'s ``_orig_mod.`` (at the start, or inside where a submodule was compiled)."""
    stripped = {}
    for key, value in state.items():
        key = key.replace("._orig_mod.", ".")
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict:
    """Authors' names → ours (``layers.{i}.RoPE`` → ``layers.{i}.rope``); used by timm too."""
    return {k.replace(".RoPE.", ".rope."): v for k, v in state_dict.items()}


#: The only Python objects a checkpoint may hold beside tensors and plain containers: the authors'
#: ImageNet release (DeiT's training script) pickles its ``argparse.Namespace`` of arguments.
SAFE_GLOBALS = (argparse.Namespace,)


def read_checkpoint(checkpoint: str | Path | Mapping, mmap: bool = False) -> tuple[Mapping, str]:
    """A checkpoint dict and a name for messages; unreadable or unsafe files raise :class:`CheckpointError`.

    Never unpickles arbitrary objects: ``torch.load(weights_only=True)`` with :data:`SAFE_GLOBALS`
    allowed, so a pickled payload is refused (naming the file and the global) before it can run.
    ``mmap`` maps the tensors of a (zip-format) file instead of reading them.
    """
    if isinstance(checkpoint, Mapping):
        return checkpoint, "<state dict>"
    path = Path(checkpoint)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give the checkpoint file inside it")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            mmap = mmap and zipfile.is_zipfile(path)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), str(path)
    except Exception as err:  # a pickled object, a truncated file, a text file ...
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if unsafe:
            allowed = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS)
            raise CheckpointError(
                f"{path}: refused, it pickles the Python object {unsafe[1]} (only tensors, plain containers and "
                f"{allowed} are loaded; loading it could run code)"
            ) from None
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint, truncated or not written by torch.save "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from None


def _first_line(err: BaseException) -> str:
    """The telling line of a load error (torch prefixes weights-only failures with general advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = next((line for line in lines if not line.startswith(("Weights only load failed", "Check the doc"))), "")
    return line.split(". ")[0]


def extract_backbone_state(checkpoint: Mapping, source: str, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The backbone's tensors from any released form, under the authors' names."""
    if use_ema:
        if "model_ema" not in checkpoint:
            raise CheckpointError(f"{source}: use_ema=True but the checkpoint has no 'model_ema' entry")
        state = checkpoint["model_ema"]
    elif "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        state = checkpoint["model"]
    elif "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        # mmdet/mmseg: "backbone.<name>"; our ClassificationTask's Lightning checkpoint: "model.<name>".
        full = strip_wrapper_prefixes(checkpoint["state_dict"])
        for prefix in ("backbone.", "model."):
            state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
            if state:
                break
        else:
            raise CheckpointError(
                f"{source}: 'state_dict' holds no 'backbone.' (mmdet/mmseg) or 'model.' (our classification "
                "checkpoint) keys; to resume one of our own runs use --ckpt_path instead"
            )
    else:
        state = checkpoint
    state = strip_wrapper_prefixes(state)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entry {bad[0]!r} is not a tensor; not a RAVLT state dict")
    return dict(state)


#: Model tensors a backbone checkpoint need not hold: the dense form's ``extra_norms`` (the ImageNet
#: release has none; detectors and segmentors train them from their init).
OPTIONAL_PREFIXES = ("extra_norms.",)


def stage_shape(state: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]] | None:
    """Stage widths and block counts of the RAVLT backbone in ``state`` (at any prefix: ``backbone.body.``
    in a detector), ``None`` if it holds none."""
    widths: dict[int, int] = {}
    blocks: dict[int, int] = {}
    for key, value in state.items():
        if m := re.search(r"(?:^|\.)layers\.(\d+)\.blocks\.(\d+)\.norm1\.norm\.weight$", key):
            stage = int(m[1])
            widths.setdefault(stage, value.shape[0])
            blocks[stage] = max(blocks.get(stage, 0), int(m[2]) + 1)
    if not widths or sorted(widths) != list(range(len(widths))):
        return None
    return [widths[i] for i in sorted(widths)], [blocks[i] for i in sorted(blocks)]


def variant_hint(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str | None:
    """What a shape mismatch means when the file's backbone and the model's differ in stage widths or
    depths: both named; ``None`` when they agree (another head, another class count)."""
    held, built = stage_shape(state), stage_shape(own)
    if held is None or built is None or held == built:
        return None
    return (
        f"the file holds a RAVLT of widths {held[0]}, depths {held[1]}, the model is one of widths {built[0]}, "
        f"depths {built[1]}: set the config's `variant` to the file's"
    )


def load_official(
    model: nn.Module,
    checkpoint: str | Path | Mapping,
    use_ema: bool = False,
    exclude: Sequence[str] = (),
    strict: bool = True,
) -> LoadReport:
    """Load an authors' checkpoint (path or loaded dict) into ``model``; return a :class:`LoadReport`.

    Keys the model lacks (a classifier head into a dense backbone, a detector's neck) are ignored
    and reported; DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes are stripped.
    Every model tensor must load except ``extra_norms`` (left at init) and those under ``exclude``
    (e.g. ``("head.",)`` to fine-tune on other classes): otherwise :class:`CheckpointError` says how
    many loaded and the first unmatched key, or, with ``strict=False``, a WARNING lists what stays at init.
    Any shape mismatch raises :class:`CheckpointError` naming the first key and both shapes, unless
    the key is under ``exclude``.
    """
    raw, source = read_checkpoint(checkpoint)
    state = checkpoint_filter_fn(extract_backbone_state(raw, source, use_ema), model)
    own = model.state_dict()
    report = LoadReport(source)
    to_load = {}
    for key, value in state.items():
        if key not in own or key.startswith(tuple(exclude)):
            report.ignored.append(key)
        elif own[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(own[key].shape)} in the model; "
                f"{variant_hint(state, own) or 'was it made for another RAVLT variant?'}"
            )
        else:
            to_load[key] = value
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in own if k not in to_load)
    required = [k for k in own if not k.startswith((*exclude, *OPTIONAL_PREFIXES))]
    unmatched = [k for k in required if k not in to_load]
    if unmatched:
        unused = next((k for k in state if k not in to_load), None)
        hint = f" (first unused checkpoint key: {unused})" if unused else " (absent from the file)"
        what = (
            f"{source}: {len(required) - len(unmatched)} of {len(required)} backbone tensors load; "
            f"first unmatched: {unmatched[0]}{hint}"
        )
        if strict:
            raise CheckpointError(
                f"{what}; is it a RAVLT backbone of this variant? (to load only what matches: "
                "--model.init_args.pretrained_strict false)"
            )
        log.warning("%s; %d stay at init: %s", what, len(unmatched), _preview(unmatched, 10))
    model.load_state_dict(to_load, strict=False)
    return report
