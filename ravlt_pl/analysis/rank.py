"""``python -m ravlt_pl analyze-rank --config X.yaml [--ckpt PATH] [--images DIR] ...``.

Measures the "low-rank dilemma" of linear attention on real inputs: the numerical and effective
rank of every block's KV buffer (d×d per head) and output features (N×d per head), for RALA, plain
linear attention (the same module with key re-weighting and gate off) and softmax attention,
on the same weights and block inputs. Writes ``rank.json`` (per block/head and per-stage means),
``rank.md`` (stage × kind table) and ``rank_blocks.png`` / ``rank_hist.png`` to ``--out``.

The options are jsonargparse's: ``--print_config`` prints them as YAML, ``--options FILE`` reads such a file
(``--config`` is the task config, as in ``fit``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, Namespace

from .. import reports
from ..command_options import OneLineErrorParser
from .loading import (
    DEFAULT_IMAGES,
    backbone_spec,
    build_model,
    config_image_size,
    load_images,
    load_weights,
    read_config,
)
from .probe import FEATURES, KINDS, RankProbe
from .report import block_results, figures, headline, markdown, stage_means


def analyze(model: torch.nn.Module, images: torch.Tensor, kinds: Sequence[str] = KINDS, rtol: float | None = None,
            batch_size: int = 4) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Run ``images`` through ``model`` (eval, no grad) under a :class:`RankProbe`: ``(blocks, stages)``."""
    model.eval()
    with torch.no_grad(), RankProbe(model, kinds, rtol) as probe:
        for batch in images.split(batch_size):
            model.forward_features(batch)
    blocks = block_results(probe)
    return blocks, stage_means(blocks)


def parse_args(argv: Sequence[str]) -> Namespace:
    parser = OneLineErrorParser(prog="python -m ravlt_pl analyze-rank", description=__doc__.split("\n\n")[1])
    parser.add_argument("--options", action=ActionConfigFile, help="YAML file of these options (see --print_config)")
    parser.add_argument("--config", type=str, required=True,
                        help="task config (its model.init_args.variant / backbone_overrides)")  # fmt: skip
    parser.add_argument("--ckpt", type=str | None, default=None,
                        help="our Lightning checkpoint or the authors' release (default: random init)")  # fmt: skip
    parser.add_argument("--use-ema", action="store_true", help="take the EMA weights of the checkpoint")
    parser.add_argument("--backbone-overrides", type=dict | None, default=None,
                        help="JSON dict merged over the config's backbone_overrides")  # fmt: skip
    parser.add_argument(
        "--images", type=str, default=str(DEFAULT_IMAGES), help="folder of images, searched recursively"
    )
    parser.add_argument("--num-images", type=int, default=16, help="images taken evenly spread over the sorted files")
    parser.add_argument("--image-size", type=int | None, default=None,
                        help="square input side (default: config or 224)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--kinds", type=str, default=",".join(KINDS),
                        help=f"comma-separated subset of {','.join(KINDS)}")  # fmt: skip
    parser.add_argument("--rtol", type=float | None, default=None,
                        help="relative singular-value tolerance (default max(m, n) · eps(float32))")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init (without --ckpt)")
    parser.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=str | None, default=None,
                        help="report folder (default outputs/rank/<config name>)")  # fmt: skip
    args = parser.parse_args(list(argv))
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not args.kinds or set(args.kinds) - set(KINDS):
        parser.error(f"--kinds must name some of {','.join(KINDS)}, got {','.join(args.kinds) or 'none'}")
    if args.num_images < 1:
        parser.error("--num-images must be at least 1")
    return args


def main(argv: Sequence[str]) -> dict:
    """Build, load, measure, write the report; returns the report's data."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    config = read_config(args.config)
    variant, overrides = backbone_spec(config)
    overrides.update(args.backbone_overrides or {})
    torch.manual_seed(args.seed)
    model = build_model(variant, overrides)
    weights = load_weights(model, args.ckpt, args.use_ema) if args.ckpt else f"random init (seed {args.seed})"
    image_size = args.image_size or config_image_size(config)
    images, available = load_images(args.images, args.num_images, image_size)
    blocks, stages = analyze(model, images, args.kinds, args.rtol, args.batch_size)
    config_name = Path(args.config).resolve()
    config_name = config_name.relative_to(Path.cwd()) if config_name.is_relative_to(Path.cwd()) else config_name
    data = {
        "headline": headline(blocks),
        "run": {
            "config": str(config_name),
            "variant": variant,
            "backbone_overrides": overrides,
            "weights": weights,
            "images": str(args.images),
            "num_images": len(images),
            "images_available": available,
            "image_size": image_size,
            "kinds": args.kinds,
            "tolerance": f"{args.rtol:g}" if args.rtol is not None else "max(m, n) · eps(float32)",
            "seconds": round(time.time() - start, 1),
        },
        "features": FEATURES,
        "stages": stages,
        "blocks": blocks,
    }
    out = Path(args.out or Path("outputs/rank") / Path(args.config).stem)
    text = markdown(data)
    paths = reports.write_report(out, "rank", data, text, figures(blocks))
    print(text)
    print(f"rank analysis in {data['run']['seconds']:.0f} s; written to {', '.join(map(str, paths.values()))}")
    return data
