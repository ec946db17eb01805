"""``make demo``: generate a synthetic set, train a small RAVLT on it, validate, print the headline metric.

``python -m ravlt_pl.demo {classification,detection,segmentation} [extra CLI args]`` — the data set
is written once under ``data/synthetic/<task>`` and reused.

The detection and segmentation demos start as the published recipes do, from a classification
backbone: ``ravlt_pl/weights/demo_classifier.pt`` (2.9 MB, shipped), the backbone of a
classification demo run (seed 0, val top-1 0.988; ``scripts/make_demo_backbone.py`` writes it from
a checkpoint). ``--model.init_args.pretrained outputs/demo_cls/best.ckpt`` starts from your own
classification demo instead (that demo copies its best checkpoint there), ``null`` from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .config import resolve_config
from .data import synthetic
from .lightning_cli import BestCheckpoint, build_cli
from .models.checkpoint import CheckpointError, read_checkpoint
from .reports import atomic_write


@dataclass(frozen=True)
class Demo:
    make: Callable[[Path], object]  # writes the synthetic set
    data: str  # where the set is written
    root: str  # the data module's root inside it
    config: str
    from_classifier: bool  # starts from the classification demo's backbone


DEMOS = {
    "classification": Demo(partial(synthetic.make_classification, train_per_class=400, val_per_class=50, image_size=32),
                           "data/synthetic/classification", "", "demo/cls.yaml", False),
    "detection": Demo(synthetic.make_detection, "data/synthetic/detection", "", "demo/det.yaml", True),
    "segmentation": Demo(synthetic.make_segmentation, "data/synthetic/segmentation", "ADEChallengeData2016",
                         "demo/seg.yaml", True),
}  # fmt: skip

#: The shipped classification backbone the detection and segmentation demos start from.
CLASSIFIER = Path(__file__).parent / "weights" / "demo_classifier.pt"
PRETRAINED = "--model.init_args.pretrained"


def gives_pretrained(extra: list[str]) -> bool:
    """Whether the user's arguments set the starting weights themselves."""
    return any(arg == PRETRAINED or arg.startswith(PRETRAINED + "=") for arg in extra)


def classifier_backbone(task: str) -> Path:
    """The shipped classification backbone; exits with one line when it is missing or unreadable."""
    try:
        read_checkpoint(CLASSIFIER)
    except CheckpointError as err:
        sys.exit(
            f"{task} demo: {err} (the package's demo backbone; reinstall ravlt_pl, or pass {PRETRAINED} FILE / null)"
        )
    return CLASSIFIER


def keep_best(best: str, root: str | os.PathLike) -> Path:
    """Copy the best checkpoint to ``root/best.ckpt`` (through a temporary file: a reader never sees half)."""
    return atomic_write(Path(root) / "best.ckpt", lambda tmp: shutil.copyfile(best, tmp))


def run(task: str, extra: list[str]) -> dict:
    demo = DEMOS[task]
    out = Path(demo.data)
    if not out.exists():
        demo.make(out)
    start = time.time()
    start_from = []
    if demo.from_classifier and not gives_pretrained(extra):
        start_from = [PRETRAINED, str(classifier_backbone(task))]
    args = ["fit", "--config", resolve_config(demo.config), "--data.init_args.root", str(out / demo.root)]
    cli = build_cli([*args, *start_from, *extra])
    best = next(c for c in cli.trainer.checkpoint_callbacks if isinstance(c, BestCheckpoint)).best_model_path
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
    reports = (json.loads(p.read_text()) for p in Path(cli.trainer.log_dir).glob("reports/validate/*.json"))
    data = next(r for r in reports if isinstance(r, dict) and "headline" in r)  # not the COCO results lists
    report = Path(cli.trainer.log_dir) / "reports" / "validate"
    headline = data["headline"]
    kept = (
        f"\nbest checkpoint copied to {keep_best(best, cli.trainer.default_root_dir)}"
        if task == "classification"
        else ""
    )
    weights = cli.model.pretrained or "scratch"
    print(
        f"\n{task} demo: validation {headline['name']} = {headline['value']:.4f} "
        f"after {time.time() - start:.0f} s (started from {weights}){kept}\nreports in {report}"
    )
    return data


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in DEMOS:
        sys.exit(f"usage: python -m ravlt_pl.demo {{{','.join(DEMOS)}}} [extra CLI arguments]")
    run(argv[0], argv[1:])


if __name__ == "__main__":
    main()
