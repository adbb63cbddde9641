"""The execution layer on CPU, where CI runs: with buckets on (the mode CUDA uses), every ONNX
Runtime session sees exactly one input shape, each inference thread has its own sessions made
and warmed on it, and the answers are the single-session answers. A session factory records
what every session is asked (the sessions themselves are real)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.engine import normalizer_model, to_unit_range
from service.imaging import to_model_input
from service.model import Classifier, OnnxClassifier
from tests.conftest import png_bytes
from training.data import ImageSet


class RecordingSession:
    """A real session that records every input shape it is given, and the thread that made it."""

    def __init__(self, model: bytes, options: ort.SessionOptions, providers: list[Any]) -> None:
        self.inner = ort.InferenceSession(model, options, providers=providers)
        self.shapes: set[tuple[int, ...]] = set()
        self.made_on = threading.current_thread().name
        self.name = self.inner.get_inputs()[0].name

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.shapes.add(tuple(feeds[self.name].shape))
        return self.inner.run(outputs, feeds)

    def io_binding(self) -> RecordingBinding:
        return RecordingBinding(self, self.inner.io_binding())

    def run_with_iobinding(self, binding: RecordingBinding) -> None:
        self.shapes.add(binding.input_shape)
        self.inner.run_with_iobinding(binding.inner)

    def get_providers(self) -> list[str]:
        return list(self.inner.get_providers())


class RecordingBinding:
    def __init__(self, session: RecordingSession, inner: Any) -> None:
        self.session, self.inner = session, inner
        self.input_shape: tuple[int, ...] = ()

    def bind_ortvalue_input(self, name: str, value: ort.OrtValue) -> None:
        self.input_shape = tuple(value.shape())
        self.inner.bind_ortvalue_input(name, value)

    def bind_ortvalue_output(self, name: str, value: ort.OrtValue) -> None:
        self.inner.bind_ortvalue_output(name, value)


class Recorder:
    def __init__(self) -> None:
        self.sessions: list[RecordingSession] = []
        self._lock = threading.Lock()

    def __call__(self, model: bytes, options: ort.SessionOptions,
                 providers: list[Any]) -> RecordingSession:
        session = RecordingSession(model, options, providers)
        with self._lock:
            self.sessions.append(session)
        return session


def bucketed(model: Path, recorder: Recorder, **overrides: Any) -> OnnxClassifier:
    settings = Settings(**{"provider": "cpu", "batch_buckets": "on", "max_batch_size": 16,
                           "model_path": model, **overrides})
    return OnnxClassifier(model, settings, session_factory=recorder)


@pytest.fixture
def images(fmnist_test: ImageSet) -> np.ndarray:
    return fmnist_test.images[:64].numpy()  # N×1×28×28 uint8, real Fashion-MNIST


def test_each_session_sees_one_shape(shipped_model: Path, images: np.ndarray) -> None:
    """Random batch sizes in both dtypes from two threads: every session (the model's, one per
    bucket and thread, and the uint8 normaliser's) meets one input shape only."""
    recorder = Recorder()
    model = bucketed(shipped_model, recorder)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 17, 60)

    def work(k: int) -> None:
        for n in sizes[k::2]:
            batch = images[:n]
            model.predict(batch if n % 2 else to_model_input(batch))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(work, range(2)))
    assert model.buckets == [1, 2, 4, 8, 16]
    assert model.engine.lanes == 2
    shapes = [s.shapes for s in recorder.sessions if s.shapes]
    assert all(len(seen) == 1 for seen in shapes), shapes
    assert len(recorder.sessions) == 2 * 5 * 2  # per thread: 5 buckets x (model + normaliser)
    model_shapes = sorted(next(iter(s.shapes)) for s in recorder.sessions
                          if s.name == "input" and s.shapes)
    assert model_shapes == sorted([(b, 1, 28, 28) for b in [1, 2, 4, 8, 16]] * 2)


def test_bucketed_answers_are_the_single_session_answers(shipped_model: Path,
                                                         images: np.ndarray) -> None:
    single = OnnxClassifier(shipped_model, Settings(provider="cpu", model_path=shipped_model))
    model = bucketed(shipped_model, Recorder())
    for n in (1, 3, 8, 13, 16):
        expected = single.predict(images[:n])
        assert np.allclose(model.predict(images[:n]), expected, atol=1e-6, rtol=0)
        assert np.allclose(model.predict(to_model_input(images[:n])), expected, atol=1e-6,
                           rtol=0)
        # two different inputs through the same bound buffers: the second is not the first's
        other = images[16:16 + n]
        assert np.allclose(model.predict(other), single.predict(other), atol=1e-6, rtol=0)


