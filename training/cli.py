"""Command line: ``python -m training {train,evaluate,export,calibrate,quantize,
export-imagenet,write-folder}``; it only parses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from training.config import TINY, TrainConfig, finetune_defaults
from training.model_card import card_path, facts_from_run, hardware, write_card, write_folder

log = logging.getLogger(__name__)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):  # --pretrained / --no-pretrained
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{f.metadata['help']} (default: {f.default})")
            continue
        parser.add_argument(flag, type=type(f.default), default=None,
                            help=f"{f.metadata['help']} (default: {f.default})")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training configuration of ``train``'s arguments: what the command line sets, over
    ``--tiny``'s preset, over the fine-tuning recipe when ``--pretrained`` is given (its image
    size for the device: 224 with CUDA, 96 without), over the field defaults."""
    values = {k: v for k, v in vars(args).items()
              if k in {f.name for f in dataclasses.fields(TrainConfig)} and v is not None}
    base = TINY if args.tiny else {}
    if values.get("pretrained"):
        import torch

        base = {**finetune_defaults(torch.cuda.is_available()), **base}
    return TrainConfig.from_dict({**base, **values})


def _cmd_train(args: argparse.Namespace) -> int:
    from training.train import train

    cfg = train_config(args)
    resume = Path(args.resume) if args.resume else None
    if resume is not None and args.out is None:
        cfg.out = str(resume if resume.is_dir() else resume.parent)
    result = train(cfg, resume)
    print(json.dumps({"out": str(result.out), "best_val_acc": None if result.best_val_acc is None
                      else round(result.best_val_acc, 4),
                      "epochs_run": result.epochs_run, "seconds": round(result.seconds, 1),
                      "interrupted": result.interrupted}))
    return 130 if result.interrupted else 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_run, format_table

    m = evaluate_run(Path(args.run), Path(args.out) if args.out else None)
    print(f"{m['split']} set, {m['n']} images")
    print(format_table(m))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from training.export import ModelInfo, export_onnx
    from training.train import load_checkpoint, model_from_checkpoint

    run = Path(args.run)
    ckpt = load_checkpoint(run)
    model, spec = model_from_checkpoint(ckpt)
    cfg = TrainConfig.from_dict(ckpt["config"])
    accuracy = None
    eval_json = (run if run.is_dir() else run.parent) / "eval" / "metrics.json"
    if eval_json.is_file():
        accuracy = float(json.loads(eval_json.read_text())["accuracy"])
    dataset = cfg.data if cfg.data == "fashion-mnist" else Path(cfg.data).name
    info = ModelInfo(args.name or cfg.model, args.version, dataset, accuracy)
    worst = export_onnx(model, spec, ckpt["classes"], Path(args.out), info)
    report: dict[str, Any] = {"out": args.out, "max_abs_diff_vs_torch": worst,
                              "test_accuracy": accuracy}
    out = Path(args.out)
    splits = _splits(out, cfg.data, cfg.val_fraction, cfg.seed) if (
        args.calibrate or args.quantize) else None  # the run's own splits, read once
    if splits is not None and args.calibrate and not _has_images(splits["val"]):
        report["calibration"] = None  # trained on all its images: nothing to fit T on
        log.warning("not calibrated: the run has no validation images (--val-fraction 0)")
    elif splits is not None and args.calibrate:  # on the validation split, never the test set
        report["calibration"] = _calibrate(out, out, splits)
    flags = " ".join([f"--name {info.name}", f"--version {args.version}",
                      *([] if args.calibrate else ["--no-calibrate"])])
    facts = facts_from_run(run, ckpt["config"], sum(p.numel() for p in model.parameters()),
                           out, worst, flags, args.intended_use, args.limits)
    report["model_card"] = str(write_card(out, facts))  # before the variants, which start from it
    for kind in args.quantize:
        report[kind] = _variant(out, kind, args.max_loss, splits)
    print(json.dumps(report))
    return 0


Arrays = tuple[np.ndarray, np.ndarray]  # images in [0, 1], labels


def _has_images(split: Arrays | None) -> TypeGuard[Arrays]:
    """False for a split the data lacks, or one left empty (trained with --val-fraction 0)."""
    return split is not None and len(split[1]) > 0


