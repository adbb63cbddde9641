"""Soak test: the service under steady load for a long time, watched for drift.

Starts the service (its defaults), measures its capacity with a mix of requests (28x28 PNGs,
640x480 JPEGs, 4-image multipart uploads and invalid bodies), then drives it with wrk at about
``--load`` of that capacity for ``--minutes``, paced by wrk's per-request delay. Every
``--every`` seconds it samples the RSS and open file descriptors of every server process and,
from the server's own /metrics, requests by status class and the p99 latency of the interval.
It writes the series (CSV) and a plot, and prints the summary: RSS drift after warm-up,
unexpected errors (5xx), and p99 over time.

    .venv/bin/python bench/soak.py --minutes 60 --out runs/soak
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_bench import IMAGES, MODEL, cpu_model, free_port, start_server, stop  # noqa: E402

LUA = """
local function read(path)
  local f = assert(io.open(path, "rb")); local d = f:read("*all"); f:close(); return d
end
init = function(args)
  local png, photo, multi = read(args[1]), read(args[2]), read(args[3])
  local mp = "multipart/form-data; boundary=" .. args[4]
  pause = tonumber(args[5])
  reqs = {}
  for _ = 1, 6 do reqs[#reqs + 1] = wrk.format("POST", "/v1/classify",
    {["Content-Type"] = "image/png"}, png) end
  for _ = 1, 2 do reqs[#reqs + 1] = wrk.format("POST", "/v1/classify",
    {["Content-Type"] = "image/jpeg"}, photo) end
  reqs[#reqs + 1] = wrk.format("POST", "/v1/classify?top_k=3", {["Content-Type"] = mp}, multi)
  reqs[#reqs + 1] = wrk.format("POST", "/v1/classify",
    {["Content-Type"] = "image/png"}, "this is not an image")
  i = 0
end
request = function() i = i + 1; return reqs[(i % #reqs) + 1] end
delay = function() return pause end
"""
CONNECTIONS = 16


def multipart(tmp: Path) -> tuple[Path, str]:
    boundary = uuid.uuid4().hex
    png, photo = IMAGES["png"].read_bytes(), IMAGES["photo"].read_bytes()
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
             f"filename=\"{i}\"\r\n\r\n".encode() + data + b"\r\n"
             for i, data in enumerate([png, photo, png, b"broken"])]
    path = tmp / "multi"
    path.write_bytes(b"".join(parts) + f"--{boundary}--\r\n".encode())
    return path, boundary


def wrk(port: int, lua: Path, args: list[str], seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "-s", str(lua),
                             f"http://127.0.0.1:{port}/v1/classify", "--", *args],
                            stdout=subprocess.PIPE, text=True)


def rate(out: str) -> float:
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def tree(pid: int) -> list[int]:
    """The process and its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        todo += [int(c) for c in children]
    return pids


def rss_and_fds(pids: list[int]) -> tuple[float, int]:
    rss_kib, fds = 0, 0
    for p in pids:
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rss_kib += int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (OSError, AttributeError):
            pass
    return rss_kib / 1024, fds


def scrape(port: int) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """Requests by status class, and the cumulative latency histogram of /v1/classify."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    counts: dict[str, float] = {}
    for cls, value in re.findall(r'^imgserve_requests_total\{route="/v1/classify",'
                                 r'status_class="(\w+)"\} ([\d.e+]+)$', text, re.M):
        counts[cls] = float(value)
    buckets = [(float("inf") if le == "+Inf" else float(le), float(v)) for le, v in re.findall(
        r'^imgserve_request_duration_seconds_bucket\{le="([^"]+)",route="/v1/classify"\} '
        r'([\d.e+]+)$', text, re.M)]
    return counts, sorted(buckets)


def p99(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float:
    """The 99th percentile (ms) of the requests between two scrapes, from bucket deltas."""
    prev = dict(before)
    deltas = [(le, n - prev.get(le, 0.0)) for le, n in after]
    total = deltas[-1][1] if deltas else 0
    if total <= 0:
        return float("nan")
    lower, below = 0.0, 0.0
    for le, n in deltas:
        if n >= 0.99 * total:
            if le == float("inf"):
                return lower * 1000
            share = (0.99 * total - below) / max(n - below, 1e-9)
            return (lower + (le - lower) * share) * 1000
        lower, below = le, n
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of capacity")
    parser.add_argument("--every", type=float, default=5, help="seconds between samples")
    parser.add_argument("--warmup-minutes", type=float, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "soak")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_server([sys.executable, "-m", "service", "--port", str(port), "--model",
                         str(MODEL)], {}, f"http://127.0.0.1:{port}/health/ready")
    rows: list[dict[str, float]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            lua = Path(tmp) / "mix.lua"
            lua.write_text(LUA)
            multi, boundary = multipart(Path(tmp))
            base = [str(IMAGES["png"]), str(IMAGES["photo"]), str(multi), boundary]
            capacity = rate(wrk(port, lua, [*base, "0"], 15).communicate()[0])
            # pace each connection: CONNECTIONS requests in flight at most, one every `pause` ms
            target = args.load * capacity
            pause = max(0, int(CONNECTIONS * 1000 / target - 1))
            probe = rate(wrk(port, lua, [*base, str(pause)], 10).communicate()[0])
            pause = max(0, int(pause * probe / target))  # one correction
            print(f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu_model()}, {os.cpu_count()} cores; "
                  f"capacity {capacity:,.0f} req/s with the mix; target {target:,.0f} req/s "
                  f"({args.load:.0%}); wrk -c{CONNECTIONS}, {pause} ms pause per request",
                  flush=True)
            load = wrk(port, lua, [*base, str(pause)], args.minutes * 60)
            started = time.monotonic()
            counts, hist = scrape(port)
            while load.poll() is None:
                time.sleep(args.every)
                if load.poll() is not None:
                    break
                now_counts, now_hist = scrape(port)
                rss, fds = rss_and_fds(tree(proc.pid))
                served = sum(now_counts.values()) - sum(counts.values())
                row = {"minute": (time.monotonic() - started) / 60, "rss_mib": rss,
                       "open_fds": fds, "req_per_s": served / args.every,
                       "p99_ms": p99(hist, now_hist),
                       "errors_4xx": now_counts.get("4xx", 0) - counts.get("4xx", 0),
                       "errors_5xx": now_counts.get("5xx", 0) - counts.get("5xx", 0)}
                rows.append(row)
                counts, hist = now_counts, now_hist
                if len(rows) % max(1, int(60 / args.every)) == 0:
                    print(" ".join(f"{k} {v:,.1f}" for k, v in row.items()), flush=True)
            final = load.communicate()[0]
    finally:
        stop(proc)
    with (args.out / "soak.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summarise(rows, args, final)
    plot(rows, args.out / "soak.png")
    return 0


def summarise(rows: list[dict[str, float]], args: argparse.Namespace, wrk_out: str) -> None:
    warm = [r for r in rows if r["minute"] >= args.warmup_minutes]
    first = [r["rss_mib"] for r in warm if r["minute"] < args.warmup_minutes + 5]
    last = [r["rss_mib"] for r in warm if r["minute"] >= args.minutes - 5]
    p99s = [r["p99_ms"] for r in warm if r["p99_ms"] == r["p99_ms"]]
    drift = (sum(last) / len(last)) / (sum(first) / len(first)) - 1 if first and last else 0
    fds = [r["open_fds"] for r in warm]
    rps = [r["req_per_s"] for r in warm]
    print(f"\nsoak: {args.minutes:g} min; RSS after warm-up {sum(first) / max(len(first), 1):.1f}"
          f" MiB -> last 5 min {sum(last) / max(len(last), 1):.1f} MiB (drift {drift:+.1%}); "
          f"open fds {min(fds):.0f}-{max(fds):.0f}; 5xx {sum(r['errors_5xx'] for r in rows):.0f};"
          f" 4xx (the invalid bodies) {sum(r['errors_4xx'] for r in rows):.0f}; req/s "
          f"{min(rps):,.0f}-{max(rps):,.0f}; interval p99 median "
          f"{sorted(p99s)[len(p99s) // 2]:.1f} ms, max {max(p99s):.1f} ms")
    print("wrk:", " ".join(line.strip() for line in wrk_out.splitlines()
                           if "Latency" in line or "Requests/sec" in line or "Non-2xx" in line
                           or "Socket errors" in line))


def plot(rows: list[dict[str, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    minutes = [r["minute"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    for ax, key, label in zip(axes, ("rss_mib", "open_fds", "req_per_s", "p99_ms"),
                              ("RSS, all processes (MiB)", "open file descriptors", "requests/s",
                               "p99 latency (ms)"), strict=True):
        ax.plot(minutes, [r[key] for r in rows])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle("imgserve soak")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
