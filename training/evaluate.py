"""Evaluation: accuracy, per-class and macro precision/recall/F1, one-vs-rest ROC and PR AUC,
Cohen's kappa and the confusion matrix, written as JSON, a readable table and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: plots go to files only
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from service.imaging import PreprocessSpec
from training.calibrate import BINS, expected_calibration_error, reliability
from training.config import TrainConfig
from training.data import FASHION_MNIST, ImageSet, load_data
from training.train import load_checkpoint, model_from_checkpoint, predict_proba


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """All the metrics for labels ``y_true`` (N) and class probabilities ``probs`` (N×K)."""
    k = len(classes)
    y_pred = probs.argmax(1)
    labels = list(range(k))
    p, r, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    onehot = np.eye(k)[y_true]
    present = onehot.sum(0) > 0  # AUCs are undefined for classes absent from y_true
    roc = [float(skm.roc_auc_score(onehot[:, i], probs[:, i])) if present[i] and not
           onehot[:, i].all() else float("nan") for i in labels]
    pr = [float(skm.average_precision_score(onehot[:, i], probs[:, i])) if present[i]
          else float("nan") for i in labels]
    return {
        "n": len(y_true),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro": {
            "precision": float(np.mean(p)),
            "recall": float(np.mean(r)),
            "f1": float(np.mean(f1)),
            "roc_auc": float(np.nanmean(roc)),
            "pr_auc": float(np.nanmean(pr)),
        },
        "cohen_kappa": float(skm.cohen_kappa_score(y_true, y_pred)),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
                   "support": int(support[i]), "roc_auc": roc[i], "pr_auc": pr[i]}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(classes),
        # Calibration: a score of 0.9 should be right 90% of the time.
        "ece": expected_calibration_error(probs, y_true),
        "reliability": reliability(probs, y_true),
    }


def format_table(m: dict[str, Any]) -> str:
    """The metrics as a plain-text table."""
    width = max(10, *(len(c) for c in m["classes"]))
    lines = [f"{'class':<{width}}  precision  recall    f1  roc_auc  pr_auc  support"]
    for name, row in m["per_class"].items():
        lines.append(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  "
                     f"{row['f1']:.4f}  {row['roc_auc']:7.4f}  {row['pr_auc']:6.4f}  "
                     f"{row['support']:7d}")
    mac = m["macro"]
    lines.append(f"{'macro':<{width}}  {mac['precision']:9.4f}  {mac['recall']:6.4f}  "
                 f"{mac['f1']:.4f}  {mac['roc_auc']:7.4f}  {mac['pr_auc']:6.4f}  {m['n']:7d}")
    lines.append(f"accuracy {m['accuracy']:.4f}   cohen's kappa {m['cohen_kappa']:.4f}   "
                 f"expected calibration error ({BINS} bins) {m['ece']:.4f}")
    return "\n".join(lines)


def plot_reliability(m: dict[str, Any], path: Path) -> None:
    """Accuracy against confidence per bin: on the diagonal when scores are calibrated."""
    rows = [r for r in m["reliability"] if r["n"]]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
    ax.bar([(r["low"] + r["high"]) / 2 for r in rows], [r["accuracy"] for r in rows],
           width=1 / len(m["reliability"]), edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o", color="black",
            markersize=3, label="(confidence, accuracy)")
    ax.set(xlabel="confidence (top score)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability: ECE {m['ece']:.2%} over {m['n']} images")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(m: dict[str, Any], path: Path) -> None:
    cm = np.asarray(m["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(cm, cmap="Blues")
    ticks = range(len(m["classes"]))
    ax.set_xticks(ticks, m["classes"], rotation=45, ha="right")
    ax.set_yticks(ticks, m["classes"])
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (accuracy {m['accuracy']:.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], out: Path) -> None:
    """One-vs-rest ROC and precision-recall curves, one line per class."""
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(7, 6))
        for i, name in enumerate(classes):
            truth = y_true == i
            if not truth.any() or truth.all():
                continue
            if kind == "roc":
                x, y, _ = skm.roc_curve(truth, probs[:, i])
            else:
                y, x, _ = skm.precision_recall_curve(truth, probs[:, i])
            ax.plot(x, y, label=name, linewidth=1)
        ax.set_xlabel("false positive rate" if kind == "roc" else "recall")
        ax.set_ylabel("true positive rate" if kind == "roc" else "precision")
        ax.set_title("ROC (one vs rest)" if kind == "roc" else "precision-recall (one vs rest)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{kind}.png", dpi=100)
        plt.close(fig)


def history_figure(rows: list[dict[str, Any]]) -> Figure:
    """Training and validation loss and accuracy per epoch, from ``metrics.jsonl`` rows; the
    validation lines only where the run had validation images."""
    epochs = [r["epoch"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(epochs, [r["train_loss"] for r in rows], label="train")
    a2.plot(epochs, [r["train_acc"] for r in rows], label="train")
    if any(r["val_acc"] is not None for r in rows):  # None: trained without validation images
        a1.plot(epochs, [r["val_loss"] for r in rows], label="validation")
        a2.plot(epochs, [r["val_acc"] for r in rows], label="validation")
    a1.set_title("loss")
    a2.set_title("accuracy")
    for ax in (a1, a2):
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    return fig


def plot_history(metrics_jsonl: Path, path: Path) -> None:
    """:func:`history_figure` of a run's ``metrics.jsonl``, saved to ``path``."""
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line]
    if not rows:
        return
    fig = history_figure(rows)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluation_set(cfg: TrainConfig, spec: PreprocessSpec | None = None) -> tuple[ImageSet, str]:
    """The test split if the data has one, else the seeded validation split, decoded with the
    model's own preprocessing (its size, channels and resize policy)."""
    splits = load_data(cfg.data, cfg.val_fraction, cfg.seed, spec=spec,
                       limit=0 if cfg.data == FASHION_MNIST else cfg.limit,
                       interpolation=cfg.interpolation)
    if splits.test is not None:
        return splits.test, "test"
    if not len(splits.val):
        raise ValueError(f"nothing to evaluate on: {cfg.data} has no test split and the run was "
                         "trained without validation images (--val-fraction 0); put test images "
                         "in <data>/test/<class>/, beside <data>/train/")
    return splits.val, "validation"


def evaluate_run(run: Path, out: Path | None = None) -> dict[str, Any]:
    """Evaluate a run's best checkpoint; writes ``<run>/eval/`` and returns the metrics."""
    ckpt = load_checkpoint(run)
    model, spec = model_from_checkpoint(ckpt)
    cfg = TrainConfig.from_dict(ckpt["config"])
    data, split = evaluation_set(cfg, spec)
    probs = predict_proba(model, data.images).numpy()
    y = data.labels.numpy()
    m = classification_metrics(y, probs, data.classes)
    m["split"] = split
    m["model"] = cfg.model
    out = out or (run if run.is_dir() else run.parent) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    (out / "report.txt").write_text(format_table(m) + "\n")
    plot_confusion(m, out / "confusion_matrix.png")
    plot_reliability(m, out / "reliability.png")
    plot_curves(y, probs, data.classes, out)
    history = (run if run.is_dir() else run.parent) / "metrics.jsonl"
    if history.is_file():
        plot_history(history, out / "training_curves.png")
    return m
