"""``python -m ravlt_pl export --config X.yaml [--ckpt PATH] --format onnx|pt2 --out FILE [--input-size H W]``.

Exports the network a config builds, as ONNX (``torch.onnx.export(..., dynamo=True)``; needs the
``export`` extra) or as a ``torch.export`` program (``.pt2``). What is exported, per task:

* classification: the whole classifier, images ``(B, 3, H, W)`` → logits ``(B, classes)``;
* segmentation: the encoder–decoder's ``whole`` inference, images → logits at the input size
  ``(B, classes, H, W)`` (softmax / argmax and test-time augmentation stay with the caller);
* RetinaNet, Faster and Mask R-CNN: the whole detector (:mod:`ravlt_pl.models.detection.whole`: backbone,
  FPN, anchors, box decoding, the authors' candidate selection and NMS; the R-CNNs' RPN, RoIAlign, box
  head and mask head), images ``(1, 3, H, W)`` → the first ``detections_per_img`` (100) detections,
  zero-padded: boxes ``(1, 100, 4)`` in input pixels, scores ``(1, 100)``, labels ``(1, 100)`` (−1: none),
  Mask R-CNN's mask probabilities ``(1, 100, 28, 28)`` in each box (pasting them, mmdet's per-box crop of
  data-dependent size, stays with the caller: ``models.detection.paste_masks``). One image per call;
  height and width dynamic from 160 (:data:`DETECTOR_LEAST`) or fixed (``--static``). The graph holds
  non-ATen operators ``torchvision::nms`` and (R-CNN) ``torchvision::roi_align``: a ``.pt2`` needs
  ``import torchvision`` where it is loaded; the ONNX model maps them onto ``NonMaxSuppression`` and
  ``RoiAlign``. ONNX Runtime's rounding differs from PyTorch's, and on noise images that reorders an
  R-CNN's NMS ties: pass real images (``check_images``) to compare on;
* Cascade Mask R-CNN: the backbone with its FPN, images → the FPN maps (``"0"``, ``"1"``, ... and the
  extra levels), in torchvision's order. The RPN, cascade stages and NMS stay in Python.

Images are normalised as in training (ImageNet mean/std). The graph is plain ATen: the backbone's fast
kernels (the ``ravlt_pl::rope_tables`` op, oneDNN fused convolutions, cached folds) are switched off
while tracing (:meth:`RAVLT.set_fast_path <ravlt_pl.models.RAVLT.set_fast_path>`), so the ONNX model
holds standard operators only and the ``.pt2`` loads with ``torch.export.load`` in a process that never
imports ravlt_pl. Batch, height and width are dynamic by default (height and width multiples of 32,
at least 64); ``--static`` fixes the input to one ``(1, 3, H, W)``.

Before the file replaces ``--out`` (written to a temporary file beside it, then renamed), the export
is run — onnxruntime for ONNX, ``torch.export.load`` for ``.pt2`` — and compared with the eager model
at ``--input-size`` and, when dynamic, at a second batch size and shape; a max abs error above
``--atol`` (1e-4) fails the export.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from jsonargparse import ActionConfigFile, Namespace
from torch import nn

from .command_options import OneLineErrorParser
from .config import PROG, ConfigError, resolve_config
from .data.errors import DatasetError
from .ema import PREFIX as EMA_PREFIX
from .lightning_cli import build_cli
from .models import RAVLT, load_official
from .models.checkpoint import CheckpointError, read_checkpoint
from .models.detection.backbone import RAVLTWithFPN
from .models.detection.detectors import RAVLTTwoStage
from .models.detection.retinanet import RAVLTRetinaNet
from .models.detection.whole import WholeRetinaNet, WholeTwoStage
from .models.segmentation.segmentor import EncoderDecoder
from .reports import atomic_write

ExportFormat = Literal["onnx", "pt2"]
FORMATS: tuple[ExportFormat, ...] = ("onnx", "pt2")
#: Height and width of every RAVLT input are multiples of the last stage's stride.
STRIDE = 32
#: Smallest dynamic height / width of a whole detector: RetinaNet's P7 (stride 128) of at least 2 × 2, else the
#: traced graph is specialised to a one-cell level.
DETECTOR_LEAST = 5 * STRIDE
#: The non-ATen operators a whole detector's graph holds (``import torchvision`` registers them where a .pt2 loads)
DETECTOR_OPERATORS = ("torchvision.nms.default", "torchvision.roi_align.default")


class ExportError(RuntimeError):
    """An export that cannot be made or does not reproduce the eager model; the message says why."""


class WholeImageSegmentor(nn.Module):
    """A segmentor's ``whole`` inference as ``forward``: images → logits at the input size."""

    def __init__(self, segmentor: EncoderDecoder) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmentor.encode_decode(images)  # (B, classes, H, W)


