"""Which occluder makes an occlusion map show what the answer rests on: each of
``service.explain.OCCLUDERS`` on real images, through the real ONNX models.

Fashion-MNIST (the shipped seed CNN, the default grid of 9-pixel patches, stride 3, on the
first ``--per-class`` test images of every class): an image passes when every cell wholly on
background (all its pixels <= 8) changes the top class's score by less than 0.02, and the
strongest cell (largest change either way) lies on the garment (at least a quarter of its pixels
above 8). Photographs (the shipped EfficientNet-Lite0, scikit-image's pictures with a hand-drawn
box around the object, in model-input pixels): the share of the map's positive mass inside the
box, and whether the strongest cell's centre is inside it.

    .venv/bin/python bench/occlusion_check.py                  # 20 images a class
    .venv/bin/python bench/occlusion_check.py --per-class 10 --occluders background mean
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_bench import cpu_model  # noqa: E402
from service.config import Settings  # noqa: E402
from service.explain import OCCLUDERS, Occlusion, occluder  # noqa: E402
from service.imaging import decode_image, to_model_input  # noqa: E402
from service.model import OnnxClassifier  # noqa: E402

BACKGROUND = 8  # a pixel at most this bright is background (Fashion-MNIST's ground is 0)
TOLERANCE = 0.02  # the most a cell wholly on background may change the score
ON_GARMENT = 0.25  # a cell lies on the garment when this share of its pixels is garment (a
# sandal's straps leave half of most cells on them empty)
SEED_CNN = ROOT / "models" / "fashion_mnist_seed_cnn.onnx"
PHOTO_MODEL = ROOT / "models" / "efficientnet_lite0_imagenet.onnx"
# scikit-image picture -> (left, top, right, bottom) of the object in the 224x224 centre crop
PHOTO_BOXES = {"coffee": (25, 0, 200, 175), "rocket": (95, 55, 132, 224)}


def explain(model: OnnxClassifier, x: np.ndarray, kind: str) -> tuple[np.ndarray, Occlusion]:
    """The change map for the top class of ``x`` (C×H×W float32 in [0, 1])."""
    grid = Occlusion.for_spec(model.metadata.spec, None, None)
    probs = model.predict(grid.copies(x, occluder(kind, x, model.metadata.spec, grid)))
    return grid.drop_map(probs, int(np.argmax(probs[0]))), grid


def cell_pixels(grid: Occlusion, pixels: np.ndarray) -> list[list[np.ndarray]]:
    tops, lefts = grid._origins(grid.height), grid._origins(grid.width)
    return [[pixels[t : t + grid.patch, left : left + grid.patch] for left in lefts]
            for t in tops]


def fashion_mnist(model: OnnxClassifier, per_class: int, kinds: list[str]) -> None:
    from training.data import load_fashion_mnist

    test = load_fashion_mnist("test")
    labels = test.labels.numpy()
    print(f"\nFashion-MNIST, {per_class} test images a class, shipped seed CNN: images passing "
          f"(background cells |change| < {TOLERANCE} and the strongest cell on the garment)")
    print("| class | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    worst = dict.fromkeys(kinds, 1.0)
    background_max = dict.fromkeys(kinds, 0.0)
    for c, name in enumerate(test.classes):
        idx = np.nonzero(labels == c)[0][:per_class]
        row = []
        for kind in kinds:
            passed = 0
            for i in idx:
                pixels = test.images[i, 0].numpy()
                drops, grid = explain(model, to_model_input(pixels[None]), kind)
                cells = cell_pixels(grid, pixels)
                on_ground = np.array([[(cell <= BACKGROUND).all() for cell in r] for r in cells])
                garment = np.array([[(cell > BACKGROUND).mean() for cell in r] for r in cells])
                strongest = np.unravel_index(np.argmax(np.abs(drops)), drops.shape)
                ground_max = float(np.abs(drops[on_ground]).max()) if on_ground.any() else 0.0
                background_max[kind] = max(background_max[kind], ground_max)
                passed += ground_max < TOLERANCE and garment[strongest] >= ON_GARMENT
            worst[kind] = min(worst[kind], passed / len(idx))
            row.append(f"{passed}/{len(idx)}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)
    print("| worst class | " + " | ".join(f"{worst[k]:.0%}" for k in kinds) + " |")
    print("| largest background change | " + " | ".join(f"{background_max[k]:.3f}"
                                                       for k in kinds) + " |")


def photos(model: OnnxClassifier, kinds: list[str]) -> None:
    from PIL import Image
    from skimage import data

    labels = model.metadata.labels
    print("\nPhotographs, shipped EfficientNet-Lite0 (224, centre crop): share of the map's "
          "positive mass inside the object's box / strongest cell's centre inside it")
    print("| picture | top class | " + " | ".join(kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for name, (x0, y0, x1, y1) in PHOTO_BOXES.items():
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buf, format="PNG")
        x = to_model_input(decode_image(buf.getvalue(), model.metadata.spec))
        top = int(np.argmax(model.predict(x[None])[0]))
        row = []
        for kind in kinds:
            drops, grid = explain(model, x, kind)
            pixel = grid.pixel_map(drops)
            inside = np.zeros_like(pixel, dtype=bool)
            inside[y0:y1, x0:x1] = True
            positive = np.clip(pixel, 0, None)
            share = positive[inside].sum() / max(positive.sum(), 1e-12)
            r, c = np.unravel_index(np.argmax(np.abs(drops)), drops.shape)
            cy = grid._origins(grid.height)[r] + grid.patch // 2
            cx = grid._origins(grid.width)[c] + grid.patch // 2
            row.append(f"{share:.0%} / {'yes' if inside[cy, cx] else 'no'}")
        print(f"| {name} | {labels[top]} | " + " | ".join(row) + " |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--occluders", nargs="+", default=list(OCCLUDERS), choices=OCCLUDERS)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}; `bench/occlusion_check.py "
          f"{' '.join(sys.argv[1:])}`")
    settings = Settings(provider="cpu")
    fashion_mnist(OnnxClassifier(SEED_CNN, settings), args.per_class, args.occluders)
    photos(OnnxClassifier(PHOTO_MODEL, settings), args.occluders)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
