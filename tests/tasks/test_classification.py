"""Classification task: parameter groups, schedules, EMA, reports and predictions."""

import json

import pytest
import torch

from ravlt_pl.cli import main
from ravlt_pl.tasks.base import WarmupSchedule
from tests.conftest import tiny_cli_args


def test_warmup_then_cosine_and_step_schedules():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    cosine = WarmupSchedule(opt, decay="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.01)
    assert cosine.factor(0) < 0.01 and cosine.factor(10) == 1.0
    assert abs(cosine.factor(60) - (0.01 + 0.99 * 0.5)) < 1e-9 and abs(cosine.factor(110) - 0.01) < 1e-9
    step = WarmupSchedule(opt, decay="step", milestones=[8, 11], total_steps=120, steps_per_epoch=10)
    assert [step.factor(s) for s in (79, 80, 110)] == [1.0, 0.1, 0.1**2]


def _lrs(schedule, optimizer, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_warmup_cosine_is_torchs_sequential_schedule_where_torch_can_express_it():
    """One group, no floor: ours is torch's SequentialLR(LinearLR, CosineAnnealingLR) at every step (what torch
    cannot: a floor per layer-decay group, mmcv's warmup times the poly/step lr; see WarmupSchedule)."""
    ours_opt, torch_opt = (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1) for _ in range(2))
    ours = WarmupSchedule(ours_opt, decay="cosine", warmup_steps=7, warmup_start_factor=0.01, total_steps=40)
    warmup = torch.optim.lr_scheduler.LinearLR(torch_opt, start_factor=0.01, total_iters=7)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(torch_opt, T_max=33)
    reference = torch.optim.lr_scheduler.SequentialLR(torch_opt, [warmup, cosine], milestones=[7])
    assert _lrs(ours, ours_opt, 41) == pytest.approx(_lrs(reference, torch_opt, 41), rel=1e-9, abs=1e-12)


def test_validate_writes_report_with_ema(synthetic_cls, tmp_path):
    args = tiny_cli_args("demo/cls.yaml", synthetic_cls, tmp_path, "--data.init_args.image_size", "32",
                         "--model.init_args.ema_decay", "0.9")  # fmt: skip
    cli = main(args)
    assert cli.model.ema is not None
    ckpt = tmp_path / "model.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    main(["validate", *args[1:], "--trainer.fast_dev_run", "false", "--ckpt_path", str(ckpt)])
    report_dir = next(tmp_path.rglob("reports/validate"))  # under the run's log dir
    data = json.loads((report_dir / "classification_val.json").read_text())
    assert data["headline"]["name"] == "top1" and 0.0 <= data["headline"]["value"] <= 1.0
    assert data["num_samples"] == 15 and "val/ema_top1" in data["metrics"]
    assert data["weights"] == f"checkpoint {ckpt}"
    fractions = [*data["metrics"].values(), *data["per_class_accuracy"].values()]
    assert all(v == round(v, 4) for v in fractions) and any(v != round(v, 2) for v in fractions)  # 4 decimals
    markdown = (report_dir / "classification_val.md").read_text()
    assert markdown.startswith("# Classification report (val)") and f"Weights: checkpoint {ckpt}." in markdown
    assert "fractions from 0 to 1" in markdown and "`ema_` rows" in markdown
    assert (report_dir / "classification_val_confusion.png").stat().st_size > 1000
    fit_report = json.loads(next(tmp_path.rglob("reports/fit/classification_val.json")).read_text())
    assert fit_report["weights"] == "this fit's weights at optimizer step 1, epoch 0 (not the best checkpoint)"


def test_predict_writes_top5_per_file(synthetic_cls, tmp_path):
    args = tiny_cli_args("demo/cls.yaml", synthetic_cls, tmp_path, "--data.init_args.image_size", "32",
                         "--data.init_args.predict_dir", str(synthetic_cls / "val" / "star"),
                         "--model.init_args.report_dir", str(tmp_path / "out"))  # fmt: skip
    main(["predict", *args[1:], "--trainer.fast_dev_run", "false"])
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(rows) == 3 and len(rows[0]["top5"]) == 5 and rows[0]["file"].endswith(".JPEG")
    assert {c["class"] for c in rows[0]["top5"]} == {"circle", "cross", "square", "star", "triangle"}
    assert all(c["score"] == round(c["score"], 4) for row in rows for c in row["top5"])
