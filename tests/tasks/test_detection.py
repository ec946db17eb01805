"""DetectionTask: every config runs end to end, COCOeval parity, reports, COCO results, predict."""

from __future__ import annotations

import inspect
import json
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from ravlt_pl.cli import build_cli, main, resolve_config
from ravlt_pl.data.coco import COCODataModule
from ravlt_pl.data.synthetic import make_detection
from ravlt_pl.models.detection import RAVLTFasterRCNN, RAVLTMaskRCNN, RAVLTRetinaNet, conv_fc_box_head
from ravlt_pl.tasks.base import param_groups
from ravlt_pl.tasks.detection import COCO_METRICS, DetectionTask, coco_metric, coco_results, metric_inputs
from ravlt_pl.tasks.detection_report import drawn_figure
from tests.conftest import TINY

CONFIGS = sorted(p.relative_to("configs").as_posix() for p in Path("configs/det").glob("*.yaml"))
SMALL = dict(fpn_channels=16, representation_size=32, mask_channels=8)
FEW_ROIS = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                rpn_post_nms_top_n_test=50, box_batch_size_per_image=32)  # fmt: skip


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_detection(tmp_path_factory.mktemp("det") / "synth", num_train=4, num_val=6, image_size=(80, 64))


def _datamodule(root: Path, **kwargs) -> COCODataModule:
    args = dict(num_classes=5, scale=(96, 64), global_batch_size=None, batch_size=2, num_workers=0, pin_memory=False)
    return COCODataModule(root, **{**args, **kwargs})


def test_det_configs_cover_every_published_row():
    expected = {f"det/retinanet_{v}_1x.yaml" for v in "tsbl"} | {f"det/maskrcnn_{v}_1x.yaml" for v in "tsbl"}
    expected |= {f"det/{m}_{v}_3x.yaml" for m in ("maskrcnn", "cascade_maskrcnn") for v in "sbl"}
    assert set(CONFIGS) == expected


def small_detector_args(rcnn: bool) -> list[str]:
    """CLI arguments that shrink a config's detector to the tiny test size."""
    small = {"backbone_overrides": json.dumps(TINY), **(dict(SMALL, **FEW_ROIS) if rcnn else {"fpn_channels": 16})}
    return [arg for k, v in small.items() for arg in (f"--model.init_args.detector.init_args.{k}", str(v))]


