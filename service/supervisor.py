"""Running the server: one process, or several worker processes on one listening socket.

One Python process tops out at about one core of HTTP parsing, JSON and decoding (the GIL),
while ONNX Runtime and Pillow release it. The default is therefore one worker process per usable
core, each with its own model sessions and batcher, on CPU and on a GPU alike: on a GPU host one
process decoded at most about 250 photos a second, a fifth of what a plain handler with eight
workers got through the same GPU.

The parent binds the socket, spawns the workers, restarts one that dies, and on SIGTERM or
SIGINT passes SIGTERM on: every worker turns unready at once, refuses new requests, answers the
ones it accepted, and exits; the parent waits for them up to the grace period. With several
workers, Prometheus metrics go through prometheus-client's multi-process mode so that
``/metrics`` on any worker reports the sum over all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from service.config import Settings
from service.http import Limits, protocol_class

if TYPE_CHECKING:
    from service.runtime import ClassifierFactory, Runtime

log = logging.getLogger("service")

MAX_AUTO_WORKERS = 8
PR_SET_PDEATHSIG = 1  # prctl(2)
CRASH_LOOP_S = 10.0  # a worker that dies this soon after starting, twice in a row, stops us


def usable_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def resolve_workers(settings: Settings) -> int:
    """The number of worker processes: the setting, or for 0 one per usable core (at most
    ``MAX_AUTO_WORKERS``), with or without a GPU: one process decodes and parses about one
    core's worth of requests, and a photo takes about 4 ms of a core to decode, so a GPU host
    with one process fed its GPU 250 photos a second at most."""
    if settings.workers:
        return settings.workers
    return min(usable_cpus(), MAX_AUTO_WORKERS)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, readiness turns 503 and new requests are refused at once; uvicorn then
    stops accepting connections and waits (up to the grace period) for accepted requests."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.runtime.begin_shutdown()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's SIGTERM/SIGINT handling, plus SIGHUP: rescan the model repository now."""
        if threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        loop = asyncio.get_running_loop()

        def on_hup(sig: int, frame: FrameType | None) -> None:
            log.info("SIGHUP: rescanning the model repository")
            loop.call_soon_threadsafe(self.runtime.rescan)  # wakes the loop

        previous = signal.signal(signal.SIGHUP, on_hup)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGHUP, previous)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Keep listening until the accepted requests are answered (at most the grace period),
        so that a client or load balancer meanwhile gets 503 with Retry-After, not a refused
        connection; then close the socket and finish as uvicorn does."""
        deadline = time.monotonic() + self.runtime.settings.graceful_timeout_s
        while (self.runtime.active_requests and not self.force_exit
               and time.monotonic() < deadline):
            await asyncio.sleep(0.02)
        await super().shutdown(sockets)


def uvicorn_config(app: object, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host, port=settings.port, access_log=False, log_config=None,
        timeout_graceful_shutdown=math.ceil(settings.graceful_timeout_s), lifespan="on",
        server_header=False, timeout_keep_alive=math.ceil(settings.keep_alive_timeout_s),
        # Nothing here uses the client's address, so X-Forwarded-* need not be parsed.
        proxy_headers=False,
        # No route speaks WebSocket: an upgrade request is served as plain HTTP.
        ws="none",
        http=protocol_class(limits(settings)),
    )


def limits(settings: Settings) -> Limits:
    """The connection protocol's limits from the settings."""
    return Limits(header_timeout_s=settings.header_timeout_s,
                  body_timeout_s=settings.body_timeout_s,
                  keep_alive_s=settings.keep_alive_timeout_s,
                  max_connections=settings.max_connections,
                  max_url_bytes=settings.max_url_bytes,
                  max_header_bytes=settings.max_header_bytes,
                  max_header_count=settings.max_header_count)


def serve_here(settings: Settings, sockets: list[socket.socket] | None = None,
               factory: ClassifierFactory | None = None) -> None:
    """Run one server in this process (a worker, or the whole service when workers is 1)."""
    from service.app import create_app
    from service.runtime import Runtime

    # Until the server installs its handler, a SIGHUP (a rescan request) must not end us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    runtime = Runtime(settings, factory) if factory else Runtime(settings)
    app = create_app(settings, runtime=runtime, load_before_serving=sockets is not None)
    # What exists now (modules, the app) lives as long as the process: keep it out of the cyclic
    # collector's scans, which otherwise walk all of it (about 76,000 objects) in every full
    # collection, a pause of tens of milliseconds a few times a minute under load.
    gc.collect()
    gc.freeze()
    DrainingServer(uvicorn_config(app, settings), runtime).run(sockets=sockets)


