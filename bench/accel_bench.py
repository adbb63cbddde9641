"""The service in front of a simulated accelerator: how much of a device's ceiling it delivers.

The stand-in classifier (:class:`SimulatedAccelerator`, a real ``Classifier`` subclass used only
here) takes a fixed time per call for any batch up to ``max_batch_size`` images, like a GPU that
is far from saturated, and holds a lock while it "computes" (one device: calls never overlap)
with the GIL released (``time.sleep``). With 4 ms per call for up to 64 images its ceiling is
16,000 images/s. wrk drives the real server process with multi-image requests, as /v1
multipart (PNG files, decoded by the server) and as V2 binary FP32 tensors (no decoding), and
the table gives images/s as a fraction of the ceiling and the mean batch size, per setting.
The settings' servers all run at once and each cell is measured on each in turn, so that they
compare within a run.

    .venv/bin/python bench/accel_bench.py                       # ~6 minutes
    .venv/bin/python bench/accel_bench.py --rounds 2            # medians of 2 rounds, ~12
    .venv/bin/python bench/accel_bench.py --per-request 32 --clients 64 --configs default
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_bench import (  # noqa: E402
    batch_stats,
    cpu_model,
    free_port,
    run_wrk,
    start_server,
    stop,
)
from service.config import Settings  # noqa: E402
from service.model import Classifier, OnnxClassifier  # noqa: E402

CALL_S = float(os.environ.get("SIM_CALL_MS", "4")) / 1000
MODEL = ROOT / "models" / "fashion_mnist_seed_cnn.onnx"
PNG = ROOT / "bench" / "data" / "fmnist_sneaker.png"
CONFIGS = {  # name: IMGSERVE_ settings for the server
    "default": {},
    "workers1": {"IMGSERVE_INFERENCE_WORKERS": "1"},
    "wait5": {"IMGSERVE_MAX_WAIT_MS": "5"},
}


class SimulatedAccelerator(Classifier):
    """A fixed ``CALL_S`` per call, one call at a time, whatever the batch size."""

    provider = "SimulatedAccelerator"
    provider_note = "bench stand-in: a fixed time per call"

    def __init__(self, settings: Settings) -> None:
        self.metadata = OnnxClassifier(settings.model_path, settings).metadata
        self._device = threading.Lock()
        self._max = settings.max_batch_size

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] > self._max:
            raise ValueError(f"batch of {batch.shape[0]} over the device's {self._max}")
        with self._device:
            time.sleep(CALL_S)
        probs = np.full((batch.shape[0], self.metadata.num_classes), 0.01, np.float32)
        probs[:, 0] = 1 - 0.01 * (self.metadata.num_classes - 1)
        return probs


def make_simulated(settings: Settings) -> Classifier:
    return SimulatedAccelerator(settings)


def serve_main() -> int:
    """Run the service with the stand-in (the server process of this benchmark)."""
    from service.logs import configure
    from service.supervisor import serve

    settings = Settings()
    configure(settings.log_level, settings.log_json)
    return serve(settings, factory=make_simulated)


def bodies(n: int, tmp: Path) -> dict[str, tuple[Path, dict[str, str]]]:
    """The request bodies for ``n`` images per request, with their headers."""
    png = PNG.read_bytes()
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
             f"filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n".encode() + png + b"\r\n"
             for i in range(n)]
    multipart = tmp / f"multipart{n}"
    multipart.write_bytes(b"".join(parts) + f"--{boundary}--\r\n".encode())
    tensor = np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                   "shape": list(tensor.shape),
                                   "parameters": {"binary_data_size": tensor.nbytes}}],
                       "outputs": [{"name": "probabilities",
                                    "parameters": {"binary_data": True}}]}).encode()
    binary = tmp / f"v2binary{n}"
    binary.write_bytes(head + tensor.tobytes())
    return {
        "v1-multipart": (multipart, {"Content-Type": f"multipart/form-data; boundary={boundary}"}),
        "v2-binary": (binary, {"Content-Type": "application/octet-stream",
                               "Inference-Header-Content-Length": str(len(head))}),
    }


def start_config(config: str, max_batch: int) -> tuple[int, Any]:
    port = free_port()
    env = {"IMGSERVE_PORT": str(port), "IMGSERVE_MODEL_PATH": str(MODEL),
           "IMGSERVE_WORKERS": "1", "IMGSERVE_MAX_BATCH_SIZE": str(max_batch),
           "IMGSERVE_MAX_QUEUE_IMAGES": "16384", "IMGSERVE_LOG_LEVEL": "warning",
           **CONFIGS[config]}
    proc = start_server([sys.executable, str(Path(__file__).resolve()), "--serve"], env,
                        f"http://127.0.0.1:{port}/health/ready")
    return port, proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="passes over the whole table")
    parser.add_argument("--per-request", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--clients", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args()
    ceiling = args.max_batch / CALL_S
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, {os.cpu_count()} cores; "
          f"`bench/accel_bench.py {' '.join(sys.argv[1:])}`; stand-in: {CALL_S * 1000:g} ms per "
          f"call of up to {args.max_batch} images = {ceiling:,.0f} images/s; 1 server process "
          f"per setting, all running, each cell measured on each in turn; {args.duration:g} s "
          f"per cell, medians over {args.rounds} round(s)", flush=True)
    # Every setting's server runs at once (the stand-in only sleeps, so an idle one costs
    # nothing), and each cell is measured on each in turn: the machine's noise falls on all.
    raw: dict[tuple[str, str, int, int], list[tuple[float, ...]]] = {}
    servers: dict[str, tuple[int, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for config in args.configs:
                servers[config] = start_config(config, args.max_batch)
            for rnd in range(args.rounds):
                for n in args.per_request:
                    for kind, (body, headers) in bodies(n, Path(tmp)).items():
                        path = ("/v1/classify" if kind == "v1-multipart"
                                else "/v2/models/fashion_mnist_seed_cnn/infer")
                        for c in args.clients:
                            order = args.configs if (rnd + c) % 2 == 0 else args.configs[::-1]
                            for config in order:
                                port = servers[config][0]
                                url = f"http://127.0.0.1:{port}{path}"
                                if rnd == 0:
                                    run_wrk(url, body, headers, 8, 1, 1)  # warm
                                row = measure(url, body, headers, c, args.duration, port)
                                rps, images, mean, p99, errors = row
                                raw.setdefault((config, kind, n, c), []).append(row)
                                print(f"round {rnd + 1} {config:10} {kind:12} {n:3} img/req "
                                      f"c={c:<4} {rps:8.0f} req/s {images:8.0f} img/s "
                                      f"{images / ceiling:6.1%} batch {mean:5.1f} p99 {p99:7.1f} "
                                      f"ms errors {errors}", flush=True)
        finally:
            for _, proc in servers.values():
                stop(proc)
    print("\n| settings | request | images/request | clients | req/s | images/s | of ceiling | "
          "mean batch | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (config, kind, n, c), rows in sorted(raw.items(), key=lambda kv: (
            args.configs.index(kv[0][0]), kv[0][2], kv[0][1], kv[0][3])):
        rps, images, mean, p99 = (statistics.median(r[i] for r in rows) for i in range(4))
        errors = int(sum(r[4] for r in rows))
        print(f"| {config} | {kind} | {n} | {c} | {rps:,.0f} | {images:,.0f} | "
              f"{images / ceiling:.0%} | {mean:.1f} | {p99:.1f} | {errors} |")
    return 0


def measure(url: str, body: Path, headers: dict[str, str], clients: int, duration: float,
            port: int) -> tuple[float, float, float, float, int]:
    """req/s, images/s the model ran, mean batch, p99 ms and errors of one wrk run."""
    before = batch_stats(port)
    rps, _, p99, errors = run_wrk(url, body, headers, clients, duration, 1)
    after = batch_stats(port)
    calls = after[1] - before[1]
    mean = (after[0] - before[0]) / calls if calls else 0.0
    # images the model ran, from the server's own counter: refused requests (503 past the
    # queue bound) do not count
    images = (after[0] - before[0]) / duration
    return rps, images, mean, p99, errors


if __name__ == "__main__":
    if "--serve" in sys.argv:
        raise SystemExit(serve_main())
    raise SystemExit(main())
