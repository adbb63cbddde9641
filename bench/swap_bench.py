"""Model versions swapped live under load: no request lost, every answer from the version it
names, latency during swaps, memory after them.

Builds a model repository with one model, ``clothes``, whose versions are the shipped CNN with
its logits scaled by a different factor each (same classes, different scores, so an answer's
scores tell which version computed them). Starts ``python -m service --model REPO`` with its
defaults (one worker process per core here) and drives it with ``--clients`` concurrent clients,
each sending multipart requests of ``--images`` real Fashion-MNIST PNGs over a keep-alive
connection. After a steady phase it swaps versions ``--swaps`` times: it writes version v+1 the
way an operator should (a hidden name, then a rename into place) and sends the server SIGHUP.

It checks and reports: every request answered 200; every answer's scores equal, within 1e-5,
those ONNX Runtime gives for the version the answer names (computed here); when each swap's
first new answer and last old answer came; p99 latency of requests started within swap windows
against the steady phase; the RSS of the server's processes after the first swap and after the
last (the old sessions are freed).

    .venv/bin/python bench/swap_bench.py --clients 64 --swaps 10
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_bench import cpu_model, free_port, wait_http  # noqa: E402
from bench.soak import rss_and_fds, tree  # noqa: E402
from service.config import DEFAULT_MODEL  # noqa: E402
from service.imaging import open_image, pixels_of, to_model_input  # noqa: E402
from service.model import read_metadata  # noqa: E402
from training.data import load_fashion_mnist  # noqa: E402

NAME = "clothes"


def version_file(root: Path, version: int) -> Path:
    """Write version ``version`` of the model into the repository, atomically."""
    model = onnx.load(str(DEFAULT_MODEL))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    gemm = next(n for n in model.graph.node if softmax.input[0] in n.output)
    scale = 1 / (1 + 0.3 * version)  # the scores differ per version; the ranking does not
    for init in model.graph.initializer:
        if init.name in gemm.input[1:]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale,
                                                  init.name))
    for prop in model.metadata_props:
        if prop.key == "imgserve.model_name":
            prop.value = NAME
        elif prop.key == "imgserve.model_version":
            prop.value = str(version)
    dest = root / NAME / str(version) / "model.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / ".model.onnx.tmp"
    onnx.save(model, str(tmp))
    tmp.replace(dest)
    return dest


def reference_scores(path: Path, images: list[bytes]) -> np.ndarray:
    """Probabilities for ``images`` from the version file, computed here with ONNX Runtime."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = read_metadata(session, path, "")
    pixels = np.stack([pixels_of(open_image(b, 10**8), meta.spec) for b in images])
    return np.asarray(session.run(None, {meta.input_name: to_model_input(pixels)})[0])


@dataclass
class Load:
    """What the clients saw: (start, end, status, version) per request, and mismatches."""

    records: list[tuple[float, float, int, str]] = field(default_factory=list)
    wrong_scores: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: bool = False


async def client(port: int, body: bytes, ctype: str, refs: dict[str, np.ndarray],
                 load: Load) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        while not load.stop:
            start = time.monotonic()
            try:
                resp = await http.post(f"/v1/models/{NAME}/classify?top_k=10", content=body,
                                       headers={"content-type": ctype})
            except httpx.HTTPError as exc:
                load.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            end = time.monotonic()
            version = ""
            if resp.status_code == 200:
                answer = resp.json()
                version = answer["model"]["version"]
                ref = refs.get(version)
                for row, result in enumerate(answer["results"]):
                    got = {p["index"]: p["score"] for p in result["predictions"]}
                    want = ref[row] if ref is not None else None
                    if want is None or not all(abs(got[i] - float(want[i])) < 1e-5
                                               for i in range(len(want))):
                        load.wrong_scores.append(f"version {version} image {row}")
            else:
                load.errors.append(f"{resp.status_code}: {resp.text[:200]}")
            load.records.append((start, end, resp.status_code, version))


def multipart(images: list[bytes]) -> tuple[bytes, str]:
    boundary = "swapbenchboundary"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
             f"filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n".encode() + data + b"\r\n"
             for i, data in enumerate(images)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


async def drive(port: int, server: subprocess.Popen[bytes], root: Path, images: list[bytes],
                args: argparse.Namespace) -> dict[str, object]:
    refs = {"1": reference_scores(root / NAME / "1" / "model.onnx", images)}
    body, ctype = multipart(images)
    load = Load()
    tasks = [asyncio.create_task(client(port, body, ctype, refs, load))
             for _ in range(args.clients)]
    await asyncio.sleep(args.warmup)
    steady_from = time.monotonic()
    await asyncio.sleep(args.steady)
    steady_to = time.monotonic()
    swaps: list[tuple[str, str, float]] = []  # (old, new, SIGHUP time)
    rss: list[float] = []
    for i in range(args.swaps):
        old, new = str(i + 1), str(i + 2)
        path = await asyncio.to_thread(version_file, root, i + 2)
        refs[new] = await asyncio.to_thread(reference_scores, path, images)
        sent = time.monotonic()
        os.kill(server.pid, signal.SIGHUP)
        swaps.append((old, new, sent))
        await asyncio.sleep(args.gap)
        rss.append(rss_and_fds(tree(server.pid))[0])
    await asyncio.sleep(args.steady / 2)
    load.stop = True
    await asyncio.gather(*tasks)
    return {**summarise(load, swaps, rss, steady_from, steady_to, args),
            "metric_versions": await metric_versions(port)}


