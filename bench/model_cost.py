"""What one model call costs: ONNX Runtime milliseconds per image at several batch sizes, with
the service's session settings (one intra-op thread unless told otherwise).

    .venv/bin/python bench/model_cost.py [--model models/x.onnx] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_bench import MODEL, cpu_model  # noqa: E402
from service.config import Settings  # noqa: E402
from service.model import OnnxClassifier  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--seconds", type=float, default=2.0, help="per batch size")
    args = parser.parse_args()
    settings = Settings(model_path=args.model, provider="cpu", intra_op_threads=args.threads)
    model = OnnxClassifier(args.model, settings)
    c, h, w = model.metadata.input_shape[1:]
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}; {args.model.name}; "
          f"{args.threads} intra-op thread(s)\n")
    print("| batch | ms per call | ms per image | images/s |\n|---|---|---|---|")
    for n in args.batches:
        x = np.random.default_rng(0).random((n, c, h, w), dtype=np.float32)
        model.predict(x)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < args.seconds:
            model.predict(x)
            calls += 1
        ms = (time.perf_counter() - started) / calls * 1000
        print(f"| {n} | {ms:.3f} | {ms / n:.3f} | {n / ms * 1000:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