def exportable(network: nn.Module) -> tuple[nn.Module, str]:
    """The part of a task's network that exports, and what it maps (for messages)."""
    if isinstance(network, RAVLTRetinaNet):
        count = network.detections_per_img
        return WholeRetinaNet(network), (
            f"whole RetinaNet: one image (1, 3, H, W) -> boxes (1, {count}, 4), scores (1, {count}), "
            f"labels (1, {count}); input pixels, label -1 = no detection"
        )
    if isinstance(network, RAVLTTwoStage):
        count, masks = network.roi_heads.detections_per_img, network.roi_heads.has_mask()
        return WholeTwoStage(network), (
            f"whole {type(network).__name__}: one image (1, 3, H, W) -> boxes (1, {count}, 4), scores (1, {count}), "
            f"labels (1, {count})" + (f", mask probabilities (1, {count}, 28, 28) in each box" if masks else "")
            + "; input pixels, label -1 = no detection"
        )  # fmt: skip
    if isinstance(network, EncoderDecoder):
        return WholeImageSegmentor(network), "segmentor: images (B, 3, H, W) -> logits (B, classes, H, W)"
    if isinstance(network, RAVLT) and network.out_indices is None:
        return network, f"classifier: images (B, 3, H, W) -> logits (B, {network.num_classes})"
    if isinstance(network, RAVLT):
        return network, f"backbone: images (B, 3, H, W) -> stage maps {list(network.out_indices)}"
    if isinstance(getattr(network, "backbone", None), RAVLTWithFPN):
        return network.backbone, (
            f"detector backbone + FPN only: images (B, 3, H, W) -> FPN maps ({network.backbone.out_channels} channels); "
            f"a whole {type(network).__name__} is not wired for export (RetinaNet, Faster and Mask R-CNN are): "
            "its RPN, RoI heads and NMS stay in Python"
        )
    raise ExportError(f"no export for a {type(network).__name__} network (RAVLT, its segmentors and detectors only)")


