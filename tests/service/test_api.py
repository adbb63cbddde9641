from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import png_bytes, wait_ready
from tests.service.fakes import Wrapped, factory

PNG = {"Content-Type": "image/png"}


def assert_error(resp: Any, status: int, type_: str | None = None) -> dict[str, str]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    if type_:
        assert body["error"]["type"] == type_
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def test_classify_raw_body(client: TestClient, sample_png: bytes) -> None:
    resp = client.post("/v1/classify", content=sample_png, headers=PNG)
    assert resp.status_code == 200
    body = resp.json()
    assert body["model"] == {"name": "tiny_cnn", "version": "3"}
    [result] = body["results"]
    assert result["filename"] is None
    preds = result["predictions"]
    assert len(preds) == 5
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
    labels = client.get("/v1/models").json()["models"][0]["labels"]
    assert all(labels[p["index"]] == p["label"] for p in preds)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k(client: TestClient, sample_png: bytes, k: int) -> None:
    resp = client.post(f"/v1/classify?top_k={k}", content=sample_png,
                       headers={"Content-Type": "application/octet-stream"})
    assert len(resp.json()["results"][0]["predictions"]) == k


@pytest.mark.parametrize("k", [0, -3])
def test_top_k_out_of_range(client: TestClient, sample_png: bytes, k: int) -> None:
    error = assert_error(client.post(f"/v1/classify?top_k={k}", content=sample_png, headers=PNG),
                         422, "invalid_request")
    assert "top_k" in error["message"]


def test_top_k_above_the_class_count_returns_every_class(client: TestClient,
                                                         sample_png: bytes) -> None:
    resp = client.post("/v1/classify?top_k=11", content=sample_png, headers=PNG)
    preds = resp.json()["results"][0]["predictions"]
    assert resp.status_code == 200 and sorted(p["index"] for p in preds) == list(range(10))
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)


def test_top_k_not_a_number(client: TestClient, sample_png: bytes) -> None:
    assert_error(client.post("/v1/classify?top_k=abc", content=sample_png, headers=PNG), 422,
                 "invalid_request")


def test_multipart_with_one_bad_image(client: TestClient, sample_png: bytes) -> None:
    files = [("file", ("a.png", sample_png, "image/png")),
             ("file", ("b.txt", b"not an image", "image/png")),
             ("file", ("c.png", sample_png, "image/png"))]
    resp = client.post("/v1/classify?top_k=2", files=files)
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert [r["filename"] for r in results] == ["a.png", "b.txt", "c.png"]
    assert results[1]["error"]["type"] == "invalid_image" and "predictions" not in results[1]
    assert results[0]["predictions"] == results[2]["predictions"]


def test_multipart_without_file_field(client: TestClient, sample_png: bytes) -> None:
    resp = client.post("/v1/classify", files=[("image", ("a.png", sample_png, "image/png"))])
    assert_error(resp, 400, "invalid_request")


def test_multipart_only_bad_image_is_4xx(client: TestClient) -> None:
    resp = client.post("/v1/classify", files=[("file", ("x.png", b"\x89PNG broken", "image/png"))])
    assert_error(resp, 400, "invalid_image")


def _encode(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("body", "ctype", "status", "type_"), [
    (b"", "image/png", 400, "invalid_request"),
    (b"plain text, not an image", "image/png", 400, "invalid_image"),
    (_encode("PNG")[:40], "image/png", 400, "invalid_image"),
    (_encode("ICO"), "image/x-icon", 415, "unsupported_media_type"),
    (b'{"image": "..."}', "application/json", 415, "unsupported_media_type"),
    (b"--x\r\nbroken", "multipart/form-data; boundary=x", 400, None),
])
def test_bad_input_is_a_clear_4xx(client: TestClient, body: bytes, ctype: str, status: int,
                                  type_: str | None) -> None:
    assert_error(client.post("/v1/classify", content=body, headers={"Content-Type": ctype}),
                 status, type_)


