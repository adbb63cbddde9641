"""Several models in one server, through the real app: routing by name and version, the default
model, the listing with states, readiness, metrics, and versions swapped on a rescan (failed
loads change nothing that is served)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.config import REPO_MODELS
from service.runtime import Runtime
from tests.conftest import wait_ready

SEED = REPO_MODELS / "fashion_mnist_seed_cnn.onnx"


def place(src: Path, dest: Path) -> Path:
    """Copy ``src`` to ``dest`` the way an operator should: to a hidden name, then renamed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.copyfile(src, tmp)
    tmp.replace(dest)
    return dest


@pytest.fixture
def repo(tmp_path: Path, tiny_onnx: Path) -> Path:
    """Two models: ``clothes`` (layout, versions 1 and 2: the shipped CNN) and the tiny CNN as a
    plain file, named ``tiny_cnn`` version 3 by its metadata."""
    root = tmp_path / "repo"
    place(SEED, root / "clothes" / "1" / "model.onnx")
    place(SEED, root / "clothes" / "2" / "model.onnx")
    place(tiny_onnx, root / "tiny.onnx")
    return root


Make = Callable[..., TestClient]


def rescan(client: TestClient) -> None:
    """SIGHUP's effect, in-process: ask for a rescan and wait until one has completed."""
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    before = runtime.models.scans
    client.portal.call(runtime.rescan)  # type: ignore[union-attr]
    deadline = time.monotonic() + 30
    while runtime.models.scans <= before:
        assert time.monotonic() < deadline, "no rescan within 30 s"
        time.sleep(0.01)


def states(client: TestClient) -> dict[tuple[str, str], str]:
    return {(m["name"], m["version"]): m["state"] for m in client.get("/v1/models").json()[
        "models"]}


def classify(client: TestClient, path: str, png: bytes) -> Any:
    return client.post(path, content=png, headers={"content-type": "image/png"})


def test_every_model_is_listed_and_reachable_by_name_and_version(
        make_client: Make, repo: Path, sample_png: bytes) -> None:
    c = make_client(model_path=repo)
    listing = c.get("/v1/models").json()
    assert listing["version_policy"] == "latest:1"
    assert states(c) == {("clothes", "1"): "unavailable", ("clothes", "2"): "ready",
                         ("tiny_cnn", "3"): "ready"}
    ready = {m["name"]: m for m in listing["models"] if m["state"] == "ready"}
    assert ready["clothes"]["labels"][1] == "Trouser" and len(ready["clothes"]["sha256"]) == 64
    assert "directory" in ready["clothes"]["note"]  # the metadata names the seed CNN
    unavailable = next(m for m in listing["models"] if m["state"] == "unavailable")
    assert "latest:1" in unavailable["reason"] and unavailable["labels"] is None

    for path, name, version in [("/v1/models/clothes/classify", "clothes", "2"),
                                ("/v1/models/clothes/versions/2/classify", "clothes", "2"),
                                ("/v1/models/tiny_cnn/classify", "tiny_cnn", "3")]:
        resp = classify(c, path, sample_png)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == {"name": name, "version": version}
        if name == "clothes":  # the shipped CNN (the tiny one trained for one epoch)
            assert resp.json()["results"][0]["predictions"][0]["label"] == "Ankle boot"

    not_served = classify(c, "/v1/models/clothes/versions/1/classify", sample_png)
    assert not_served.status_code == 404 and "version policy latest:1" in not_served.text
    unknown = classify(c, "/v1/models/nothing/classify", sample_png)
    assert unknown.status_code == 404 and "clothes, tiny_cnn" in unknown.text
    several = classify(c, "/v1/classify", sample_png)
    assert several.status_code == 404 and "IMGSERVE_DEFAULT_MODEL" in several.text

    v2 = c.post("/v2/models/clothes/versions/2/infer", json={
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                    "data": [0.0] * 784}]})
    assert v2.status_code == 200 and v2.json()["model_version"] == "2"
    assert c.get("/v2/models/clothes").json()["versions"] == ["2"]
    assert c.get("/v2/models/tiny_cnn/ready").json() == {"name": "tiny_cnn", "ready": True}
    assert c.get("/v2/models/clothes/versions/1/ready").status_code == 404

    metrics = c.get("/metrics").text
    assert 'imgserve_images_classified_total{model="clothes",version="2"} 3.0' in metrics
    assert 'imgserve_images_classified_total{model="tiny_cnn",version="3"} 1.0' in metrics
    assert 'imgserve_model_loads_total{model="clothes",outcome="loaded"} 1.0' in metrics


