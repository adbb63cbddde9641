"""Reproducible installs: constraints.txt pins every package the project installs, and the
environment the tests run in (made by `make install-dev`, as CI makes it) holds exactly those
versions."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_every_installed_package_is_pinned_at_its_version() -> None:
    pinned = pins()
    for dist in importlib.metadata.distributions():
        name = normalized(dist.metadata["Name"])
        if name in ("imgserve", "pip", "setuptools", "wheel"):
            continue  # the project itself, and the virtual environment's own tools
        assert name in pinned, f"{name} is installed but not pinned in constraints.txt"
        assert pinned[name] == dist.version.split("+")[0], (
            f"{name}: {dist.version} installed, {pinned[name]} pinned")


def test_make_ci_and_the_image_install_with_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.count("-c constraints.txt") == 2  # install-serve and install-dev
    assert "deploy/lock.py" in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("/tmp/constraints.txt gpu") + dockerfile.count(
        "gpu /tmp/constraints.txt") == 1
    assert "cpu /tmp/constraints.txt" in dockerfile
    assert 'constraints="$4"' in (ROOT / "deploy" / "install-venv.sh").read_text()
    assert pins()["torch"] == "2.13.0" and "fastapi" in pins()
