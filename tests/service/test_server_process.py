"""The real server process: command line, worker processes, and draining on SIGTERM."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from service.metrics import FLUSH_INTERVAL_S
from tests.conftest import png_bytes
from tests.service.servers import get, post
from training.data import ImageSet

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_setting() -> None:
    out = subprocess.run([sys.executable, "-m", "service", "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    for flag in ("--host", "--port", "--model", "--workers"):
        assert flag in out
    for name in ("IMGSERVE_MAX_BATCH_SIZE", "IMGSERVE_MAX_WAIT_MS", "IMGSERVE_PROVIDER",
                 "IMGSERVE_MAX_BODY_BYTES", "IMGSERVE_GRACEFUL_TIMEOUT_S", "IMGSERVE_WORKERS"):
        assert name in out


def test_a_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "service", "--model", str(tmp_path / "no.onnx")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2
    assert "not found" in res.stderr


@pytest.mark.parametrize("server", [(2, {})], indirect=True)
def test_worker_processes_share_the_port_and_sum_their_metrics(
        server: tuple[subprocess.Popen[bytes], int], sample_png: bytes) -> None:
    _, port = server
    for _ in range(20):
        status, body = post(port, sample_png, "image/png")
        assert status == 200, body
    series = 'imgserve_requests_total{route="/v1/classify",status_class="2xx"}'

    def counted() -> float:
        _, text = get(port, "/metrics")
        line = next(ln for ln in text.decode().splitlines() if ln.startswith(series))
        return float(line.split()[-1])

    # however the kernel spread the 20 connections, the metrics count all of them once the
    # other worker has flushed its buffered updates (every FLUSH_INTERVAL_S)
    deadline = time.monotonic() + 10 * FLUSH_INTERVAL_S
    while (seen := counted()) < 20 and time.monotonic() < deadline:
        time.sleep(FLUSH_INTERVAL_S / 4)
    assert seen == 20.0
    time.sleep(2 * FLUSH_INTERVAL_S)
    assert counted() == 20.0  # and never more


# A slow-ish request (many images) keeps plenty of work in flight when the signal arrives.
@pytest.mark.parametrize("server", [(1, {}), (2, {})], indirect=True, ids=["1-worker", "2-workers"])
def test_sigterm_drains_every_accepted_request(
        server: tuple[subprocess.Popen[bytes], int], fmnist_test: ImageSet) -> None:
    proc, port = server
    boundary = "drainboundary"
    parts = []
    for i in range(48):
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                     f"filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n".encode()
                     + png_bytes(fmnist_test.images[i, 0].numpy()) + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    ctype = f"multipart/form-data; boundary={boundary}"

    signalled_at: list[float] = []
    lock = threading.Lock()
    outcomes: list[tuple[float, tuple[int, bytes] | OSError]] = []

    def client() -> None:
        while True:
            sent = time.monotonic()
            try:
                outcome: tuple[int, bytes] | OSError = post(port, body, ctype)
            except OSError as exc:
                outcome = exc
            with lock:
                outcomes.append((sent, outcome))
            if signalled_at and (isinstance(outcome, OSError) or proc.poll() is not None):
                return  # the listener is gone

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    signalled_at.append(time.monotonic())
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    # uvicorn re-raises the signal after a clean shutdown; the supervisor exits 0
    assert proc.wait(40) in (0, -signal.SIGTERM)
    # Requests sent well before the signal were accepted: every one must be answered in full.
    # (One sent in the last instant may still sit in the kernel's accept queue when the
    # listener closes; in a cluster the preStop pause keeps traffic away before SIGTERM.)
    cutoff = signalled_at[0] - 0.2
    before = [o for sent, o in outcomes if sent < cutoff]
    after = [o for sent, o in outcomes if sent >= signalled_at[0]]
    assert len(before) > 12
    for outcome in before:
        assert not isinstance(outcome, OSError), outcome
        status, payload = outcome
        assert status == 200, payload
        assert len(json.loads(payload)["results"]) == 48
    for outcome in after:  # refused cleanly, or not connected at all: never a 5xx other than 503
        if isinstance(outcome, tuple):
            status, payload = outcome
            assert status in (200, 503), payload
            if status == 503:
                assert json.loads(payload)["error"]["type"] in ("shutting_down",
                                                                "model_not_ready")


def test_worker_count_follows_the_cores_on_cpu() -> None:
    from service.config import Settings
    from service.supervisor import MAX_AUTO_WORKERS, resolve_workers, usable_cpus

    cpus = usable_cpus()
    assert 1 <= cpus <= (os.cpu_count() or 1)
    assert resolve_workers(Settings(provider="cpu")) == min(cpus, MAX_AUTO_WORKERS)
    assert resolve_workers(Settings(provider="cpu", workers=3)) == 3


@pytest.mark.parametrize("server", [(1, {}), (2, {})], indirect=True, ids=["1-worker", "2-workers"])
def test_during_the_drain_new_connections_get_503_not_a_refusal(
        server: tuple[subprocess.Popen[bytes], int], sample_png: bytes) -> None:
    """An upload still arriving when SIGTERM comes is accepted work: while it lasts, the socket
    stays open, probes get 503 and new work 503 + Retry-After + Connection: close."""
    proc, port = server
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 + f"Content-Length: {len(sample_png)}\r\n\r\n".encode() + sample_png[:20])
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    for _ in range(4):  # with 2 workers, whichever worker the kernel picks
        status, payload = get(port, "/health/ready")
        assert status == 503, payload
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/classify", sample_png, {"Content-Type": "image/png"})
        resp = conn.getresponse()
        assert resp.status == 503 and resp.getheader("Retry-After") == "1"
        assert resp.getheader("Connection") == "close"
        assert json.loads(resp.read())["error"]["type"] == "shutting_down"
        conn.close()
    slow.sendall(sample_png[20:])  # the accepted request completes and is answered
    answer = b""
    while b'"results"' not in answer and (chunk := slow.recv(65536)):
        answer += chunk
    slow.close()
    assert answer.startswith(b"HTTP/1.1 200") and b'"predictions"' in answer
    assert proc.wait(30) in (0, -signal.SIGTERM)
    with pytest.raises(ConnectionRefusedError):  # and only then is the socket closed
        get(port, "/health/live")


PR_SET_CHILD_SUBREAPER = 36  # prctl(2)


def _workers_of(supervisor: int) -> list[int]:
    try:
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    except FileNotFoundError:
        return []
    return [int(p) for p in children if b"spawn_main" in _cmdline(int(p))]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().split()[2] != b"Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("moment", ["at spawn", "during warm-up", "serving"])
def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path, moment: str) -> None:
    """SIGKILL of the supervisor (no drain, no signal passed on) at three moments of a worker's
    life: just spawned (before any handler), inside its start-up (loading and warming the photo
    model), and serving. Every worker is gone within 10 s, and the port with them."""
    from tests.conftest import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"PYTHONPATH": str(ROOT), "IMGSERVE_PORT": str(port),
                "IMGSERVE_ACCESS_LOG": "false", "IMGSERVE_MAX_BATCH_SIZE": "64",
                "IMGSERVE_MODEL_PATH": str(ROOT / "models" / "efficientnet_lite0_imagenet.onnx")})
    log_path = tmp_path / "server.log"
    # Orphans go to the nearest ancestor that is a child subreaper, as CI runners and container
    # inits often are, not always to PID 1: this test process is one while the test runs.
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service", "--workers", "2"], cwd=tmp_path,
                                env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while time.monotonic() < deadline:
            workers = _workers_of(proc.pid)
            if moment == "at spawn" and workers:
                break
            if moment == "during warm-up" and len(workers) == 2 and log_path.read_text().count(
                    "Waiting for application startup") == 2:
                break
            if moment == "serving" and len(workers) == 2 and log_path.read_text().count(
                    "inference ") == 2:  # both loaded and warm
                break
            time.sleep(0.001 if moment == "at spawn" else 0.02)
        else:
            raise AssertionError(f"never reached the moment: {log_path.read_text()[-2000:]}")
        if moment == "during warm-up":
            assert "loaded from" not in log_path.read_text()  # still warming up
        workers = _workers_of(proc.pid)
        proc.kill()  # SIGKILL: no drain, no chance to pass a signal on
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_running(w) for w in workers):
            time.sleep(0.05)
        alive = [w for w in workers if _running(w)]
        assert not alive, f"workers {alive} outlived their supervisor"
        with pytest.raises(ConnectionRefusedError):
            get(port, "/health/live")
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:  # ours now, as their subreaper: reap them
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w, 0)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0)
