"""All Prometheus metrics, declared once on a registry the app owns (no global registry).

With several worker processes, prometheus-client's multi-process mode keeps each worker's values
in files under ``metrics_dir``; :meth:`Metrics.exposition` then reports the sum over workers
(gauges as their ``multiprocess_mode`` says).

The metrics updated on every request and every batch are buffered: an update adds to a few
numbers in memory, and :meth:`Metrics.flush` (every ``FLUSH_INTERVAL_S`` from the runtime, and
before each exposition) writes the sums. In multi-process mode each write is a locked update of
a memory-mapped file, about 2 microseconds; a request made about nine of them. Another worker's
figures may therefore be up to ``FLUSH_INTERVAL_S`` behind.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FLUSH_INTERVAL_S = 0.1


class Buffered(Protocol):
    def flush(self) -> None: ...


class BufferedCounter:
    """A counter's child whose increments are summed in memory until :meth:`flush`."""

    __slots__ = ("_child", "_lock", "_pending")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._lock = threading.Lock()  # the batcher may update from an inference thread
        self._pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._pending += amount

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, 0.0
        if pending:
            self._child.inc(pending)


class BufferedHistogram:
    """A histogram's child whose observations are counted per bucket in memory until
    :meth:`flush`, which adds the counts and the sum to the child's values."""

    __slots__ = ("_bounds", "_child", "_counts", "_lock", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)  # ends with +Inf
        self._lock = threading.Lock()
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        i = bisect.bisect_left(self._bounds, amount)  # the first bucket with amount <= bound
        with self._lock:
            self._counts[i] += 1
            self._sum += amount

    def flush(self) -> None:
        with self._lock:
            counts, total = self._counts, self._sum
            if not any(counts):
                return
            self._counts, self._sum = [0] * len(counts), 0.0
        # prometheus-client has no bulk observe; these are the values observe() updates
        self._child._sum.inc(total)
        for bucket, n in zip(self._child._buckets, counts, strict=True):
            if n:
                bucket.inc(n)


