"""The running service: the models (``service.model_set``), the decode pool, metrics and
readiness, without HTTP.

Routes of every protocol take a model version with ``with runtime.lease(...) as model:``, and
call :meth:`Runtime.decode` and :meth:`Runtime.infer` with it inside the block; the lifespan calls
:meth:`Runtime.start` and :meth:`Runtime.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.batcher import Batcher
from service.config import Settings
from service.errors import ModelNotReady, ServiceError, ShuttingDown
from service.imaging import Opened, PreprocessSpec, open_image, pixels_of, to_model_input
from service.metrics import FLUSH_INTERVAL_S, Metrics
from service.model import Classifier, OnnxClassifier
from service.model_set import ClassifierFactory, ModelSet, Version

log = logging.getLogger(__name__)

_PENDING = ServiceError("being decoded")  # a placeholder, replaced before decode returns


def load_onnx(settings: Settings) -> Classifier:
    return OnnxClassifier(settings.model_path, settings)


class Runtime:
    def __init__(self, settings: Settings, factory: ClassifierFactory = load_onnx,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(multiprocess_dir=settings.metrics_dir)
        self.models = ModelSet(settings, factory, self.metrics)
        self.shutting_down = False
        self.active_requests = 0  # admitted and not yet answered (kept by service.api.front)
        self.started_at = time.time()
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads or os.cpu_count() or 1,
                                               thread_name_prefix="decode")
        self._loaded = asyncio.Event()
        self._rescan = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None

    # --- readiness ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return not self.shutting_down and self.models.ready()[0]

    @property
    def not_ready_reason(self) -> str:
        return "shutting down" if self.shutting_down else self.models.ready()[1]

    def begin_shutdown(self) -> None:
        """Called on SIGTERM: readiness turns false at once; new requests are refused."""
        if not self.shutting_down:
            log.info("shutdown begun: readiness is now false; draining accepted requests")
        self.shutting_down = True
        self.metrics.ready.set(0)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Read the repository, load and warm its models and start their batchers in the
        background, so liveness answers meanwhile; then rescan every ``model_poll_s`` seconds
        and whenever :meth:`rescan` is called (on SIGHUP)."""
        self._watcher = asyncio.create_task(self._watch(), name="model-repository")
        self._flusher = asyncio.create_task(self._flush_metrics(), name="metrics-flush")

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self.metrics.flush()

    def rescan(self) -> None:
        """Ask for a rescan of the repository now (the SIGHUP handler)."""
        self._rescan.set()

    async def wait_loaded(self) -> None:
        """Until the first scan's models are loaded (or failed)."""
        if self._watcher is not None:
            waiter = asyncio.create_task(self._loaded.wait())
            await asyncio.wait([waiter, self._watcher], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def _watch(self) -> None:
        poll = self.settings.model_poll_s or None
        while True:
            try:
                await self.models.sync()
            except Exception:  # a scan that breaks must not stop the watching
                log.exception("reading the model repository failed")
            self._loaded.set()
            if not self.shutting_down:
                self.metrics.ready.set(1 if self.ready else 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan.wait(), poll)
            self._rescan.clear()

    async def stop(self) -> None:
        self.begin_shutdown()
        tasks = [t for t in (self._watcher, self._flusher) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.models.close()
        self.metrics.flush()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    # --- work ----------------------------------------------------------------------------------
    def lease(self, name: str | None = None, version: str | None = None) -> Version:
        """The model version for an admitted request (the default model's newest unless named),
        leased: use it as ``with runtime.lease(...) as model:``; it is not unloaded until the
        block ends. During the drain readiness is false but batchers still run: requests
        admitted before it began are completed (new ones are refused before they get here, by
        ``service.api.front``)."""
        try:
            return self.models.acquire(name, version)
        except ModelNotReady:
            if self.shutting_down:
                raise ShuttingDown("the server is shutting down") from None
            raise

    def _pixels(self, img: Opened, spec: PreprocessSpec) -> np.ndarray | ServiceError:
        started = time.perf_counter()
        try:
            return pixels_of(img, spec)
        except ServiceError as exc:
            return exc
        finally:
            self.metrics.decode.observe(time.perf_counter() - started)

    async def decode(self, images: Sequence[bytes],
                     model: Version) -> list[np.ndarray | ServiceError]:
        """Decode each image; failures come back in place, not raised.

        Headers are read here, on the event loop (cheap whatever the size). Images of at most
        ``inline_decode_max_pixels`` (JPEGs: ``inline_decode_max_jpeg_pixels``) are decoded here
        too, where a thread hand-off would cost more than the decode; larger ones go to the
        decode pool, so that a big photo never holds the loop."""
        batcher = _batcher(model)
        assert model.metadata is not None  # set whenever a batcher is
        spec = model.metadata.spec
        out: list[np.ndarray | ServiceError] = []
        pool: list[tuple[int, Opened]] = []
        for i, data in enumerate(images):
            try:
                img = open_image(data, self.settings.max_pixels)
            except ServiceError as exc:
                out.append(exc)
                continue
            width, height = img.size
            s = self.settings
            if width * height <= (s.inline_decode_max_jpeg_pixels if img.format == "JPEG"
                                  else s.inline_decode_max_pixels):
                out.append(self._pixels(img, spec))
            else:
                out.append(_PENDING)
                pool.append((i, img))
        if not pool:
            return out
        loop = asyncio.get_running_loop()
        # Announced to the batcher, so a batch forming meanwhile waits for these images; the
        # caller submits them right after, with no await in between.
        batcher.expect(len(pool))
        try:
            done = await asyncio.gather(*(
                loop.run_in_executor(self._decode_pool, self._pixels, img, spec)
                for _, img in pool))
        finally:
            batcher.expected_done(len(pool))
        for (i, _), item in zip(pool, done, strict=True):
            out[i] = item
        return out

    async def infer(self, pixels: np.ndarray, model: Version) -> tuple[np.ndarray, int]:
        """Probabilities for an N×C×H×W float32 batch through the model's batcher."""
        return await _batcher(model).submit(pixels, self.settings.request_timeout_s)

    async def classify_pixels(self, decoded: Sequence[np.ndarray],
                              model: Version) -> tuple[np.ndarray, int]:
        """Probabilities for decoded uint8 images."""
        batch = decoded[0][np.newaxis] if len(decoded) == 1 else np.stack(decoded)  # stack: ~3 us
        return await self.infer(to_model_input(batch), model)


def _batcher(model: Version) -> Batcher:
    """The batcher of a leased version (it runs until the lease is released)."""
    if model.batcher is None:
        raise ModelNotReady(f"model {model.name!r} version {model.version!r} was unloaded")
    return model.batcher
