"""Training throughput: the seed CNN on Fashion-MNIST with the `seed` augmentation, augmented on
batched tensors (what training does) and per image with Pillow (the baseline), in one run.

Each variant runs the same training step (augment, forward, cross-entropy, backward, Adam) on
real Fashion-MNIST training images for a number of steps after a warm-up, and reports images/s
and the implied time for a 60,000-image epoch.

    .venv/bin/python bench/train_throughput.py                  # fp32 and bf16, ~1-2 minutes
    .venv/bin/python bench/train_throughput.py --steps 40 --amp off
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from training.augment import PRESETS, per_image_reference, random_affine
from training.data import channel_stats, load_fashion_mnist
from training.models import build_model

EPOCH = 60_000


def measure(step: Callable[[int], None], steps: int, warmup: int, batch: int) -> float:
    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    return steps * batch / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--amp", choices=["off", "bf16", "both"], default="both")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_fashion_mnist("train")
    mean, std = channel_stats(data.images[:10_000])
    cfg = PRESETS["seed"]
    b = args.batch_size
    n_batches = len(data) // b
    rows = []
    precisions = ["off", "bf16"] if args.amp == "both" else [args.amp]
    for precision in precisions:
        for how in ("batched", "per-image"):
            torch.manual_seed(0)
            model = build_model("seed_cnn", 1, 10, 28, 28, mean, std)
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(0)

            def step(i: int, how: str = how, precision: str = precision,
                     model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt,
                     gen: torch.Generator = gen) -> None:
                k = i % n_batches
                x = data.images[k * b : (k + 1) * b].float().div_(255)
                y = data.labels[k * b : (k + 1) * b]
                if how == "batched":
                    x = random_affine(x, cfg, gen)
                else:
                    x = per_image_reference(x, cfg, seed=i)
                x = x.contiguous(memory_format=torch.channels_last)
                dtype = torch.bfloat16 if precision == "bf16" else torch.float32
                with torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            steps = args.steps if how == "batched" else max(10, args.steps // 3)
            rate = measure(step, steps, args.warmup, b)
            rows.append((precision, how, rate))
            print(f"{precision:5} {how:9} {rate:8.0f} images/s  epoch {EPOCH / rate:6.1f} s",
                  flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, batch {b}, "
          f"seed augmentation\n")
    print("| precision | augmentation | images/s | 60k-image epoch (s) | vs per-image |")
    print("|---|---|---|---|---|")
    for precision, how, rate in rows:
        base = next(r for p, h, r in rows if p == precision and h == "per-image")
        print(f"| {precision} | {how} | {rate:.0f} | {EPOCH / rate:.1f} | {rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
