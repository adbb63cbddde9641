"""The outermost ASGI layer, in front of FastAPI: refuses new work during shutdown, records
request metrics, writes one structured access-log line per request, and serves the inference
routes directly.

FastAPI's request handling (dependency solving, parameter validation, its middleware stack) costs
about 0.1 ms of CPU per request: as much as decoding and classifying a small image. The routes
that carry inference traffic are therefore matched here and call their handlers with a plain
Starlette ``Request``; everything else goes on to FastAPI. The same handlers are declared as
FastAPI routes too, which is where their OpenAPI description (and ``/docs``) comes from, and
errors from either path get the same shapes from ``service.api.handlers``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.handlers import error_payload, error_response, unexpected_response
from service.auth import ApiKeys
from service.errors import ServiceError
from service.logs import AccessLog
from service.runtime import Runtime

ALWAYS_OPEN = ("/health/", "/metrics", "/v2/health/")

Handler = Callable[[Request, Runtime, dict[str, str]], Awaitable[Response]]


@dataclass(frozen=True)
class DirectRoute:
    """An inference route served without FastAPI: ``path`` is its template, as in OpenAPI."""

    method: str
    path: str
    handler: Handler

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path) + "$")


class Front:
    def __init__(self, app: ASGIApp, runtime: Runtime, routes: Sequence[DirectRoute],
                 access_log: AccessLog | None = None, keys: ApiKeys | None = None) -> None:
        self.app = app
        self.runtime = runtime
        self.access_log = access_log
        self.keys = keys
        self._exact = {(r.method, r.path): r for r in routes if "{" not in r.path}
        self._patterns = [(r, r.pattern) for r in routes if "{" in r.path]

    def _match(self, method: str, path: str) -> tuple[DirectRoute | None, dict[str, str]]:
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}
        for route, pattern in self._patterns:
            if route.method == method and (m := pattern.match(path)):
                return route, m.groupdict()
        return None, {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if self.runtime.shutting_down and not path.startswith(ALWAYS_OPEN):
            self.runtime.metrics.rejected.labels("shutting_down").inc()
            await send_error(send, path, 503, "shutting_down", "the server is shutting down",
                             [(b"retry-after", b"1"), (b"connection", b"close")])
            return
        if self.keys is not None and not self.keys.is_open(path) and not self.keys.allows(
                header(scope, b"authorization")):
            self.runtime.metrics.rejected.labels("unauthorized").inc()
            await send_error(send, path, 401, "unauthorized",
                             "this route needs an API key: 'Authorization: Bearer <key>'",
                             [(b"www-authenticate", b'Bearer realm="imgserve"')])
            return
        start = time.perf_counter()
        status = 500

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        bodies = self.runtime.bodies
        held = 0

        async def counted() -> Message:
            """The body's chunks, counted against the worker's budget for request bodies while
            the request lasts (Overloaded, 503, past it)."""
            nonlocal held
            message = await receive()
            n = len(message.get("body", b""))
            if n:
                try:
                    bodies.take(n)
                except ServiceError:
                    self.runtime.metrics.rejected.labels("body_budget").inc()
                    raise
                held += n
            return message

        route, params = self._match(scope["method"], path)
        self.runtime.active_requests += 1
        try:
            if route is None:
                await self.app(scope, counted, observe)
            else:
                await self._direct(route, params, scope, counted, observe)
        finally:
            bodies.give(held)
            self.runtime.active_requests -= 1
            elapsed = time.perf_counter() - start
            label = route.path if route else getattr(scope.get("route"), "path", "unmatched")
            self.runtime.metrics.request_done(label, status, elapsed)
            if self.access_log is not None:
                state: dict[str, Any] = scope.get("state", {})
                self.access_log.request(scope["method"], path, status, state.get("model"),
                                        state.get("images", 0), state.get("batch_size"),
                                        round(elapsed * 1000, 3))

    async def _direct(self, route: DirectRoute, params: dict[str, str], scope: Scope,
                      receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await route.handler(request, self.runtime, params)
        except ServiceError as exc:
            response = error_response(exc, scope["path"])
        except Exception:
            response = unexpected_response(request)
        await response(scope, receive, send)


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def send_error(send: Send, path: str, status: int, type_: str, message: str,
                     headers: list[tuple[bytes, bytes]]) -> None:
    """An error in the path's protocol's shape, sent before any route runs."""
    body = json.dumps(error_payload(path, type_, message)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": body})