def test_format_is_sniffed_not_trusted(client: TestClient) -> None:
    resp = client.post("/v1/classify", content=_encode("JPEG"), headers=PNG)
    assert resp.status_code == 200


def _photo(fmt: str, size: tuple[int, int], **options: Any) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **options)
    return buf.getvalue()


def test_small_images_decode_on_the_loop_and_large_ones_in_the_decode_threads(
        client: TestClient, sample_png: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.runtime

    threads: list[str] = []
    real = service.runtime.pixels_of

    def spy(img: Any, spec: Any) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return real(img, spec)

    monkeypatch.setattr(service.runtime, "pixels_of", spy)
    bodies = {"28x28 PNG": sample_png, "640x480 JPEG": _photo("JPEG", (640, 480)),
              "640x480 PNG": _photo("PNG", (640, 480)),
              "640x480 progressive JPEG": _photo("JPEG", (640, 480), progressive=True),
              "1600x1200 JPEG": _photo("JPEG", (1600, 1200))}
    where = {}
    for name, body in bodies.items():
        assert client.post("/v1/classify", content=body).status_code == 200
        (where[name],) = threads
        threads.clear()
    loop = where["28x28 PNG"]
    assert not loop.startswith("decode")
    # JPEGs decode at a reduced scale: inline up to INLINE_DECODE_MAX_JPEG_PIXELS (786,432)
    assert where["640x480 JPEG"] == loop
    assert where["640x480 PNG"].startswith("decode")
    # A progressive JPEG walks every block once per scan: never on the loop
    assert where["640x480 progressive JPEG"].startswith("decode")
    assert where["1600x1200 JPEG"].startswith("decode")


def test_limits(make_client: Any, sample_png: bytes) -> None:
    c: TestClient = make_client(max_body_bytes=2000, max_pixels=1000, max_images_per_request=2)
    assert_error(c.post("/v1/classify", content=b"\x00" * 2001, headers=PNG), 413,
                 "payload_too_large")
    big = png_bytes(np.zeros((40, 40), np.uint8))  # 1,600 pixels > 1,000
    assert_error(c.post("/v1/classify", content=big, headers=PNG), 413, "payload_too_large")
    files = [("file", (f"{i}.png", sample_png, "image/png")) for i in range(3)]
    assert_error(c.post("/v1/classify", files=files), 413, "payload_too_large")
    assert c.post("/v1/classify", content=sample_png, headers=PNG).status_code == 200


def test_chunked_body_over_the_limit_is_refused_while_reading(make_client: Any) -> None:
    c: TestClient = make_client(max_body_bytes=10_000)
    sent = {"n": 0}

    def chunks() -> Any:
        for _ in range(1000):  # 1 MB if fully read
            sent["n"] += 1
            yield b"\x00" * 1000

    assert_error(c.post("/v1/classify", content=chunks(), headers=PNG), 413)


def test_models_endpoint(client: TestClient) -> None:
    [m] = client.get("/v1/models").json()["models"]
    assert m["name"] == "tiny_cnn" and m["input_shape"] == [-1, 1, 28, 28]
    assert m["color_mode"] == "L" and m["preprocessing"]["interpolation"] == "bilinear"
    assert m["provider"] == "CPUExecutionProvider" and len(m["sha256"]) == 64
    assert m["batching"]["max_batch_size"] == 32 and len(m["labels"]) == 10


def test_metrics_exposition(client: TestClient, sample_png: bytes) -> None:
    client.post("/v1/classify", content=sample_png, headers=PNG)
    client.post("/v1/classify", content=b"nope", headers=PNG)
    text = client.get("/metrics").text
    for name in ("imgserve_requests_total", "imgserve_request_duration_seconds_bucket",
                 "imgserve_queue_wait_seconds_bucket", "imgserve_inference_duration_seconds_bucket",
                 "imgserve_batch_size_images_bucket", "imgserve_queue_depth_images",
                 "imgserve_images_classified_total", "imgserve_model_info"):
        assert name in text, name
    assert 'imgserve_requests_total{route="/v1/classify",status_class="2xx"} 1.0' in text
    assert 'imgserve_requests_total{route="/v1/classify",status_class="4xx"} 1.0' in text
    assert 'provider="CPUExecutionProvider"' in text


def test_unknown_route_uses_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")


def test_openapi_docs(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/v1/classify" in spec["paths"] and "/health/ready" in spec["paths"]
    assert client.get("/docs").status_code == 200


def _concurrent(c: TestClient, n: int, body: bytes) -> list[Any]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: c.post("/v1/classify", content=body, headers=PNG),
                             range(n)))


