"""The one image reader, predict folders, batching, and DatasetError's way out of DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ravlt_pl.data.base import DatasetInfo
from ravlt_pl.data.errors import DatasetError
from ravlt_pl.data.images import PredictFolder, collate_lists, collate_padded, is_image_file, read_rgb


def test_sixteen_bit_gradient_png_keeps_its_top_byte(tmp_path: Path) -> None:
    gradient = (np.arange(256, dtype=np.uint16) * 257)[None].repeat(4, axis=0)  # 0, 257, ..., 65535
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = np.asarray(read_rgb(tmp_path / "g16.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 256, 3)
    assert np.array_equal(rgb[..., 0], (gradient >> 8).astype(np.uint8))  # Pillow's convert: all 255 past 255
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_eight_bit_images_are_read_unchanged(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels[..., 0]).save(tmp_path / "gray.png")
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "a.png")), pixels)
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "gray.png"))[..., 1], pixels[..., 0])


def test_float_image_is_refused_naming_the_file(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "depth.tiff")
    with pytest.raises(DatasetError, match=r"depth\.tiff: a 32-bit float image"):
        read_rgb(tmp_path / "depth.tiff")


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n garbage", b"plain text"])
def test_unreadable_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.jpg").write_bytes(content)
    with pytest.raises(DatasetError, match=r"bad\.jpg: cannot be read as an image"):
        read_rgb(tmp_path / "bad.jpg")


def test_hidden_files_are_no_images() -> None:
    assert is_image_file("a/b.JPEG") and is_image_file(Path("x.png"))
    assert not is_image_file("a/._b.JPEG") and not is_image_file("notes.txt")


def test_predict_folder_lists_images_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg", ".hidden.jpg", "sub/c.png", ".cache/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4)).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    flat = PredictFolder(tmp_path, lambda image: image.size)
    assert [p.name for p in flat.files] == ["a.jpg", "b.png"]
    deep = PredictFolder(tmp_path, lambda image: image.size, recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in deep.files] == ["a.jpg", "b.png", "sub/c.png"]
    assert deep[2] == {"image": (6, 4), "path": str(tmp_path / "sub/c.png"), "file_name": "sub/c.png", "index": 2,
                       "image_id": 3, "orig_size": (4, 6)}  # fmt: skip
    numbered = [tmp_path / f"{n}.png" for n in ("000000000139", "7")]
    assert PredictFolder(tmp_path, lambda image: image, files=numbered).image_ids == [139, 7]  # COCO's names are ids
    assert PredictFolder(tmp_path, lambda image: image, files=[tmp_path / "1.png", tmp_path / "a.jpg"]).image_ids == [
        1,
        2,
    ]


def test_predict_folder_missing_or_empty_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"absent: folder of images to predict not found"):
        PredictFolder(tmp_path / "absent", lambda image: image)
    with pytest.raises(DatasetError, match=rf"{tmp_path.name}: no images"):
        PredictFolder(tmp_path, lambda image: image)


def test_padded_collate_pads_images_and_lists_the_rest() -> None:
    batch = [{"image": torch.ones(3, 4, 6), "label": torch.zeros(8, 12), "path": "a"},
             {"image": torch.ones(3, 5, 3), "label": torch.zeros(10, 6), "path": "b"}]  # fmt: skip
    out = collate_padded(batch)
    assert out["image"].shape == (2, 3, 5, 6) and out["image"][0, :, 4:].abs().sum() == 0
    assert [tuple(label.shape) for label in out["label"]] == [(8, 12), (10, 6)] and out["size"] == [(4, 6), (5, 3)]
    assert out["path"] == ["a", "b"] and collate_lists(batch)["image"][1].shape == (3, 5, 3)


class _BrokenAt(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        if index == 2:
            raise DatasetError("/data/x/broken.jpg: cannot be read as an image (truncated)")
        return index


def test_dataset_error_from_a_worker_keeps_its_one_line() -> None:
    loader = DataLoader(_BrokenAt(), batch_size=1, num_workers=1)
    with pytest.raises(DatasetError) as caught:
        list(loader)
    assert str(caught.value) == "/data/x/broken.jpg: cannot be read as an image (truncated)"
    assert "DataLoader worker process 0" in caught.value.worker_traceback


def test_dataset_error_raised_directly_is_unchanged() -> None:
    error = DatasetError("a.json: annotation 3 has bbox [1]")
    assert str(error) == "a.json: annotation 3 has bbox [1]" and error.worker_traceback is None


def test_dataset_info_checks_one_category_id_per_class() -> None:
    assert DatasetInfo(("a", "b"), (1, 3)).category_ids == (1, 3)
    with pytest.raises(ValueError, match="2 category ids for 1 class names"):
        DatasetInfo(("a",), (1, 3))
