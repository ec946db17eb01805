"""Shards over 2 processes (torchrun, gloo, CPU) × 2 loader workers: validation reads every sample
exactly once, training gives both processes the same number of disjoint batches, reshuffled per
epoch; and a 2-process DDP fit + validate of the demo config from shards scores every image once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ravlt_pl.data.imagenet import ImageFolderDataModule
from ravlt_pl.data.shards import read_info, write_shards
from ravlt_pl.data.synthetic import make_classification
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[2]
TINY_ARGS = {k: v for k, v in TINY.items() if k not in ("layerscales", "layer_init_values")}
BATCH = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """43 training and 13 validation images in shards of 4: shards start and end mid-run."""
    root = make_classification(
        tmp_path_factory.mktemp("src") / "shapes", train_per_class=9, val_per_class=3, image_size=32
    )
    for split, name in (("train", "circle"), ("train", "star"), ("val", "circle"), ("val", "star")):
        sorted((root / split / name).iterdir())[0].unlink()
    return write_shards(root, tmp_path_factory.mktemp("wds") / "shapes-wds", shard_size=4)


def fake_trainer(world: int, rank: int, epoch: int = 0) -> SimpleNamespace:
    """What the data module reads of a trainer: world, rank, accumulation and the fit loop's epoch."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=epoch))
    loop = SimpleNamespace(restarting=False, epoch_progress=progress)
    return SimpleNamespace(world_size=world, global_rank=rank, accumulate_grad_batches=1, fit_loop=loop)


def loader_keys(root: Path, world: int, rank: int) -> dict:
    """Per split (and training epoch) the sample keys this process reads, and its batch count."""
    dm = ImageFolderDataModule(
        root=root,
        num_classes=5,
        image_size=32,
        batch_size=BATCH,
        num_workers=2,
        pin_memory=False,
        persistent_workers=True,
        shuffle_buffer=6,
        auto_augment=None,
    )  # fmt: skip  (timm's posterize at magnitude 10 fails on Pillow >= 10)
    dm.trainer = fake_trainer(world, rank)
    dm.setup("fit")
    out = {}
    for split in ("train", "val"):
        dm.datasets[split].keys = True
    val = dm.val_dataloader()
    out["val"] = [k for _, _, keys in val for k in keys]
    train = dm.train_dataloader()
    for epoch in (0, 1):
        dm.trainer.fit_loop.epoch_progress.current.processed = epoch
        batches = [list(keys) for _, _, keys in train]  # persistent workers: the epoch reaches them
        out[f"train{epoch}"] = [k for b in batches for k in b]
        out[f"train{epoch}_batches"] = len(batches)
    out["train_len"] = len(train)
    return out


def run_two_processes(*args: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "tests.data.test_shards_distributed", *args],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


def fit_args(root: Path, out: Path, devices: int) -> list[str]:
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}}
    return [
        "fit", "--config", "demo/cls.yaml", "--model.init_args.backbone_overrides", json.dumps(TINY_ARGS),
        "--data.init_args.root", str(root), "--data.init_args.batch_size", str(BATCH),
        "--data.init_args.num_workers", "2", "--data.init_args.image_size", "32", "--model.init_args.image_size", "32",
        "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        "--trainer.num_nodes", "1", "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
        "--trainer.logger", json.dumps(logger), "--trainer.default_root_dir", str(out), "--seed_everything", "0",
    ] + (["--trainer.strategy", "ddp"] if devices > 1 else [])  # fmt: skip


def test_two_processes_read_every_validation_sample_once_and_equal_disjoint_training_batches(shards, tmp_path):
    fit_out = tmp_path / "fit"
    run_two_processes(str(shards), str(tmp_path / "keys.json"), json.dumps(fit_args(shards, fit_out, 2)))
    ranks = json.loads((tmp_path / "keys.json").read_text())
    info = read_info(shards)["splits"]
    expected_val = sorted(k for f in info["validation"]["filenames"] for k in tar_keys(shards / f))
    assert len(expected_val) == 13
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == expected_val  # the split, no duplicates
    assert {len(r["val"]) for r in ranks} == {6, 7}
    for epoch in (0, 1):
        both = ranks[0][f"train{epoch}"] + ranks[1][f"train{epoch}"]
        assert len(both) == len(set(both)) == 43 // (2 * BATCH) * 2 * BATCH  # disjoint, 40 of 43
        assert ranks[0][f"train{epoch}_batches"] == ranks[1][f"train{epoch}_batches"] == ranks[0]["train_len"] == 5
    assert ranks[0]["train0"] != ranks[0]["train1"]
    # The DDP fit's validation (after its one epoch) scored each of the 13 images once.
    report = json.loads(next(fit_out.rglob("classification_val.json")).read_text())
    assert report["num_samples"] == 13 and sum(map(sum, report["confusion_matrix"])) == 13
    checkpoint = torch.load(next(fit_out.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 5  # 43 images / (2 processes × 4): the same steps on each rank


def tar_keys(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return sorted({name.split(".")[0] for name in tar.getnames()})


if __name__ == "__main__":  # torchrun ... -m tests.data.test_shards_distributed ROOT KEYS.json FIT_ARGS
    import torch.distributed as dist

    from ravlt_pl.cli import main

    torch.set_num_threads(1)
    root, keys_file, fit = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    dist.init_process_group("gloo")  # Lightning's DDP below reuses it
    mine = loader_keys(root, dist.get_world_size(), dist.get_rank())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        keys_file.write_text(json.dumps(everyone))
    main(fit)
