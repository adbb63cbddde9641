"""Occlusion explanations, model-agnostic: which regions of an image the answer depends on.

A square patch slides over the model-sized image on a grid; each position gives one copy of the
image with the patch's pixels replaced by an occluder. All copies of one image, and the image
itself, go to the model as one submission through the same batcher as any classification, so
they batch with other traffic and obey the same limits, queue bound and deadline. The map holds,
per grid cell, the change in the target class's probability when that cell is covered (the
probability on the image minus on the copy): positive where covering it lowers the answer,
negative where covering it raises it. Cost: one model call per grid position, plus one for the
image (``Occlusion.model_calls``). Nothing here knows HTTP.

What replaces the patch decides what the map shows. Covering background with something that is
not background adds a shape: a grey square above a low shoe looks like a boot's shaft, and the
map then shows what adding a square does. The occluders (``OCCLUDERS``):

- ``background`` (the default): the image's own background, estimated as the median of its
  outermost pixels, per channel. Covering background changes nothing; covering the object
  removes it. Right where the object stands on a plain ground (product photos, scans, most
  small-image data sets).
- ``blur``: the image blurred with a radius of half a patch: the patch keeps its colours but
  loses its detail. For photos with a busy background, which no single colour stands for.
- ``mean``: the model's normalisation mean (mid-grey without one), the usual choice in the
  literature and the only one before; kept for comparison.

``bench/occlusion_check.py`` measures them on Fashion-MNIST and on photographs.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image

from service.errors import InvalidParameter
from service.imaging import PreprocessSpec

# Bounds on the work one request can ask for: 8 images x (121 + 1) model calls at most.
MAX_POSITIONS = 121  # occluded copies per image (an 11x11 grid)
MAX_IMAGES = 8  # images per explanation request
OccluderKind = Literal["background", "blur", "mean"]
OCCLUDERS: tuple[str, ...] = get_args(OccluderKind)
DEFAULT_OCCLUDER: OccluderKind = "background"


@dataclass(frozen=True)
class Occlusion:
    """The grid: a ``patch``-pixel square moved ``stride`` pixels at a time over H×W."""

    height: int
    width: int
    patch: int
    stride: int

    @classmethod
    def for_spec(cls, spec: PreprocessSpec, patch: int | None, stride: int | None) -> Occlusion:
        """The grid for a model; defaults: a patch of a third of the shorter side (smaller ones
        barely move a confident model's answer), moved a third of a patch at a time (8x8 cells
        for 28 pixels, 7x7 for 224). Raises InvalidParameter when out of bounds."""
        side = min(spec.height, spec.width)
        p = patch if patch is not None else max(1, round(side / 3))
        if not 1 <= p <= side:
            raise InvalidParameter(f"patch: must be between 1 and {side} pixels, got {p}")
        if stride is None:  # a third of the patch, or coarser where that would be too many
            s = max(1, round(p / 3))
            while cls(spec.height, spec.width, p, s).positions > MAX_POSITIONS:
                s += 1
        else:
            s = stride
        if not 1 <= s <= side:
            raise InvalidParameter(f"stride: must be between 1 and {side} pixels, got {s}")
        grid = cls(spec.height, spec.width, p, s)
        if grid.positions > MAX_POSITIONS:
            raise InvalidParameter(
                f"patch {p} with stride {s} needs {grid.positions} occluded copies of "
                f"each image; at most {MAX_POSITIONS}: use a larger patch or stride")
        return grid

    @property
    def rows(self) -> int:
        return _steps(self.height, self.patch, self.stride)

    @property
    def cols(self) -> int:
        return _steps(self.width, self.patch, self.stride)

    @property
    def positions(self) -> int:
        return self.rows * self.cols

    @property
    def model_calls(self) -> int:
        """Images run through the model for one explanation: every position and the original."""
        return self.positions + 1

    def _origins(self, size: int) -> list[int]:
        last = size - self.patch
        steps = _steps(size, self.patch, self.stride)
        # The last position is pinned to the edge, so every pixel is covered at least once.
        return [min(i * self.stride, last) for i in range(steps)]

    def copies(self, x: np.ndarray, cover: np.ndarray) -> np.ndarray:
        """(1 + rows*cols)×C×H×W: the image, then one occluded copy per grid position (row-major).
        ``x`` is C×H×W float32 in [0, 1]; ``cover`` is what replaces a covered patch: C×H×W, or
        one value per channel."""
        if cover.ndim == 1:
            cover = np.broadcast_to(cover[:, None, None], x.shape)
        out = np.repeat(x[None], self.model_calls, axis=0)
        k = 1
        for top in self._origins(self.height):
            for left in self._origins(self.width):
                rows, cols = slice(top, top + self.patch), slice(left, left + self.patch)
                out[k, :, rows, cols] = cover[:, rows, cols]
                k += 1
        return out

    def drop_map(self, probs: np.ndarray, target: int) -> np.ndarray:
        """rows×cols: the target's probability on the image minus on each occluded copy
        (negative where covering the cell raises it)."""
        return (probs[0, target] - probs[1:, target]).reshape(self.rows, self.cols)

    def pixel_map(self, drops: np.ndarray) -> np.ndarray:
        """H×W: each pixel's mean drop over the patches that covered it (for the heatmap)."""
        total = np.zeros((self.height, self.width), dtype=np.float64)
        count = np.zeros_like(total)
        for i, top in enumerate(self._origins(self.height)):
            for j, left in enumerate(self._origins(self.width)):
                total[top : top + self.patch, left : left + self.patch] += drops[i, j]
                count[top : top + self.patch, left : left + self.patch] += 1
        return total / np.maximum(count, 1)


