"""Dynamic batching: concurrent requests gathered into one model call.

Each submitted array becomes one or more queue items (at most ``max_batch_size`` images each)
with a Future. A batch is released when it holds ``max_batch_size`` images or its oldest image
has waited ``max_wait_s``, or at once when no more images are on their way: callers announce
images they are still preparing (decoding, parsing) with :meth:`Batcher.expect`, and a lone
request on an idle server does not wait for company that is not coming. The model runs in a
worker thread (ONNX Runtime releases the GIL), so
the event loop keeps accepting and decoding while a batch computes; with ``workers`` > 1 several
batches may compute at once. With ``inline``, a batch runs on the event loop's own thread instead:
for a model that takes a millisecond or two on the CPU, the thread hand-offs cost more than the
overlap gains, and the requests that arrive meanwhile wait in the socket buffers to form the next
batch. A batch that raises fails only its own requests. The queue is
bounded in images: a submit that does not fit is refused at once with :class:`Overloaded`.
This module knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.errors import (
    DeadlineExceeded,
    InferenceFailed,
    ModelNotReady,
    Overloaded,
    ShuttingDown,
)
from service.metrics import ModelMetrics

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]
SWEEP_S = 0.025  # how often queued requests are checked against their deadline


@dataclass(eq=False)
class _Item:
    x: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, int]]
    enqueued: float
    deadline: float

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


class Batcher:
    """Gathers concurrent ``submit`` calls into batches for ``predict``."""

    def __init__(
        self,
        predict: Predict,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_images: int,
        workers: int = 1,
        inline: bool = False,
        metrics: ModelMetrics | None = None,
        attach_thread: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queue_images < max_batch_size:
            raise ValueError("max_queue_images must be at least max_batch_size")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if inline and workers != 1:
            raise ValueError("inline inference runs one batch at a time: workers must be 1")
        self._predict = predict
        self._attach_thread = attach_thread or (lambda: None)
        self._prepare_error: BaseException | None = None
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self.workers = workers
        self.inline = inline
        self._metrics = metrics
        self._queue: deque[_Item] = deque()
        self._queued_images = 0
        self._in_flight = 0
        self._expected = 0
        self._wakeup = asyncio.Event()
        self._collect_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = False
        self._stopping = False
        self._image_s: float | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._accepting and all(not t.done() for t in self._tasks) and bool(self._tasks)

    @property
    def queued_images(self) -> int:
        return self._queued_images

    async def start(self) -> None:
        """Start the inference threads (each prepared by ``attach_thread`` before any batch:
        with sessions per thread, that builds and warms them) and the batching tasks."""
        if self._tasks:
            return
        if not self.inline:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="inference",
                                                initializer=self._prepare_thread)
            # One task per thread, each holding its thread until all have started: every
            # thread is made, and prepared, now.
            started = threading.Barrier(self.workers)
            loop = asyncio.get_running_loop()
            try:
                await asyncio.gather(*(loop.run_in_executor(self._executor, started.wait)
                                       for _ in range(self.workers)))
            except BaseException:
                started.abort()  # a thread that failed to prepare: release the others
                if self._prepare_error is not None:  # its own error, not the pool's
                    raise self._prepare_error from None
                raise
        self._tasks = [asyncio.create_task(self._worker(), name=f"batcher-{i}")
                       for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._sweep(), name="batcher-deadlines"))
        self._accepting = True

    def _prepare_thread(self) -> None:
        try:
            self._attach_thread()
        except BaseException as exc:
            self._prepare_error = self._prepare_error or exc
            raise

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, finish what is queued (up to the timeout), then stop the workers."""
        self._accepting = False
        self._stopping = True
        deadline = time.monotonic() + drain_timeout_s
        while (self._queue or self._in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(ShuttingDown("the server is shutting down"))
        self._queued_images = 0
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def drain_seconds(self) -> int:
        """Whole seconds the queue needs to drain at the recent rate (at least 1, at most 60):
        what a refused client is told to wait in ``Retry-After``."""
        if self._image_s is None:
            return 1
        seconds = self._queued_images * self._image_s / self.workers
        return min(60, max(1, math.ceil(seconds)))

    # --- submitting ----------------------------------------------------------------------------
    def expect(self, n: int) -> None:
        """Announce ``n`` images that will be submitted soon (they are being decoded)."""
        self._expected += n

    def expected_done(self, n: int) -> None:
        """Those ``n`` images were submitted, or will not be."""
        self._expected = max(0, self._expected - n)
        self._wakeup.set()

    async def submit(self, x: np.ndarray, timeout_s: float) -> tuple[np.ndarray, int]:
        """Classify an N×C×H×W batch; returns its N rows and the largest batch it rode in.

        Raises Overloaded, DeadlineExceeded,
        InferenceFailed, ShuttingDown or ModelNotReady."""
        if not self._accepting:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            raise ModelNotReady("the model is not ready yet")
        n = int(x.shape[0])
        if n == 0:
            raise ValueError("submit needs at least one image")
        if self._queued_images + n > self.max_queue_images:
            if self._metrics:
                self._metrics.rejected.labels("queue_full").inc()
            retry_after = self.drain_seconds()
            raise Overloaded(
                f"{self._queued_images} images are queued (limit {self.max_queue_images}); "
                f"retry in {retry_after} s", retry_after=retry_after)
        loop = asyncio.get_running_loop()
        now = loop.time()
        items = [_Item(x[i : i + self.max_batch_size], loop.create_future(), now,
                       now + timeout_s) for i in range(0, n, self.max_batch_size)]
        self._queue.extend(items)
        self._queued_images += n
        if self._metrics:
            self._metrics.queue_depth.set(self._queued_images)
        self._wakeup.set()
        # No timer per request: the sweeper fails items still queued at their deadline.
        if len(items) == 1:  # the common case: no gathering future
            parts = [await items[0].future]
        else:
            done = await asyncio.gather(*(i.future for i in items), return_exceptions=True)
            for part in done:  # every part's outcome is retrieved; the first error is raised
                if isinstance(part, BaseException):
                    raise part
            parts = done  # type: ignore[assignment]
        rows = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        return rows, max(p[1] for p in parts)

    async def _sweep(self) -> None:
        """Fail queued items past their deadline (504), a few times a second. Items already in
        a model call are answered: their work is done by then anyway."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_S)
            now = loop.time()
            expired = [i for i in self._queue if i.deadline <= now and not i.future.done()]
            if not expired:
                continue
            for item in expired:
                seconds = item.deadline - item.enqueued
                item.future.set_exception(DeadlineExceeded(
                    f"not answered within the {seconds:g} s request deadline"))
                if self._metrics:
                    self._metrics.rejected.labels("deadline").inc()
            # Out of the queue at once, so that they no longer count against its bound.
            self._queue = deque(i for i in self._queue if not i.future.done())
            self._queued_images = sum(i.n for i in self._queue)
            if self._metrics:
                self._metrics.queue_depth.set(self._queued_images)

    # --- the worker loop -------------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            batch = await self._collect()
            self._in_flight += 1
            try:
                await self._run(batch)
            finally:
                self._in_flight -= 1
            if self.inline:  # let the loop answer, accept and decode between inline batches
                await asyncio.sleep(0)

    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        async with self._collect_lock:  # one collector at a time keeps batches full
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            release_at = self._queue[0].enqueued + self.max_wait_s
            while self._queued_images < self.max_batch_size and self._expected > 0:
                remaining = release_at - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch: list[_Item] = []
            size = 0
            dtype = self._queue[0].x.dtype  # a batch holds one dtype (uint8 pixels or float32)
            while (self._queue and size + self._queue[0].n <= self.max_batch_size
                   and self._queue[0].x.dtype == dtype):
                item = self._queue.popleft()
                self._queued_images -= item.n
                if item.future.done():  # the caller gave up (deadline or disconnect)
                    continue
                batch.append(item)
                size += item.n
            if self._metrics:
                self._metrics.queue_depth.set(self._queued_images)
            return batch

    async def _run(self, batch: list[_Item]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        x = batch[0].x if len(batch) == 1 else np.concatenate([i.x for i in batch])
        metrics = self._metrics
        if metrics:
            for item in batch:
                metrics.queue_wait.observe(start - item.enqueued)
        try:
            if self._executor is None:  # inline: no thread hand-off for a short CPU batch
                out = self._predict(x)
            else:
                out = await loop.run_in_executor(self._executor, self._predict, x)
            if not isinstance(out, np.ndarray) or out.ndim != 2 or out.shape[0] != x.shape[0]:
                shape = getattr(out, "shape", type(out).__name__)
                raise RuntimeError(f"model returned {shape} for a batch of {x.shape[0]}")
        except Exception as exc:
            log.exception("batch of %d images failed", x.shape[0])
            if metrics:
                metrics.batch_failures.inc()
            error = InferenceFailed(f"the model failed on this request's batch: "
                                    f"{type(exc).__name__}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        took = loop.time() - start
        # Seconds per image, smoothed over recent batches: the queue's drain rate.
        per_image = took / x.shape[0]
        self._image_s = per_image if self._image_s is None else (
            0.8 * self._image_s + 0.2 * per_image)
        if metrics:
            metrics.inference.observe(took)
            metrics.batch_size.observe(x.shape[0])
            metrics.images.inc(x.shape[0])
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result((out[offset : offset + item.n], int(x.shape[0])))
            offset += item.n
