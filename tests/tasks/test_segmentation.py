"""SegmentationTask: mmseg's metric definition, the loss, every seg config end to end, reports and masks."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from ravlt_pl.cli import build_cli, main
from ravlt_pl.data.synthetic import make_segmentation
from ravlt_pl.models import RAVLT, build_backbone, variant_kwargs
from ravlt_pl.models.checkpoint import CheckpointError
from ravlt_pl.models.segmentation import EncoderDecoder, FCNHead, SemanticFPN, UperNet
from ravlt_pl.tasks.base import WarmupSchedule, param_groups
from ravlt_pl.tasks.segmentation import (
    SegmentationScores,
    SegmentationTask,
    load_released_segmentor,
    mask_names,
    scores_from_confusion,
)
from ravlt_pl.tasks.segmentation_report import AUTHORS_TEST_RATIOS
from tests.conftest import TINY

RECIPES = sorted(str(p) for p in Path("configs/seg").glob("*.yaml"))
CONFIGS = RECIPES + ["configs/demo/seg.yaml"]
NAN = float("nan")
#: test widths of each segmentor's heads (its own init_args)
NARROW = {
    "SemanticFPN": {"fpn_channels": 32, "head_channels": 32},
    "UperNet": {"head_channels": 32, "aux_channels": 16},
}


def segmentor_class(config: str) -> str:
    return yaml.safe_load(Path(config).read_text())["model"]["init_args"]["segmentor"]["class_path"]


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_segmentation(tmp_path_factory.mktemp("ade") / "synth", num_train=4, num_val=3, image_size=(64, 48))


def cli_args(config: str, root: Path, out: Path, *extra: str, narrow_heads: bool = True) -> list[str]:
    """The config with a tiny backbone, narrow heads and the tiny synthetic set, on one CPU."""
    narrow = NARROW[segmentor_class(config).rsplit(".", 1)[-1]] if narrow_heads else {}
    heads = [
        arg for key, width in narrow.items() for arg in (f"--model.init_args.segmentor.init_args.{key}", str(width))
    ]
    return ["--config", config, "--model.init_args.backbone_overrides", json.dumps(TINY), *heads,
            "--data.init_args.root", str(root), "--data.init_args.num_classes", "5",
            "--data.init_args.reduce_zero_label", "true", "--data.init_args.class_names", "null",
            "--data.init_args.scale", "[64, 48]", "--data.init_args.crop_size", "[32, 32]",
            "--data.init_args.global_batch_size", "null", "--data.init_args.batch_size", "2",
            "--data.init_args.num_workers", "0", "--data.init_args.pin_memory", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out), *extra]  # fmt: skip


# -- metrics ----------------------------------------------------------------------------------------
def test_scores_follow_mmseg_on_a_hand_computed_confusion_matrix() -> None:
    # classes 0..3; class 2 is absent from labels and predictions, class 3 only predicted
    target = torch.tensor([[0, 0, 0, 1, 1, 1, 255, 255]])
    preds = torch.tensor([[0, 0, 1, 1, 1, 3, 2, 0]])  # the two ignored pixels do not count
    metric = SegmentationScores(4)
    metric.update(preds, target)
    scores = metric.compute()
    # confusion (rows truth): [[2,1,0,0],[0,2,0,1],[0,0,0,0],[0,0,0,0]]
    # IoU: 0: 2/(3+2-2)=2/3, 1: 2/(3+3-2)=1/2, 2: 0/0 → left out, 3: 0/(0+1-0)=0
    assert torch.allclose(scores["IoU"], torch.tensor([2 / 3, 1 / 2, NAN, 0.0], dtype=torch.float64), equal_nan=True)
    assert scores["mIoU"].item() == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # Acc: 0: 2/3, 1: 2/3, 2 and 3 absent from the ground truth → left out of mAcc
    assert torch.allclose(scores["Acc"], torch.tensor([2 / 3, 2 / 3, NAN, NAN], dtype=torch.float64), equal_nan=True)
    assert scores["mAcc"].item() == pytest.approx(2 / 3)
    assert scores["aAcc"].item() == pytest.approx(4 / 6)


def test_scores_accumulate_over_the_whole_set_not_per_image_means() -> None:
    metric = SegmentationScores(2)
    metric.update(torch.tensor([[0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 0]]))  # image 1: IoU 1
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[1, 1]]))  # image 2
    scores = metric.compute()
    assert scores["IoU"].tolist() == pytest.approx([4 / 5, 1 / 2])  # TP 4 of 5 predicted-or-true for class 0


def test_merged_process_states_equal_one_process() -> None:
    """The confusion matrix is a summed state: what DDP's all-reduce does is ``merge_state``."""
    torch.manual_seed(0)
    preds, target = torch.randint(0, 6, (4, 16, 16)), torch.randint(0, 6, (4, 16, 16))
    target[:, :2] = 255
    whole, rank0, rank1 = SegmentationScores(6), SegmentationScores(6), SegmentationScores(6)
    whole.update(preds, target)
    rank0.update(preds[:2], target[:2])
    rank1.update(preds[2:], target[2:])
    rank0.merge_state(rank1)
    assert torch.equal(rank0.confmat, whole.confmat)
    assert whole.confmat.sum() == (target != 255).sum()


