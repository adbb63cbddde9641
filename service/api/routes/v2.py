"""The Open Inference Protocol (KServe V2 REST) beside /v1, on the same model, batcher, limits
and metrics. Errors raised here get the protocol's own shape, ``{"error": "..."}``, from
``service.api.handlers``."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service import __version__
from service.api.body import read_body
from service.api.deps import RuntimeDep
from service.api.front import DirectRoute
from service.errors import ModelNotFound, ServiceError, UnsupportedMediaType
from service.model import ModelMetadata
from service.protocol_v2 import FP32, infer_response, parse_infer, split_body
from service.runtime import Runtime

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])
EXTENSIONS = ["binary_tensor_data", "classification"]
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "wrong input name, shape, datatype or element count; bad image"},
    404: {"description": "unknown model or version"},
    503: {"description": "not ready, queue full (with Retry-After) or shutting down"},
}


def _model(runtime: Runtime, name: str, version: str | None) -> ModelMetadata:
    classifier, _ = runtime.require_ready()
    meta = classifier.metadata
    if name != meta.name:
        raise ModelNotFound(f"unknown model {name!r}; this server serves {meta.name!r}")
    if version is not None and version != meta.version:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; it has "
                            f"{meta.version!r}")
    return meta


@router.get("", summary="Server metadata")
async def server_metadata() -> JSONResponse:
    return JSONResponse({"name": "imgserve", "version": __version__, "extensions": EXTENSIONS})


@router.get("/health/live", summary="Server liveness")
async def server_live() -> JSONResponse:
    return JSONResponse({"live": True})


@router.get("/health/ready", summary="Server readiness", responses=ERRORS)
async def server_ready(runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse({"ready": runtime.ready}, 200 if runtime.ready else 503)


async def _metadata(runtime: Runtime, name: str, version: str | None) -> JSONResponse:
    meta = _model(runtime, name, version)
    return JSONResponse({
        "name": meta.name,
        "versions": [meta.version],
        "platform": "onnx_onnxv1",
        "inputs": [{"name": meta.input_name, "datatype": FP32, "shape": list(meta.input_shape)}],
        "outputs": [{"name": meta.output_name, "datatype": FP32,
                     "shape": [-1, meta.num_classes]}],
    })


@router.get("/models/{name}", summary="Model metadata", responses=ERRORS)
async def model_metadata(name: str, runtime: RuntimeDep) -> JSONResponse:
    return await _metadata(runtime, name, None)


@router.get("/models/{name}/versions/{version}", summary="Model metadata (versioned)",
            responses=ERRORS)
async def model_version_metadata(name: str, version: str, runtime: RuntimeDep) -> JSONResponse:
    return await _metadata(runtime, name, version)


async def _ready(runtime: Runtime, name: str, version: str | None) -> JSONResponse:
    meta = _model(runtime, name, version)
    return JSONResponse({"name": meta.name, "ready": True})


@router.get("/models/{name}/ready", summary="Model readiness", responses=ERRORS)
async def model_ready(name: str, runtime: RuntimeDep) -> JSONResponse:
    return await _ready(runtime, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness (versioned)",
            responses=ERRORS)
async def model_version_ready(name: str, version: str, runtime: RuntimeDep) -> JSONResponse:
    return await _ready(runtime, name, version)


async def handle_infer(request: Request, runtime: Runtime, params: dict[str, str]) -> Response:
    """The infer routes' work; served directly by ``service.api.front``."""
    meta = _model(runtime, params["name"], params.get("version"))
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported")
    s = runtime.settings
    body = await read_body(request, s.max_body_bytes, s.body_timeout_s)
    head, tail = split_body(body, request.headers.get("inference-header-content-length"))
    req = parse_infer(head, tail, meta, s.max_images_per_request)
    if req.tensor is not None:
        probs, batch_size = await runtime.infer(req.tensor)
    else:
        decoded = await runtime.decode(req.images)
        for i, item in enumerate(decoded):
            if isinstance(item, ServiceError):
                item.message = f"image {i}: {item.message}"
                raise item
        good = [d for d in decoded if isinstance(d, np.ndarray)]
        probs, batch_size = await runtime.classify_pixels(good)
    request.state.images = req.batch
    request.state.batch_size = batch_size
    content, header_length = infer_response(req, probs, meta)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})


INFER_DOC = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object"}, "example": {
        "inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                    "data": ["<base64 of a PNG or JPEG file>"]}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}}}


DIRECT = [DirectRoute("POST", "/v2/models/{name}/infer", handle_infer),
          DirectRoute("POST", "/v2/models/{name}/versions/{version}/infer", handle_infer)]


@router.post("/models/{name}/infer", summary="Inference", responses=ERRORS,
             openapi_extra=INFER_DOC)
async def infer(name: str, request: Request, runtime: RuntimeDep) -> Response:
    return await handle_infer(request, runtime, {"name": name})


@router.post("/models/{name}/versions/{version}/infer", summary="Inference (versioned)",
             responses=ERRORS, openapi_extra=INFER_DOC)
async def infer_version(name: str, version: str, request: Request,
                        runtime: RuntimeDep) -> Response:
    return await handle_infer(request, runtime, {"name": name, "version": version})