def _die_with_parent(supervisor: int, grace_s: float) -> None:
    """A worker ends when its supervisor does, even by SIGKILL: an orphaned worker would go on
    serving a port nobody manages.

    On Linux the kernel sends SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``): the
    worker drains and exits. If the supervisor died before that was set, the worker has not
    served anything yet and exits at once. SIGTERM is reset to its default first (the worker
    may have inherited it ignored), so a signal before the server's handler is in ends the
    worker too. A thread checks the parent every 0.5 s as well, whatever the platform or the
    signal's fate, and ends a worker whose drain outlasts the grace period."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the watch thread remains
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the line above: nothing served yet
        os._exit(0)

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # drain, as for the kernel's signal
        time.sleep(grace_s + 5)
        os._exit(1)  # the drain did not end: end the process

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def _worker_main(settings: Settings, sock: socket.socket, index: int,
                 factory: ClassifierFactory | None, supervisor: int) -> None:
    from service.logs import configure

    _die_with_parent(supervisor, settings.graceful_timeout_s)

    configure(settings.log_level, settings.log_json)
    logging.getLogger("service").debug("worker %d (pid %d) starting", index, os.getpid())
    serve_here(settings, [sock], factory)


class Supervisor:
    """Spawns ``n`` workers on one socket, keeps them running, and drains them on a signal."""

    def __init__(self, settings: Settings, n: int,
                 factory: ClassifierFactory | None = None) -> None:
        self.settings = settings
        self.n = n
        self.factory = factory  # a module-level function: it crosses to spawned workers
        self._stop = threading.Event()
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[tuple[SpawnProcess, float]] = []

    def _spawn(self, sock: socket.socket, index: int) -> tuple[SpawnProcess, float]:
        proc = self._ctx.Process(target=_worker_main,
                                 args=(self.settings, sock, index, self.factory,
                                       os.getpid()),
                                 name=f"imgserve-worker-{index}", daemon=False)
        # Started with SIGHUP ignored (inherited across exec): a rescan request forwarded to a
        # worker that has not installed its handler yet must not end it.
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            proc.start()
        finally:
            signal.signal(signal.SIGHUP, previous)
        return proc, time.monotonic()

    def _on_hup(self, sig: int, frame: FrameType | None) -> None:
        """SIGHUP: every worker rescans the model repository."""
        log.info("SIGHUP: asking %d workers to rescan the model repository", self.n)
        for proc, _ in self._procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGHUP)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if not self._stop.is_set():
            log.info("received %s: draining %d workers", signal.Signals(sig).name, self.n)
        self._stop.set()

    def _bind(self) -> list[socket.socket]:
        """One listening socket per worker on the same port (SO_REUSEPORT): the kernel spreads
        new connections evenly over them, where one shared socket lets whichever worker wakes
        first take most of them. Falls back to one shared socket where SO_REUSEPORT is missing."""
        s = self.settings
        if not hasattr(socket, "SO_REUSEPORT"):
            sock = uvicorn_config(None, s).bind_socket()
            return [sock] * self.n
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        socks: list[socket.socket] = []
        port = s.port
        for _ in range(self.n):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((s.host, port))
            port = sock.getsockname()[1]  # port 0: the others join the one picked first
            sock.listen(2048)
            sock.set_inheritable(True)
            socks.append(sock)
        return socks

    def run(self) -> int:
        socks = self._bind()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        log.info("serving on http://%s:%d with %d worker processes", self.settings.host,
                 socks[0].getsockname()[1], self.n)
        status = 0
        quick_deaths = 0
        try:
            self._procs = [self._spawn(socks[i], i) for i in range(self.n)]
            while not self._stop.wait(0.5):
                for i, (proc, started) in enumerate(self._procs):
                    if proc.is_alive():
                        continue
                    self._forget(proc)
                    lived = time.monotonic() - started
                    quick_deaths = quick_deaths + 1 if lived < CRASH_LOOP_S else 0
                    if quick_deaths >= 2:
                        log.error("worker %d exited with code %s %.1f s after starting, again: "
                                  "stopping", i, proc.exitcode, lived)
                        status = 1
                        self._stop.set()
                        break
                    log.warning("worker %d (pid %s) exited with code %s; starting a new one",
                                i, proc.pid, proc.exitcode)
                    self._procs[i] = self._spawn(socks[i], i)
        finally:
            for sock in socks:  # new connections are refused once the workers close theirs too
                sock.close()
            self._drain()
        return status

    def _drain(self) -> None:
        for proc, _ in self._procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.graceful_timeout_s + 5
        for proc, _ in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker pid %s did not finish within the grace period: killing it",
                          proc.pid)
                proc.kill()
                proc.join()
            self._forget(proc)

    def _forget(self, proc: SpawnProcess) -> None:
        if self.settings.metrics_dir is not None and proc.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(proc.pid, str(self.settings.metrics_dir))


def serve(settings: Settings, factory: ClassifierFactory | None = None) -> int:
    """Serve until a signal: in this process for one worker, under a supervisor for several."""
    n = resolve_workers(settings)
    settings = settings.model_copy(update={"workers": n})  # each worker sizes its threads by it
    if n == 1:
        log.info("serving on http://%s:%d with 1 process", settings.host, settings.port)
        serve_here(settings, factory=factory)
        return 0
    own_dir = settings.metrics_dir is None
    metrics_dir = Path(tempfile.mkdtemp(prefix="imgserve-metrics-")) if own_dir else None
    if metrics_dir is not None:
        settings = settings.model_copy(update={"metrics_dir": metrics_dir})
    assert settings.metrics_dir is not None
    settings.metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in settings.metrics_dir.glob("*.db"):
        stale.unlink()
    # prometheus-client picks its multi-process value store from the environment at import;
    # spawned workers inherit it.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(settings.metrics_dir)
    try:
        return Supervisor(settings, n, factory).run()
    finally:
        if own_dir:
            shutil.rmtree(settings.metrics_dir, ignore_errors=True)