def _steps(size: int, patch: int, stride: int) -> int:
    return max(1, -(-(size - patch) // stride) + 1)


def neutral_fill(spec: PreprocessSpec) -> np.ndarray:
    """Per-channel occluder value in [0, 1]: the normalisation mean, else mid-grey."""
    if spec.mean and len(spec.mean) in (1, spec.channels):
        return np.resize(np.asarray(spec.mean, dtype=np.float32), spec.channels)
    return np.full(spec.channels, 0.5, dtype=np.float32)


def background_fill(x: np.ndarray) -> np.ndarray:
    """Per-channel estimate of an image's background in [0, 1]: the median of its outermost
    pixels (C×H×W in, one value per channel out)."""
    ring = np.concatenate([x[:, 0, :], x[:, -1, :], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    return np.median(ring, axis=1).astype(np.float32)


def blurred(x: np.ndarray, sigma: float) -> np.ndarray:
    """The image (C×H×W in [0, 1]) under a Gaussian blur of standard deviation ``sigma``
    pixels, edges mirrored: as two matrix products per channel (the input is model-sized)."""
    rows, cols = _blur_matrix(x.shape[1], sigma), _blur_matrix(x.shape[2], sigma)
    return np.einsum("ij,cjk,lk->cil", rows, x, cols).astype(np.float32)


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """n×n: row i holds the Gaussian weights that pixel i takes from every pixel j, counting
    j's mirror images beyond both edges too, normalised to sum to 1."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    weights = np.zeros((n, n))
    for at in (j, -1 - j, 2 * n - 1 - j):
        weights += np.exp(-0.5 * ((i - at) / sigma) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def occluder(kind: str, x: np.ndarray, spec: PreprocessSpec, grid: Occlusion) -> np.ndarray:
    """What replaces a covered patch of ``x`` (see the module's description): one value per
    channel, or C×H×W for ``blur``."""
    if kind == "background":
        return background_fill(x)
    if kind == "blur":
        return blurred(x, grid.patch / 2)
    if kind == "mean":
        return neutral_fill(spec)
    raise InvalidParameter(f"occluder: must be one of {', '.join(OCCLUDERS)}, got {kind[:40]!r}")


def heatmap_png(x: np.ndarray, pixel_drops: np.ndarray) -> str:
    """A base64 PNG: the model-sized input in grey with the map overlaid, scaled to its largest
    magnitude: red where covering lowers the answer (the more red, the more it rests there),
    blue where covering raises it."""
    grey = x.mean(axis=0) if x.shape[0] > 1 else x[0]
    peak = float(np.abs(pixel_drops).max())
    heat = pixel_drops / peak if peak > 0 else np.zeros_like(pixel_drops)
    down, up = np.clip(heat, 0, 1), np.clip(-heat, 0, 1)
    rest = 1 - down - up
    rgb = np.stack([grey, grey, grey], axis=-1) * 0.6
    rgb[..., 0] += 0.4 * down + 0.4 * grey * rest
    rgb[..., 1] += 0.4 * grey * rest
    rgb[..., 2] += 0.4 * up + 0.4 * grey * rest
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")
    if min(img.size) < 224:  # small inputs (28x28) are enlarged so the map can be seen
        scale = -(-224 // min(img.size))
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
