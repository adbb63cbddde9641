"""Per-worker budgets for what clients can make a worker hold at once, so that many small
requests cannot add up to more memory than the worker has.

- :class:`BodyBudget`: request body bytes held over all requests. Past it a request is refused
  at once (503 with ``Retry-After``): a client that stalls mid-upload holds its bytes until the
  body deadline, and refusing others meanwhile keeps the worker alive.
- :class:`PixelBudget`: pixels being decoded in the decode threads at once. Past it an image
  waits for its turn (in arrival order) within its request's deadline: decoding is work the
  worker has accepted, and each image's decoded size is bounded by ``max_pixels`` already.
"""

from __future__ import annotations

import asyncio
from collections import deque

from service.errors import Overloaded


class BodyBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        """Hold ``n`` more bytes, or raise Overloaded when that would pass the limit."""
        if self.used + n > self.limit:
            raise Overloaded(f"this worker holds {self.used} bytes of request bodies (limit "
                             f"{self.limit}); retry shortly")
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


class PixelBudget:
    """A weighted semaphore, first come first served: a large image is not overtaken forever by
    small ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, n: int) -> None:
        n = min(n, self.limit)  # one image larger than the budget runs alone
        if not self._waiters and self.used + n <= self.limit:
            self.used += n
            return
        future = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(n)  # granted just as the wait was given up
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, n: int) -> None:
        self.used -= min(n, self.limit)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            n, future = self._waiters.popleft()
            if not future.done():
                self.used += n
                future.set_result(None)
