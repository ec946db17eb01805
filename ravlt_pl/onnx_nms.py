"""``torchvision::nms`` in ONNX, for :mod:`ravlt_pl.export`: onnxscript has no translation of its own.

ONNX ``NonMaxSuppression`` over one batch and one class: IoU > threshold suppresses and the kept boxes
come by descending score, as in torchvision. (A module of its own, without ``from __future__ import
annotations``: onnxscript reads the type annotations as objects. Imported only for an ONNX export.)
"""

import onnxscript
from onnxscript import FLOAT, INT64
from onnxscript import opset18 as op


@onnxscript.script(opset=op)
def nms(boxes: FLOAT, scores: FLOAT, iou_threshold: float) -> INT64:
    selected = op.NonMaxSuppression(  # (K, 3): batch, class, box
        op.Unsqueeze(boxes, [0]), op.Unsqueeze(scores, [0, 1]), op.Shape(scores), op.Constant(value_float=iou_threshold)
    )
    return op.Reshape(op.Slice(selected, [2], [3], [1]), [-1])