def test_batching_happens_under_concurrency(make_client: Any, sample_png: bytes) -> None:
    held: list[Wrapped] = []
    c: TestClient = make_client(factory(held, delay=0.02), max_wait_ms=20)
    before = len(held[0].calls)  # the warm-up calls come before readiness
    responses = _concurrent(c, 16, sample_png)
    assert all(r.status_code == 200 for r in responses)
    model_calls = list(held[0].calls[before:])
    assert sum(model_calls) == 16 and len(model_calls) < 16
    text = c.get("/metrics").text
    assert "imgserve_batch_size_images_count" in text


def test_queue_full_is_503_with_retry_after(make_client: Any, sample_png: bytes) -> None:
    held: list[Wrapped] = []
    c: TestClient = make_client(factory(held, delay=0.3), max_batch_size=1, max_queue_images=1,
                                max_images_per_request=1, max_wait_ms=0)
    responses = _concurrent(c, 6, sample_png)
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes
    full = next(r for r in responses if r.status_code == 503)
    assert full.headers["Retry-After"] == "1"
    assert_error(full, 503, "overloaded")
    assert 'reason="queue_full"' in c.get("/metrics").text


def test_deadline_is_504(make_client: Any, sample_png: bytes) -> None:
    held: list[Wrapped] = []
    c: TestClient = make_client(factory(held, delay=0.4), max_batch_size=1, max_wait_ms=0,
                                request_timeout_s=0.15)
    before = len(held[0].calls)  # the warm-up calls come before readiness
    responses = _concurrent(c, 3, sample_png)
    assert any(r.status_code == 504 for r in responses)
    assert_error(next(r for r in responses if r.status_code == 504), 504, "deadline_exceeded")
    assert len(held[0].calls) - before < 3  # queued requests were dropped before inference


def test_raising_model_fails_only_its_batch(make_client: Any, sample_png: bytes) -> None:
    held: list[Wrapped] = []
    c: TestClient = make_client(factory(held, fail_when=lambda x: bool(x.max() == 0)),
                                max_batch_size=1, max_wait_ms=0, warmup=False)
    black = png_bytes(np.zeros((28, 28), np.uint8))
    bad = c.post("/v1/classify", content=black, headers=PNG)
    assert_error(bad, 500, "inference_failed")
    assert c.post("/v1/classify", content=sample_png, headers=PNG).status_code == 200


