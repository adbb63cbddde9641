"""GET /v1/models: what is loaded, how it preprocesses, where it runs, how it batches."""

from __future__ import annotations

import json

from fastapi import APIRouter

from service.api.deps import RuntimeDep
from service.api.schemas import ModelsResponse

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelsResponse, summary="The loaded model")
async def models(runtime: RuntimeDep) -> ModelsResponse:
    classifier, _ = runtime.require_ready()
    meta = classifier.metadata
    s = runtime.settings
    return ModelsResponse.model_validate({"models": [{
        "name": meta.name,
        "version": meta.version,
        "labels": list(meta.labels),
        "input_shape": list(meta.input_shape),
        "color_mode": meta.spec.color_mode,
        "preprocessing": json.loads(meta.spec.to_json()),
        "provider": classifier.provider,
        "provider_note": classifier.provider_note,
        "sha256": meta.sha256,
        "dataset": meta.dataset,
        "test_accuracy": meta.test_accuracy,
        "batching": {
            "max_batch_size": s.max_batch_size,
            "max_wait_ms": s.max_wait_ms,
            "max_queue_images": s.max_queue_images,
            "inference_workers": runtime.batcher.workers if runtime.batcher else
            s.inference_workers,
            "buckets": getattr(classifier, "buckets", []),
            "request_timeout_s": s.request_timeout_s,
        },
    }]})
