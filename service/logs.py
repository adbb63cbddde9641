"""Logging set-up: plain text or one JSON object per line; the access log writes its own
lines in the same two shapes (see :class:`AccessLog`)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import IO, Any
from urllib.parse import quote


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str = "info", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


MAX_LOGGED_PATH = 512
_SAFE_IN_PATH = "/!$&'()*+,;=:@-._~%"


def loggable_path(path: str) -> str:
    """A request path as one log field: what is not printable ASCII, and spaces, written as
    %XX (a decoded %0a would otherwise start a forged line, and %20 a forged field), and cut at
    ``MAX_LOGGED_PATH`` characters."""
    if not (path.isascii() and path.isprintable() and " " not in path):
        path = quote(path, safe=_SAFE_IN_PATH)
    if len(path) > MAX_LOGGED_PATH:
        path = path[:MAX_LOGGED_PATH] + "..."
    return path


class AccessLog:
    """One line per request, in the shape of the other log lines (text or JSON), written in
    batches: when ``max_lines`` are waiting or ``flush_s`` after the first, and at shutdown.

    Going through ``logging`` and a flush per line cost about 12% of the requests/s of a small
    image; this is nginx's ``access_log ... buffer= flush=``. Lines are written on the event
    loop's thread only, so they may reach stderr up to ``flush_s`` after other log lines.
    """

    def __init__(self, json_lines: bool = False, stream: IO[str] | None = None,
                 flush_s: float = 0.1, max_lines: int = 256) -> None:
        self.json_lines = json_lines
        self.stream = stream
        self.flush_s = flush_s
        self.max_lines = max_lines
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def _time(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S" if self.json_lines
                                        else "%Y-%m-%d %H:%M:%S", time.localtime(second))
        return self._stamp if self.json_lines else f"{self._stamp},{int(now % 1 * 1000):03d}"

    def request(self, method: str, path: str, status: int, model: str | None, images: int,
                batch_size: int | None, latency_ms: float) -> None:
        """The line for one answered request, formatted in one operation (this runs once per
        request). The path is the client's: see :func:`loggable_path`."""
        stamp = self._time(time.time())
        path = loggable_path(path)
        if self.json_lines:
            line = json.dumps({"time": stamp, "level": "info", "logger": "service.access",
                               "message": "request", "method": method, "path": path,
                               "status": status, "model": model, "images": images,
                               "batch_size": batch_size, "latency_ms": latency_ms})
        else:
            line = (f"{stamp} INFO service.access: request method={method} path={path} "
                    f"status={status} model={model} images={images} batch_size={batch_size} "
                    f"latency_ms={latency_ms}")
        self._lines.append(line)
        if len(self._lines) >= self.max_lines:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            stream = self.stream or sys.stderr
            stream.write("\n".join(self._lines) + "\n")
            stream.flush()
            self._lines.clear()
