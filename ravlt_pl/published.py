"""The paper's published figures per config (docs/recipes.md, docs/architecture.md), for ``summary``; the
authors' 25 released files and the config each one goes with (:data:`RELEASED_FILES`, :func:`pairing_error`)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .config import resolve_config
from .models.checkpoint import extract_backbone_state, read_checkpoint
from .models.released_base import infer_backbone
from .models.variants import variant_of

# config stem: params (M), GFLOPs, headline metric(s)
PUBLISHED: dict[str, dict] = {
    "cls_t": dict(params_m=15, gflops=2.4), "cls_s": dict(params_m=26, gflops=4.6, top1=84.4),
    "cls_b": dict(params_m=48, gflops=9.9), "cls_l": dict(params_m=95, gflops=16.0),
    "retinanet_t_1x": dict(params_m=24, gflops=201, box_ap=45.9), "retinanet_s_1x": dict(params_m=34, gflops=244, box_ap=48.3),
    "retinanet_b_1x": dict(params_m=57, gflops=353, box_ap=49.8), "retinanet_l_1x": dict(params_m=104, gflops=482, box_ap=50.9),
    "maskrcnn_t_1x": dict(params_m=33, gflops=219, box_ap=47.3, mask_ap=42.7),
    "maskrcnn_s_1x": dict(params_m=44, gflops=262, box_ap=49.8, mask_ap=44.6),
    "maskrcnn_b_1x": dict(params_m=67, gflops=372, box_ap=51.2, mask_ap=45.7),
    "maskrcnn_l_1x": dict(params_m=114, gflops=501, box_ap=52.3, mask_ap=46.4),
    "maskrcnn_s_3x": dict(params_m=44, gflops=262, box_ap=51.4, mask_ap=45.5),
    "maskrcnn_b_3x": dict(params_m=67, gflops=372, box_ap=52.7, mask_ap=46.4),
    "maskrcnn_l_3x": dict(params_m=114, gflops=501, box_ap=53.6, mask_ap=47.3),
    "cascade_maskrcnn_s_3x": dict(params_m=82, gflops=741, box_ap=54.2, mask_ap=46.8),
    "cascade_maskrcnn_b_3x": dict(params_m=105, gflops=851, box_ap=55.3, mask_ap=47.7),
    "cascade_maskrcnn_l_3x": dict(params_m=152, gflops=979, box_ap=55.6, mask_ap=48.0),
    "fpn_t_80k": dict(params_m=18, gflops=136, miou=47.9), "fpn_s_80k": dict(params_m=28, gflops=180, miou=49.5),
    "fpn_b_80k": dict(params_m=51, gflops=292, miou=51.9), "fpn_l_80k": dict(params_m=98, gflops=424, miou=52.6),
    "upernet_s_160k": dict(params_m=55, gflops=937, miou=50.7), "upernet_b_160k": dict(params_m=77, gflops=1050, miou=52.5),
    "upernet_l_160k": dict(params_m=125, gflops=1182, miou=53.2),
}  # fmt: skip


def published_for(config: str | None) -> dict | None:
    return PUBLISHED.get(Path(config).stem) if config else None


# -- the authors' released files (github.com/qhfan/RALA README, Hugging Face aldjalkdf/RAVLT) ------------------
#: released file name → the config (under ``configs/``) that builds its model. The authors' detection
#: configs call RAVLT-B "m" (``retinanet_m_1x.py``); their file names say "b", as ours do.
RELEASED_FILES: dict[str, str] = {
    **{f"RAVLT_{v.upper()}.pth": f"cls_{v}.yaml" for v in "tsbl"},
    **{f"retinanet_{v}_1x_12_epoch.pth": f"det/retinanet_{v}_1x.yaml" for v in "tsbl"},
    **{f"maskrcnn_{v}_1x_12_epoch.pth": f"det/maskrcnn_{v}_1x.yaml" for v in "tsbl"},
    **{f"maskrcnn_{v}_3x_36_epoch.pth": f"det/maskrcnn_{v}_3x.yaml" for v in "sbl"},
    **{f"Casmaskrcnn_{v}_3x_36_epoch.pth": f"det/cascade_maskrcnn_{v}_3x.yaml" for v in "sbl"},
    **{f"fpn_{v}_1x.pth": f"seg/fpn_{v}_80k.yaml" for v in "tsbl"},
    **{f"uper_{v}_2x.pth": f"seg/upernet_{v}_160k.yaml" for v in "sbl"},
}


def released_config(checkpoint: str | Path) -> str | None:
    """The config for a released file, by its name (``None`` for a name the authors did not publish)."""
    return RELEASED_FILES.get(Path(checkpoint).name)


def pairing_error(checkpoint: str | Path, config: str | Path) -> str | None:
    """One line saying why a checkpoint does not go with a config, ``None`` when they pair.

    The checkpoint's RAVLT variant is inferred from its backbone tensors (a renamed file is judged by
    what it holds) and compared with the ``variant`` the config builds. A released detector or
    segmentor must also be loaded into a config of its own model (schedules aside: a 1x file may be
    evaluated with the 3x config); as a backbone init any release pairs with any config of its variant.
    """
    built = _config_variant(config)
    raw, source = read_checkpoint(checkpoint)
    backbone = infer_backbone(extract_backbone_state(raw, source), prefix="")
    held = variant_of(backbone["embed_dims"], backbone["depths"])
    expected = released_config(checkpoint)
    if held != built:
        what = f"RAVLT-{held[-1].upper()}" if held else f"a RAVLT of widths {backbone['embed_dims']}"
        hint = f"; it pairs with {expected}" if expected else ""
        return f"{source} holds {what}, but {config} builds RAVLT-{built[-1].upper()}{hint}"
    task = Path(config).parent.name
    if expected and Path(expected).parent.name == task and _model(expected) != _model(config):
        return f"{source} is the authors' {_model(expected)} ({expected}), but {config} builds a {_model(config)}"
    return None


def _model(config: str | Path) -> str:
    """A config's model without variant and schedule: ``det/maskrcnn_s_3x.yaml`` → ``maskrcnn``."""
    return re.sub(r"_[tsbl]_\d+[xk]$", "", Path(config).stem)


def _config_variant(config: str | Path) -> str:
    """The ``variant`` a config file builds (the first one in it)."""
    path = resolve_config(str(config))
    found = _find_key(yaml.safe_load(Path(path).read_text()), "variant")
    if found is None:
        raise ValueError(f"{path}: sets no RAVLT variant")
    return found


def _find_key(node, key: str):
    """The first value of ``key`` in nested dicts and lists (depth first), ``None`` if absent."""
    if isinstance(node, dict):
        if key in node:
            return node[key]
        node = list(node.values())
    if isinstance(node, list):
        return next((found for child in node if (found := _find_key(child, key)) is not None), None)
    return None