def export_model(
    model: nn.Module,
    path: str | Path,
    format: ExportFormat = "onnx",
    input_size: Sequence[int] = (224, 224),
    dynamic: bool = True,
    atol: float = 1e-4,
    check_images: Sequence[torch.Tensor] = (),
) -> float:
    """Export ``model`` (images → tensors) to ``path``, check it against the eager model; returns the max abs error.

    ``dynamic``: batch, height and width are free (height and width multiples of 32, at least 64);
    else the input is ``(1, 3, *input_size)``. The model is put in eval mode; its fast paths are off
    during tracing only. Raises :class:`ExportError` (nothing written) when the export fails, holds a
    non-ATen operator, or differs from the eager model by more than ``atol``. ``check_images``: more
    inputs to compare on (real images: random ones give a detector nothing to detect); a whole detector
    given some is compared on them alone (and on them zero-padded to another size when dynamic).
    """
    path, (height, width) = check_request(path, format, input_size, dynamic)
    detector = isinstance(model, (WholeRetinaNet, WholeTwoStage))
    if detector and dynamic and min(height, width) < DETECTOR_LEAST:
        raise ExportError(f"input size {height}x{width}: a dynamic whole-detector export needs height and width of at "
                          f"least {DETECTOR_LEAST} (RetinaNet's P7 of 2x2 or more); --static exports smaller sizes")  # fmt: skip
    model.eval()
    batch = 2 if dynamic and not detector else 1  # a batch of 1 would be specialised to 1; a detector takes one image
    example = torch.randn(batch, 3, height, width)
    with torch.no_grad(), reference_kernels(model):
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(dynamic, detector))
    check_plain_aten(program, allowed=DETECTOR_OPERATORS if detector else ())
    if format == "onnx":
        from .onnx_nms import nms as onnx_nms

        translations = {torch.ops.torchvision.nms.default: onnx_nms} if detector else None
        program = torch.onnx.export(program, dynamo=True, input_names=["images"], verbose=False,
                                    custom_translation_table=translations)  # fmt: skip
    if detector and check_images:  # real images only: on noise, ties decided by rounding reorder a detector's NMS
        checks = [*check_images, *(F.pad(i, (0, 2 * STRIDE, 0, STRIDE)) for i in check_images[:1] if dynamic)]
    else:
        checks = [torch.randn(1, 3, height, width), *check_images]
        if dynamic:
            checks.append(torch.randn(batch, 3, height + STRIDE, width + 2 * STRIDE))
    errors: list[float] = []

    def write_and_check(tmp: Path) -> None:
        run = _save_onnx(program, tmp) if format == "onnx" else _save_pt2(program, tmp)
        for images in checks:
            with torch.no_grad():
                expected = _leaves(model(images))
            got = run(images)
            if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in expected]:
                raise ExportError(f"{path}: the export's output shapes {[tuple(t.shape) for t in got]} differ from eager "
                                  f"{[tuple(t.shape) for t in expected]} at input {tuple(images.shape)}")  # fmt: skip
            errors.append(max((g - e).abs().max().item() for g, e in zip(got, expected)))
        if max(errors) > atol:
            noise = (
                " on random images, where a detector's NMS ties fall by rounding"
                if detector and not check_images
                else ""
            )
            raise ExportError(f"{path}: the export differs from the eager model by {max(errors):.3g} > atol {atol:g}"
                              f"{noise}; nothing written")  # fmt: skip

    atomic_write(path, write_and_check)
    return max(errors)


@contextmanager
def reference_kernels(model: nn.Module) -> Iterator[None]:
    """Every backbone inside ``model`` on its reference (plain ATen) path; the previous switches come back after."""
    previous = {module: module.fast for module in model.modules() if hasattr(module, "fast")}
    for module in model.modules():
        if hasattr(module, "set_fast_path"):  # RAVLT (as anywhere in a detector or segmentor)
            module.set_fast_path(False)
    try:
        yield
    finally:
        for module, fast in previous.items():
            module.fast = fast


