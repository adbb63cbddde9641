from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.evaluate import classification_metrics, evaluate_run, format_table


def test_metrics_on_a_hand_checked_case() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1],
                      [0.1, 0.6, 0.3], [0.1, 0.1, 0.8], [0.5, 0.2, 0.3]])
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["recall"] == pytest.approx(1.0)
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.5)
    # kappa = (po - pe) / (1 - pe) with po = 4/6, pe = (2*2 + 2*3 + 2*1) / 36
    pe = (2 * 2 + 2 * 3 + 2 * 1) / 36
    assert m["cohen_kappa"] == pytest.approx((4 / 6 - pe) / (1 - pe))
    assert 0.5 < m["macro"]["roc_auc"] <= 1.0
    assert "macro" in format_table(m)


def test_evaluate_run_writes_reports_and_plots(tiny_run: Path) -> None:
    m = evaluate_run(tiny_run)
    assert m["split"] == "test" and m["n"] == 10_000  # the full test set, whatever the limit
    out = tiny_run / "eval"
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == m["accuracy"]
    for name in ("confusion_matrix.png", "roc.png", "pr.png", "training_curves.png",
                 "reliability.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "Ankle boot" in (out / "report.txt").read_text()
    assert 0 <= m["ece"] < 0.2 and sum(r["n"] for r in m["reliability"]) == m["n"]
    assert "expected calibration error" in (out / "report.txt").read_text()
