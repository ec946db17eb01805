"""Semantic FPN / UperNet on RAVLT: published sizes, output shapes, whole / sliding / multi-scale inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ravlt_pl.models import build_backbone
from ravlt_pl.models.segmentation import EncoderDecoder, FPNHead, SemanticFPN, UPerHead, UperNet
from tests.conftest import TINY

# The paper's Semantic FPN T/S/B/L and UperNet S/B/L parameter counts (M) at 150 classes.
PUBLISHED = [("fpn", "ravlt_t", 18), ("fpn", "ravlt_s", 28), ("fpn", "ravlt_b", 51), ("fpn", "ravlt_l", 98),
             ("upernet", "ravlt_s", 55), ("upernet", "ravlt_b", 77), ("upernet", "ravlt_l", 125)]  # fmt: skip


def segmentor(decoder: str, num_classes: int, variant: str, backbone_overrides: dict | None = None, **widths):
    backbone = build_backbone(variant, backbone_overrides, out_indices=(0, 1, 2, 3))
    return (SemanticFPN if decoder == "fpn" else UperNet)(backbone, num_classes, **widths)


def tiny(decoder: str, num_classes: int = 5) -> EncoderDecoder:
    torch.manual_seed(0)
    widths = dict(fpn_channels=32) if decoder == "fpn" else dict(aux_channels=16)
    return segmentor(decoder, num_classes, "ravlt_s", TINY, head_channels=32, **widths)


@pytest.fixture
def no_weight_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting needs shapes only: skip the backbone's trunc-normal init (slow on meta tensors)."""
    monkeypatch.setattr("ravlt_pl.models.ravlt.trunc_normal_", lambda tensor, **kwargs: tensor)


@pytest.mark.parametrize("decoder,variant,published", PUBLISHED)
def test_full_size_params_match_published(decoder: str, variant: str, published: int, no_weight_init) -> None:
    with torch.device("meta"):  # shapes only: no memory
        model = segmentor(decoder, 150, variant)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - published) <= 0.5, f"{decoder} {variant}: {params:.2f} M vs published {published} M"


def test_published_head_layout(no_weight_init) -> None:
    with torch.device("meta"):
        fpn, upernet = segmentor("fpn", 150, "ravlt_s"), segmentor("upernet", 150, "ravlt_s")
    assert isinstance(fpn.decode_head, FPNHead) and fpn.auxiliary_head is None
    assert [len([m for m in h if isinstance(m, torch.nn.Sequential)]) for h in fpn.decode_head.scale_heads] == [
        1,
        1,
        2,
        3,
    ]
    assert fpn.neck.out_channels == [256] * 4
    head = upernet.decode_head
    assert isinstance(head, UPerHead)
    assert [stage[0].output_size for stage in head.psp_modules] == [1, 2, 3, 6]
    assert head.fpn_bottleneck[0].in_channels == 4 * 512 and head.fpn_bottleneck[0].out_channels == 512
    assert head.classifier[0].p == 0.1 and head.classifier[1].out_channels == 150
    assert upernet.auxiliary_index == 2 and upernet.auxiliary_head.convs[0][0].in_channels == 320
    assert upernet.auxiliary_head.convs[0][0].out_channels == 256
    assert fpn.loss_weights["decode"] == upernet.loss_weights["decode"] == 1.0 and upernet.loss_weights["aux"] == 0.4


@pytest.mark.parametrize("decoder", ["fpn", "upernet"])
def test_logits_at_stride_4_and_aux_only_in_training(decoder: str) -> None:
    model = tiny(decoder).train()
    out = model.forward_train(torch.randn(2, 3, 64, 96))
    assert out["decode"].shape == (2, 5, 16, 24)
    assert ("aux" in out) == (decoder == "upernet")
    if decoder == "upernet":
        assert out["aux"].shape == (2, 5, 4, 6)  # stage 3, stride 16
    model.eval()
    assert set(model.forward_train(torch.randn(1, 3, 64, 96))) == {"decode"}
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 5, 16, 24)


@pytest.mark.parametrize("decoder", ["fpn", "upernet"])
def test_odd_sizes_are_resized_back_to_the_input(decoder: str) -> None:
    model = tiny(decoder).eval()
    with torch.no_grad():
        assert model.encode_decode(torch.randn(1, 3, 50, 77)).shape == (1, 5, 50, 77)


@pytest.mark.parametrize("decoder", ["fpn", "upernet"])
def test_sliding_equals_whole_when_the_crop_covers_the_image(decoder: str) -> None:
    model = tiny(decoder).eval()
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        whole = model.inference(images, "whole")
        slide = model.inference(images, "slide", crop_size=(64, 64), stride=(32, 32))
    assert torch.equal(slide, whole)


def test_sliding_windows_cover_every_pixel_and_average_overlaps() -> None:
    model = tiny("fpn").eval()
    images = torch.randn(1, 3, 40, 72)
    with torch.no_grad():
        slide = model.inference(images, "slide", crop_size=(32, 32), stride=(21, 21))
        # windows: rows 0-32, 8-40; cols 0-32, 21-53, 40-72 (the last flush with the border)
        corner = model.encode_decode(images[:, :, 8:40, 40:72])
    assert slide.shape == (1, 5, 40, 72) and torch.isfinite(slide).all()
    assert torch.allclose(slide[:, :, 32:, 53:], corner[:, :, 24:, 13:], atol=1e-6)  # covered by one window only


def test_predict_is_a_distribution_at_the_requested_size() -> None:
    model = tiny("upernet").eval()
    images = torch.randn(2, 3, 48, 64)
    probs = model.predict(images, out_size=(96, 128))
    assert probs.shape == (2, 5, 96, 128)
    assert torch.allclose(probs.sum(1), torch.ones(2, 96, 128), atol=1e-5)
    logits = torch.nn.functional.interpolate(model.inference(images), size=(96, 128), mode="bilinear")
    assert torch.equal(probs.argmax(1), logits.argmax(1))


def test_multi_scale_flip_averages_every_view() -> None:
    model = tiny("fpn").eval()
    images = torch.randn(1, 3, 48, 64)
    scales = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    probs = model.predict(images, scales=scales, flip=True)
    views = [model.predict(images, scales=[s]) for s in scales]
    views += [model.predict(images.flip(-1), scales=[s]).flip(-1) for s in scales]
    assert probs.shape == (1, 5, 48, 64)
    assert torch.allclose(probs, torch.stack(views).mean(0), atol=1e-6)


def test_aug_test_is_mmsegs_each_views_softmax_at_the_original_size() -> None:
    """mmseg 0.13 ``aug_test``: per view, logits at the view's size → bilinear to ``ori_shape`` → softmax →
    flipped back; the mean over views."""
    model = tiny("upernet").eval()
    views, original = [torch.randn(1, 3, 24, 32), torch.randn(1, 3, 61, 81)], (45, 60)
    probs = model.aug_test(views, original, flip=True)
    expected = []
    with torch.no_grad():
        for view in views:
            for flip in (False, True):
                logits = model.decode_head(model.backbone(view.flip(-1) if flip else view))
                logits = F.interpolate(logits, size=view.shape[-2:], mode="bilinear", align_corners=False)
                p = F.interpolate(logits, size=original, mode="bilinear", align_corners=False).softmax(1)
                expected.append(p.flip(-1) if flip else p)
    assert probs.shape == (1, 5, *original)
    assert torch.allclose(probs, torch.stack(expected).mean(0), atol=1e-6)


def test_unknown_inference_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="inference mode"):
        tiny("fpn").inference(torch.randn(1, 3, 32, 32), "tiles")  # type: ignore[arg-type]
