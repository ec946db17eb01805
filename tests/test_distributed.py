"""Multi-process correctness without a cluster: resumable sampling, atomic checkpoints, a clear
refusal of another config's checkpoint, resume after SIGTERM and after Slurm's requeue signal with
no optimizer step lost or repeated, a 2-process DDP (gloo, CPU) fit with EMA and gradient
accumulation, and 2-process evaluation equal to one process on a set whose size the world size
does not divide. The real-Slurm test is tests/test_slurm.py.
"""

from __future__ import annotations

import collections
import csv
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DistributedSampler

from ravlt_pl.callbacks import (
    AtomicCheckpointIO,
    check_checkpoint_compatible,
    find_last_checkpoint,
    last_checkpoint_path,
)
from ravlt_pl.cli import main
from ravlt_pl.data.base import ResumableSampler
from ravlt_pl.data.imagenet import ImageFolderDataModule
from ravlt_pl.data.synthetic import make_classification
from ravlt_pl.models.checkpoint import CheckpointError
from ravlt_pl.tasks.classification import ClassificationTask
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = {k: v for k, v in TINY.items() if k not in ("layerscales", "layer_init_values")}
STEPS = 10  # 20 training images, batch 4, 2 epochs


class NoAugImageNet(ImageFolderDataModule):
    """Training without random augmentation, so a resumed run can match an uninterrupted one bit for bit."""

    def transform(self, train: bool):
        return super().transform(False)


class SignalAt(Callback):
    """Sends ``signum`` to this process at the end of global step ``step``, as Slurm or a preemption would."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.fixture(autouse=True)
def one_thread():
    """Two intra-op threads per process on this shared 2-core machine run ~20× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """20 training images (5 batches of 4) and 13 validation images (odd, and uneven batch counts per rank)."""
    root = make_classification(
        tmp_path_factory.mktemp("dist") / "shapes", train_per_class=4, val_per_class=3, image_size=32
    )
    for name in ("circle", "star"):
        sorted((root / "val" / name).iterdir())[0].unlink()
    return root


def fit_args(root: Path, out: Path, *extra: str, backbone: dict = TINY_ARGS) -> list[str]:
    return [
        "fit", "--config", "demo/cls.yaml", "--model.init_args.backbone_overrides", json.dumps(backbone),
        "--data.class_path", "tests.test_distributed.NoAugImageNet", "--data.init_args.root", str(root),
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0", "--data.init_args.image_size", "32",
        "--model.init_args.image_size", "32", "--model.init_args.ema_decay", "0.9", "--trainer.max_epochs", "2",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(out), *extra,
    ]  # fmt: skip


def last_checkpoint(cli) -> Path:
    return last_checkpoint_path(cli.trainer)


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory) -> Path:
    """An uninterrupted fit; returns its final last.ckpt."""
    out = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)
    every_epoch = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.save_top_k=-1",
                   "--trainer.callbacks.filename={epoch}", f"--trainer.callbacks.dirpath={out / 'epochs'}"]  # fmt: skip
    cli = main(fit_args(shapes, out, *every_epoch))
    assert cli.trainer.global_step == STEPS
    return last_checkpoint(cli)


