"""Shared fixtures: real Fashion-MNIST data, a real model trained and exported to ONNX once per
session, and the real app over HTTP."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import DEFAULT_MODEL, Settings
from service.runtime import ClassifierFactory, load_onnx
from training.config import TINY, TrainConfig
from training.data import ImageSet, load_fashion_mnist


@pytest.fixture(scope="session")
def fmnist_test() -> ImageSet:
    return load_fashion_mnist("test")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seed CNN trained for one epoch on 2,000 real Fashion-MNIST images (a few seconds)."""
    from training.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    train(TrainConfig.from_dict({**TINY, "out": str(out), "threads": 2}))
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run: Path) -> Path:
    from training.export import ModelInfo, export_onnx
    from training.train import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(tiny_run)
    model, spec = model_from_checkpoint(ckpt)
    path = tiny_run / "tiny.onnx"
    export_onnx(model, spec, ckpt["classes"], path, ModelInfo("tiny_cnn", "3", "fashion-mnist"))
    return path


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    assert DEFAULT_MODEL.is_file(), f"the shipped model {DEFAULT_MODEL} is missing"
    return DEFAULT_MODEL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode an H×W (grey) or H×W×3 uint8 array as PNG."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def sample_png(fmnist_test: ImageSet) -> bytes:
    return png_bytes(fmnist_test.images[0, 0].numpy())


def wait_ready(client: TestClient, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout} s: {client.get('/health/ready').json()}")


@pytest.fixture
def make_client(tiny_onnx: Path) -> Iterator[object]:
    """Build a started app (lifespan run, model ready) with settings overrides."""
    clients: list[TestClient] = []

    def make(factory: ClassifierFactory = load_onnx, ready: bool = True,
             **overrides: object) -> TestClient:
        settings = Settings(**{"model_path": tiny_onnx, "access_log": False, **overrides})
        client = TestClient(create_app(settings, factory), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        if ready:
            wait_ready(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: object) -> TestClient:
    c: TestClient = make_client()  # type: ignore[operator]
    return c
