"""The connection protocol with real sockets against a real server process: slow clients get
408 without delaying anyone else, and answers stay whole. (The connection cap, size limits and
the rest of what hostile clients try: test_hostile_clients.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from tests.service.servers import post

LIMITS = {"IMGSERVE_HEADER_TIMEOUT_S": "1", "IMGSERVE_BODY_TIMEOUT_S": "1",
          "IMGSERVE_MAX_CONNECTIONS": "20"}


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize("server", [(1, LIMITS)], indirect=True)
def test_slow_headers_get_408_and_others_are_served_meanwhile(
        server: tuple[subprocess.Popen[bytes], int], sample_png: bytes) -> None:
    _, port = server
    silent = connect(port)  # sends nothing at all
    trickle = connect(port)  # sends its headers a byte at a time
    started = time.monotonic()
    request = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    for i, byte in enumerate(request):
        trickle.sendall(bytes([byte]))
        if i % 8 == 0:  # meanwhile, other clients are answered at once
            status, _ = post(port, sample_png, "image/png", timeout=5)
            assert status == 200
        time.sleep(0.02)
        if time.monotonic() - started > 0.8:  # still short of its headers at the deadline
            break
    for sock in (silent, trickle):
        status, headers, body = read_response(sock)
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(body)["error"]["type"] == "request_timeout"
        sock.close()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("server", [(1, LIMITS)], indirect=True)
def test_a_slow_body_gets_408(server: tuple[subprocess.Popen[bytes], int],
                              sample_png: bytes) -> None:
    _, port = server
    sock = connect(port)
    sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 + f"Content-Length: {len(sample_png)}\r\n\r\n".encode() + sample_png[:10])
    status, headers, body = read_response(sock)
    sock.close()
    assert status == 408 and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["type"] == "request_timeout" and "10 bytes" in error["message"]


def test_keep_alive_answers_arrive_whole_in_order(shared_server: int, sample_png: bytes) -> None:
    """Writes joined per response must still give every request on a connection its answer."""
    sock = connect(shared_server)
    request = (b"POST /v1/classify?top_k=1 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
               + f"Content-Length: {len(sample_png)}\r\n\r\n".encode() + sample_png)
    sock.sendall(request * 5 + b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert data.count(b"HTTP/1.1 200 OK") == 6
    assert data.count(b'"label":"') == 5 and data.endswith(b'{"status":"ok"}')
