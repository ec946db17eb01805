"""Which layout a classification root holds (ImageFolder, WebDataset shards, HF parquet), and the
streaming splits and loaders of the sharded two for :class:`~ravlt_pl.data.imagenet.ImageFolderDataModule`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import DataLoader

from ..lightning_compat import fit_epoch
from .base import DatasetInfo
from .errors import DatasetError
from .streams import Shard, ShardReader, ShardStream, StreamLoader

if TYPE_CHECKING:
    from .imagenet import ImageFolderDataModule

FORMATS = ("auto", "folder", "wds", "parquet")


def detect_format(root: Path) -> str:
    """``wds`` for ``_info.json`` / ``*.tar``, ``parquet`` for ``{train,validation}-*.parquet``, else ``folder``."""
    from .parquet import is_parquet_root
    from .shards import is_wds_root

    if root.is_dir() and is_wds_root(root):
        return "wds"
    if root.is_dir() and is_parquet_root(root):
        return "parquet"
    return "folder"


@dataclass(frozen=True)
class StreamLayout:
    """A sharded root: its reader, the shards of ``train`` and ``validation``, and class names if stored."""

    read: ShardReader
    shards: dict[str, list[Shard]]
    class_names: tuple[str, ...] | None


def open_layout(root: Path, data_format: str, splits: tuple[str, ...]) -> StreamLayout:
    if data_format not in ("wds", "parquet"):
        raise ValueError(f"data.init_args.format {data_format!r}: expected one of {', '.join(FORMATS)}")
    if data_format == "wds":
        from .shards import read_info, read_tar, split_shards

        info = read_info(root)
        names = info.get("class_names")
        return StreamLayout(read_tar, {s: split_shards(root, info, s) for s in splits}, tuple(names) if names else None)
    from .parquet import class_names, read_parquet, split_shards

    return StreamLayout(read_parquet, {s: split_shards(root, s) for s in splits}, class_names(root))


def setup_stream(dm: ImageFolderDataModule, data_format: str, stage: str) -> None:
    """Fill ``dm.datasets`` and ``dm.info`` from a sharded root (what ``setup`` does for an ImageFolder)."""
    dm.check_root()
    if stage == "fit" and dm.repeated_aug:
        raise DatasetError(
            f"{dm.root}: repeated_aug needs random access (DeiT's sampler puts the 3 copies of an image on 3 "
            "processes in the same step; from a stream every process would read every shard). "
            "Set --data.init_args.repeated_aug false, or train from an ImageFolder copy"
        )
    splits = ("train", "validation") if stage == "fit" else ("validation",) if stage != "predict" else ()
    layout = open_layout(dm.root, data_format, splits)
    names = layout.class_names or tuple(str(i) for i in range(dm.num_classes))
    if len(names) != dm.num_classes:
        raise DatasetError(f"{dm.root}: {len(names)} class names stored with the {data_format} data but num_classes is "
                           f"{dm.num_classes}; set --data.init_args.num_classes {len(names)} for this dataset")  # fmt: skip
    dm._info = DatasetInfo(names)
    if stage == "predict":
        from .images import PredictFolder

        if dm.predict_dir is None:
            raise DatasetError(f"{dm.root}: predict reads a folder of images; set --data.init_args.predict_dir")
        dm.datasets["predict"] = PredictFolder(dm.predict_dir, dm.transform(train=False), recursive=True)
        return
    world, rank = dm._world()
    common = dict(read=layout.read, num_classes=dm.num_classes, world=world, rank=rank,
                  seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))  # fmt: skip
    if stage == "fit":
        dm.datasets["train"] = ShardStream(layout.shards["train"], transform=dm.transform(True), train=True,
                                           batch_size=dm.loader_batch_size("train"),
                                           shuffle_buffer=dm.shuffle_buffer, **common)  # fmt: skip
    dm.datasets["val"] = dm.datasets["test"] = ShardStream(
        layout.shards["validation"],
        transform=dm.transform(False),
        train=False,
        batch_size=dm.loader_batch_size("val"),
        **common,
    )


def stream_loader(dm: ImageFolderDataModule, split: str) -> DataLoader:
    """The DataLoader of a :class:`ShardStream` split: it shards itself, workers deliver whole batches."""
    dataset = dm.datasets[split]
    settings = dict(batch_size=dataset.batch_size, num_workers=dm.num_workers, pin_memory=dm.pin_memory,
                    persistent_workers=dm.persistent_workers and dm.num_workers > 0)  # fmt: skip
    if split != "train":
        return DataLoader(dataset, **settings)

    def epoch() -> int:  # the epoch Lightning starts (what it gives a sampler's set_epoch)
        return fit_epoch(dm.trainer) if dm.trainer is not None else 0

    return StreamLoader(dataset, epoch, dm._resume_position, drop_last=True, **settings)
