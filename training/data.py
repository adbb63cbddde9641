"""Data sets: Fashion-MNIST from its idx files, and image folders laid out ``<root>/<class>/*``.

Everything is loaded into memory as uint8 N×C×H×W tensors; batches are cut from them on the
training device, so no per-image Python runs in the training loop. Folder images are decoded by
``service.imaging.decode_image``, the same function the service uses.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.errors import ServiceError
from service.imaging import PreprocessSpec, decode_image

log = logging.getLogger(__name__)

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Folder images whose sizes differ (or are large) are resized to this by default.
DEFAULT_FOLDER_SIZE = 64
MAX_NATIVE_FOLDER_SIZE = 96


class DataError(ValueError):
    """A data set that cannot be used; the message names the file or folder."""


@dataclass
class ImageSet:
    images: torch.Tensor  # N×C×H×W uint8
    labels: torch.Tensor  # N int64
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read idx file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def _idx_path(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}; "
        "install it with `apt-get install -y dataset-fashion-mnist` or pass --fashion-mnist-dir"
    )


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> ImageSet:
    """Fashion-MNIST's 'train' (60k) or 'test' (10k) split as 1×28×28 images."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_idx_path(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_path(root, f"{prefix}-labels-idx1-ubyte"))
    return ImageSet(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        FASHION_MNIST_CLASSES,
    )


def scan_folder(root: Path) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """List ``(file, class index)`` under ``root/<class>/``; classes sorted by name."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"data folder {root} has no class sub-folders (expected {root}/<class>/)")
    files: list[tuple[Path, int]] = []
    for index, folder in enumerate(class_dirs):
        found = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not found:
            raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, index) for p in found]
    if len(class_dirs) < 2:
        raise DataError(f"data folder {root} has {len(class_dirs)} class; at least 2 are needed")
    return files, tuple(p.name for p in class_dirs)


def infer_folder_spec(files: Sequence[tuple[Path, int]], interpolation: str) -> PreprocessSpec:
    """Choose the input size and colour mode from the images' headers (no decoding).

    Grey if every image is grey, RGB otherwise. The images' own size if they all share one no
    larger than 96 pixels a side, else 64x64.
    """
    sizes: Counter[tuple[int, int]] = Counter()
    grey = True
    for path, _ in files:
        try:
            with Image.open(path) as img:
                sizes[img.size] += 1
                grey = grey and img.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
        except Exception:  # corrupt files are reported when decoded
            continue
    if len(sizes) == 1:
        (w, h), _ = sizes.most_common(1)[0]
        if max(w, h) <= MAX_NATIVE_FOLDER_SIZE:
            return PreprocessSpec(h, w, 1 if grey else 3, interpolation)
    size = DEFAULT_FOLDER_SIZE
    return PreprocessSpec(size, size, 1 if grey else 3, interpolation)


def load_folder(root: Path, spec: PreprocessSpec | None = None, interpolation: str = "bilinear"
                ) -> tuple[ImageSet, PreprocessSpec]:
    """Decode every image of an image folder; corrupt files are skipped with a warning."""
    files, classes = scan_folder(root)
    spec = spec or infer_folder_spec(files, interpolation)

    def decode(item: tuple[Path, int]) -> np.ndarray | None:
        try:
            return decode_image(item[0].read_bytes(), spec)
        except (ServiceError, OSError) as exc:
            log.warning("skipping %s: %s", item[0], getattr(exc, "message", exc))
            return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(pool.map(decode, files))
    kept = [(arr, label) for arr, (_, label) in zip(decoded, files, strict=True) if arr is not None]
    skipped = len(files) - len(kept)
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d under %s", skipped, len(files), root)
    if not kept:
        raise DataError(f"no readable images under {root}")
    images = torch.from_numpy(np.stack([arr for arr, _ in kept]))
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    present = set(labels.tolist())
    for index, name in enumerate(classes):
        if index not in present:
            raise DataError(f"class folder {root / name} has no readable images")
    return ImageSet(images, labels, classes), spec


def split_validation(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random (train, validation) index split."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(n * fraction)
    return perm[n_val:], perm[:n_val]


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = images.to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


@dataclass
class DataSplits:
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    spec: PreprocessSpec


def load_data(
    data: str,
    val_fraction: float,
    seed: int,
    fashion_mnist_dir: Path = FASHION_MNIST_DIR,
    spec: PreprocessSpec | None = None,
    interpolation: str = "bilinear",
    limit: int = 0,
) -> DataSplits:
    """Resolve ``--data``: 'fashion-mnist', or a folder (``root/<class>`` or
    ``root/train/<class>`` with an optional ``root/test/<class>``)."""
    test: ImageSet | None
    if data == FASHION_MNIST:
        full = load_fashion_mnist("train", fashion_mnist_dir)
        test = load_fashion_mnist("test", fashion_mnist_dir)
        spec = PreprocessSpec(28, 28, 1, interpolation)
    else:
        root = Path(data)
        train_root = root / "train" if (root / "train").is_dir() else root
        full, spec = load_folder(train_root, spec, interpolation)
        test_root = root / "test"
        has_test = train_root != root and test_root.is_dir()
        test = load_folder(test_root, spec)[0] if has_test else None
        if test is not None and test.classes != full.classes:
            raise DataError(f"{test_root} has classes {test.classes}, {train_root} {full.classes}")
    if limit:
        full = full.subset(torch.arange(min(limit, len(full))))
        test = test.subset(torch.arange(min(limit, len(test)))) if test is not None else None
    train_idx, val_idx = split_validation(len(full), val_fraction, seed)
    return DataSplits(full.subset(train_idx), full.subset(val_idx), test, spec)


def write_image_folder(
    images: ImageSet, out: Path, classes: Sequence[str] | None = None, per_class: int = 0
) -> int:
    """Write an ImageSet as ``out/<class>/<n>.png``; returns the number of files written."""
    wanted = list(classes) if classes else list(images.classes)
    unknown = set(wanted) - set(images.classes)
    if unknown:
        raise DataError(f"unknown classes {sorted(unknown)}; known: {list(images.classes)}")
    written = 0
    for name in wanted:
        index = images.classes.index(name)
        folder = out / name.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        rows = (images.labels == index).nonzero().flatten()
        if per_class:
            rows = rows[:per_class]
        for row in rows.tolist():
            arr = images.images[row].numpy()
            pil = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
            pil.save(folder / f"{row:05d}.png")
            written += 1
    return written
