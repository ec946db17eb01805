"""The authors' released Semantic FPN / UperNet files, whole, against their mmseg 0.13 model's outputs.

``tests/fixtures/official_full/`` holds, per family, an authors'-format state dict (tiny backbone,
16-channel heads, 150 classes), two images as the authors' test pipeline feeds them (one image per
forward, not padded) and their model's intermediate and final outputs in eval mode; and the key sets
and shapes of every full-size released config (``released_state_dict_shapes.json``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ravlt_pl.models.checkpoint import CheckpointError
from ravlt_pl.models.released import load_converted
from ravlt_pl.models.segmentation import SemanticFPN, UperNet
from ravlt_pl.models.segmentation.released import FAMILIES, semantic_fpn, upernet

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official_full"
FAMILY = {"semantic_fpn": semantic_fpn, "upernet": upernet}
SHAPES = json.loads((FIXTURES / "released_state_dict_shapes.json").read_text())
#: the released Semantic FPN / UperNet configs (the release has no Semantic FPN T config: see below)
RELEASED = sorted(name for name in SHAPES if name.startswith(("RALA_FPN_", "RALA_Uper_")))


def released(state: dict) -> torch.nn.Module:
    """The family's module built from ``state`` and loaded strictly (what ``from_released`` does)."""
    family = next(f for f in FAMILIES if f.matches(state))
    model = family.build(state)
    load_converted(model, family.convert(state, model), "<state dict>")
    return model.eval()


