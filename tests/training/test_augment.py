from __future__ import annotations

import torch

from training.augment import PRESETS, AugmentConfig, random_affine


def _batch() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(8, 1, 28, 28)


def test_none_is_identity() -> None:
    x = _batch()
    assert random_affine(x, PRESETS["none"], torch.Generator().manual_seed(0)) is x


def test_seeded_and_shape_preserving() -> None:
    x = _batch()
    a = random_affine(x, PRESETS["seed"], torch.Generator().manual_seed(1))
    b = random_affine(x, PRESETS["seed"], torch.Generator().manual_seed(1))
    c = random_affine(x, PRESETS["seed"], torch.Generator().manual_seed(2))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, x)


def test_horizontal_flip_mirrors_exactly() -> None:
    x = _batch()
    out = random_affine(x, AugmentConfig(horizontal_flip=True), torch.Generator().manual_seed(0))
    for img, res in zip(x, out, strict=True):
        assert torch.allclose(res, img, atol=1e-5) or torch.allclose(res, img.flip(-1), atol=1e-5)
    flipped = sum(not torch.allclose(r, i, atol=1e-5) for i, r in zip(x, out, strict=True))
    assert 0 < flipped < len(x)


def test_shift_moves_content_and_fills_with_nearest() -> None:
    x = torch.zeros(64, 1, 20, 20)
    x[:, :, 8:12, 8:12] = 1.0
    out = random_affine(x, AugmentConfig(width_shift_range=0.2), torch.Generator().manual_seed(0))
    # Vertical position is untouched; horizontal centre of mass moves by at most 20% of 20 px.
    cols = torch.arange(20.0)
    com = (out.sum(dim=(1, 2)) * cols).sum(1) / out.sum(dim=(1, 2, 3))
    assert torch.all((com - 9.5).abs() <= 4.0 + 1e-4)
    assert (com - 9.5).abs().max() > 1.0
    assert torch.allclose(out.sum(dim=(1, 3))[:, :8], torch.zeros(64, 8))


def test_rotation_keeps_a_centred_disc() -> None:
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    disc = (((yy - 13.5) ** 2 + (xx - 13.5) ** 2) < 36).float()[None, None].repeat(4, 1, 1, 1)
    out = random_affine(disc, AugmentConfig(rotation_range=90), torch.Generator().manual_seed(0))
    assert (out - disc).abs().mean() < 0.02
