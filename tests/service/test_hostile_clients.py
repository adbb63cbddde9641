"""Hostile clients against a real server process (one worker, so every attack meets one known
process): each attack in the README's table of hostile clients gets its bounded answer while the
worker's RSS stays under 500 MB and ``GET /health/live`` on a fresh connection answers within
0.5 s. Run with ``-s`` to see each attack's peak RSS and worst probe latency."""

from __future__ import annotations

import io
import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.service.servers import get, running_server

RSS_LIMIT_MB = 500
PROBE_LIMIT_S = 0.5
KEEP_ALIVE_S = 1.0
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
SETTINGS = {"IMGSERVE_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE_S),
            "IMGSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "IMGSERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}


# --- a server, and what it costs under attack --------------------------------------------------
@pytest.fixture(scope="module")
def target(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """One worker with the shipped model and default limits (short deadlines, for speed)."""
    with running_server(shipped_model, tmp_path_factory.mktemp("hostile"), 1,
                        SETTINGS) as running:
        yield running


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def probe(port: int, path: str = "/health/live", method: str = "GET",
          timeout: float = 5.0) -> tuple[int, float]:
    """A request on a fresh connection: its status and how long the answer took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                     .encode())
        data = read_all(sock)
    return int(data.split(b" ", 2)[1]), time.monotonic() - started


class Watch:
    """While an attack runs: the worker's peak RSS (sampled every 10 ms) and the worst latency
    of a liveness probe on a fresh connection (one every 50 ms)."""

    def __init__(self, name: str, pid: int, port: int) -> None:
        self.name, self.pid, self.port = name, pid, port
        self.peak_rss_mb = rss_mb(pid)
        self.worst_probe_s = 0.0
        self.probes = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample_rss, daemon=True),
                         threading.Thread(target=self._probe, daemon=True)]

    def _sample_rss(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_rss_mb = max(self.peak_rss_mb, rss_mb(self.pid))

    def _probe(self) -> None:
        while self.probes == 0 or not self._stop.wait(0.05):  # one probe at least
            try:
                status, took = probe(self.port)
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            self.worst_probe_s = max(self.worst_probe_s, took)
            if status != 200:
                self.failures.append(f"status {status}")
            self.probes += 1

    def __enter__(self) -> Watch:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        print(f"\n{self.name}: peak RSS {self.peak_rss_mb:.0f} MB, worst probe "
              f"{self.worst_probe_s * 1000:.0f} ms over {self.probes} probes")

    def check(self) -> None:
        assert self.probes > 0
        assert not self.failures, self.failures[:3]
        assert self.worst_probe_s < PROBE_LIMIT_S
        assert self.peak_rss_mb < RSS_LIMIT_MB


# --- raw HTTP ------------------------------------------------------------------------------------
def connect(port: int, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response, by its Content-Length, leaving the connection as it is."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed inside the body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection within ``seconds`` (nothing else arrives)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def send_all_until_closed(sock: socket.socket, chunks: Iterator[bytes]) -> int:
    """Send until done or the server stops reading; returns the bytes sent."""
    sent = 0
    try:
        for chunk in chunks:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def error_of(body: bytes) -> dict[str, str]:
    error: dict[str, str] = json.loads(body)["error"]
    return error


def image_bytes(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def raw_post(path: str, body: bytes, content_type: str = "image/png",
             extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


# --- 1. idle connections -------------------------------------------------------------------------
def test_blank_lines_after_an_answer_do_not_keep_the_connection_open(
        target: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = target
    sock = connect(port)
    sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(sock)[0] == 200
    started = time.monotonic()
    for _ in range(3):  # CRLFs start no request: the keep-alive clock runs on
        time.sleep(KEEP_ALIVE_S / 4)
        sock.sendall(b"\r\n")
    assert closed_within(sock, 3 * KEEP_ALIVE_S)
    assert time.monotonic() - started < 2 * KEEP_ALIVE_S
    sock.close()


def test_endless_blank_lines_are_cut_off(target: tuple[subprocess.Popen[bytes], int]) -> None:
    """What the parser skips still counts against the head's budget: 431, and the connection
    closes once the client stops (or after a short linger)."""
    _, port = target
    with connect(port) as sock:
        send_all_until_closed(sock, (b"\r\n" * 32768 for _ in range(200)))  # 13 MB
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize("server", [(1, {})], indirect=True)  # the default deadlines
@pytest.mark.parametrize("kind", ["after an answer and a CRLF", "silent"])
def test_a_flood_of_idle_connections_starves_nobody(
        server: tuple[subprocess.Popen[bytes], int], sample_png: bytes, kind: str) -> None:
    """1,100 connections against the default cap of 1,024: the oldest idle ones are closed to
    make room, so probes and requests are still answered."""
    proc, port = server
    held: list[socket.socket] = []
    with ExitStack() as stack, Watch(f"1,100 idle connections ({kind})", proc.pid,
                                     port) as watch:
        for _ in range(1100):
            sock = stack.enter_context(connect(port))
            if kind != "silent":
                sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0] == 200
                sock.sendall(b"\r\n")
            held.append(sock)
        # All of them held open; the newest still answer if the server left them open.
        with connect(port) as sock:
            sock.sendall(raw_post("/v1/classify", sample_png))
            assert read_response(sock)[0] == 200
        status, took = probe(port)
        assert status == 200 and took < PROBE_LIMIT_S
        time.sleep(0.1)
        closed = sum(closed_within(s, 0.01) for s in held[:100])
        assert closed >= 70  # the oldest were the ones closed to make room
        assert not any(closed_within(s, 0.01) for s in held[-100:])
    watch.check()


@pytest.mark.parametrize("server", [(1, {"IMGSERVE_MAX_CONNECTIONS": "20"})], indirect=True)
def test_busy_connections_past_the_cap_get_503_but_probes_are_answered(
        server: tuple[subprocess.Popen[bytes], int], tmp_path: Path) -> None:
    """With every connection inside a request (headers still coming), a new request gets 503 in
    its protocol's error shape, a probe gets 200, and nothing is logged for the refusals; once
    the load drops, a connection opened meanwhile is served."""
    _, port = server
    busy = [connect(port) for _ in range(20)]
    for sock in busy:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\n")  # and nothing more, for now
    time.sleep(0.2)
    waiting = connect(port)  # opened past the cap; finishes its request only later
    waiting.sendall(b"GET /v1/models HTTP/1.1\r\n")
    for path, shape in (("/v1/models", "v1"), ("/v2/models/x", "v2")):
        with connect(port) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, headers, body = read_response(sock)
            assert status == 503 and headers["retry-after"] == "1"
            assert headers["connection"] == "close" and closed_within(sock, 2)
            if shape == "v1":
                assert error_of(body)["type"] == "overloaded"
            else:
                assert isinstance(json.loads(body)["error"], str)
    assert probe(port)[0] == 200
    assert probe(port, "/v2/health/ready")[0] == 200
    for sock in busy:
        sock.close()
    time.sleep(0.3)
    waiting.sendall(b"Host: x\r\n\r\n")
    assert read_response(waiting)[0] == 200
    waiting.close()
    time.sleep(0.3)
    log = (tmp_path / "server.log").read_text()
    assert "Invalid HTTP request" not in log and "WARNING" not in log


# --- 2. headers, trailers, URL -------------------------------------------------------------------
def _flood_of_small_headers() -> Iterator[bytes]:
    yield b"GET /health/live HTTP/1.1\r\nHost: x\r\n"
    chunk = b"".join(b"X-%07d: v\r\n" % i for i in range(5000))
    for _ in range(1750):  # ~100 MB
        yield chunk
    yield b"\r\n"


def _one_huge_value() -> Iterator[bytes]:
    yield b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: "
    for _ in range(1500):  # ~100 MB
        yield b"a" * 65536
    yield b"\r\n\r\n"


def _many_fields() -> Iterator[bytes]:
    yield b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + b"X: 1\r\n" * 150 + b"\r\n"


def _huge_url() -> Iterator[bytes]:
    yield b"GET /health/live?"
    for _ in range(1800):  # ~120 MB
        yield b"a" * 65536
    yield b" HTTP/1.1\r\nHost: x\r\n\r\n"


def _trailer_flood() -> Iterator[bytes]:
    yield (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n")
    chunk = b"".join(b"T-%07d: v\r\n" % i for i in range(5000))
    for _ in range(1750):
        yield chunk
    yield b"\r\n"


def _chunk_extension_flood() -> Iterator[bytes]:
    yield (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n1;ext=")
    for _ in range(1500):
        yield b"a" * 65536


@pytest.mark.parametrize(("attack", "status"), [
    (_flood_of_small_headers, 431), (_one_huge_value, 431), (_many_fields, 431),
    (_huge_url, 414), (_trailer_flood, 431), (_chunk_extension_flood, 431)],
    ids=["100 MB of small headers", "one 100 MB header value", "150 header fields",
         "120 MB URL", "100 MB of trailers", "100 MB chunk extension"])
def test_oversized_heads_are_refused_within_a_few_kilobytes(
        target: tuple[subprocess.Popen[bytes], int], attack: object, status: int) -> None:
    proc, port = target
    assert callable(attack)
    with Watch(f"head attack ({attack.__name__})", proc.pid, port) as watch:
        sock = connect(port)
        send_all_until_closed(sock, attack())
        answer = read_all(sock)
        sock.close()
    watch.check()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"connection: close" in head.lower()
    assert error_of(body)["type"] in ("header_fields_too_large", "uri_too_long")


def test_headers_within_the_limits_are_served(
        target: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = target
    with connect(port) as sock:
        fields = b"".join(b"X-%02d: %s\r\n" % (i, b"v" * 200) for i in range(90))  # ~19 KB
        sock.sendall(b"GET /health/live?" + b"q" * 4000 + b" HTTP/1.1\r\nHost: x\r\n" + fields
                     + b"\r\n")
        assert read_response(sock)[0] == 200


# --- 3, 4. decoding --------------------------------------------------------------------------
def _jpeg_with_empty_scans(scans: int) -> bytes:
    data = image_bytes(Image.new("L", (1024, 768), 128), "JPEG", progressive=True)
    eoi = data.rindex(b"\xff\xd9")
    sos = b"\xff\xda" + struct.pack(">H", 8) + bytes([1, 1, 0, 0, 0, 0])
    return data[:eoi] + sos * scans + data[eoi:]


def test_a_jpeg_of_many_empty_scans_is_refused_at_once(
        target: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, port = target
    bomb = _jpeg_with_empty_scans(100_000)  # 1 MB: 5.6 s of decoding on the loop at b80e207
    with Watch("JPEG of 100,000 empty scans", proc.pid, port) as watch:
        for _ in range(3):
            with connect(port) as sock:
                started = time.monotonic()
                sock.sendall(raw_post("/v1/classify", bomb, "image/jpeg"))
                status, _, body = read_response(sock)
                assert status == 400 and "scans" in error_of(body)["message"]
                assert time.monotonic() - started < 0.5
    watch.check()


def _sixteen_bit_png() -> bytes:
    a = np.zeros((6000, 6000), np.uint16)
    a[::97, ::89] = 60000
    return image_bytes(Image.fromarray(a), "PNG", compress_level=9)  # about 72 KB


def test_a_small_16_bit_png_of_36_megapixels_is_decoded_in_bounded_memory(
        target: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, port = target
    bomb = _sixteen_bit_png()
    assert len(bomb) < 100_000
    with Watch("6000x6000 16-bit PNG (72 KB)", proc.pid, port) as watch, connect(port) as sock:
        sock.sendall(raw_post("/v1/classify", bomb))
        assert read_response(sock)[0] == 200
    watch.check()


@pytest.mark.slow
def test_several_high_bit_depth_images_at_once_stay_in_bounded_memory(
        target: tuple[subprocess.Popen[bytes], int]) -> None:
    """Four 16-bit PNGs in one request, and a 6000x6000 float TIFF beside it: the decode
    threads take them within the worker's budget of pixels in flight."""
    proc, port = target
    bomb = _sixteen_bit_png()
    floats = image_bytes(Image.fromarray(np.zeros((6000, 6000), np.float32)), "TIFF",
                         compression="tiff_deflate")
    boundary = "b0undary"
    parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                     f"filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n".encode()
                     + bomb + b"\r\n" for i in range(4)) + f"--{boundary}--\r\n".encode()
    with Watch("4 x 16-bit PNG + float TIFF", proc.pid, port) as watch:
        socks = [connect(port, 60), connect(port, 60)]
        socks[0].sendall(raw_post("/v1/classify", parts,
                                  f"multipart/form-data; boundary={boundary}"))
        socks[1].sendall(raw_post("/v1/classify", floats, "image/tiff"))
        for sock in socks:
            assert read_response(sock)[0] == 200
            sock.close()
    watch.check()


