"""CPU per request of the service's whole Python request path, in one process, without sockets.

The real HTTP protocol (``service.http``), the app, the batcher and the model serve keep-alive
connections whose transports are in memory: each answer's write sends that connection's next
request. What remains is what a worker spends per request apart from the kernel's socket work
and the load generator, without wrk sharing the cores. The machine's own noise remains (on these
shared cores one round can differ from the next by 20%): variants run alternately, each in its
own app, ``--rounds`` times, and only figures of one run compare.

    .venv/bin/python bench/request_cost.py                                  # png, defaults
    .venv/bin/python bench/request_cost.py --variants default pillow access_log=false
    .venv/bin/python bench/request_cost.py --image photo --connections 16

A variant is ``default``, ``pillow`` (every PNG decoded by Pillow, as without libspng) or
``SETTING=VALUE,...`` (settings by their field names, as in ``service.config``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop
from uvicorn.server import ServerState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_bench import IMAGES, cpu_model  # noqa: E402
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
    def __init__(self, protocol: asyncio.Protocol, request: bytes, run: Run) -> None:
        self.protocol = protocol
        self.request = request
        self.run = run

    def start(self) -> None:
        self.protocol.connection_made(MemoryTransport(self))
        self.protocol.data_received(self.request)

    def answered(self, data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {data[:300]!r}")
        if self.run.count():
            asyncio.get_running_loop().call_soon(self.protocol.data_received, self.request)


class Run:
    def __init__(self, total: int) -> None:
        self.left = total
        self.done = asyncio.get_running_loop().create_future()

    def count(self) -> bool:
        """One more answer; whether to send another request."""
        self.left -= 1
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)
        return self.left > 0


def request_bytes(image: str) -> bytes:
    body = IMAGES[image].read_bytes()
    ctype = "image/png" if IMAGES[image].suffix == ".png" else "image/jpeg"
    return (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def settings_of(variant: str) -> Settings:
    pairs = {} if variant in ("default", "pillow") else dict(
        kv.split("=", 1) for kv in variant.split(","))
    return Settings(**{"provider": "cpu", **pairs})  # type: ignore[arg-type]


async def measure(variant: str, image: str, connections: int, total: int) -> tuple[float, float]:
    """CPU microseconds per request and the mean batch, over ``total`` requests."""
    settings = settings_of(variant)
    app = create_app(settings, load_before_serving=True)
    config = uvicorn_config(app, settings)
    config.load()
    state = ServerState()
    request = request_bytes(image)
    spng = png.pyspng
    if variant == "pillow":
        png.pyspng = None
    try:
        async with app.router.lifespan_context(app):
            await app.state.runtime.wait_loaded()
            with app.state.runtime.lease() as model:
                batches = model.metrics.batch_size
            gc.collect()
            gc.freeze()  # as each server process does
            warm = Run(500)
            clients = [Client(config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=state, app_state={}), request, warm)
                for _ in range(connections)]
            for c in clients:
                c.start()
            await warm.done
            run = Run(total)
            for c in clients:
                c.run = run
            batches.flush()
            before = _batch_totals(batches)
            started = time.process_time()
            for c in clients:  # each connection's next request
                c.protocol.data_received(request)
            await run.done
            cpu = time.process_time() - started
            batches.flush()
            after = _batch_totals(batches)
            for c in clients:
                c.protocol.connection_lost(None)
    finally:
        png.pyspng = spng
        gc.unfreeze()
    calls = after[1] - before[1]
    return cpu / total * 1e6, (after[0] - before[0]) / calls if calls else float("nan")


def _batch_totals(hist: Any) -> tuple[float, float]:
    child = hist._child
    return child._sum.get(), sum(b.get() for b in child._buckets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", choices=list(IMAGES), default="png")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20_000, help="per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["default"])
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}; `bench/request_cost.py "
          f"{' '.join(sys.argv[1:])}`; {args.requests} requests per round on "
          f"{args.connections} connections, {args.image}\n", flush=True)
    # The access log goes where a log shipper would read it, not to this table.
    log = open("/dev/null", "w")  # noqa: SIM115 - open for the whole run
    sys.stderr, stderr = log, sys.stderr
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in args.variants}
    try:
        for rnd in range(args.rounds):
            order = args.variants if rnd % 2 == 0 else args.variants[::-1]
            for variant in order:
                us, batch = uvloop.run(measure(variant, args.image, args.connections,
                                               args.requests))
                results[variant].append((us, batch))
                print(f"round {rnd + 1} {variant:32} {us:7.1f} us/request  batch {batch:5.1f}",
                      flush=True)
    finally:
        sys.stderr = stderr
        log.close()
    print("\n| variant | CPU us per request (median) | lowest - highest | mean batch |")
    print("|---|---|---|---|")
    for variant, rows in results.items():
        us = [r[0] for r in rows]
        print(f"| {variant} | {statistics.median(us):.1f} | {min(us):.1f} - {max(us):.1f} | "
              f"{statistics.median(r[1] for r in rows):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
