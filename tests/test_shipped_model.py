"""The shipped default model: accuracy on the full Fashion-MNIST test set through ONNX Runtime,
with the service's own preprocessing path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.imaging import to_model_input
from training.data import ImageSet


def test_shipped_model_accuracy(shipped_model: Path, fmnist_test: ImageSet) -> None:
    session = ort.InferenceSession(str(shipped_model), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["imgserve.labels"])[0] == "T-shirt/top"
    x = to_model_input(fmnist_test.images.numpy())
    probs = np.concatenate([session.run(None, {"input": x[i : i + 1000]})[0]
                            for i in range(0, len(x), 1000)])
    accuracy = float((probs.argmax(1) == fmnist_test.labels.numpy()).mean())
    assert accuracy >= 0.92
    assert abs(accuracy - float(meta["imgserve.test_accuracy"])) < 1e-4


def test_shipped_model_is_self_contained(shipped_model: Path) -> None:
    assert shipped_model.stat().st_size < 2_000_000
    assert not shipped_model.with_suffix(".onnx.data").exists()
