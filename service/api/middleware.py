"""One pure-ASGI middleware: refuses new work during shutdown, records request metrics, and
writes one structured access-log line per request."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.handlers import error_payload
from service.runtime import Runtime

access_log = logging.getLogger("service.access")
ALWAYS_OPEN = ("/health/", "/metrics", "/v2/health/")


class RequestObserver:
    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if self.runtime.shutting_down and not path.startswith(ALWAYS_OPEN):
            self.runtime.metrics.rejected.labels("shutting_down").inc()
            body = json.dumps(error_payload(path, "shutting_down",
                                            "the server is shutting down")).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", b"1"),
                (b"connection", b"close"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        start = time.perf_counter()
        status = 500

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            m = self.runtime.metrics
            m.requests.labels(label, f"{status // 100}xx").inc()
            m.request_latency.labels(label).observe(elapsed)
            if self.runtime.settings.access_log:
                state: dict[str, Any] = scope.get("state", {})
                access_log.info("request", extra={"http": {
                    "method": scope["method"], "path": path, "status": status,
                    "images": state.get("images", 0), "batch_size": state.get("batch_size"),
                    "latency_ms": round(elapsed * 1000, 3)}})
