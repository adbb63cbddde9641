"""Fixtures that run a real ``python -m service`` process: ``server`` (per test; parametrize it
indirectly with ``(workers, extra_env)``) and ``shared_server`` (one per module, defaults)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.servers import running_server


@pytest.fixture
def server(request: pytest.FixtureRequest, shipped_model: Path,
           tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    workers, env_extra = getattr(request, "param", (1, {}))
    with running_server(shipped_model, tmp_path, workers, env_extra) as running:
        yield running


@pytest.fixture(scope="module")
def shared_server(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with running_server(shipped_model, tmp_path_factory.mktemp("server"), 1, {}) as (_, port):
        yield port
