"""The HTTP/1.1 connection protocol: uvicorn's httptools protocol with three changes.

- One write per response: uvicorn writes the status line and headers, then the body, as two
  socket writes (two packets on loopback). Writes made during one turn of the event loop are
  joined and written at the end of it, which for a small JSON answer halves the syscalls.
- Deadlines for a request's headers and body: a connection that has not sent a request's
  headers within ``header_timeout_s`` of opening (or of the request's first byte), or its body
  within ``body_timeout_s`` of the headers, gets 408 and is closed, so a client sending a byte
  at a time cannot hold a connection. A timer runs only while a request is incomplete.
- A cap on open connections per worker: past ``max_connections``, a request gets 503 with
  ``Retry-After`` and the connection is closed, before any work is done for it.

Errors written here use the service's JSON error shape; they are written as bytes, since no
ASGI application runs for them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.api.handlers import error_body


def raw_error(status: str, type_: str, message: str, extra: bytes = b"") -> bytes:
    """A complete HTTP/1.1 error response that closes the connection."""
    body = json.dumps(error_body(type_, message)).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n").encode() + extra + \
        b"\r\n" + body


class _OneWritePerTurn:
    """A transport whose writes within one turn of the loop go out as one write."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)  # at the latest at the end of this turn
        else:
            self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class Protocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024

    # What the connection waits for ("headers" or "body", None between requests) and since when.
    # The deadline's timer is armed only when a read ends with the request still incomplete, so
    # a request that arrives in one read (almost all of them) costs no timer at all.
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting: str | None = None
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._body_bytes = 0
        self._over_cap = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_OneWritePerTurn(transport, self.loop))  # type: ignore[arg-type]
        self._over_cap = len(self.connections) > self.max_connections
        self._wait_for("headers")
        self._arm_timer()  # a connection that never sends a byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._wait_for(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting is not None and self._timer is None and not self.transport.is_closing():
            self._arm_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._waiting is None:
            self._wait_for("headers")

    def on_headers_complete(self) -> None:
        if self._over_cap:
            self._wait_for(None)
            self._refuse(raw_error(
                "503 Service Unavailable", "overloaded",
                f"this worker has {len(self.connections)} open connections (limit "
                f"{self.max_connections}); retry shortly", b"retry-after: 1\r\n"))
            return
        self._body_bytes = 0
        self._wait_for("body")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._wait_for(None)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.transport.flush()  # type: ignore[attr-defined]  # the answer is whole: send it now
        super().on_response_complete()

    def _wait_for(self, what: str | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting = what
        self._since = self.loop.time()

    def _arm_timer(self) -> None:
        if self._waiting == "headers":
            self._timer = self.loop.call_at(self._since + self.header_timeout_s,
                                            self._header_timeout)
        elif self._waiting == "body":
            self._timer = self.loop.call_at(self._since + self.body_timeout_s,
                                            self._body_timeout)

    def _body_timeout(self) -> None:
        self._timer = None
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # answered already (a refusal); the rest is not wanted
            return
        self._refuse(raw_error("408 Request Timeout", "request_timeout",
                               f"the request body did not arrive within {self.body_timeout_s:g} "
                               f"s ({self._body_bytes} bytes received)"))

    def _header_timeout(self) -> None:
        self._timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered; its own deadlines apply
        self._refuse(raw_error("408 Request Timeout", "request_timeout",
                               f"the request headers did not arrive within "
                               f"{self.header_timeout_s:g} s"))

    def _refuse(self, response: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


def protocol_class(header_timeout_s: float, body_timeout_s: float,
                   max_connections: int) -> type[Protocol]:
    """The protocol with these limits, for ``uvicorn.Config(http=...)``."""
    return type("ServiceProtocol", (Protocol,), {"header_timeout_s": header_timeout_s,
                                                 "body_timeout_s": body_timeout_s,
                                                 "max_connections": max_connections})
