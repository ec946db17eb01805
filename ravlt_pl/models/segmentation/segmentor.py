"""The encoder–decoder segmentor: backbone (+ neck) + decode head (+ auxiliary head), and its inference.

Each published segmentor is a subclass that assembles its parts in ``__init__(backbone,
num_classes, ...)`` (torchvision's style): :class:`~.semantic_fpn.SemanticFPN`,
:class:`~.upernet.UperNet`. The task builds the backbone and calls the class a config names by
``class_path``, so another decoder is one new file with one such subclass.

Inference follows mmseg 0.13's ``EncoderDecoder``: ``whole`` runs the image at once (the
published setting), ``slide`` averages overlapping crops; ``aug_test`` is its multi-scale + flip
test (the mean of each view's softmax at the output size), ``predict`` that of one input resized by
ratios, and ``predict_preprocessed`` its single-image test path on inputs its pipeline made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

InferenceMode = Literal["whole", "slide"]


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of logits or images, ``align_corners=False`` (mmseg's default)."""
    size = tuple(int(s) for s in size)
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class EncoderDecoder(nn.Module):
    """``forward`` gives the decode head's logits at stride 4; the rest is training and test plumbing.

    Args:
        backbone: returns a list of maps (strides 4/8/16/32).
        decode_head: maps the (neck's) list of maps to logits at stride 4.
        neck: optional map-list → map-list module (Semantic FPN's FPN).
        auxiliary_head: optional head on one backbone map, used only for the training loss.
        auxiliary_index: which backbone map the auxiliary head reads (2 = stage 3).
        auxiliary_weight: the auxiliary head's weight in the training loss (mmseg's ``loss_weight``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: nn.Module,
        neck: nn.Module | None = None,
        auxiliary_head: nn.Module | None = None,
        auxiliary_index: int = 2,
        auxiliary_weight: float = 0.4,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.auxiliary_index = auxiliary_index
        #: weight of each ``forward_train`` output's loss
        self.loss_weights = {"decode": 1.0, "aux": auxiliary_weight}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → logits (B, K, ~H/4, ~W/4)."""
        return self.forward_train(images)["decode"]

    def forward_train(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits at stride 4 of the decode head (``decode``) and, if any, the auxiliary head (``aux``)."""
        features = self.backbone(images)
        out = {"decode": self.decode_head(self.neck(features) if self.neck is not None else features)}
        if self.auxiliary_head is not None and self.training:
            out["aux"] = self.auxiliary_head(features[self.auxiliary_index])
        return out

    def encode_decode(self, images: torch.Tensor) -> torch.Tensor:
        """Logits resized to the input size (B, K, H, W)."""
        return resize(self(images), images.shape[-2:])

    def slide_inference(self, images: torch.Tensor, crop_size: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
        """Average logits of ``crop_size`` windows every ``stride`` px; the last window is flush with the border."""
        (h_crop, w_crop), (h_stride, w_stride) = crop_size, stride
        batch, _, height, width = images.shape
        rows = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
        cols = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
        logits = counts = None
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * h_stride + h_crop, height), min(c * w_stride + w_crop, width)
                y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
                crop = self.encode_decode(images[:, :, y1:y2, x1:x2])
                if logits is None:
                    logits = crop.new_zeros(batch, crop.shape[1], height, width)
                    counts = crop.new_zeros(1, 1, height, width)
                logits[:, :, y1:y2, x1:x2] += crop
                counts[:, :, y1:y2, x1:x2] += 1
        return logits / counts

    def inference(
        self,
        images: torch.Tensor,
        mode: InferenceMode = "whole",
        crop_size: Sequence[int] = (512, 512),
        stride: Sequence[int] = (341, 341),
    ) -> torch.Tensor:
        """Logits (B, K, H, W) at the input size, by ``whole`` image or ``slide``-window inference."""
        if mode == "whole":
            return self.encode_decode(images)
        if mode == "slide":
            return self.slide_inference(images, crop_size, stride)
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")

    @torch.no_grad()
    def predict_preprocessed(
        self, images: Sequence[torch.Tensor], original_sizes: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """mmseg's single-scale test, one image per forward: per image (K, H, W) logits at its original size.

        ``images``: (1, 3, h, w) each, resized and normalised by the authors' test pipeline, not padded
        (stride-2 convs round odd sizes up). The decode head's logits are resized (bilinear) to the
        input size, then to ``original_sizes[i]`` (H, W), as ``EncoderDecoder.whole_inference`` does.
        """
        if len(images) != len(original_sizes):
            raise ValueError(f"{len(images)} images but {len(original_sizes)} original sizes")
        for i, image in enumerate(images):
            if image.dim() != 4 or image.shape[:2] != (1, 3):
                raise ValueError(f"image {i} has shape {tuple(image.shape)}; expected (1, 3, h, w): one per forward")
        return [resize(self.encode_decode(x), size)[0] for x, size in zip(images, original_sizes)]

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        out_size: Sequence[int] | None = None,
        mode: InferenceMode = "whole",
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        crop_size: Sequence[int] = (512, 512),
        stride: Sequence[int] = (341, 341),
    ) -> torch.Tensor:
        """Class probabilities (B, K, *out_size): :meth:`aug_test` of the input resized by each of ``scales``
        (to ``int(h·s + 0.5)`` × ``int(w·s + 0.5)``; mmseg's ratios 0.5–1.75 for multi-scale)."""
        height, width = images.shape[-2:]
        views = [resize(images, (int(height * s + 0.5), int(width * s + 0.5))) for s in scales]
        return self.aug_test(views, out_size or (height, width), mode, flip, crop_size, stride)

    @torch.no_grad()
    def aug_test(
        self,
        views: Sequence[torch.Tensor],
        out_size: Sequence[int],
        mode: InferenceMode = "whole",
        flip: bool = False,
        crop_size: Sequence[int] = (512, 512),
        stride: Sequence[int] = (341, 341),
    ) -> torch.Tensor:
        """mmseg's ``aug_test``: class probabilities (B, K, *out_size), the mean over ``views`` (× flip).

        Each view (B, 3, h_i, w_i), and its horizontal flip, gives logits at its own size, resized to
        ``out_size`` (the original image's size), turned into a softmax and flipped back. One view
        without flip is mmseg's single-scale test.
        """
        out_size = tuple(out_size)
        probs = None
        for scaled in views:
            for flipped in (False, True) if flip else (False,):
                view = scaled.flip(-1) if flipped else scaled
                logits = self.inference(view, mode, crop_size, stride).float()  # bf16 under autocast
                p = resize(logits, out_size).softmax(dim=1)
                p = p.flip(-1) if flipped else p
                probs = p if probs is None else probs + p
        return probs / (len(views) * (2 if flip else 1))
