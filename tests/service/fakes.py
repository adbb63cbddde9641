"""Small fakes that subclass the real contract, wrapping a real ONNX classifier."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from service.config import Settings
from service.model import Classifier, OnnxClassifier


class Wrapped(Classifier):
    """A real classifier with a delay, a failure rule, a gate before loading, and a call log."""

    def __init__(self, inner: Classifier, delay: float = 0.0,
                 fail_when: Callable[[np.ndarray], bool] | None = None) -> None:
        self.inner = inner
        self.metadata = inner.metadata
        self.provider = inner.provider
        self.provider_note = inner.provider_note
        self.delay = delay
        self.fail_when = fail_when
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls.append(int(batch.shape[0]))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_when is not None and self.fail_when(batch):
            raise RuntimeError("simulated model failure")
        return self.inner.predict(batch)


def factory(holder: list[Wrapped], gate: threading.Event | None = None,
            **kw: object) -> Callable[[Settings], Classifier]:
    def make(settings: Settings) -> Classifier:
        if gate is not None:
            gate.wait(30)
        wrapped = Wrapped(OnnxClassifier(settings.model_path, settings), **kw)  # type: ignore[arg-type]
        holder.append(wrapped)
        return wrapped
    return make
