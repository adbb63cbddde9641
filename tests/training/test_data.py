from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (
    FASHION_MNIST_CLASSES,
    DataError,
    ImageSet,
    load_data,
    load_folder,
    read_idx,
    scan_folder,
    split_validation,
    write_image_folder,
)


def test_fashion_mnist_test_split_is_real(fmnist_test: ImageSet) -> None:
    assert fmnist_test.images.shape == (10_000, 1, 28, 28)
    assert fmnist_test.images.dtype == torch.uint8
    assert torch.bincount(fmnist_test.labels).tolist() == [1000] * 10
    assert fmnist_test.classes == FASHION_MNIST_CLASSES
    assert fmnist_test.classes[7] == "Sneaker"


def test_read_idx_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x05")
    with pytest.raises(DataError, match="not an unsigned-byte idx"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(DataError, match="holds 2 bytes"):
        read_idx(short)


def test_write_folder_round_trips_pixels(fmnist_test: ImageSet, tmp_path: Path) -> None:
    n = write_image_folder(fmnist_test, tmp_path, ["Sneaker", "Bag"], per_class=5)
    assert n == 10
    _, classes = scan_folder(tmp_path)
    assert classes == ("Bag", "Sneaker")  # sorted by name, like flow_from_directory
    loaded, spec = load_folder(tmp_path)
    assert (spec.height, spec.width, spec.channels) == (28, 28, 1)
    sneakers = fmnist_test.images[fmnist_test.labels == 7][:5]
    assert torch.equal(loaded.images[loaded.labels == 1], sneakers)


def _save(path: Path, size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)


def test_folder_of_mixed_formats_and_sizes(tmp_path: Path) -> None:
    _save(tmp_path / "cat" / "a.jpg", (120, 80), fmt="JPEG")
    _save(tmp_path / "cat" / "b.webp", (50, 50), fmt="WEBP")
    _save(tmp_path / "dog" / "c.bmp", (30, 40), fmt="BMP")
    _save(tmp_path / "dog" / "d.gif", (64, 64), mode="P", fmt="GIF")
    data, spec = load_folder(tmp_path)
    assert (spec.height, spec.width, spec.channels) == (64, 64, 3)
    assert data.images.shape == (4, 3, 64, 64)
    assert data.labels.tolist() == [0, 0, 1, 1]


def test_corrupt_image_is_skipped_with_a_warning(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    for i in range(2):
        _save(tmp_path / "a" / f"{i}.png", (16, 16))
        _save(tmp_path / "b" / f"{i}.png", (16, 16))
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with caplog.at_level(logging.WARNING):
        data, _ = load_folder(tmp_path)
    assert len(data) == 4
    assert "broken.png" in caplog.text
    assert "skipped 1 unreadable image(s) of 5" in caplog.text


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "does not exist"),
        ({"a": 0}, "holds no images"),
        ({"a": 1}, "at least 2 are needed"),
        ({"a": 1, "empty": 0}, "empty holds no images"),
    ],
)
def test_bad_folders_name_the_problem(tmp_path: Path, layout: dict[str, int],
                                      message: str) -> None:
    root = tmp_path / "data"
    for name, count in layout.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            _save(root / name / f"{i}.png", (8, 8))
    with pytest.raises(DataError, match=message):
        load_folder(root)


def test_empty_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class sub-folders"):
        load_folder(tmp_path)


def test_class_with_only_corrupt_images_is_refused(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "0.png", (8, 8))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="b has no readable images"):
        load_folder(tmp_path)


def test_validation_split_is_seeded_and_disjoint() -> None:
    a_train, a_val = split_validation(100, 0.2, seed=3)
    b_train, b_val = split_validation(100, 0.2, seed=3)
    c_train, _ = split_validation(100, 0.2, seed=4)
    assert torch.equal(a_val, b_val) and torch.equal(a_train, b_train)
    assert not torch.equal(a_train, c_train)
    assert len(a_val) == 20
    assert set(a_train.tolist()).isdisjoint(a_val.tolist())


def test_train_test_layout_is_used(tmp_path: Path, fmnist_test: ImageSet) -> None:
    write_image_folder(fmnist_test, tmp_path / "train", ["Trouser", "Bag"], per_class=10)
    write_image_folder(fmnist_test, tmp_path / "test", ["Trouser", "Bag"], per_class=3)
    splits = load_data(str(tmp_path), val_fraction=0.2, seed=0)
    assert len(splits.train) + len(splits.val) == 20
    assert splits.test is not None and len(splits.test) == 6
