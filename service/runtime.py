"""The running service: model, batcher, decode pool, metrics and readiness, without HTTP.

Routes of every protocol call :meth:`Runtime.decode` and :meth:`Runtime.infer`; the lifespan
calls :meth:`Runtime.start` and :meth:`Runtime.stop`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from service.batcher import Batcher
from service.config import Settings
from service.errors import ModelNotReady, ServiceError
from service.imaging import open_image, pixels_of, to_model_input
from service.metrics import Metrics
from service.model import Classifier, OnnxClassifier

log = logging.getLogger(__name__)

_PENDING = ServiceError("being decoded")  # a placeholder, replaced before decode returns

ClassifierFactory = Callable[[Settings], Classifier]


def load_onnx(settings: Settings) -> Classifier:
    return OnnxClassifier(settings.model_path, settings)


class Runtime:
    def __init__(self, settings: Settings, factory: ClassifierFactory = load_onnx,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(multiprocess_dir=settings.metrics_dir)
        self._factory = factory
        self.classifier: Classifier | None = None
        self.batcher: Batcher | None = None
        self.shutting_down = False
        self.active_requests = 0  # admitted and not yet answered (kept by service.api.front)
        self.not_ready_reason = "the model is loading"
        self.started_at = time.time()
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads or os.cpu_count() or 1,
                                               thread_name_prefix="decode")
        self._loader: asyncio.Task[None] | None = None

    # --- readiness ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return (not self.shutting_down and self.classifier is not None
                and self.batcher is not None and self.batcher.running
                and self.not_ready_reason == "")

    def begin_shutdown(self) -> None:
        """Called on SIGTERM: readiness turns false at once; new requests are refused."""
        if not self.shutting_down:
            log.info("shutdown begun: readiness is now false; draining accepted requests")
        self.shutting_down = True
        self.not_ready_reason = "shutting down"
        self.metrics.ready.set(0)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load, warm up and start batching in the background, so liveness answers meanwhile."""
        self._loader = asyncio.create_task(self._load(), name="model-loader")

    async def wait_loaded(self) -> None:
        if self._loader is not None:
            await asyncio.shield(self._loader)

    async def _load(self) -> None:
        s = self.settings
        try:
            classifier = await asyncio.to_thread(self._factory, s)
            started = time.perf_counter()
            if s.warmup:
                await asyncio.to_thread(classifier.warmup, sorted({1, s.max_batch_size}))
            warm_s = time.perf_counter() - started
            workers = s.inference_workers or (
                1 if classifier.provider == "CPUExecutionProvider" else 2)
            inline = await asyncio.to_thread(self._choose_inline, classifier, workers)
        except Exception as exc:
            log.exception("model failed to load")
            self.not_ready_reason = f"model failed to load: {exc}"
            return
        meta = classifier.metadata
        self.classifier = classifier
        self.metrics.model_info.labels(meta.name, meta.version, classifier.provider).set(1)
        log.info("model %s v%s loaded from %s on %s (%s); warm-up %.2f s; inference %s",
                 meta.name, meta.version, s.model_path, classifier.provider,
                 classifier.provider_note, warm_s, "inline" if inline else "in a thread")
        if s.require_gpu and classifier.provider == "CPUExecutionProvider":
            self.not_ready_reason = (f"require_gpu is set but the session runs on CPU: "
                                     f"{classifier.provider_note}")
            log.error("not ready: %s", self.not_ready_reason)
            return
        self.batcher = Batcher(classifier.predict, max_batch_size=s.max_batch_size,
                               max_wait_s=s.max_wait_ms / 1000, max_queue_images=s.max_queue_images,
                               workers=workers, inline=inline, metrics=self.metrics)
        await self.batcher.start()
        if not self.shutting_down:
            self.not_ready_reason = ""
            self.metrics.ready.set(1)

    def _choose_inline(self, classifier: Classifier, workers: int) -> bool:
        """Whether batches run on the event loop's thread (see ``Settings.inference_inline``):
        only where a full batch is short, so the loop is never held for long."""
        s = self.settings
        if s.inference_inline != "auto":
            return s.inference_inline == "on"
        if (not s.warmup or workers != 1
                or classifier.provider != "CPUExecutionProvider"):
            return False
        c, h, w = classifier.metadata.input_shape[1:]
        batch = np.zeros((s.max_batch_size, c, h, w), dtype=np.float32)
        took = []
        for _ in range(2):  # warm already: the faster of two calls
            started = time.perf_counter()
            classifier.predict(batch)
            took.append(time.perf_counter() - started)
        return min(took) * 1000 <= s.inline_max_batch_ms

    async def stop(self) -> None:
        self.begin_shutdown()
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self.batcher is not None:
            await self.batcher.stop(self.settings.graceful_timeout_s)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.classifier is not None:
            self.classifier.close()

    # --- work ----------------------------------------------------------------------------------
    def require_ready(self) -> tuple[Classifier, Batcher]:
        """The model and batcher, for a request that was admitted. During the drain readiness is
        false but the batcher still runs: requests admitted before it began are completed (new
        ones are refused before they get here, by ``service.api.front``)."""
        if self.classifier is None or self.batcher is None or not self.batcher.running:
            if self.shutting_down:
                from service.errors import ShuttingDown

                raise ShuttingDown("the server is shutting down")
            raise ModelNotReady(f"not ready: {self.not_ready_reason}")
        return self.classifier, self.batcher

    def _pixels(self, img: Image.Image) -> np.ndarray | ServiceError:
        assert self.classifier is not None
        started = time.perf_counter()
        try:
            return pixels_of(img, self.classifier.metadata.spec)
        except ServiceError as exc:
            return exc
        finally:
            self.metrics.decode.observe(time.perf_counter() - started)

    async def decode(self, images: Sequence[bytes]) -> list[np.ndarray | ServiceError]:
        """Decode each image; failures come back in place, not raised.

        Headers are read here, on the event loop (cheap whatever the size). Images of at most
        ``inline_decode_max_pixels`` are decoded here too, where a thread hand-off would cost
        more than the decode; larger ones go to the decode pool, so that a big photo never
        holds the loop."""
        _, batcher = self.require_ready()
        out: list[np.ndarray | ServiceError] = []
        pool: list[tuple[int, Image.Image]] = []
        for i, data in enumerate(images):
            try:
                img = open_image(data, self.settings.max_pixels)
            except ServiceError as exc:
                out.append(exc)
                continue
            width, height = img.size
            if width * height <= self.settings.inline_decode_max_pixels:
                out.append(self._pixels(img))
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
            done = await asyncio.gather(
                *(loop.run_in_executor(self._decode_pool, self._pixels, img) for _, img in pool))
        finally:
            batcher.expected_done(len(pool))
        for (i, _), item in zip(pool, done, strict=True):
            out[i] = item
        return out

    async def infer(self, pixels: np.ndarray) -> tuple[np.ndarray, int]:
        """Probabilities for an N×C×H×W float32 batch through the shared batcher."""
        _, batcher = self.require_ready()
        return await batcher.submit(pixels, self.settings.request_timeout_s)

    async def classify_pixels(self, decoded: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
        """Probabilities for decoded uint8 images."""
        return await self.infer(to_model_input(np.stack(decoded)))
