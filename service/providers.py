"""Which ONNX Runtime providers a model runs on, and how its sessions are made.

``provider=auto`` uses CUDA when it is usable (:func:`cuda_usable` probes the driver and the
libraries first, so a CPU host falls back quietly) and the model is faster there: at start, a
full batch of the model is timed on each (:func:`choose_providers`). For a small model the CPU
may win, where copying to the device and launching a kernel per layer costs more than computing
it here (not yet measured on a GPU). The choice and its figures go into ``provider_note``
(``GET /v1/models``).
"""

from __future__ import annotations

import ctypes
import logging
import time
from typing import Any

import numpy as np
import onnxruntime as ort

from service.config import Settings

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROBE_CALLS = 3  # timed calls per provider, after one untimed (the fastest counts)


def provider_name(provider: Any) -> str:
    return str(provider[0] if isinstance(provider, tuple) else provider)


def session_options(settings: Settings, optimize: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    # Spinning workers burn a core per thread between calls without adding throughput.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def cuda_usable() -> tuple[bool, str]:
    """Whether ONNX Runtime's CUDA provider can run here, without letting it try and log errors.

    onnxruntime-gpu lists CUDA as available even with no GPU or no CUDA libraries; creating a
    session then logs an error and falls back. Probing the driver and libraries first keeps the
    CPU fallback quiet.
    """
    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider"
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "no NVIDIA driver (libcuda.so.1 not found)"
    if driver.cuInit(0) != 0:
        return False, "the NVIDIA driver found no usable GPU (cuInit failed)"
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return False, "no CUDA device"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:  # CUDA/cuDNN from the nvidia-* pip packages, when installed
        try:
            preload()
        except Exception as exc:  # pragma: no cover - depends on the host's libraries
            log.debug("onnxruntime.preload_dlls: %s", exc)
    build = getattr(getattr(ort, "capi", None), "build_and_package_info", None)
    major = str(getattr(build, "cuda_version", "") or "13").split(".")[0]
    for lib in (f"libcudart.so.{major}", f"libcublasLt.so.{major}", "libcudnn.so.9"):
        try:
            ctypes.CDLL(lib)
        except OSError:
            return False, f"{lib} not found (CUDA {major} and cuDNN 9 are needed)"
    return True, f"{count.value} CUDA device(s)"


def cuda_chain(settings: Settings) -> list[Any]:
    """The CUDA provider (behind TensorRT when asked for and installed), then the CPU."""
    cuda_options = {
        "device_id": settings.device_id,
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
        "do_copy_in_default_stream": settings.cuda_copy_in_default_stream,
        "arena_extend_strategy": settings.cuda_arena_extend_strategy,
    }
    if settings.gpu_mem_limit_bytes:
        cuda_options["gpu_mem_limit"] = settings.gpu_mem_limit_bytes
    chain: list[Any] = [(CUDA, cuda_options), CPU]
    if settings.tensorrt and TENSORRT in ort.get_available_providers():
        settings.tensorrt_cache_dir.mkdir(parents=True, exist_ok=True)
        chain.insert(0, (TENSORRT, {
            "device_id": settings.device_id,
            "trt_fp16_enable": settings.tensorrt_fp16,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(settings.tensorrt_cache_dir),
        }))
    return chain


def choose_providers(settings: Settings, model_bytes: bytes) -> tuple[list[Any], str]:
    """The provider chain for a model, and why."""
    if settings.provider == "cpu":
        return [CPU], "CPU forced by settings"
    usable, why = cuda_usable()
    if settings.provider == "cuda":
        return cuda_chain(settings), f"CUDA forced by settings ({why})"
    if not usable:
        return [CPU], f"CUDA not usable: {why}"
    chain = cuda_chain(settings)
    try:
        cpu_s, gpu_s = (time_batch(model_bytes, settings, providers)
                        for providers in ([CPU], chain))
    except Exception as exc:  # the probe failing says nothing against CUDA itself
        log.warning("timing the model on CPU and CUDA failed (%s): using CUDA", exc)
        return chain, f"{why}; the CPU/CUDA timing failed, so CUDA"
    n = settings.max_batch_size
    figures = (f"a batch of {n} took {cpu_s * 1000:.2f} ms on the CPU and "
               f"{gpu_s * 1000:.2f} ms on CUDA")
    if cpu_s <= gpu_s:
        return [CPU], f"auto: CPU, faster for this model ({figures})"
    return chain, f"auto: CUDA, faster for this model ({figures}; {why})"


def time_batch(model_bytes: bytes, settings: Settings, providers: list[Any]) -> float:
    """Seconds for one full batch of float32 inputs in [0, 1] (copies in and out included), the
    fastest of a few calls after one untimed."""
    options = session_options(settings)
    session = ort.InferenceSession(model_bytes, options, providers=providers)
    meta = session.get_inputs()[0]
    shape = (settings.max_batch_size, *(int(d) for d in meta.shape[1:]))
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    session.run(None, {meta.name: x})
    best = float("inf")
    for _ in range(PROBE_CALLS):
        started = time.perf_counter()
        session.run(None, {meta.name: x})
        best = min(best, time.perf_counter() - started)
    return best
