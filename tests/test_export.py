"""``ravlt_pl.export``: ONNX and ``.pt2`` exports that reproduce the eager model, and the ``export`` command."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ravlt_pl.export import (
    ExportError,
    check_plain_aten,
    export_model,
    exportable,
    load_weights,
    main,
    reference_kernels,
)
from ravlt_pl.models import RAVLT, CheckpointError, build_backbone, load_official

from .conftest import FIXTURES, TINY

CLS_DEMO = "demo/cls.yaml"  # looked up under configs/


@pytest.fixture()
def classifier(official_cls) -> RAVLT:
    """A tiny classifier carrying the authors' weights (logits of order 0.1, not ~0 as at init)."""
    model = RAVLT(**official_cls["config"]).eval()
    load_official(model, official_cls["state_dict"])
    return model


def eager(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def test_onnx_export_matches_eager_at_224_and_at_a_non_square_size(classifier, tmp_path):
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the export extra: pip install 'ravlt_pl[export]'")
    onnxruntime = pytest.importorskip("onnxruntime", reason="checking the export needs onnxruntime (export extra)")
    path = tmp_path / "ravlt.onnx"
    assert export_model(classifier, path, "onnx", input_size=(224, 224)) <= 1e-4

    graph = onnx.load(path).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # standard operators only
    assert [d.dim_param != "" for d in graph.input[0].type.tensor_type.shape.dim] == [True, False, True, True]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 224, 224), (2, 3, 160, 224)):
        images = torch.randn(shape)
        (logits,) = session.run(None, {"images": images.numpy()})
        expected = eager(classifier, images)
        assert expected.abs().max() > 0.05  # a check with signal in it
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=1e-4)


def test_pt2_loads_and_runs_in_a_process_that_never_imports_ravlt_pl(classifier, tmp_path):
    path = tmp_path / "ravlt.pt2"
    export_model(classifier, path, "pt2", input_size=(224, 224))
    inputs = {"square": torch.randn(1, 3, 224, 224), "non_square": torch.randn(2, 3, 160, 224)}
    torch.save(inputs, tmp_path / "inputs.pt")
    loader = (
        "import sys, torch\n"
        "inputs = torch.load('inputs.pt')\n"
        "with open('ravlt.pt2', 'rb') as f:\n"
        "    model = torch.export.load(f).module()\n"
        "torch.save({name: model(x) for name, x in inputs.items()}, 'outputs.pt')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ravlt_pl'))\n"
    )
    # -I: no current folder or PYTHONPATH on sys.path; an op registered by ravlt_pl would fail to load.
    run = subprocess.run(
        [sys.executable, "-I", "-c", loader], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    outputs = torch.load(tmp_path / "outputs.pt")
    for name, images in inputs.items():
        torch.testing.assert_close(outputs[name], eager(classifier, images), rtol=0, atol=1e-4)


def test_export_turns_the_fast_path_off_only_while_tracing():
    model = RAVLT(**TINY, num_classes=3)
    model.layers[0].blocks[0].fast = False  # a mixed state comes back as it was
    before = {name: m.fast for name, m in model.named_modules() if hasattr(m, "fast")}
    assert any(before.values())
    with reference_kernels(model):
        assert not any(m.fast for m in model.modules() if hasattr(m, "fast"))
    assert {name: m.fast for name, m in model.named_modules() if hasattr(m, "fast")} == before


def test_a_failed_check_keeps_the_existing_file(tmp_path):
    model = RAVLT(**TINY, num_classes=3).eval()
    model.set_fast_path(True)  # the eager reference runs other kernels: a nonzero difference
    path = tmp_path / "model.pt2"
    path.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="differs from the eager model.*nothing written"):
        export_model(model, path, "pt2", input_size=(64, 64), dynamic=False, atol=0.0)
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]  # no temporary file left


