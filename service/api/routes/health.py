"""Liveness (the process answers) and readiness (model loaded, warmed, batcher running)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import RuntimeDep
from service.api.schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=HealthResponse, summary="Liveness")
async def live() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/health/ready", response_model=HealthResponse, summary="Readiness",
            responses={503: {"model": HealthResponse, "description": "not ready, with why"}})
async def ready(runtime: RuntimeDep) -> JSONResponse:
    if runtime.ready:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable", "reason": runtime.not_ready_reason}, 503,
                        headers={"Retry-After": "1"})


@router.get("/metrics", tags=["metrics"], summary="Prometheus metrics",
            response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.exposition(),
                    headers={"Content-Type": CONTENT_TYPE_LATEST})
