"""Batched random affine augmentation on tensors, with Keras ``ImageDataGenerator`` meanings.

One ``affine_grid``/``grid_sample`` call transforms a whole batch on the training device; a
per-image Python loop is several times slower (see ``bench/train_throughput.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotation_range: float = 0.0  # degrees; angle drawn from [-r, r]
    width_shift_range: float = 0.0  # fraction of width; shift drawn from [-s, s]
    height_shift_range: float = 0.0  # fraction of height
    shear_range: float = 0.0  # degrees, counter-clockwise, drawn from [-s, s]
    zoom_range: float = 0.0  # per-axis scale drawn from [1 - z, 1 + z]
    horizontal_flip: bool = False  # flip half of the images left-right

    @property
    def active(self) -> bool:
        return any(
            (
                self.rotation_range,
                self.width_shift_range,
                self.height_shift_range,
                self.shear_range,
                self.zoom_range,
                self.horizontal_flip,
            )
        )


PRESETS: dict[str, AugmentConfig] = {
    # The classic example's ImageDataGenerator settings.
    "seed": AugmentConfig(20, 0.2, 0.2, 0.2, 0.2, True),
    # Flips plus about one pixel of shift and 5% zoom: regularises small centred images (like
    # Fashion-MNIST) without the distortion that costs the seed preset accuracy there.
    "light": AugmentConfig(0, 0.05, 0.05, 0, 0.05, True),
    "none": AugmentConfig(),
}


def _uniform(n: int, bound: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=gen, device=device) * 2 - 1) * bound


def random_affine(
    images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> torch.Tensor:
    """Apply one random transform per image of an N×C×H×W float batch; fill mode is nearest."""
    if not cfg.active:
        return images
    n, _, h, w = images.shape
    dev = images.device
    theta = torch.deg2rad(_uniform(n, cfg.rotation_range, gen, dev))
    shear = torch.deg2rad(_uniform(n, cfg.shear_range, gen, dev))
    zx = 1 + _uniform(n, cfg.zoom_range, gen, dev)
    zy = 1 + _uniform(n, cfg.zoom_range, gen, dev)
    # Shifts in pixels, converted below to grid units (2 / size per pixel).
    tx = _uniform(n, cfg.width_shift_range, gen, dev) * w
    ty = _uniform(n, cfg.height_shift_range, gen, dev) * h
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Keras composes rotation · shear · zoom and maps output coordinates to input coordinates,
    # which is exactly what affine_grid's theta does. Work in pixel units (so rotations are not
    # skewed on non-square images), then rescale to the grid's [-1, 1] units.
    # Rotation R = [[c, -s], [s, c]], shear S = [[1, -sin(sh)], [0, cos(sh)]], zoom Z = diag(zx, zy)
    # M = R · S · Z
    m00 = cos * zx
    m01 = (-cos * torch.sin(shear) - sin * torch.cos(shear)) * zy
    m10 = sin * zx
    m11 = (-sin * torch.sin(shear) + cos * torch.cos(shear)) * zy
    sx, sy = w / 2.0, h / 2.0
    mat = torch.zeros(n, 2, 3, device=dev, dtype=images.dtype)
    mat[:, 0, 0] = m00
    mat[:, 0, 1] = m01 * sy / sx
    mat[:, 1, 0] = m10 * sx / sy
    mat[:, 1, 1] = m11
    mat[:, 0, 2] = tx / sx
    mat[:, 1, 2] = ty / sy
    if cfg.horizontal_flip:
        flip = torch.rand(n, generator=gen, device=dev) < 0.5
        mat[:, :, 0] = torch.where(flip[:, None], -mat[:, :, 0], mat[:, :, 0])
    grid = F.affine_grid(mat, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def per_image_reference(images: torch.Tensor, cfg: AugmentConfig, seed: int) -> torch.Tensor:
    """Per-image Pillow augmentation, kept only as the benchmark's slow baseline."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        arr = (img.squeeze(0).numpy() * 255).astype("uint8")
        pil = Image.fromarray(arr)
        angle = rng.uniform(-cfg.rotation_range, cfg.rotation_range)
        tx = round(rng.uniform(-cfg.width_shift_range, cfg.width_shift_range) * pil.width)
        ty = round(rng.uniform(-cfg.height_shift_range, cfg.height_shift_range) * pil.height)
        shear = math.radians(rng.uniform(-cfg.shear_range, cfg.shear_range))
        zoom = rng.uniform(1 - cfg.zoom_range, 1 + cfg.zoom_range)
        pil = pil.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(tx, ty))
        pil = pil.transform(
            pil.size,
            Image.Transform.AFFINE,
            (zoom, math.tan(shear), 0, 0, zoom, 0),
            resample=Image.Resampling.BILINEAR,
        )
        if cfg.horizontal_flip and rng.random() < 0.5:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None])
    return torch.stack(out)
