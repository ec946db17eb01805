"""Semantic segmentation on RAVLT: Semantic FPN and UperNet heads and the encoder–decoder wrapper."""

from .heads import FCNHead, FPNHead, FPNNeck, PixelClassifier
from .segmentor import EncoderDecoder, build_segmentor, resize
from .upernet import PyramidPoolingModule, UPerHead

__all__ = [
    "EncoderDecoder", "build_segmentor", "resize", "FPNNeck", "FPNHead", "FCNHead", "PixelClassifier",
    "UPerHead", "PyramidPoolingModule",
]  # fmt: skip
