"""WebDataset shards and HF parquet: the converter's layouts, the same samples and pipelines as the
ImageFolder, exact splits over processes and workers, per-epoch reshuffling, mid-epoch resume, and
one-line errors. The 2-process test is tests/data/test_shards_distributed.py."""

from __future__ import annotations

import builtins
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from ravlt_pl.cli import main
from ravlt_pl.data.errors import DatasetError
from ravlt_pl.data.imagenet import ClassFolders, ImageFolderDataModule
from ravlt_pl.data.parquet import write_parquet
from ravlt_pl.data.shards import main as convert
from ravlt_pl.data.shards import write_shards
from ravlt_pl.data.streams import rank_range, skipped_batches, worker_batches
from ravlt_pl.data.synthetic import make_classification
from tests.conftest import tiny_cli_args

pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """43 training images (an odd count, no divisor of the batch) and 15 validation images."""
    root = make_classification(
        tmp_path_factory.mktemp("src") / "shapes", train_per_class=9, val_per_class=3, image_size=32
    )
    for name in ("circle", "star"):
        sorted((root / "train" / name).iterdir())[0].unlink()
    return root


@pytest.fixture(scope="module")
def wds_root(folder, tmp_path_factory) -> Path:
    return write_shards(folder, tmp_path_factory.mktemp("wds") / "shapes-wds", shard_size=5)


@pytest.fixture(scope="module")
def parquet_root(folder, tmp_path_factory) -> Path:
    return write_parquet(folder, tmp_path_factory.mktemp("pq") / "imagenet-1k", rows_per_file=10)


# RandAugment off: timm's ``inc1`` posterize at magnitude 10 asks Pillow >= 10 for 0 bits, which it refuses
# (about 1 in 700 training transforms; see ravlt_pl/benchmark/data_loading.py); not what these tests test.
NO_RANDAUGMENT = dict(auto_augment=None)


def _dm(root, **kwargs) -> ImageFolderDataModule:
    settings = (
        dict(num_classes=5, image_size=32, batch_size=4, num_workers=0, pin_memory=False) | NO_RANDAUGMENT | kwargs
    )
    return ImageFolderDataModule(root=root, **settings)


def _keys(loader) -> list[str]:
    return [key for _, _, keys in loader for key in keys]


def _with_keys(dm: ImageFolderDataModule, split: str):
    dm.datasets[split].keys = True
    return getattr(dm, f"{split}_dataloader")()


