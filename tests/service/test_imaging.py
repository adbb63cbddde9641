from __future__ import annotations

import contextlib
import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from service.imaging import PreprocessSpec, decode_image, to_model_input

GREY = PreprocessSpec(28, 28, 1)
RGB = PreprocessSpec(32, 32, 3)


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 40, h: int = 30) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return Image.fromarray(np.stack([x, x[::-1], np.full_like(x, 128)], -1))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
@pytest.mark.parametrize("spec", [GREY, RGB])
def test_accepted_formats_decode_to_the_model_shape(fmt: str, spec: PreprocessSpec) -> None:
    out = decode_image(encode(gradient(), fmt), spec)
    assert out.shape == (spec.channels, spec.height, spec.width)
    assert out.dtype == np.uint8


def test_png_at_model_size_is_lossless(fmnist_test: object) -> None:
    pixels = fmnist_test.images[3, 0].numpy()  # type: ignore[attr-defined]
    out = decode_image(encode(Image.fromarray(pixels), "PNG"), GREY)
    assert np.array_equal(out[0], pixels)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_mode_converts(mode: str) -> None:
    base = gradient()
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)
        assert img.mode == "I;16"
        out = decode_image(encode(img, "PNG"), GREY)
        ref = decode_image(encode(base.convert("L"), "PNG"), GREY)
        assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1  # 16-bit scaled, not clipped
        return
    img = base.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    if mode == "PA":
        fmt = "PNG"
        img = base.convert("RGBA").convert("PA") if hasattr(Image, "PA") else base.convert("P")
    out = decode_image(encode(img, fmt), RGB)
    assert out.shape == (3, 32, 32)


def test_transparent_pixels_become_black() -> None:
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:5, :, 3] = 255  # top half opaque white, bottom half fully transparent white
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), PreprocessSpec(10, 10, 1))
    assert out[0, :5].min() == 255 and out[0, 5:].max() == 0


def test_gif_uses_the_first_frame() -> None:
    frames = [Image.new("L", (8, 8), v) for v in (200, 10)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue(), PreprocessSpec(8, 8, 1))
    assert abs(int(out.mean()) - 200) <= 2


def test_exif_orientation_is_applied() -> None:
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    portrait = PreprocessSpec(height=40, width=20, channels=1)  # the oriented size: no resize
    out = decode_image(encode(img, "JPEG", exif=exif, quality=95), portrait)
    upright = decode_image(encode(img.rotate(-90, expand=True), "JPEG", quality=95), portrait)
    # Displayed upright, the white half is on top.
    assert out[0, :18].mean() > 200 and out[0, 22:].mean() < 50
    assert np.abs(out.astype(int) - upright.astype(int)).mean() < 8


def test_large_jpeg_is_decoded_at_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    big = gradient(3000, 2000)
    data = encode(big, "JPEG", quality=90)
    decoded_sizes: list[tuple[int, int]] = []
    real_load = Image.Image.load

    def spy(self: Image.Image) -> object:
        result = real_load(self)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(Image.Image, "load", spy)
    out = decode_image(data, GREY)
    assert out.shape == (1, 28, 28)
    assert decoded_sizes and max(w for w, _ in decoded_sizes) <= 3000 // 8


def test_not_an_image_is_400() -> None:
    with pytest.raises(InvalidImage, match="not an image"):
        decode_image(b"hello world, this is text", GREY)
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"", GREY)


