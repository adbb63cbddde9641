"""Domain exceptions of the service core, each with the HTTP status it maps to.

The core (imaging, model, batcher) raises these; ``service.api.handlers`` turns them into the
one JSON error shape ``{"error": {"type": ..., "message": ...}}``. Nothing here imports a web
framework, so training can share the imaging code that raises them.
"""

from __future__ import annotations


def echo(value: object, limit: int = 80) -> str:
    """A client's value quoted in an error message, cut to ``limit`` characters: a request can
    carry megabytes where a name or a shape is expected, and the answer should not."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ServiceError(Exception):
    """Base class: a client-visible error with a status code and a stable type name."""

    status_code = 500
    type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidImage(ServiceError):
    status_code = 400
    type = "invalid_image"


class InvalidRequest(ServiceError):
    status_code = 400
    type = "invalid_request"


class InvalidParameter(ServiceError):
    """A query parameter that does not parse or is out of range (as FastAPI's validation)."""

    status_code = 422
    type = "invalid_request"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    type = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    status_code = 413
    type = "payload_too_large"


class Overloaded(ServiceError):
    """The queue is full; the client should retry after ``retry_after`` seconds."""

    status_code = 503
    type = "overloaded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelNotReady(ServiceError):
    status_code = 503
    type = "model_not_ready"


class ShuttingDown(ServiceError):
    status_code = 503
    type = "shutting_down"


class DeadlineExceeded(ServiceError):
    status_code = 504
    type = "deadline_exceeded"


class InferenceFailed(ServiceError):
    """The batch holding this request failed in the model; other batches are unaffected."""

    status_code = 500
    type = "inference_failed"


class ClientClosedRequest(ServiceError):
    """The client went away before its request body arrived; nobody is left to answer."""

    status_code = 499
    type = "client_closed_request"


class ModelNotFound(ServiceError):
    status_code = 404
    type = "model_not_found"