# --- 5. V2 element counts ------------------------------------------------------------------------
def _v2_request(head: dict[str, object], tail: bytes = b"") -> bytes:
    header = json.dumps(head).encode()
    extra = f"Inference-Header-Content-Length: {len(header)}\r\n" if tail else ""
    return raw_post("/v2/models/fashion_mnist_seed_cnn/infer", header + tail,
                    "application/octet-stream" if tail else "application/json", extra)


def _v2_bodies() -> dict[str, bytes]:
    tail = b"\0\0\0\0" * (10 * 1024 * 1024 // 4 - 100)  # 2.6 M empty elements
    binary = _v2_request({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                      "parameters": {"binary_data_size": len(tail)}}]}, tail)
    strings = raw_post("/v2/models/fashion_mnist_seed_cnn/infer",
                       b'{"inputs":[{"name":"input","datatype":"BYTES","shape":[1],"data":['
                       + b'"",' * 3_400_000 + b'""]}]}', "application/json")
    arrays = raw_post("/v2/models/fashion_mnist_seed_cnn/infer",
                      b'{"inputs":[{"name":"input","datatype":"BYTES","shape":[1],"data":[['
                      + b"[]," * 3_400_000 + b"[]]]}]}", "application/json")
    numbers = raw_post("/v2/models/fashion_mnist_seed_cnn/infer",
                       b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],'
                       b'"data":[' + b"0," * 4_000_000 + b"0]}]}", "application/json")
    return {"binary BYTES": binary, "JSON strings": strings, "JSON arrays": arrays,
            "JSON numbers": numbers}


