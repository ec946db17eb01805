"""A local copy of the Hugging Face ``imagenet-1k`` parquet files: ``ROOT/data/{train,validation}-*.parquet``.

Columns ``image`` (struct of ``bytes``, ``path``) and ``label`` (int); the class names come from the
``huggingface`` schema metadata the hub's files carry (``info.features.label.names``). Sample counts
are read from the parquet footers, so nothing is scanned before training. Read offline with pyarrow.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import DatasetError
from .shards import INSTALL_HINT, SPLITS, folder_split
from .streams import RawSample, Shard

ROWS_PER_GROUP = 100  # the hub's row-group size for image datasets


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"reading or writing parquet needs pyarrow: {INSTALL_HINT}") from None
    return pq


def split_files(root: Path, split: str) -> list[Path]:
    """``split``'s parquet files under ``root/data`` (the hub's layout) or ``root``, sorted."""
    names = [split] + (["val"] if split == "validation" else [])
    for folder in (root / "data", root):
        for name in names:
            files = sorted(folder.glob(f"{name}-*.parquet"))
            if files:
                return files
    return []


def is_parquet_root(root: Path) -> bool:
    return bool(split_files(root, "train") or split_files(root, "validation"))


def split_shards(root: Path, split: str) -> list[Shard]:
    """The parquet files of ``split`` with their row counts (from the footers)."""
    pq = _pq()
    files = split_files(root, split)
    if not files:
        raise DatasetError(f"{root}: no {split}-*.parquet under data/ (the Hugging Face imagenet-1k layout)")
    shards = []
    for file in files:
        try:
            meta = pq.read_metadata(file)
        except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
            raise DatasetError(f"{file}: cannot be read as parquet ({err})") from None
        columns = set(meta.schema.to_arrow_schema().names)
        if not {"image", "label"} <= columns:
            raise DatasetError(f"{file}: columns {sorted(columns)}; needs image (bytes, path) and label")
        shards.append(Shard(file, meta.num_rows))
    return shards


def class_names(root: Path) -> tuple[str, ...] | None:
    """The label names in the files' ``huggingface`` metadata (a ClassLabel feature), if there."""
    files = split_files(root, "train") or split_files(root, "validation")
    metadata = _pq().read_schema(files[0]).metadata or {}
    try:
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
        return tuple(features["label"]["names"])
    except (KeyError, TypeError, ValueError):
        return None


def read_parquet(path: Path, start: int, stop: int) -> Iterator[RawSample]:
    """Rows ``start..stop-1`` of one file; row groups before ``start`` are not read."""
    try:
        file = _pq().ParquetFile(path)
        offset = 0
        for group in range(file.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            if offset + rows > start and offset < stop:
                table = file.read_row_group(group, columns=["image", "label"])
                images, labels = table.column("image").combine_chunks(), table.column("label").to_pylist()
                data, names = images.field("bytes").to_pylist(), images.field("path").to_pylist()
                for i in range(max(start - offset, 0), min(stop - offset, rows)):
                    yield str(path), names[i] or f"row {offset + i}", data[i], labels[i]
            offset += rows
            if offset >= stop:
                break
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot be read as parquet ({err})") from None


def write_parquet(source: Path, out: Path, rows_per_file: int = 4400, seed: int = 0, overwrite: bool = False) -> Path:
    """An ImageFolder ``source`` as ``out/data/{train,validation}-NNNNN-of-NNNNN.parquet`` in the hub's schema."""
    pq = _pq()
    import pyarrow as pa

    from .synthetic import _staging

    with _staging(out, overwrite) as staging:
        (staging / "data").mkdir()
        for folder_name, split in SPLITS.items():
            classes, items = folder_split(source, folder_name, seed, shuffle=split == "train")
            features = {"image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}}
            schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                                ("label", pa.int64())],
                               metadata={"huggingface": json.dumps({"info": {"features": features}})})  # fmt: skip
            parts = [items[i : i + rows_per_file] for i in range(0, len(items), rows_per_file)]
            for n, part in enumerate(parts):
                table = pa.table({
                    "image": [{"bytes": file.read_bytes(), "path": file.name} for _, file, _ in part],
                    "label": [label for _, _, label in part],
                }, schema=schema)  # fmt: skip
                pq.write_table(
                    table,
                    staging / "data" / f"{split}-{n:05d}-of-{len(parts):05d}.parquet",
                    row_group_size=ROWS_PER_GROUP,
                )
    return out


def parquet_counts(root: Path) -> dict[str, tuple[int, int]]:
    """split: (rows, files)."""
    return {split: (sum(s.length for s in shards), len(shards))
            for split in SPLITS.values() if (shards := split_shards(root, split))}  # fmt: skip
