"""Learning curve with little data: the seed CNN from scratch against EfficientNet-Lite0
fine-tuned from ImageNet weights, on Fashion-MNIST folders of N training images per class,
scored on the same held-out test images (the first ``--test-per-class`` of each class of the
test split), or with ``--score-on dev`` on images of the training split that no run trains on,
for choosing a recipe without the test images. Each run goes through the user's path: an image
folder, ``training.train``, the checkpoint it keeps; the images scored are decoded by the model's
own preprocessing. ``--seeds`` repeats every cell with other training seeds and reports the mean.

    .venv/bin/python bench/learning_curve.py                   # ~20 minutes on 2 cores
    .venv/bin/python bench/learning_curve.py --per-class 50 --methods finetune --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_bench import cpu_model  # noqa: E402
from training.config import TrainConfig, finetune_defaults  # noqa: E402
from training.data import load_fashion_mnist, load_folder, write_image_folder  # noqa: E402
from training.train import load_checkpoint, model_from_checkpoint, predict_proba, train  # noqa: E402

# ImageNet EfficientNet-Lite0 at 96 px (a CPU-friendly size), head first, then all of it.
_FROZEN_BN = {"model": "efficientnet_lite0", "pretrained": True, "image_size": 96,
              "epochs": 30, "freeze_epochs": 2, "patience": 8, "batch_size": 32,
              "augment": "light", "label_smoothing": 0.1, "backbone_lr_scale": 0.3}
METHODS = {
    # the seed CNN as the measured baseline: light augmentation, long patience
    "scratch": {"model": "seed_cnn", "epochs": 150, "patience": 40, "batch_size": 32,
                "augment": "light"},
    # the recipe chosen at 50 images per class on dev images (see the README): batch norm
    # adapted to the new images once the backbone learns; every image trains (no validation
    # split) for 40 epochs of the cosine schedule, and the last epoch is kept
    # (training.config.FINETUNE: what --pretrained defaults to on the command line)
    "finetune": {**finetune_defaults(cuda=False), "pretrained": True, "patience": 8,
                 "augment": "light"},
}
# batch norm adapting, 10% held out for validation, early stopping: the recipe before
_ADAPT_VAL = {**_FROZEN_BN, "backbone_bn": "adapt", "epochs": 40, "patience": 12}

_LONG = {**_FROZEN_BN, "backbone_lr_scale": 0.1}  # 30 epochs, patience 8, label smoothing 0.1
# The other fine-tuning recipes tried at 50 images per class, for the README's comparison:
#   bench/learning_curve.py --per-class 50 --methods ft-frozen-bn ft-ema ... [--score-on dev]
METHODS.update({
    "ft-frozen-bn": _FROZEN_BN,  # ImageNet statistics kept throughout; the recipe before
    "ft-ema": {**_FROZEN_BN, "ema_decay": 0.98},
    # the baseline on the same terms as the recipe: every image trains, a fixed 80 epochs (about
    # where early stopping ends it at 50 per class), the last epoch kept
    "scratch-all": {"model": "seed_cnn", "epochs": 80, "batch_size": 32, "augment": "light",
                    "val_fraction": 0.0},
    "ft-adapt-val": _ADAPT_VAL,
    "ft-adapt-ema": {**_ADAPT_VAL, "ema_decay": 0.98},
    "ft-adapt-bb05": {**_ADAPT_VAL, "backbone_lr_scale": 0.5},
    # no validation split: every image trains for the whole cosine schedule, the last epoch kept
    "ft-all-30": {**METHODS["finetune"], "epochs": 30},
    "ft-all-ema": {**METHODS["finetune"], "epochs": 30, "ema_decay": 0.98},
    # the first round, on the test images, one run each:
    "finetune-first": {**_FROZEN_BN, "epochs": 10, "patience": 4, "label_smoothing": 0.0,
                       "backbone_lr_scale": 0.1},
    "ft-long": _LONG,
    "ft-bb05": {**_FROZEN_BN, "backbone_lr_scale": 0.5},
    "ft-freeze3-40ep": {**_FROZEN_BN, "freeze_epochs": 3, "epochs": 40, "patience": 10},
    "ft-seed-augment": {**_FROZEN_BN, "augment": "seed"},
    "ft-wd": {**_FROZEN_BN, "weight_decay": 0.05},
    "ft-lr2e-3": {**_FROZEN_BN, "lr": 2e-3},
    "ft-112px": {**_FROZEN_BN, "image_size": 112},
    "ft-128px": {**_LONG, "epochs": 25, "image_size": 128},
})


def run(method: str, per_class: int, folder: Path, test: Path, out: Path,
        seed: int = 0, scored_on: str = "test") -> dict[str, Any]:
    cfg = TrainConfig.from_dict({"val_fraction": 0.1, **METHODS[method], "data": str(folder),
                                 "out": str(out), "threads": 0, "seed": seed})
    started = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - started
    model, spec = model_from_checkpoint(load_checkpoint(out))
    images, _ = load_folder(test, spec)
    probs = predict_proba(model, images.images)
    accuracy = float((probs.argmax(1) == images.labels).float().mean())
    return {"method": method, "per_class": per_class, "seed": seed,
            f"{scored_on}_accuracy": accuracy, "train_seconds": round(seconds, 1),
            "epochs": result.epochs_run, f"{scored_on}_images": len(images)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--methods", nargs="+", default=["scratch", "scratch-all", "finetune"],
                        choices=list(METHODS))
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds (split, order, augmentation, head); each cell is "
                             "the mean over them, with the spread")
    parser.add_argument("--score-on", choices=("test", "dev"), default="test",
                        help="dev: score on images of the training split that no run trains on "
                             "(the last --test-per-class of each class), for choosing a recipe "
                             "without looking at the test images")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "learning_curve")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, {torch.get_num_threads()} threads; "
          f"`bench/learning_curve.py {' '.join(sys.argv[1:])}`", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        test = Path(tmp) / "test"
        train_split = load_fashion_mnist("train")
        if args.score_on == "dev":
            if max(args.per_class) + args.test_per_class > 6000:  # 6,000 per class in train
                parser.error("--score-on dev needs --per-class + --test-per-class <= 6000")
            write_image_folder(train_split.subset(torch.arange(len(train_split) - 1, -1, -1)),
                               test, None, args.test_per_class)
        else:
            write_image_folder(load_fashion_mnist("test"), test, None, args.test_per_class)
        for n in args.per_class:
            folder = Path(tmp) / f"train{n}"
            write_image_folder(train_split, folder, None, n)
            for method in args.methods:
                runs = []
                for seed in args.seeds:
                    row = run(method, n, folder, test, args.out / f"{method}-{n}-s{seed}", seed,
                              args.score_on)
                    runs.append(row)
                    print(json.dumps(row), flush=True)
                rows.append(runs)
    print(f"\n| images per class | method | {args.score_on} accuracy | seeds | epochs | "
          "training time (s) |")
    print("|---|---|---|---|---|---|")
    for runs in rows:
        acc = [r[f"{args.score_on}_accuracy"] for r in runs]
        spread = (f" (min {min(acc):.1%}, max {max(acc):.1%}, sd {statistics.stdev(acc):.1%})"
                  if len(acc) > 1 else "")
        print(f"| {runs[0]['per_class']} | {runs[0]['method']} | {statistics.mean(acc):.1%}"
              f"{spread} | {len(runs)} | {statistics.mean(r['epochs'] for r in runs):.0f} | "
              f"{statistics.mean(r['train_seconds'] for r in runs):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