class BufferedGauge:
    """A gauge's child whose latest value is written at :meth:`flush`. The value is kept, not
    taken, so a ``set`` from another thread during a flush is never lost."""

    __slots__ = ("_child", "_value")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._value: float | None = None

    def set(self, value: float) -> None:
        self._value = value

    def flush(self) -> None:
        value = self._value
        if value is not None:
            self._child.set(value)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 multiprocess_dir: Path | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._request_children: dict[tuple[str, int],
                                     tuple[BufferedCounter, BufferedHistogram]] = {}
        self._buffers: list[Buffered] = []
        self.multiprocess_dir = multiprocess_dir
        # Model versions unloaded, whose series no exposition shows: prometheus-client cannot
        # remove a labelled series in multi-process mode (it warns, and its files keep them).
        self.retired: set[tuple[str, str]] = set()
        r = self.registry
        self.requests = Counter("imgserve_requests_total",
                                "HTTP requests by route and status class",
                                ["route", "status_class"], registry=r)
        self.request_latency = Histogram("imgserve_request_duration_seconds",
                                         "HTTP request latency", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        per_model = ["model", "version"]  # bounded: the versions the policy serves
        self.queue_wait = Histogram("imgserve_queue_wait_seconds",
                                    "time from enqueue to the start of the model call", per_model,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("imgserve_inference_duration_seconds",
                                   "model call duration per batch", per_model,
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.decode = self.buffered(Histogram(
            "imgserve_decode_duration_seconds", "image decode time per image",
            buckets=LATENCY_BUCKETS, registry=r))
        self.batch_size = Histogram("imgserve_batch_size_images", "images per model call",
                                    per_model, buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("imgserve_queue_depth_images", "images waiting for the model",
                                 per_model, multiprocess_mode="livesum", registry=r)
        self.rejected = Counter("imgserve_rejected_requests_total",
                                "requests refused before inference, by reason", ["reason"],
                                registry=r)
        self.images = Counter("imgserve_images_classified_total", "images classified",
                              per_model, registry=r)
        self.batch_failures = Counter("imgserve_batch_failures_total",
                                      "model calls that raised", per_model, registry=r)
        self.explanation_images = Counter("imgserve_explanation_images_total",
                                          "images run through a model for explanations (the "
                                          "original and each occluded copy)", ["model"],
                                          registry=r)
        self.model_info = Gauge("imgserve_model_info", "a served model version (value 1)",
                                ["name", "version", "provider"], multiprocess_mode="livemax",
                                registry=r)
        self.model_loads = Counter("imgserve_model_loads_total",
                                   "model version loads from the repository, by outcome",
                                   ["model", "outcome"], registry=r)
        self.model_swaps = Counter("imgserve_model_swaps_total",
                                   "changes of the versions a model serves", ["model"],
                                   registry=r)
        self.repository_problems = Gauge("imgserve_repository_problems",
                                         "repository entries that cannot be served (failed "
                                         "loads, conflicts) at the last scan",
                                         multiprocess_mode="livemax", registry=r)
        self.ready = Gauge("imgserve_ready", "1 when the service is ready to serve",
                           multiprocess_mode="livemin", registry=r)
        self.gpu_memory_used = Gauge("imgserve_gpu_memory_used_bytes", "GPU memory in use (NVML)",
                                     ["device"], multiprocess_mode="livemax", registry=r)
        self.gpu_utilization = Gauge("imgserve_gpu_utilization_ratio",
                                     "GPU busy fraction over the last sample period (NVML)",
                                     ["device"], multiprocess_mode="livemax", registry=r)

    def buffered(self, child: Any) -> Any:
        """A buffered stand-in for a counter's, histogram's or gauge's child (or unlabelled
        metric), flushed with the others."""
        wrapper: Buffered
        if isinstance(child, Histogram):
            wrapper = BufferedHistogram(child)
        elif isinstance(child, Counter):
            wrapper = BufferedCounter(child)
        elif isinstance(child, Gauge):
            wrapper = BufferedGauge(child)
        else:
            raise TypeError(f"cannot buffer {type(child).__name__}")
        self._buffers.append(wrapper)
        return wrapper

    def forget(self, buffers: list[Any]) -> None:
        """Flush these buffers and stop flushing them (their series are being removed)."""
        for b in buffers:
            b.flush()
        self._buffers = [b for b in self._buffers if all(b is not f for f in buffers)]

    def flush(self) -> None:
        """Write every buffered update to the metrics' values."""
        for buffer in tuple(self._buffers):
            buffer.flush()

    def request_done(self, route: str, status: int, seconds: float) -> None:
        """Count one HTTP request and its latency (label children cached: ``labels()`` costs
        more than the update itself)."""
        key = (route, status // 100)
        children = self._request_children.get(key)
        if children is None:
            children = (self.buffered(self.requests.labels(route, f"{status // 100}xx")),
                        self.buffered(self.request_latency.labels(route)))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def for_model(self, model: str, version: str) -> ModelMetrics:
        self.retired.discard((model, version))
        return ModelMetrics(self, model, version)

    def remove(self, metric: Any, *labels: str) -> None:
        """Drop a labelled series: from the registry in one process; with several, hidden from
        the exposition by :attr:`retired` instead (see there)."""
        if self.multiprocess_dir is None:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)

    def exposition(self) -> bytes:
        """The Prometheus text format: this process's registry, or the sum over workers without
        the series of retired model versions."""
        self.flush()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        merged.register(_WithoutRetired(MultiProcessCollector(None, str(self.multiprocess_dir)),
                                        frozenset(self.retired)))
        return generate_latest(merged)


class _WithoutRetired:
    """A collector's metrics without the samples of retired (model, version) pairs."""

    def __init__(self, inner: MultiProcessCollector, retired: frozenset[tuple[str, str]]) -> None:
        self.inner = inner
        self.retired = retired

    def collect(self) -> Iterator[Any]:
        for metric in self.inner.collect():
            if self.retired:
                metric.samples = [
                    s for s in metric.samples
                    if (s.labels.get("model", s.labels.get("name")), s.labels.get("version"))
                    not in self.retired]
            yield metric


class ModelMetrics:
    """One model version's metrics, label children bound once (``labels()`` on every batch
    would cost more than the update); those updated per image or per batch are buffered."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._parent = metrics
        self._labels = (model, version)
        self.rejected = metrics.rejected
        self.batch_failures = metrics.batch_failures.labels(model, version)
        self.queue_wait = metrics.buffered(metrics.queue_wait.labels(model, version))
        self.inference = metrics.buffered(metrics.inference.labels(model, version))
        self.batch_size = metrics.buffered(metrics.batch_size.labels(model, version))
        self.queue_depth = metrics.buffered(metrics.queue_depth.labels(model, version))
        self.images = metrics.buffered(metrics.images.labels(model, version))
        self._buffers = [self.queue_wait, self.inference, self.batch_size, self.queue_depth,
                         self.images]

    def remove(self, provider: str) -> None:
        """Drop this version's series once it is unloaded, ``imgserve_model_info`` (with the
        provider it ran on) included."""
        m = self._parent
        m.forget(self._buffers)
        for metric in (m.queue_wait, m.inference, m.batch_size, m.queue_depth, m.images,
                       m.batch_failures):
            m.remove(metric, *self._labels)
        m.remove(m.model_info, *self._labels, provider)
        m.retired.add(self._labels)
