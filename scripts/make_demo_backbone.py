"""Write the demos' shipped classification backbone from a classification demo checkpoint.

    .venv/bin/python -m ravlt_pl.demo classification            # outputs/demo_cls/best.ckpt
    .venv/bin/python scripts/make_demo_backbone.py outputs/demo_cls/best.ckpt ravlt_pl/weights/demo_classifier.pt

Keeps the backbone's tensors (float32, as trained) under their RAVLT names and drops the classifier's
``proj``/``norm``/``head``, which a dense backbone does not have: a plain state dict that
``--model.init_args.pretrained`` reads like any backbone file. Written through a temporary file.
The shipped file is the backbone of ``python -m ravlt_pl.demo classification`` at seed 0 with the
demo recipe before its clipping / longer warmup / label smoothing (val top-1 0.988, AVX2 CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ravlt_pl.models.checkpoint import extract_backbone_state, read_checkpoint
from ravlt_pl.reports import atomic_write

CLASSIFIER_ONLY = ("head.", "proj.", "norm.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    raw, source = read_checkpoint(args.checkpoint)
    state = {k: v.clone() for k, v in extract_backbone_state(raw, source).items() if not k.startswith(CLASSIFIER_ONLY)}
    atomic_write(args.out, lambda tmp: torch.save(state, tmp))
    print(f"{len(state)} backbone tensors of {source} written to {args.out}")


if __name__ == "__main__":
    main()
