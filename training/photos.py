"""Real photographs for checking a photo model where no labelled data set is available: the
photographs scikit-image ships (installed with it; nothing is downloaded), each seen in several
views (crops at three scales and their mirror images), decoded with the model's own
preprocessing. Half the views calibrate an int8 model, the other half check that its top-1
answers agree with fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from service.imaging import PreprocessSpec, pixels_of
from service.onnx_meta import read_metadata_props

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel", "camera", "coins", "clock", "moon",
          "brick", "grass", "gravel", "cell")


def views(img: Image.Image) -> list[Image.Image]:
    """Ten views: the whole image, and a centred and an offset crop at 80% and at 60% of its
    size, each also mirrored."""
    out = []
    w, h = img.size
    for scale in (1.0, 0.8, 0.6):
        cw, ch = int(w * scale), int(h * scale)
        for dx, dy in ((0.5, 0.5), (0.2, 0.3)) if scale < 1 else ((0.5, 0.5),):
            left, top = int((w - cw) * dx), int((h - ch) * dy)
            crop = img.crop((left, top, left + cw, top + ch))
            out += [crop, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return out


def calibration_and_check_photos(model: Path) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, check): N×C×H×W float32 in [0, 1], alternate views of every photograph."""
    import skimage.data

    spec = PreprocessSpec.from_json(read_metadata_props(model)["imgserve.preprocess"])
    calibration: list[np.ndarray] = []
    check: list[np.ndarray] = []
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        img = Image.fromarray(array).convert("RGB")
        for i, view in enumerate(views(img)):
            (calibration if i % 2 == 0 else check).append(pixels_of(view, spec))
    return (np.stack(calibration).astype(np.float32) / 255,
            np.stack(check).astype(np.float32) / 255)
