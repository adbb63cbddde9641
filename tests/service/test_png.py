"""The libspng fast path for small PNGs: taken only where it gives Pillow's pixels exactly, and
every other PNG goes to Pillow, whose verdict stands."""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from skimage import data as photos

from service import png
from service.errors import InvalidImage
from service.imaging import PreprocessSpec, decode_image

GREY = PreprocessSpec(28, 28, 1)
SNEAKER = Path(__file__).resolve().parents[2] / "bench" / "data" / "fmnist_sneaker.png"
SPECS = [GREY, PreprocessSpec(32, 32, 3), PreprocessSpec(20, 24, 3, resize="center_crop"),
         PreprocessSpec(16, 16, 1, interpolation="bicubic")]


def encode(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def with_pillow(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """The pixels Pillow alone gives (as on a platform without the libspng wheel)."""
    original = png.pyspng
    png.pyspng = None  # not monkeypatch: hypothesis does not mix with function-scoped fixtures
    try:
        return decode_image(data, spec)
    finally:
        png.pyspng = original


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def insert_chunk(data: bytes, kind: bytes, body: bytes) -> bytes:
    """``data`` with a chunk added right after IHDR."""
    return data[:33] + chunk(kind, body) + data[33:]


def test_the_fast_path_is_available() -> None:
    # The dependency is installed where CI runs; without it every other test here would pass
    # on Pillow alone and prove nothing about the fast path.
    assert png.pyspng is not None


@pytest.mark.parametrize("mode", ["L", "RGB", "LA", "RGBA"])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("interlace", [0, 1])
def test_plain_pngs_decode_as_pillow_decodes_them(mode: str, spec: PreprocessSpec,
                                                  interlace: int) -> None:
    rng = np.random.default_rng(len(mode) + interlace)
    channels = len(mode)
    pixels = rng.integers(0, 256, (37, 45, channels) if channels > 1 else (37, 45), np.uint8)
    data = encode(Image.fromarray(pixels), interlace=interlace)
    assert png.sniff(data) == png.SmallPng(data, (45, 37), mode)
    assert np.array_equal(decode_image(data, spec), with_pillow(data, spec))


@settings(max_examples=80, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 64), st.integers(1, 64),
                                  st.sampled_from([1, 2, 3, 4]))),
       st.integers(0, 9), st.sampled_from(SPECS))
def test_any_small_plain_png_decodes_as_pillow_decodes_it(pixels: np.ndarray, level: int,
                                                          spec: PreprocessSpec) -> None:
    img = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    data = encode(img, compress_level=level)
    assert png.sniff(data) is not None
    assert np.array_equal(decode_image(data, spec), with_pillow(data, spec))


def test_fashion_mnist_images_are_unchanged(fmnist_test: object) -> None:
    images = fmnist_test.images[:200, 0].numpy()  # type: ignore[attr-defined]
    for pixels in images:
        data = encode(Image.fromarray(pixels))
        assert png.sniff(data) is not None
        assert np.array_equal(decode_image(data, GREY)[0], pixels)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "camera"])
def test_photographs_give_pillows_pixels(name: str) -> None:
    photo = Image.fromarray(getattr(photos, name)()).resize((160, 120))
    data = encode(photo)
    assert png.sniff(data) is not None
    for spec in SPECS:
        assert np.array_equal(decode_image(data, spec), with_pillow(data, spec))


def _oriented_png() -> bytes:
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return encode(img, exif=exif)


@pytest.mark.parametrize("case", ["palette", "16-bit", "1-bit", "transparency", "orientation",
                                  "text", "xmp", "too large", "no IEND", "truncated",
                                  "many chunks"])
