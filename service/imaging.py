"""Image decoding and preprocessing shared by training and serving.

This module is the single place where bytes become model pixels. Training's data loaders and the
service both call :func:`decode_image`, so an image file gets identical pixels on both sides.
It depends on Pillow and NumPy only: never on torch.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service import png
from service.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# What open_image returns: a header read by Pillow, or a small PNG for libspng to decode.
Opened = Image.Image | png.SmallPng
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
RESIZE_POLICIES = ("stretch", "center_crop")
# A JPEG's scans are decoded one after another, and each walks every block of the image even
# when it carries no data (about 56 us per scan at 1024x768): a 1 MB file of 100,000 empty scans
# held a worker for 5.6 s. Encoders write 1 scan (baseline), 3 (non-interleaved) or about 10
# (progressive); libjpeg-turbo suggests a limit for exactly this case. A baseline JPEG with extra
# scans fails in libjpeg at once.
MAX_JPEG_SCANS = 100
_SOS = b"\xff\xda"  # start of scan: entropy-coded data never holds 0xFF followed by 0xDA
# Mode conversions of large images work on bands of about this many pixels, so their
# temporaries (uint16 or int32 copies) stay a few MB whatever the image's size.
_BAND_PIXELS = 1 << 20


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the model's input; written into the ONNX metadata by training."""

    height: int
    width: int
    channels: int
    interpolation: str = "bilinear"
    # Pixels are fed as uint8 / 255 in [0, 1]; mean/std normalisation is inside the graph.
    normalization: str = "in_graph"
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)
    # "stretch": resize to height x width whatever the aspect ratio (the seed CNN's policy);
    # "center_crop": scale so the image covers (height, width) / crop_fraction, keeping its
    # aspect ratio, then cut out the centre: how ImageNet models are trained and evaluated.
    resize: str = "stretch"
    crop_fraction: float = 0.875

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(
                f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}"
            )

    @property
    def color_mode(self) -> str:
        """Pillow mode of the model input: 'L' (grey) or 'RGB'."""
        return "L" if self.channels == 1 else "RGB"

    def to_json(self) -> str:
        """Serialise for the ONNX metadata."""
        data = asdict(self)
        data["color_mode"] = self.color_mode
        data["input_scale"] = "1/255"
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        """Read back what :meth:`to_json` wrote; unknown keys are ignored."""
        data: dict[str, Any] = json.loads(text)
        return cls(
            height=int(data["height"]),
            width=int(data["width"]),
            channels=int(data["channels"]),
            interpolation=str(data.get("interpolation", "bilinear")),
            normalization=str(data.get("normalization", "in_graph")),
            mean=tuple(float(v) for v in data.get("mean", ())),
            std=tuple(float(v) for v in data.get("std", ())),
            resize=str(data.get("resize", "stretch")),
            crop_fraction=float(data.get("crop_fraction", 0.875)),
        )

    def scaled_size(self, width: int, height: int) -> tuple[int, int]:
        """The size an image of ``width`` x ``height`` is resized to before any crop."""
        if self.resize == "stretch":
            return self.width, self.height
        scale = max(self.width / width, self.height / height) / self.crop_fraction
        return max(self.width, round(width * scale)), max(self.height, round(height * scale))


