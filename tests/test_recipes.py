"""Each published config states exactly the recipe that docs/recipes.md documents.

The recipe of each family is written once here, each value with the words of docs/recipes.md that state
it; a config that drifts from the recipe, or a recipe line of the docs that changes without the configs,
fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "ravlt_pl" / "configs"
DOCS = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")

DROP_PATH = {"t": 0.10, "s": 0.15, "b": 0.40, "l": 0.55}

# (words of docs/recipes.md, what the configs must then say)
CLASSIFICATION = [
    ("| epochs, global batch | 300, 1024 |", {"trainer.max_epochs": 300, "data.global_batch_size": 1024}),
    ("AdamW, lr 5e-4 × batch / 512 = 1e-3, weight decay 0.05",
     {"model.optimizer.class_path": "torch.optim.AdamW", "model.optimizer.lr": 1e-3, "model.optimizer.weight_decay": 0.05}),
    ('`weight_decay_exempt: ["1d"]`', {"model.weight_decay_exempt": ["1d"]}),
    ("5 epochs linear warmup per step, then cosine", {"model.scheduler.warmup_epochs": 5, "model.scheduler.decay": "cosine"}),
    ("RandAugment `rand-m9-mstd0.5-inc1`, mixup 0.8, cutmix 1.0, random erasing 0.25, repeated augmentation",
     {"data.auto_augment": "rand-m9-mstd0.5-inc1", "model.mixup": 0.8, "model.cutmix": 1.0, "data.reprob": 0.25,
      "data.repeated_aug": True}),
    ("label smoothing 0.1, stochastic depth 0.10 / 0.15 / 0.40 / 0.55", {"model.label_smoothing": 0.1}),
    ("| EMA | decay 0.99996", {"model.ema_decay": 0.99996}),
    ("224² train and test, eval crop ratio 0.875", {"model.image_size": 224, "data.image_size": 224, "data.crop_pct": 0.875}),
]  # fmt: skip

DETECTION_COMMON = [
    ("AdamW lr 1e-4", {"model.optimizer.class_path": "torch.optim.AdamW", "model.optimizer.lr": 1e-4}),
    ("| warmup | 500 iterations, linear |", {"model.scheduler.warmup_steps": 500}),
    ("| global batch | 16 (2 per GPU × 8) |", {"data.global_batch_size": 16}),
    ("FPN 256 channels", {"model.detector.fpn_channels": 256}),
]
DETECTION_SCHEDULE = {
    "1x": ("| lr steps (×0.1) | epochs 8, 11 |", {"trainer.max_epochs": 12, "model.scheduler.milestones": [8, 11]}),
    "3x": ("epochs 27, 33 |", {"trainer.max_epochs": 36, "model.scheduler.milestones": [27, 33]}),
}
DETECTION_FAMILY = {
    "retinanet": ("RetinaNet decays every parameter (weight decay\n1e-4)",
                  {"model.weight_decay_exempt": [], "model.optimizer.weight_decay": 1e-4}),
    "maskrcnn": ("Mask R-CNN exempts parameters named `norm`",
                 {"model.weight_decay_exempt": ["norm"], "model.optimizer.weight_decay": 0.05}),
    "cascade_maskrcnn": ("Cascade Mask R-CNN exempts every normalisation layer\n(`norm_layers`",
                         {"model.weight_decay_exempt": ["norm", "norm_layers"], "model.optimizer.weight_decay": 0.05}),
}  # fmt: skip

SEGMENTATION = {
    "fpn": [
        ("| iterations, global batch | 80k, 16 | 160k, 16 |", {"trainer.max_steps": 80000, "data.global_batch_size": 16}),
        ("AdamW lr 1e-4, weight decay 1e-4, all parameters decayed",
         {"model.optimizer.lr": 1e-4, "model.optimizer.weight_decay": 1e-4, "model.weight_decay_exempt": []}),
        ("poly, power 0.9, min lr 1e-6", {"model.scheduler.decay": "poly", "model.scheduler.power": 0.9,
                                          "model.scheduler.min_lr_ratio": 0.01}),
        ("FPN 256 + FPN head 128", {"model.segmentor.fpn_channels": 256, "model.segmentor.head_channels": 128}),
        ("every 4000 iterations", {"trainer.val_check_interval": 4000}),
    ],
    "upernet": [
        ("| iterations, global batch | 80k, 16 | 160k, 16 |", {"trainer.max_steps": 160000, "data.global_batch_size": 16}),
        ("AdamW lr 6e-5, weight decay 0.01, none on parameters named `norm`",
         {"model.optimizer.lr": 6e-5, "model.optimizer.weight_decay": 0.01, "model.weight_decay_exempt": ["norm"]}),
        ("1500 iterations linear warmup, poly power 1.0", {"model.scheduler.warmup_steps": 1500,
                                                           "model.scheduler.decay": "poly", "model.scheduler.power": 1.0}),
        ("UPerHead 512, pooling scales (1, 2, 3, 6), auxiliary FCN on stage 3 (loss weight 0.4)",
         {"model.segmentor.head_channels": 512, "model.segmentor.pool_scales": [1, 2, 3, 6],
          "model.segmentor.aux_loss_weight": 0.4}),
        ("every 8000 iterations", {"trainer.val_check_interval": 8000}),
    ],
}  # fmt: skip


def _flat(config: dict) -> dict:
    """``model.optimizer.lr`` etc.: ``class_path``/``init_args`` levels folded away, ``class_path`` kept."""
    out: dict = {}

    def walk(node, prefix):
        if isinstance(node, dict) and "init_args" in node or isinstance(node, dict) and "class_path" in node:
            out[f"{prefix}.class_path"] = node.get("class_path")
            walk(node.get("init_args") or {}, prefix)
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        else:
            out[prefix] = node

    walk(config, "")
    return out


def _recipe(name: str) -> list[tuple[str, dict]]:
    stem = Path(name).stem
    if stem.startswith("cls_"):
        return [*CLASSIFICATION, ("stochastic depth", {"model.drop_path_rate": DROP_PATH[stem[-1]]})]
    family, variant, schedule = stem.rsplit("_", 2)
    if name.startswith("det/"):
        return [
            *DETECTION_COMMON, DETECTION_SCHEDULE[schedule], DETECTION_FAMILY[family],
            ("stochastic depth", {"model.detector.drop_path_rate": DROP_PATH[variant]}),
        ]  # fmt: skip
    return [*SEGMENTATION[family], ("stochastic depth", {"model.drop_path_rate": DROP_PATH[variant]})]


PUBLISHED = sorted(
    str(p.relative_to(CONFIGS))
    for p in [*CONFIGS.glob("cls_*.yaml"), *CONFIGS.glob("det/*.yaml"), *CONFIGS.glob("seg/*.yaml")]
)


def test_every_published_config_is_covered():
    assert len(PUBLISHED) == 25, PUBLISHED


@pytest.mark.parametrize("name", PUBLISHED)
def test_config_states_the_documented_recipe(name):
    config = _flat(yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8")))
    for words, expected in _recipe(name):
        assert words in DOCS, f"docs/recipes.md no longer says {words!r}: update the recipe of {name} with it"
        for key, value in expected.items():
            assert key in config, f"{name} does not state {key} (docs/recipes.md: {words!r})"
            got = config[key]
            same = got == pytest.approx(value) if isinstance(value, float) else got == value
            assert same, f"{name}: {key} is {got!r}, docs/recipes.md says {value!r} ({words!r})"