def _splits(path: Path, data: str, val_fraction: float, seed: int) -> dict[str, Arrays | None]:
    """The data's train, val and test splits (test None when it has none), decoded with the
    ONNX file's own preprocessing, as [0, 1] float32 images and labels."""
    from service.imaging import PreprocessSpec
    from service.onnx_meta import read_metadata_props
    from training.data import ImageSet, load_data

    spec = PreprocessSpec.from_json(read_metadata_props(path)["imgserve.preprocess"])
    splits = load_data(data, val_fraction, seed, spec=spec, interpolation=spec.interpolation)

    def arrays(s: ImageSet | None) -> Arrays | None:
        return None if s is None else (s.images.numpy().astype(np.float32) / 255,
                                       s.labels.numpy())

    return {"train": arrays(splits.train), "val": arrays(splits.val), "test": arrays(splits.test)}


def _calibrate(path: Path, out: Path, splits: dict[str, Arrays | None]) -> dict[str, Any]:
    """Fitted on the validation split, measured on the test split too."""
    from training.calibrate import calibrate_onnx

    val = splits["val"]
    if not _has_images(val):
        raise ValueError("calibration needs validation images; this run was trained without "
                         "(--val-fraction 0): export with --no-calibrate")
    return json.loads(calibrate_onnx(path, out, val, splits["test"]).to_json())


def _cmd_calibrate(args: argparse.Namespace) -> int:
    path = Path(args.model)
    splits = _splits(path, args.data, args.val_fraction, args.seed)
    print(json.dumps(_calibrate(path, Path(args.out) if args.out else path, splits)))
    return 0


def _variant(path: Path, kind: str, max_loss: float, splits: dict[str, Arrays | None] | None,
             out: Path | None = None) -> dict[str, Any]:
    """Write ``<path stem>.<kind>.onnx`` (or ``out``), measured on the test split (the
    validation split when there is none) and calibrated (int8) on 512 training images; with no
    ``splits``, on scikit-image's photographs, by top-1 agreement with fp32."""
    from training.quantize import make_variant

    target = out or path.with_name(f"{path.stem}.{kind}.onnx")
    labels: np.ndarray | None = None
    if splits is None:
        from training.photos import calibration_and_check_photos

        calibration, images = calibration_and_check_photos(path)
    else:
        measured, train = splits["test"] or splits["val"], splits["train"]
        if not _has_images(measured):
            raise ValueError("no test or validation images to measure the variant on (trained "
                             "with --val-fraction 0 on a folder without a test split)")
        assert train is not None
        images, labels = measured
        calibration = train[0][:512]
    variant = make_variant(path, target, kind, calibration, images, labels, max_loss)
    _variant_card(path, target, kind)
    return {"out": str(target), "size_bytes": target.stat().st_size,
            **json.loads(variant.to_json())}


def _variant_card(source: Path, target: Path, kind: str) -> None:
    """The variant's card: its source's facts, made by quantize (its measurements are in its
    metadata, which the card renders)."""
    source_card = card_path(source)
    facts = json.loads(source_card.read_text()) if source_card.is_file() else {}
    facts.update({
        "summary": f"`{source.name}`, quantised to {kind}"
                   + (" for CPUs." if kind == "int8" else " for GPUs."),
        "parity": None, "hardware": f"quantised on {hardware()}", "time": None,
        "order": facts.get("order", 100) + 1, "speed": None, "notes": None,
        "reproduce": [f".venv/bin/python -m training quantize {source} --kind {kind}"],
    })
    write_card(target, facts)


def _cmd_quantize(args: argparse.Namespace) -> int:
    path = Path(args.model)
    splits = None if args.data == "photos" else _splits(path, args.data, args.val_fraction,
                                                         args.seed)
    print(json.dumps(_variant(path, args.kind, args.max_loss, splits,
                              Path(args.out) if args.out else None)))
    return 0


def _cmd_export_imagenet(args: argparse.Namespace) -> int:
    from training.pretrained import export_imagenet_lite0, imagenet_card_facts

    worst = export_imagenet_lite0(Path(args.out), args.version)
    card = write_card(Path(args.out), imagenet_card_facts(Path(args.out), worst))
    print(json.dumps({"out": args.out, "max_abs_diff_vs_torch": worst,
                      "model_card": str(card)}))
    return 0


def _cmd_model_cards(args: argparse.Namespace) -> int:
    print(write_folder(Path(args.folder)))
    return 0


def _cmd_write_folder(args: argparse.Namespace) -> int:
    from training.data import FASHION_MNIST_DIR, load_fashion_mnist, write_image_folder

    images = load_fashion_mnist(args.split, Path(args.fashion_mnist_dir or FASHION_MNIST_DIR))
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    n = write_image_folder(images, Path(args.out), classes, args.per_class)
    print(f"wrote {n} images under {args.out}")
    return 0


