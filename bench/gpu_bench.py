"""The service on a GPU, in one run: what the model can do on the device, what the service
serves from HTTP, and the plain per-request CUDA handler beside it.

It prints, with the GPU, driver, ONNX Runtime version and core count:

1. the photo model's on-device ceiling per batch size (input already on the device, one session
   per shape), fp32 and fp16;
2. per-call time through the service's execution layer, one batch size against two alternating;
3. cold start to ready (every bucket warmed on every inference thread);
4. the service, ``bench/data/photo_640x480.jpg`` as the body, at 1, 64 and 256 clients;
5. V2 ``UINT8`` and ``FP32`` tensors at 8 and 32 images per request (64 clients);
6. the plain handler (``bench/naive_server.py``, CUDA provider, 8 uvicorn workers, no batching);
7. the fp16 photo model in the service (64 clients) and its agreement with fp32;
8. the seed CNN (a 28x28 PNG, 256 clients) on the GPU path and on the CPU path;

with GPU utilisation (``nvidia-smi``, every 200 ms) and the mean batch (from ``/metrics``) for
each cell. On the GPU host, after ``../shared/gpu-kit`` installed what it brings:

    python3 bench/gpu_bench.py --out /tmp/gpu               # about 5 minutes on an H200

``--provider cpu --seconds 2`` runs the same cells on a CPU host, to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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

PHOTO = ROOT / "models" / "efficientnet_lite0_imagenet.onnx"
SEED = ROOT / "models" / "fashion_mnist_seed_cnn.onnx"
JPEG = ROOT / "bench" / "data" / "photo_640x480.jpg"
PNG = ROOT / "bench" / "data" / "fmnist_sneaker.png"
ROWS: list[dict[str, Any]] = []


def say(text: str) -> None:
    print(text, flush=True)


def environment(provider: str) -> str:
    import onnxruntime as ort

    from service.providers import cuda_usable
    from service.supervisor import usable_cpus

    gpu = "no GPU"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             check=True).stdout.strip()
    return (f"{time.strftime('%Y-%m-%d')}; {gpu}; {cpu_model()}, {usable_cpus()} usable cores; "
            f"onnxruntime {ort.__version__}; CUDA usable: {cuda_usable()}; provider {provider}")


class GpuBusy:
    """Mean GPU utilisation while the block runs (nan without nvidia-smi)."""

    def __enter__(self) -> GpuBusy:
        self.mean = float("nan")
        try:
            self.proc: subprocess.Popen[str] | None = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        values = [int(v) for v in self.proc.communicate()[0].split() if v.isdigit()]
        if len(values) > 3:
            self.mean = statistics.mean(values[2:])


def cell(name: str, port: int | None, url: str, body: Path, headers: dict[str, str],
         clients: int, seconds: float, images: int = 1) -> None:
    """One wrk run: requests/s, images/s, p50/p99, GPU busy and the mean batch."""
    before = batch_stats(port) if port else (0.0, 0.0)
    with GpuBusy() as busy:
        rps, p50, p99, errors = run_wrk(url, body, headers, clients, seconds, min(4, clients))
    after = batch_stats(port) if port else (0.0, 0.0)
    calls = after[1] - before[1]
    mean_batch = (after[0] - before[0]) / calls if calls else float("nan")
    rps = max(0.0, rps - errors / seconds)  # answered ones only: wrk counts refusals too
    row = {"cell": name, "clients": clients, "req_s": rps, "img_s": rps * images,
           "p50_ms": p50, "p99_ms": p99, "gpu_busy": busy.mean, "mean_batch": mean_batch,
           "errors": errors}
    ROWS.append(row)
    say(f"| {name} | {clients} | {rps * images:,.0f} | {p50:.1f} / {p99:.1f} | "
        f"{busy.mean:.0f}% | {mean_batch:.1f} | {errors} |")


@contextlib.contextmanager
def service(model: Path, provider: str, extra: dict[str, str] | None = None
            ) -> Iterator[tuple[int, float]]:
    port = free_port()
    # V2 FP32 at 32 images a request is 19 MB a body: 64 such requests in flight need more
    # than the default 128 MiB a worker may hold (they would get 503).
    env = {"IMGSERVE_PORT": str(port), "IMGSERVE_MODEL_PATH": str(model),
           "IMGSERVE_PROVIDER": provider, "IMGSERVE_ACCESS_LOG": "false",
           "IMGSERVE_LOG_LEVEL": "warning", "IMGSERVE_MAX_BODY_BYTES": str(32 << 20),
           "IMGSERVE_MAX_INFLIGHT_BODY_BYTES": str(2 << 30),
           "IMGSERVE_REQUIRE_GPU": str(provider == "cuda").lower(), **(extra or {})}
    started = time.perf_counter()
    proc = start_server([sys.executable, "-m", "service"], env,
                        f"http://127.0.0.1:{port}/health/ready")
    try:
        yield port, time.perf_counter() - started
    finally:
        stop(proc)


def ceiling(model: Path, provider: str, batches: list[int], label: str) -> None:
    """Images/s of ``session.run_with_iobinding`` with the input already on the device and
    the output left there, one session per batch size."""
    import onnxruntime as ort

    device = "cuda" if provider == "cuda" else "cpu"
    chain = (["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda"
             else ["CPUExecutionProvider"])
    for n in batches:
        session = ort.InferenceSession(str(model), providers=chain)
        meta = session.get_inputs()[0]
        x = np.random.default_rng(0).random((n, *meta.shape[1:]), dtype=np.float32)
        value = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input(meta.name, value)
        binding.bind_output(session.get_outputs()[0].name, device)
        per_call = timed(lambda s=session, b=binding: s.run_with_iobinding(b))
        say(f"| {label} | {n} | {n / per_call:,.0f} | {per_call * 1000:.2f} |")


def timed(fn: Any, seconds: float = 1.0) -> float:
    fn()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - started) / max(calls, 1)


def alternating(model: Path, provider: str) -> None:
    """Per-call time through the execution layer: 32 every call, against 16 and 32 in turn (on
    one session the second costs 150 times the first)."""
    from service.config import Settings
    from service.model import OnnxClassifier

    classifier = OnnxClassifier(model, Settings(model_path=model, provider=provider,
                                                batch_buckets="on", max_batch_size=32))
    classifier.attach_thread()
    c, h, w = classifier.metadata.input_shape[1:]
    rng = np.random.default_rng(0)
    x = {n: rng.integers(0, 256, (n, c, h, w), dtype=np.uint8) for n in (16, 32)}
    fixed = timed(lambda: classifier.predict(x[32]), 2.0)
    turn = iter(range(10**9))
    mixed = timed(lambda: classifier.predict(x[(16, 32)[next(turn) % 2]]), 2.0)
    half = timed(lambda: classifier.predict(x[16]), 2.0)
    say(f"per call: always 32 {fixed * 1000:.2f} ms, always 16 {half * 1000:.2f} ms, 16 and 32 "
        f"in turn {mixed * 1000:.2f} ms ({mixed / ((fixed + half) / 2):.2f}x the fixed shapes' "
        "mean)")


def fp16_variant(tmp: Path) -> Path | None:
    """The photo model in float16 (inputs and outputs stay float32), by ONNX Runtime's tool (as
    ``training quantize --kind fp16`` makes it). A trimmed onnxruntime without its transformers
    tools (the GPU kit's) borrows the tool from another installed copy; None without any."""
    import importlib.util

    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        found = [p / "onnxruntime" / "transformers" / "float16.py" for p in map(Path, sys.path)
                 if (p / "onnxruntime" / "transformers" / "float16.py").is_file()]
        if not found:
            say("no fp16 converter here (onnxruntime without its transformers tools)")
            return None
        spec = importlib.util.spec_from_file_location("ort_float16", found[0])
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        convert_float_to_float16 = module.convert_float_to_float16
    model = convert_float_to_float16(onnx.load(str(PHOTO)), keep_io_types=True)
    path = tmp / "efficientnet_lite0_imagenet.fp16.onnx"
    onnx.save(model, str(path))
    return path


def agreement(fp16: Path, provider: str) -> None:
    """fp16 against fp32 on real photographs (no labelled ImageNet images here): top-1
    agreement and the largest probability difference."""
    from PIL import Image

    from service.config import Settings
    from service.imaging import decode_image
    from service.model import OnnxClassifier

    photo = Image.open(JPEG).convert("RGB")
    crops = [photo.crop((x, y, x + 320, y + 320)).transpose(flip)
             for x in (0, 160, 320) for y in (0, 80, 160)
             for flip in (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_180)]
    bodies = [JPEG.read_bytes()]
    for crop in crops:
        path = Path(tempfile.mkstemp(suffix=".png")[1])
        crop.save(path)
        bodies.append(path.read_bytes())
        path.unlink()
    settings = Settings(provider=provider, model_path=PHOTO)
    full, half = OnnxClassifier(PHOTO, settings), OnnxClassifier(fp16, settings)
    x = np.stack([decode_image(b, full.metadata.spec) for b in bodies])
    a, b = full.predict(x), half.predict(x)
    say(f"fp16 against fp32 on {len(x)} photographs and crops: top-1 agreement "
        f"{float((a.argmax(1) == b.argmax(1)).mean()):.0%}, largest probability difference "
        f"{float(np.abs(a - b).max()):.4f}")


def v2_body(tmp: Path, datatype: str, n: int) -> tuple[Path, dict[str, str]]:
    """A binary V2 request of ``n`` copies of the photo, decoded as the service decodes it."""
    from service.imaging import PreprocessSpec, decode_image
    from service.onnx_meta import read_metadata_props

    spec = PreprocessSpec.from_json(read_metadata_props(PHOTO)["imgserve.preprocess"])
    pixels = np.repeat(decode_image(JPEG.read_bytes(), spec)[None], n, axis=0)
    tensor = pixels if datatype == "UINT8" else pixels.astype(np.float32) / np.float32(255)
    head = json.dumps({"inputs": [{"name": "input", "datatype": datatype,
                                   "shape": list(tensor.shape),
                                   "parameters": {"binary_data_size": tensor.nbytes}}],
                       "outputs": [{"name": "probabilities",
                                    "parameters": {"binary_data": True}}]}).encode()
    path = tmp / f"v2-{datatype}-{n}"
    path.write_bytes(head + tensor.tobytes())
    return path, {"Content-Type": "application/octet-stream",
                  "Inference-Header-Content-Length": str(len(head))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk seconds per cell")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    provider, secs = args.provider, args.seconds
    say(f"# bench/gpu_bench.py {' '.join(sys.argv[1:])}\n{environment(provider)}\n")
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        fp16 = fp16_variant(tmp)
        say("## On-device ceiling (input on the device, one session per batch size)\n")
        say("| model | batch | images/s | ms per call |\n|---|---|---|---|")
        ceiling(PHOTO, provider, args.batches, "EfficientNet-Lite0 fp32")
        if fp16 is not None:
            ceiling(fp16, provider, [32, 128], "EfficientNet-Lite0 fp16")
        say("")
        alternating(PHOTO, provider)
        if fp16 is not None:
            agreement(fp16, provider)
        jpeg = {"Content-Type": "image/jpeg"}
        say("\n## Served over HTTP (wrk)\n")
        say("| cell | clients | images/s | p50 / p99 ms | GPU busy | mean batch | errors |")
        say("|---|---|---|---|---|---|---|")
        with service(PHOTO, provider) as (port, cold):
            say(f"| cold start to ready: {cold:.1f} s | | | | | | |")
            url = f"http://127.0.0.1:{port}"
            for clients in (1, 64, 256):
                cell("imgserve, JPEG", port, f"{url}/v1/classify", JPEG, jpeg, clients, secs)
            for datatype in ("UINT8", "FP32"):
                for n in (8, 32):
                    body, headers = v2_body(tmp, datatype, n)
                    cell(f"imgserve, V2 {datatype} x{n}", port,
                         f"{url}/v2/models/efficientnet_lite0_imagenet/infer", body, headers,
                         64, secs, n)
        with service(PHOTO, provider, {"IMGSERVE_WORKERS": "1"}) as (port, _):
            cell("imgserve 1 process, JPEG", port, f"http://127.0.0.1:{port}/v1/classify",
                 JPEG, jpeg, 64, secs)
        if fp16 is not None:
            with service(fp16, provider) as (port, _):
                cell("imgserve fp16, JPEG", port, f"http://127.0.0.1:{port}/v1/classify", JPEG,
                     jpeg, 64, secs)
        port = free_port()
        plain = start_server(
            [sys.executable, "-m", "uvicorn", "bench.naive_server:app", "--port", str(port),
             "--workers", "8", "--log-level", "warning", "--no-access-log"],
            {"NAIVE_MODEL": str(PHOTO), "NAIVE_DRAFT": "1", "NAIVE_PROVIDER": provider},
            f"http://127.0.0.1:{port}/docs")
        try:
            run_wrk(f"http://127.0.0.1:{port}/v1/classify", JPEG, jpeg, 16, 2, 4)  # warm all
            for clients in (1, 64, 256):
                cell("plain CUDA handler, 8 workers, JPEG", None,
                     f"http://127.0.0.1:{port}/v1/classify", JPEG, jpeg, clients, secs)
        finally:
            stop(plain)
        png = {"Content-Type": "image/png"}
        for label, chosen in (("seed CNN, auto provider", "auto"), ("seed CNN, CPU", "cpu")):
            with service(SEED, chosen if provider == "cuda" else "cpu") as (port, _):
                facts = json.loads(subprocess.run(
                    ["curl", "-s", f"http://127.0.0.1:{port}/v1/models"], capture_output=True,
                    text=True).stdout or "{}")
                model = (facts.get("models") or [{}])[0]
                say(f"| {label}: {model.get('provider')} ({model.get('provider_note')}) "
                    "| | | | | | |")
                cell(label, port, f"http://127.0.0.1:{port}/v1/classify", PNG, png, 256, secs)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_bench.json").write_text(json.dumps(ROWS, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
