"""ImageFolder data module: layout checks name the path; loaders shard correctly."""

import shutil

import pytest
import torch

from ravlt_pl.data.errors import DatasetError
from ravlt_pl.data.imagenet import ImageFolderDataModule


def _dm(root, **kwargs):
    return ImageFolderDataModule(root=root, num_classes=5, image_size=32, batch_size=4, num_workers=0, **kwargs)


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "set")


def test_loads_train_and_val_with_class_names(synthetic_cls):
    dm = _dm(synthetic_cls)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    assert dm.info.class_names == tuple(sorted(p.name for p in (synthetic_cls / "train").iterdir()))
    assert len(dm.datasets["val"]) == 15


def test_missing_root_names_path_and_option(tmp_path):
    with pytest.raises(DatasetError, match=r"absent.*--data.root"):
        _dm(tmp_path / "absent").setup("fit")


def test_missing_split(synthetic_cls, tmp_path):
    root = _copy(synthetic_cls, tmp_path)
    shutil.rmtree(root / "val")
    with pytest.raises(DatasetError, match=r"set/val: split folder missing"):
        _dm(root).setup("fit")


def test_empty_class_folder(synthetic_cls, tmp_path):
    root = _copy(synthetic_cls, tmp_path)
    for f in (root / "train" / "circle").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"train/circle: class folder holds no image files"):
        _dm(root).setup("fit")


def test_wrong_number_of_classes(synthetic_cls):
    with pytest.raises(DatasetError, match=r"5 class folders but num_classes is 1000"):
        ImageFolderDataModule(root=synthetic_cls, num_classes=1000, batch_size=2).setup("fit")


def test_unreadable_image_names_the_file(synthetic_cls, tmp_path):
    root = _copy(synthetic_cls, tmp_path)
    bad = next((root / "val" / "square").iterdir())
    bad.write_bytes(b"\x00 not a jpeg")
    dm = _dm(root)
    dm.setup("validate")
    with pytest.raises(DatasetError, match=bad.name):
        list(dm.val_dataloader())


def test_global_batch_is_split_over_devices_or_refused(synthetic_cls):
    dm = ImageFolderDataModule(root=synthetic_cls, num_classes=5, global_batch_size=1024)

    class FakeTrainer:  # the two numbers the rule reads
        world_size, accumulate_grad_batches, global_rank = 8, 1, 0

    dm.trainer = FakeTrainer()
    assert dm.per_device_batch_size() == 128
    FakeTrainer.world_size, FakeTrainer.accumulate_grad_batches = 1, 8
    assert dm.per_device_batch_size() == 128
    FakeTrainer.world_size, FakeTrainer.accumulate_grad_batches = 3, 1
    with pytest.raises(ValueError, match="cannot be split over 3 processes"):
        dm.per_device_batch_size()
    dm.batch_size = 64
    FakeTrainer.world_size = 8
    with pytest.raises(ValueError, match="accumulate_grad_batches 2"):
        dm.per_device_batch_size()


def test_evaluation_shards_score_each_sample_once_without_padding(synthetic_cls, monkeypatch):
    dm = _dm(synthetic_cls)
    dm.setup("fit")
    shards = []
    for rank in range(4):
        monkeypatch.setattr(dm, "_world", lambda rank=rank: (4, rank))
        shards.append(list(dm.val_dataloader().sampler))
    assert shards == [list(range(rank, 15, 4)) for rank in range(4)]  # rank, rank + world, ...: 4, 4, 4, 3
    monkeypatch.setattr(dm, "_world", lambda: (16, 0))
    with pytest.raises(DatasetError, match="the val split holds 15 samples for 16 processes"):
        dm.val_dataloader()


def test_hidden_folders_and_files_are_no_classes_or_images(synthetic_cls, tmp_path):
    root = _copy(synthetic_cls, tmp_path)
    for split in ("train", "val"):
        checkpoints = root / split / ".ipynb_checkpoints"
        checkpoints.mkdir()
        shutil.copy(next((root / split / "star").iterdir()), checkpoints / "copy.JPEG")
        (root / split / "star" / "._resource_fork.JPEG").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble
    dm = _dm(root)
    dm.setup("fit")
    assert len(dm.info.class_names) == 5 and ".ipynb_checkpoints" not in dm.datasets["train"].classes
    assert not any(".ipynb_checkpoints" in path or "._" in path for path, _ in dm.datasets["train"].samples)