def test_command_exports_a_config_with_the_authors_weights(official_cls, tmp_path, capsys):
    """``export`` on the demo config shaped like the fixture, with the authors' checkpoint (the DeiT
    form, argparse options included): the ONNX model reproduces the authors' logits."""
    onnxruntime = pytest.importorskip(
        "onnxruntime", reason="ONNX export needs the export extra: pip install 'ravlt_pl[export]'"
    )
    config = {k: v for k, v in official_cls["config"].items() if k != "num_classes"}
    release = tmp_path / "ravlt_tiny.pth"
    torch.save({"model": official_cls["state_dict"], "args": argparse.Namespace(model="ravlt_tiny")}, release)
    out = tmp_path / "exports" / "cls.onnx"
    images = official_cls["input"][:1]  # (1, 3, 96, 128)
    main([
        "--config", CLS_DEMO, "--ckpt", str(release), "--format", "onnx", "--out", str(out), "--static",
        "--input-size", *map(str, images.shape[-2:]),
        "--model.init_args.backbone_overrides", json.dumps(config), "--data.init_args.num_classes", "10",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"wrote {out} (onnx, classifier: images (B, 3, H, W) -> logits (B, 10)" in printed
    assert "authors' release" in printed and "max abs error" in printed
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), official_cls["logits"][:1], rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "exported"),
    [("demo/seg.yaml", "segmentor: images (B, 3, H, W) -> logits (B, classes, H, W)"),
     ("demo/det.yaml", "whole RAVLTMaskRCNN: one image (1, 3, H, W) -> boxes (1, 100, 4)")],
)  # fmt: skip
def test_command_exports_dense_task_networks(config, exported, tmp_path, capsys):
    out = tmp_path / "model.pt2"
    main(["--config", config, "--format", "pt2", "--out", str(out), "--static", "--input-size", "64", "96"])
    assert exported in capsys.readouterr().out
    with open(out, "rb") as f:
        outputs = torch.export.load(f).module()(torch.randn(1, 3, 64, 96))
    leaves = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(outputs, tuple) else [outputs]
    assert all(t.isfinite().all() for t in leaves)


def test_lightning_checkpoint_loads_the_network_or_its_ema(tmp_path):
    network = build_backbone("ravlt_t", TINY, num_classes=3)
    state = network.state_dict()
    lightning = {"pytorch-lightning_version": "2.5", "state_dict": {f"model.{k}": v + 1 for k, v in state.items()}}
    lightning["state_dict"].update({f"ema.module.{k}": v + 2 for k, v in state.items()})
    torch.save(lightning, tmp_path / "last.ckpt")
    key = "layers.0.blocks.0.attn.qkvo.weight"
    for use_ema, offset in ((False, 1), (True, 2)):
        fresh = build_backbone("ravlt_t", TINY, num_classes=3)
        assert "Lightning checkpoint" in load_weights(fresh, tmp_path / "last.ckpt", use_ema)
        torch.testing.assert_close(fresh.state_dict()[key], state[key] + offset)

    other = build_backbone("ravlt_t", TINY, num_classes=7)
    with pytest.raises(CheckpointError, match=r"last\.ckpt: does not fit the config's network .*head\.weight"):
        load_weights(other, tmp_path / "last.ckpt")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "tflite"], "invalid choice: 'tflite'"),
        (["--format", "pt2", "--input-size", "100", "96"], "multiples of 32"),
        (["--format", "pt2", "--out", "{tmp}/a_file/model.pt2"], "cannot create its folder"),
        (["--format", "pt2", "--ckpt", "{tmp}/missing.ckpt"], "missing.ckpt: no such checkpoint file"),
        (["--format", "pt2", "--config", "no_such_config.yaml"], "config 'no_such_config.yaml' not found"),
    ],
)
def test_bad_requests_fail_with_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    defaults = {"--config": CLS_DEMO, "--out": str(tmp_path / "model.pt2")}
    argv = [a.format(tmp=tmp_path) for a in argv]
    argv += [x for flag, value in defaults.items() if flag not in argv for x in (flag, value)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code  # argparse: 2, its usage and the error on stderr; ours: the message
    shown = capsys.readouterr().err.strip().splitlines()[-1] if code == 2 else code
    assert message in shown and "\n" not in shown


def test_missing_onnx_packages_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"onnxscript.*pip install 'ravlt_pl\[export\]'"):
        main(["--config", CLS_DEMO, "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert not Path(tmp_path / "m.onnx").exists()


def test_a_graph_with_ravlt_pl_operators_is_refused():
    """With the fast path on, tracing keeps the ``ravlt_pl::rope_tables`` op: such a file would not
    load without ravlt_pl, so it is never written."""
    model = RAVLT(**TINY, num_classes=3).eval()
    model.set_fast_path(True)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(1, 3, 64, 64),))
    with pytest.raises(ExportError, match=r"non-ATen operators \['ravlt_pl.rope_tables.default'\]"):
        check_plain_aten(program)