@pytest.fixture(scope="module", params=sorted(FAMILY))
def fixture(request: pytest.FixtureRequest) -> dict:
    return torch.load(FIXTURES / f"official_full_{request.param}.pt", weights_only=True)


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal to float32 rounding: max error within 1e-5 of the tensor's largest magnitude."""
    return ours.shape == theirs.shape and (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_each_family_recognises_its_own_file_only(fixture: dict) -> None:
    assert [f.name for f in FAMILIES if f.matches(fixture["state_dict"])] == [fixture["family"]]


def test_every_tensor_is_mapped_and_widths_come_from_the_shapes(fixture: dict) -> None:
    state = fixture["state_dict"]
    model = released(state)
    assert type(model) is {"semantic_fpn": SemanticFPN, "upernet": UperNet}[fixture["family"]]
    assert len(model.state_dict()) == len(state)  # one of ours per tensor of theirs, none left at init
    assert model.backbone.out_channels == [8, 16, 24, 32] and model.backbone.num_heads == [1, 2, 3, 4]
    assert model.decode_head.classifier[1].out_channels == 150
    if fixture["family"] == "upernet":  # the released UperNet keeps its auxiliary head: loaded too
        assert torch.equal(model.auxiliary_head.classifier[1].weight, state["auxiliary_head.conv_seg.weight"])


def test_backbone_neck_and_heads_match_the_authors(fixture: dict) -> None:
    model, out = released(fixture["state_dict"]), fixture["outputs"]
    with torch.no_grad():
        for i, image in enumerate(fixture["inputs"]["batch"]):  # 60×91 and 60×60: odd sizes round up
            features = model.backbone(image)
            assert all(close(a, b) for a, b in zip(features, out["backbone"][i], strict=True))
            if model.neck is not None:
                assert all(close(a, b) for a, b in zip(model.neck(features), out["neck"][i], strict=True))
            assert close(model(image), out["decode_logits"][i])
            if model.auxiliary_head is not None:  # mmseg skips it at test; stored to check its tensors
                assert close(model.auxiliary_head(features[model.auxiliary_index]), out["aux_logits"][i])


def test_predict_preprocessed_gives_the_authors_class_maps(fixture: dict) -> None:
    model, out = released(fixture["state_dict"]), fixture["outputs"]
    sizes = [meta["ori_shape"][:2] for meta in fixture["inputs"]["img_metas"]]
    logits = model.predict_preprocessed(fixture["inputs"]["batch"], sizes)
    for i, (size, per_image) in enumerate(zip(sizes, logits, strict=True)):
        assert per_image.shape == (150, *size)
        probs = per_image.softmax(0)
        assert torch.equal(probs.argmax(0), out["seg_pred"][i].long())
        assert (probs.max(0).values - out["seg_prob_max"][i]).abs().max() < 1e-5


def test_predict_preprocessed_wants_one_unpadded_image_per_forward() -> None:
    fx = torch.load(FIXTURES / "official_full_upernet.pt", weights_only=True)
    model = released(fx["state_dict"])
    with pytest.raises(ValueError, match=r"image 0 has shape \(2, 3, 60, 60\)"):
        model.predict_preprocessed([torch.zeros(2, 3, 60, 60)], [(50, 50)])
    with pytest.raises(ValueError, match="2 images but 1 original sizes"):
        model.predict_preprocessed(fx["inputs"]["batch"], [(50, 50)])


# -- the full-size released files -------------------------------------------------------------------
def fpn_t_shapes() -> dict[str, list[int]]:
    """Semantic FPN T (``fpn_t_1x.pth``, no config in the release): the S layout with T's backbone.

    The backbone keys come from RetinaNet T (same backbone), the neck laterals take T's stage widths.
    """
    tiny_backbone = {k: v for k, v in SHAPES["retinanet_t_1x.py"].items() if k.startswith("backbone.")}
    heads = {k: v for k, v in SHAPES["RALA_FPN_s_1x.py"].items() if not k.startswith("backbone.")}
    widths = [tiny_backbone[f"backbone.extra_norms.{i}.norm.weight"][0] for i in range(4)]
    for i, width in enumerate(widths):
        heads[f"neck.lateral_convs.{i}.conv.weight"] = [256, width, 1, 1]
    return {**tiny_backbone, **heads}


def synthetic_state(shapes: dict[str, list[int]], device: str = "cpu") -> dict[str, torch.Tensor]:
    """An authors'-format state dict with exactly these keys and shapes: small weights, unit variances."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long, device=device)
        elif key.endswith("running_var") or device == "meta":
            state[key] = torch.ones(shape, device=device)
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.02
    return state


FULL_SIZE = {**{name: SHAPES[name] for name in RELEASED}, "fpn_t_1x": fpn_t_shapes()}


@pytest.fixture
def no_weight_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor is overwritten by the load: skip the backbone's slow trunc-normal init."""
    monkeypatch.setattr("ravlt_pl.models.ravlt.trunc_normal_", lambda tensor, **kwargs: tensor)


def test_the_release_has_three_semantic_fpn_and_three_upernet_configs() -> None:
    assert RELEASED == [f"RALA_{head}_{v}_{x}.py" for head, x in (("FPN", "1x"), ("Uper", "2x")) for v in "bls"]


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_released_layout_builds_loads_whole_and_runs(name: str, no_weight_init) -> None:
    state = synthetic_state(FULL_SIZE[name])
    model = released(state)
    assert len(model.state_dict()) == len(state)
    variant = re.search(r"_([tsbl])_", name)[1]
    assert model.backbone.embed_dims[0] == (64 if variant in "ts" else 96)
    assert model.decode_head.classifier[1].out_channels == 150
    with torch.no_grad():
        (logits,) = model.predict_preprocessed([torch.randn(1, 3, 64, 96)], [(48, 72)])
    assert logits.shape == (150, 48, 72) and torch.isfinite(logits).all()


@pytest.mark.parametrize(("config", "other"), [("RALA_Uper_s_2x.py", "RALA_Uper_b_2x.py"),
                                               ("RALA_FPN_b_1x.py", "RALA_FPN_l_1x.py")])  # fmt: skip
def test_a_file_of_another_variant_fails_naming_the_key_and_both_shapes(config: str, other: str, no_weight_init):
    family = FAMILY["upernet" if "Uper" in config else "semantic_fpn"]
    with torch.device("meta"):  # shapes only: the mismatch is found before any tensor is copied
        model = family.build(synthetic_state(SHAPES[config], "meta"))
        state = synthetic_state(SHAPES[other], "meta")
    with pytest.raises(CheckpointError, match=r"backbone\.\S+ has shape \(\d+(, \d+)*,?\) in the checkpoint but \(\d+"):
        load_converted(model, family.convert(state, model), other)


def test_a_file_of_another_class_count_fails_naming_the_key_and_both_shapes() -> None:
    fx = torch.load(FIXTURES / "official_full_upernet.pt", weights_only=True)
    model = released(fx["state_dict"])  # 150 classes
    state = dict(fx["state_dict"])
    state["decode_head.conv_seg.weight"] = torch.zeros(19, 16, 1, 1)  # a 19-class (Cityscapes) head
    state["decode_head.conv_seg.bias"] = torch.zeros(19)
    message = r"decode_head.classifier.1.weight has shape \(19, 16, 1, 1\) in the checkpoint but \(150, 16, 1, 1\)"
    with pytest.raises(CheckpointError, match=message):
        load_converted(model, upernet.convert(state, model), "cityscapes.pth")


def test_a_key_no_module_of_ours_has_is_an_error_not_dropped() -> None:
    fx = torch.load(FIXTURES / "official_full_semantic_fpn.pt", weights_only=True)
    model = released(fx["state_dict"])
    state = {**fx["state_dict"], "decode_head.conv_seg_extra.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"decode_head.conv_seg_extra.weight has no place in SemanticFPN"):
        load_converted(model, semantic_fpn.convert(state, model), "x.pth")
    del state["decode_head.conv_seg_extra.weight"], state["neck.fpn_convs.3.conv.bias"]
    missing = r"1 tensors of SemanticFPN are not in the checkpoint, first neck.fpn.layer_blocks.3.0.bias"
    with pytest.raises(CheckpointError, match=missing):
        load_converted(model, semantic_fpn.convert(state, model), "x.pth")