def test_miou_equals_torchmetrics_jaccard_when_every_class_occurs() -> None:
    torch.manual_seed(1)
    preds, target = torch.randint(0, 5, (2, 32, 32)), torch.randint(0, 5, (2, 32, 32))
    target[0, 0] = 255
    jaccard = MulticlassJaccardIndex(5, average="macro", ignore_index=255)(preds, target)
    ours = SegmentationScores(5)
    ours.update(preds, target)
    assert ours.compute()["mIoU"].item() == pytest.approx(jaccard.item())


def test_all_empty_confusion_gives_nan_not_an_error() -> None:
    scores = scores_from_confusion(torch.zeros(3, 3))
    assert scores["mIoU"].isnan() and scores["aAcc"].isnan()


# -- loss ---------------------------------------------------------------------------------------------
def test_loss_averages_labelled_pixels_and_is_zero_without_any() -> None:
    task = SegmentationTask(num_classes=3, backbone_overrides=TINY, segmentor=partial(SemanticFPN, fpn_channels=16))
    logits = torch.zeros(1, 3, 2, 2)
    labels = torch.full((1, 8, 8), 255)
    assert task.pixel_loss(logits, labels).item() == 0.0
    labels[0, 0, 0] = 1
    assert task.pixel_loss(logits, labels).item() == pytest.approx(np.log(3), rel=1e-5)


def test_pretrained_classification_weights_reach_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(3)
    classifier = RAVLT(**variant_kwargs("ravlt_s", **TINY), num_classes=10)
    torch.save({"model": classifier.state_dict()}, tmp_path / "cls.pth")
    task = SegmentationTask(num_classes=3, backbone_overrides=TINY, pretrained=str(tmp_path / "cls.pth"))
    key = "layers.2.blocks.0.attn.qkvo.weight"
    assert not torch.equal(task.model.backbone.state_dict()[key], classifier.state_dict()[key])
    task.load_pretrained()  # what a fit does when it starts (tests/tasks/test_finetune.py runs that)
    assert torch.equal(task.model.backbone.state_dict()[key], classifier.state_dict()[key])


