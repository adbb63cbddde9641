from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training.export import ExportError, check_parity
from training.models import build_model
from training.train import load_checkpoint, model_from_checkpoint


def test_export_metadata_and_dynamic_batch(tiny_onnx: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["imgserve.labels"])[9] == "Ankle boot"
    spec = json.loads(meta["imgserve.preprocess"])
    assert (spec["height"], spec["width"], spec["channels"]) == (28, 28, 1)
    assert spec["normalization"] == "in_graph" and len(spec["mean"]) == 1
    assert meta["imgserve.model_name"] == "tiny_cnn" and meta["imgserve.model_version"] == "3"
    assert not list(tiny_onnx.parent.glob("*.onnx.data"))  # weights are inside the file
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    for n in (1, 5, 33):
        out = session.run(None, {"input": np.random.rand(n, 1, 28, 28).astype(np.float32)})[0]
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)


def test_onnx_matches_torch(tiny_run: Path, tiny_onnx: Path) -> None:
    model, spec = model_from_checkpoint(load_checkpoint(tiny_run))
    assert check_parity(model, tiny_onnx, spec, batches=(1, 7, 64)) <= 1e-5


def test_parity_failure_is_an_error(tiny_onnx: Path, tiny_run: Path) -> None:
    _, spec = model_from_checkpoint(load_checkpoint(tiny_run))
    torch.manual_seed(123)
    other = build_model("seed_cnn", 1, 10, 28, 28, [0.3], [0.35]).eval()
    with pytest.raises(ExportError, match="differs from torch"):
        check_parity(other, tiny_onnx, spec)
