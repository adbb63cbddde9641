"""What decoding one image costs: ``service.imaging.decode_image`` per format, size and colour
mode, into two models' inputs (the shipped CNN's 28x28 grey and the photo model's 224x224
centre crop), best of 3 timings. The images are the benchmark's 640x480 photograph, resized and
encoded with Pillow's defaults. ``--decoders default pillow`` also times every PNG with Pillow
alone, as where libspng is not installed.

These are the figures behind the inline-decode limits (``IMGSERVE_INLINE_DECODE_MAX_PIXELS``,
``IMGSERVE_INLINE_DECODE_MAX_JPEG_PIXELS``) and ``service.png.MAX_PIXELS``.

    .venv/bin/python bench/decode_cost.py
    .venv/bin/python bench/decode_cost.py --formats PNG --sizes 28x28 256x256 --modes L RGB \\
        --decoders default pillow
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import timeit
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_bench import IMAGES, cpu_model  # noqa: E402
from service import png  # noqa: E402
from service.imaging import PreprocessSpec, decode_image  # noqa: E402

SPECS = {"28x28 grey": PreprocessSpec(28, 28, 1),
         "224 crop": PreprocessSpec(224, 224, 3, resize="center_crop")}


def ms_per_decode(data: bytes, spec: PreprocessSpec, decoder: str) -> float:
    spng = png.pyspng
    if decoder == "pillow":
        png.pyspng = None
    try:
        number = max(1, int(0.2 / max(1e-6, timeit.timeit(lambda: decode_image(data, spec),
                                                          number=1))))
        best = min(timeit.repeat(lambda: decode_image(data, spec), number=number, repeat=3))
    finally:
        png.pyspng = spng
    return best / number * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+",
                        default=["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
    parser.add_argument("--sizes", nargs="+", default=["640x480", "1024x768"])
    parser.add_argument("--modes", nargs="+", default=["RGB"], choices=["L", "RGB"])
    parser.add_argument("--decoders", nargs="+", default=["default"],
                        choices=["default", "pillow"])
    args = parser.parse_args()
    photo = Image.open(IMAGES["photo"]).convert("RGB")
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}; `bench/decode_cost.py "
          f"{' '.join(sys.argv[1:])}`; ms per decode, best of 3\n")
    print(f"| format | size | mode | decoder | KB | {' | '.join(SPECS)} |")
    print("|---|---|---|---|---|" + "---|" * len(SPECS))
    for fmt in args.formats:
        for size in args.sizes:
            width, height = (int(v) for v in size.split("x"))
            for mode in args.modes:
                buf = io.BytesIO()
                photo.resize((width, height)).convert(mode).save(buf, format=fmt)
                data = buf.getvalue()
                for decoder in args.decoders:
                    if decoder == "pillow" and fmt != "PNG":
                        continue  # the decoders differ for PNGs only
                    cells = " | ".join(f"{ms_per_decode(data, spec, decoder):.3f}"
                                       for spec in SPECS.values())
                    print(f"| {fmt} | {size} | {mode} | {decoder} | {len(data) / 1000:,.0f} | "
                          f"{cells} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