@pytest.mark.parametrize("config", [*CONFIGS, "demo/det.yaml"])
def test_config_fast_dev_run(config, coco_root, tmp_path):
    rcnn = "retinanet" not in config
    main([
        "fit", "--config", config, *small_detector_args(rcnn),
        "--data.init_args.root", str(coco_root), "--data.init_args.num_classes", "5",
        "--data.init_args.scale", "[96, 64]", "--data.init_args.global_batch_size", "null",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.num_nodes", "1", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ])  # fmt: skip
    report = json.loads((tmp_path / "reports" / "fit" / "detection_val.json").read_text())
    assert set(report["metrics"]) == ({"bbox", "segm"} if rcnn else {"bbox"})
    assert (
        report["weights"].startswith("this fit's weights at optimizer step ")
        and "not the best checkpoint" in report["weights"]
    )


@pytest.mark.parametrize(
    "config", ["det/retinanet_t_1x.yaml", "det/maskrcnn_s_3x.yaml", "det/cascade_maskrcnn_s_3x.yaml"]
)
def test_config_weight_decay_is_the_authors_paramwise_cfg(config):
    cli = build_cli(["--config", resolve_config(config), *small_detector_args("retinanet" not in config),
                     "--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1"], run=False)  # fmt: skip
    model = cli.model.model
    groups = param_groups(model, cli.model.weight_decay_exempt)
    exempt = {id(p) for group in groups if group.get("weight_decay") == 0.0 for p in group["params"]}
    named = {name for name, p in model.named_parameters() if "norm" in name}  # mmcv custom_keys 'norm'
    norm_layers = {f"{m}.{n}" for m, module in model.named_modules() if isinstance(module, (nn.LayerNorm, _BatchNorm))
                   for n, _ in module.named_parameters(recurse=False)}  # mmcv norm_decay_mult  # fmt: skip
    expected = {"retinanet": set(), "maskrcnn": named, "cascade": named | norm_layers}[
        config.split("/")[1].split("_")[0]
    ]
    assert {name for name, p in model.named_parameters() if id(p) in exempt} == expected
    weight_decay = cli.config["model"]["init_args"]["optimizer"]["init_args"]["weight_decay"]
    assert weight_decay == (1e-4 if "retinanet" in config else 0.05)


@pytest.mark.parametrize(
    ("config", "proposals"), [("det/maskrcnn_s_3x.yaml", 1000), ("det/cascade_maskrcnn_s_3x.yaml", 2000)]
)
def test_config_keeps_the_authors_training_proposals_per_image(config, proposals):
    # mmdet rpn_proposal max_per_img; no other detector class's defaults leak into the one a config names
    small = {"backbone_overrides": json.dumps(TINY), **SMALL}
    cli = build_cli(["--config", resolve_config(config), "--trainer.logger", "false", "--trainer.accelerator", "cpu",
                     *[arg for k, v in small.items() for arg in (f"--model.init_args.detector.init_args.{k}", str(v))]],
                    run=False)  # fmt: skip
    assert cli.model.model.rpn._post_nms_top_n["training"] == proposals


def test_summary_counts_flops_of_the_dummy_forward(capsys):
    main(["summary", "--config", "det/maskrcnn_t_1x.yaml", *small_detector_args(rcnn=True)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["input_size"] == [800, 1280] and result["gflops"] > 0


# -- evaluation parity --------------------------------------------------------------------------------
def _fixed_predictions(dataset, seed: int = 0) -> list[dict]:
    """Per val image: jittered, sometimes mislabelled copies of the ground truth (masks shifted by a pixel)
    plus two false positives."""
    rng = np.random.default_rng(seed)
    predictions = []
    for index in range(len(dataset)):
        _, target = dataset[index]
        height, width = target["orig_size"]
        boxes, labels, masks = [], [], []
        for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"].numpy()):
            size = max(box[2] - box[0], box[3] - box[1])
            boxes.append(np.clip(np.array(box) + rng.normal(0, 0.08 * size, 4), 0, [width, height, width, height]))
            labels.append(label if rng.random() > 0.2 else int(rng.integers(5)))
            masks.append(np.roll(mask, tuple(rng.integers(-1, 2, 2)), axis=(0, 1)))
        for _ in range(2):  # false positives
            x0, y0 = rng.uniform(0, width - 12), rng.uniform(0, height - 12)
            x1, y1 = x0 + rng.uniform(6, 20), y0 + rng.uniform(6, 20)
            boxes.append(np.array([x0, y0, min(x1, width), min(y1, height)]))
            labels.append(int(rng.integers(5)))
            fp = np.zeros((height, width), np.uint8)
            fp[int(y0) : int(y1), int(x0) : int(x1)] = 1
            masks.append(fp)
        predictions.append({
            "boxes": torch.tensor(np.array(boxes), dtype=torch.float32),
            "scores": torch.tensor(rng.uniform(0.05, 1.0, len(boxes)), dtype=torch.float32),
            "labels": torch.tensor(labels),
            "masks": torch.from_numpy(np.array(masks)).bool(),
        })  # fmt: skip
    return predictions


@pytest.fixture(scope="module")
def parity_root(tmp_path_factory) -> Path:
    """32 validation images of 400×320: objects of every COCO size range and crowd regions (RLE)."""
    root = tmp_path_factory.mktemp("parity") / "synth"
    return make_detection(root, num_train=1, num_val=32, image_size=(400, 320), crowd_frac=0.1)


def test_metrics_equal_pycocotools_cocoeval_on_the_annotation_file(parity_root):
    dm = _datamodule(parity_root, scale=(400, 320))
    dm.setup("validate")
    dataset = dm.datasets["val"]
    predictions = _fixed_predictions(dataset)
    targets = [dataset[i][1] for i in range(len(dataset))]
    areas = torch.cat([t["area"] for t in targets])
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any() and (areas >= 96**2).any()
    gt = COCO(str(parity_root / "annotations" / "instances_val2017.json"))
    assert any(a["iscrowd"] and isinstance(a["segmentation"], dict) for a in gt.anns.values())  # crowd RLE
    metric = coco_metric(("bbox", "segm"))
    metric.update(*metric_inputs(predictions, targets))
    ours = metric.compute()
    results = [r for p, t in zip(predictions, targets) for r in coco_results(p, t["image_id"], dm.info.category_ids)]
    for iou in ("bbox", "segm"):
        # the records as predictions_<iou>.json holds them (segm without boxes: COCOeval takes mask areas)
        keys = ("image_id", "category_id", "bbox" if iou == "bbox" else "segmentation", "score")
        evaluation = COCOeval(gt, gt.loadRes([{k: r[k] for k in keys} for r in results]), iou)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        expected = np.asarray(evaluation.stats)
        actual = np.array([ours[f"{iou}_{key}"].item() for key in COCO_METRICS])
        # torchmetrics returns float32; its default float32 thresholds alone move these by up to 2.6e-4
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6, err_msg=iou)
        assert (expected > 0).all() and expected[0] < 0.95  # every size range scored: a set that tests something


def test_coco_results_use_original_ids_xywh_boxes_and_rle():
    masks = torch.zeros(1, 6, 8, dtype=torch.bool)
    masks[0, 1:4, 2:7] = True
    det = {"boxes": torch.tensor([[2.0, 1, 7, 4]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([2]),
           "masks": masks}  # fmt: skip
    (record,) = coco_results(det, image_id=1007, category_ids=[1, 3, 7, 11, 16])
    assert record["image_id"] == 1007 and record["category_id"] == 7
    assert record["bbox"] == [2.0, 1.0, 5.0, 3.0] and record["score"] == 0.5
    rle = record["segmentation"]
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert (decoded == masks[0].numpy()).all()


# -- reports and predict --------------------------------------------------------------------------------
def _task(detector=None, **kwargs) -> DetectionTask:
    # score threshold 0: an untrained model still returns detections, so every file has content
    detector = detector or partial(RAVLTMaskRCNN, variant="ravlt_t", backbone_overrides=TINY, **SMALL, **FEW_ROIS,
                                   box_score_thresh=0.0)  # fmt: skip
    return DetectionTask(detector, num_classes=5, **kwargs)


def _retinanet():
    return partial(RAVLTRetinaNet, variant="ravlt_t", backbone_overrides=TINY, fpn_channels=16, score_thresh=0.0)


def _trainer(tmp_path: Path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                     enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def test_validate_writes_report_and_coco_results(coco_root, tmp_path):
    task = _task(report_dir=str(tmp_path / "reports"), num_drawn_images=2)
    _trainer(tmp_path).validate(task, datamodule=_datamodule(coco_root), verbose=False)
    out = tmp_path / "reports"
    report = json.loads((out / "detection_val.json").read_text())
    assert report["headline"]["name"] == "bbox_map" and 0 <= report["headline"]["value"] <= 1
    assert list(report["metrics"]["segm"]) == list(COCO_METRICS.values())
    assert set(report["per_category_ap"]["bbox"]) <= {"circle", "square", "triangle", "star", "cross"}
    md = (out / "detection_val.md").read_text()
    assert md.startswith("# Detection report (val)\n\nRAVLTMaskRCNN (ravlt_t), weights: the weights the config builds")
    assert report["weights"].startswith("the weights the config builds")
    assert report["protocol"].startswith("one image per forward") and "Protocol: one image per forward" in md
    assert (out / "detection_val_predictions.png").stat().st_size > 0
    gt = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    for iou in ("bbox", "segm"):
        results = json.loads((out / f"predictions_{iou}.json").read_text())
        assert results and {r["image_id"] for r in results} <= set(gt.getImgIds())
        assert {r["category_id"] for r in results} <= set(gt.getCatIds())
        gt.loadRes(results)  # pycocotools accepts them as they are


def test_report_rounds_to_4_decimals_explains_minus_one_and_names_the_checkpoint(coco_root, tmp_path):
    task = _task(report_dir=str(tmp_path / "reports"), num_drawn_images=1)
    trainer = _trainer(tmp_path)
    trainer.validate(task, datamodule=_datamodule(coco_root), verbose=False)
    checkpoint = tmp_path / "weights.ckpt"
    trainer.save_checkpoint(checkpoint)
    trainer.validate(task, datamodule=_datamodule(coco_root), ckpt_path=str(checkpoint), verbose=False)
    report = json.loads((tmp_path / "reports" / "detection_val.json").read_text())
    md = (tmp_path / "reports" / "detection_val.md").read_text()
    assert report["weights"] == f"checkpoint {checkpoint}" and f"weights: checkpoint {checkpoint}." in md
    values = [v for iou in report["metrics"].values() for v in iou.values()]
    values += [v for iou in report["per_category_ap"].values() for v in iou.values()]
    assert all(v == round(v, 4) for v in values)
    assert report["metrics"]["bbox"]["APl"] == -1  # 80×64 images: no object is large
    table = md.split("## AP per category")[0]
    cells = [c.strip() for line in table.splitlines() if line.startswith("| bbox") for c in line.split("|")[2:-1]]
    assert all(c == "n/a" or len(c.split(".")[1]) == 4 for c in cells) and "n/a" in cells
    assert "n/a: COCOeval's −1, no ground-truth objects of that size" in md


def test_report_figure_puts_ground_truth_beside_the_detections():
    image = torch.zeros(3, 64, 80, dtype=torch.uint8)
    truth = {"boxes": torch.tensor([[10.0, 10, 40, 30]]), "labels": torch.tensor([2])}
    det = {"boxes": torch.tensor([[12.0, 9, 41, 33], [50, 40, 60, 60]]), "labels": torch.tensor([2, 1]),
           "scores": torch.tensor([0.9, 0.1])}  # fmt: skip
    fig = drawn_figure([(image, truth, det)] * 2, ["a", "b", "c"], threshold=0.3)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["ground truth: 1 object", "1 detection ≥ 0.30"] * 2
    assert fig.axes[0].get_images()[0].get_array().shape[:2] == (384, 480)  # enlarged ×6 for legible labels


def test_retinanet_reports_boxes_only_and_rejects_a_mask_headline(coco_root, tmp_path):
    task = _task(_retinanet(), report_dir=str(tmp_path))
    _trainer(tmp_path).validate(task, datamodule=_datamodule(coco_root, with_masks=False), verbose=False)
    assert set(json.loads((tmp_path / "detection_val.json").read_text())["metrics"]) == {"bbox"}
    assert not (tmp_path / "predictions_segm.json").exists()
    with pytest.raises(ValueError, match="needs masks"):
        _task(_retinanet(), headline="segm_map")


def test_predict_writes_drawn_images_and_results_for_a_folder(coco_root, tmp_path):
    folder = coco_root / "val2017"
    task = _task(report_dir=str(tmp_path))
    outputs = _trainer(tmp_path).predict(task, datamodule=_datamodule(coco_root, predict_dir=str(folder)))
    files = sorted(folder.iterdir())
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == sorted(f"{f.name}.png" for f in files)
    results = json.loads((tmp_path / "predictions_segm.json").read_text())
    assert {r["image_id"] for r in results} <= {int(f.stem) for f in files}
    first = outputs[0][0]
    assert first["file_name"] == files[0].name and first["boxes"].shape[-1] == 4
    assert int(first["labels"].max()) < 5 and first["boxes"][:, 2].max() <= 80  # original pixels, 0-based labels


def test_predict_gives_every_file_its_own_id_drawing_and_named_results(coco_root, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    first = sorted((coco_root / "val2017").iterdir())[0]
    for name in ("1.jpg", "a.jpg", "a.png", "sub/a.jpg"):  # ids by name would meet (1 and index 1); stems too
        shutil.copy(first, folder / name)
    _trainer(tmp_path).predict(
        _task(report_dir=str(tmp_path / "out")), datamodule=_datamodule(coco_root, predict_dir=str(folder))
    )
    drawn = sorted(
        p.relative_to(tmp_path / "out" / "drawn").as_posix() for p in (tmp_path / "out" / "drawn").rglob("*.png")
    )
    assert drawn == ["1.jpg.png", "a.jpg.png", "a.png.png", "sub/a.jpg.png"]
    results = json.loads((tmp_path / "out" / "predictions_bbox.json").read_text())
    ids = {r["file_name"]: r["image_id"] for r in results}
    assert set(ids) == {"1.jpg", "a.jpg", "a.png", "sub/a.jpg"} and len(set(ids.values())) == 4


def test_coco_predict_without_a_folder_reads_the_annotation_file_images_and_ids(coco_root, tmp_path):
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    ann_file = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    (root / "val2017" / "sub").mkdir()
    moved = data["images"][0]
    shutil.move(root / "val2017" / moved["file_name"], root / "val2017" / "sub" / moved["file_name"])
    moved["file_name"] = f"sub/{moved['file_name']}"
    ann_file.write_text(json.dumps(data))
    dm = _datamodule(root)
    dm.setup("predict")
    items = [dm.datasets["predict"][i] for i in range(len(dm.datasets["predict"]))]
    assert [(x["file_name"], x["image_id"]) for x in items] == [(i["file_name"], i["id"]) for i in data["images"]]


def test_flops_forward_counts_backbone_and_heads():
    task = _task().eval()
    assert task.summary_input_size == (800, 1280)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        task.flops_forward(torch.rand(1, 3, 64, 64))
    assert counter.get_total_flops() > 0


class FasterRCNN4Conv1FC(RAVLTFasterRCNN):
    """RAVLTFasterRCNN whose box head is 4 conv (3×3, BatchNorm, ReLU) + 1 fc, as each cascade stage's."""

    def __init__(self, num_classes: int, box_conv_channels: int = 256, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        fc_width = self.roi_heads.box_predictor.cls_score.in_features  # representation_size
        self.roi_heads.box_head = conv_fc_box_head(
            self.backbone.out_channels, conv_channels=box_conv_channels, representation_size=fc_width
        )


def test_the_readme_shows_this_new_detector():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("**Adding a detector**") :]
    code = section[section.index("```python\n") + len("```python\n") : section.index("```\n")]
    assert "from ravlt_pl.models.detection import RAVLTFasterRCNN, conv_fc_box_head" in code
    assert code[code.index("class ") :] == inspect.getsource(FasterRCNN4Conv1FC)


def test_a_new_detector_is_one_class_named_by_class_path(coco_root, tmp_path):
    small = {k: v for k, v in SMALL.items() if k != "mask_channels"}
    detector = json.dumps({"class_path": "tests.tasks.test_detection.FasterRCNN4Conv1FC",
                           "init_args": {"variant": "ravlt_t", "backbone_overrides": TINY, "box_conv_channels": 8,
                                         **small, **FEW_ROIS}})  # fmt: skip
    cli = main([
        "fit", "--config", "det/maskrcnn_t_1x.yaml", "--model.init_args.detector", detector,
        "--data.init_args.root", str(coco_root), "--data.init_args.num_classes", "5", "--data.init_args.with_masks", "false",
        "--data.init_args.scale", "[96, 64]", "--data.init_args.global_batch_size", "null",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.num_nodes", "1", "--trainer.default_root_dir", str(tmp_path),
    ])  # fmt: skip
    model = cli.model.model
    assert isinstance(model, FasterRCNN4Conv1FC) and isinstance(model.roi_heads.box_head, FastRCNNConvFCHead)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.roi_heads.box_head.modules()) == 4
    report = json.loads((tmp_path / "reports" / "fit" / "detection_val.json").read_text())
    assert set(report["metrics"]) == {"bbox"}


# -- the authors' released detectors, whole ---------------------------------------------------------
FIXTURE = Path(__file__).parents[1] / "fixtures" / "official_full" / "official_full_mask_rcnn.pt"
# the widths of the fixture's Mask R-CNN (tiny backbone, FPN 16, fc 32, mask convs 16)
FIXTURE_DETECTOR = partial(
    RAVLTMaskRCNN, variant="ravlt_t", fpn_channels=16, representation_size=32, mask_channels=16,
    backbone_overrides=dict(embed_dims=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_heads=[1, 2, 3, 4], projection=256),
)  # fmt: skip


def started(task: DetectionTask) -> DetectionTask:
    """``pretrained`` read as a run's start reads it (``configure_optimizers``, or ``on_validation_start``)."""
    task.load_pretrained()
    return task


@pytest.fixture
def released_file(tmp_path) -> tuple[Path, dict]:
    """The fixture's authors'-format Mask R-CNN as a released file ({"state_dict": ...}) and the fixture."""
    fx = torch.load(FIXTURE, weights_only=True)
    path = tmp_path / "maskrcnn_t_1x_12_epoch.pth"
    torch.save({"state_dict": fx["state_dict"], "meta": {"epoch": 12}}, path)
    return path, fx


def _resized_images(fx) -> list[torch.Tensor]:
    """The resized uint8 images the fixture's pipeline built (recoverable from its normalised batch)."""
    mean, std = torch.tensor(fx["inputs"]["mean"])[:, None, None], torch.tensor(fx["inputs"]["std"])[:, None, None]
    out = []
    for image, meta in zip(fx["inputs"]["batch"], fx["inputs"]["img_metas"]):
        h, w = meta["img_shape"][:2]
        out.append((image[:, :h, :w] * std + mean).round().clamp(0, 255).to(torch.uint8))
    return out


def test_a_released_detector_loads_whole_and_detects_as_the_authors_alone(released_file, caplog):
    path, fx = released_file
    with caplog.at_level("INFO", logger="ravlt_pl.tasks.base"):
        task = started(DetectionTask(FIXTURE_DETECTOR, num_classes=80, pretrained=str(path))).eval()
    assert task.released_source == str(path)
    assert "the whole RAVLTMaskRCNN" in caplog.text and "RoI heads" in caplog.text and "FPN" in caplog.text
    expected = fx["state_dict"]["rpn_head.rpn_cls.weight"]
    assert torch.equal(task.model.rpn.head.cls_logits.weight, expected)
    originals = [tuple(m["ori_shape"][:2]) for m in fx["inputs"]["img_metas"]]
    with torch.no_grad():
        both = task.detect(_resized_images(fx), originals)
    for ours, alone, size in zip(both, fx["outputs"]["single_image"], originals):  # one image per forward
        assert torch.equal(ours["labels"], alone["det_labels"])
        torch.testing.assert_close(ours["boxes"], alone["det_bboxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(ours["scores"], alone["det_scores"], rtol=0, atol=1e-4)
        assert ours["masks"].shape == (len(ours["boxes"]), *size) and ours["masks"].dtype == torch.bool


def test_pretrained_parts_backbone_loads_the_backbone_only(released_file):
    path, fx = released_file
    torch.manual_seed(0)
    task = started(DetectionTask(FIXTURE_DETECTOR, num_classes=3, pretrained=str(path), pretrained_parts="backbone"))
    assert task.released_source is None
    torch.testing.assert_close(task.model.backbone.body.patch_embed.proj[0].weight,
                               fx["state_dict"]["backbone.patch_embed.proj.0.weight"])  # fmt: skip
    assert task.model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes: fine-tuning on others


def test_a_released_detector_of_another_class_count_fails_naming_key_and_shapes(released_file):
    path, _ = released_file
    with pytest.raises(Exception, match=r"cls_score\.weight has shape \(81, 32\) in the checkpoint but \(6, 32\)"):
        started(DetectionTask(FIXTURE_DETECTOR, num_classes=5, pretrained=str(path)))


def test_pretrained_parts_all_refuses_a_backbone_only_file(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": {"backbone.patch_embed.proj.0.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="pretrained_parts=all: .*backbone.pth is no released detector"):
        started(DetectionTask(FIXTURE_DETECTOR, num_classes=80, pretrained=str(path), pretrained_parts="all"))


def test_evaluation_does_not_depend_on_the_batch(released_file):
    path, fx = released_file
    task = started(DetectionTask(FIXTURE_DETECTOR, num_classes=80, pretrained=str(path))).eval()
    images, originals = _resized_images(fx), [tuple(m["ori_shape"][:2]) for m in fx["inputs"]["img_metas"]]
    with torch.no_grad():
        together = task.detect(images, originals)
        apart = [task.detect([image], [size])[0] for image, size in zip(images, originals)]
    for a, b in zip(together, apart):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels", "masks"))