def _open(data: bytes) -> Image.Image:
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image has too many pixels: {exc}") from exc
    except UnidentifiedImageError:
        pass
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise InvalidImage(f"cannot read the image header: {exc}") from exc
    # Tell "an image in a format we refuse" (415) from "not an image" (400). Opening reads the
    # header only; nothing in an unaccepted format is ever decoded.
    try:
        with Image.open(io.BytesIO(data)) as other:
            found = other.format
    except Exception:
        found = None
    if found:
        raise UnsupportedMediaType(
            f"image format {found} is not supported; use one of {', '.join(ACCEPTED_FORMATS)}"
        )
    raise InvalidImage("the bytes are not an image in a recognised format")


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow mode to 'L' or 'RGB'; transparency is composited onto black.

    16-bit and 32-bit images are scaled to 8 bits (by 255/65535 when any value is above 255,
    else kept), float images clipped to [0, 255]; both band by band, so that a 72 KB PNG of
    6000x6000 16-bit pixels costs the decoded image and a few MB, not float64 copies of it."""
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = max(int(band.max(initial=0)) for band in _bands(img)) > 255
        img = _banded(img, "L", lambda a: _scale_to_8_bits(a, wide))
    elif img.mode == "F":
        img = _banded(img, "L", lambda a: a.clip(0, 255).astype(np.uint8))
    elif (img.mode == "P" and "transparency" not in img.info) or img.mode in (
            "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif img.mode == "1":
        img = img.convert("L")
    if img.mode in _ALPHA_MODES or img.mode == "P":
        img = _banded(img, "RGB", _onto_black, "RGBA")
    return img if img.mode == mode else img.convert(mode)


def _scale_to_8_bits(a: np.ndarray, wide: bool) -> np.ndarray:
    """round(x * 255 / 65535) for 16-bit samples (exact: no x falls halfway), or x for samples
    that fit 8 bits; out-of-range values of mode I saturate."""
    x = np.clip(a, 0, 65535 if wide else 255).astype(np.uint32)
    if wide:
        x *= 255
        x += 32767
        x //= 65535
    return x.astype(np.uint8)


def _onto_black(rgba: np.ndarray) -> np.ndarray:
    """RGBA samples composited onto black: round(c * alpha / 255)."""
    wide = rgba.astype(np.uint16)
    rgb = wide[..., :3] * wide[..., 3:4]
    rgb += 127
    rgb //= 255
    return rgb.astype(np.uint8)


def _banded(img: Image.Image, mode: str, convert: Callable[[np.ndarray], np.ndarray],
            read_as: str | None = None) -> Image.Image:
    """``img`` converted to ``mode`` by ``convert`` on the samples of one band of rows at a time
    (each band first converted to the Pillow mode ``read_as``, when given)."""
    width, height = img.size
    out = np.empty((height, width, len(mode)) if len(mode) > 1 else (height, width), np.uint8)
    top = 0
    for band in _bands(img, read_as):
        out[top : top + band.shape[0]] = convert(band)
        top += band.shape[0]
    return Image.fromarray(out, mode)


def _bands(img: Image.Image, read_as: str | None = None) -> Iterator[np.ndarray]:
    """The samples of ``img``, a band of rows at a time."""
    width, height = img.size
    rows = max(1, _BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        band = img.crop((0, top, width, min(height, top + rows)))
        yield np.asarray(band.convert(read_as) if read_as is not None else band)


def open_image(data: bytes, max_pixels: int | None = None) -> Opened:
    """Read only the header of encoded image bytes: cheap whatever the image's size.

    Raises InvalidImage (not an image), UnsupportedMediaType (a format we refuse) or
    PayloadTooLarge (more than ``max_pixels`` pixels). The caller closes the image, or passes it
    to :func:`pixels_of`, which does. A small plain PNG comes back as a
    :class:`service.png.SmallPng`, which :func:`pixels_of` decodes without Pillow's plugin.
    """
    img: Opened | None = png.sniff(data)
    if img is None:
        img = _open(data)
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    # Only progressive JPEGs decode scan after scan (a baseline one with extra scans is refused
    # by libjpeg at once); counting costs about 1 us per KB, so baseline photos skip it.
    if progressive(img) and (scans := data.count(_SOS)) > MAX_JPEG_SCANS:
        img.close()
        raise InvalidImage(f"the JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are accepted")
    return img


def progressive(img: Opened) -> bool:
    """Whether an opened image is a progressive JPEG (decoded scan by scan)."""
    return isinstance(img, Image.Image) and bool(img.info.get("progressive"))


def decoded_pixels(img: Opened, spec: PreprocessSpec) -> int:
    """The pixels :func:`pixels_of` will decode ``img`` to before resizing: a JPEG decodes at the
    reduced scale of :meth:`PIL.JpegImagePlugin.JpegImageFile.draft`, anything else whole."""
    width, height = img.size
    if img.format != "JPEG":
        return width * height
    target_w, target_h = spec.scaled_size(width, height)
    ratio = min(width // target_w, height // target_h)
    scale = next(s for s in (8, 4, 2, 1) if ratio >= s or s == 1)
    return -(-width // scale) * -(-height // scale)


def pixels_of(img: Opened, spec: PreprocessSpec) -> np.ndarray:
    """Decode an image opened by :func:`open_image` into a C×H×W uint8 array in the model's
    size and colour mode, and close it. Raises InvalidImage (truncated or corrupt data)."""
    if isinstance(img, png.SmallPng):
        samples = png.decode(img)
        if samples is None:  # libspng refused it: Pillow decodes it or says what is wrong
            return pixels_of(_open(img.data), spec)
        if img.mode == spec.color_mode and img.size == (spec.width, spec.height):
            return _channels_first(samples)  # what Pillow's path returns for it, without a copy
        return _fit(Image.fromarray(samples), spec)
    try:
        if img.format == "JPEG":
            # Decode at a reduced DCT scale when the target is much smaller: the cost then stops
            # growing with megapixels. draft() keeps the result at least as large as asked.
            img.draft(spec.color_mode, spec.scaled_size(*img.size))
        try:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PayloadTooLarge(f"image has too many pixels: {exc}") from exc
        except Exception as exc:  # truncated or corrupt data: every decoder raises its own type
            raise InvalidImage(f"cannot decode the image: {exc}") from exc
        return _fit(img, spec)
    finally:
        img.close()


def _fit(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """A decoded image in the model's colour mode and size (resized, and cropped for
    center_crop), as a C×H×W uint8 array."""
    out = _to_mode(img, spec.color_mode)
    width, height = out.size
    scaled = spec.scaled_size(width, height)
    if scaled != (spec.width, spec.height):  # center_crop
        # Scale to ``scaled`` and cut out the centre, in one resample of just the part of the
        # image the centre comes from (Pillow's ``box``): the same filter and the same source
        # positions, on 224x224 output pixels instead of the 341x256 of the whole; pixel values
        # agree within 1. The 640x480 photo decodes in 2.16 ms instead of 2.46-2.60
        # (bench/decode_cost.py --formats JPEG --sizes 640x480, column "224 crop").
        sx, sy = width / scaled[0], height / scaled[1]
        left, top = (scaled[0] - spec.width) // 2, (scaled[1] - spec.height) // 2
        box = (left * sx, top * sy, (left + spec.width) * sx, (top + spec.height) * sy)
        out = out.resize((spec.width, spec.height), _RESAMPLE[spec.interpolation], box=box)
    elif out.size != scaled:
        out = out.resize(scaled, _RESAMPLE[spec.interpolation])
    return _channels_first(np.asarray(out, dtype=np.uint8))


def _channels_first(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 2:
        return pixels[np.newaxis, :, :]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def decode_image(data: bytes, spec: PreprocessSpec, max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes into a C×H×W uint8 array in the model's size and colour mode.

    Raises InvalidImage (corrupt or not an image), UnsupportedMediaType (a format we refuse) or
    PayloadTooLarge (more than ``max_pixels`` pixels, checked from the header before decoding).
    """
    return pixels_of(open_image(data, max_pixels), spec)


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (C×H×W or N×C×H×W) to the float32 values the model takes, in [0, 1]."""
    x = pixels.astype(np.float32)  # a copy, so dividing in place is safe
    x /= np.float32(255.0)
    return x