def test_unexpected_errors_are_generic_500(client: TestClient, sample_png: bytes,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = client.app.state.runtime  # type: ignore[attr-defined]

    def explode(img: object) -> None:
        raise ZeroDivisionError("secret internal detail")

    monkeypatch.setattr(runtime, "_pixels", explode)
    err = assert_error(client.post("/v1/classify", content=sample_png, headers=PNG), 500,
                       "internal_error")
    assert "secret" not in err["message"]


def test_readiness_follows_loading_and_shutdown(make_client: Any, sample_png: bytes) -> None:
    gate = threading.Event()
    held: list[Wrapped] = []
    c: TestClient = make_client(factory(held, gate=gate), ready=False)
    assert c.get("/health/live").status_code == 200
    not_ready = c.get("/health/ready")
    assert not_ready.status_code == 503 and "loading" in not_ready.json()["reason"]
    assert_error(c.post("/v1/classify", content=sample_png, headers=PNG), 503, "model_not_ready")
    gate.set()
    wait_ready(c)
    assert c.post("/v1/classify", content=sample_png, headers=PNG).status_code == 200
    c.app.state.runtime.begin_shutdown()  # type: ignore[attr-defined]
    assert c.get("/health/ready").status_code == 503
    assert c.get("/health/live").status_code == 200
    refused = c.post("/v1/classify", content=sample_png, headers=PNG)
    assert_error(refused, 503, "shutting_down")
    assert refused.headers["Retry-After"] == "1"


def test_require_gpu_on_cpu_never_gets_ready(make_client: Any) -> None:
    c: TestClient = make_client(ready=False, require_gpu=True)
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        resp = c.get("/health/ready")
        if "require_gpu" in resp.json().get("reason", ""):
            break
        time.sleep(0.05)
    assert resp.status_code == 503 and "CPU" in resp.json()["reason"]


def test_bad_model_file_is_not_ready(make_client: Any, tmp_path: Any) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    c: TestClient = make_client(ready=False, model_path=bad)
    import time

    for _ in range(200):
        resp = c.get("/health/ready")
        if "failed" in resp.json().get("reason", ""):
            break
        time.sleep(0.02)
    assert resp.status_code == 503 and "failed to load" in resp.json()["reason"]


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded",
                                          "application/octet-stream", "image/jpeg"])
def test_raw_body_types_curl_sends_are_classified(client: TestClient, sample_png: bytes,
                                                  content_type: str | None) -> None:
    """curl --data-binary sends x-www-form-urlencoded; the bytes say what the image is."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = client.build_request("POST", "/v1/classify", content=sample_png, headers=headers)
    assert req.headers.get("Content-Type") == content_type
    resp = client.send(req)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["results"][0]["predictions"]) == 5


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_other_types_get_415_with_the_working_curl_line(client: TestClient, sample_png: bytes,
                                                        content_type: str) -> None:
    error = assert_error(client.post("/v1/classify", content=sample_png,
                                     headers={"Content-Type": content_type}), 415,
                         "unsupported_media_type")
    assert "curl --data-binary @photo.jpg" in error["message"]


def test_retry_after_follows_the_queue_drain_rate(make_client: Any, sample_png: bytes) -> None:
    """At 0.45 s per image, 4 queued images drain in 1.8 s: Retry-After says 2, not 1."""
    held: list[Wrapped] = []
    c: TestClient = make_client(factory(held, delay=0.45), max_batch_size=1, max_queue_images=4,
                                max_images_per_request=1, max_wait_ms=0, warmup=False)
    for _ in range(2):  # the rate is learnt from batches that ran
        assert c.post("/v1/classify", content=sample_png, headers=PNG).status_code == 200
    responses = _concurrent(c, 8, sample_png)
    refused = [r for r in responses if r.status_code == 503]
    assert refused and all(r.headers["Retry-After"] == "2" for r in refused)
    assert "retry in 2 s" in refused[0].json()["error"]["message"]


def test_the_request_deadline_covers_decoding(make_client: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An image still being decoded at the request deadline gets 504, and the decode threads'
    pixel budget is given back once the decode ends."""
    import service.runtime

    real = service.runtime.pixels_of

    def slow(img: Any, spec: Any) -> np.ndarray:
        time.sleep(0.5)
        return real(img, spec)

    monkeypatch.setattr(service.runtime, "pixels_of", slow)
    c: TestClient = make_client(request_timeout_s=0.2)
    big = _photo("PNG", (200, 200))  # decoded in the decode threads
    started = time.monotonic()
    assert_error(c.post("/v1/classify", content=big, headers=PNG), 504, "deadline_exceeded")
    assert time.monotonic() - started < 0.45
    monkeypatch.setattr(service.runtime, "pixels_of", real)
    time.sleep(0.5)
    assert c.post("/v1/classify", content=big, headers=PNG).status_code == 200
