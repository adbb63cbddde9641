"""Buffered metric updates: what is flushed equals what direct updates would have written."""

from __future__ import annotations

import threading

from prometheus_client import generate_latest

from service.metrics import LATENCY_BUCKETS, Metrics


def _series(metrics: Metrics) -> list[str]:
    text = generate_latest(metrics.registry).decode()
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")
            and "_created" not in ln]


def test_buffered_updates_flush_to_the_same_exposition_as_direct_ones() -> None:
    direct, buffered = Metrics(), Metrics()
    # every bucket edge exactly, values between edges, and past the last one (+Inf)
    values = [*LATENCY_BUCKETS, *(b * 1.5 for b in LATENCY_BUCKETS), 0.0, 42.0]
    latency = buffered.buffered(buffered.request_latency.labels("/v1/classify"))
    requests = buffered.buffered(buffered.requests.labels("/v1/classify", "2xx"))
    depth = buffered.buffered(buffered.queue_depth.labels("m", "1"))
    for v in values:
        direct.request_latency.labels("/v1/classify").observe(v)
        direct.requests.labels("/v1/classify", "2xx").inc()
        latency.observe(v)
        requests.inc()
    direct.queue_depth.labels("m", "1").set(7)
    depth.set(7)

    assert _series(buffered) != _series(direct)  # nothing written before the flush
    buffered.flush()
    assert _series(buffered) == _series(direct)
    buffered.flush()  # a second flush adds nothing
    assert _series(buffered) == _series(direct)


def test_exposition_flushes_first_and_the_request_path_is_buffered() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.request_done("/v1/classify", 200, 0.002)
    metrics.request_done("/v1/classify", 404, 0.001)
    assert metrics.requests.labels("/v1/classify", "2xx")._value.get() == 0
    text = metrics.exposition().decode()
    assert 'imgserve_requests_total{route="/v1/classify",status_class="2xx"} 3.0' in text
    assert 'imgserve_requests_total{route="/v1/classify",status_class="4xx"} 1.0' in text
    assert 'imgserve_request_duration_seconds_count{route="/v1/classify"} 4.0' in text


def test_updates_from_several_threads_are_not_lost_while_flushing() -> None:
    metrics = Metrics()
    model = metrics.for_model("m", "1")
    stop = threading.Event()

    def flusher() -> None:
        while not stop.is_set():
            metrics.flush()

    def worker() -> None:
        for _ in range(20_000):
            model.images.inc()
            model.batch_size.observe(3)

    flushing = threading.Thread(target=flusher)
    flushing.start()
    workers = [threading.Thread(target=worker) for _ in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    flushing.join()
    text = metrics.exposition().decode()
    assert 'imgserve_images_classified_total{model="m",version="1"} 80000.0' in text
    assert 'imgserve_batch_size_images_sum{model="m",version="1"} 240000.0' in text


def test_a_removed_version_is_flushed_and_no_longer_buffered() -> None:
    metrics = Metrics()
    model = metrics.for_model("m", "1")
    metrics.model_info.labels("m", "1", "CPUExecutionProvider").set(1)
    model.images.inc(5)
    model.remove("CPUExecutionProvider")
    text = metrics.exposition().decode()
    assert 'version="1"' not in text  # its series are gone from this process ...
    model.images.inc(1)
    metrics.flush()  # ... and a late update is not written back
    assert 'version="1"' not in metrics.exposition().decode()