def test_the_default_model_and_the_policy_are_settings(
        make_client: Make, repo: Path, sample_png: bytes) -> None:
    c = make_client(model_path=repo, default_model="clothes", version_policy="all")
    assert classify(c, "/v1/classify", sample_png).json()["model"] == {"name": "clothes",
                                                                       "version": "2"}
    old = classify(c, "/v1/models/clothes/versions/1/classify", sample_png)
    assert old.json()["model"] == {"name": "clothes", "version": "1"}
    listing = c.get("/v1/models").json()["models"]
    assert [m["default"] for m in listing] == [True, True, False]
    assert c.get("/v2/models/clothes").json()["versions"] == ["2", "1"]


def test_a_new_version_is_swapped_in_and_a_broken_one_changes_nothing(
        make_client: Make, repo: Path, sample_png: bytes) -> None:
    c = make_client(model_path=repo)
    runtime: Runtime = c.app.state.runtime  # type: ignore[attr-defined]
    old = runtime.models.serving["clothes"][0]

    broken = repo / "clothes" / "3" / "model.onnx"
    broken.parent.mkdir()
    broken.write_bytes(SEED.read_bytes()[:20000])  # a truncated copy
    rescan(c)
    assert classify(c, "/v1/models/clothes/classify", sample_png).json()["model"]["version"] == "2"
    listing = {(m["name"], m["version"]): m for m in c.get("/v1/models").json()["models"]}
    assert listing[("clothes", "3")]["state"] == "failed"
    assert "cannot load" in listing[("clothes", "3")]["reason"]
    assert c.get("/health/ready").status_code == 200  # the model still serves version 2
    assert 'imgserve_model_loads_total{model="clothes",outcome="failed"} 1.0' in c.get(
        "/metrics").text
    rescan(c)  # the same broken file is not retried
    assert 'outcome="failed"} 1.0' in c.get("/metrics").text

    place(SEED, broken)  # fixed: retried because the file changed
    rescan(c)
    resp = classify(c, "/v1/models/clothes/classify", sample_png)
    assert resp.json()["model"] == {"name": "clothes", "version": "3"}
    deadline = time.monotonic() + 10
    while old.classifier is not None:  # the old version is unloaded once idle
        assert time.monotonic() < deadline, "version 2 was not unloaded"
        time.sleep(0.01)
    assert old.batcher is None and old.leases == 0
    assert states(c)[("clothes", "2")] == "unavailable"
    metrics = c.get("/metrics").text
    assert 'imgserve_images_classified_total{model="clothes",version="2"}' not in metrics
    assert 'imgserve_model_info{name="clothes",provider="CPUExecutionProvider",version="3"}' in (
        metrics)


def test_a_version_replaced_in_place_is_reloaded(make_client: Make, repo: Path,
                                                 tiny_onnx: Path, sample_png: bytes) -> None:
    c = make_client(model_path=repo)
    runtime: Runtime = c.app.state.runtime  # type: ignore[attr-defined]
    before = runtime.models.serving["clothes"][0]
    place(tiny_onnx, repo / "clothes" / "2" / "model.onnx")  # other weights, same version
    rescan(c)
    after = runtime.models.serving["clothes"][0]
    assert after is not before and after.version == "2"
    assert after.metadata is not None and before.metadata is not None
    assert after.metadata.sha256 != before.metadata.sha256
    (repo / "clothes" / "2" / "model.onnx").write_bytes(b"broken")  # a bad rewrite in place
    rescan(c)
    assert runtime.models.serving["clothes"][0] is after  # keeps serving what it had
    assert {"ready", "failed"} <= {m["state"] for m in c.get("/v1/models").json()["models"]
                                   if m["name"] == "clothes" and m["version"] == "2"}


