"""Semantic segmentation on RAVLT: the encoder–decoder wrapper, Semantic FPN and UperNet."""

from .heads import FCNHead, PixelClassifier
from .segmentor import EncoderDecoder, resize
from .semantic_fpn import FPNHead, FPNNeck, SemanticFPN
from .upernet import PyramidPoolingModule, UPerHead, UperNet

__all__ = [
    "EncoderDecoder", "resize", "SemanticFPN", "UperNet", "FPNNeck", "FPNHead", "FCNHead",
    "PixelClassifier", "UPerHead", "PyramidPoolingModule",
]  # fmt: skip