def test_truncated_image_is_400() -> None:
    data = encode(gradient(200, 200), "PNG")
    with pytest.raises(InvalidImage, match="decode"):
        decode_image(data[: len(data) // 2], GREY)
    jpeg = encode(gradient(200, 200), "JPEG")
    with pytest.raises(InvalidImage):
        decode_image(jpeg[:300], GREY)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX"])
def test_refused_formats_are_415(fmt: str) -> None:
    with pytest.raises(UnsupportedMediaType, match=fmt if fmt != "PPM" else "PPM"):
        decode_image(encode(gradient(32, 32).convert("RGB"), fmt), GREY)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression-bomb shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [7000, 12_000, 60_000])
def test_pixel_bombs_are_refused_from_the_header(side: int) -> None:
    with pytest.raises(PayloadTooLarge):
        decode_image(_png_claiming(side, side), GREY, max_pixels=40_000_000)


def test_gif_bomb_is_refused() -> None:
    data = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen size
    with pytest.raises((PayloadTooLarge, InvalidImage)):
        decode_image(bytes(data), GREY, max_pixels=40_000_000)


def test_to_model_input_scales_to_unit_range() -> None:
    x = to_model_input(np.array([[[[0, 255, 51]]]], np.uint8))
    assert x.dtype == np.float32
    assert x.tolist() == [[[[0.0, 1.0, np.float32(51) / np.float32(255)]]]]


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=0, max_size=512))
def test_arbitrary_bytes_never_escape_as_other_errors(data: bytes) -> None:
    with contextlib.suppress(InvalidImage, UnsupportedMediaType, PayloadTooLarge):
        decode_image(data, GREY, max_pixels=1_000_000)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200), st.integers(1, 40))
def test_corrupted_png_never_escapes(cut: int, flip: int) -> None:
    data = bytearray(encode(gradient(30, 30), "PNG"))
    for i in range(cut % len(data), len(data), flip + 7):
        data[i] ^= 0x5A
    try:
        out = decode_image(bytes(data), GREY, max_pixels=1_000_000)
        assert out.shape == (1, 28, 28)
    except (InvalidImage, UnsupportedMediaType, PayloadTooLarge):
        pass


def test_center_crop_keeps_the_aspect_ratio_and_the_middle() -> None:
    """A 200x100 image, black at both ends and white in the middle 100 columns: cropped to the
    centre it is all white; stretched, the black ends stay in."""
    pixels = np.zeros((100, 200), np.uint8)
    pixels[:, 50:150] = 255
    data = encode(Image.fromarray(pixels), "PNG")
    crop = decode_image(data, PreprocessSpec(50, 50, 1, resize="center_crop", crop_fraction=1.0))
    assert crop.shape == (1, 50, 50) and crop[:, :, 2:-2].min() >= 250  # edges: filter blur
    stretched = decode_image(data, PreprocessSpec(50, 50, 1))
    assert stretched[:, :, :10].max() <= 5 and stretched[:, :, 20:30].min() >= 250
    # crop_fraction 0.5: the image is scaled to cover 100x100, so the crop sees the middle half
    half = decode_image(data, PreprocessSpec(50, 50, 1, resize="center_crop", crop_fraction=0.5))
    assert half[:, :, 2:-2].min() >= 250


def test_center_crop_of_a_jpeg_photo_uses_draft_and_keeps_its_size() -> None:
    photo = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    spec = PreprocessSpec(224, 224, 3, resize="center_crop")
    assert spec.scaled_size(640, 480) == (341, 256)
    assert decode_image(encode(Image.fromarray(photo), "JPEG"), spec).shape == (3, 224, 224)


def test_resize_policy_travels_in_the_metadata() -> None:
    spec = PreprocessSpec(224, 224, 3, resize="center_crop", crop_fraction=0.875)
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert PreprocessSpec.from_json('{"height": 28, "width": 28, "channels": 1}').resize == \
        "stretch"  # files exported before the policy existed
    with pytest.raises(ValueError, match="resize"):
        PreprocessSpec(8, 8, 1, resize="squash")


# --- high bit depths and alpha, converted band by band ----------------------------------------
def _reference_to_8_bits(img: Image.Image) -> np.ndarray:
    """What the conversion computed before it worked in bands: float64 over the whole image."""
    if img.mode == "F":
        return np.asarray(img).clip(0, 255).astype(np.uint8)
    wide = np.asarray(img, dtype=np.float64)
    top = 65535.0 if wide.max(initial=0) > 255 else 255.0
    return np.rint(wide * (255.0 / top)).clip(0, 255).astype(np.uint8)


