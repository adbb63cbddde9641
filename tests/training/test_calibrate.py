"""Temperature scaling: the fit recovers a known temperature, ECE measures what it should, and a
real exported model is calibrated in its graph without changing any image's ranking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from scipy.special import softmax

from service.model import read_metadata
from training.calibrate import (
    CalibrationError,
    calibrate_onnx,
    expected_calibration_error,
    fit_temperature,
    logits_of,
)
from training.data import ImageSet


def test_the_fit_recovers_the_temperature_that_generated_the_labels() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(20_000, 10))
    labels = np.array([rng.choice(10, p=p) for p in softmax(logits / 2.5, axis=1)])
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_ece_is_zero_for_calibrated_scores_and_large_for_overconfident_ones() -> None:
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.5, 1.0, 50_000)
    correct = rng.uniform(size=confidence.size) < confidence  # right as often as it says
    probs = np.stack([confidence, 1 - confidence], axis=1)
    labels = np.where(correct, 0, 1)
    assert expected_calibration_error(probs, labels) < 0.01
    sure = np.stack([np.full(labels.size, 0.999), np.full(labels.size, 0.001)], axis=1)
    assert expected_calibration_error(sure, labels) == pytest.approx(0.999 - correct.mean(),
                                                                     abs=1e-6)


def test_a_real_model_is_calibrated_in_its_graph(tiny_onnx: Path, tmp_path: Path,
                                                 fmnist_test: ImageSet) -> None:
    images = fmnist_test.images.numpy().astype(np.float32) / 255
    labels = fmnist_test.labels.numpy()
    val, test = (images[:3000], labels[:3000]), (images[3000:6000], labels[3000:6000])
    out = tmp_path / "calibrated.onnx"
    cal = calibrate_onnx(tiny_onnx, out, val, test)
    assert cal.temperature != pytest.approx(1.0, abs=1e-3)
    assert cal.ece_validation_after < cal.ece_validation_before
    assert cal.ece_test_after is not None and cal.ece_test_before is not None
    assert cal.ece_test_after < cal.ece_test_before
    before = ort.InferenceSession(str(tiny_onnx)).run(None, {"input": test[0]})[0]
    session = ort.InferenceSession(str(out))
    after = session.run(None, {"input": test[0]})[0]
    assert (before.argmax(1) == after.argmax(1)).all()  # the same answers, other scores
    np.testing.assert_allclose(after, softmax(logits_of(tiny_onnx, test[0])[0] / cal.temperature,
                                              axis=1), atol=1e-5)
    meta = read_metadata(session, out, "")
    assert meta.calibration is not None
    assert meta.calibration["temperature"] == pytest.approx(cal.temperature, rel=1e-5)
    assert json.loads(cal.to_json())["bins"] == 15
    with pytest.raises(CalibrationError, match="calibrated already"):
        calibrate_onnx(out, tmp_path / "twice.onnx", val)


def test_the_shipped_model_is_calibrated(shipped_model: Path) -> None:
    session = ort.InferenceSession(str(shipped_model))
    cal = read_metadata(session, shipped_model, "").calibration
    assert cal is not None and cal["ece_test_after"] <= 0.015  # the goal: test ECE <= 1.5%
    assert cal["ece_test_after"] < cal["ece_test_before"]


def test_a_graph_without_a_final_softmax_is_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(tiny_onnx))
    softmax_node = next(n for n in proto.graph.node if n.op_type == "Softmax")
    proto.graph.node.remove(softmax_node)
    proto.graph.output[0].name = softmax_node.input[0]
    bare = tmp_path / "logits.onnx"
    onnx.save(proto, str(bare))
    x = np.zeros((4, 1, 28, 28), np.float32)
    with pytest.raises(CalibrationError, match="not a Softmax"):
        calibrate_onnx(bare, tmp_path / "out.onnx", (x, np.zeros(4, int)))
    assert not (tmp_path / "out.onnx").exists()