def test_backbone_batchnorms_learn_by_default_as_in_the_authors_runs() -> None:
    """Their backbone's ``norm_eval`` froze ``nn.BatchNorm2d`` only; its norms are ``SyncBatchNorm``."""
    task = SegmentationTask(num_classes=3, backbone_overrides=TINY).train()
    norms = [m for m in task.model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.training for m in norms)
    frozen = SegmentationTask(num_classes=3, backbone_overrides=TINY, norm_eval=True).train()
    assert not any(m.training for m in frozen.model.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_summary_size_is_the_published_flops_input() -> None:
    for segmentor in (SemanticFPN, UperNet):
        task = SegmentationTask(
            num_classes=3, backbone_overrides=TINY, segmentor=partial(segmentor, head_channels=16)
        ).eval()
        assert task.summary_input_size == (512, 2048)
        assert task.flops_forward(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


# -- configs end to end --------------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: Path(c).stem)
def test_config_fast_dev_run(config: str, ade_root: Path, tmp_path: Path) -> None:
    main(["fit", *cli_args(config, ade_root, tmp_path, "--trainer.fast_dev_run", "1")])
    report = json.loads((tmp_path / "reports/fit/segmentation_val.json").read_text())
    assert report["headline"]["name"] == "mIoU" and 0.0 <= report["headline"]["value"] <= 1.0
    # fit's validations are single-scale (mmseg's evaluation hook), whatever validate/test use
    assert report["inference"] == {"mode": "whole", "scales": [1.0], "flip": False}
    assert report["protocol"].startswith("single scale (the test resize to fit 64×48; mmseg's evaluation during")


def test_validate_report_and_predict_masks(ade_root: Path, tmp_path: Path) -> None:
    config = "configs/seg/upernet_s_160k.yaml"
    tta = ["--model.init_args.inference", "slide", "--model.init_args.crop_size", "[32, 32]",
           "--model.init_args.stride", "[21, 21]", "--model.init_args.test_scales", "[0.75, 1.0]",
           "--model.init_args.test_flip", "true", "--model.init_args.report_dir", str(tmp_path / "report")]  # fmt: skip
    main(["validate", *cli_args(config, ade_root, tmp_path, *tta)])
    data = json.loads((tmp_path / "report/segmentation_val.json").read_text())
    assert data["inference"] == {"mode": "slide", "scales": [0.75, 1.0], "flip": True}
    assert data["segmentor"] == "UperNet" and data["weights"].startswith(
        "the weights the config builds (no checkpoint given"
    )
    assert len(data["per_class"]) == 5 and {"mIoU", "mAcc", "aAcc"} <= data.keys()
    fractions = [data[k] for k in ("mIoU", "mAcc", "aAcc")] + [r[k] for r in data["per_class"] for k in ("IoU", "Acc")]
    assert all(v is None or (0 <= v <= 1 and v == round(v, 4)) for v in fractions)
    markdown = (tmp_path / "report/segmentation_val.md").read_text()
    assert (
        "| class | IoU | Acc |" in markdown
        and "class 4" in markdown
        and "Weights: the weights the config builds" in markdown
    )
    cells = re.findall(r"\| ([\d.-]+) (?=\|)", markdown)
    assert len(cells) == 3 + 2 * 5 and all(c == "-" or re.fullmatch(r"[01]\.\d{4}", c) for c in cells)
    assert Image.open(tmp_path / "report/segmentation_val_grid.png").size[0] > 100

    masks = tmp_path / "masks"
    main(["predict", *cli_args(config, ade_root, tmp_path, "--model.init_args.predict_dir", str(masks))])
    written = sorted(masks.glob("*.png"))
    assert [p.name for p in written] == ["ADE_val_00000001.png", "ADE_val_00000002.png", "ADE_val_00000003.png"]
    mask = Image.open(written[0])
    assert mask.mode == "P" and mask.size == (64, 48) and np.array(mask).max() < 5


def test_predict_masks_of_images_sharing_a_stem_do_not_overwrite_each_other(ade_root, tmp_path, capsys) -> None:
    images = tmp_path / "to_predict"
    images.mkdir()
    source = Image.open(next((ade_root / "images/validation").glob("*.jpg"))).convert("RGB")
    source.save(images / "a.jpg")
    source.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images / "a.png")
    source.save(images / "b.jpg")
    masks = tmp_path / "masks"
    main(["predict", *cli_args("configs/demo/seg.yaml", ade_root, tmp_path, "--model.init_args.predict_dir", str(masks),
                               "--data.init_args.predict_dir", str(images))])  # fmt: skip
    assert sorted(p.name for p in masks.iterdir()) == ["a.jpg.png", "a.png.png", "b.png"]
    assert f"masks of 3 images written to {masks}" in capsys.readouterr().out


def test_mask_names_keep_the_image_stem_unless_two_images_share_it() -> None:
    names = mask_names(["x/a.jpg", "x/a.png", "b.jpeg", "x/b.jpg"])
    assert names == {"x/a.jpg": "x/a.jpg.png", "x/a.png": "x/a.png.png", "b.jpeg": "b.png", "x/b.jpg": "x/b.png"}


def test_reports_name_the_weights_they_measured(ade_root: Path, tmp_path: Path) -> None:
    config = "configs/demo/seg.yaml"
    main(
        [
            "fit",
            *cli_args(
                config, ade_root, tmp_path / "fit", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"
            ),
        ]
    )
    fit_report = json.loads(next((tmp_path / "fit").rglob("reports/fit/segmentation_val.json")).read_text())
    assert fit_report["weights"].startswith("this fit's weights at optimizer step 2, ")
    checkpoint = next((tmp_path / "fit").rglob("*.ckpt"))
    report_dir = tmp_path / "validate"
    main(["validate", *cli_args(config, ade_root, tmp_path, "--model.init_args.report_dir", str(report_dir)),
          "--ckpt_path", str(checkpoint)])  # fmt: skip
    assert json.loads((report_dir / "segmentation_val.json").read_text())["weights"] == f"checkpoint {checkpoint}"
    assert f"Weights: checkpoint {checkpoint}." in (report_dir / "segmentation_val.md").read_text()


# -- the segmentor by class path, and the authors' optimisation recipes ---------------------------------
class LastMapHead(FCNHead):
    """An FCN head on the last backbone map."""

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return super().forward(features[-1])


class PlainFCN(EncoderDecoder):
    """A fourth segmentor, added as a user would: one class, named by the config's class path."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 16) -> None:
        super().__init__(backbone, LastMapHead(backbone.out_channels[-1], num_classes, channels))


def test_a_new_segmentor_is_one_class_named_by_class_path(ade_root: Path, tmp_path: Path) -> None:
    segmentor = {"class_path": f"{__name__}.PlainFCN", "init_args": {"channels": 8}}
    args = cli_args("configs/demo/seg.yaml", ade_root, tmp_path, "--trainer.fast_dev_run", "1", narrow_heads=False)
    cli = main(["fit", *args, "--model.init_args.segmentor", json.dumps(segmentor)])
    assert type(cli.model.model) is PlainFCN and cli.model.model.decode_head.convs[0][0].out_channels == 8
    assert json.loads((tmp_path / "reports/fit/segmentation_val.json").read_text())["segmentor"] == "PlainFCN"


def recipe_task(config: str) -> SegmentationTask:
    """The recipe's task with a tiny backbone (its heads at their published widths)."""
    args = ["--config", config, "--model.init_args.backbone_overrides", json.dumps(TINY), "--trainer.logger", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1"]  # fmt: skip
    return build_cli(args, run=False).model


@pytest.mark.parametrize("config", RECIPES, ids=lambda c: Path(c).stem)
def test_recipe_builds_its_segmentor_and_weight_decay_as_the_authors(config: str) -> None:
    """mmseg configs: Semantic FPN decays every parameter (no paramwise_cfg); UperNet exempts the
    names holding "norm" (custom_keys decay_mult 0) and decays biases, gammas and the heads' BatchNorms."""
    task = recipe_task(config)
    model, fpn = task.model, "fpn_" in config
    assert (task.hparams.test_scales, task.hparams.test_flip) == (AUTHORS_TEST_RATIOS, True)  # their --aug-test
    assert type(model) is (SemanticFPN if fpn else UperNet)
    assert model.decode_head.classifier[1].in_channels == (128 if fpn else 512)
    groups = param_groups(model, task.weight_decay_exempt)
    exempt = {id(p) for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in exempt}
    if fpn:
        assert not names
    else:
        assert names == {n for n, _ in model.named_parameters() if "norm" in n}
        assert (
            "backbone.layers.0.blocks.0.norm1.norm.weight" in names
            and "backbone.layers.0.downsample.norm.bias" in names
        )
        decayed = set(dict(model.named_parameters())) - names
        assert {
            "backbone.layers.0.blocks.0.gamma_1",
            "decode_head.bottleneck.1.weight",
            "backbone.layers.0.blocks.0.attn.proj.bias",
        } <= decayed


def mmseg_poly_lr(
    step: int, total: int, lr: float, min_lr: float, power: float, warmup: int, warmup_ratio: float
) -> float:
    """mmcv's ``PolyLrUpdaterHook`` with its linear warmup, as the authors' configs set it."""
    regular = (lr - min_lr) * (1 - step / total) ** power + min_lr
    return regular * (1 - (1 - step / warmup) * (1 - warmup_ratio)) if step < warmup else regular


# The authors' lr_config: schedule_80k (Semantic FPN) and RALA_Uper_*_2x (UperNet).
AUTHORS_SCHEDULE = {"fpn": dict(total=80000, lr=1e-4, min_lr=1e-6, power=0.9, warmup=0, warmup_ratio=1.0),
                    "upernet": dict(total=160000, lr=6e-5, min_lr=0.0, power=1.0, warmup=1500, warmup_ratio=1e-6)}  # fmt: skip


@pytest.mark.parametrize("config", [c for c in RECIPES if "_s_" in c], ids=lambda c: Path(c).stem)
def test_recipe_schedule_is_the_authors_mmseg_poly(config: str) -> None:
    recipe = AUTHORS_SCHEDULE[Path(config).stem.split("_")[0]]
    task = recipe_task(config)
    optimizer = task.optimizer([nn.Parameter(torch.zeros(1))])
    assert optimizer.defaults["lr"] == recipe["lr"]
    total = yaml.safe_load(Path(config).read_text())["trainer"]["max_steps"]
    assert total == recipe["total"]
    schedule = task.scheduler(optimizer, total_steps=total, steps_per_epoch=total)
    assert isinstance(schedule, WarmupSchedule)
    for step in (0, 1, 750, 1499, 1500, 40000, total - 1, total):
        expected = mmseg_poly_lr(step, **recipe)
        assert schedule.factor(step) * recipe["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), step


# -- the authors' released segmentors, whole -------------------------------------------------------------
OFFICIAL_FULL = Path(__file__).resolve().parents[1] / "fixtures" / "official_full"
#: the fixtures' backbone (RAVLT with 8–32 channels) and head widths (16)
FIXTURE_BACKBONE = dict(embed_dims=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_heads=[1, 2, 3, 4], projection=256)
FIXTURE_HEADS = {"SemanticFPN": {"fpn_channels": 16, "head_channels": 16},
                 "UperNet": {"head_channels": 16, "aux_channels": 16}}  # fmt: skip


def released_file(tmp_path: Path, family: str) -> tuple[Path, dict]:
    """The fixture's authors'-format state dict saved as mmcv saves a release (``meta`` + ``state_dict``)."""
    fx = torch.load(OFFICIAL_FULL / f"official_full_{family}.pt", weights_only=True)
    path = tmp_path / f"{family}_released.pth"
    torch.save({"meta": {"mmseg_version": "0.13.0", "CLASSES": ["wall"]}, "state_dict": fx["state_dict"]}, path)
    return path, fx


def start(task: SegmentationTask, stage: str) -> SegmentationTask:
    """What the start of a run does to a task built from a config: ``setup``, then (no checkpoint given) the
    pretrained read of ``configure_optimizers`` / ``on_validation_start``."""
    task.setup(stage)
    task._load_pending_pretrained()
    return task


def released_task(segmentor: type[EncoderDecoder], pretrained: Path, num_classes: int = 150, **kwargs):
    heads = FIXTURE_HEADS[segmentor.__name__]
    return SegmentationTask(num_classes=num_classes, backbone_overrides=FIXTURE_BACKBONE,
                            segmentor=partial(segmentor, **heads), pretrained=str(pretrained), **kwargs)  # fmt: skip


@pytest.mark.parametrize("segmentor", [SemanticFPN, UperNet], ids=lambda s: s.__name__)
def test_a_released_segmentor_loads_whole_and_gives_the_authors_class_maps(segmentor, tmp_path: Path, caplog):
    path, fx = released_file(tmp_path, "semantic_fpn" if segmentor is SemanticFPN else "upernet")
    task = released_task(segmentor, path)
    with caplog.at_level("INFO"):
        start(task, "validate")  # loaded for evaluation too, not only before fit
    parts = "backbone, neck, decode_head" if segmentor is SemanticFPN else "backbone, decode_head, auxiliary_head"
    assert task._released_parts == parts.split(", ")
    assert f"the authors' released {segmentor.__name__}, every tensor of {parts}" in caplog.text
    model = task.model.eval()
    sizes = [meta["ori_shape"][:2] for meta in fx["inputs"]["img_metas"]]
    for logits, expected in zip(model.predict_preprocessed(fx["inputs"]["batch"], sizes), fx["outputs"]["seg_pred"]):
        assert torch.equal(logits.argmax(0), expected.long())


def test_validate_with_a_released_file_reports_it(ade_root: Path, tmp_path: Path) -> None:
    path, _ = released_file(tmp_path, "upernet")
    widths = FIXTURE_HEADS["UperNet"].items()
    heads = [arg for k, v in widths for arg in (f"--model.init_args.segmentor.init_args.{k}", str(v))]
    args = cli_args("configs/seg/upernet_s_160k.yaml", ade_root, tmp_path, narrow_heads=False)
    args += ["--model.init_args.backbone_overrides", json.dumps(FIXTURE_BACKBONE), *heads,
             "--data.init_args.num_classes", "150", "--model.init_args.pretrained", str(path),
             "--model.init_args.report_dir", str(tmp_path / "report")]  # fmt: skip
    cli = main(["validate", *args])
    released_classifier = torch.load(path)["state_dict"]["decode_head.conv_seg.weight"]
    assert torch.equal(cli.model.model.decode_head.classifier[1].weight, released_classifier)
    data = json.loads((tmp_path / "report/segmentation_val.json").read_text())
    assert data["weights"] == f"the authors' released UperNet {path}"
    # the config's evaluation is the authors' tools/test.py default: 6 ratios × flip of the data's test resize
    assert data["inference"] == {"mode": "whole", "scales": AUTHORS_TEST_RATIOS, "flip": True}
    authors = "(the authors' tools/test.py default, --aug-test); whole inference; mean softmax at the original size"
    assert authors in data["protocol"]
    # each view is made from the image file as mmseg makes it: cv2 bilinear on the original uint8 pixels
    image_file = sorted((ade_root / "images/validation").iterdir())[0]
    image = np.asarray(Image.open(image_file).convert("RGB"))  # 48×64
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for view, size in zip(cli.model.test_inputs(str(image_file), [0.5, 1.75], (64, 48)), [(24, 32), (84, 112)]):
        resized = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)  # 64×48 × .5 and × 1.75
        expected = torch.from_numpy((resized / 255 - mean) / std).permute(2, 0, 1).float()
        assert view.shape == (1, 3, *size) and torch.allclose(view[0], expected, atol=1e-5)
    assert f"Protocol: {data['protocol']}." in (tmp_path / "report/segmentation_val.md").read_text()


def test_a_released_file_of_another_class_count_fails_and_says_how_to_load_its_backbone(tmp_path: Path) -> None:
    path, _ = released_file(tmp_path, "upernet")
    task = released_task(UperNet, path, num_classes=19)
    message = (r"decode_head.classifier.1.weight has shape \(150, 16, 1, 1\) in the checkpoint but \(19, 16, 1, 1\).*"
               "--model.init_args.pretrained_backbone_only true")  # fmt: skip
    with pytest.raises(CheckpointError, match=message):
        start(task, "fit")
    backbone_only = released_task(UperNet, path, num_classes=19, pretrained_backbone_only=True)
    heads = {k: v.clone() for k, v in backbone_only.model.state_dict().items() if not k.startswith("backbone.")}
    start(backbone_only, "fit")
    key = "layers.2.blocks.0.attn.qkvo.weight"
    released_tensor = torch.load(path)["state_dict"][f"backbone.{key}"]
    assert torch.equal(backbone_only.model.backbone.state_dict()[key], released_tensor)
    assert all(torch.equal(v, backbone_only.model.state_dict()[k]) for k, v in heads.items())  # heads left at init


def test_a_released_file_of_another_segmentor_or_variant_is_refused_naming_both(tmp_path: Path) -> None:
    path, _ = released_file(tmp_path, "upernet")
    with pytest.raises(CheckpointError, match=r"released.pth: is a released UperNet, but the config builds SemanticF"):
        start(released_task(SemanticFPN, path), "validate")
    other_variant = SegmentationTask(num_classes=150, backbone_overrides=TINY, pretrained=str(path),
                                     segmentor=partial(UperNet, head_channels=16, aux_channels=16))  # fmt: skip
    message = (r"a released UperNet on RAVLT of widths \[8, 16, 24, 32\], depths \[1, 1, 2, 1\], "
               r"but the config builds it on RAVLT of widths \[16, 32, 48, 64\]")  # fmt: skip
    with pytest.raises(CheckpointError, match=message):
        start(other_variant, "validate")


def test_a_released_b_file_into_an_s_config_is_one_line_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full-size key sets (shapes only, on the meta device): the authors' uper_b_2x into upernet_s_160k."""
    monkeypatch.setattr("ravlt_pl.models.ravlt.trunc_normal_", lambda tensor, **kwargs: tensor)
    shapes = json.loads((OFFICIAL_FULL / "released_state_dict_shapes.json").read_text())["RALA_Uper_b_2x.py"]
    with torch.device("meta"):
        state = {k: torch.empty(shape) for k, shape in shapes.items()}
        model = UperNet(build_backbone("ravlt_s", out_indices=(0, 1, 2, 3)), 150)
    message = r"^<state dict>: a released UperNet on ravlt_b, but the config builds it on ravlt_s; use the config"
    with pytest.raises(CheckpointError, match=message):
        load_released_segmentor(model, {"state_dict": state})
