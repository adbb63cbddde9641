"""Service settings: one pydantic-settings class, read once at start-up and passed down.

Every field can be set from the environment as ``IMGSERVE_<FIELD>`` (for example
``IMGSERVE_MAX_BATCH_SIZE=64``); ``python -m service --help`` lists them. No other module reads
``os.environ``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.repository import VersionPolicy

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = REPO_MODELS / "fashion_mnist_seed_cnn.onnx"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGSERVE_", extra="ignore", frozen=True)

    # --- server -----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    model_path: Path = Field(
        DEFAULT_MODEL, description="an ONNX model exported by training, or a model repository "
        "directory (<repo>/<name>/<version>/model.onnx, or <repo>/*.onnx named by their metadata)"
    )
    default_model: str = Field(
        "", description="the model POST /v1/classify uses; empty = the only one in the repository"
    )
    version_policy: str = Field(
        "latest:1", description="versions served per model: latest:N, all, or specific:V1,V2"
    )
    model_poll_s: float = Field(
        0.0, ge=0, description="rescan the repository this often (seconds) and swap in new "
        "versions; 0 = only at start and on SIGHUP"
    )
    required_models: str = Field(
        "", description="comma-separated models that must be ready for /health/ready; empty = "
        "every model found at start"
    )
    log_json: bool = Field(False, description="one JSON object per log line")
    log_level: str = Field("info", description="debug, info, warning or error")
    access_log: bool = Field(True, description="one structured line per request")
    workers: int = Field(
        0, ge=0, le=64, description="server processes, each with its own model sessions and "
        "batcher; 0 = one per usable CPU core (at most 8), with or without a GPU"
    )
    metrics_dir: Path | None = Field(
        None, description="directory for multi-process Prometheus metrics (workers > 1); "
        "a temporary one when unset"
    )
    graceful_timeout_s: float = Field(
        30.0, gt=0, description="on SIGTERM, how long accepted requests may take to finish"
    )

    # --- execution ----------------------------------------------------------------------------
    provider: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto uses CUDA when usable and faster for the model (a full batch "
        "timed on each at start), CPU otherwise"
    )
    device_id: int = Field(0, ge=0, description="CUDA device index")
    require_gpu: bool = Field(
        False, description="refuse to become ready if the session is not on the GPU"
    )
    intra_op_threads: int = Field(
        1, ge=0, description="ONNX Runtime threads per inference call; 0 = all cores"
    )
    inference_workers: int = Field(
        0, ge=0, le=64, description="batches that may run at the same time in one process; "
        "0 = 1 on CPU, on an accelerator 2 with one worker process (one batch forms while "
        "another computes) and 1 with several (the processes overlap)"
    )
    inference_inline: Literal["auto", "on", "off"] = Field(
        "auto", description="run batches on the event loop's thread, with no hand-off to an "
        "inference thread; auto = on CPU, with one inference worker and warm-up on, when a full "
        "warm batch takes under inline_max_batch_ms"
    )
    inline_max_batch_ms: float = Field(
        10.0, ge=0, description="auto inline inference: the longest a full warm batch may take"
    )
    decode_threads: int = Field(
        0, ge=0, description="image decode threads per worker process; 0 = the usable cores "
        "shared out over the workers (at least 1)"
    )
    inline_decode_max_pixels: int = Field(
        16384, ge=0, description="images of at most this many pixels (from the header) are "
        "decoded on the event loop, larger ones in the decode threads"
    )
    inline_decode_max_jpeg_pixels: int = Field(
        786432, ge=0, description="the same for JPEGs, which decode at a reduced scale for a "
        "small model: a 1024x768 JPEG takes about 1-2.5 ms, a PNG that size about 20"
    )
    warmup: bool = Field(True, description="run every batch shape once before readiness")

    # --- CUDA execution provider (ignored on CPU) ----------------------------------------------
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "EXHAUSTIVE", description="cuDNN convolution algorithm search; tuned once per bucket"
    )
    cuda_copy_in_default_stream: bool = Field(
        True, description="copy on the compute stream (safer ordering, no extra sync)"
    )
    cuda_arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kSameAsRequested", description="GPU memory arena growth"
    )
    gpu_mem_limit_bytes: int = Field(0, ge=0, description="GPU arena limit in bytes; 0 = none")
    cuda_graphs: bool = Field(
        False, description="capture a CUDA graph per batch bucket (each bucket has its own "
        "session per inference thread)"
    )
    io_binding: bool = Field(
        True, description="with buckets, allocate each bucket's input and output once and "
        "bind them (one copy in, one run, one copy out)"
    )
    tensorrt: bool = Field(False, description="use the TensorRT provider when installed")
    tensorrt_fp16: bool = Field(True, description="let TensorRT use fp16 kernels")
    tensorrt_cache_dir: Path = Field(
        Path("/tmp/imgserve-trt-cache"), description="TensorRT engine cache"
    )

    # --- batching -----------------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=4096, description="images per model call, at most")
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="longest the oldest queued image waits for company"
    )
    batch_buckets: Literal["auto", "on", "off"] = Field(
        "auto", description="pad batches to powers of two (few shapes, each warmed up); "
        "auto = on for GPU providers, off on CPU where padding only costs"
    )
    max_queue_images: int = Field(
        2048, ge=1, description="images waiting at most; beyond, 503 with Retry-After"
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="a request whose images are still being decoded or queued "
        "this long after its body arrived gets 504"
    )

    # --- access -------------------------------------------------------------------------------
    api_keys: SecretStr = Field(
        SecretStr(""), description="comma-separated API keys; when any is set, every route but "
        "the health probes, /metrics and the API docs needs 'Authorization: Bearer <key>'"
    )
    api_keys_file: Path | None = Field(
        None, description="a file of API keys, one per line (a mounted Kubernetes Secret)"
    )
    metrics_require_key: bool = Field(
        False, description="with API keys set, /metrics needs a key too"
    )

    # --- limits -------------------------------------------------------------------------------
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1, description="request body limit (413)")
    max_pixels: int = Field(40_000_000, ge=1, description="pixels per image, from the header")
    max_images_per_request: int = Field(64, ge=1, description="images in one request")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection that has not sent a request's headers this long "
        "after opening (or after the request's first byte) gets 408 and is closed"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body not wholly received this long after its "
        "headers gets 408 and the connection is closed"
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="a connection between requests is closed this long after its "
        "last answer unless a new request has begun (bytes that start no request, such as "
        "blank lines, do not count)"
    )
    max_connections: int = Field(
        1024, ge=1, description="open connections per worker process; beyond, the oldest idle "
        "ones are closed to make room, and if all are busy a request gets 503 with "
        "Retry-After and the connection is closed (the health probes are answered whatever "
        "the count)"
    )
    max_url_bytes: int = Field(
        8192, ge=256, description="request target (path and query) limit; beyond, 414"
    )
    max_header_bytes: int = Field(
        32768, ge=1024, description="request target, header fields and trailer fields of one "
        "request, in bytes; beyond, 431"
    )
    max_header_count: int = Field(
        100, ge=8, description="header and trailer fields of one request; beyond, 431"
    )
    max_inflight_body_bytes: int = Field(
        128 * 1024 * 1024, ge=1, description="request body bytes one worker holds at once over "
        "all its requests; a request that would pass it gets 503 with Retry-After"
    )
    max_decode_pixels_in_flight: int = Field(
        50_000_000, ge=1, description="pixels (after any reduced-scale JPEG decode) one worker "
        "decodes at once in its decode threads; more wait their turn, within the request "
        "deadline. At least max_pixels"
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_decode_pixels_in_flight < self.max_pixels:
            raise ValueError("max_decode_pixels_in_flight must hold at least max_pixels")
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError("max_inflight_body_bytes must hold at least max_body_bytes")
        if self.max_queue_images < self.max_images_per_request:
            raise ValueError("max_queue_images must hold at least max_images_per_request")
        VersionPolicy(self.version_policy)  # raises ValueError with the accepted forms
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"api_keys_file {self.api_keys_file} is not a readable file")
        return self
