"""What the rank analysis runs on: the config's backbone, a checkpoint's weights, a folder of images."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from timm.data import create_transform
from torch.utils.data import Subset

from ..data.images import PredictFolder
from ..models import RAVLT, build_backbone, load_official
from ..models.checkpoint import CheckpointError, read_checkpoint

DEFAULT_IMAGES = Path("data/synthetic/classification/val")


def read_config(path: str | Path) -> dict:
    """The YAML config as a dict (a LightningCLI config: ``model.init_args.variant`` ...)."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def backbone_spec(config: Mapping) -> tuple[str, dict]:
    """``(variant, backbone_overrides)`` of any task config (classification, detection, segmentation)."""
    args = (config.get("model") or {}).get("init_args") or {}
    # A detection config names its backbone inside the detector (model.init_args.detector.init_args).
    args = {**args, **(((args.get("detector") or {}).get("init_args")) or {})}
    return args.get("variant", "ravlt_s"), dict(args.get("backbone_overrides") or {})


def config_image_size(config: Mapping, default: int = 224) -> int:
    """``model.init_args.image_size`` or ``data.init_args.image_size`` when it is one int, else ``default``."""
    for section in ("model", "data"):
        size = ((config.get(section) or {}).get("init_args") or {}).get("image_size")
        if isinstance(size, int):
            return size
    return default


def build_model(variant: str, overrides: Mapping | None = None) -> RAVLT:
    """The classifier-form backbone without a head (dense checkpoints' ``extra_norms`` are not needed)."""
    return build_backbone(variant, dict(overrides or {}), num_classes=0).eval()


def _lightning_backbone_state(state: Mapping[str, torch.Tensor], model: RAVLT, source: str, use_ema: bool) -> dict:
    """The backbone's tensors from a Lightning ``state_dict``, whatever prefix the task gave them.

    Every prefix ``P`` with ``P + key`` present for a model key is a candidate (``model.``,
    ``model.backbone.body.``, ``ema.module.`` ...); the one covering most keys wins, among EMA
    prefixes when ``use_ema`` is set and among the others otherwise.
    """
    own = model.state_dict()
    anchor = next(k for k in own if k.startswith("layers.") and k.endswith("attn.qkvo.weight"))
    prefixes = {k[: -len(anchor)] for k in state if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == ".")}
    prefixes = [p for p in prefixes if ("ema" in p) == use_ema]
    if not prefixes:
        what = "EMA weights" if use_ema else f"a RAVLT backbone (no key ends with {anchor!r})"
        raise CheckpointError(f"{source}: holds no {what}")
    prefix = max(prefixes, key=lambda p: sum(p + k in state for k in own))
    loaded = {}
    for key, value in own.items():
        if prefix + key not in state:
            continue
        if state[prefix + key].shape != value.shape:
            raise CheckpointError(
                f"{source}: {prefix + key} has shape {tuple(state[prefix + key].shape)} in the checkpoint but "
                f"{tuple(value.shape)} in the model built from the config; was it made with another config?"
            )
        loaded[key] = state[prefix + key]
    return loaded


def load_weights(model: RAVLT, path: str | Path, use_ema: bool = False) -> str:
    """Load our Lightning checkpoint or an authors' release into ``model``; returns a one-line summary.

    Every stem and stage tensor must be loaded (a partly random backbone would be measured
    otherwise); only the head-side tensors (``proj``/``norm``) may stay at init.
    """
    raw, source = read_checkpoint(path)
    if "pytorch-lightning_version" in raw:
        state = _lightning_backbone_state(raw["state_dict"], model, source, use_ema)
        model.load_state_dict(state, strict=False)
        loaded = set(state)
        summary = f"{source} (Lightning checkpoint{', EMA' if use_ema else ''}: {len(loaded)} tensors)"
    else:
        report = load_official(model, raw, use_ema=use_ema)
        loaded = set(report.loaded)
        summary = f"{source} (authors' release{', EMA' if use_ema else ''}: {len(loaded)} tensors)"
    missing = [k for k in model.state_dict() if k.startswith(("patch_embed.", "layers.")) and k not in loaded]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} backbone tensors missing (first: {missing[0]}); the analysis needs them all"
        )
    return summary


def load_images(folder: str | Path, num_images: int, image_size: int) -> tuple[torch.Tensor, int]:
    """``num_images`` images spread evenly over the sorted files of ``folder`` (recursive), resized
    (shorter side) and centre-cropped to ``image_size``, ImageNet-normalised: ``(n, 3, S, S)``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: image folder not found (pass --images DIR, or generate the synthetic set with "
            "python -m ravlt_pl.data.synthetic --task classification --out data/synthetic/classification)"
        )
    transform = create_transform(image_size, is_training=False, crop_pct=1.0, interpolation="bicubic")
    files = PredictFolder(folder, transform, recursive=True)
    count = min(num_images, len(files))
    subset = Subset(files, [i * len(files) // count for i in range(count)])
    return torch.stack([subset[i]["image"] for i in range(count)]), len(files)
