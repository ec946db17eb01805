"""Semantic segmentation on RAVLT: the encoder–decoder wrapper, Semantic FPN and UperNet."""

from .heads import FCNHead, PixelClassifier
from .segmentor import EncoderDecoder, keep_ratio_size, resize
from .semantic_fpn import FPNHead, FPNNeck, SemanticFPN
from .upernet import PyramidPoolingModule, UPerHead, UperNet

__all__ = [
    "EncoderDecoder", "resize", "keep_ratio_size", "SemanticFPN", "UperNet", "FPNNeck", "FPNHead", "FCNHead",
    "PixelClassifier", "UPerHead", "PyramidPoolingModule",
]  # fmt: skip
