"""The model contract and its ONNX Runtime implementation.

A :class:`Classifier` is batch-native: ``predict`` takes an N×C×H×W float32 array of pixels in
[0, 1] and returns N×K probabilities. Everything it needs to know about preprocessing and labels
comes from the ONNX file's metadata, written by ``training.export``. Nothing here knows HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.buckets import bucket_sizes
from service.config import Settings
from service.engine import Engine, EngineConfig, SessionFactory
from service.imaging import PreprocessSpec
from service.providers import CPU, CUDA, TENSORRT, choose_providers, provider_name, session_options

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The file is missing, not ONNX, or lacks the metadata the service needs."""


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    version: str
    labels: tuple[str, ...]
    spec: PreprocessSpec
    dataset: str
    test_accuracy: float | None
    sha256: str
    input_name: str
    output_name: str
    extra: dict[str, str] = field(default_factory=dict)
    # Temperature scaling folded into the graph, with its expected calibration error before and
    # after (written by ``training calibrate``); None for a raw softmax.
    calibration: dict[str, Any] | None = None
    # A smaller variant (int8, fp16) and its measured accuracy (written by ``training quantize``).
    variant: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """(-1, C, H, W): -1 is the dynamic batch dimension."""
        return (-1, self.spec.channels, self.spec.height, self.spec.width)


class Classifier(ABC):
    """The batch-native contract the batcher calls from a worker thread."""

    metadata: ModelMetadata
    provider: str = CPU
    provider_note: str = ""

    @abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """N×C×H×W uint8 pixels (0-255) or float32 in [0, 1] -> N×K float32 probabilities
        (same N, same order). A batch holds one dtype."""

    def warmup(self, batch_sizes: list[int]) -> None:
        """Run each batch size once so the first real request pays no first-call costs."""
        c, h, w = self.metadata.input_shape[1:]
        for n in batch_sizes:
            for dtype in (np.uint8, np.float32):
                self.predict(np.zeros((n, c, h, w), dtype=dtype))

    def attach_thread(self) -> None:  # noqa: B027 - optional hook
        """Prepare this thread to run batches (the batcher calls it on each inference thread
        before the model is ready)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(session: ort.InferenceSession, path: Path, sha256: str) -> ModelMetadata:
    """Labels and preprocessing from the file's metadata, checked against the graph's shapes."""
    props: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
    missing = [k for k in ("imgserve.labels", "imgserve.preprocess") if k not in props]
    if missing:
        raise ModelLoadError(
            f"{path} lacks metadata {missing}: export it with `python -m training export`"
        )
    try:
        labels = tuple(str(v) for v in json.loads(props["imgserve.labels"]))
        spec = PreprocessSpec.from_json(props["imgserve.preprocess"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: malformed metadata: {exc}") from exc
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(f"{path}: expected one input and one output")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or [shape[1], shape[2], shape[3]] != [spec.channels, spec.height,
                                                              spec.width]:
        raise ModelLoadError(f"{path}: input shape {shape} does not match metadata {spec}")
    if isinstance(shape[0], int) and shape[0] > 0:
        raise ModelLoadError(f"{path}: the batch dimension must be dynamic, not {shape[0]}")
    accuracy = props.get("imgserve.test_accuracy")
    calibration, variant = _json_prop(props, "imgserve.calibration", path), _json_prop(
        props, "imgserve.variant", path)
    return ModelMetadata(
        name=props.get("imgserve.model_name", path.stem),
        version=props.get("imgserve.model_version", "1"),
        labels=labels,
        spec=spec,
        dataset=props.get("imgserve.dataset", ""),
        test_accuracy=float(accuracy) if accuracy else None,
        sha256=sha256,
        input_name=inputs[0].name,
        output_name=outputs[0].name,
        extra={k: v for k, v in props.items() if not k.startswith("imgserve.")},
        calibration=calibration,
        variant=variant,
    )


def _json_prop(props: dict[str, str], key: str, path: Path) -> dict[str, Any] | None:
    if key not in props:
        return None
    try:
        return dict(json.loads(props[key]))
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: malformed {key}: {exc}") from exc


class OnnxClassifier(Classifier):
    """An ONNX model on the best usable provider, run by :class:`service.engine.Engine`: one
    session for every batch size on CPU, one session per bucket (per inference thread) on an
    accelerator."""

    def __init__(self, path: Path, settings: Settings, buckets: list[int] | None = None,
                 session_factory: SessionFactory = ort.InferenceSession) -> None:
        if not path.is_file():
            raise ModelLoadError(f"model file {path} not found")
        model_bytes = path.read_bytes()
        providers, note = choose_providers(settings, model_bytes)
        on_gpu = any(provider_name(p) in (CUDA, TENSORRT) for p in providers)
        use_buckets = settings.batch_buckets == "on" or (settings.batch_buckets == "auto"
                                                          and on_gpu)
        # Buckets cap the shapes, and each bucket has its own session (service.engine); CUDA
        # graphs need both.
        self.buckets = buckets or (bucket_sizes(settings.max_batch_size)
                                   if use_buckets or settings.cuda_graphs else [])
        config = EngineConfig(providers=providers, options=lambda: session_options(settings),
                              buckets=self.buckets, device="cuda" if on_gpu else "cpu",
                              device_id=settings.device_id, io_binding=settings.io_binding,
                              cuda_graphs=settings.cuda_graphs and on_gpu)
        try:
            self.engine = Engine(model_bytes, config, session_factory)
            # The metadata from the shared session, or (sessions per bucket, made by each
            # inference thread) from a quick unoptimised one.
            session = self.engine.session or ort.InferenceSession(
                self.engine.model_bytes, session_options(settings, optimize=False), providers=[CPU])
        except Exception as exc:
            raise ModelLoadError(f"cannot load {path}: {exc}") from exc
        self.metadata = read_metadata(session, path, file_sha256(path))
        self.provider = str(session.get_providers()[0]) if self.engine.session else provider_name(
            providers[0])
        self.provider_note = note

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.engine.run(batch)

    def attach_thread(self) -> None:
        self.engine.attach_thread()

    def warmup(self, batch_sizes: list[int]) -> None:
        self.engine.warmup(batch_sizes)

    def close(self) -> None:
        """Free the sessions (and their memory arenas) now, not whenever the last reference
        goes."""
        self.__dict__.pop("engine", None)