# -- the layouts the converter writes ----------------------------------------------------------------
def test_converter_writes_timms_wds_layout_with_every_sample_once(folder, wds_root):
    info = json.loads((wds_root / "_info.json").read_text())
    train = info["splits"]["train"]
    assert train["name"] == "train" and train["num_samples"] == 43 and info["name"] == "shapes-wds"
    assert train["filenames"][:2] == ["imagenet1k-train-0000.tar", "imagenet1k-train-0001.tar"]
    assert train["shard_lengths"] == [5] * 8 + [3] and info["splits"]["validation"]["num_samples"] == 15
    assert info["class_names"] == ["circle", "cross", "square", "star", "triangle"]
    with tarfile.open(wds_root / "imagenet1k-train-0000.tar") as tar:
        names = tar.getnames()
    assert {Path(n).suffix for n in names} == {".cls", ".jpg"} and len(names) == 10
    samples = {}
    for shard in train["filenames"]:
        with tarfile.open(wds_root / shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    source = ClassFolders(folder / "train", None)
    expected = {Path(p).stem: (Path(p).read_bytes(), label) for p, label in source.samples}
    assert {k: (v["jpg"], int(v["cls"])) for k, v in samples.items()} == expected  # bytes copied, not re-encoded
    # Shuffled when written: the first shard holds more than one class.
    assert len({int(samples[Path(n).stem]["cls"]) for n in names if n.endswith(".cls")}) > 1


def test_converter_writes_the_hubs_parquet_schema(folder, parquet_root):
    files = sorted((parquet_root / "data").iterdir())
    assert [f.name for f in files] == [f"train-{i:05d}-of-00005.parquet" for i in range(5)] + [
        "validation-00000-of-00002.parquet", "validation-00001-of-00002.parquet"]  # fmt: skip
    table = pq.read_table(files[0])
    assert (
        table.schema.field("image").type.names == ["bytes", "path"] and str(table.schema.field("label").type) == "int64"
    )
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["label"] == {"names": ["circle", "cross", "square", "star", "triangle"], "_type": "ClassLabel"}
    row = table.slice(0, 1).to_pylist()[0]
    path = folder / "train" / ["circle", "cross", "square", "star", "triangle"][row["label"]] / row["image"]["path"]
    assert path.read_bytes() == row["image"]["bytes"]


def test_converter_cli_and_index_refuse_to_overwrite(folder, tmp_path, capsys):
    convert(["--source", str(folder), "--out", str(tmp_path / "w"), "--shard-size", "20"])
    assert "train 43 samples in 3 files, validation 15 samples in 1 files" in capsys.readouterr().out
    (tmp_path / "w" / "_info.json").unlink()
    convert(["--index", str(tmp_path / "w")])
    assert json.loads((tmp_path / "w" / "_info.json").read_text())["splits"]["train"]["shard_lengths"] == [20, 20, 3]
    with pytest.raises(SystemExit, match="exists and is not empty"):
        convert(["--source", str(folder), "--out", str(tmp_path / "w"), "--format", "parquet"])


# -- same samples, same pipelines --------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["wds", "parquet"])
def test_evaluation_images_equal_the_folders(folder, wds_root, parquet_root, layout):
    root = wds_root if layout == "wds" else parquet_root
    dm = _dm(root)
    dm.setup("validate")
    assert dm.data_format() == layout and dm.info.class_names == ("circle", "cross", "square", "star", "triangle")
    reference = _dm(folder)
    reference.setup("validate")
    expected = {Path(p).name: (reference.datasets["val"][i][0], label)
                for i, (p, label) in enumerate(reference.datasets["val"].samples)}  # fmt: skip
    seen = {}
    for images, labels, keys in _with_keys(dm, "val"):
        for image, label, key in zip(images, labels, keys):
            seen[key if layout == "parquet" else key + ".JPEG"] = (image, int(label))
    assert seen.keys() == expected.keys()
    for key, (image, label) in seen.items():
        assert label == expected[key][1] and torch.equal(image, expected[key][0]), key


# -- exact splits, epochs, resume --------------------------------------------------------------------
def test_ranks_and_workers_partition_the_epoch():
    for total, world, batch in [(43, 2, 4), (15, 3, 2), (1000, 8, 16)]:
        evals = [rank_range(total, world, r, batch, False) for r in range(world)]
        assert evals[0][0] == 0 and evals[-1][1] == total and all(a[1] == b[0] for a, b in zip(evals, evals[1:]))
        trains = [rank_range(total, world, r, batch, True) for r in range(world)]
        assert (
            len({b - a for a, b in trains}) == 1
            and (trains[0][1] % batch == 0)
            and total - trains[-1][1] < world * batch
        )
    for batches, workers in [(10, 3), (2, 4), (9, 1)]:
        runs = [worker_batches(batches, workers, w) for w in range(workers)]
        assert runs[0][0] == 0 and runs[-1][1] == batches and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        order = [w for i in range(batches) for w in [i % workers]]  # the DataLoader's round robin
        for done in range(batches + 1):
            assert [skipped_batches(done, workers, w) for w in range(workers)] == [
                order[:done].count(w) for w in range(workers)
            ]


@pytest.mark.parametrize("layout", ["wds", "parquet"])
def test_training_epochs_reshuffle_and_see_each_sample_at_most_once(wds_root, parquet_root, layout):
    dm = _dm(wds_root if layout == "wds" else parquet_root, num_workers=2, shuffle_buffer=8)
    dm.setup("fit")
    loader = _with_keys(dm, "train")
    assert len(loader) == 43 // 4
    epochs = []
    for epoch in range(3):
        loader.dataset.set_position(epoch)
        keys = [k for _, _, ks in super(type(loader), loader).__iter__() for k in ks]
        assert len(keys) == 40 and len(set(keys)) == 40
        epochs.append(keys)
    assert epochs[0] != epochs[1] != epochs[2] and set(epochs[0]) != set(epochs[1])  # other leftovers too
    loader.dataset.set_position(1)
    assert [k for _, _, ks in super(type(loader), loader).__iter__() for k in ks] == epochs[1]  # seeded by epoch


def test_mid_epoch_resume_reads_exactly_the_unseen_batches(wds_root):
    dm = _dm(wds_root, num_workers=2, shuffle_buffer=8)
    dm.setup("fit")
    stream = dm.datasets["train"]
    stream.keys = True
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
    stream.set_position(2)
    whole = [tuple(ks) for _, _, ks in loader]
    stream.set_position(2, 3)  # epoch 2, 3 batches trained before the requeue
    rest = [tuple(ks) for _, _, ks in loader]
    assert Counter(rest) == Counter(whole[3:])


def test_the_loader_takes_the_epoch_and_resume_position_from_the_trainer(wds_root):
    dm = _dm(wds_root, shuffle_buffer=8)
    dm.setup("fit")
    loader = _with_keys(dm, "train")
    position = {"epoch": 1, "resume": (4, 2)}
    loader.epoch, loader.resume = (lambda: position["epoch"]), (lambda: position["resume"])
    stream = loader.dataset
    stream.set_position(4)
    full = [tuple(ks) for _, _, ks in super(type(loader), loader).__iter__()]
    assert [tuple(ks) for _, _, ks in loader] == full[2:]  # resumed: epoch 4 after its 2 trained batches
    stream.set_position(1)
    epoch1 = [tuple(ks) for _, _, ks in super(type(loader), loader).__iter__()]
    assert [tuple(ks) for _, _, ks in loader] == epoch1  # the same resume position again: a new epoch, whole


# -- the demo trains from both layouts ---------------------------------------------------------------
@pytest.mark.parametrize("layout", ["wds", "parquet"])
def test_demo_config_trains_from_converted_data(wds_root, parquet_root, layout, tmp_path):
    root = wds_root if layout == "wds" else parquet_root
    args = tiny_cli_args("demo/cls.yaml", root, tmp_path, "--data.init_args.image_size", "32",
                         "--model.init_args.image_size", "32")  # fmt: skip
    args[args.index("--trainer.fast_dev_run") + 1] = "3"
    cli = main(args)
    assert cli.trainer.global_step == 3 and cli.datamodule.data_format() == layout
    assert "val/top1" in cli.trainer.callback_metrics or any("top1" in k for k in cli.trainer.callback_metrics)


# -- errors: one line naming the file ----------------------------------------------------------------
def test_layout_errors_name_the_file(wds_root, parquet_root, tmp_path):
    import shutil

    root = Path(shutil.copytree(wds_root, tmp_path / "w"))
    info = json.loads((root / "_info.json").read_text())
    info["splits"]["train"]["num_samples"] = 44
    (root / "_info.json").write_text(json.dumps(info))
    with pytest.raises(
        DatasetError, match=r"_info.json: split 'train': 9 filenames, 9 shard_lengths summing to 43, num_samples 44"
    ):
        _dm(root).setup("fit")
    (root / "_info.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"_info.json: not readable JSON"):
        _dm(root).setup("fit")
    (root / "_info.json").unlink()
    with pytest.raises(DatasetError, match=r"_info.json: missing.*--index"):
        _dm(root).setup("fit")
    convert(["--index", str(root)])
    (root / "imagenet1k-validation-0001.tar").unlink()
    with pytest.raises(DatasetError, match=r"imagenet1k-validation-0001.tar: shard listed in _info.json not found"):
        _dm(root).setup("validate")
    with pytest.raises(DatasetError, match=r"5 class names stored with the parquet data but num_classes is 10"):
        _dm(parquet_root, num_classes=10).setup("fit")
    with pytest.raises(DatasetError, match=r"repeated_aug needs random access"):
        _dm(parquet_root, repeated_aug=True).setup("fit")


def _rewrite(shard: Path, member_name: str, data: bytes) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for member, content in members:
            content = data if member.name == member_name else content
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))


