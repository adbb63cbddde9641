"""The execution layer: how one model version's batches run on ONNX Runtime. The batcher calls
:meth:`Engine.run` with an N×C×H×W batch of uint8 pixels (0-255) or float32 values in [0, 1],
and gets N×K probabilities; nothing here knows HTTP or batching policy.

Two modes:

- **One session, any shape** (buckets off; the default on CPU): ``session.run`` with the batch
  as it is. uint8 pixels become float32 / 255 in the calling thread, exactly as training's
  :func:`service.imaging.to_model_input` does.
- **One session per shape** (buckets on; the default on CUDA). ONNX Runtime's CUDA convolutions
  keep a cuDNN plan for the last input shape only: consecutive batches of two shapes re-plan
  every convolution (794 ms a call instead of 5.2 on an H200, ``../gpu-kit`` results). So each
  batch size of ``buckets`` has its own session, its batch dimension fixed where the graph names
  it, and the batch is padded to the smallest bucket that holds it: no session ever meets a
  second input shape. Sessions belong to a *lane*, one per inference thread, built and warmed
  on that thread (a thread's first call on a warm session still costs 9-20 ms), so threads
  never share a session, its buffers or a captured CUDA graph. Each bucket's input and output
  are allocated once and bound (I/O binding): a batch is one copy in, one run, one copy out.
  uint8 batches are copied as uint8, a quarter of float32's bytes, and turned into float32 / 255
  on the device by a two-node graph (Cast, Div) whose output is the model's bound input. With
  ``cuda_graphs``, each lane's bucket sessions capture their graph at warm-up and replay it
  (every batch goes through the same bound buffers, as graphs require).

``session_factory`` makes every session (``onnxruntime.InferenceSession`` unless a test records
what each one sees).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from service.buckets import bucket_for
from service.imaging import to_model_input
from service.providers import CUDA, provider_name

log = logging.getLogger(__name__)

SessionFactory = Callable[..., Any]  # (model bytes, SessionOptions, providers=...) -> session
PIXEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


def to_unit_range(batch: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [0, 1] as training computes them, float32 as it is."""
    return batch if batch.dtype == np.float32 else to_model_input(batch)


def normalizer_model(shape: Sequence[int], opset: int = 13) -> bytes:
    """A graph of uint8 ``pixels`` (fixed ``shape``) to float32 ``pixels / 255``: the same
    IEEE division as :func:`to_unit_range`, run where the model runs."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["wide"], to=TensorProto.FLOAT),
         helper.make_node("Div", ["wide", "scale"], ["values"])],
        "normalize",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, list(shape))],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


@dataclass
class EngineConfig:
    """What an engine needs besides the model: derived from the settings by the classifier."""

    providers: list[Any]
    options: Callable[[], ort.SessionOptions]  # fresh options for each session
    buckets: list[int]  # empty: one session, any shape
    device: str = "cpu"  # where bound buffers live: "cpu" or "cuda"
    device_id: int = 0
    io_binding: bool = True
    cuda_graphs: bool = False


class _Bucket:
    """One lane's session for one batch size, with its bound buffers."""

    def __init__(self, engine: Engine, size: int) -> None:
        self.size = size
        cfg = engine.config
        c, h, w = engine.input_shape[1:]
        shape = (size, c, h, w)
        options = cfg.options()
        if engine.batch_dim:  # a static graph: shapes known to every kernel
            options.add_free_dimension_override_by_name(engine.batch_dim, size)
        self.session = engine.factory(engine.model_bytes, options,
                                      providers=engine.bucket_providers())
        self.bound = cfg.io_binding
        self.input_name, self.output_name = engine.input_name, engine.output_name
        self.host = {dtype: np.zeros(shape, dtype) for dtype in PIXEL_DTYPES}
        if not self.bound:
            return
        where = (cfg.device, cfg.device_id)
        self.values = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, *where)
        self.pixels = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.uint8, *where)
        self.out = ort.OrtValue.ortvalue_from_shape_and_type(
            (size, engine.num_classes), np.float32, *where)
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input(self.input_name, self.values)
        self.binding.bind_ortvalue_output(self.output_name, self.out)
        normalizer_options = cfg.options()
        self.normalizer = engine.factory(normalizer_model(shape), normalizer_options,
                                         providers=engine.normalizer_providers())
        self.normalize = self.normalizer.io_binding()
        self.normalize.bind_ortvalue_input("pixels", self.pixels)
        self.normalize.bind_ortvalue_output("values", self.values)

    def run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        host = self.host[batch.dtype]
        host[:n] = batch
        if n < self.size:
            host[n:] = 0  # padding: rows computed and dropped
        if not self.bound:
            out = self.session.run([self.output_name], {self.input_name: to_unit_range(host)})
            return np.asarray(out[0][:n])
        if batch.dtype == np.uint8:
            self.pixels.update_inplace(host)
            self.normalizer.run_with_iobinding(self.normalize)
        else:
            self.values.update_inplace(host)
        self.session.run_with_iobinding(self.binding)
        return np.asarray(self.out.numpy()[:n])


