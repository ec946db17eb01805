"""WebDataset shards in the ``timm/imagenet-1k-wds`` layout, and the converter to it (and to HF parquet).

Layout (what timm's ``reader_wds`` reads)::

    ROOT/_info.json                          {"splits": {"train": {"name", "num_samples", "filenames",
    ROOT/imagenet1k-train-0000.tar            "shard_lengths"}, "validation": {...}}}
    ROOT/imagenet1k-validation-0000.tar      members KEY.jpg (the encoded image) + KEY.cls (label, ASCII)

Converter (an ImageFolder ``SOURCE/{train,val}/<class>/*``, e.g. our synthetic set, to either layout)::

    python -m ravlt_pl.data.shards --source data/imagenet --out data/imagenet-wds [--shard-size 1250]
    python -m ravlt_pl.data.shards --source data/imagenet --out data/imagenet-1k --format parquet
    python -m ravlt_pl.data.shards --index data/imagenet-wds   # (re)write _info.json of existing shards

Training samples are written in a seeded random order (``--seed``): a shard then holds all classes,
as a shuffle buffer needs. Image bytes are copied as they are, never re-encoded.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import DatasetError
from .streams import RawSample, Shard

INFO_FILE = "_info.json"
#: the split names of the layout (timm's): training, then evaluation.
SPLITS = {"train": "train", "val": "validation"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key.extension split of a member name
INSTALL_HINT = "pip install 'ravlt_pl[shards]' (webdataset, pyarrow)"


def is_wds_root(root: Path) -> bool:
    return (root / INFO_FILE).is_file() or any(root.glob("*.tar"))


def read_info(root: Path) -> dict:
    """``_info.json`` of a shard folder, checked: every split's shards exist and the counts add up."""
    path = root / INFO_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: missing; the shards' sample counts fix the epoch length. "
                           f"Write it with: python -m ravlt_pl.data.shards --index {root}")  # fmt: skip
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise DatasetError(f'{path}: no "splits" object (timm\'s _info.json layout)')
    return info


