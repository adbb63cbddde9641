"""The application factory: ``create_app(settings)``. Nothing heavy happens at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from service import __version__
from service.api import handlers
from service.api.front import DirectRoute, Front
from service.api.openapi import with_runtime_values
from service.api.routes import classify, explain, health, models, page, v2
from service.auth import ApiKeys
from service.config import Settings
from service.logs import AccessLog
from service.runtime import ClassifierFactory, Runtime, load_onnx

DESCRIPTION = """Image classification with ONNX Runtime and dynamic batching.

POST an image to `/v1/classify` and get labels with scores back. The Open Inference Protocol
(KServe V2) is served under `/v2`. Errors share one shape: `{"error": {"type", "message"}}`.
"""


def create_app(settings: Settings | None = None, factory: ClassifierFactory = load_onnx,
               runtime: Runtime | None = None, load_before_serving: bool = False) -> FastAPI:
    """Build the app; the lifespan loads and warms the model and starts the batcher, and on exit
    drains it. The load runs in the background, so liveness answers meanwhile, unless
    ``load_before_serving``: then the server listens only once the model is ready (a worker
    process sharing a socket with ready ones must not take connections before it is)."""
    settings = settings or Settings()
    runtime = runtime or Runtime(settings, factory)
    access_log = AccessLog(settings.log_json) if settings.access_log else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        if load_before_serving:
            await runtime.wait_loaded()
        try:
            yield
        finally:
            await runtime.stop()
            if access_log is not None:
                access_log.flush()

    keys = ApiKeys.from_settings(settings)
    app = ImgServe(runtime, [*classify.DIRECT, *v2.DIRECT], access_log, keys,
                   title="imgserve", version=__version__, description=DESCRIPTION,
                   lifespan=lifespan)
    app.state.runtime = runtime
    app.state.keys = keys
    handlers.install(app)
    for module in (classify, explain, models, health, v2, page):
        app.include_router(module.router)
    return app


class ImgServe(FastAPI):
    """FastAPI whose entry point is :class:`service.api.front.Front`: the inference routes are
    served there, everything else goes on to FastAPI."""

    def __init__(self, runtime: Runtime, direct: list[DirectRoute],
                 access_log: AccessLog | None, keys: ApiKeys | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._front = Front(super().__call__, runtime, direct, access_log, keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._front(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """The API description; the served models' names, versions and labels are filled in
        only when no API key is required, since the description is open to everyone."""
        if self._front.keys is not None:
            return super().openapi()
        return with_runtime_values(super().openapi(), self._front.runtime)
