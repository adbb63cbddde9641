"""Domain exceptions to HTTP, in one place, with one JSON error shape everywhere:
``{"error": {"type": ..., "message": ...}}``, except under ``/v2/``, where the Open Inference
Protocol's own shape ``{"error": "..."}`` is used. Unexpected errors are 500 with a generic
message; their traceback goes to the log only."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import Overloaded, ServiceError

log = logging.getLogger(__name__)


def error_body(type_: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"type": type_, "message": message}}


def error_payload(path: str, type_: str, message: str) -> dict[str, object]:
    """The error shape of the protocol that ``path`` belongs to."""
    if path.startswith("/v2/"):
        return {"error": message}
    return dict(error_body(type_, message))


def error_response(exc: ServiceError, path: str = "") -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
    if exc.status_code == 503 and headers is None:
        headers = {"Retry-After": "1"}
    return JSONResponse(error_payload(path, exc.type, exc.message), exc.status_code,
                        headers=headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc, request.url.path)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
    return JSONResponse(error_body("invalid_request", "; ".join(parts)), 422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(error_payload(request.url.path, kind, str(exc.detail)), exc.status_code,
                        headers=getattr(exc, "headers", None))


def unexpected_response(request: Request) -> JSONResponse:
    """500 for an exception nobody expected: its traceback goes to the log, not the client."""
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_payload(request.url.path, "internal_error",
                                      "internal server error"), 500)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_response(request)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
