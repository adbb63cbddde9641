"""The HTTP/1.1 connection protocol: uvicorn's httptools protocol, bounded in every byte, second
and connection a client can make a worker hold.

- One write per response: writes made during one turn of the event loop are joined and written
  at the end of it (uvicorn writes the head and the body separately), which for a small JSON
  answer halves the syscalls.
- Deadlines. A connection has ``header_timeout_s`` from opening (or from a request's first byte)
  to send a request's headers, and ``body_timeout_s`` from the headers to send its body, else it
  gets 408 and is closed. Between requests it has ``keep_alive_s`` from the last response to
  begin the next one, whatever bytes the parser skips meanwhile (a CRLF between requests starts
  no request, so it must not restart the clock), else it is closed. A timer runs only while one
  of these is pending and the request did not arrive in one read.
- Size. A URL over ``max_url_bytes`` gets 414; a request line and header fields over
  ``max_header_bytes`` in all, or over ``max_header_count`` fields, get 431; trailer fields of a
  chunked body count in the same budget and are not added to the request's headers. What the
  parser buffers between reads (a field not yet ended) is bounded by the same budget.
- Connections. Past ``max_connections`` open connections, the oldest idle ones (between
  requests, or opened and silent) are closed to make room, as nginx reuses keep-alive
  connections; if every connection is busy, a request gets 503 with ``Retry-After`` and the
  connection is closed before any work is done for it, except the health probes, which are
  answered whatever the count, so that a flood of connections cannot make a worker look dead.
- A final response that goes out before the request's body was read (an early 401, 404 or 413,
  or an ``Expect: 100-continue`` that was refused) carries ``Connection: close`` and the
  connection is closed, so that an unread body is never taken for the next request.
- Malformed requests get the service's JSON error shape (400), not uvicorn's plain text, and
  are not logged above debug level: a client must not be able to fill the log. So do what
  llhttp accepts but RFC 9112 refuses: an HTTP/1.1 request without Host (400), a request line
  without a version (505), a transfer coding other than chunked (501).

Errors written here use the error shape of the path's protocol; they are written as bytes,
since no ASGI application runs for them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.api.handlers import error_payload

log = logging.getLogger(__name__)

# Requests answered past the connection cap: they cost microseconds, and a worker whose probes
# time out gets restarted, which helps nobody.
PROBES = frozenset({b"/health/live", b"/health/ready", b"/v2/health/live", b"/v2/health/ready"})
CHUNK_FRAMING_BYTES = 32  # allowed per chunk of a chunked body (size line and CRLFs)
LINGER_S = 2.0  # after an answer that left a body unread, how long the rest is read and dropped
_REASONS = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long",
            431: "Request Header Fields Too Large", 501: "Not Implemented",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 1024
    max_url_bytes: int = 8192
    max_header_bytes: int = 32768
    max_header_count: int = 100


def raw_error(status: int, type_: str, message: str, path: bytes = b"",
              extra: bytes = b"") -> bytes:
    """A complete HTTP/1.1 error response, in the shape of ``path``'s protocol, that closes the
    connection."""
    body = json.dumps(error_payload(path.decode("latin-1"), type_, message)).encode()
    return (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n").encode() + extra + b"\r\n" + body


class Refusal(Exception):
    """Raised in a parser callback: stop parsing, answer with this error and close."""

    def __init__(self, status: int, type_: str, message: str, extra: bytes = b"") -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.extra = status, type_, message, extra


class _OneWritePerTurn:
    """A transport whose writes within one turn of the loop go out as one write; writes after
    it began closing are dropped (an error written here has already ended the exchange).

    With ``linger_s`` set, closing sends the answer and a FIN but reads (and drops) what the
    client still sends for up to that long: closing a socket with unread data makes the kernel
    send a reset, and a client still sending a refused body might then never read the answer.
    """

    __slots__ = ("_closing", "_loop", "_pending", "_transport", "linger_s")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None
        self._closing = False
        self.linger_s = 0.0

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)  # at the latest at the end of this turn
        else:
            self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        if self.is_closing():
            return
        self._closing = True
        if self.linger_s and self._transport.can_write_eof():
            self._transport.write_eof()
            self._transport.resume_reading()
            self._loop.call_later(self.linger_s, self._transport.close)
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class Protocol(HttpToolsProtocol):
    limits: ClassVar[Limits] = Limits()
    # This server's connections that may be closed to make room, oldest first: idle between
    # requests, or opened and silent. (A dict keeps insertion order; values are unused.)
    evictable: ClassVar[dict[Protocol, None]] = {}
    evicted: ClassVar[int] = 0  # closed to make room, their connection_lost still to come

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # What the connection waits for: "headers", "body", "idle" (between requests) or None
        # (a request is whole and being answered); and since when.
        self._waiting: str | None = None
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._body_bytes = 0
        self._head_bytes = 0  # this request's URL, header and trailer fields
        self._fields = 0
        self._host = False
        self._codings = b""  # Transfer-Encoding
        self._chunks = 0
        # Bytes read since the last whole request that were not body: the head, chunk framing,
        # trailers, and whatever the parser holds in a field that has not ended yet.
        self._unparsed = 0
        self._keep_alive_after_body = False
        self._evicted = False
        self._broken = False  # a parse error: the rest of what arrives is ignored

    # --- the connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_OneWritePerTurn(transport, self.loop))  # type: ignore[arg-type]
        self._wait_for("headers")
        self.evictable[self] = None  # silent so far
        self._arm_timer()  # a connection that never sends a byte
        self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._wait_for(None)
        self.evictable.pop(self, None)
        if self._evicted:
            type(self).evicted -= 1
        super().connection_lost(exc)

    def _open_connections(self) -> int:
        return len(self.connections) - self.evicted

    def _make_room(self) -> None:
        """Close the oldest idle connections while more than ``max_connections`` are open."""
        cls = type(self)
        while self._open_connections() > self.limits.max_connections and self.evictable:
            victim = next(iter(self.evictable))
            if victim is self:
                break  # only ourselves left to close: stay, and refuse at the request
            del self.evictable[victim]
            victim._evicted = True
            cls.evicted += 1
            victim._wait_for(None)
            victim.transport.close()

    def shutdown(self) -> None:
        self._keep_alive_after_body = False  # uvicorn's drain closes after the answer
        super().shutdown()

    # --- reading ---------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._broken or self.transport.is_closing():
            return  # closing (maybe lingering): what still arrives is dropped
        if self._waiting == "headers":
            self.evictable.pop(self, None)  # no longer silent
        self._unparsed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, Refusal):
                self._refuse(exc.__context__)
            else:
                self._bad_request(str(exc.__context__ or exc))
            return
        except httptools.HttpParserUpgrade:
            pass  # no protocol to upgrade to (websockets are off): served as plain HTTP
        except httptools.HttpParserError as exc:
            self._bad_request(str(exc))
            return
        budget = self.limits.max_header_bytes + CHUNK_FRAMING_BYTES * self._chunks
        if self._unparsed > budget:
            self._refuse(Refusal(431, "header_fields_too_large",
                                 f"the request's header or trailer fields exceed "
                                 f"{self.limits.max_header_bytes} bytes"))
            return
        if self._waiting in ("headers", "body") and self._timer is None \
                and not self.transport.is_closing():
            self._arm_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.evictable.pop(self, None)
        self._head_bytes = self._fields = self._chunks = 0
        self._host = False
        self._codings = b""
        if self._waiting in (None, "idle"):
            self._wait_for("headers")

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            raise Refusal(414, "uri_too_long",
                          f"the request target exceeds {self.limits.max_url_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._fields > self.limits.max_header_count:
            raise Refusal(431, "header_fields_too_large",
                          f"the request has more than {self.limits.max_header_count} header "
                          "and trailer fields")
        if self._head_bytes + len(self.url) > self.limits.max_header_bytes:
            raise Refusal(431, "header_fields_too_large",
                          f"the request's header and trailer fields exceed "
                          f"{self.limits.max_header_bytes} bytes")
        if self._waiting == "body":
            return  # a trailer field: counted, but not one of the request's headers
        lower = name.lower()
        if lower == b"host":
            self._host = True
        elif lower == b"transfer-encoding":
            self._codings += b"," + value
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._check_framing()
        if self._open_connections() > self.limits.max_connections and not self._is_probe():
            raise Refusal(503, "overloaded",
                          f"this worker has {self._open_connections()} open connections "
                          f"(limit {self.limits.max_connections}); retry shortly",
                          b"retry-after: 1\r\n")
        self._body_bytes = 0
        self._wait_for("body")
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.keep_alive:
            # Until the body is whole, an answer closes the connection: an unread body must not
            # be read as the next request. Restored in on_message_complete.
            self.cycle.keep_alive = False
            self._keep_alive_after_body = True
            self._linger(LINGER_S)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        self._unparsed -= len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._wait_for(None)
        self._unparsed = 0
        self._linger(0.0)
        if self._keep_alive_after_body and self.cycle is not None \
                and not self.cycle.response_started:
            self.cycle.keep_alive = True
        self._keep_alive_after_body = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.transport.flush()  # type: ignore[attr-defined]  # the answer is whole: send it now
        super().on_response_complete()
        if self.transport.is_closing():
            return
        # uvicorn arms its keep-alive timer when nothing more is queued; any byte cancels it. Ours
        # replaces it, and only a request's first byte ends it.
        idle = self.timeout_keep_alive_task is not None
        self._unset_keepalive_if_required()
        if idle and self._waiting is None:
            self._wait_for("idle")
            self.evictable[self] = None
            self._arm_timer()
        elif self._waiting in ("headers", "body") and self._timer is None:
            self._arm_timer()  # the next request began while this one was answered

    # --- deadlines ---------------------------------------------------------------------------
    def _wait_for(self, what: str | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting = what
        self._since = self.loop.time()

    def _arm_timer(self) -> None:
        limits = self.limits
        timeout = {"headers": limits.header_timeout_s, "body": limits.body_timeout_s,
                   "idle": limits.keep_alive_s}.get(self._waiting or "")
        if timeout is not None:
            self._timer = self.loop.call_at(self._since + timeout, self._deadline)

    def _deadline(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._waiting == "idle":
            self.transport.close()
        elif self._waiting == "body":
            if self.cycle is not None and self.cycle.response_started:
                self.transport.close()  # answered already (a refusal); the rest is not wanted
                return
            self._refuse(Refusal(408, "request_timeout",
                                 f"the request body did not arrive within "
                                 f"{self.limits.body_timeout_s:g} s ({self._body_bytes} bytes "
                                 "received)"))
        elif self._waiting == "headers":
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered: re-armed when it is
            self._refuse(Refusal(408, "request_timeout",
                                 f"the request headers did not arrive within "
                                 f"{self.limits.header_timeout_s:g} s"))

    def _check_framing(self) -> None:
        """What llhttp lets through but RFC 9112 refuses: a version other than 1.0 and 1.1 (an
        HTTP/0.9 request line), an HTTP/1.1 request without Host, and a transfer coding other
        than chunked (the body would be taken as unencoded)."""
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise Refusal(505, "http_version_not_supported",
                          f"HTTP/{version} is not supported; use HTTP/1.1")
        if version == "1.1" and not self._host:
            raise Refusal(400, "invalid_request", "an HTTP/1.1 request needs a Host header")
        codings = [c.strip().lower() for c in self._codings.split(b",") if c.strip()]
        if any(c != b"chunked" for c in codings):
            raise Refusal(501, "not_implemented",
                          "only the chunked transfer coding is supported")

    # --- refusing ------------------------------------------------------------------------------
    def _is_probe(self) -> bool:
        return (self.parser.get_method() in (b"GET", b"HEAD")
                and self.url.partition(b"?")[0] in PROBES)

    def _linger(self, seconds: float) -> None:
        self.transport.linger_s = seconds  # type: ignore[attr-defined]

    def _refuse(self, refusal: Refusal) -> None:
        """Answer with ``refusal`` (unless an answer already began) and close."""
        self._wait_for(None)
        self._broken = True
        self._linger(LINGER_S)
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the application is not answered any more
                cycle.message_event.set()
            path = getattr(self, "url", b"") or b""
            self.transport.write(raw_error(refusal.status, refusal.type, refusal.message,
                                           path, refusal.extra))
        self.transport.close()

    def _bad_request(self, reason: str) -> None:
        log.debug("malformed request: %s", reason)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # Garbage after a whole request: answer that request, then close, reading nothing
            # more.
            self._broken = True
            self._keep_alive_after_body = False
            cycle.keep_alive = False
            self._wait_for(None)
            return
        self._refuse(Refusal(400, "invalid_request", "malformed HTTP request"))

    def send_400_response(self, msg: str) -> None:  # uvicorn's, for errors it detects itself
        self._refuse(Refusal(400, "invalid_request", msg))


def protocol_class(limits: Limits) -> type[Protocol]:
    """The protocol with these limits, for ``uvicorn.Config(http=...)``; each class keeps its own
    registry of idle connections (one per server)."""
    return type("ServiceProtocol", (Protocol,),
                {"limits": limits, "evictable": {}, "evicted": 0})
