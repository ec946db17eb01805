"""RAVLT as a timm model: timm's own model tests, and pretrained weights through timm's factory.

timm's ``tests/test_models.py`` is not part of the installed wheel; it is taken from the sdist of the
*installed* timm version (``pip download``) and cached under ``<venv>/timm-tests/<version>/`` with a
``conftest.py`` that imports ravlt_pl (registering ``ravlt_*``). Without network and without a cached
copy the suite is skipped, saying so.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import timm
import torch

from ravlt_pl.models import VARIANTS
from tests.conftest import rel_err

REPO = Path(__file__).resolve().parents[2]
TIMM_TESTS = Path(sys.prefix) / "timm-tests" / timm.__version__
#: The tests of timm's suite that select every registered model by name (torchscript ones aside:
#: RAVLT is not scriptable; the ``pretrained`` ones need the Hugging Face hub). The configuration
#: test (meta device) runs for every variant, the forward/backward/fx ones (real tensors, ~1.5 min
#: on 2 cores) for RAVLT-T: the variants differ in sizes only.
EXPECTED = {
    *{("test_model_default_cfgs", variant) for variant in VARIANTS},
    *{(test, "ravlt_t") for test in ("test_model_forward", "test_model_backward", "test_model_forward_features",
                                      "test_model_forward_fx", "test_model_backward_fx")},
}  # fmt: skip
SELECTION = "(ravlt_t or (default_cfgs and ravlt)) and not torchscript and not pretrained"


def _timm_model_tests() -> Path:
    """timm's ``tests/test_models.py`` for the installed version (downloaded once, then cached)."""
    target = TIMM_TESTS / "test_models.py"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        download = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"timm=={timm.__version__}", "-d", tmp]  # fmt: skip
        try:
            subprocess.run(download, check=True, capture_output=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"timm {timm.__version__}'s sdist (for tests/test_models.py) cannot be downloaded: {err}")
        sdist = next(Path(tmp).glob("timm-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            source = tar.extractfile(f"timm-{timm.__version__}/tests/test_models.py").read()
    TIMM_TESTS.mkdir(parents=True, exist_ok=True)
    (TIMM_TESTS / "conftest.py").write_text("import ravlt_pl  # noqa: F401  (registers ravlt_* with timm)\n")
    (TIMM_TESTS / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: none of this project's options
    partial = target.with_suffix(".part")
    partial.write_bytes(source)
    partial.replace(target)
    return target


@pytest.mark.slow
def test_timm_model_suite_passes_for_every_variant():
    tests = _timm_model_tests()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-W", "ignore", tests.name, "-k", SELECTION],
        cwd=tests.parent, capture_output=True, text=True, timeout=1200,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = set(re.findall(r"^PASSED test_models.py::(\w+)\[\w+-(ravlt_\w)", run.stdout, flags=re.M))
    assert EXPECTED <= passed, sorted(EXPECTED - passed)


@pytest.fixture
def authors_release(official_cls, tmp_path) -> Path:
    """A DeiT-style release as the authors publish it: the authors' key names (``.RoPE.``), model and
    EMA weights, and the pickled training arguments."""
    state = official_cls["state_dict"]
    assert any(".RoPE." in k for k in state)
    path = tmp_path / "RAVLT_T.pth"
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}  # distinguishable
    torch.save({"model": state, "model_ema": ema, "args": argparse.Namespace(model="RAVLT_T")}, path)
    return path


def _pretrained(path: Path, config: dict, **kwargs):
    """``pretrained=True`` from a local copy of the release: timm's way is a ``file`` overlay with
    ``custom_load=True`` (the format the hub entry's ``custom_load`` names)."""
    overlay = dict(file=str(path), custom_load=True)
    return timm.create_model("ravlt_t", pretrained=True, pretrained_cfg_overlay=overlay, **config, **kwargs)


def test_pretrained_true_loads_the_authors_release(official_cls, authors_release):
    model = _pretrained(authors_release, official_cls["config"]).eval()
    with torch.no_grad():
        assert rel_err(model(official_cls["input"]), official_cls["logits"]) < 1e-5  # the "model" weights


def test_a_plain_state_dict_file_loads_through_timms_own_loader_and_our_filter(official_cls, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(official_cls["state_dict"], path)  # the authors' names, no training arguments
    overlay = dict(file=str(path), num_classes=official_cls["config"]["num_classes"])  # the file's classes
    model = timm.create_model(
        "ravlt_t", pretrained=True, pretrained_cfg_overlay=overlay, **official_cls["config"]
    ).eval()
    with torch.no_grad():
        assert rel_err(model(official_cls["input"]), official_cls["logits"]) < 1e-5


def test_pretrained_for_other_classes_or_channels_keeps_the_backbone(official_cls, authors_release):
    config = {k: v for k, v in official_cls["config"].items() if k != "num_classes"}
    model = _pretrained(authors_release, config, num_classes=3, in_chans=1)
    state = official_cls["state_dict"]
    torch.testing.assert_close(model.layers[0].rope.angle, state["layers.0.RoPE.angle"])
    torch.testing.assert_close(model.proj.weight, state["proj.weight"])
    stem = model.patch_embed.proj[0].weight  # timm's adapt_input_conv: the RGB filters summed
    torch.testing.assert_close(stem, state["patch_embed.proj.0.weight"].sum(1, keepdim=True))
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)


def test_pretrained_features_only_loads_the_backbone(official_cls, authors_release):
    own = _pretrained(authors_release, official_cls["config"], features_only=True).state_dict()
    backbone = {k.replace(".RoPE.", ".rope."): v for k, v in official_cls["state_dict"].items()}
    backbone = {k: v for k, v in backbone.items() if k in own}
    assert "head.weight" not in own and len(backbone) == len([k for k in own if not k.startswith("extra_norms.")])
    for key, value in backbone.items():
        torch.testing.assert_close(own[key], value, msg=key)


def test_pretrained_cfg_points_at_the_authors_hub_files():
    for name in VARIANTS:
        cfg = timm.models.get_pretrained_cfg(f"{name}.in1k")
        assert (cfg.hf_hub_id, cfg.hf_hub_filename) == ("aldjalkdf/RAVLT", f"RAVLT_{name[-1].upper()}.pth")
    assert "ravlt_t.in1k" in timm.list_pretrained("ravlt*")


def test_timm_conventions_for_widths_pooling_and_intermediates():
    model = timm.create_model("ravlt_t", num_classes=0).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[1] == model.num_features == 512
        assert model(x).shape == (1, model.head_hidden_size) == (1, 1024)
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        assert [t.shape[1] for t in intermediates] == [64, 128, 256, 512]
        model.reset_classifier(0, "")
        assert model(x).shape == (1, 1024, 2, 3)  # unpooled
        model.prune_intermediate_layers([1])
        assert model(x).shape == (1, 128, 8, 12) and model.num_features == 128
    assert timm.create_model("ravlt_t", features_only=True, out_indices=(-1,)).feature_info.channels() == [512]
