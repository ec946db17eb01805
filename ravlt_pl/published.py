"""The paper's published figures per config (docs/recipes.md, docs/architecture.md), for ``summary``."""

from __future__ import annotations

from pathlib import Path

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
