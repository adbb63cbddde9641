"""Response models for /v1: they document the API (OpenAPI at /docs); handlers build the same
shapes directly to keep validation off the hot path."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    type: str = Field(examples=["invalid_image"])
    message: str = Field(examples=["cannot decode the image: image file is truncated"])


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Prediction(BaseModel):
    label: str = Field(examples=["Sneaker"])
    index: int = Field(examples=[7])
    score: float = Field(examples=[0.97])


class ImageResult(BaseModel):
    filename: str | None = Field(None, examples=["shoe.png"])
    predictions: list[Prediction] | None = None
    error: ErrorDetail | None = None


class ModelRef(BaseModel):
    name: str = Field(examples=["seed_cnn"])
    version: str = Field(examples=["1"])


class ClassifyResponse(BaseModel):
    model: ModelRef
    results: list[ImageResult]


class OcclusionMap(BaseModel):
    patch: int = Field(examples=[4], description="occluder side, in model-input pixels")
    stride: int = Field(examples=[2], description="step between occluder positions, pixels")
    rows: int
    cols: int
    model_calls: int = Field(examples=[170], description="images run for this explanation")
    occluder: str = Field(examples=["background"], description="what replaced a covered "
                          "patch: background (the image's border colour), blur or mean")
    fill: list[float] | None = Field(description="the occluder's value per channel, in [0, 1]; "
                                     "null for blur, which replaces a patch with the image "
                                     "blurred")
    drop: list[list[float]] = Field(description="rows x cols: the target's probability on the "
                                    "image minus with that cell covered; negative where "
                                    "covering it raises the probability")


class Explanation(BaseModel):
    filename: str | None = None
    predictions: list[Prediction] | None = None
    target: Prediction | None = None
    occlusion: OcclusionMap | None = None
    heatmap_png: str | None = Field(None, description="base64 PNG: the map over the input")
    error: ErrorDetail | None = None


class ExplainResponse(BaseModel):
    model: ModelRef
    results: list[Explanation]


class Preprocessing(BaseModel):
    height: int
    width: int
    channels: int
    color_mode: str
    interpolation: str
    normalization: str
    mean: list[float]
    std: list[float]
    input_scale: str
    resize: str = Field(examples=["center_crop"])
    crop_fraction: float = Field(examples=[0.875])


class Batching(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    max_queue_images: int
    inference_workers: int
    buckets: list[int]
    request_timeout_s: float


class ModelInfo(BaseModel):
    name: str
    version: str
    state: Literal["loading", "ready", "failed", "unloading", "unavailable"]
    reason: str = Field("", description="why a version is not ready (failed, unavailable)")
    default: bool = Field(False, description="POST /v1/classify uses this model")
    path: str | None = None
    note: str = Field("", description="e.g. the file's metadata names another model")
    labels: list[str] | None = None
    input_shape: list[int] | None = None
    color_mode: str | None = None
    preprocessing: Preprocessing | None = None
    provider: str | None = None
    provider_note: str | None = None
    sha256: str | None = None
    dataset: str | None = None
    test_accuracy: float | None = None
    calibration: dict[str, Any] | None = Field(None, description=(
        "temperature scaling folded into the graph: the temperature, and the expected "
        "calibration error (15 bins) before and after on validation and test; null for a raw "
        "softmax"))
    variant: dict[str, Any] | None = Field(None, description=(
        "a smaller variant (int8 or fp16) and its accuracy measured against fp32; null for "
        "the fp32 model"))
    loaded_at: float | None = Field(None, description="Unix time the version became ready")
    batching: Batching | None = None


class ModelsResponse(BaseModel):
    repository: str
    version_policy: str
    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: str = Field(examples=["ok"])
    reason: str | None = None