def test_other_pngs_go_to_pillow_and_decode_as_before(case: str) -> None:
    grey = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40), np.uint8))
    plain = encode(grey)
    data = {
        "palette": lambda: encode(grey.convert("RGB").convert("P")),
        "16-bit": lambda: encode(Image.fromarray(np.asarray(grey, np.uint16) * 257)),
        "1-bit": lambda: encode(grey.convert("1")),
        "transparency": lambda: encode(grey, transparency=7),
        "orientation": _oriented_png,
        "text": lambda: insert_chunk(plain, b"tEXt", b"Software\x00test"),
        "xmp": lambda: insert_chunk(plain, b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00<x/>"),
        "too large": lambda: encode(grey.resize((257, 256))),
        "no IEND": lambda: plain[:-12],  # Pillow decodes it all the same
        "truncated": lambda: plain[: len(plain) // 2],
        "many chunks": lambda: _split_idat(plain, png.MAX_CHUNKS + 1),
    }[case]()
    assert png.sniff(data) is None
    if case == "truncated":
        with pytest.raises(InvalidImage, match="decode"):
            decode_image(data, GREY)
        return
    out = decode_image(data, GREY)
    assert np.array_equal(out, with_pillow(data, GREY))
    if case == "orientation":  # displayed upright, the white half is on top
        assert out.shape == (1, 28, 28) and out[0, :12].mean() > 200 and out[0, 16:].mean() < 50


def _split_idat(data: bytes, parts: int) -> bytes:
    """The same PNG with its image data spread over ``parts`` IDAT chunks (still valid)."""
    length = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    stream = data[41 : 41 + length]
    step = len(stream) // parts
    assert step >= 1
    pieces = [stream[i * step : (i + 1) * step] for i in range(parts - 1)]
    pieces.append(stream[(parts - 1) * step :])
    return data[:33] + b"".join(chunk(b"IDAT", p) for p in pieces) + data[41 + length + 4 :]


def test_a_png_libspng_refuses_gets_pillows_error() -> None:
    """Well-formed chunks around image data that is not a zlib stream: the fast path is chosen,
    libspng refuses, and Pillow's decode error is what the caller sees."""
    data = encode(Image.new("L", (28, 28), 9))
    length = struct.unpack(">I", data[33:37])[0]
    broken = data[:33] + chunk(b"IDAT", b"\x00" * length) + data[41 + length + 4 :]
    assert png.sniff(broken) is not None
    with pytest.raises(InvalidImage, match="decode"):
        decode_image(broken, GREY)


def test_a_png_with_a_wrong_header_checksum_is_refused(client: TestClient) -> None:
    """One flipped byte in IHDR's CRC (offset 29): Pillow refuses the file, and so does the
    service, raw and multipart, instead of classifying bytes that are not the image sent."""
    data = bytearray(SNEAKER.read_bytes())
    data[29] ^= 0x01
    broken = bytes(data)
    assert png.sniff(broken) is None
    with pytest.raises(InvalidImage):
        with_pillow(broken, GREY)
    resp = client.post("/v1/classify", content=broken, headers={"Content-Type": "image/png"})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_image"
    resp = client.post("/v1/classify", files=[("file", ("a.png", broken, "image/png")),
                                              ("file", ("b.png", SNEAKER.read_bytes(),
                                                        "image/png"))])
    first, second = resp.json()["results"]
    assert first["error"]["type"] == "invalid_image" and "predictions" in second


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_single_flipped_byte_gets_pillows_answer(data: st.DataObject) -> None:
    """Flip any one byte of a valid small PNG (a real Fashion-MNIST image, and an RGB one): the
    service's answer is Pillow's alone, the same pixels or a refusal."""
    original = data.draw(st.sampled_from(_flip_sources()))
    at = data.draw(st.integers(0, len(original) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != original[at]))
    flipped = original[:at] + bytes([value]) + original[at + 1 :]
    try:
        expected: np.ndarray | type[Exception] = with_pillow(flipped, GREY)
    except InvalidImage:
        expected = InvalidImage
    except Exception as exc:  # another refusal (415, 413): the same type is expected
        expected = type(exc)
    if isinstance(expected, np.ndarray):
        assert np.array_equal(decode_image(flipped, GREY), expected)
    else:
        with pytest.raises(expected):
            decode_image(flipped, GREY)


@functools.cache
def _flip_sources() -> list[bytes]:
    from training.data import load_fashion_mnist

    images = load_fashion_mnist("test").images
    grey = images[7, 0].numpy()
    rgb = np.stack([grey, images[8, 0].numpy(), images[9, 0].numpy()], -1)
    return [SNEAKER.read_bytes(), encode(Image.fromarray(grey)), encode(Image.fromarray(rgb))]
