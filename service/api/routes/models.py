"""GET /v1/models: every model and version in the repository, with its state; for loaded ones,
how it preprocesses, where it runs and how it batches."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter

from service.api.deps import RuntimeDep
from service.api.schemas import ModelsResponse
from service.model_set import Row
from service.runtime import Runtime

router = APIRouter(tags=["models"])


def _row(row: Row, runtime: Runtime, default: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": row.name, "version": row.version, "state": row.state.value,
                           "reason": row.reason, "default": row.name == default,
                           "path": str(row.path), "note": row.note}
    v = row.loaded
    if v is None or v.metadata is None or v.classifier is None:
        return out
    meta, classifier, s = v.metadata, v.classifier, runtime.settings
    out.update({
        "labels": list(meta.labels),
        "input_shape": list(meta.input_shape),
        "color_mode": meta.spec.color_mode,
        "preprocessing": json.loads(meta.spec.to_json()),
        "provider": classifier.provider,
        "provider_note": classifier.provider_note,
        "sha256": meta.sha256,
        "dataset": meta.dataset,
        "test_accuracy": meta.test_accuracy,
        "calibration": meta.calibration,
        "variant": meta.variant,
        "loaded_at": v.loaded_at,
        "batching": {
            "max_batch_size": s.max_batch_size,
            "max_wait_ms": s.max_wait_ms,
            "max_queue_images": s.max_queue_images,
            "inference_workers": v.batcher.workers if v.batcher else s.inference_workers,
            "buckets": getattr(classifier, "buckets", []),
            "request_timeout_s": s.request_timeout_s,
        },
    })
    return out


@router.get("/v1/models", response_model=ModelsResponse,
            summary="Every model and version, with its state")
async def models(runtime: RuntimeDep) -> ModelsResponse:
    ms = runtime.models
    default = ms.default_name
    return ModelsResponse.model_validate({
        "repository": str(runtime.settings.model_path),
        "version_policy": str(ms.policy),
        "models": [_row(r, runtime, default) for r in ms.listing()],
    })