def _reference_onto_black(img: Image.Image) -> np.ndarray:
    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
    return ((rgba[..., :3] * rgba[..., 3:4] + 127) // 255).astype(np.uint8)


def test_every_16_bit_value_scales_as_the_float64_formula() -> None:
    from service.imaging import _to_mode

    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    img = Image.fromarray(every)
    assert img.mode == "I;16"
    assert np.array_equal(np.asarray(_to_mode(img, "L")), _reference_to_8_bits(img))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["I;16", "I;16B", "I", "F"]), st.integers(1, 300), st.integers(1, 40),
       st.integers(0, 2**32 - 1), st.sampled_from([255, 4000, 65535, 10**6]))
def test_high_bit_depth_images_convert_as_before(mode: str, width: int, height: int, seed: int,
                                                 top: int) -> None:
    """Banded conversion gives the pixels of the whole-image float64 one, for every mode, size
    (bands of one row at a time included) and range, negatives and values past 16 bits too."""
    import service.imaging as imaging
    from service.imaging import _to_mode

    rng = np.random.default_rng(seed)
    values = rng.integers(-1000 if mode in ("I", "F") else 0, top + 1, (height, width))
    if mode == "F":
        img = Image.fromarray(values.astype(np.float32) / 7)
    elif mode == "I":
        img = Image.fromarray(values.astype(np.int32))
    else:
        raw = values.clip(0, 65535).astype(">u2" if mode == "I;16B" else "<u2").tobytes()
        img = Image.frombytes(mode, (width, height), raw)
    assert img.mode == mode
    expected = _reference_to_8_bits(img)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imaging, "_BAND_PIXELS", max(1, width * 3))  # bands of three rows
        assert np.array_equal(np.asarray(_to_mode(img, "L")), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P"])
def test_transparency_is_composited_band_by_band_as_before(mode: str) -> None:
    import service.imaging as imaging
    from service.imaging import _to_mode

    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (37, 23, 4), dtype=np.uint8)
    img = Image.fromarray(rgba, "RGBA").convert(mode)
    if mode == "P":
        img.info["transparency"] = 3
    expected = _reference_onto_black(img)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imaging, "_BAND_PIXELS", 23 * 5)
        assert np.array_equal(np.asarray(_to_mode(img, "RGB")), expected)


def test_a_jpeg_of_too_many_scans_is_refused_from_its_bytes() -> None:
    from service.imaging import MAX_JPEG_SCANS, open_image

    good = encode(gradient(), "JPEG", progressive=True)
    assert open_image(good).info["progressive"]
    eoi = good.rindex(b"\xff\xd9")
    sos = b"\xff\xda" + struct.pack(">H", 8) + bytes([1, 1, 0, 0, 0, 0])
    with pytest.raises(InvalidImage, match="scans"):
        open_image(good[:eoi] + sos * MAX_JPEG_SCANS + good[eoi:])


@pytest.mark.parametrize("size", [(640, 480), (100, 100), (1600, 1200), (4000, 300)])
@pytest.mark.parametrize("spec", [GREY, RGB, PreprocessSpec(224, 224, 3, resize="center_crop")])
def test_decoded_pixels_are_what_the_reduced_scale_jpeg_decode_gives(
        size: tuple[int, int], spec: PreprocessSpec) -> None:
    from service.imaging import decoded_pixels, open_image

    img = open_image(encode(gradient(*size), "JPEG"))
    estimate = decoded_pixels(img, spec)
    img.draft(spec.color_mode, spec.scaled_size(*img.size))  # as pixels_of does
    img.load()
    assert estimate == img.size[0] * img.size[1]
    assert decoded_pixels(open_image(encode(gradient(*size), "PNG")), spec) == size[0] * size[1]


def test_a_baseline_jpeg_with_extra_scans_fails_at_once() -> None:
    """Only progressive JPEGs decode scan after scan; libjpeg refuses a baseline one with
    scans past its components at once, so its scans need no counting."""
    import time

    good = encode(gradient(1024, 768).convert("L"), "JPEG")
    eoi = good.rindex(b"\xff\xd9")
    sos = b"\xff\xda" + struct.pack(">H", 8) + bytes([1, 1, 0, 0, 0, 0])
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="decode"):
        decode_image(good[:eoi] + sos * 20_000 + good[eoi:], GREY)
    assert time.perf_counter() - started < 0.1
