"""Training and serving agree: real Fashion-MNIST test images through HTTP give the same
probabilities as the torch model on the training pipeline's tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient

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
