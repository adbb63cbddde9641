from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import pytest

from service.batcher import Batcher
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded, ShuttingDown
from service.metrics import Metrics

T = TypeVar("T")


class CountingModel:
    """A tiny deterministic model: row i's output is [sum(x_i), batch size]."""

    def __init__(self, delay: float = 0.0, fail_on: Callable[[np.ndarray], bool] | None = None):
        self.calls: list[int] = []
        self.delay = delay
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls.append(int(x.shape[0]))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on(x):
            raise RuntimeError("boom")
        return np.stack([x.reshape(len(x), -1).sum(1), np.full(len(x), len(x), float)], 1)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def images(n: int, value: float = 1.0) -> np.ndarray:
    return np.full((n, 1, 2, 2), value, np.float32)


def make(model: CountingModel, **kw: object) -> Batcher:
    opts: dict[str, object] = {"max_batch_size": 8, "max_wait_s": 0.02, "max_queue_images": 64}
    opts.update(kw)
    return Batcher(model, **opts)  # type: ignore[arg-type]


def test_concurrent_requests_share_model_calls() -> None:
    model = CountingModel(delay=0.01)

    async def main() -> list[tuple[np.ndarray, int]]:
        b = make(model)
        await b.start()
        out = await asyncio.gather(*(b.submit(images(1, v), 5) for v in range(20)))
        await b.stop()
        return out

    out = run(main)
    assert len(model.calls) < 20 and max(model.calls) <= 8 and sum(model.calls) == 20
    for v, (rows, batch) in enumerate(out):  # each caller gets its own row back
        assert rows.shape == (1, 2) and rows[0, 0] == pytest.approx(4 * v)
        assert 1 <= batch <= 8


def test_batch_released_on_size_before_the_wait() -> None:
    model = CountingModel()

    async def main() -> float:
        b = make(model, max_wait_s=5.0)
        await b.start()
        start = time.perf_counter()
        await asyncio.gather(*(b.submit(images(2), 5) for _ in range(4)))
        took = time.perf_counter() - start
        await b.stop()
        return took

    assert run(main) < 1.0
    assert model.calls == [8]


def test_announced_images_hold_the_batch_until_they_arrive() -> None:
    model = CountingModel()

    async def main() -> list[int]:
        b = make(model, max_wait_s=1.0)
        await b.start()
        b.expect(1)  # one image is still being decoded

        async def late() -> tuple[np.ndarray, int]:
            await asyncio.sleep(0.05)
            b.expected_done(1)
            return await b.submit(images(1), 5)

        out = await asyncio.gather(b.submit(images(1), 5), late())
        await b.stop()
        return [batch for _, batch in out]

    assert run(main) == [2, 2]  # both rode in one batch
    assert model.calls == [2]


def test_the_window_closes_at_max_wait_even_when_more_is_announced() -> None:
    model = CountingModel()

    async def main() -> float:
        b = make(model, max_wait_s=0.05)
        await b.start()
        b.expect(1)  # announced but never submitted within the window
        start = time.perf_counter()
        await b.submit(images(1), 5)
        took = time.perf_counter() - start
        b.expected_done(1)
        await b.stop()
        return took

    assert 0.04 <= run(main) < 0.5
    assert model.calls == [1]


def test_a_lone_request_does_not_wait_for_company() -> None:
    model = CountingModel()

    async def main() -> tuple[float, float]:
        b = make(model, max_wait_s=2.0)
        await b.start()
        start = time.perf_counter()
        await b.submit(images(1), 5)  # nothing announced: released at once
        lone = time.perf_counter() - start
        b.expect(1)
        task = asyncio.create_task(b.submit(images(1), 5))
        await asyncio.sleep(0.05)
        b.expected_done(1)  # the announced image failed to decode: stop waiting for it
        start = time.perf_counter()
        await task
        released = time.perf_counter() - start
        await b.stop()
        return lone, released

    lone, released = run(main)
    assert lone < 0.5
    assert released < 0.5
    assert model.calls == [1, 1]


def test_images_not_requests_fill_the_batch() -> None:
    model = CountingModel()

    async def main() -> np.ndarray:
        b = make(model, max_batch_size=4)
        await b.start()
        rows, _ = await b.submit(images(10), 5)  # one request, three model calls
        await b.stop()
        return rows

    rows = run(main)
    assert rows.shape == (10, 2)
    assert sorted(model.calls) == [2, 4, 4]


