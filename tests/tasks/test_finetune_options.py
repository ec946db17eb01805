"""BaseTask's fine-tuning options: layer-wise lr decay (timm's rule), a frozen backbone, run-relative
warmup and EMA horizon, and when the pretrained file is read."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim import AdamW

from ravlt_pl.models import RAVLT
from ravlt_pl.models.variants import variant_kwargs
from ravlt_pl.tasks.base import WarmupSchedule, build_optimizer, layer_scales, param_groups
from ravlt_pl.tasks.classification import ClassificationTask
from ravlt_pl.tasks.segmentation import SegmentationTask
from tests.conftest import TINY


def test_layer_decay_scales_each_block_by_timms_rule_and_heads_keep_the_lr():
    task = SegmentationTask(num_classes=3, backbone_overrides=TINY)
    scales = layer_scales(task.model, 0.5)
    named = dict(task.model.named_parameters())
    # TINY: stem 0, four blocks 1..4, the last layer 5 (timm's group_matcher grouping): 0.5 ** (5 - layer)
    assert scales[id(named["backbone.patch_embed.proj.0.weight"])] == 0.5**5
    assert scales[id(named["backbone.layers.0.blocks.0.attn.qkvo.weight"])] == 0.5**4
    assert scales[id(named["backbone.layers.3.blocks.0.attn.qkvo.weight"])] == 0.5**1
    assert all(scales[id(p)] == 1.0 for n, p in named.items() if not n.startswith("backbone."))
    optimizer = build_optimizer(lambda groups: AdamW(groups, lr=1e-3), task.model, ["1d"], torch.device("cpu"), 0.5)
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert lrs[id(named["backbone.patch_embed.proj.0.weight"])] == pytest.approx(1e-3 * 0.5**5)
    no_decay = {id(p) for g in optimizer.param_groups if g.get("weight_decay") == 0.0 for p in g["params"]}
    assert id(named["backbone.patch_embed.proj.0.bias"]) in no_decay  # the "1d" rule still holds per layer
    assert len(param_groups(task.model, ["1d"])) == 2  # without layer decay: the two groups as before


def test_freeze_backbone_trains_the_head_only_and_keeps_batchnorm_statistics():
    task = ClassificationTask(num_classes=3, backbone_overrides=TINY, freeze_backbone=True, mixup=0, cutmix=0)

    class Trainer:  # what configure_optimizers reads
        estimated_stepping_batches, max_epochs = 10, 1

    task.trainer = Trainer()
    optimizer = task.configure_optimizers()["optimizer"]
    trained = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trained == {"head.weight", "head.bias"}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2
    task.train()
    assert not any(m.training for m in task.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def test_warmup_fraction_is_a_share_of_the_run():
    optimizer = AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    assert WarmupSchedule(optimizer, warmup_fraction=0.1, total_steps=500).warmup == 50
    assert WarmupSchedule(optimizer, warmup_fraction=0.1, total_steps=500_000).warmup == 50_000


def test_ema_horizon_sets_the_decay_per_step_from_the_run_length():
    task = ClassificationTask(num_classes=3, backbone_overrides=TINY, ema_horizon=0.1)

    class Trainer:
        estimated_stepping_batches = 200

    task.trainer = Trainer()
    task.on_train_start()
    assert task.ema.step_decay == pytest.approx(1 - 1 / 20)
    with pytest.raises(ValueError, match="ema_decay or ema_horizon, not both"):
        ClassificationTask(num_classes=3, backbone_overrides=TINY, ema_decay=0.999, ema_horizon=0.1)


def test_pretrained_is_read_when_the_run_starts_not_when_the_task_is_built(tmp_path):
    classifier = RAVLT(**variant_kwargs("ravlt_t", **TINY), num_classes=10)
    torch.save({"model": classifier.state_dict()}, tmp_path / "cls.pth")
    key = "layers.2.blocks.0.attn.qkvo.weight"
    task = ClassificationTask(num_classes=3, backbone_overrides=TINY, pretrained=str(tmp_path / "cls.pth"))
    assert not torch.equal(task.model.state_dict()[key], classifier.state_dict()[key])  # not when built
    task.setup("fit")
    task._load_pending_pretrained()
    assert torch.equal(task.model.state_dict()[key], classifier.state_dict()[key])
    # A resume after the file is gone: tests/tasks/test_finetune.py (on_load_checkpoint cancels the read).