def check_request(
    path: str | Path, format: str, input_size: Sequence[int], dynamic: bool
) -> tuple[Path, tuple[int, int]]:
    """``(path, (H, W))`` once the format's packages, the size and the target folder are fine
    (checked before the slow parts); :class:`ExportError` otherwise."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "onnx":
        _require_onnx()
    return _writable(Path(path)), _check_size(input_size, dynamic)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(
            f"ONNX export needs {err.name} (onnx, onnxscript, onnxruntime): pip install 'ravlt_pl[export]'"
        ) from None


def _check_size(input_size: Sequence[int], dynamic: bool) -> tuple[int, int]:
    if len(input_size) != 2:
        raise ExportError(f"input size must be (H, W), got {tuple(input_size)}")
    height, width = (int(s) for s in input_size)
    least = 2 * STRIDE if dynamic else STRIDE  # a dynamic side of 1 at the last stage would be specialised
    if height % STRIDE or width % STRIDE or min(height, width) < least:
        raise ExportError(
            f"input size {height}x{width}: height and width must be multiples of {STRIDE} and at least {least}"
            + (" (a static export takes 32)" if dynamic else "")
        )
    return height, width


def _writable(path: Path) -> Path:
    """``path`` if a file can be written there; fails before the (slow) export otherwise."""
    if path.is_dir():
        raise ExportError(f"{path}: is a directory; --out names the file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"{path}: cannot create its folder {path.parent} ({err.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"{path}: the folder {path.parent} is not writable")
    return path


def _dynamic_shapes(dynamic: bool, detector: bool = False) -> tuple[dict] | None:
    """The images' dynamic dimensions (by position: forwards name their argument differently); a whole
    detector takes one image of at least :data:`DETECTOR_LEAST` pixels a side."""
    if not dynamic:
        return None
    Dim = torch.export.Dim
    least = DETECTOR_LEAST // STRIDE if detector else 2
    sides = {2: STRIDE * Dim("height_32", min=least), 3: STRIDE * Dim("width_32", min=least)}
    return (sides if detector else {0: Dim("batch", min=1), **sides},)


def check_plain_aten(program: torch.export.ExportedProgram, allowed: Sequence[str] = ()) -> None:
    """Only ATen/prims operators (and torch's own higher-order ops, and ``allowed`` ones) anywhere in the graph."""
    foreign = sorted({
        str(node.target)
        for graph_module in program.graph_module.modules() if isinstance(graph_module, torch.fx.GraphModule)
        for node in graph_module.graph.nodes
        if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace not in ("aten", "prims")
        and str(node.target) not in allowed
    })  # fmt: skip
    if foreign:
        raise ExportError(f"the traced graph holds non-ATen operators {foreign}; an export would need them registered "
                          "to load (is the model's fast path off?)")  # fmt: skip


def _leaves(output) -> list[torch.Tensor]:
    """The output's tensors in ``torch.export``'s flattening order (tensor, list/tuple, dict values)."""
    if isinstance(output, torch.Tensor):
        return [output]
    items = output.values() if isinstance(output, dict) else output
    return [leaf for item in items for leaf in _leaves(item)]


def _save_onnx(program, path: Path) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """Write the ONNX model (one file) and return a runner of it in onnxruntime (CPU)."""
    import onnxruntime

    program.save(str(path), external_data=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: [torch.from_numpy(a) for a in session.run(None, {name: images.numpy()})]


def _save_pt2(program: torch.export.ExportedProgram, path: Path) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """Write the ``.pt2`` archive and return a runner of it as loaded back by ``torch.export.load``."""
    # Opened here: torch.export warns about file names not ending in .pt2 (the temporary one).
    with open(path, "wb") as f, warnings.catch_warnings():
        # Weights sharing storage (channels-last views) make torch warn; they load back correctly.
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, f)
    with open(path, "rb") as f:
        loaded = torch.export.load(f).module()
    return lambda images: _leaves(loaded(images))


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> tuple[Namespace, list[str]]:
    """Our options (jsonargparse: typed, ``--print_config``, ``--options FILE``), and the rest
    (``--model.init_args...``) for LightningCLI."""
    parser = OneLineErrorParser(
        prog="python -m ravlt_pl export",
        description="Export a config's network to ONNX or a torch.export .pt2, checked against eager PyTorch.",
        epilog="Exported: classification, the classifier (images -> logits); segmentation, the whole-image "
        "segmentor (images -> logits at the input size); RetinaNet, the whole detector (one image, sides of at "
        "least 160 unless --static; images -> boxes, scores, labels); other detectors, the backbone + FPN "
        "(images -> FPN maps). "
        "Other options (e.g. --model.init_args.backbone_overrides) go to the config as in fit.",
    )
    parser.add_argument("--options", action=ActionConfigFile, help="YAML file of these options (see --print_config)")
    parser.add_argument("--config", type=str, required=True, help="task config (a path or a name under configs/)")
    parser.add_argument(
        "--ckpt",
        type=str | None,
        default=None,
        help="weights: our Lightning checkpoint or the authors' release (default: the config's init)",
    )
    parser.add_argument("--use-ema", action="store_true", help="take the checkpoint's EMA weights")
    parser.add_argument(
        "--format", type=str, required=True, choices=FORMATS, help="onnx (needs ravlt_pl[export]) or pt2 (torch.export)"
    )
    parser.add_argument(
        "--out", type=str, required=True, help="file to write (replaced atomically once the check passes)"
    )
    parser.add_argument("--input-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"),
                        help="input height and width, multiples of 32 (default 224 224)")  # fmt: skip
    parser.add_argument(
        "--static", action="store_true", help="fix the input to (1, 3, H, W) (default: dynamic batch, H, W)"
    )
    parser.add_argument(
        "--atol", type=float, default=1e-4, help="largest accepted abs difference from eager (default 1e-4)"
    )
    ours, rest = parser.split_known(list(argv))
    args = parser.parse_args(ours)
    args.input_size = tuple(args.input_size)
    return args, rest


