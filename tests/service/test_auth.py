"""Optional API keys, through the real app: keyed routes answer 401 in the error shape of their
protocol without a key, health probes stay open, and keys never reach the log or --help."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.auth import ApiKeys
from service.config import Settings

PNG = {"Content-Type": "image/png"}


def bearer(key: str) -> dict[str, str]:
    return {**PNG, "Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(make_client: Any, tmp_path: Path) -> TestClient:
    key_file = tmp_path / "keys"
    key_file.write_text("# mounted from a Secret\nfile-key\n\n")
    c: TestClient = make_client(api_keys="alpha, beta", api_keys_file=key_file)
    return c


@pytest.mark.parametrize("headers", [PNG, bearer("wrong"), {**PNG, "Authorization": "alpha"},
                                     {**PNG, "Authorization": "Basic alpha"}])
def test_classify_without_a_valid_key_is_401(keyed: TestClient, sample_png: bytes,
                                             headers: dict[str, str]) -> None:
    resp = keyed.post("/v1/classify", content=sample_png, headers=headers)
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("key", ["alpha", "beta", "file-key"])
def test_each_configured_key_is_accepted(keyed: TestClient, sample_png: bytes, key: str) -> None:
    assert keyed.post("/v1/classify", content=sample_png, headers=bearer(key)).status_code == 200
    assert keyed.get("/v1/models", headers=bearer(key)).status_code == 200


def test_metadata_and_v2_are_keyed_probes_and_metrics_are_not(keyed: TestClient) -> None:
    assert keyed.get("/v1/models").status_code == 401
    v2 = keyed.post("/v2/models/tiny_cnn/infer", json={"inputs": []})
    assert v2.status_code == 401 and isinstance(v2.json()["error"], str)  # V2's own shape
    assert keyed.get("/v2/models/tiny_cnn").status_code == 401
    for path in ("/health/live", "/health/ready", "/v2/health/ready", "/metrics",
                 "/openapi.json"):
        assert keyed.get(path).status_code == 200, path
    assert 'reason="unauthorized"' in keyed.get("/metrics").text


def test_metrics_can_be_keyed_too(make_client: Any) -> None:
    c: TestClient = make_client(api_keys="alpha", metrics_require_key=True)
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"Authorization": "Bearer alpha"}).status_code == 200


def test_without_keys_every_route_is_open(client: TestClient, sample_png: bytes) -> None:
    assert client.post("/v1/classify", content=sample_png, headers=PNG).status_code == 200


def test_keys_are_never_shown(tiny_onnx: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(model_path=tiny_onnx, api_keys="s3cret-key")
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("service").info("settings: %s", settings)
    assert "s3cret-key" not in repr(settings) and "s3cret-key" not in caplog.text
    keys = ApiKeys.from_settings(settings)
    assert keys is not None and keys.allows(b"Bearer s3cret-key")
    assert not keys.allows(b"Bearer s3cret-ke") and not keys.allows(None)


def test_a_missing_key_file_is_refused_at_start(tiny_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="api_keys_file"):
        Settings(model_path=tiny_onnx, api_keys_file=tmp_path / "none")
