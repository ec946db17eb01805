"""``make demo``: generate a synthetic set, train a small RAVLT on it, validate, print the headline metric.

``python -m ravlt_pl.demo {classification,detection,segmentation} [extra CLI args]`` — the data set
is written once under ``data/synthetic/<task>`` and reused.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

from .config import resolve_config
from .data import synthetic
from .lightning_cli import BestCheckpoint, build_cli

DEMOS = {
    # task: (generator, data directory, root passed to the data module, config)
    "classification": (partial(synthetic.make_classification, train_per_class=400, val_per_class=50, image_size=32),
                       "data/synthetic/classification", "", "demo/cls.yaml"),
    "detection": (synthetic.make_detection, "data/synthetic/detection", "", "demo/det.yaml"),
    "segmentation": (synthetic.make_segmentation, "data/synthetic/segmentation", "ADEChallengeData2016",
                     "demo/seg.yaml"),
}  # fmt: skip


def run(task: str, extra: list[str]) -> dict:
    make, out, sub, config = DEMOS[task]
    out = Path(out)
    if not out.exists():
        make(out)
    start = time.time()
    cli = build_cli(["fit", "--config", resolve_config(config), "--data.init_args.root", str(out / sub), *extra])
    best = next(c for c in cli.trainer.checkpoint_callbacks if isinstance(c, BestCheckpoint)).best_model_path
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
    reports = (json.loads(p.read_text()) for p in Path(cli.trainer.log_dir).glob("reports/validate/*.json"))
    data = next(r for r in reports if isinstance(r, dict) and "headline" in r)  # not the COCO results lists
    report = Path(cli.trainer.log_dir) / "reports" / "validate"
    headline = data["headline"]
    print(
        f"\n{task} demo: validation {headline['name']} = {headline['value']:.4f} "
        f"after {time.time() - start:.0f} s\nreports in {report}"
    )
    return data


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in DEMOS:
        sys.exit(f"usage: python -m ravlt_pl.demo {{{','.join(DEMOS)}}} [extra CLI arguments]")
    run(argv[0], argv[1:])


if __name__ == "__main__":
    main()