def test_bad_sample_names_shard_and_key(wds_root, tmp_path):
    import shutil

    root = Path(shutil.copytree(wds_root, tmp_path / "w"))
    shard = root / "imagenet1k-validation-0000.tar"
    with tarfile.open(shard) as tar:
        key = tar.getnames()[0].split(".")[0]
    dm = _dm(root, num_workers=1)
    dm.setup("validate")
    _rewrite(shard, f"{key}.cls", b"7")
    with pytest.raises(DatasetError) as caught:
        list(dm.val_dataloader())
    assert str(caught.value) == f"{shard}: sample {key!r}: label 7 outside 0..4 (num_classes 5)"
    _rewrite(shard, f"{key}.cls", b"1")
    _rewrite(shard, f"{key}.jpg", b"\x00 not a jpeg")
    with pytest.raises(DatasetError, match=rf"^{shard}: sample '{key}': cannot be read as an image") as caught:
        list(dm.val_dataloader())
    assert "\n" not in str(caught.value)


def test_missing_extra_is_one_line_saying_what_to_install(parquet_root, monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DatasetError, match=r"needs pyarrow: pip install 'ravlt_pl\[shards\]'"):
        _dm(parquet_root).setup("fit")


def test_missing_webdataset_stops_the_converter_saying_what_to_install(folder, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_webdataset(name, *args, **kwargs):
        if name == "webdataset":
            raise ImportError("No module named 'webdataset'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_webdataset)
    with pytest.raises(SystemExit, match=r"writing shards needs webdataset: pip install 'ravlt_pl\[shards\]'"):
        convert(["--source", str(folder), "--out", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_predict_from_a_sharded_root_reads_predict_dir_with_the_stored_class_names(folder, wds_root):
    with pytest.raises(DatasetError, match=r"predict reads a folder of images; set --data.init_args.predict_dir"):
        _dm(wds_root).setup("predict")
    dm = _dm(wds_root, predict_dir=str(folder / "val" / "star"))
    dm.setup("predict")
    assert dm.info.class_names == ("circle", "cross", "square", "star", "triangle") and len(dm.datasets["predict"]) == 3


def test_an_unknown_format_is_refused_naming_the_option(folder):
    with pytest.raises(ValueError, match=r"format 'tfrecord'.*auto, folder, wds, parquet"):
        _dm(folder, format="tfrecord").setup("fit")


# -- resume through Lightning: bit-identical to an uninterrupted run ---------------------------------
def test_resume_from_shards_at_epoch_end_and_after_sigterm_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    import signal

    from tests.test_distributed import STEPS, assert_same_training_state, fit_args

    source = make_classification(tmp_path / "shapes", train_per_class=4, val_per_class=3, image_size=32)
    root = write_shards(source, tmp_path / "wds", shard_size=3)  # 20 images: 5 steps of 4 per epoch
    every_epoch = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.save_top_k=-1",
                   "--trainer.callbacks.filename={epoch}", f"--trainer.callbacks.dirpath={tmp_path / 'epochs'}"]  # fmt: skip
    cli = main(fit_args(root, tmp_path / "reference", "--data.init_args.shuffle_buffer", "5", *every_epoch))
    assert cli.trainer.global_step == STEPS and cli.datamodule.data_format() == "wds"
    reference = next((tmp_path / "reference").rglob("last.ckpt"))
    # From the end of epoch 0: epoch 1 in its own shuffled order.
    cli = main(fit_args(root, tmp_path / "epoch", "--data.init_args.shuffle_buffer", "5",
                        "--ckpt_path", str(tmp_path / "epochs" / "epoch=0.ckpt")))  # fmt: skip
    assert_same_training_state(next(Path(cli.trainer.log_dir).rglob("last.ckpt")), reference)
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="SIGTERM"):  # at the end of step 7: mid epoch 1
        main(fit_args(root, run, "--data.init_args.shuffle_buffer", "5", "--trainer.callbacks+=tests.test_distributed.SignalAt",
                      "--trainer.callbacks.step=7", f"--trainer.callbacks.signum={int(signal.SIGTERM)}"))  # fmt: skip
    cli = main(fit_args(root, run, "--data.init_args.shuffle_buffer", "5", "--ckpt_path", "last"))
    assert cli.trainer.global_step == STEPS
    assert_same_training_state(next(Path(cli.trainer.log_dir).rglob("last.ckpt")), reference)
