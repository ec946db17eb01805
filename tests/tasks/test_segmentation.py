"""SegmentationTask: mmseg's metric definition, the loss, every seg config end to end, reports and masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from ravlt_pl.cli import main
from ravlt_pl.data.synthetic import make_segmentation
from ravlt_pl.models import RAVLT, variant_kwargs
from ravlt_pl.tasks.segmentation import SegmentationScores, SegmentationTask, scores_from_confusion
from tests.conftest import TINY

CONFIGS = sorted(str(p) for p in Path("configs/seg").glob("*.yaml")) + ["configs/demo/seg.yaml"]
NAN = float("nan")


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_segmentation(tmp_path_factory.mktemp("ade") / "synth", num_train=4, num_val=3, image_size=(64, 48))


def cli_args(config: str, root: Path, out: Path, *extra: str) -> list[str]:
    """The config with a tiny backbone, narrow heads and the tiny synthetic set, on one CPU."""
    return ["--config", config, "--model.init_args.backbone_overrides", json.dumps(TINY),
            "--model.init_args.head_channels", "32", "--model.init_args.fpn_channels", "32",
            "--model.init_args.aux_channels", "16",
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
    task = SegmentationTask(num_classes=3, backbone_overrides=TINY, head_channels=16, fpn_channels=16)
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
    task.setup("fit")
    assert torch.equal(task.model.backbone.state_dict()[key], classifier.state_dict()[key])


def test_summary_size_is_the_published_flops_input() -> None:
    for decoder in ("fpn", "upernet"):
        task = SegmentationTask(num_classes=3, backbone_overrides=TINY, decoder=decoder, head_channels=16).eval()
        assert task.summary_input_size == (512, 2048)
        assert task.flops_forward(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


# -- configs end to end --------------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: Path(c).stem)
def test_config_fast_dev_run(config: str, ade_root: Path, tmp_path: Path) -> None:
    main(["fit", *cli_args(config, ade_root, tmp_path, "--trainer.fast_dev_run", "1")])
    report = json.loads((tmp_path / "reports/fit/segmentation_val.json").read_text())
    assert report["headline"]["name"] == "mIoU" and 0.0 <= report["headline"]["value"] <= 1.0


def test_validate_report_and_predict_masks(ade_root: Path, tmp_path: Path) -> None:
    config = "configs/seg/upernet_s_160k.yaml"
    tta = ["--model.init_args.inference", "slide", "--model.init_args.crop_size", "[32, 32]",
           "--model.init_args.stride", "[21, 21]", "--model.init_args.test_scales", "[0.75, 1.0]",
           "--model.init_args.test_flip", "true", "--model.init_args.report_dir", str(tmp_path / "report")]  # fmt: skip
    main(["validate", *cli_args(config, ade_root, tmp_path, *tta)])
    data = json.loads((tmp_path / "report/segmentation_val.json").read_text())
    assert data["inference"] == {"mode": "slide", "scales": [0.75, 1.0], "flip": True}
    assert len(data["per_class"]) == 5 and {"mIoU", "mAcc", "aAcc"} <= data.keys()
    markdown = (tmp_path / "report/segmentation_val.md").read_text()
    assert "| class | IoU | Acc |" in markdown and "class 4" in markdown
    assert Image.open(tmp_path / "report/segmentation_val_grid.png").size[0] > 100

    masks = tmp_path / "masks"
    main(["predict", *cli_args(config, ade_root, tmp_path, "--model.init_args.predict_dir", str(masks))])
    written = sorted(masks.glob("*.png"))
    assert [p.name for p in written] == ["ADE_val_00000001.png", "ADE_val_00000002.png", "ADE_val_00000003.png"]
    mask = Image.open(written[0])
    assert mask.mode == "P" and mask.size == (64, 48) and np.array(mask).max() < 5
