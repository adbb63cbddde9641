"""Liveness (the process answers) and readiness (model loaded, warmed, batcher running)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import RuntimeDep
from service.api.schemas import HealthResponse

router = APIRouter(tags=["health"])


# Every route here answers HEAD too (load balancers check with it); the HEAD routes stay out of
# the API description, where they would repeat the GET ones.
@router.get("/health/live", response_model=HealthResponse, summary="Liveness")
@router.head("/health/live", include_in_schema=False)
async def live() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/health/ready", response_model=HealthResponse, summary="Readiness",
            responses={503: {"model": HealthResponse, "description": "not ready, with why"}})
@router.head("/health/ready", include_in_schema=False)
async def ready(request: Request, runtime: RuntimeDep) -> JSONResponse:
    if runtime.ready:
        return JSONResponse({"status": "ok"})
    # The probes are open even when API keys are required: then the reason says no more than
    # that, not which model failed where (paths, ONNX Runtime's errors).
    reason = runtime.not_ready_reason
    if request.app.state.keys is not None and not runtime.shutting_down:
        reason = "not ready"
    return JSONResponse({"status": "unavailable", "reason": reason}, 503,
                        headers={"Retry-After": "1"})


@router.get("/metrics", tags=["metrics"], summary="Prometheus metrics",
            response_class=Response)
@router.head("/metrics", include_in_schema=False)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.exposition(),
                    headers={"Content-Type": CONTENT_TYPE_LATEST})