async def metric_versions(port: int, scrapes: int = 8) -> list[str]:
    """The model versions /metrics shows series for, over several scrapes on new connections
    (so that every worker answers some): after the swaps, only the last should remain."""
    seen: set[str] = set()
    for _ in range(scrapes):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            text = (await http.get("/metrics")).text
        for line in text.splitlines():
            if line.startswith("imgserve_") and 'version="' in line:
                seen.add(line.split('version="', 1)[1].split('"', 1)[0])
    return sorted(seen, key=int)


def summarise(load: Load, swaps: list[tuple[str, str, float]], rss: list[float],
              steady_from: float, steady_to: float, args: argparse.Namespace) -> dict[str, object]:
    steady = [e - s for s, e, _, _ in load.records if steady_from <= s < steady_to]
    windows = []
    per_swap = []
    for old, new, sent in swaps:
        firsts = [e for s, e, st, v in load.records if v == new]
        lasts = [e for s, e, st, v in load.records if v == old and e >= sent]
        first_new = (min(firsts) - sent) if firsts else float("nan")
        last_old = (max(lasts) - sent) if lasts else 0.0
        per_swap.append((first_new, last_old))
        windows.append((sent, sent + max(last_old, first_new, 1.0)))
    during = [e - s for s, e, _, _ in load.records if any(a <= s < b for a, b in windows)]
    final = {v for s, e, st, v in load.records if s > swaps[-1][2] + args.gap * 0.9} if swaps \
        else set()
    return {
        "requests": len(load.records),
        "non_200": sum(1 for r in load.records if r[2] != 200) + len(load.errors),
        "errors": load.errors[:5],
        "wrong_scores": len(load.wrong_scores),
        "versions_answered": sorted({r[3] for r in load.records if r[3]}, key=int),
        "final_versions": sorted(final),
        "steady_p50_ms": percentile(steady, 50),
        "steady_p99_ms": percentile(steady, 99),
        "swap_p50_ms": percentile(during, 50),
        "swap_p99_ms": percentile(during, 99),
        "swap_requests": len(during),
        "first_new_answer_ms": [round(f * 1000, 1) for f, _ in per_swap],
        "last_old_answer_ms": [round(last * 1000, 1) for _, last in per_swap],
        "rss_mib_after_each_swap": [round(r, 1) for r in rss],
        "throughput_req_s": len(load.records) / max(1e-9, load.records[-1][1]
                                                     - load.records[0][0]),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    fm = load_fashion_mnist("test")
    images = []
    for i in range(args.images):
        buf = io.BytesIO()
        Image.fromarray(fm.images[i, 0].numpy()).save(buf, format="PNG")
        images.append(buf.getvalue())
    root = Path(tempfile.mkdtemp(prefix="swap-repo-"))
    version_file(root, 1)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMGSERVE_PORT": str(port),
           "IMGSERVE_ACCESS_LOG": "false"}
    if args.workers:
        env["IMGSERVE_WORKERS"] = str(args.workers)
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "service", "--model", str(root)], env=env,
                              cwd=ROOT, stdout=log, stderr=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/ready")
        result = asyncio.run(drive(port, server, root, images, args))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        warnings = [line for line in (root / "server.log").read_text().splitlines()
                    if "WARNING" in line or "Warning" in line]
        if args.keep:
            print(f"repository and server log kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return {**result, "log_warnings": warnings[:5]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--images", type=int, default=4, help="images per request")
    p.add_argument("--swaps", type=int, default=10)
    p.add_argument("--gap", type=float, default=3.0, help="seconds between swaps")
    p.add_argument("--steady", type=float, default=10.0, help="seconds of steady load measured")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--workers", type=int, default=0, help="server processes (0: its default)")
    p.add_argument("--keep", action="store_true", help="keep the repository and server log")
    return p


def main() -> int:
    args = parser().parse_args()
    print(f"# {cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    result = run(args)
    for key, value in result.items():
        print(f"{key}: {value}")
    rss = result["rss_mib_after_each_swap"]
    assert isinstance(rss, list)
    if rss:
        print(f"rss change, first swap -> last: {100 * (rss[-1] - rss[0]) / rss[0]:+.1f}%")
    ok = not result["non_200"] and not result["wrong_scores"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
