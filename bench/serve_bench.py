"""Serving benchmark: this service against the plain FastAPI handler, measured in one run.

All servers run at once on their own ports; each cell (image, concurrency) is measured on every
server in turn, and the whole table is repeated for ``--rounds`` rounds, so that the machine's
noise falls on all servers alike. wrk (Debian package `wrk`) drives them on loopback with a
28x28 Fashion-MNIST PNG and a 640x480 JPEG photo. The table gives requests/s, p50/p99 latency and
the mean batch size per cell (median over rounds), and the ratio of this service to the faster
plain-handler variant in the same cell.

Servers:
  ours           python -m service, its defaults (access log on, 1 worker per core)
  naive-1/2      bench/naive_server.py under uvicorn[standard], 1 or 2 workers, intra-op 1
  naive-2-draft  the same with Pillow's JPEG draft mode (a stronger plain handler for photos)
  naive-2-spng   the same with PNGs decoded by libspng (a stronger plain handler for PNGs)
  ours:K=V,...   a variant of ours with those IMGSERVE_ settings (to compare settings in one run)

    .venv/bin/python bench/serve_bench.py                  # full table, ~8 minutes
    .venv/bin/python bench/serve_bench.py --duration 4 --concurrency 64 --servers ours naive-2
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
IMAGES = {"png": DATA / "fmnist_sneaker.png", "photo": DATA / "photo_640x480.jpg"}
MODEL = ROOT / "models" / "fashion_mnist_seed_cnn.onnx"
# The plain handler that also uses the service's decoder trick for each image.
STRONGER_PLAIN = {"png": "naive-2-spng", "photo": "naive-2-draft"}
LUA = """
local f = assert(io.open("{path}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
{headers}
"""


@dataclass
class Result:
    server: str
    image: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def start_server(cmd: list[str], env: dict[str, str], health: str) -> subprocess.Popen[bytes]:
    """Start a server command and wait until ``health`` answers 200."""
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(health)
    except Exception:
        stop(proc)
        raise
    return proc


def start(kind: str, port: int, env_extra: dict[str, str], model: Path) -> subprocess.Popen[bytes]:
    if is_ours(kind):
        # "ours:KEY=V,KEY=V" is a variant with those settings, for comparing them in one run.
        variant = dict(kv.split("=", 1) for kv in kind.partition(":")[2].split(",") if kv)
        cmd = [sys.executable, "-m", "service", "--port", str(port), "--model", str(model)]
        # Defaults, access log included; its lines go to /dev/null as a log shipper would take
        # them off a pipe.
        return start_server(cmd, {**env_extra, **variant},
                            f"http://127.0.0.1:{port}/health/ready")
    parts = kind.split("-")
    workers = parts[1]
    cmd = [sys.executable, "-m", "uvicorn", "bench.naive_server:app", "--port", str(port),
           "--workers", workers, "--log-level", "warning", "--no-access-log"]
    env = {"NAIVE_MODEL": str(model), "NAIVE_DRAFT": "1" if "draft" in parts else "0",
           "NAIVE_SPNG": "1" if "spng" in parts else "0"}
    return start_server(cmd, env, f"http://127.0.0.1:{port}/docs")


def is_ours(kind: str) -> bool:
    return kind == "ours" or kind.startswith("ours:")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def batch_stats(port: int) -> tuple[float, float]:
    """Images and model calls so far, from a server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        return batch_totals(resp.read().decode())


def batch_totals(text: str) -> tuple[float, float]:
    """Images and model calls so far, from a Prometheus exposition of the service's metrics."""
    total = re.findall(r"^imgserve_batch_size_images_sum(?:\{[^}]*\})? ([\d.e+]+)$", text, re.M)
    count = re.findall(r"^imgserve_batch_size_images_count(?:\{[^}]*\})? ([\d.e+]+)$", text,
                       re.M)
    return sum(map(float, total)), sum(map(float, count))


def parse_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        return float("nan")
    value, unit = match.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(url: str, body: Path, headers: dict[str, str], concurrency: int, duration: float,
            threads: int) -> tuple[float, float, float, int]:
    """requests/s, p50 ms, p99 ms and the count of errors (non-2xx and socket errors)."""
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(LUA.format(path=body, headers=lines))
    cmd = [os.environ.get("WRK", "wrk"), "-t", str(min(threads, concurrency)), "-c",
           str(concurrency), "-d",
           f"{duration:g}s", "--latency", "-s", fh.name, url]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(fh.name)
    if "Requests/sec" not in out:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = parse_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = parse_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return rps, p50, p99, errors


def median_result(rows: Sequence[Result]) -> Result:
    """The median of each figure over the rounds of one cell; errors are summed."""
    first = rows[0]
    return Result(first.server, first.image, first.concurrency,
                  statistics.median(r.rps for r in rows), statistics.median(r.p50_ms for r in rows),
                  statistics.median(r.p99_ms for r in rows), sum(r.errors for r in rows),
                  statistics.median(r.mean_batch for r in rows))


def round_ratios(raw: dict[tuple[str, str, int], list[Result]], image: str,
                 concurrency: int) -> list[float]:
    """Per round, ours over the faster plain variant measured in that round (the servers of a
    round run back to back, so this shows how far the machine's noise moves the ratio)."""
    ours = raw[("ours", image, concurrency)]
    plain = [raw[(k, image, concurrency)] for k in ("naive-1", "naive-2")
             if (k, image, concurrency) in raw]
    return [mine.rps / max(rows[i].rps for rows in plain) for i, mine in enumerate(ours)]


def header(args: argparse.Namespace) -> str:
    return (f"{datetime.date.today().isoformat()}, {cpu_model()}, {os.cpu_count()} cores; "
            f"`{' '.join(['bench/serve_bench.py', *sys.argv[1:]])}`; {args.rounds} rounds of "
            f"{args.duration:g} s per cell, wrk -t{args.wrk_threads}, medians over rounds")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=6, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the whole table")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--images", nargs="+", default=list(IMAGES), choices=list(IMAGES))
    parser.add_argument("--servers", nargs="+",
                        default=["ours", "naive-1", "naive-2", "naive-2-draft", "naive-2-spng"])
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE for our server")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    env_extra = dict(kv.split("=", 1) for kv in args.env)
    print(header(args), flush=True)
    ports = {kind: free_port() for kind in args.servers}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    raw: dict[tuple[str, str, int], list[Result]] = {}
    try:
        for kind in args.servers:
            procs[kind] = start(kind, ports[kind], env_extra if is_ours(kind) else {},
                                args.model)
        for image in args.images:  # warm every path once
            for kind in args.servers:
                ctype = "image/png" if IMAGES[image].suffix == ".png" else "image/jpeg"
                run_wrk(f"http://127.0.0.1:{ports[kind]}/v1/classify", IMAGES[image],
                        {"Content-Type": ctype}, 8, 1, 1)
        for rnd in range(args.rounds):
            for image in args.images:
                ctype = "image/png" if IMAGES[image].suffix == ".png" else "image/jpeg"
                for c in args.concurrency:
                    order = args.servers if rnd % 2 == 0 else args.servers[::-1]
                    for kind in order:
                        port = ports[kind]
                        before = batch_stats(port) if is_ours(kind) else (0.0, 0.0)
                        rps, p50, p99, errors = run_wrk(
                            f"http://127.0.0.1:{port}/v1/classify", IMAGES[image],
                            {"Content-Type": ctype}, c, args.duration, args.wrk_threads)
                        after = batch_stats(port) if is_ours(kind) else (0.0, 0.0)
                        batches = after[1] - before[1]
                        mean = (after[0] - before[0]) / batches if batches else 1.0
                        raw.setdefault((kind, image, c), []).append(
                            Result(kind, image, c, rps, p50, p99, errors, mean))
                        print(f"round {rnd + 1} {kind:24} {image:5} c={c:<3} {rps:8.0f} req/s  "
                              f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  batch {mean:5.1f}  "
                              f"errors {errors}", flush=True)
    finally:
        for proc in procs.values():
            stop(proc)
    results = [median_result(rows) for rows in raw.values()]
    print(f"\n{header(args)}\n")
    print("| server | image | clients | req/s | p50 ms | p99 ms | mean batch | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r.image, r.concurrency, r.server)):
        print(f"| {r.server} | {r.image} | {r.concurrency} | {r.rps:,.0f} | {r.p50_ms:.2f} | "
              f"{r.p99_ms:.2f} | {r.mean_batch:.1f} | {r.errors} |")
    ours = {(r.image, r.concurrency): r for r in results if r.server == "ours"}
    plain = [r for r in results if r.server in ("naive-1", "naive-2")]
    # The plain handler with the service's decoder trick for that image, where it was run.
    stronger = {(r.image, r.concurrency): r for r in results
                if r.server == STRONGER_PLAIN.get(r.image)}
    if ours and plain:
        print("\n| image | clients | ours / faster plain (req/s) | each round | "
              "p50 ours vs plain | p99 ours vs plain | ours / plain with the decoder trick |")
        print("|---|---|---|---|---|---|---|")
        for (image, c), r in sorted(ours.items()):
            peers = [n for n in plain if n.image == image and n.concurrency == c]
            if not peers:
                continue
            best = max(peers, key=lambda n: n.rps)
            d = stronger.get((image, c))
            rounds = round_ratios(raw, image, c)
            print(f"| {image} | {c} | **{r.rps / best.rps:.2f}x** ({best.server}) | "
                  f"{min(rounds):.2f}-{max(rounds):.2f}x | "
                  f"{r.p50_ms:.2f} vs {best.p50_ms:.2f} ms | {r.p99_ms:.2f} vs "
                  f"{best.p99_ms:.2f} ms | {f'{r.rps / d.rps:.2f}x ({d.server})' if d else '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
