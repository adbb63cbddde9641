"""Learning curve with little data: the seed CNN from scratch against EfficientNet-Lite0
fine-tuned from ImageNet weights, on Fashion-MNIST folders of N training images per class,
scored on the same held-out test images (the first ``--test-per-class`` of each class of the
test split). Each run goes through the user's path: an image folder, ``training.train``, the
best checkpoint; the test images are decoded by the model's own preprocessing.

    .venv/bin/python bench/learning_curve.py                   # ~15 minutes on 2 cores
    .venv/bin/python bench/learning_curve.py --per-class 50 --methods finetune
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_bench import cpu_model  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import load_fashion_mnist, load_folder, write_image_folder  # noqa: E402
from training.train import load_checkpoint, model_from_checkpoint, predict_proba, train  # noqa: E402

METHODS = {
    # the seed CNN as the measured baseline: light augmentation, long patience
    "scratch": {"model": "seed_cnn", "epochs": 150, "patience": 40, "batch_size": 32,
                "augment": "light"},
    # ImageNet EfficientNet-Lite0 at 96 px (a CPU-friendly size), head first, then all of it;
    # the best of the recipes tried at 50 images per class (see the README)
    "finetune": {"model": "efficientnet_lite0", "pretrained": True, "image_size": 96,
                 "epochs": 30, "freeze_epochs": 2, "patience": 8, "batch_size": 32,
                 "augment": "light", "label_smoothing": 0.1, "backbone_lr_scale": 0.3},
}


_BEST = METHODS["finetune"]
_LONG = {**_BEST, "backbone_lr_scale": 0.1}  # 30 epochs, patience 8, label smoothing 0.1
# The other fine-tuning recipes tried at 50 images per class, for the README's comparison:
#   bench/learning_curve.py --per-class 50 --methods finetune-first ft-long ft-bb05 ...
METHODS.update({
    "finetune-first": {**_BEST, "epochs": 10, "patience": 4, "label_smoothing": 0.0,
                       "backbone_lr_scale": 0.1},
    "ft-long": _LONG,
    "ft-bb05": {**_BEST, "backbone_lr_scale": 0.5},
    "ft-freeze3-40ep": {**_BEST, "freeze_epochs": 3, "epochs": 40, "patience": 10},
    "ft-seed-augment": {**_BEST, "augment": "seed"},
    "ft-wd": {**_BEST, "weight_decay": 0.05},
    "ft-lr2e-3": {**_BEST, "lr": 2e-3},
    "ft-112px": {**_BEST, "image_size": 112},
    "ft-128px": {**_LONG, "epochs": 25, "image_size": 128},
})


def run(method: str, per_class: int, folder: Path, test: Path, out: Path) -> dict[str, float]:
    cfg = TrainConfig.from_dict({**METHODS[method], "data": str(folder), "out": str(out),
                                 "threads": 0, "val_fraction": 0.1, "seed": 0})
    started = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - started
    model, spec = model_from_checkpoint(load_checkpoint(out))
    images, _ = load_folder(test, spec)
    probs = predict_proba(model, images.images)
    accuracy = float((probs.argmax(1) == images.labels).float().mean())
    return {"method": method, "per_class": per_class, "test_accuracy": accuracy,
            "train_seconds": round(seconds, 1), "epochs": result.epochs_run,
            "test_images": len(images)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--methods", nargs="+", default=["scratch", "finetune"],
                        choices=list(METHODS))
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "learning_curve")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, {torch.get_num_threads()} threads; "
          f"`bench/learning_curve.py {' '.join(sys.argv[1:])}`", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        test = Path(tmp) / "test"
        write_image_folder(load_fashion_mnist("test"), test, None, args.test_per_class)
        train_split = load_fashion_mnist("train")
        for n in args.per_class:
            folder = Path(tmp) / f"train{n}"
            write_image_folder(train_split, folder, None, n)
            for method in args.methods:
                row = run(method, n, folder, test, args.out / f"{method}-{n}")
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| images per class | method | test accuracy | epochs | training time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['per_class']} | {r['method']} | {r['test_accuracy']:.1%} | {r['epochs']} | "
              f"{r['train_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
