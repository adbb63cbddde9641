"""Smaller variants: an int8 model calibrated on training images and an fp16 one, each measured
against fp32 and refused past the allowed loss; the shipped int8 variant keeps its accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.config import REPO_MODELS
from service.model import read_metadata
from training.data import ImageSet
from training.quantize import VariantRefused, make_variant, predict


@pytest.fixture(scope="module")
def test_arrays(fmnist_test: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    return (fmnist_test.images[:2000].numpy().astype(np.float32) / 255,
            fmnist_test.labels[:2000].numpy())


def test_int8_keeps_the_accuracy_and_says_so(tiny_onnx: Path, tmp_path: Path,
                                              test_arrays: tuple[np.ndarray, np.ndarray],
                                              fmnist_test: ImageSet) -> None:
    images, labels = test_arrays
    calibration = fmnist_test.images[5000:5256].numpy().astype(np.float32) / 255
    out = tmp_path / "tiny.int8.onnx"
    v = make_variant(tiny_onnx, out, "int8", calibration, images, labels)
    assert v.kind == "int8" and v.reference_accuracy - v.accuracy <= 0.005
    assert out.stat().st_size < 0.5 * tiny_onnx.stat().st_size
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    session = ort.InferenceSession(str(out))
    meta = read_metadata(session, out, "")
    assert meta.name == "tiny_cnn_int8" and meta.variant is not None
    assert meta.variant["accuracy"] == pytest.approx(v.accuracy)
    assert meta.test_accuracy == pytest.approx(v.accuracy, abs=1e-4)
    got = (predict(out, images).argmax(1) == labels).mean()
    assert got == pytest.approx(v.accuracy)


def test_fp16_gives_float32_answers_close_to_fp32(tiny_onnx: Path, tmp_path: Path,
                                                  test_arrays: tuple[np.ndarray, np.ndarray]
                                                  ) -> None:
    images, labels = test_arrays
    out = tmp_path / "tiny.fp16.onnx"
    v = make_variant(tiny_onnx, out, "fp16", images[:1], images, labels)
    fp16, fp32 = predict(out, images[:256]), predict(tiny_onnx, images[:256])
    assert fp16.dtype == np.float32 and np.abs(fp16 - fp32).max() < 1e-2
    assert json.loads(v.to_json())["calibration_images"] == 0


def test_a_variant_past_the_allowed_loss_is_refused_and_not_written(
        tiny_onnx: Path, tmp_path: Path, test_arrays: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = test_arrays
    out = tmp_path / "refused.onnx"
    # A single calibration image of zeros ruins the activation ranges.
    with pytest.raises(VariantRefused, match="nothing was written"):
        make_variant(tiny_onnx, out, "int8", np.zeros((1, 1, 28, 28), np.float32), images,
                     labels, max_loss=0.0)
    assert not out.exists()


def test_the_shipped_int8_variant_agrees_with_fp32(test_arrays: tuple[np.ndarray, np.ndarray]
                                                   ) -> None:
    images, labels = test_arrays
    int8 = REPO_MODELS / "fashion_mnist_seed_cnn.int8.onnx"
    fp32 = REPO_MODELS / "fashion_mnist_seed_cnn.onnx"
    a, b = predict(int8, images).argmax(1), predict(fp32, images).argmax(1)
    assert (a == b).mean() >= 0.99
    assert abs((a == labels).mean() - (b == labels).mean()) <= 0.005
    meta = read_metadata(ort.InferenceSession(str(int8)), int8, "")
    assert meta.variant is not None and meta.variant["kind"] == "int8"
    assert meta.variant["accuracy"] >= 0.92