def test_full_queue_is_refused_at_once() -> None:
    model = CountingModel(delay=0.2)

    async def main() -> None:
        metrics = Metrics()
        b = make(model, max_batch_size=2, max_queue_images=4,
                 metrics=metrics.for_model("m", "1"))
        await b.start()
        first = asyncio.create_task(b.submit(images(2), 5))
        await asyncio.sleep(0.05)  # first batch is now computing
        queued = [asyncio.create_task(b.submit(images(2), 5)) for _ in range(2)]
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        with pytest.raises(Overloaded) as exc:
            await b.submit(images(1), 5)
        assert time.perf_counter() - start < 0.05
        assert exc.value.retry_after >= 1
        await asyncio.gather(first, *queued)
        assert metrics.rejected.labels("queue_full")._value.get() == 1
        await b.stop()

    run(main)


def test_deadline_drops_queued_work_before_inference() -> None:
    model = CountingModel(delay=0.3)

    async def main() -> None:
        b = make(model, max_batch_size=1, max_wait_s=0)
        await b.start()
        slow = asyncio.create_task(b.submit(images(1, 1), 5))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await b.submit(images(1, 2), 0.1)
        await slow
        await asyncio.sleep(0.05)
        await b.stop()

    run(main)
    assert model.calls == [1]  # the expired request never reached the model


def test_a_failing_batch_fails_only_its_requests() -> None:
    model = CountingModel(fail_on=lambda x: bool((x == 13).any()))

    async def main() -> list[object]:
        b = make(model, max_batch_size=1, max_wait_s=0)
        await b.start()
        out = await asyncio.gather(*(b.submit(images(1, v), 5) for v in (1, 13, 2)),
                                   return_exceptions=True)
        after, _ = await b.submit(images(1, 3), 5)  # the loop keeps serving
        await b.stop()
        return [*out, after]

    ok1, bad, ok2, after = run(main)
    assert isinstance(bad, InferenceFailed) and bad.status_code == 500
    assert isinstance(ok1, tuple) and isinstance(ok2, tuple)
    assert isinstance(after, np.ndarray) and after[0, 0] == 12


def test_wrong_row_count_is_refused() -> None:
    async def main() -> None:
        b = Batcher(lambda x: np.zeros((len(x) + 1, 2)), max_batch_size=4, max_wait_s=0,
                    max_queue_images=8)
        await b.start()
        with pytest.raises(InferenceFailed):
            await b.submit(images(2), 5)
        await b.stop()

    run(main)


def test_cancelled_caller_does_not_disturb_others() -> None:
    model = CountingModel(delay=0.1)

    async def main() -> np.ndarray:
        b = make(model, max_batch_size=1, max_wait_s=0)
        await b.start()
        blocker = asyncio.create_task(b.submit(images(1), 5))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(b.submit(images(1, 5), 5))
        kept = asyncio.create_task(b.submit(images(1, 7), 5))
        await asyncio.sleep(0.01)
        gone.cancel()
        await blocker
        rows, _ = await kept
        await b.stop()
        return rows

    assert run(main)[0, 0] == 28
    assert len(model.calls) == 2  # the cancelled request was skipped


def test_stop_drains_then_refuses() -> None:
    model = CountingModel(delay=0.05)

    async def main() -> None:
        b = make(model, max_batch_size=2, max_wait_s=0)
        await b.start()
        tasks = [asyncio.create_task(b.submit(images(1), 5)) for _ in range(6)]
        await asyncio.sleep(0)
        await b.stop()
        assert all(t.done() and not t.exception() for t in tasks)
        with pytest.raises(ShuttingDown):
            await b.submit(images(1), 5)

    run(main)


@pytest.mark.parametrize(("kw", "message"), [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_wait_s": -1}, "max_wait_s"),
    ({"max_queue_images": 2}, "max_queue_images"),
    ({"workers": 0}, "workers"),
])
def test_knobs_are_validated(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(CountingModel(), **kw)


def test_several_workers_overlap_batches() -> None:
    model = CountingModel(delay=0.1)

    async def main() -> float:
        b = make(model, max_batch_size=1, max_wait_s=0, workers=4)
        await b.start()
        start = time.perf_counter()
        await asyncio.gather(*(b.submit(images(1), 5) for _ in range(4)))
        took = time.perf_counter() - start
        await b.stop()
        return took

    assert run(main) < 0.3  # four 0.1 s batches in parallel, not 0.4 s in series
