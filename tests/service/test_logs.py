"""The access log: one line per request in the shape of the other log lines, written in
batches, and never lost at shutdown."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.logs import AccessLog
from tests.conftest import wait_ready

FIELDS = {"method": "POST", "path": "/v1/classify", "status": 200, "model": None, "images": 1,
          "batch_size": 4, "latency_ms": 0.5}


def test_lines_wait_for_the_batch_then_go_out_together() -> None:
    async def scenario() -> list[str]:
        out = io.StringIO()
        log = AccessLog(stream=out, flush_s=0.05, max_lines=1000)
        for _ in range(3):
            log.request(**FIELDS)
        assert out.getvalue() == ""  # buffered: no write per line
        await asyncio.sleep(0.1)
        return out.getvalue().splitlines()

    lines = asyncio.run(scenario())
    assert len(lines) == 3
    assert " INFO service.access: request method=POST path=/v1/classify status=200 " in lines[0]
    assert lines[0].endswith("batch_size=4 latency_ms=0.5")


def test_a_full_buffer_is_written_at_once_as_json_lines() -> None:
    async def scenario() -> list[str]:
        out = io.StringIO()
        log = AccessLog(json_lines=True, stream=out, flush_s=60, max_lines=2)
        log.request(**FIELDS)
        log.request(**{**FIELDS, "status": 400})
        return out.getvalue().splitlines()

    first, second = (json.loads(line) for line in asyncio.run(scenario()))
    assert first["logger"] == "service.access" and first["level"] == "info"
    assert {k: first[k] for k in FIELDS} == FIELDS and second["status"] == 400


def test_the_app_writes_every_request_by_shutdown(tiny_onnx: Path, sample_png: bytes,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(model_path=tiny_onnx, access_log=True)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        for _ in range(5):
            client.post("/v1/classify", content=sample_png, headers={"Content-Type": "image/png"})
        client.post("/v1/classify", content=b"nope", headers={"Content-Type": "image/png"})
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "service.access" in line
             and "path=/v1/classify" in line]
    assert len(lines) == 6
    assert sum("status=200" in line for line in lines) == 5 and "status=400" in lines[-1]
