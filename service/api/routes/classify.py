"""POST /v1/classify: one raw image body, or several multipart ``file`` fields."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from service.api.body import read_images
from service.api.deps import RuntimeDep
from service.api.front import DirectRoute
from service.api.handlers import error_body
from service.api.responses import FastJSONResponse
from service.api.schemas import ClassifyResponse, ErrorResponse
from service.errors import InvalidParameter, ServiceError
from service.model import ModelMetadata
from service.runtime import Runtime

router = APIRouter(tags=["classification"])
DEFAULT_TOP_K = 5

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in {
        400: "not an image, corrupt image, empty body or missing 'file' field",
        413: "body, pixel count or image count over its limit",
        415: "an image format or Content-Type that is not accepted",
        422: "a query parameter that is not an integer >= 1",
        503: "queue full (with Retry-After), not ready, or shutting down",
        504: "still queued at the request deadline",
    }.items()
}
RAW = {"schema": {"type": "string", "format": "binary", "minLength": 1}}
BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "One image as the raw body (its format is recognised from its bytes; "
                       "no Content-Type or curl's x-www-form-urlencoded are accepted too), or "
                       "multipart fields named `file`.",
        "content": {
            "image/png": RAW,
            "image/jpeg": RAW,
            "application/octet-stream": RAW,
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": {
                "type": "array", "minItems": 1, "maxItems": 64,
                "items": {"type": "string", "format": "binary"}}}}},
        },
    }
}


def top_k(probs: np.ndarray, k: int, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """The k best classes of one probability row, highest first (all of them if k is larger)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i], "index": i, "score": score}  # tolist(): no numpy scalars
            for i, score in zip(order.tolist(), probs[order].tolist(), strict=True)]


def query_top_k(request: Request) -> int:
    """``top_k`` from the query string: an integer >= 1, default 5."""
    raw = request.query_params.get("top_k")
    if raw is None:
        return DEFAULT_TOP_K
    try:
        k = int(raw)
    except ValueError:
        raise InvalidParameter(f"top_k: must be an integer, got {raw[:40]!r}") from None
    if k < 1:
        raise InvalidParameter(f"top_k: must be at least 1, got {k}")
    return k


def usable(decoded: list[np.ndarray | ServiceError]) -> list[np.ndarray]:
    """The images that decoded; when none did, the first one's error is raised."""
    good = [d for d in decoded if isinstance(d, np.ndarray)]
    if not good:
        first = decoded[0]
        assert isinstance(first, ServiceError)
        raise first
    return good


def record(request: Request, images: int, batch_size: int, meta: ModelMetadata) -> None:
    """What the access log tells of an answered request."""
    request.state.images = images
    request.state.batch_size = batch_size
    request.state.model = f"{meta.name}:{meta.version}"


async def handle_classify(request: Request, runtime: Runtime,
                          params: dict[str, str] | None = None) -> JSONResponse:
    """The classify routes' work (the default model, or the one the path names); served
    directly by ``service.api.front``."""
    params = params or {}
    with runtime.lease(params.get("name"), params.get("version")) as model:
        meta = model.metadata
        assert meta is not None
        k = query_top_k(request)
        s = runtime.settings
        uploads = await read_images(request, s.max_body_bytes, s.max_images_per_request)
        deadline = runtime.deadline()
        decoded = await runtime.decode([u.data for u in uploads], model, deadline)
        good = usable(decoded)
        probs, batch_size = await runtime.classify_pixels(good, model, deadline)
    record(request, len(good), batch_size, meta)
    results: list[dict[str, Any]] = []
    row = 0
    for upload, item in zip(uploads, decoded, strict=True):
        if isinstance(item, ServiceError):
            results.append({"filename": upload.filename, **error_body(item.type, item.message)})
        else:
            results.append({"filename": upload.filename,
                            "predictions": top_k(probs[row], k, meta.labels)})
            row += 1
    return FastJSONResponse({"model": {"name": meta.name, "version": meta.version},
                             "results": results})


NAMED = "/v1/models/{name}/classify"
VERSIONED = "/v1/models/{name}/versions/{version}/classify"
DIRECT = [DirectRoute("POST", "/v1/classify", handle_classify),
          DirectRoute("POST", NAMED, handle_classify),
          DirectRoute("POST", VERSIONED, handle_classify)]
TopK = Annotated[int, Query(alias="top_k", ge=1, description=(
    "predictions per image; all classes when the model has fewer"))]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "no such model or served version"}}


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS,
             openapi_extra=BODY_DOC, summary="Classify one or more images (default model)")
async def classify(
    request: Request,
    runtime: RuntimeDep,
    top_k_: TopK = DEFAULT_TOP_K,
) -> JSONResponse:
    return await handle_classify(request, runtime)


@router.post(NAMED, response_model=ClassifyResponse, responses={**ERRORS, **NOT_FOUND},
             openapi_extra=BODY_DOC, summary="Classify with a named model (its newest version)")
async def classify_named(
    name: str,
    request: Request,
    runtime: RuntimeDep,
    top_k_: TopK = DEFAULT_TOP_K,
) -> JSONResponse:
    return await handle_classify(request, runtime, {"name": name})


@router.post(VERSIONED, response_model=ClassifyResponse, responses={**ERRORS, **NOT_FOUND},
             openapi_extra=BODY_DOC, summary="Classify with one version of a model")
async def classify_versioned(
    name: str,
    version: str,
    request: Request,
    runtime: RuntimeDep,
    top_k_: TopK = DEFAULT_TOP_K,
) -> JSONResponse:
    return await handle_classify(request, runtime, {"name": name, "version": version})
