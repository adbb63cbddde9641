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
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.batcher import Batcher
from service.budgets import BodyBudget, PixelBudget
from service.config import Settings
from service.errors import DeadlineExceeded, ModelNotReady, ServiceError, ShuttingDown
from service.imaging import (
    Opened,
    PreprocessSpec,
    decoded_pixels,
    open_image,
    pixels_of,
    progressive,
)
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
        self._decode_pool = ThreadPoolExecutor(decode_threads(settings),
                                               thread_name_prefix="decode")
        self.bodies = BodyBudget(settings.max_inflight_body_bytes)
        self._decoding = PixelBudget(settings.max_decode_pixels_in_flight)
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

    def deadline(self) -> float:
        """The event-loop time by which a request beginning now must be answered (its decoding
        and its wait in the queue both count)."""
        return asyncio.get_running_loop().time() + self.settings.request_timeout_s

    async def decode(self, images: Sequence[bytes], model: Version,
                     deadline: float | None = None) -> list[np.ndarray | ServiceError]:
        """Decode each image; failures come back in place, not raised.

        Headers are read here, on the event loop (cheap whatever the size). Small images are
        decoded here too, where a thread hand-off would cost more than the decode: at most
        ``inline_decode_max_pixels``, or ``inline_decode_max_jpeg_pixels`` for a JPEG that is not
        progressive (a progressive one walks every block once per scan). Larger ones go to the
        decode threads, so that a big image never holds the loop, within the worker's budget of
        pixels in flight and the request's deadline (DeadlineExceeded, 504, past it)."""
        batcher = _batcher(model)
        assert model.metadata is not None  # set whenever a batcher is
        spec = model.metadata.spec
        out: list[np.ndarray | ServiceError] = []
        pool: list[tuple[int, Opened]] = []
        s = self.settings
        for i, data in enumerate(images):
            try:
                img = open_image(data, s.max_pixels)
            except ServiceError as exc:
                out.append(exc)
                continue
            width, height = img.size
            jpeg = img.format == "JPEG" and not progressive(img)
            if width * height <= (s.inline_decode_max_jpeg_pixels if jpeg
                                  else s.inline_decode_max_pixels):
                out.append(self._pixels(img, spec))
            else:
                out.append(_PENDING)
                pool.append((i, img))
        if not pool:
            return out
        loop = asyncio.get_running_loop()
        deadline = self.deadline() if deadline is None else deadline
        # Announced to the batcher, so a batch forming meanwhile waits for these images; the
        # caller submits them right after, with no await in between.
        batcher.expect(len(pool))
        try:
            done = await asyncio.wait_for(
                asyncio.gather(*(self._pooled(img, spec) for _, img in pool)),
                max(0.0, deadline - loop.time()))
        except TimeoutError:
            self.metrics.rejected.labels("deadline").inc()
            raise DeadlineExceeded(f"the images were not decoded within the "
                                   f"{s.request_timeout_s:g} s request deadline") from None
        finally:
            batcher.expected_done(len(pool))
        for (i, _), item in zip(pool, done, strict=True):
            out[i] = item
        return out

    async def _pooled(self, img: Opened, spec: PreprocessSpec) -> np.ndarray | ServiceError:
        """One image decoded in the decode threads, holding its pixels of the worker's budget
        until the thread is done with it (also when the caller gave up waiting)."""
        cost = decoded_pixels(img, spec)
        await self._decoding.acquire(cost)
        loop = asyncio.get_running_loop()
        try:
            job = self._decode_pool.submit(self._pixels, img, spec)
        except BaseException:
            self._decoding.release(cost)
            raise

        def done(_: object) -> None:  # in the decode thread
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to free
                loop.call_soon_threadsafe(self._decoding.release, cost)

        job.add_done_callback(done)
        return await asyncio.wrap_future(job)

    async def infer(self, pixels: np.ndarray, model: Version,
                    deadline: float | None = None) -> tuple[np.ndarray, int]:
        """Probabilities for an N×C×H×W batch (uint8 pixels or float32 in [0, 1]) through the
        model's batcher, within the request's deadline (the whole request timeout from now when
        None)."""
        timeout = self.settings.request_timeout_s
        if deadline is not None:
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        return await _batcher(model).submit(pixels, timeout)

    async def classify_pixels(self, decoded: Sequence[np.ndarray], model: Version,
                              deadline: float | None = None) -> tuple[np.ndarray, int]:
        """Probabilities for decoded uint8 images: they stay uint8 until the model's engine
        (on an accelerator, until they are on the device)."""
        batch = decoded[0][np.newaxis] if len(decoded) == 1 else np.stack(decoded)  # stack: ~3 us
        return await self.infer(batch, model, deadline)


def decode_threads(settings: Settings) -> int:
    """The decode pool's size: the setting, or the usable cores shared out over the worker
    processes (each runs its own pool), at least one."""
    if settings.decode_threads:
        return settings.decode_threads
    from service.supervisor import usable_cpus

    return max(1, usable_cpus() // max(1, settings.workers))


def _batcher(model: Version) -> Batcher:
    """The batcher of a leased version (it runs until the lease is released)."""
    if model.batcher is None:
        raise ModelNotReady(f"model {model.name!r} version {model.version!r} was unloaded")
    return model.batcher