def split_shards(root: Path, info: dict, split: str) -> list[Shard]:
    """The shards of ``split`` (``train`` or ``validation``) with their lengths, as ``_info.json`` lists them."""
    path = root / INFO_FILE
    names = [split] + (["val"] if split == "validation" else [])
    entry = next((info["splits"][n] for n in names if n in info["splits"]), None)
    if entry is None:
        raise DatasetError(f"{path}: no split {split!r} (has {sorted(info['splits'])})")
    try:
        files, lengths, total = (
            list(entry["filenames"]),
            [int(n) for n in entry["shard_lengths"]],
            int(entry["num_samples"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(
            f"{path}: split {split!r} needs filenames, shard_lengths and num_samples ({err!r})"
        ) from None
    if len(files) != len(lengths) or sum(lengths) != total or not files:
        raise DatasetError(f"{path}: split {split!r}: {len(files)} filenames, {len(lengths)} shard_lengths summing "
                           f"to {sum(lengths)}, num_samples {total}; they must agree")  # fmt: skip
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DatasetError(f"{root / missing[0]}: shard listed in {INFO_FILE} not found ({len(missing)} missing)")
    return [Shard(root / f, n) for f, n in zip(files, lengths)]


def _samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) per sample: consecutive members sharing a key, as webdataset groups them."""
    key, members = None, {}
    for member in tar:
        match = _MEMBER.match(member.name) if member.isfile() else None
        if match is None:
            continue
        if match[1] != key and members:
            yield key, members
            members = {}
        key = match[1]
        members[match[2].lower()] = member
    if members:
        yield key, members


def read_tar(path: Path, start: int, stop: int) -> Iterator[RawSample]:
    """Samples ``start..stop-1`` of one shard.

    Read with the standard library's ``tarfile`` on the seekable file: skipped samples cost a header
    read, not their bytes (webdataset's tar iterator streams every byte to reach a mid-shard start).
    """
    try:
        with tarfile.open(path, "r:") as tar:
            for index, (key, members) in enumerate(_samples(tar)):
                if index >= stop:
                    break
                if index < start:
                    continue
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                if image is None or "cls" not in members:
                    raise DatasetError(f"{path}: sample {key!r} has {sorted(members)}; needs an image "
                                       f"({'/'.join(IMAGE_EXTENSIONS)}) and .cls")  # fmt: skip
                label = tar.extractfile(members["cls"]).read()
                try:
                    label = int(label)
                except ValueError:
                    raise DatasetError(f"{path}: sample {key!r}: .cls holds {label[:20]!r}, not an integer") from None
                yield str(path), key, tar.extractfile(image).read(), label
    except (tarfile.TarError, OSError) as err:
        raise DatasetError(f"{path}: cannot be read as a tar shard ({err})") from None


def count_samples(path: Path) -> int:
    """Samples in one shard (headers only)."""
    try:
        with tarfile.open(path, "r:") as tar:
            return sum(1 for _ in _samples(tar))
    except (tarfile.TarError, OSError) as err:
        raise DatasetError(f"{path}: cannot be read as a tar shard ({err})") from None


def write_index(root: Path, class_names: Sequence[str] | None = None, name: str | None = None) -> Path:
    """Write ``_info.json`` for the ``*-{train,validation}-*.tar`` shards in ``root`` by counting them."""
    from ..reports import atomic_write

    splits = {}
    for split in SPLITS.values():
        files = sorted(root.glob(f"*-{split}-*.tar"))
        if files:
            lengths = [count_samples(f) for f in files]
            splits[split] = {"name": split, "num_samples": sum(lengths),
                             "filenames": [f.name for f in files], "shard_lengths": lengths}  # fmt: skip
    if not splits:
        raise DatasetError(f"{root}: no shards named *-train-*.tar or *-validation-*.tar")
    info = {"name": name or root.name, "splits": splits} | ({"class_names": list(class_names)} if class_names else {})
    atomic_write(root / INFO_FILE, lambda p: Path(p).write_text(json.dumps(info, indent=1)))
    return root / INFO_FILE


def folder_split(source: Path, split: str, seed: int, shuffle: bool) -> tuple[list[str], list[tuple[str, Path, int]]]:
    """Class names and (key, file, label) of an ImageFolder split, in a seeded random order when ``shuffle``."""
    from .imagenet import ClassFolders

    folder = ClassFolders(source / split, transform=None)
    stems = [Path(p).stem.replace(".", "_") for p, _ in folder.samples]
    unique = len(set(stems)) == len(stems)  # else the class folder makes keys unique
    keys = [s if unique else f"{folder.classes[label]}-{s}" for s, (_, label) in zip(stems, folder.samples)]
    items = [(k, Path(p), label) for k, (p, label) in zip(keys, folder.samples)]
    if shuffle:
        items = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
    return folder.classes, items


def write_shards(
    source: Path, out: Path, prefix: str = "imagenet1k", shard_size: int = 1250, seed: int = 0, overwrite: bool = False
) -> Path:
    """An ImageFolder ``source`` as WebDataset shards + ``_info.json`` under ``out`` (replaced in one rename)."""
    try:
        import webdataset as wds
    except ImportError:
        raise SystemExit(f"writing shards needs webdataset: {INSTALL_HINT}") from None
    from .synthetic import _staging

    with _staging(out, overwrite) as staging:
        for folder_name, split in SPLITS.items():
            classes, items = folder_split(source, folder_name, seed, shuffle=split == "train")
            with wds.ShardWriter(str(staging / f"{prefix}-{split}-%04d.tar"), maxcount=shard_size,
                                 maxsize=float("inf"), verbose=0) as sink:  # fmt: skip
                for key, file, label in items:
                    ext = file.suffix.lower().lstrip(".")
                    sink.write({"__key__": key, "jpg" if ext == "jpeg" else ext: file.read_bytes(), "cls": label})
        write_index(staging, classes, name=out.name)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ravlt_pl.data.shards", description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, help="ImageFolder root with train/ and val/")
    parser.add_argument("--out", type=Path, help="folder to write (must be absent or empty, or --overwrite)")
    parser.add_argument("--format", choices=["wds", "parquet"], default="wds")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="samples per tar shard (default 1250) or parquet file (default 4400)",
    )
    parser.add_argument("--prefix", default="imagenet1k", help="shard name prefix (wds)")
    parser.add_argument("--seed", type=int, default=0, help="order of the training samples")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--index", type=Path, metavar="DIR", help="only (re)write DIR/_info.json by counting its shards"
    )
    args = parser.parse_args(argv)
    try:
        if args.index is not None:
            print(f"wrote {write_index(args.index)}")
            return
        if args.source is None or args.out is None:
            parser.error("--source and --out are required (or --index DIR)")
        if args.format == "wds":
            write_shards(args.source, args.out, args.prefix, args.shard_size or 1250, args.seed, args.overwrite)
            splits = read_info(args.out)["splits"]
            counts = {s: (e["num_samples"], len(e["filenames"])) for s, e in splits.items()}
        else:
            from .parquet import parquet_counts, write_parquet

            write_parquet(args.source, args.out, args.shard_size or 4400, args.seed, args.overwrite)
            counts = parquet_counts(args.out)
    except (DatasetError, FileExistsError) as err:
        raise SystemExit(f"error: {err}") from None
    print(
        f"wrote {args.out} ({args.format}): "
        + ", ".join(f"{s} {n} samples in {k} files" for s, (n, k) in counts.items())
    )


if __name__ == "__main__":
    main()
