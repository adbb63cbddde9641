"""A real server process for tests, and plain HTTP helpers to talk to it."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def post(port: int, body: bytes, content_type: str, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/classify", body, {"Content-Type": content_type,
                                                    "Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60,
               probe: str = "/health/ready") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited before becoming ready"
        try:
            if get(port, probe)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{probe} did not answer 200")


@contextmanager
def running_server_cmd(cmd: list[str], cwd: Path, env_extra: dict[str, str],
                       probe: str = "/health/ready"
                       ) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run a server command on a free port (``IMGSERVE_PORT``) from ``cwd`` until ``probe``
    answers 200; its log (``cwd/server.log``) is printed at the end (pytest shows it when a
    test fails)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"IMGSERVE_ACCESS_LOG": "false", "IMGSERVE_PORT": str(port), **env_extra})
    log_path = cwd / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=log)
        try:
            wait_ready(port, proc, probe=probe)
            yield proc, port
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    print(log_path.read_text()[-4000:])


@contextmanager
def running_server(model: Path, cwd: Path, workers: int, env_extra: dict[str, str],
                   probe: str = "/health/ready"
                   ) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``python -m service`` from this checkout, serving ``model`` (a file or a repository)."""
    cmd = [sys.executable, "-m", "service", "--model", str(model), "--workers", str(workers)]
    with running_server_cmd(cmd, cwd, {"PYTHONPATH": str(ROOT), **env_extra},
                            probe) as running:
        yield running
