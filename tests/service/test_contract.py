"""Training and serving agree: real Fashion-MNIST test images through HTTP give the same
probabilities as the torch model on the training pipeline's tensors."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import png_bytes
from training.data import ImageSet
from training.train import load_checkpoint, model_from_checkpoint, predict_proba

N = 200


def test_http_probabilities_match_torch(client: TestClient, tiny_run: Path,
                                        fmnist_test: ImageSet) -> None:
    model, _ = model_from_checkpoint(load_checkpoint(tiny_run))
    images = fmnist_test.images[:N]
    expected = predict_proba(model, images).numpy()
    got = np.zeros_like(expected)
    for start in range(0, N, 50):
        files = [("file", (f"{i}.png", png_bytes(images[i, 0].numpy()), "image/png"))
                 for i in range(start, start + 50)]
        resp = client.post("/v1/classify?top_k=10", files=files)
        assert resp.status_code == 200
        for i, result in enumerate(resp.json()["results"], start):
            for p in result["predictions"]:
                got[i, p["index"]] = p["score"]
    assert np.array_equal(got.argmax(1), expected.argmax(1))
    assert float(np.abs(got - expected).max()) <= 1e-5
    assert torch.from_numpy(got).sum(1).sub(1).abs().max() < 1e-5


def test_center_crop_models_see_the_same_pixels_in_training_and_serving(
        tmp_path: Path, fmnist_test: ImageSet, make_client: Any) -> None:
    """A folder model trained with --resize center_crop on 60x36 RGB JPEGs: the service's answer
    for each file equals the torch model's on the tensors training decoded from that file."""
    from training.config import TrainConfig
    from training.data import load_folder
    from training.export import ModelInfo, export_onnx
    from training.train import train

    data = tmp_path / "data"
    files = []
    for label, name in ((1, "trouser"), (7, "sneaker")):
        (data / name).mkdir(parents=True)
        rows = [i for i, y in enumerate(fmnist_test.labels.tolist()) if y == label][:30]
        for i in rows:
            img = Image.fromarray(fmnist_test.images[i, 0].numpy()).convert("RGB").resize((60, 36))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            files.append(data / name / f"{i}.jpg")
            files[-1].write_bytes(buf.getvalue())
    run = tmp_path / "run"
    train(TrainConfig.from_dict({"data": str(data), "out": str(run), "epochs": 1,
                                 "image_size": 32, "resize": "center_crop", "threads": 2,
                                 "batch_size": 16}))
    model, spec = model_from_checkpoint(load_checkpoint(run))
    assert spec.resize == "center_crop" and (spec.height, spec.width) == (32, 32)
    onnx_path = tmp_path / "crop.onnx"
    export_onnx(model, spec, ["sneaker", "trouser"], onnx_path, ModelInfo("crop", "1", "folder"))
    decoded, _ = load_folder(data, spec)  # training's own pipeline
    expected = predict_proba(model, decoded.images).numpy()
    c: TestClient = make_client(model_path=onnx_path)
    order = sorted(files, key=lambda f: (f.parent.name, f.name))  # load_folder's order
    resp = c.post("/v1/classify?top_k=2", files=[
        ("file", (f.name, f.read_bytes(), "image/jpeg")) for f in order])
    assert resp.status_code == 200
    got = np.zeros_like(expected)
    for i, result in enumerate(resp.json()["results"]):
        for p in result["predictions"]:
            got[i, p["index"]] = p["score"]
    assert float(np.abs(got - expected).max()) <= 1e-5