def test_predict_batches_carry_paths_and_class_names(synthetic_cls):
    dm = _dm(synthetic_cls, predict_dir=str(synthetic_cls / "val"))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    expected = sorted(str(p) for p in (synthetic_cls / "val").rglob("*.JPEG"))[:4]
    assert batch["image"].shape == (4, 3, 32, 32) and batch["path"] == expected
    assert dm.info.class_names == ("circle", "cross", "square", "star", "triangle")


def test_predict_without_the_tree_numbers_the_classes(synthetic_cls, tmp_path):
    folder = shutil.copytree(synthetic_cls / "val" / "star", tmp_path / "images")
    dm = ImageFolderDataModule(root=tmp_path / "absent", num_classes=3, batch_size=2, predict_dir=str(folder))
    dm.setup("predict")
    assert dm.info.class_names == ("0", "1", "2") and len(dm.datasets["predict"]) == 3


def test_corrupt_image_mid_epoch_raises_one_line_naming_the_file_from_a_worker(synthetic_cls, tmp_path):
    """The DatasetError a worker raises reaches the main process as a DatasetError, its message the file's line."""
    root = _copy(synthetic_cls, tmp_path)
    bad = sorted((root / "train" / "square").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated JPEG, as an interrupted copy leaves it
    dm = ImageFolderDataModule(root=root, num_classes=5, image_size=32, batch_size=4, num_workers=1, pin_memory=False)
    dm.setup("fit")
    with pytest.raises(DatasetError) as caught:
        for _ in dm.train_dataloader():
            pass
    message = str(caught.value)
    assert message.startswith(f"{bad}: cannot be read as an image") and "\n" not in message
    assert "Traceback" in caught.value.worker_traceback


def test_num_classes_left_out_is_the_class_folders(synthetic_cls):
    dm = ImageFolderDataModule(root=synthetic_cls, image_size=32, batch_size=2)
    assert dm.num_classes == 5


def test_without_val_a_seeded_stratified_fraction_validates(synthetic_cls, tmp_path):
    root = _copy(synthetic_cls, tmp_path)
    shutil.rmtree(root / "val")
    dm = _dm(root, val_fraction=0.4, split_seed=3)
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    labels = [val.dataset.targets[i] for i in val.indices]
    assert sorted(set(labels)) == [0, 1, 2, 3, 4] and len(labels) == 5 * round(
        0.4 * len(train.indices + val.indices) / 5
    )
    assert not set(train.indices) & set(val.indices)
    again = _dm(root, val_fraction=0.4, split_seed=3)
    again.setup("validate")
    assert again.datasets["val"].indices == val.indices  # the same seed, the same split
    with pytest.raises(DatasetError, match=r"set/val: split folder missing.*--data.init_args.val_fraction 0.1"):
        _dm(root).setup("fit")


def test_val_fraction_beside_a_val_folder_is_refused(synthetic_cls):
    with pytest.raises(DatasetError, match="a val/ folder and val_fraction 0.2 both give a validation set"):
        _dm(synthetic_cls, val_fraction=0.2).setup("fit")


def test_classification_reads_images_as_displayed(tmp_path):
    from PIL import Image

    from ravlt_pl.data.images import read_rgb

    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # turned 90° for display
    image.save(tmp_path / "turned.jpg", exif=exif)
    assert read_rgb(tmp_path / "turned.jpg").size == (40, 20)  # detection, segmentation: stored pixels
    assert read_rgb(tmp_path / "turned.jpg", exif_transpose=True).size == (20, 40)


@pytest.mark.parametrize(
    "class_path",
    ["ravlt_pl.data.imagenet.ImageNetDataModule", "ImageNetDataModule", "ImageFolderDataModule"],
)
def test_former_name_still_builds_from_a_config(class_path, tmp_path):
    """Runs' saved config.yaml say ``ravlt_pl.data.imagenet.ImageNetDataModule``; configs may use the short names."""
    from ravlt_pl.config import resolve_config
    from ravlt_pl.lightning_cli import build_cli

    cli = build_cli(["--config", resolve_config("cls_t.yaml"), "--data.class_path", class_path,
                     "--data.init_args.root", str(tmp_path), "--trainer.logger", "false",
                     "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1"],
                    run=False)  # fmt: skip
    assert isinstance(cli.datamodule, ImageFolderDataModule)
    assert type(cli.datamodule).__name__ == class_path.rsplit(".", 1)[-1]
