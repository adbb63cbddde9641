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
from service.api.routes.classify import record
from service.errors import ModelNotReady, ServiceError, UnsupportedMediaType, echo
from service.model import ModelMetadata
from service.protocol_v2 import FP32, infer_response, max_arrays, parse_infer, split_body
from service.runtime import Runtime

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])
EXTENSIONS = ["binary_tensor_data", "classification"]
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "wrong input name, shape, datatype or element count; bad image"},
    404: {"description": "unknown model or version"},
    503: {"description": "not ready, queue full (with Retry-After) or shutting down"},
}


def _model(runtime: Runtime, name: str, version: str | None) -> ModelMetadata:
    meta = runtime.models.find(name, version).metadata
    assert meta is not None
    return meta


@router.get("", summary="Server metadata")
async def server_metadata() -> JSONResponse:
    return JSONResponse({"name": "imgserve", "version": __version__, "extensions": EXTENSIONS})


@router.get("/health/live", summary="Server liveness")
@router.head("/health/live", include_in_schema=False)
async def server_live() -> JSONResponse:
    return JSONResponse({"live": True})


@router.get("/health/ready", summary="Server readiness", responses=ERRORS)
@router.head("/health/ready", include_in_schema=False)
async def server_ready(runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse({"ready": runtime.ready}, 200 if runtime.ready else 503)


async def _metadata(runtime: Runtime, name: str, version: str | None) -> JSONResponse:
    meta = _model(runtime, name, version)
    return JSONResponse({
        "name": meta.name,
        "versions": [v.version for v in runtime.models.serving.get(name, ())],
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
    """200 with ready true when the model (version) is served; 503 with ready false while it is
    known but not (loading, failed); 404 for a model or version the server does not know."""
    try:
        _model(runtime, name, version)
    except ModelNotReady:
        return JSONResponse({"name": name, "ready": False}, 503, headers={"Retry-After": "1"})
    return JSONResponse({"name": name, "ready": True})


@router.get("/models/{name}/ready", summary="Model readiness", responses=ERRORS)
async def model_ready(name: str, runtime: RuntimeDep) -> JSONResponse:
    return await _ready(runtime, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness (versioned)",
            responses=ERRORS)
async def model_version_ready(name: str, version: str, runtime: RuntimeDep) -> JSONResponse:
    return await _ready(runtime, name, version)


async def handle_infer(request: Request, runtime: Runtime, params: dict[str, str]) -> Response:
    """The infer routes' work; served directly by ``service.api.front``."""
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {echo(encoding)} is not supported")
    s = runtime.settings
    with runtime.lease(params["name"], params.get("version")) as model:
        meta = model.metadata
        assert meta is not None
        body = await read_body(request, s.max_body_bytes)
        head, tail = split_body(body, request.headers.get("inference-header-content-length"),
                                max_arrays(meta, s.max_images_per_request))
        req = parse_infer(head, tail, meta, s.max_images_per_request)
        deadline = runtime.deadline()
        if req.tensor is not None:
            probs, batch_size = await runtime.infer(req.tensor, model, deadline)
        else:
            decoded = await runtime.decode(req.images, model, deadline)
            for i, item in enumerate(decoded):
                if isinstance(item, ServiceError):
                    item.message = f"image {i}: {item.message}"
                    raise item
            good = [d for d in decoded if isinstance(d, np.ndarray)]
            probs, batch_size = await runtime.classify_pixels(good, model, deadline)
    record(request, req.batch, batch_size, meta)
    content, header_length = infer_response(req, probs, meta)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})


EXAMPLE_PNG_BASE64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNoAAAAggCBd81yt"
                      "gAAAABJRU5ErkJggg==")  # a 1x1 grey PNG: the example runs as it stands
TENSOR = {"type": "object", "required": ["name", "datatype", "shape", "data"], "properties": {
    "name": {"type": "string", "description": "the model's input name"},
    "datatype": {"type": "string", "enum": ["UINT8", "FP32", "BYTES"]},
    "shape": {"type": "array", "minItems": 1, "maxItems": 4,
              "items": {"type": "integer", "minimum": 1, "maximum": 64},
              "description": "UINT8 and FP32: [N, C, H, W] as the model's input; BYTES: [N] "
                             "or [N, 1]"},
    "data": {"type": "array", "minItems": 1,
             "description": "UINT8: pixels 0-255, FP32: values in [0, 1] (pixels / 255), flat "
                            "or nested, N*C*H*W of them; BYTES: "
                            "base64 of an encoded image (PNG, JPEG, ...) per element"},
    "parameters": {"type": "object"},
}}
OUTPUT = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "description": "the model's output name"},
    "parameters": {"type": "object", "properties": {
        "classification": {"type": "integer", "minimum": 0,
                           "description": "return the k best classes as 'score:index:label'"},
        "binary_data": {"type": "boolean"}}},
}}
INFER_REQUEST = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"},
    "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
    "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": TENSOR},
    "outputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": OUTPUT},
}}
INFER_RESPONSE = {"type": "object", "required": ["model_name", "outputs"], "properties": {
    "model_name": {"type": "string"}, "model_version": {"type": "string"},
    "id": {"type": "string"},
    "outputs": {"type": "array", "items": {"type": "object", "required": [
        "name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {"type": "array"}, "parameters": {"type": "object"}}}},
}}
INFER_DOC = {
    "requestBody": {"required": True, "description": (
        "The JSON form is described here. Triton's binary tensor data extension is accepted too: "
        "the same JSON header followed by the raw tensor bytes, with the header's length in "
        "the Inference-Header-Content-Length header."),
        "content": {"application/json": {"schema": INFER_REQUEST, "example": {
            "inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                        "data": [EXAMPLE_PNG_BASE64]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}}}},
    "responses": {"200": {"description": "the output tensor (binary data when asked for)",
                          "content": {"application/json": {"schema": INFER_RESPONSE},
                                      "application/octet-stream": {"schema": {
                                          "type": "string", "format": "binary"}}}}},
}


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