def test_polling_finds_new_versions_without_a_signal(make_client: Make, repo: Path,
                                                    sample_png: bytes) -> None:
    c = make_client(model_path=repo, model_poll_s=0.2)
    place(SEED, repo / "clothes" / "7" / "model.onnx")
    deadline = time.monotonic() + 20
    while classify(c, "/v1/models/clothes/classify", sample_png).json()["model"][
            "version"] != "7":
        assert time.monotonic() < deadline, "version 7 was not picked up by polling"
        time.sleep(0.05)


def test_a_removed_model_is_unloaded_and_readiness_follows_the_required_models(
        make_client: Make, repo: Path, sample_png: bytes) -> None:
    c = make_client(model_path=repo)
    shutil.rmtree(repo / "clothes")
    rescan(c)
    assert classify(c, "/v1/models/clothes/classify", sample_png).status_code == 404
    ready = c.get("/health/ready")
    assert ready.status_code == 503 and "clothes" in ready.json()["reason"]
    place(SEED, repo / "clothes" / "5" / "model.onnx")
    rescan(c)
    wait_ready(c)

    only_tiny = make_client(model_path=repo, required_models="tiny_cnn")
    (repo / "clothes" / "5" / "model.onnx").write_bytes(b"broken")
    rescan(only_tiny)
    assert only_tiny.get("/health/ready").status_code == 200


def test_a_required_model_that_never_loads_keeps_the_server_unready(
        make_client: Make, repo: Path) -> None:
    (repo / "clothes" / "2" / "model.onnx").write_bytes(b"broken")
    shutil.rmtree(repo / "clothes" / "1")
    c = make_client(model_path=repo, ready=False)
    deadline = time.monotonic() + 20
    while c.get("/v2/models/tiny_cnn/ready").status_code != 200:  # loaded after clothes
        assert time.monotonic() < deadline
        time.sleep(0.02)
    reason = c.get("/health/ready").json()["reason"]
    assert "failed" in reason
    assert c.get("/health/ready").status_code == 503 and "clothes" in reason
    assert c.get("/v2/models/clothes/ready").json() == {"name": "clothes", "ready": False}
    assert c.post("/v1/models/tiny_cnn/classify", content=b"").status_code == 400  # served


def test_an_overloaded_model_does_not_delay_another(make_client: Make, repo: Path,
                                                    sample_png: bytes) -> None:
    """``clothes`` takes 0.3 s a batch and its queue fills; ``tiny_cnn`` still answers at once."""
    from concurrent.futures import ThreadPoolExecutor

    from service.config import Settings
    from service.model import Classifier, OnnxClassifier
    from tests.service.fakes import Wrapped

    def load(settings: Settings) -> Classifier:
        real = OnnxClassifier(settings.model_path, settings)
        return Wrapped(real, delay=0.3) if "clothes" in str(settings.model_path) else real

    c = make_client(load, model_path=repo, max_batch_size=4, max_images_per_request=4,
                    max_queue_images=8, warmup=False)
    with ThreadPoolExecutor(20) as pool:
        slow = [pool.submit(classify, c, "/v1/models/clothes/classify", sample_png)
                for _ in range(20)]
        time.sleep(0.15)  # clothes: one batch computing, its queue filling
        started = time.perf_counter()
        fast = classify(c, "/v1/models/tiny_cnn/classify", sample_png)
        took = time.perf_counter() - started
        codes = sorted(f.result().status_code for f in slow)
    assert fast.status_code == 200 and took < 0.25, took
    assert 200 in codes and 503 in codes and set(codes) == {200, 503}  # clothes overloaded
