"""The models being served: one ONNX Runtime session and one batcher per model version, loaded
from the repository and swapped while serving.

:meth:`ModelSet.sync` scans the repository (``service.repository``), loads and warms the versions
the policy wants in the background, then makes them take new requests with one assignment per
model; the versions they replace finish the requests they accepted and are unloaded. A version
that fails to load changes nothing that is served; it is reported (log, metric, its state) and
retried when its file changes. Requests hold a lease on the version they resolved, so a version
is unloaded only once nothing uses it. Nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from service.batcher import Batcher
from service.config import Settings
from service.errors import ModelNotFound, ModelNotReady, echo
from service.metrics import Metrics, ModelMetrics
from service.model import CPU, Classifier, ModelLoadError, ModelMetadata
from service.repository import Found, Problem, VersionPolicy, scan, version_key

log = logging.getLogger(__name__)

ClassifierFactory = Callable[[Settings], Classifier]  # loads settings.model_path
Key = tuple[str, str]  # (name, version)


class State(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"
    UNAVAILABLE = "unavailable"  # on disk, not chosen by the version policy


@dataclass(eq=False)
class Version:
    """One model version: while ready, its classifier, metadata and batcher."""

    name: str
    version: str
    found: Found
    state: State = State.LOADING
    reason: str = ""
    classifier: Classifier | None = None
    metadata: ModelMetadata | None = None  # the file's, named as the repository names it
    batcher: Batcher | None = None
    metrics: ModelMetrics | None = None
    leases: int = 0  # requests that resolved this version and have not answered yet
    loaded_at: float | None = None  # Unix time it became ready

    @property
    def key(self) -> Key:
        return (self.name, self.version)

    def __enter__(self) -> Version:
        return self

    def __exit__(self, *exc: object) -> None:
        self.leases -= 1


@dataclass(frozen=True)
class Row:
    """One line of :meth:`ModelSet.listing`."""

    name: str
    version: str
    state: State
    reason: str
    path: Path
    note: str = ""
    loaded: Version | None = None  # while it has a session: ready or unloading


class ModelSet:
    def __init__(self, settings: Settings, factory: ClassifierFactory, metrics: Metrics) -> None:
        self.settings = settings
        self.policy = VersionPolicy(settings.version_policy)
        self._factory = factory
        self._metrics = metrics
        self.serving: dict[str, tuple[Version, ...]] = {}  # newest first; replaced, not mutated
        self._loaded: dict[Key, Version] = {}  # ready, serving or about to
        self._loading: dict[Key, Version] = {}
        self._failed: dict[Key, Version] = {}  # the last failed attempt, until its file changes
        self._unloading: list[Version] = []
        self._found: dict[Key, Found] = {}
        self.problems: list[Problem] = []
        self.required: frozenset[str] | None = None  # set by the first scan, unless configured
        self.scans = 0
        self.default_name: str | None = settings.default_model or None  # kept by sync()
        self._lock = asyncio.Lock()
        self._unloads: set[asyncio.Task[None]] = set()

    # --- what is served --------------------------------------------------------------------------
    def _default(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        names = {name for name, _ in self._found} | set(self.serving)
        return next(iter(names)) if len(names) == 1 else None

    def acquire(self, name: str | None = None, version: str | None = None) -> Version:
        """:meth:`find`, leased until the ``with`` block on the returned version ends: it is not
        unloaded meanwhile."""
        chosen = self.find(name, version)
        chosen.leases += 1
        return chosen

    def find(self, name: str | None = None, version: str | None = None) -> Version:
        """The version a request should use: the model's (default: the default model's) newest
        served version, unless ``version`` names another. Raises ModelNotFound or
        ModelNotReady."""
        if name is None:
            name = self.default_name
            if name is None:
                if self.required is None:
                    raise ModelNotReady("not ready: the model repository is being read")
                raise ModelNotFound(self._which_default())
        served = self.serving.get(name)
        if not served:
            raise self._not_served(name)
        chosen = served[0]
        if version is not None and chosen.version != version:
            for v in served:
                if v.version == version:
                    chosen = v
                    break
            else:
                raise self._version_not_served(name, version, served)
        return chosen

    def _which_default(self) -> str:
        names = sorted({n for n, _ in self._found} | set(self.serving))
        if not names:
            return f"no model is served: the repository {self.settings.model_path} holds none"
        return (f"several models are served ({', '.join(names)}): POST to "
                f"/v1/models/{{name}}/classify, or set IMGSERVE_DEFAULT_MODEL")

    def _not_served(self, name: str) -> ModelNotFound | ModelNotReady:
        known = [r for r in self.listing() if r.name == name]
        if not known:
            names = sorted(self.serving) or ["none"]
            return ModelNotFound(f"unknown model {echo(name)}; served: {', '.join(names)}")
        why = "; ".join(f"version {r.version} {r.state.value}"
                        + (f": {r.reason}" if r.reason else "") for r in known)
        return ModelNotReady(f"model {name!r} is not ready ({why})")

    def _version_not_served(self, name: str, version: str,
                            served: tuple[Version, ...]) -> ModelNotFound | ModelNotReady:
        versions = ", ".join(v.version for v in served)
        if (name, version) in self._loading:
            return ModelNotReady(f"model {name!r} version {version!r} is loading")
        if (name, version) in self._found:
            return ModelNotFound(f"model {name!r} version {version!r} is in the repository but "
                                 f"not served (version policy {self.policy}); served: {versions}")
        return ModelNotFound(f"model {name!r} has no version {echo(version)}; served: "
                             f"{versions}")

    def ready(self) -> tuple[bool, str]:
        """Whether every required model serves a version, and if not, why."""
        if self.required is None:
            return False, "the model repository is being read"
        if not self.required and not self.serving:
            if self.problems:
                return False, "; ".join(f"{p.path} failed to load: {p.reason}"
                                        for p in self.problems)
            return False, f"no model found in {self.settings.model_path}"
        missing = sorted(n for n in self.required if not self.serving.get(n))
        if not missing:
            return True, ""
        return False, "; ".join(self._not_served(n).message for n in missing)

    def listing(self) -> list[Row]:
        """Every model version known, with its state and, when not ready, why."""
        rows: list[Row] = []
        served_keys = set()
        for versions in self.serving.values():
            for v in versions:
                rows.append(Row(v.name, v.version, State.READY, "", v.found.path, v.found.note, v))
                served_keys.add(v.key)
        for v in (*self._loading.values(), *self._failed.values(), *self._unloading):
            rows.append(Row(v.name, v.version, v.state, v.reason, v.found.path, v.found.note,
                            v if v.state == State.UNLOADING else None))
        busy = served_keys | set(self._loading) | set(self._failed)
        for key, f in self._found.items():
            if key not in busy:
                rows.append(Row(f.name, f.version, State.UNAVAILABLE,
                                f"not chosen by the version policy {self.policy}", f.path, f.note))
        for p in self.problems:
            if (p.name, p.version) not in busy:
                rows.append(Row(p.name or p.path.stem, p.version, State.FAILED, p.reason, p.path))
        return sorted(rows, key=lambda r: (r.name, version_key(r.version), r.state.value))

    # --- loading and swapping --------------------------------------------------------------------
    async def sync(self) -> None:
        """Bring what is served in line with the repository."""
        async with self._lock:
            found, problems = await asyncio.to_thread(scan, self.settings.model_path)
            self._found = {(f.name, f.version): f for f in found}
            self.default_name = self._default()
            by_name: dict[str, list[Found]] = {}
            for f in found:
                by_name.setdefault(f.name, []).append(f)
            if self.required is None:
                wanted = [n.strip() for n in self.settings.required_models.split(",")]
                self.required = frozenset(n for n in wanted if n) or frozenset(by_name)
            for name, items in sorted(by_name.items()):
                await self._sync_model(name, {f.version: f for f in items})
            for name in [n for n in self.serving if n not in by_name]:
                log.warning("model %s is no longer in the repository: unloading it", name)
                self._swap(name, ())
            for key in [k for k in self._failed if k not in self._found]:
                del self._failed[key]  # its file is gone: nothing to report or retry
            self.problems = problems
            for p in problems:
                log.warning("repository: %s: %s", p.path, p.reason)
            self._metrics.repository_problems.set(len(problems) + len(self._failed))
            self.scans += 1

    async def _sync_model(self, name: str, on_disk: dict[str, Found]) -> None:
        while True:  # a failed load leaves the choice to the next version the policy allows
            # A version whose changed file failed to load goes on serving its loaded copy.
            usable = [v for v, f in on_disk.items()
                      if not self._failed_before(f) or (name, v) in self._loaded]
            wanted = self.policy.select(usable)
            to_load = [f for f in (on_disk[v] for v in wanted)
                       if not self._is_loaded(f) and not self._failed_before(f)]
            if not to_load:
                break
            for f in to_load:
                await self._load(f)
        self._swap(name, tuple(self._loaded[(name, v)] for v in wanted))

    def _failed_before(self, f: Found) -> bool:
        failed = self._failed.get((f.name, f.version))
        return failed is not None and failed.found.signature == f.signature

    def _is_loaded(self, f: Found) -> bool:
        loaded = self._loaded.get((f.name, f.version))
        return loaded is not None and loaded.found.signature == f.signature

    def _swap(self, name: str, new: tuple[Version, ...]) -> None:
        old = self.serving.get(name, ())
        if old == new:
            return
        if new:
            self.serving[name] = new  # new requests resolve to these from now on
        else:
            self.serving.pop(name, None)
        for v in old:
            if v not in new:
                if self._loaded.get(v.key) is v:
                    del self._loaded[v.key]
                self._begin_unload(v)
        self._metrics.model_swaps.labels(name).inc()
        log.info("model %s now serves version(s) %s (was %s)", name,
                 ", ".join(v.version for v in new) or "none",
                 ", ".join(v.version for v in old) or "none")

    async def _load(self, f: Found) -> None:
        s = self.settings
        v = Version(f.name, f.version, f)
        self._loading[v.key] = v
        classifier: Classifier | None = None
        started = time.perf_counter()
        try:
            classifier = await asyncio.to_thread(
                self._factory, s.model_copy(update={"model_path": f.path}))
            if s.warmup:
                await asyncio.to_thread(classifier.warmup, sorted({1, s.max_batch_size}))
            if s.require_gpu and classifier.provider == CPU:
                raise ModelLoadError(f"require_gpu is set but the session runs on CPU: "
                                     f"{classifier.provider_note}")
            workers = s.inference_workers or (1 if classifier.provider == CPU or s.workers > 1
                                              else 2)
            inline = await asyncio.to_thread(self._choose_inline, classifier, workers)
            v.classifier = classifier
            v.metadata = dataclasses.replace(classifier.metadata, name=f.name,
                                             version=f.version)
            v.metrics = self._metrics.for_model(f.name, f.version)
            v.batcher = Batcher(classifier.predict, max_batch_size=s.max_batch_size,
                                max_wait_s=s.max_wait_ms / 1000,
                                max_queue_images=s.max_queue_images, workers=workers,
                                inline=inline, metrics=v.metrics,
                                attach_thread=classifier.attach_thread)
            # With sessions per inference thread, each is made and warmed on its thread here:
            # on a GPU that can fail (out of memory) as a load can.
            await v.batcher.start()
        except Exception as exc:
            if v.batcher is not None:
                await v.batcher.stop(0)
            if v.metrics is not None and classifier is not None:
                v.metrics.remove(classifier.provider)
            if classifier is not None:
                classifier.close()
            v.batcher = v.classifier = v.metrics = None
            v.state, v.reason = State.FAILED, str(exc) or type(exc).__name__
            self._failed[v.key] = v
            self._metrics.model_loads.labels(f.name, "failed").inc()
            if isinstance(exc, ModelLoadError):
                log.error("model %s version %s failed to load: %s", f.name, f.version, exc)
            else:
                log.exception("model %s version %s failed to load", f.name, f.version)
            return
        finally:
            del self._loading[v.key]
        v.state, v.loaded_at = State.READY, time.time()
        self._loaded[v.key] = v
        self._failed.pop(v.key, None)
        self._metrics.model_loads.labels(f.name, "loaded").inc()
        self._metrics.model_info.labels(f.name, f.version, classifier.provider).set(1)
        log.info("model %s version %s loaded from %s on %s (%s) in %.2f s; inference %s%s",
                 f.name, f.version, f.path, classifier.provider, classifier.provider_note,
                 time.perf_counter() - started, "inline" if inline else "in a thread",
                 f"; {f.note}" if f.note else "")

    def _choose_inline(self, classifier: Classifier, workers: int) -> bool:
        """Whether batches run on the event loop's thread (see ``Settings.inference_inline``):
        only where a full batch is short, so the loop is never held for long."""
        s = self.settings
        if s.inference_inline != "auto":
            return s.inference_inline == "on"
        if not s.warmup or workers != 1 or classifier.provider != CPU:
            return False
        c, h, w = classifier.metadata.input_shape[1:]
        batch = np.zeros((s.max_batch_size, c, h, w), dtype=np.float32)
        took = []
        for _ in range(2):  # warm already: the faster of two calls
            started = time.perf_counter()
            classifier.predict(batch)
            took.append(time.perf_counter() - started)
        return min(took) * 1000 <= s.inline_max_batch_ms

    # --- unloading -------------------------------------------------------------------------------
    def _begin_unload(self, v: Version) -> None:
        v.state = State.UNLOADING
        self._unloading.append(v)
        task = asyncio.create_task(self._unload(v), name=f"unload-{v.name}-{v.version}")
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _unload(self, v: Version) -> None:
        """Once the requests that resolved ``v`` are answered (at most the grace period), stop
        its batcher and free its session."""
        deadline = time.monotonic() + self.settings.graceful_timeout_s
        while v.leases > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        try:
            if v.batcher is not None:
                await v.batcher.stop(max(0.0, deadline - time.monotonic()))
            if v.classifier is not None:
                await asyncio.to_thread(v.classifier.close)
                if v.metrics is not None:
                    v.metrics.remove(v.classifier.provider)
        finally:
            v.batcher = v.classifier = v.metrics = None
            self._unloading.remove(v)
            log.info("model %s version %s unloaded", v.name, v.version)
            await asyncio.to_thread(_release_memory)

    async def close(self) -> None:
        """Stop every batcher (draining what is queued) and free every session: the shutdown."""
        async with self._lock:
            for name in list(self.serving):
                self._swap(name, ())
            for v in list(self._loaded.values()):
                self._begin_unload(v)
            self._loaded.clear()
            if self._unloads:
                await asyncio.gather(*self._unloads, return_exceptions=True)


def _release_memory() -> None:
    """Give a freed session's memory back to the system: glibc keeps freed heap pages otherwise,
    and RSS would grow with every swap."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