# -- the whole RetinaNet -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retinanet_fixture() -> tuple:
    """The authors' tiny RetinaNet (their weights) and image 0 as their pipeline prepares it, alone: (1, 3, 96, 128)."""
    from ravlt_pl.models.detection.released_retinanet import retinanet
    from ravlt_pl.models.released import load_converted

    fixture = torch.load(FIXTURES / "official_full" / "official_full_retinanet.pt", weights_only=True)
    model = retinanet.build(fixture["state_dict"])
    load_converted(model, retinanet.convert(fixture["state_dict"], model), "fixture")
    return model.eval(), fixture["inputs"]["batch"][:1]


def expected_detections(model, image: torch.Tensor) -> dict:
    """What the eager model finds on ``image`` (clipped to the input, boxes in input pixels), on the plain
    ATen path that is exported (the fast kernels' rounding moves the scores by ~1e-5)."""
    size = tuple(image.shape[-2:])
    with reference_kernels(model):
        return model.predict_preprocessed(image, [size], [size])[0]


def assert_padded_detections_match(outputs, expected: dict) -> None:
    boxes, scores, labels = outputs
    found = int((labels[0] >= 0).sum())
    assert boxes.shape == (1, 100, 4) and found == len(expected["boxes"]) > 10
    assert torch.equal(labels[0, :found], expected["labels"]) and (labels[0, found:] == -1).all()
    torch.testing.assert_close(boxes[0, :found], expected["boxes"], rtol=0, atol=1e-3)
    torch.testing.assert_close(scores[0, :found], expected["scores"], rtol=0, atol=1e-5)


@pytest.mark.slow  # two minutes on a loaded 2-core machine: a dynamic export, checked at three sizes
def test_the_whole_retinanet_exports_to_pt2_with_anchors_decoding_and_nms(retinanet_fixture, tmp_path):
    model, image = retinanet_fixture
    module, what = exportable(model)
    assert what.startswith("whole RetinaNet")
    padded = F.pad(image, (0, 192 - 128, 0, 160 - 96))  # zero-padded bottom/right, as mmdet pads a batch
    path = tmp_path / "retinanet.pt2"
    export_model(module, path, "pt2", input_size=(160, 192), dynamic=True, atol=1e-3, check_images=[padded])
    inputs = {"padded": padded, "larger": F.pad(image, (0, 320 - 128, 0, 224 - 96))}  # other sizes: H, W dynamic
    torch.save(inputs, tmp_path / "inputs.pt")
    loader = (
        "import sys, torch, torchvision\n"  # torchvision registers the nms operator
        "with open('retinanet.pt2', 'rb') as f:\n"
        "    model = torch.export.load(f).module()\n"
        "torch.save({k: model(x) for k, x in torch.load('inputs.pt').items()}, 'outputs.pt')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ravlt_pl'))\n"
    )
    run = subprocess.run(
        [sys.executable, "-I", "-c", loader], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    outputs = torch.load(tmp_path / "outputs.pt")
    for name, images in inputs.items():
        assert_padded_detections_match(outputs[name], expected_detections(model, images))


def test_a_dynamic_whole_retinanet_export_below_160_pixels_is_refused_naming_why(retinanet_fixture, tmp_path):
    with pytest.raises(ExportError, match=r"input size 96x128: a dynamic whole-detector export needs .* at least 160"):
        export_model(exportable(retinanet_fixture[0])[0], tmp_path / "r.pt2", "pt2", input_size=(96, 128))
    assert not (tmp_path / "r.pt2").exists()


# -- the whole Faster / Mask R-CNN ------------------------------------------------------------------
@pytest.fixture(scope="module")
def mask_rcnn_fixture() -> tuple:
    """The authors' tiny Mask R-CNN (their weights) and image 0 as their pipeline prepares it, alone: (1, 3, 96, 128)."""
    from ravlt_pl.models.released import from_released

    fixture = torch.load(FIXTURES / "official_full" / "official_full_mask_rcnn.pt", weights_only=True)
    meta = fixture["inputs"]["img_metas"][0]
    pad_h, pad_w = meta["pad_shape"][:2]
    return from_released(fixture["state_dict"]), fixture["inputs"]["batch"][:1, :, :pad_h, :pad_w]


def assert_rcnn_outputs_match(outputs, model, image: torch.Tensor) -> None:
    """The export's padded outputs are the authors' test path on ``image`` (boxes in input pixels), masks pasted."""
    from ravlt_pl.models.detection import paste_masks

    size = tuple(image.shape[-2:])
    with reference_kernels(model), torch.no_grad():
        (expected,) = model.predict_preprocessed(image, [size], [size])
    assert_padded_detections_match(outputs[:3], expected)
    if "masks" in expected:
        found = len(expected["boxes"])
        pasted = paste_masks(outputs[3][0, :found], outputs[0][0, :found], size)
        assert (pasted != expected["masks"]).sum() <= 0.001 * pasted.numel()  # pixels on a probability of 0.5


@pytest.mark.slow  # a minute on a loaded 2-core machine: a dynamic export, checked at two sizes
def test_the_whole_mask_rcnn_exports_to_pt2_with_rpn_roialign_nms_and_mask_head(mask_rcnn_fixture, tmp_path):
    model, image = mask_rcnn_fixture
    module, what = exportable(model)
    assert what.startswith("whole RAVLTMaskRCNN") and "mask probabilities (1, 100, 28, 28)" in what
    padded = F.pad(image, (0, 192 - 128, 0, 160 - 96))
    path = tmp_path / "mask_rcnn.pt2"
    export_model(module, path, "pt2", input_size=(160, 192), dynamic=True, atol=1e-3, check_images=[padded])
    with open(path, "rb") as f:
        program = torch.export.load(f)
    operators = {str(n.target) for n in program.graph.nodes if "torchvision" in str(n.target)}
    assert operators == {"torchvision.nms.default", "torchvision.roi_align.default"}
    larger = F.pad(image, (0, 256 - 128, 0, 224 - 96))  # another size: H, W dynamic
    for images in (padded, larger):
        outputs = program.module()(images)
        assert [tuple(t.shape) for t in outputs] == [(1, 100, 4), (1, 100), (1, 100), (1, 100, 28, 28)]
        assert_rcnn_outputs_match(outputs, model, images)


def onnx_detector_outputs(model, image: torch.Tensor, path: Path, operators: set[str]) -> list[torch.Tensor]:
    """Export the whole ``model`` to ONNX at ``image``'s size, check it holds ``operators``, run it in onnxruntime."""
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the export extra: pip install 'ravlt_pl[export]'")
    onnxruntime = pytest.importorskip("onnxruntime", reason="checking the export needs onnxruntime (export extra)")
    export_model(exportable(model)[0], path, "onnx", input_size=tuple(image.shape[-2:]), dynamic=False, atol=1e-3,
                 check_images=[image])  # fmt: skip
    assert operators <= {node.op_type for node in onnx.load(path).graph.node}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {"images": image.numpy()})]