def _add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="as for train: the validation split the model was not trained on")
    p.add_argument("--seed", type=int, default=0, help="as for train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model", description="Train a model; writes "
                       "checkpoints (last.pt, best.pt) and metrics.jsonl into --out.")
    _add_config_args(p)
    p.add_argument("--resume", help="continue from a run folder or a checkpoint file")
    p.add_argument("--tiny", action="store_true", help=f"quick preset: {TINY}")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a run's best checkpoint",
                       description="Metrics, table and plots into <run>/eval/.")
    p.add_argument("run", help="run folder (uses best.pt) or checkpoint file")
    p.add_argument("--out", help="output folder (default: <run>/eval)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="export a run to ONNX",
                       description="Export to ONNX with labels and preprocessing in its metadata; "
                       "fails unless ONNX Runtime matches torch within 1e-5.")
    p.add_argument("run", help="run folder (uses best.pt) or checkpoint file")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--name", help="model name in the metadata (default: the architecture)")
    p.add_argument("--version", default="1", help="model version in the metadata")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="fit temperature scaling on the run's validation split and fold it into "
                   "the graph (--no-calibrate keeps the raw softmax)")
    p.add_argument("--quantize", nargs="*", choices=("int8", "fp16"), default=[],
                   help="also write <out stem>.int8.onnx (static, QDQ, calibrated on training "
                   "images; for CPUs) and/or .fp16.onnx (for GPUs), each refused unless it "
                   "keeps the test accuracy within --max-loss")
    p.add_argument("--max-loss", type=float, default=0.005,
                   help="accuracy a variant may lose, as a fraction (0.005 = 0.5 points)")
    p.add_argument("--intended-use", help="the model card's intended use (default: images like "
                   "the training data, into its classes)")
    p.add_argument("--limits", help="the model card's limits (default: out of domain beyond "
                   "the training data)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("model-cards", help="render a folder's model cards into its README.md",
                       description="Render <model>.md for every <model>.card.json in a folder "
                       "(written by export, export-imagenet and quantize), and all of them into "
                       "the folder's README.md.")
    p.add_argument("folder", nargs="?", default="models")
    p.set_defaults(func=_cmd_model_cards)

    p = sub.add_parser("quantize", help="write an int8 or fp16 variant of an exported model",
                       description="Write a smaller variant of an exported ONNX model, measure "
                       "it against the fp32 model, and refuse it if it loses more than "
                       "--max-loss; its measured accuracy goes into its metadata.")
    p.add_argument("model", help="an exported ONNX file")
    p.add_argument("--kind", choices=("int8", "fp16"), default="int8")
    p.add_argument("--data", default="fashion-mnist", help="as for train, or 'photos': the "
                   "scikit-image photographs, top-1 agreement with fp32 (no labels)")
    p.add_argument("--out", help="ONNX file to write (default: <model stem>.<kind>.onnx)")
    p.add_argument("--max-loss", type=float, default=0.005,
                   help="accuracy (or agreement) a variant may lose, as a fraction")
    _add_split_args(p)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("calibrate", help="calibrate an exported ONNX model",
                       description="Fit temperature scaling on a validation split, fold it into "
                       "the graph before its softmax, and record T and the expected "
                       "calibration error (15 bins) before and after, on validation and test, "
                       "in the metadata.")
    p.add_argument("model", help="ONNX file exported by `training export --no-calibrate`")
    p.add_argument("--out", help="ONNX file to write (default: replace the input)")
    p.add_argument("--data", default="fashion-mnist", help="as for train")
    _add_split_args(p)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("export-imagenet", help="export the pretrained ImageNet photo model",
                       description="Export EfficientNet-Lite0 with its ImageNet-1k weights and "
                       "class names (from installed packages; nothing is downloaded).")
    p.add_argument("--out", default="models/efficientnet_lite0_imagenet.onnx",
                   help="ONNX file to write")
    p.add_argument("--version", default="1", help="model version in the metadata")
    p.set_defaults(func=_cmd_export_imagenet)

    p = sub.add_parser("write-folder", help="write Fashion-MNIST as an image folder of PNGs",
                       description="Write <out>/<class>/<n>.png from the Fashion-MNIST idx files.")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--classes", help="comma-separated class names (default: all ten)")
    p.add_argument("--per-class", type=int, default=0, help="images per class (0 = all)")
    p.add_argument("--fashion-mnist-dir", help="folder of the idx files")
    p.set_defaults(func=_cmd_write_folder)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:  # a refused variant is a ValueError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
