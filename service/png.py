"""Small PNGs decoded by libspng (``pyspng``) in one C call instead of Pillow's plugin.

``decode_image`` of a 28x28 grey PNG takes 0.036 ms through Pillow's plugin and 0.010 ms with
libspng (``bench/decode_cost.py --formats PNG --sizes 28x28 --modes L --decoders default
pillow``); in the whole request path the difference came to about 40-50 us of a request's
150-250 (``bench/request_cost.py --variants default pillow``).
PNG is lossless, so any correct decoder gives the same samples: the fast path is taken only
where Pillow would give exactly those samples too, and :mod:`service.imaging` does everything
after decoding (mode conversion, resize, crop) with Pillow as before, so training and serving
still share one function and one result. The fast path is taken for:

- 8-bit grey, grey+alpha, RGB and RGBA images (not palettes, not 1, 2, 4 or 16 bits, whose
  Pillow modes differ from the raw samples);
- whose chunks are all in :data:`PLAIN_CHUNKS`: none that Pillow turns into an orientation
  (``eXIf``, and text chunks holding EXIF or XMP) or into a transparency (``tRNS``);
- of at most :data:`MAX_PIXELS` pixels: libspng holds the GIL while it decodes, so a large PNG
  stays with Pillow, which releases it.

Anything else, any PNG with a chunk whose CRC does not match, and any PNG libspng refuses,
goes to Pillow, whose verdict (and error message) stands.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

try:
    import pyspng
except ImportError:  # no wheel for this platform: every PNG is decoded by Pillow
    pyspng = None

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Colour type (with bit depth 8) -> the Pillow mode of the decoded samples.
MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}
# Chunks that change nothing in the pixels Pillow decodes: the image data, and metadata Pillow
# only records (colour space, gamma, resolution, background, significant bits, time).
PLAIN_CHUNKS = frozenset({b"IHDR", b"IDAT", b"IEND", b"pHYs", b"sRGB", b"gAMA", b"cHRM",
                          b"iCCP", b"sBIT", b"bKGD", b"tIME"})
# 256x256: decode_image takes 0.5 ms (grey) to 1.3 ms (RGB) with libspng, which holds the GIL
# meanwhile, against 0.9-1.9 ms with Pillow (bench/decode_cost.py --formats PNG --sizes 256x256
# --modes L RGB --decoders default pillow, on the 2-core AMD EPYC).
MAX_PIXELS = 65_536
MAX_CHUNKS = 64  # more is unusual for a small PNG; Pillow reads those (the walk stays short)
_IHDR = struct.Struct(">I4sIIBBBBB")  # length, type, width, height, depth, colour, ..., interlace
_CHUNK = struct.Struct(">I4s")


@dataclass(frozen=True, slots=True)
class SmallPng:
    """A PNG that libspng decodes to exactly the pixels Pillow would; opened, not decoded."""

    data: bytes
    size: tuple[int, int]  # width, height, as Pillow's Image.size
    mode: str

    format = "PNG"

    def close(self) -> None:
        """Nothing to release (as Image.close, for callers that hold either)."""


def sniff(data: bytes) -> SmallPng | None:
    """``data`` as a :class:`SmallPng` when the fast path applies to it, else None. Reads the
    chunk headers only."""
    if pyspng is None or not data.startswith(SIGNATURE) or len(data) < 8 + _IHDR.size + 4:
        return None
    length, kind, width, height, depth, colour, _, _, _ = _IHDR.unpack_from(data, 8)
    mode = MODES.get(colour)
    if (kind != b"IHDR" or length != 13 or depth != 8 or mode is None or width < 1
            or height < 1 or width * height > MAX_PIXELS or not _crc_ok(data, 8, length)):
        return None
    offset = 8 + 8 + 13 + 4
    for _ in range(MAX_CHUNKS):
        if offset + _CHUNK.size > len(data):
            return None  # truncated: Pillow says how
        length, kind = _CHUNK.unpack_from(data, offset)
        if kind not in PLAIN_CHUNKS or not _crc_ok(data, offset, length):
            return None
        if kind == b"IEND":
            return SmallPng(data, (width, height), mode)
        offset += _CHUNK.size + length + 4
    return None


def _crc_ok(data: bytes, offset: int, length: int) -> bool:
    """Whether the chunk at ``offset`` is whole and its CRC matches its type and data. libspng
    as built here decodes a PNG whose checksums are wrong; Pillow refuses most such files, and
    the bytes are not the image that was sent: any mismatch sends the file to Pillow, whose
    verdict stands."""
    end = offset + _CHUNK.size + length
    if end + 4 > len(data):
        return False
    return zlib.crc32(data[offset + 4 : end]) == int.from_bytes(data[end : end + 4], "big")


def decode(png: SmallPng) -> np.ndarray | None:
    """The H×W or H×W×C uint8 samples, or None when libspng refuses the data (the caller then
    asks Pillow, which explains what is wrong, or decodes what libspng would not)."""
    assert pyspng is not None  # a SmallPng exists only with it
    width, height = png.size
    channels = len(png.mode)
    try:
        pixels: np.ndarray = pyspng.load(png.data)
    except Exception:  # libspng's errors are RuntimeError or ValueError; any is a refusal
        return None
    expected = (height, width) if channels == 1 else (height, width, channels)
    if pixels.dtype != np.uint8 or pixels.shape != expected:
        return None
    return pixels