def test_the_whole_retinanet_exports_to_onnx_with_nonmaxsuppression(retinanet_fixture, tmp_path):
    model, image = retinanet_fixture
    outputs = onnx_detector_outputs(model, image, tmp_path / "retinanet.onnx", {"NonMaxSuppression"})
    assert_padded_detections_match(outputs, expected_detections(model, image))


def test_the_whole_mask_rcnn_exports_to_onnx_with_roialign_and_nonmaxsuppression(mask_rcnn_fixture, tmp_path):
    model, image = mask_rcnn_fixture
    outputs = onnx_detector_outputs(model, image, tmp_path / "mask_rcnn.onnx", {"NonMaxSuppression", "RoiAlign"})
    assert_rcnn_outputs_match(outputs, model, image)


def test_the_whole_faster_rcnn_exports_boxes_only(mask_rcnn_fixture, tmp_path):
    from ravlt_pl.models.detection import RAVLTFasterRCNN
    from ravlt_pl.models.released import from_released

    fixture = torch.load(FIXTURES / "official_full" / "official_full_mask_rcnn.pt", weights_only=True)
    model = from_released({k: v for k, v in fixture["state_dict"].items() if ".mask_head." not in k})
    assert isinstance(model, RAVLTFasterRCNN)
    module, what = exportable(model)
    assert what.startswith("whole RAVLTFasterRCNN") and "mask" not in what
    image = mask_rcnn_fixture[1]
    path = tmp_path / "faster_rcnn.pt2"
    export_model(module, path, "pt2", input_size=(96, 128), dynamic=False, atol=1e-3, check_images=[image])
    with open(path, "rb") as f:
        outputs = torch.export.load(f).module()(image)
    assert len(outputs) == 3
    assert_rcnn_outputs_match(outputs, model, image)