def test_v2_element_counts_are_checked_before_the_elements_are_built(
        target: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, port = target
    bodies = _v2_bodies()
    with Watch("V2 10 MB of empty elements (4 forms)", proc.pid, port) as watch:
        for name, request in bodies.items():
            with connect(port) as sock:
                started = time.monotonic()
                sock.sendall(request)
                status, _, body = read_response(sock)
                took = time.monotonic() - started
            assert status == 400, (name, body[:200])
            assert isinstance(json.loads(body)["error"], str)
            assert took < 0.4, (name, took)
    watch.check()


# --- 6. request bodies held at once --------------------------------------------------------------
def test_stalled_uploads_hold_no_more_than_the_body_budget(
        target: tuple[subprocess.Popen[bytes], int]) -> None:
    """60 uploads of 10,000,000 of a declared 10,000,001 bytes, all stalled: past the worker's
    128 MiB budget for bodies, uploads get 503 with Retry-After while the first ones wait for
    their body deadline."""
    proc, port = target
    head = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 10000001\r\n\r\n")
    body = b"\0" * 10_000_000
    refused = 0
    with ExitStack() as stack, Watch("60 stalled 10 MB uploads", proc.pid, port) as watch:
        socks = []
        for _ in range(60):
            sock = stack.enter_context(connect(port))
            sock.sendall(head)
            send_all_until_closed(sock, iter([body]))
            socks.append(sock)
        for sock in socks:
            sock.settimeout(0.05)
            try:
                first = sock.recv(65536)
            except TimeoutError:
                continue  # held, waiting for its last byte
            if first.startswith(b"HTTP/1.1 503"):
                assert b"retry-after: 1" in first.lower()
                refused += 1
    watch.check()
    assert 40 <= refused <= 55


# --- 7-12. the smaller findings ------------------------------------------------------------------
def test_explain_with_a_unicode_digit_as_target_is_422_before_any_model_call(
        target: tuple[subprocess.Popen[bytes], int], sample_png: bytes) -> None:
    _, port = target
    for raw in ("%C2%B2", "%E2%91%A0", "%D9%A3"):  # ², ①, Arabic-Indic 3
        with connect(port) as sock:
            sock.sendall(raw_post(f"/v1/explain?target={raw}", sample_png))
            status, _, body = read_response(sock)
        assert status == 422 and error_of(body)["type"] == "invalid_request"


@pytest.fixture
def repository_with_a_broken_model(shipped_model: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "alpha" / "1").mkdir(parents=True)
    (repo / "alpha" / "1" / "model.onnx").write_bytes(shipped_model.read_bytes())
    (repo / "gamma" / "1").mkdir(parents=True)
    (repo / "gamma" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return repo


def test_open_routes_tell_nothing_of_the_models_when_keys_are_required(
        repository_with_a_broken_model: Path, tmp_path: Path) -> None:
    with running_server(repository_with_a_broken_model, tmp_path, 1,
                        {"IMGSERVE_API_KEYS": "k1"}, probe="/health/live") as (_, port):
        time.sleep(1.0)  # the broken model has been tried
        status, body = get(port, "/health/ready")
        assert status == 503 and json.loads(body)["reason"] == "not ready"
        status, doc = get(port, "/openapi.json")
        assert status == 200 and b"/v1/classify" in doc
        for secret in (b"alpha", b"Pullover", b"ONNXRuntimeError", str(tmp_path).encode()):
            assert secret not in doc and secret not in body
        assert get(port, "/v1/models")[0] == 401


@pytest.mark.parametrize("server", [(1, {"IMGSERVE_ACCESS_LOG": "true"})], indirect=True)
def test_the_access_log_cannot_be_forged_from_a_path(
        server: tuple[subprocess.Popen[bytes], int], tmp_path: Path) -> None:
    _, port = server
    for path in ("/v1/models/%0aINJECTED%20status=200/classify", "/v1/x%00y/classify",
                 "/v1/" + "a" * 5000):
        with connect(port) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                         .encode())
            assert read_response(sock)[0] == 404
    time.sleep(0.5)  # the access log is written in batches
    log = (tmp_path / "server.log").read_bytes()
    assert b"\0" not in log
    lines = log.decode().splitlines()
    assert not any(line.startswith("INJECTED") for line in lines)
    assert any("path=/v1/models/%0AINJECTED%20status=200/classify status=404" in line
               for line in lines)
    assert max(len(line) for line in lines) < 1000


@pytest.mark.parametrize("request_head", [
    b"POST /v1/models/nope/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n"
    b"Expect: 100-continue\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    b"Content-Length: 99999999\r\n\r\n"], ids=["early 404 with Expect", "413 by length"])
def test_an_answer_before_the_body_closes_the_connection(
        target: tuple[subprocess.Popen[bytes], int], request_head: bytes) -> None:
    """The unread body must not be read as the next request: the answer says Connection: close
    and the connection is closed, so the next request goes on a new connection."""
    _, port = target
    with connect(port) as sock:
        sock.sendall(request_head)
        status, headers, _ = read_response(sock)
        assert status in (404, 413) and headers["connection"] == "close"
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")  # not answered here
        assert read_all(sock) == b""


def test_a_body_read_whole_keeps_the_connection(
        target: tuple[subprocess.Popen[bytes], int], sample_png: bytes) -> None:
    _, port = target
    with connect(port) as sock:
        for _ in range(3):
            sock.sendall(raw_post("/v1/classify", sample_png))
            status, headers, _ = read_response(sock)
            assert status == 200 and headers.get("connection") != "close"
        sock.sendall(raw_post("/v1/models/nope/classify", sample_png))  # 404, body whole
        status, headers, _ = read_response(sock)
        assert status == 404 and headers.get("connection") != "close"


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
    (b"GET /v1/\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4"
     b"\r\n\r\nabcd", 400),
    (b"GET /v1/models HTTP/1.1\r\n\r\n", 400),
    (b"GET /v1/models\r\n\r\n", 505),
    (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
     b"1\r\nx\r\n0\r\n\r\n", 501)],
    ids=["no colon", "non-ASCII path", "two lengths", "no Host", "HTTP/0.9", "gzip coding"])
def test_malformed_requests_get_a_json_error(target: tuple[subprocess.Popen[bytes], int],
                                             raw: bytes, status: int) -> None:
    _, port = target
    with connect(port) as sock:
        sock.sendall(raw)
        got, headers, body = read_response(sock)
        assert closed_within(sock, 3)
    assert got == status and headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert error_of(body)["type"] in ("invalid_request", "http_version_not_supported",
                                      "not_implemented")


def test_client_values_are_echoed_in_errors_only_in_part(
        target: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = target
    head = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1] * 100_000,
                        "data": [0]}]}
    with connect(port) as sock:
        sock.sendall(_v2_request(head))
        status, _, body = read_response(sock)
    assert status == 400 and len(body) < 1000


def test_a_request_before_garbage_is_still_answered(
        target: tuple[subprocess.Popen[bytes], int], sample_png: bytes) -> None:
    _, port = target
    with connect(port) as sock:
        sock.sendall(raw_post("/v1/classify", sample_png) + b"NOT HTTP AT ALL\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 200 and headers["connection"] == "close"
        assert read_all(sock) == b""


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/v2/health/live",
                                  "/v2/health/ready", "/metrics", "/"])
def test_head_is_answered_where_get_is(target: tuple[subprocess.Popen[bytes], int],
                                       path: str) -> None:
    _, port = target
    with connect(port) as sock:
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                     .encode())
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b""


def test_a_slow_request_on_a_v2_path_gets_408_in_the_v2_shape(
        target: tuple[subprocess.Popen[bytes], int]) -> None:
    _, port = target
    with connect(port) as sock:
        sock.sendall(b"GET /v2/models/fashion_mnist_seed_cnn HTTP/1.1\r\nHost: x\r\n")
        status, headers, body = read_response(sock)
    assert status == 408 and headers["connection"] == "close"
    assert isinstance(json.loads(body)["error"], str)
