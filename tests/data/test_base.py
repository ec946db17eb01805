"""BaseDataModule: shared constructor arguments reach the CLI, typed metadata, one loader factory."""

from __future__ import annotations

import pytest
from jsonargparse import ArgumentParser

from ravlt_pl.data.ade20k import ADE20KDataModule
from ravlt_pl.data.base import BaseDataModule
from ravlt_pl.data.coco import COCODataModule
from ravlt_pl.data.imagenet import ImageFolderDataModule

SHARED = ("predict_dir", "global_batch_size", "batch_size", "num_workers", "pin_memory", "persistent_workers")


@pytest.mark.parametrize("module", [ImageFolderDataModule, COCODataModule, ADE20KDataModule])
def test_shared_arguments_are_documented_for_every_data_module(module, capsys) -> None:
    """Subclasses forward ``**kwargs`` to the base; jsonargparse still lists (and documents) them."""
    parser = ArgumentParser()
    parser.add_class_arguments(module, "data")
    config = parser.parse_args(["--data.root", "x", "--data.batch_size", "3", "--data.num_workers", "1"])
    assert config.data.batch_size == 3 and config.data.num_workers == 1 and config.data.pin_memory is True
    parser.print_help()
    help_text = capsys.readouterr().out
    for name in SHARED:
        assert f"--data.{name}" in help_text
    assert "DataLoader worker processes per device" in help_text


def test_info_and_loaders_ask_for_setup_first() -> None:
    dm = ImageFolderDataModule("x", num_classes=2, batch_size=1)
    with pytest.raises(RuntimeError, match=r"info is known after setup"):
        _ = dm.info
    with pytest.raises(RuntimeError, match=r"no 'predict' dataset; setup\(\) for that stage builds it"):
        dm.predict_dataloader()


def test_a_batch_size_is_required() -> None:
    with pytest.raises(ValueError, match="set data.batch_size"):
        BaseDataModule("x")
