"""Rank analysis (``python -m ravlt_pl analyze-rank``): what the hooks record, the rank maths, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from ravlt_pl.analysis import RankProbe, effective_rank, numerical_rank
from ravlt_pl.analysis.loading import build_model, load_weights
from ravlt_pl.analysis.rank import parse_args
from ravlt_pl.cli import main as cli_main
from ravlt_pl.models import CheckpointError
from tests.conftest import TINY


@pytest.fixture
def model() -> torch.nn.Module:
    """A tiny RAVLT whose qkvo weights are large enough for the key re-weighting to matter."""
    torch.manual_seed(0)
    net = build_model("ravlt_t", TINY)
    for stage in net.layers:
        for block in stage.blocks:
            block.attn.qkvo.weight.data.normal_(0, 0.3)
    return net


def images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def reference_kv(attn, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, reweight: bool) -> torch.Tensor:
    """kᵀv / N of one attention module written out from its qkvo weights: (B, heads, d, d)."""
    b, c, h, w = x.shape
    n, heads, d = h * w, attn.num_heads, attn.head_dim
    tokens = x.flatten(2).transpose(1, 2) @ attn.qkvo.weight[:, :, 0, 0].T + attn.qkvo.bias  # (B, N, 4C)
    q, k, v = (tokens[..., i * c : (i + 1) * c].reshape(b, n, heads, d).transpose(1, 2) for i in range(3))
    q, k = F.elu(q) + 1, F.elu(k) + 1
    if reweight:
        weights = torch.softmax(d**-0.5 * q.mean(2, keepdim=True) @ k.transpose(-1, -2), dim=-1)  # (B, heads, 1, N)
        k = k * weights.transpose(-1, -2) * n
    rotated = torch.stack((-k[..., 1::2], k[..., 0::2]), dim=-1).flatten(-2)  # (-k1, k0, -k3, k2, ...)
    k = k * cos + rotated * sin
    return torch.einsum("bhnd,bhne->bhde", k, v) / n


@pytest.mark.parametrize("block", ["layers.0.blocks.0", "layers.1.blocks.0"])
def test_recorded_kv_buffer_is_k_transpose_v_for_rala_and_plain(model, block):
    attn = model.get_submodule(block).attn
    inputs = []
    handle = attn.register_forward_pre_hook(lambda module, args: inputs.append(args))
    with torch.no_grad(), RankProbe(model, kinds=("rala", "plain"), keep_tensors=True) as probe:
        model.forward_features(images())
    handle.remove()
    x, sin, cos = inputs[0]
    for kind, reweight in (("rala", True), ("plain", False)):
        recorded = probe.tensors[(block, kind, "kv")][0]
        expected = reference_kv(attn, x, sin, cos, reweight)
        assert recorded.shape == (2, attn.num_heads, attn.head_dim, attn.head_dim)
        torch.testing.assert_close(recorded, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(probe.tensors[(block, "rala", "kv")][0], probe.tensors[(block, "plain", "kv")][0])


@pytest.mark.parametrize("rank", [1, 3, 7, 16])
def test_numerical_rank_of_a_constructed_rank_r_matrix_is_r(rank):
    g = torch.Generator().manual_seed(rank)
    matrices = torch.randn(2, 3, 50, rank, generator=g) @ torch.randn(2, 3, rank, 16, generator=g)  # (2, 3, 50, 16)
    assert numerical_rank(matrices).eq(rank).all()
    assert numerical_rank(matrices.transpose(-1, -2)).eq(rank).all()


def test_effective_rank_counts_equal_singular_values_and_is_zero_for_zero():
    assert effective_rank(torch.eye(8)).item() == pytest.approx(8.0)
    assert effective_rank(torch.ones(5, 4)).item() == pytest.approx(1.0)
    assert numerical_rank(torch.zeros(4, 4)).item() == 0
    assert effective_rank(torch.zeros(4, 4)).item() == 0.0


def test_switching_off_reweighting_and_gate_changes_the_numbers(model):
    with torch.no_grad(), RankProbe(model, kinds=("rala", "plain")) as probe:
        model.forward_features(images())
    first = "layers.0.blocks.0"
    for feature in ("kv", "pre_proj"):
        rala = torch.cat(probe.records[(first, "rala", feature)]["effective_rank"])
        plain = torch.cat(probe.records[(first, "plain", feature)]["effective_rank"])
        assert (rala - plain).abs().max() > 1e-3, feature

    # The module's own switches give what the probe measured as "plain" on the same block input.
    for stage in model.layers[:2]:
        for block in stage.blocks:
            block.attn.reweight_keys = block.attn.gate = False
    with torch.no_grad(), RankProbe(model, kinds=("plain",)) as switched:
        model.forward_features(images())
    for feature in ("kv", "out", "pre_proj"):
        for stat in ("rank", "effective_rank"):
            torch.testing.assert_close(switched.records[(first, "plain", feature)][stat][0],
                                       probe.records[(first, "plain", feature)][stat][0])  # fmt: skip


def test_analyze_rank_command_writes_json_markdown_and_png(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"variant": "ravlt_t", "backbone_overrides": TINY}}}))
    rng = np.random.default_rng(0)
    for i in range(3):  # a nested folder of images of mixed sizes and formats
        path = tmp_path / "imgs" / f"sub{i % 2}" / f"img{i}.{'png' if i else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "report"
    cli_main(["analyze-rank", "--config", str(config), "--images", str(tmp_path / "imgs"), "--num-images", "3",
              "--image-size", "64", "--out", str(out)])  # fmt: skip

    data = json.loads((out / "rank.json").read_text())
    assert data["headline"]["name"] == "kv_rank_fraction/rala" and 0 < data["headline"]["value"] <= 1
    assert data["run"]["num_images"] == 3 and len(data["blocks"]) == sum(TINY["depths"])
    assert [s["attention"] for s in data["stages"]] == ["linear", "linear", "softmax", "softmax"]
    assert set(data["stages"][0]["kinds"]) == {"rala", "plain", "softmax"} and set(data["stages"][3]["kinds"]) == {
        "softmax"
    }
    first = data["blocks"][0]["kinds"]["rala"]["kv"]
    assert len(first["rank"]) == 3 and len(first["rank"][0]) == TINY["num_heads"][0]
    markdown = (out / "rank.md").read_text()
    assert "| stage | attention | kind |" in markdown and "softmax*" in markdown
    for name in ("rank_blocks.png", "rank_hist.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_checkpoints_load_by_suffix_from_lightning_and_the_authors_form(model, official_cls, tmp_path):
    state = model.state_dict()
    lightning = {
        "pytorch-lightning_version": "2",
        "state_dict": {f"model.backbone.body.{k}": v for k, v in state.items()},
    }
    lightning["state_dict"].update({f"ema.module.backbone.body.{k}": v + 1 for k, v in state.items()})
    torch.save(lightning, tmp_path / "ours.ckpt")
    key = "layers.0.blocks.0.attn.qkvo.weight"
    for use_ema, offset in ((False, 0), (True, 1)):
        fresh = build_model("ravlt_t", TINY)
        load_weights(fresh, tmp_path / "ours.ckpt", use_ema=use_ema)
        torch.testing.assert_close(fresh.state_dict()[key], state[key] + offset)

    torch.save({"model": official_cls["state_dict"]}, tmp_path / "official.pth")  # authors' names (RoPE)
    config = {k: v for k, v in official_cls["config"].items() if k != "num_classes"}
    fresh = build_model("ravlt_t", config)
    load_weights(fresh, tmp_path / "official.pth")
    torch.testing.assert_close(fresh.state_dict()[key], official_cls["state_dict"][key])

    partial = {k: v for k, v in state.items() if not k.startswith("layers.3.")}
    torch.save({"pytorch-lightning_version": "2", "state_dict": {f"model.{k}": v for k, v in partial.items()}},
               tmp_path / "partial.ckpt")  # fmt: skip
    with pytest.raises(CheckpointError, match="backbone tensors missing"):
        load_weights(build_model("ravlt_t", TINY), tmp_path / "partial.ckpt")


@pytest.mark.parametrize("config", ["cls_b.yaml", "det/maskrcnn_b_1x.yaml", "seg/upernet_b_160k.yaml"])
def test_every_task_config_names_its_backbone_variant(config):
    """Detection configs hold the variant inside the detector; it must not fall back to the default."""
    from ravlt_pl.analysis.loading import backbone_spec
    from ravlt_pl.cli import resolve_config

    variant, _ = backbone_spec(yaml.safe_load(open(resolve_config(config))))
    assert variant == "ravlt_b"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-images", "abc"], "error: --num-images: expected int, got 'abc'"),
        (["--backbone-overrides", "{bad"], "error: --backbone-overrides: expected dict | None, got '{bad'"),
        (["--rtol", "x"], "error: --rtol: expected float | None, got 'x'"),
        (["--kinds", "nope"], "error: --kinds must name some of rala,plain,softmax, got nope"),
        (["--num-images", "0"], "error: --num-images must be at least 1"),
        (["--nope", "1"], "error: unrecognized arguments: --nope 1"),
    ],
)
def test_bad_options_fail_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", "cls_t.yaml", *argv])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == message


def test_options_are_typed_and_print_config_round_trips_through_options(tmp_path, capsys):
    args = parse_args(["--config", "c.yaml", "--backbone-overrides", '{"depths": [1, 1, 1, 1]}', "--use-ema",
                       "--num-images", "3", "--kinds", "rala, softmax"])  # fmt: skip
    assert args.backbone_overrides == {"depths": [1, 1, 1, 1]} and args.use_ema and args.num_images == 3
    assert args.kinds == ["rala", "softmax"] and args.batch_size == 4 and args.rtol is None  # defaults as before
    with pytest.raises(SystemExit):
        parse_args(["--config", "c.yaml", "--num-images", "3", "--rtol", "1e-5", "--print_config"])
    (tmp_path / "rank.yaml").write_text(capsys.readouterr().out)
    again = parse_args(["--options", str(tmp_path / "rank.yaml")])
    assert (again.config, again.num_images, again.rtol, again.seed) == ("c.yaml", 3, 1e-5, 0)
