"""CPU per request of the service's whole Python request path, in one process, without sockets.

The real HTTP protocol (``service.http``), the app, the batcher and the model serve keep-alive
connections whose transports are in memory: each answer's write sends that connection's next
request. What remains is what a worker spends per request apart from the kernel's socket work
and the load generator, without wrk sharing the cores. The machine's own noise remains (on these
shared cores one round can differ from the next by 20%), so every variant's app is started at
once in this process and short runs of each alternate, ``--rounds`` times; the lowest round is
the least disturbed (as timeit takes the best), and only figures of one run compare.

    .venv/bin/python bench/request_cost.py                                  # png, defaults
    .venv/bin/python bench/request_cost.py --variants default pillow access_log=false
    .venv/bin/python bench/request_cost.py --image photo --connections 16

A variant is ``default``, ``pillow`` (every PNG decoded by Pillow, as without libspng) or
``SETTING=VALUE,...`` (settings by their field names, as in ``service.config``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvloop
from uvicorn.server import ServerState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_bench import IMAGES, batch_totals, cpu_model  # noqa: E402
from service import png  # noqa: E402
from service.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402
from service.supervisor import uvicorn_config  # noqa: E402


class MemoryTransport(asyncio.Transport):
    """A connection's transport: writes go to the client, which answers with its next request."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.client.answered(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Client:
    """One keep-alive connection: a request, its answer, the next request, while the run lasts."""

    def __init__(self, protocol: asyncio.Protocol, request: bytes) -> None:
        self.protocol = protocol
        self.request = request
        self.run: Run | None = None

    def connect(self) -> None:
        self.protocol.connection_made(MemoryTransport(self))

    def send(self, run: Run) -> None:
        self.run = run
        run.in_flight += 1
        self.protocol.data_received(self.request)

    def answered(self, data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {data[:300]!r}")
        assert self.run is not None
        if self.run.answered():
            asyncio.get_running_loop().call_soon(self.send, self.run)


class Run:
    """``total`` requests spread over the connections; done when all are answered and none is
    left in flight (so the next run starts on idle connections)."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.in_flight = 0
        self.done = asyncio.get_running_loop().create_future()

    def answered(self) -> bool:
        """One more answer; whether its connection sends another request."""
        self.in_flight -= 1
        self.left -= 1
        more = self.left - self.in_flight > 0
        if not more and self.in_flight == 0 and not self.done.done():
            self.done.set_result(None)
        return more


def request_bytes(image: str) -> bytes:
    body = IMAGES[image].read_bytes()
    ctype = "image/png" if IMAGES[image].suffix == ".png" else "image/jpeg"
    return (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def settings_of(variant: str) -> Settings:
    pairs = {} if variant in ("default", "pillow") else dict(
        kv.split("=", 1) for kv in variant.split(","))
    return Settings(**{"provider": "cpu", **pairs})  # type: ignore[arg-type]


class Served:
    """One variant's app, started, with its connections open and warm."""

    def __init__(self, variant: str, image: str, connections: int) -> None:
        self.variant = variant
        self.settings = settings_of(variant)
        self.app = create_app(self.settings, load_before_serving=True)
        self.request = request_bytes(image)
        self.connections = connections
        self.clients: list[Client] = []

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        await stack.enter_async_context(self.app.router.lifespan_context(self.app))
        self.metrics = self.app.state.runtime.metrics
        await self.app.state.runtime.wait_loaded()
        # The connections idle while other variants run.
        config = uvicorn_config(self.app, self.settings.model_copy(
            update={"keep_alive_timeout_s": 3600.0}))
        config.load()
        state = ServerState()
        self.clients = [Client(config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=state, app_state={}), self.request)
            for _ in range(self.connections)]
        for c in self.clients:
            c.connect()
        await self._run(500)  # warm

    async def _run(self, total: int) -> None:
        run = Run(total)
        with self.decoder():
            for c in self.clients[:total]:
                c.send(run)
            await run.done

    @contextlib.contextmanager
    def decoder(self) -> Iterator[None]:
        """For the ``pillow`` variant, every PNG decoded by Pillow while it runs."""
        spng = png.pyspng
        if self.variant == "pillow":
            png.pyspng = None
        try:
            yield
        finally:
            png.pyspng = spng

    async def measure(self, total: int) -> tuple[float, float]:
        """CPU microseconds per request and the mean batch, over ``total`` requests."""
        before = batch_totals(self.metrics.exposition().decode())
        started = time.process_time()
        await self._run(total)
        cpu = time.process_time() - started
        after = batch_totals(self.metrics.exposition().decode())
        await asyncio.sleep(0.2)  # the access log's and the metrics' flushes, between runs
        calls = after[1] - before[1]
        return cpu / total * 1e6, (after[0] - before[0]) / calls if calls else float("nan")


async def measure_all(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """Every variant started at once in this process (idle ones cost nothing), then measured in
    turn, alternating the order, ``args.rounds`` times."""
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in args.variants}
    async with contextlib.AsyncExitStack() as stack:
        served = [Served(v, args.image, args.connections) for v in args.variants]
        for s in served:
            await s.start(stack)
        gc.collect()
        gc.freeze()  # as each server process does
        for rnd in range(args.rounds):
            for s in served if rnd % 2 == 0 else served[::-1]:
                us, batch = await s.measure(args.requests)
                results[s.variant].append((us, batch))
                print(f"round {rnd + 1} {s.variant:32} {us:7.1f} us/request  batch {batch:5.1f}",
                      file=sys.__stdout__, flush=True)
    gc.unfreeze()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", choices=list(IMAGES), default="png")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--requests", type=int, default=3000, help="per round and variant")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--variants", nargs="+", default=["default"])
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}; `bench/request_cost.py "
          f"{' '.join(sys.argv[1:])}`; {args.requests} requests per round on "
          f"{args.connections} connections, {args.image}\n", flush=True)
    # The access log goes where a log shipper would read it, not to this table.
    log = open(os.environ.get("REQUEST_COST_LOG", "/dev/null"), "w")  # noqa: SIM115
    sys.stderr, stderr = log, sys.stderr
    try:
        results = uvloop.run(measure_all(args))
    finally:
        sys.stderr = stderr
        log.close()
    print("\n| variant | CPU us per request (lowest round) | median | highest | mean batch |")
    print("|---|---|---|---|---|")
    for variant, rows in results.items():
        us = [r[0] for r in rows]
        print(f"| {variant} | {min(us):.1f} | {statistics.median(us):.1f} | {max(us):.1f} | "
              f"{statistics.median(r[1] for r in rows):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