def assert_same_training_state(resumed: Path, reference: Path) -> None:
    """Weights, EMA, optimizer moments and step counts, scheduler: all identical."""
    a = torch.load(resumed, map_location="cpu", weights_only=False)
    b = torch.load(reference, map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys() and any(k.startswith("ema.") for k in a["state_dict"])
    for key, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][key], value), key
    for index, state in b["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(a["optimizer_states"][0]["state"][index][name], value), (index, name)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == STEPS
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"]


# -- sampling --------------------------------------------------------------------------------------
def test_resumable_sampler_skips_the_trained_batches_of_the_resumed_epoch_only():
    def order(epoch: int, rank: int = 0, world: int = 1) -> list[int]:
        inner = DistributedSampler(range(20), world, rank, shuffle=True, seed=0, drop_last=True)
        inner.set_epoch(epoch)
        return list(inner)

    position = [(1, 3)]  # what the restored loop says: epoch 1, 3 batches of it trained
    sampler = ResumableSampler(
        DistributedSampler(range(20), 1, 0, shuffle=True, seed=0, drop_last=True), lambda: position[0], 4
    )
    assert list(sampler) == order(1)[12:]  # the rest of epoch 1 only
    sampler.set_epoch(2)
    assert list(sampler) == order(2) and len(sampler) == 20  # the next epochs whole
    position[0] = None
    sampler.set_epoch(3)
    assert list(sampler) == order(3)
    # Two processes split each global batch of the single-process order (same permutation).
    assert sorted(order(0, 0, 2)[:2] + order(0, 1, 2)[:2]) == sorted(order(0)[:4])


# -- atomic checkpoint files -----------------------------------------------------------------------
KILLED_MID_SAVE = """
import os, sys, time, torch
from ravlt_pl.callbacks import AtomicCheckpointIO
fsync = os.fsync
def slow_fsync(fd):  # the bytes are written, the rename not yet done: the moment a kill hurts
    print("in-save", flush=True); time.sleep(60); fsync(fd)
io = AtomicCheckpointIO()
io.save_checkpoint({"i": 1, "w": torch.ones(2**20)}, sys.argv[1])
os.fsync = slow_fsync
io.save_checkpoint({"i": 2, "w": torch.full((2**20,), 2.0)}, sys.argv[1])
"""


def test_kill_during_checkpoint_save_leaves_the_previous_complete_file(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_SAVE, str(target)], stdout=subprocess.PIPE, text=True,
                             cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "in-save"
    finally:
        child.kill()
        child.wait()
    stale = list(target.parent.glob(".last.ckpt.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size > 2**22  # the half-done save, under a hidden name
    assert find_last_checkpoint(tmp_path) == target  # which no checkpoint search picks up
    loaded = torch.load(target, weights_only=False)
    assert loaded["i"] == 1 and torch.equal(loaded["w"], torch.ones(2**20))
    AtomicCheckpointIO().save_checkpoint({"i": 3}, target)
    assert torch.load(target)["i"] == 3 and not list(target.parent.glob(".*.tmp"))  # the next save tidies up


# -- another config's checkpoint -------------------------------------------------------------------
def test_checkpoint_of_another_config_fails_naming_what_differs(shapes, reference, tmp_path):
    # Evaluating on a dataset with another number of classes (linked into the task from the data).
    three = tmp_path / "three"
    shutil.copytree(shapes, three)
    for split, name in itertools.product(("train", "val"), ("star", "cross")):
        shutil.rmtree(three / split / name)
    args = fit_args(three, tmp_path / "a", "--data.init_args.num_classes", "3")
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *args[1:], "--ckpt_path", str(reference)])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {reference} was made with another configuration")
    assert "num_classes=5 there, 3 here" in message
    assert "model.head.weight: [5, 64, 1, 1] in the checkpoint, [3, 64, 1, 1] here" in message

    # Resuming (`--ckpt_path last`) with another backbone.
    run = tmp_path / "b"
    (run / "lightning_logs" / "version_0" / "checkpoints").mkdir(parents=True)
    shutil.copy(reference, run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(shapes, run, "--ckpt_path", "last", backbone=dict(TINY_ARGS, embed_dims=[8, 16, 24, 32])))
    message = str(exit_info.value.code)
    assert "another configuration" in message and '"embed_dims": [16, 32, 48, 64]' in message
    assert "model.patch_embed" in message and "differ in shape" in message

    # EMA on in the checkpoint, off here.
    no_ema = ClassificationTask(num_classes=5, variant="ravlt_t", backbone_overrides=TINY_ARGS)
    with pytest.raises(CheckpointError, match="ema_decay=0.9 there, null here.*not in this model"):
        check_checkpoint_compatible(no_ema, torch.load(reference, weights_only=False), "x.ckpt")


# -- resume: nothing lost, nothing repeated --------------------------------------------------------
def test_sigterm_writes_last_ckpt_and_fit_ckpt_path_last_resumes_exactly(shapes, reference, tmp_path):
    # Preempted at the end of step 3 (mid epoch 0): Lightning stops at the step boundary, we save.
    with pytest.raises(SystemExit, match="SIGTERM"):
        main(fit_args(shapes, tmp_path, "--trainer.callbacks+=tests.test_distributed.SignalAt",
                      "--trainer.callbacks.step=3", f"--trainer.callbacks.signum={int(signal.SIGTERM)}"))  # fmt: skip
    saved = find_last_checkpoint(tmp_path)
    assert saved is not None and torch.load(saved, weights_only=False)["global_step"] == 3
    # The same command plus --ckpt_path last, in a new logger version folder.
    cli = main(fit_args(shapes, tmp_path, "--ckpt_path", "last"))
    assert cli.trainer.global_step == STEPS and Path(cli.trainer.ckpt_path) == saved
    assert_same_training_state(last_checkpoint(cli), reference)


def test_resume_from_an_epoch_end_checkpoint_is_exact(shapes, reference, tmp_path):
    epoch_end = reference.parents[3] / "epochs" / "epoch=0.ckpt"  # written at the end of epoch 0 (after validation)
    assert torch.load(epoch_end, weights_only=False)["global_step"] == STEPS // 2
    cli = main(fit_args(shapes, tmp_path, "--ckpt_path", str(epoch_end)))
    assert cli.trainer.global_step == STEPS
    assert_same_training_state(last_checkpoint(cli), reference)


def test_slurm_requeue_signal_checkpoints_at_a_step_boundary_and_resumes_exactly(
    shapes, reference, tmp_path, monkeypatch
):
    """Lightning's own SLURMEnvironment + auto-requeue, with ``scontrol`` replaced by a recorder
    (the real-cluster version is tests/test_slurm.py)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NAME="ravlt", SLURM_JOB_ID="4242",
                           SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="n1").items():  # fmt: skip
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    cli = main(fit_args(shapes, run, "--trainer.callbacks+=tests.test_distributed.SignalAt",
                        "--trainer.callbacks.step=3", f"--trainer.callbacks.signum={int(signal.SIGUSR1)}"))  # fmt: skip
    assert type(cli.trainer._accelerator_connector.cluster_environment).__name__ == "SLURMEnvironment"
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    hpc = run / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, weights_only=False)["global_step"] == 3  # the step the signal came after, exactly
    fault_tolerance = next(c for c in cli.trainer.callbacks if type(c).__name__ == "FaultTolerance")
    assert (
        signal.getsignal(signal.SIGUSR1) == fault_tolerance._note
    )  # kept: a late requeue signal is ignored, not fatal
    # The requeued job: same command, same directory; Lightning picks hpc_ckpt_1.ckpt up by itself.
    cli = main(fit_args(shapes, run))
    assert Path(cli.trainer.ckpt_path) == hpc and cli.trainer.global_step == STEPS
    assert_same_training_state(last_checkpoint(cli), reference)


def run_on_two_processes(runs: list[list[str]], listing: Path) -> None:
    """``main(args)`` for each of ``runs`` in one torchrun of 2 processes (DDP, gloo, CPU): this module's ``__main__``."""
    listing.write_text(json.dumps(runs))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "tests.test_distributed", str(listing)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


# -- EMA under DDP and gradient accumulation -------------------------------------------------------
def test_two_process_fit_with_ema_and_accumulation_updates_the_ema_once_per_optimizer_step(shapes, tmp_path):
    # 20 images over 2 processes in micro-batches of 2: 5 per process and epoch, an optimizer step
    # after the 2nd, 4th and (epoch end) 5th; 6 steps in 2 epochs.
    args = fit_args(shapes, tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--data.init_args.batch_size", "2", "--trainer.accumulate_grad_batches", "2")  # fmt: skip
    run_on_two_processes([args], tmp_path / "fit.json")
    checkpoint = torch.load(find_last_checkpoint(tmp_path), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 6 and int(checkpoint["state_dict"]["ema.n_averaged"]) == 6


# -- evaluation on 2 processes == 1 process --------------------------------------------------------
# One torchrun with 2 processes (DDP, gloo, CPU) runs every task's `validate` (imports paid once);
# the same commands on 1 process run here. Every evaluation set has an odd number of images, so the
# processes hold different numbers of images and batches.
DETECTOR = "--model.init_args.detector.init_args."
SMALL_DET = [DETECTOR + "fpn_channels", "16", DETECTOR + "representation_size", "32", DETECTOR + "mask_channels", "8",
             DETECTOR + "rpn_pre_nms_top_n_test", "100", DETECTOR + "rpn_post_nms_top_n_test", "50"]  # fmt: skip


def common_args(out: Path) -> list[str]:
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}}
    return ["--trainer.accelerator", "cpu", "--trainer.num_nodes", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", json.dumps(logger), "--trainer.default_root_dir", str(out), "--seed_everything", "0"]  # fmt: skip


def validate_specs(shapes: Path, reference: Path, root: Path) -> dict[str, list[str]]:
    """Per task: ``validate`` arguments without the output folder and device count."""
    specs = {
        "classification": [
            "validate", "--config", "demo/cls.yaml", "--model.init_args.backbone_overrides", json.dumps(TINY_ARGS),
            "--model.init_args.ema_decay", "0.9", "--data.init_args.root", str(shapes), "--data.init_args.batch_size", "3",
            "--data.init_args.num_workers", "0", "--data.init_args.image_size", "32", "--model.init_args.image_size", "32",
            "--ckpt_path", str(reference),
        ],
    }  # fmt: skip
    if (REPO / "ravlt_pl" / "tasks" / "detection.py").is_file():
        from ravlt_pl.data.synthetic import make_detection

        coco = make_detection(root / "coco", num_train=2, num_val=7, image_size=(80, 64))
        specs["detection"] = [
            "validate", "--config", "det/maskrcnn_t_1x.yaml", DETECTOR + "backbone_overrides", json.dumps(TINY_ARGS),
            *SMALL_DET, "--data.init_args.root", str(coco), "--data.init_args.num_classes", "5",
            "--data.init_args.scale", "[96, 64]", "--data.init_args.global_batch_size", "null",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        ]  # fmt: skip
    if (REPO / "ravlt_pl" / "tasks" / "segmentation.py").is_file() and (
        REPO / "configs" / "demo" / "seg.yaml"
    ).is_file():
        from ravlt_pl.data.synthetic import make_segmentation

        ade = make_segmentation(root / "ade", num_train=2, num_val=5, image_size=(64, 48))
        specs["segmentation"] = [
            "validate", "--config", "demo/seg.yaml", "--model.init_args.backbone_overrides", json.dumps(TINY_ARGS),
            "--model.init_args.segmentor.init_args.head_channels", "16", "--model.init_args.segmentor.init_args.fpn_channels", "16",
            "--data.init_args.root", str(ade), "--data.init_args.scale", "[64, 48]",
            "--data.init_args.crop_size", "[32, 32]", "--data.init_args.eval_batch_size", "2",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        ]  # fmt: skip
    return specs


UNEVEN_DET_SYNC = (
    "DetectionTask computes MeanAveragePrecision with torchmetrics' own sync (sync_on_compute), which "
    "all-gathers per-image states tensor by tensor and breaks (gloo: collective mismatch) when processes "
    "hold different numbers of images; needs the detection task's object gather of the states"
)


@pytest.fixture(scope="module")
def one_and_two(shapes, reference, tmp_path_factory) -> dict[str, tuple[Path, Path] | str]:
    """Per task: the output folders of its ``validate`` on 1 process (in this one) and on 2
    (torchrun), or why the 2-process run was left out."""
    out = tmp_path_factory.mktemp("eval")
    specs = validate_specs(shapes, reference, out / "data")
    torch.set_num_threads(1)
    results: dict[str, tuple[Path, Path] | str] = {}
    for task, args in specs.items():
        cli = main([*args, *common_args(out / task / "one"), "--trainer.devices", "1"])
        if task == "detection" and cli.model.metrics["val"].sync_on_compute:
            results[task] = UNEVEN_DET_SYNC
        else:
            results[task] = (out / task / "one", out / task / "two")
    two = [[*specs[task], *common_args(out / task / "two"), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
           for task, dirs in results.items() if not isinstance(dirs, str)]  # fmt: skip
    run_on_two_processes(two, out / "two.json")
    return results


def logged(out: Path) -> dict[str, float]:
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    return {k: float(v) for row in rows for k, v in row.items() if v and k.startswith("val/")}


def reports(task: str, one_and_two) -> tuple[dict, dict]:
    if task not in one_and_two:
        pytest.skip(f"ravlt_pl.tasks.{task} or its demo config is not in this checkout yet")
    if isinstance(one_and_two[task], str):
        pytest.skip(one_and_two[task])
    return tuple(json.loads(next(d.rglob(f"{task}_val.json")).read_text()) for d in one_and_two[task])


def test_two_process_classification_equals_one_process(one_and_two):
    one, two = reports("classification", one_and_two)
    assert one["num_samples"] == two["num_samples"] == 13  # each image once: no padding duplicate
    assert one["confusion_matrix"] == two["confusion_matrix"]
    assert one["metrics"] == two["metrics"]  # top-1, top-5, EMA top-1/top-5: exactly equal
    one_logged, two_logged = (logged(d) for d in one_and_two["classification"])
    for key in ("val/top1", "val/top5", "val/ema_top1", "val/ema_top5"):
        assert one_logged[key] == two_logged[key], key


def test_two_process_classification_loss_equals_one_process(one_and_two):
    if "classification" not in one_and_two:
        pytest.skip("no classification run")
    one_logged, two_logged = (logged(d) for d in one_and_two["classification"])
    assert two_logged["val/loss"] == pytest.approx(one_logged["val/loss"], rel=1e-6)


def assert_same_coco_results(one: list[dict], two: list[dict]) -> None:
    """Same detections per image, each image's records once. Scores and boxes to float32 noise:
    images are padded and batched differently on 1 and 2 processes."""
    assert len(one) == len(two) > 0
    by_image = lambda rs: collections.Counter(r["image_id"] for r in rs)  # noqa: E731
    assert by_image(one) == by_image(two) and len(by_image(one)) > 1
    from pycocotools import mask as mask_utils

    def box(r: dict) -> list[float]:  # masks: their bounding box (a border pixel may flip)
        return r["bbox"] if "bbox" in r else mask_utils.toBbox(r["segmentation"]).tolist()

    tolerance = 1e-2 if "bbox" in one[0] else 1.5
    left = list(two)
    for a in one:
        match = next((b for b in left if b["image_id"] == a["image_id"] and b["category_id"] == a["category_id"]
                      and abs(b["score"] - a["score"]) < 1e-4
                      and max(abs(x - y) for x, y in zip(box(a), box(b))) < tolerance), None)  # fmt: skip
        assert match is not None, f"no counterpart on 2 processes for {a}"
        left.remove(match)


def test_two_process_detection_equals_one_process(one_and_two):
    one, two = reports("detection", one_and_two)
    assert one["num_detections"] == two["num_detections"]
    for iou, metrics in one["metrics"].items():  # COCO AP/AR, boxes and masks
        assert two["metrics"][iou] == pytest.approx(metrics, abs=1e-6), iou
    one_dir, two_dir = (next(d.rglob("detection_val.json")).parent for d in one_and_two["detection"])
    for name in one["predictions"]:  # the COCO results json
        assert_same_coco_results(*(json.loads((d / name).read_text()) for d in (one_dir, two_dir)))


def test_two_process_segmentation_equals_one_process(one_and_two):
    one, two = reports("segmentation", one_and_two)
    assert one["mIoU"] > 0 and one == two  # mIoU, mAcc, aAcc and the per-class table, exactly


if __name__ == "__main__":  # torchrun ... -m tests.test_distributed RUNS.json: the multi-process side
    torch.set_num_threads(1)
    for arguments in json.loads(Path(sys.argv[1]).read_text()):
        main(arguments)
