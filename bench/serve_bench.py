"""Serving benchmark: this service against a naive FastAPI baseline, measured in one run.

Drives each server with wrk (Debian package `wrk`) on loopback at several concurrencies, with a
28x28 Fashion-MNIST PNG and a 640x480 JPEG photo, and prints requests/s, p50/p99 latency and
the mean batch size, plus the ratio of this service to the faster naive variant.

    .venv/bin/python bench/serve_bench.py                 # full table, ~4 minutes
    .venv/bin/python bench/serve_bench.py --duration 5 --concurrency 64 --only ours
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
IMAGES = {"png": DATA / "fmnist_sneaker.png", "photo": DATA / "photo_640x480.jpg"}
MODEL = ROOT / "models" / "fashion_mnist_seed_cnn.onnx"
LUA = """
local f = assert(io.open("{path}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "{ctype}"
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


def start(kind: str, port: int, env_extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT)}
    if kind == "ours":
        cmd = [sys.executable, "-m", "service", "--port", str(port), "--model", str(MODEL)]
        env.setdefault("IMGSERVE_ACCESS_LOG", "false")
        env.setdefault("IMGSERVE_LOG_LEVEL", "warning")
    else:
        workers = kind.split("-")[1]
        cmd = [sys.executable, "-m", "uvicorn", "bench.naive_server:app", "--port", str(port),
               "--workers", workers, "--log-level", "warning", "--no-access-log"]
        env["NAIVE_MODEL"] = str(MODEL)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    health = "/health/ready" if kind == "ours" else "/docs"
    wait_http(f"http://127.0.0.1:{port}{health}")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def batch_stats(port: int) -> tuple[float, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        text = resp.read().decode()
    total = re.search(r"^imgserve_batch_size_images_sum ([\d.e+]+)$", text, re.M)
    count = re.search(r"^imgserve_batch_size_images_count ([\d.e+]+)$", text, re.M)
    return (float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0)


def parse_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        return float("nan")
    value, unit = match.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(port: int, image: Path, concurrency: int, duration: float, threads: int) -> tuple[
        float, float, float, int]:
    ctype = "image/png" if image.suffix == ".png" else "image/jpeg"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(LUA.format(path=image, ctype=ctype))
    cmd = ["wrk", "-t", str(min(threads, concurrency)), "-c", str(concurrency), "-d",
           f"{duration:g}s", "--latency", "-s", fh.name, f"http://127.0.0.1:{port}/v1/classify"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    if "Requests/sec" not in out:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    os.unlink(fh.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = parse_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = parse_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return rps, p50, p99, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--images", nargs="+", default=list(IMAGES), choices=list(IMAGES))
    parser.add_argument("--only", nargs="+", default=["ours", "naive-1", "naive-2"])
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE for our server")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    env_extra = dict(kv.split("=", 1) for kv in args.env)
    results: list[Result] = []
    for kind in args.only:
        port = free_port()
        proc = start(kind, port, env_extra if kind == "ours" else {})
        try:
            for image in args.images:
                run_wrk(port, IMAGES[image], 8, 1, args.wrk_threads)  # warm the path
                for c in args.concurrency:
                    before = batch_stats(port) if kind == "ours" else (0.0, 0.0)
                    rps, p50, p99, errors = run_wrk(port, IMAGES[image], c, args.duration,
                                                    args.wrk_threads)
                    after = batch_stats(port) if kind == "ours" else (0.0, 0.0)
                    batches = after[1] - before[1]
                    mean = (after[0] - before[0]) / batches if batches else 1.0
                    results.append(Result(kind, image, c, rps, p50, p99, errors, mean))
                    print(f"{kind:8} {image:5} c={c:<3} {rps:8.0f} req/s  p50 {p50:7.2f} ms  "
                          f"p99 {p99:7.2f} ms  batch {mean:5.1f}  errors {errors}", flush=True)
        finally:
            stop(proc)
    print("\n| server | image | concurrency | req/s | p50 ms | p99 ms | mean batch | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.server} | {r.image} | {r.concurrency} | {r.rps:.0f} | {r.p50_ms:.2f} | "
              f"{r.p99_ms:.2f} | {r.mean_batch:.1f} | {r.errors} |")
    ours = {(r.image, r.concurrency): r for r in results if r.server == "ours"}
    naive = [r for r in results if r.server.startswith("naive")]
    if ours and naive:
        print("\n| image | concurrency | ours / best naive (req/s) | p99 ours vs best naive |")
        print("|---|---|---|---|")
        for (image, c), r in ours.items():
            peers = [n for n in naive if n.image == image and n.concurrency == c]
            if peers:
                best = max(peers, key=lambda n: n.rps)
                print(f"| {image} | {c} | {r.rps / best.rps:.2f}x ({best.server}) | "
                      f"{r.p99_ms:.2f} vs {best.p99_ms:.2f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