class _Lane:
    """The sessions of one inference thread, one per bucket."""

    def __init__(self, engine: Engine) -> None:
        self.buckets = {size: _Bucket(engine, size) for size in engine.config.buckets}

    def warm(self) -> None:
        """Run every bucket with two different inputs of each dtype: plans, arenas and (with
        CUDA graphs) the captured graph are made here, not on a request."""
        rng = np.random.default_rng(0)
        for bucket in self.buckets.values():
            for dtype in PIXEL_DTYPES:
                for _ in range(2):
                    shape = bucket.host[dtype].shape
                    x = (rng.integers(0, 256, shape, dtype=np.uint8) if dtype == np.uint8
                         else rng.random(shape, dtype=np.float32))
                    bucket.run(np.asarray(x))


class Engine:
    def __init__(self, model_bytes: bytes, config: EngineConfig,
                 factory: SessionFactory = ort.InferenceSession) -> None:
        self.model_bytes = model_bytes
        self.config = config
        self.factory = factory
        proto = onnx.load_model_from_string(model_bytes)
        graph_input, graph_output = proto.graph.input[0], proto.graph.output[0]
        dims = graph_input.type.tensor_type.shape.dim
        self.batch_dim = dims[0].dim_param or None
        self.input_shape = tuple(d.dim_value for d in dims)
        self.num_classes = graph_output.type.tensor_type.shape.dim[1].dim_value
        self.input_name, self.output_name = graph_input.name, graph_output.name
        self._local = threading.local()
        self._lanes: list[_Lane] = []
        self._lock = threading.Lock()
        # One session, any shape: shared by every thread (ORT sessions are thread-safe).
        self.session = None if config.buckets else factory(
            model_bytes, config.options(), providers=config.providers)

    def bucket_providers(self) -> list[Any]:
        """The providers of a bucket session: with ``cuda_graphs``, CUDA captures a graph (each
        bucket session sees one shape through the same bound buffers, as graphs require)."""
        graphs = self.config.cuda_graphs
        return [_with(p, enable_cuda_graph=True) if graphs and provider_name(p) == CUDA else p
                for p in self.config.providers]

    def normalizer_providers(self) -> list[Any]:
        """The model's providers, never with a CUDA graph (two nodes: nothing to gain)."""
        return self.config.providers

    def _lane(self) -> _Lane:
        lane: _Lane | None = getattr(self._local, "lane", None)
        if lane is None:
            lane = _Lane(self)
            lane.warm()
            self._local.lane = lane
            with self._lock:
                self._lanes.append(lane)
        return lane

    def attach_thread(self) -> None:
        """Build and warm this thread's lane now (the batcher calls it on each inference
        thread before the model is ready); nothing to do with one session for all shapes."""
        if self.config.buckets:
            self._lane()

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """N×C×H×W uint8 pixels or float32 in [0, 1] -> N×K probabilities."""
        if batch.dtype not in PIXEL_DTYPES:
            raise TypeError(f"pixels must be uint8 or float32, not {batch.dtype}")
        if self.session is not None:
            out = self.session.run([self.output_name], {self.input_name: to_unit_range(batch)})
            return np.asarray(out[0])
        size = bucket_for(batch.shape[0], self.config.buckets)
        return self._lane().buckets[size].run(batch)

    def warmup(self, sizes: Sequence[int]) -> None:
        """With one session: run each batch size once in each dtype. With lanes, each inference
        thread warms its own (:meth:`attach_thread`)."""
        if self.session is None:
            return
        for n in sizes:
            for dtype in PIXEL_DTYPES:
                self.run(np.zeros((n, *self.input_shape[1:]), dtype))


def _with(provider: Any, **options: Any) -> tuple[str, dict[str, Any]]:
    name, current = provider if isinstance(provider, tuple) else (provider, {})
    return name, {**current, **options}
