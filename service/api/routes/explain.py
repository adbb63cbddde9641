"""POST /v1/explain: the top classes of each image and an occlusion map for one of them (see
``service.explain``). Bodies as for /v1/classify; the occluded copies go through the model's
batcher as one submission per request."""

from __future__ import annotations

import copy
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from service.api.body import read_images
from service.api.deps import RuntimeDep
from service.api.handlers import error_body
from service.api.responses import FastJSONResponse
from service.api.routes.classify import (
    BODY_DOC,
    DEFAULT_TOP_K,
    ERRORS,
    NOT_FOUND,
    TopK,
    record,
    top_k,
    usable,
)
from service.api.schemas import ExplainResponse
from service.errors import InvalidParameter, ServiceError
from service.explain import (
    DEFAULT_OCCLUDER,
    MAX_IMAGES,
    OccluderKind,
    Occlusion,
    heatmap_png,
    occluder,
)
from service.imaging import to_model_input
from service.model import ModelMetadata
from service.runtime import Runtime

router = APIRouter(tags=["explanations"])
COST = ("Each image costs one model call per grid position plus one: with the defaults (a patch "
        "of a third of the input's shorter side, moved a third of a patch at a time) 8 x 8 + 1 = "
        "65 for a 28-pixel model and 7 x 7 + 1 = 50 for a 224-pixel one; at most 121 + 1. At "
        "most 8 images per request. The copies share the model's queue with all other traffic: "
        "a full queue answers 503 with Retry-After.")
EXPLAIN_DOC: dict[str, Any] = copy.deepcopy(BODY_DOC)
EXPLAIN_DOC["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["file"][
    "maxItems"] = MAX_IMAGES


def _target(raw: str | None, meta: ModelMetadata) -> int | None:
    """The class asked for, checked before any model call; None: each image's top class."""
    if raw is None:
        return None
    # ASCII digits only: str.isdigit() is true of '²' too, which int() refuses.
    if raw.isascii() and raw.isdigit() and int(raw) < meta.num_classes:
        return int(raw)
    if raw in meta.labels:
        return meta.labels.index(raw)
    raise InvalidParameter(f"target: {raw[:60]!r} is neither a label of model {meta.name!r} "
                           f"nor a class index below {meta.num_classes}")


async def explain(request: Request, runtime: Runtime, name: str | None, k: int,
                  target: str | None, patch: int | None, stride: int | None,
                  heatmap: bool, kind: str = DEFAULT_OCCLUDER) -> JSONResponse:
    s = runtime.settings
    with runtime.lease(name) as model:
        meta = model.metadata
        assert meta is not None
        grid = Occlusion.for_spec(meta.spec, patch, stride)
        wanted = _target(target, meta)
        uploads = await read_images(request, s.max_body_bytes,
                                    min(MAX_IMAGES, s.max_images_per_request))
        deadline = runtime.deadline()
        decoded = await runtime.decode([u.data for u in uploads], model, deadline)
        good = [to_model_input(d) for d in usable(decoded)]
        covers = [occluder(kind, x, meta.spec, grid) for x in good]
        batch = np.concatenate([grid.copies(x, cover) for x, cover in zip(good, covers,
                                                                          strict=True)])
        probs, batch_size = await runtime.infer(batch, model, deadline)
    runtime.metrics.explanation_images.labels(meta.name).inc(len(batch))
    record(request, len(batch), batch_size, meta)
    results: list[dict[str, Any]] = []
    row = 0
    for upload, item in zip(uploads, decoded, strict=True):
        if isinstance(item, ServiceError):
            results.append({"filename": upload.filename, **error_body(item.type, item.message)})
            continue
        p = probs[row * grid.model_calls : (row + 1) * grid.model_calls]
        x, cover = good[row], covers[row]
        row += 1
        t = int(np.argmax(p[0])) if wanted is None else wanted
        drops = grid.drop_map(p, t)
        result: dict[str, Any] = {
            "filename": upload.filename,
            "predictions": top_k(p[0], k, meta.labels),
            "target": {"label": meta.labels[t], "index": t, "score": float(p[0, t])},
            "occlusion": {"patch": grid.patch, "stride": grid.stride, "rows": grid.rows,
                          "cols": grid.cols, "model_calls": grid.model_calls,
                          "occluder": kind,
                          "fill": [round(float(v), 4) for v in cover] if cover.ndim == 1
                          else None,
                          "drop": np.round(drops, 5).tolist()},
        }
        if heatmap:
            result["heatmap_png"] = heatmap_png(x, grid.pixel_map(drops))
        results.append(result)
    return FastJSONResponse({"model": {"name": meta.name, "version": meta.version},
                             "results": results})


Target = Annotated[str | None, Query(max_length=200, description=(
    "the class to explain, by label or index; default: each image's top class"))]
Patch = Annotated[int | None, Query(ge=1, le=4096, description=(
    "occluder side in model-input pixels; default: a third of the shorter side"))]
Stride = Annotated[int | None, Query(ge=1, le=4096, description=(
    "step between occluder positions; default: a third of the patch"))]
Heatmap = Annotated[bool, Query(description="add a PNG of the map over the input (base64)")]
Occluder = Annotated[OccluderKind, Query(alias="occluder", description=(
    "what replaces a covered patch: background (the image's border colour: covering background "
    "changes nothing), blur (the image blurred: for photos with a busy background) or mean "
    "(the normalisation mean, a grey)"))]


@router.post("/v1/explain", response_model=ExplainResponse, responses=ERRORS,
             openapi_extra=EXPLAIN_DOC, description=COST,
             summary="Explain the default model's answer (occlusion map)")
async def explain_default(request: Request, runtime: RuntimeDep, top_k_: TopK = DEFAULT_TOP_K,
                          target: Target = None, patch: Patch = None, stride: Stride = None,
                          heatmap: Heatmap = False,
                          occluder_: Occluder = DEFAULT_OCCLUDER) -> JSONResponse:
    return await explain(request, runtime, None, top_k_, target, patch, stride, heatmap,
                         occluder_)


@router.post("/v1/models/{name}/explain", response_model=ExplainResponse,
             responses={**ERRORS, **NOT_FOUND}, openapi_extra=EXPLAIN_DOC,
             summary="Explain a named model's answer (occlusion map)", description=COST)
async def explain_named(name: str, request: Request, runtime: RuntimeDep,
                        top_k_: TopK = DEFAULT_TOP_K, target: Target = None,
                        patch: Patch = None, stride: Stride = None,
                        heatmap: Heatmap = False,
                        occluder_: Occluder = DEFAULT_OCCLUDER) -> JSONResponse:
    return await explain(request, runtime, name, top_k_, target, patch, stride, heatmap,
                         occluder_)