def test_uint8_pixels_are_the_float_input_exactly(shipped_model: Path,
                                                  images: np.ndarray) -> None:
    """The normaliser graph divides as training's to_model_input does: the same float32s."""
    session = ort.InferenceSession(normalizer_model(images[:8].shape),
                                   providers=["CPUExecutionProvider"])
    every = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    every_session = ort.InferenceSession(normalizer_model(every.shape),
                                         providers=["CPUExecutionProvider"])
    assert np.array_equal(every_session.run(None, {"pixels": every})[0], to_model_input(every))
    assert np.array_equal(session.run(None, {"pixels": images[:8]})[0],
                          to_unit_range(images[:8]))
    single = OnnxClassifier(shipped_model, Settings(provider="cpu", model_path=shipped_model))
    assert np.array_equal(single.predict(images[:8]), single.predict(to_model_input(images[:8])))


@pytest.fixture
def recorded_app(make_client: Any, shipped_model: Path) -> tuple[TestClient, Recorder]:
    recorder = Recorder()

    def factory(settings: Settings) -> Classifier:
        return OnnxClassifier(settings.model_path, settings, session_factory=recorder)

    client = make_client(factory, model_path=shipped_model, batch_buckets="on",
                         max_batch_size=8, inference_workers=2, inference_inline="off",
                         max_wait_ms=5)
    return client, recorder


def test_sessions_are_made_and_warmed_on_the_inference_threads(
        recorded_app: tuple[TestClient, Recorder], images: np.ndarray) -> None:
    """Through the app, concurrent requests of 1 to 8 images: each inference thread's sessions
    were made on it before the model was ready, and none meets a second shape."""
    client, recorder = recorded_app
    made = {s.made_on for s in recorder.sessions if s.shapes}
    assert len(made) == 2 and all(name.startswith("inference") for name in made)
    before = len(recorder.sessions)

    def request(k: int) -> int:
        n = 1 + k % 8
        files = [("file", (f"{i}.png", png_bytes(images[i, 0]), "image/png"))
                 for i in range(n)]
        return client.post("/v1/classify", files=files).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(request, range(40))) == {200}
    assert len(recorder.sessions) == before  # nothing made after readiness
    assert all(len(s.shapes) == 1 for s in recorder.sessions if s.shapes)


def test_a_batch_holds_one_dtype() -> None:
    """uint8 pixels (/v1) and float32 tensors (V2 FP32) queued together go in separate
    batches, in arrival order."""
    from service.batcher import Batcher

    seen: list[tuple[str, int]] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        seen.append((batch.dtype.name, batch.shape[0]))
        return np.zeros((batch.shape[0], 3), np.float32)

    async def main() -> None:
        batcher = Batcher(predict, max_batch_size=16, max_wait_s=0.05, max_queue_images=64)
        await batcher.start()
        batcher.expect(4)
        jobs = [batcher.submit(np.zeros((1, 1, 4, 4), np.uint8 if i % 2 else np.float32), 5)
                for i in range(4)]
        batcher.expected_done(4)
        await asyncio.gather(*jobs)
        await batcher.stop()

    asyncio.run(main())
    assert all(dtype in ("uint8", "float32") for dtype, _ in seen)
    assert sum(n for _, n in seen) == 4 and len(seen) >= 2


def test_an_inference_thread_that_cannot_prepare_fails_the_load_cleanly(
        make_client: Any, shipped_model: Path) -> None:
    """Sessions that cannot be made on an inference thread (a GPU out of memory, say) fail the
    model's load with the reason, as any load failure does: nothing hangs."""

    class CannotPrepare(OnnxClassifier):
        calls = 0

        def attach_thread(self) -> None:
            type(self).calls += 1
            if type(self).calls == 1:
                raise RuntimeError("out of device memory (simulated)")

    def factory(settings: Settings) -> Classifier:
        return CannotPrepare(settings.model_path, settings)

    client = make_client(factory, ready=False, model_path=shipped_model, batch_buckets="on",
                         inference_workers=2, inference_inline="off")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        models = client.get("/v1/models").json()
        reason = client.get("/health/ready").json().get("reason", "")
        if "out of device memory" in reason:
            break
        time.sleep(0.05)
    assert "out of device memory (simulated)" in reason, (reason, models)
    assert client.get("/health/live").status_code == 200