def load_weights(network: nn.Module, path: str | Path, use_ema: bool = False) -> str:
    """Load our Lightning checkpoint (the task's ``model.`` or ``ema.module.`` tensors) or the authors'
    release (into the RAVLT backbone) into ``network``; returns a one-line summary."""
    raw, source = read_checkpoint(path, mmap=True)  # weights only; mapped, as a release is read again below
    if "pytorch-lightning_version" not in raw:
        backbone = next(m for m in network.modules() if isinstance(m, RAVLT))
        return f"{load_official(backbone, path, use_ema=use_ema)} (authors' release into the backbone)"
    prefix = f"{EMA_PREFIX}module." if use_ema else "model."  # the task's network, or the EMA callback's copy
    state = {k[len(prefix) :]: v for k, v in raw.get("state_dict", {}).items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{source}: a Lightning checkpoint without {prefix!r} tensors"
                              + (" (was EMA on in that run?)" if use_ema else ""))  # fmt: skip
    try:
        network.load_state_dict(state)
    except RuntimeError as err:  # "Error(s) in loading state_dict for X:\n\t<first problem>\n\t..."
        reason = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)
        raise CheckpointError(
            f"{source}: does not fit the config's network ({reason}); was it made with another config?"
        ) from None
    return f"{source} (Lightning checkpoint{', EMA' if use_ema else ''}: {len(state)} tensors)"


def main(argv: Sequence[str]) -> dict:
    """Build the config's network, load weights, export, check; prints what was written and the error."""
    args, cli_args = parse_args(argv)
    try:
        check_request(args.out, args.format, args.input_size, dynamic=not args.static)
        cli = build_cli(["--config", resolve_config(args.config), *cli_args, "--trainer.logger", "false",
                         "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1"],
                        run=False, prog=f"{PROG} export")  # fmt: skip
        network = cli.model.model
        if args.ckpt:
            weights = load_weights(network, args.ckpt, args.use_ema)
        else:  # the task reads its pretrained file when a run starts, not when it is built
            cli.model.load_pretrained()
            weights = f"the config's initialisation{' from ' + cli.model.pretrained if cli.model.pretrained else ''}"
        module, what = exportable(network)
        error = export_model(module, args.out, args.format, args.input_size, dynamic=not args.static, atol=args.atol)
    except (ExportError, CheckpointError, ConfigError, DatasetError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    shape = "(1, 3, {}, {})".format(*args.input_size) if args.static else "dynamic batch, H, W (multiples of 32)"
    checker = "onnxruntime" if args.format == "onnx" else "torch.export.load"
    print(f"wrote {args.out} ({args.format}, {what}; input {shape}; weights: {weights})")
    print(f"checked with {checker} against eager PyTorch: max abs error {error:.3g} (atol {args.atol:g})")
    return {"out": args.out, "format": args.format, "exported": what, "weights": weights, "max_abs_error": error}
