"""The Open Inference Protocol (KServe V2), checked with the official Triton client against a real
server process, and its refusals checked over HTTP."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading

import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.conftest import png_bytes, wait_ready
from tests.service.fakes import factory
from training.data import ImageSet

MODEL = "fashion_mnist_seed_cnn"
N = 6


@pytest.fixture(scope="module")
def tc(shared_server: int) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{shared_server}")


@pytest.fixture(scope="module")
def pixels(fmnist_test: ImageSet) -> np.ndarray:
    return fmnist_test.images[:N, 0].numpy()  # N×28×28 uint8


def jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).resize((112, 112)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def v1_full(port: int, files: list[bytes]) -> np.ndarray:
    """All ten probabilities per image from /v1 (top_k=10)."""
    import http.client

    out = np.zeros((len(files), 10), np.float32)
    for i, data in enumerate(files):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/classify?top_k=10", data, {"Content-Type": "image/png"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200, body
        for p in json.loads(body)["results"][0]["predictions"]:
            out[i, p["index"]] = p["score"]
    return out


def test_health_and_metadata(tc: triton.InferenceServerClient) -> None:
    assert tc.is_server_live()
    assert tc.is_server_ready()
    assert tc.is_model_ready(MODEL)
    assert tc.is_model_ready(MODEL, "1")
    assert not tc.is_model_ready("no_such_model")
    assert not tc.is_model_ready(MODEL, "99")
    server = tc.get_server_metadata()
    assert server["name"] == "imgserve"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    meta = tc.get_model_metadata(MODEL)
    assert meta["platform"] == "onnx_onnxv1"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert tc.get_model_metadata(MODEL, "1") == meta
    with pytest.raises(InferenceServerException, match="unknown model"):
        tc.get_model_metadata("no_such_model")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_tensor_matches_v1(tc: triton.InferenceServerClient, shared_server: int,
                                pixels: np.ndarray, binary: bool) -> None:
    x = (pixels.astype(np.float32) / 255.0)[:, None]
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = tc.infer(MODEL, [inp], outputs=[out], request_id="req-7")
    got = result.as_numpy("probabilities")
    assert result.get_response()["id"] == "req-7"
    assert got.shape == (N, 10)
    want = v1_full(shared_server, [png_bytes(p) for p in pixels])
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert float(np.abs(got - want).max()) <= 1e-5


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_pixels_give_the_fp32_answer(tc: triton.InferenceServerClient, shared_server: int,
                                           pixels: np.ndarray, binary: bool) -> None:
    """UINT8 pixels, a quarter of FP32's bytes, are divided by 255 by the model's engine: the
    same probabilities as the FP32 tensor and as /v1."""
    x = pixels[:, None]
    inp = triton.InferInput("input", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=binary)
    got = tc.infer(MODEL, [inp]).as_numpy("probabilities")
    fp32 = triton.InferInput("input", list(x.shape), "FP32")
    fp32.set_data_from_numpy(x.astype(np.float32) / 255.0)
    assert np.array_equal(got, tc.infer(MODEL, [fp32]).as_numpy("probabilities"))
    want = v1_full(shared_server, [png_bytes(p) for p in pixels])
    assert float(np.abs(got - want).max()) <= 1e-5


def test_uint8_values_are_checked(client: TestClient) -> None:
    for data, words in (([256] * 784, "0 to 255"), ([-1] * 784, "0 to 255"),
                        ([0.5] * 784, "0 to 255"), ([255] * 784, "")):
        resp = client.post("/v2/models/tiny_cnn/infer", json={"inputs": [{
            "name": "input", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": data}]})
        assert resp.status_code == (400 if words else 200) and words in resp.text, resp.text


def test_default_outputs_come_back_binary(tc: triton.InferenceServerClient,
                                          pixels: np.ndarray) -> None:
    x = (pixels[:2].astype(np.float32) / 255.0)[:, None]
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = tc.infer(MODEL, [inp])  # no outputs named: the client asks for binary data
    assert result.get_output("probabilities")["parameters"]["binary_data_size"] == 2 * 10 * 4
    assert result.as_numpy("probabilities").shape == (2, 10)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_bytes_input_of_encoded_images_matches_v1(tc: triton.InferenceServerClient,
                                                  shared_server: int, pixels: np.ndarray,
                                                  fmt: str) -> None:
    files = [png_bytes(p) if fmt == "png" else jpeg_bytes(p) for p in pixels]
    inp = triton.InferInput("input", [N], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=np.object_))
    result = tc.infer(MODEL, [inp], model_version="1",
                      outputs=[triton.InferRequestedOutput("probabilities")])
    got = result.as_numpy("probabilities")
    want = v1_full(shared_server, files)
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert float(np.abs(got - want).max()) <= 1e-5


def test_classification_extension(tc: triton.InferenceServerClient, shared_server: int,
                                  pixels: np.ndarray) -> None:
    files = [png_bytes(p) for p in pixels]
    inp = triton.InferInput("input", [N], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=np.object_))
    out = triton.InferRequestedOutput("probabilities", class_count=3)
    got = tc.infer(MODEL, [inp], outputs=[out]).as_numpy("probabilities")
    assert got.shape == (N, 3)
    want = v1_full(shared_server, files)
    labels = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
              "Sneaker", "Bag", "Ankle boot"]
    for i in range(N):
        entries = [s.decode().split(":", 2) for s in got[i]]
        scores = [float(e[0]) for e in entries]
        assert scores == sorted(scores, reverse=True)
        assert int(entries[0][1]) == int(want[i].argmax())
        for score, index, label in entries:
            assert label == labels[int(index)]
            assert abs(float(score) - want[i, int(index)]) <= 1e-5


def test_json_bytes_input_takes_base64(client: TestClient, sample_png: bytes) -> None:
    body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(sample_png).decode()]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}
    resp = client.post("/v2/models/tiny_cnn/infer", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()["outputs"][0]
    assert out["datatype"] == "BYTES"
    assert out["shape"] == [1, 2]
    assert len(out["data"]) == 2


def _fp32(shape: list[int], data: object, name: str = "input") -> dict[str, object]:
    return {"inputs": [{"name": name, "datatype": "FP32", "shape": shape, "data": data}]}


REFUSALS = [
    ("wrong input name", _fp32([1, 1, 28, 28], [0.0] * 784, name="x"), 400, "input"),
    ("wrong shape", _fp32([1, 3, 28, 28], [0.0] * 2352), 400, "shape"),
    ("element count", _fp32([2, 1, 28, 28], [0.0] * 784), 400, "elements"),
    ("not numbers", _fp32([1, 1, 28, 28], ["a"] * 784), 400, "numbers"),
    ("datatype", {"inputs": [{"name": "input", "datatype": "INT8", "shape": [1, 1, 28, 28],
                              "data": [0] * 784}]}, 400, "datatype"),
    ("two inputs", {"inputs": [_fp32([1, 1, 28, 28], [0.0] * 784)["inputs"][0]] * 2}, 400,
     "exactly one input"),
    ("no data", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28]}]},
     400, "no 'data'"),
    ("bad base64", {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                "data": ["%%%"]}]}, 400, "base64"),
    ("ragged nesting", {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [2],
                                    "data": [["aGk="], None]}]}, 400, "evenly nested"),
    ("not an image", {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                  "data": [base64.b64encode(b"hello").decode()]}]}, 400,
     "image 0"),
    ("unknown output", {**_fp32([1, 1, 28, 28], [0.0] * 784),
                        "outputs": [{"name": "logits"}]}, 400, "output"),
    ("classification range", {**_fp32([1, 1, 28, 28], [0.0] * 784), "outputs": [
        {"name": "probabilities", "parameters": {"classification": -1}}]}, 400,
     "classification"),
]


@pytest.mark.parametrize(("case", "body", "status", "words"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_refusals_use_the_protocol_error_shape(client: TestClient, case: str, body: object,
                                               status: int, words: str) -> None:
    resp = client.post("/v2/models/tiny_cnn/infer", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert isinstance(error, str)
    assert words in error


def test_unknown_model_or_version_is_404(client: TestClient) -> None:
    body = _fp32([1, 1, 28, 28], [0.0] * 784)
    assert client.post("/v2/models/other/infer", json=body).status_code == 404
    resp = client.post("/v2/models/tiny_cnn/versions/9/infer", json=body)
    assert resp.status_code == 404
    assert "version" in resp.json()["error"]
    assert client.post("/v2/models/tiny_cnn/versions/3/infer", json=body).status_code == 200


def test_binary_framing_is_checked(client: TestClient) -> None:
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                   "parameters": {"binary_data_size": 784 * 4}}]}).encode()
    good = np.zeros(784, "<f4").tobytes()
    url = "/v2/models/tiny_cnn/infer"
    ok = client.post(url, content=head + good,
                     headers={"Inference-Header-Content-Length": str(len(head))})
    assert ok.status_code == 200, ok.text
    short = client.post(url, content=head + good[:-4],
                        headers={"Inference-Header-Content-Length": str(len(head))})
    assert short.status_code == 400
    assert "binary_data_size" in short.json()["error"]
    nan = np.full(784, np.nan, "<f4").tobytes()
    bad = client.post(url, content=head + nan,
                      headers={"Inference-Header-Content-Length": str(len(head))})
    assert bad.status_code == 400
    assert "NaN" in bad.json()["error"]
    header_too_long = client.post(url, content=head,
                                  headers={"Inference-Header-Content-Length": "99999"})
    assert header_too_long.status_code == 400
    not_json = client.post(url, content=b"{nope")
    assert not_json.status_code == 400
    assert "JSON" in not_json.json()["error"]


def test_binary_bytes_elements_are_length_prefixed(client: TestClient,
                                                   sample_png: bytes) -> None:
    raw = struct.pack("<I", len(sample_png)) + sample_png
    head = json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    resp = client.post("/v2/models/tiny_cnn/infer", content=head + raw[:-1] + b"",
                       headers={"Inference-Header-Content-Length": str(len(head))})
    assert resp.status_code == 400  # size mismatch
    resp = client.post("/v2/models/tiny_cnn/infer", content=head + raw,
                       headers={"Inference-Header-Content-Length": str(len(head))})
    assert resp.status_code == 200
    n = int(resp.headers["inference-header-content-length"])
    header = json.loads(resp.content[:n])
    probs = np.frombuffer(resp.content[n:], "<f4")
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 40
    assert probs.shape == (10,)
    assert abs(float(probs.sum()) - 1) < 1e-5


def test_v2_readiness_follows_the_runtime(make_client: object) -> None:
    gate = threading.Event()  # the model loads only once the gate opens
    c: TestClient = make_client(factory([], gate=gate), ready=False)  # type: ignore[operator]
    try:
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 503
        resp = c.get("/v2/models/tiny_cnn/ready")  # known (it is loading), not ready yet
        assert resp.status_code == 503
        assert resp.json() == {"name": "tiny_cnn", "ready": False}
        assert c.get("/v2/models/no_such_model/ready").status_code == 404
    finally:
        gate.set()
    wait_ready(c)
    assert c.get("/v2/health/ready").json() == {"ready": True}
    assert c.get("/v2/models/tiny_cnn/ready").json() == {"name": "tiny_cnn", "ready": True}


def test_unknown_v2_path_uses_the_protocol_error_shape(client: TestClient) -> None:
    resp = client.get("/v2/no/such/path")
    assert resp.status_code == 404
    assert isinstance(resp.json()["error"], str)
    assert isinstance(client.get("/v1/nothing").json()["error"], dict)
