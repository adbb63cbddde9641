"""The wheel, installed exactly as the Docker image installs it (deploy/install-venv.sh, CPU
flavour) into a fresh virtual environment, serves from another working directory. This catches a
missing package-data entry, a dependency missing from pyproject, or serving code that imports
torch or the training package."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.servers import get, post, running_server_cmd

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--wheel-dir", str(work / "dist"), str(ROOT)],
                   check=True, cwd=work)
    (wheel,) = (work / "dist").glob("imgserve-*.whl")
    venv = work / "venv"
    res = subprocess.run(["sh", str(ROOT / "deploy" / "install-venv.sh"), str(venv), str(wheel),
                          "cpu", str(ROOT / "constraints.txt")], capture_output=True, text=True,
                         cwd=work, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return venv


def run_py(venv: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                          text=True, cwd=cwd)


def test_no_torch_and_no_training_code(installed: Path, tmp_path: Path) -> None:
    assert run_py(installed, "import service.app, onnxruntime", tmp_path).returncode == 0
    for module in ("torch", "training", "torchvision"):
        res = run_py(installed, f"import {module}", tmp_path)
        assert res.returncode != 0
        assert "ModuleNotFoundError" in res.stderr
    providers = run_py(installed, "import onnxruntime as o; print(o.get_available_providers())",
                       tmp_path).stdout
    assert "CPUExecutionProvider" in providers


def test_installed_service_classifies_from_another_directory(installed: Path, tmp_path: Path,
                                                             shipped_model: Path) -> None:
    # The model where the image puts it, re-rooted under a temporary directory.
    env_path = re.search(r"IMGSERVE_MODEL_PATH=(\S+)", (ROOT / "Dockerfile").read_text())
    assert env_path is not None
    model = tmp_path / env_path.group(1).lstrip("/")
    model.parent.mkdir(parents=True)
    shutil.copy(shipped_model, model)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    sneaker = (ROOT / "bench" / "data" / "fmnist_sneaker.png").read_bytes()
    cmd = [str(installed / "bin" / "python"), "-m", "service"]
    with running_server_cmd(cmd, cwd, {"IMGSERVE_MODEL_PATH": str(model),
                                       "IMGSERVE_WORKERS": "1"}) as (_, port):
        status, body = post(port, sneaker, "image/png")
        page_status, page = get(port, "/")  # the page ships inside the wheel
    assert page_status == 200 and b"<title>imgserve</title>" in page
    assert status == 200, body
    top = json.loads(body)["results"][0]["predictions"][0]
    assert top["label"] == "Sneaker"


def test_the_image_gets_the_pinned_versions(installed: Path, tmp_path: Path) -> None:
    """Every package of the installed service is the version constraints.txt pins."""
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    listing = run_py(installed, "import importlib.metadata as m, json; print(json.dumps("
                     "{d.metadata['Name']: d.version for d in m.distributions()}))", tmp_path)
    for name, version in json.loads(listing.stdout).items():
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in ("imgserve", "pip", "setuptools", "wheel", "onnxruntime"):
            continue  # the project; the venv's own tools; the CPU swap of onnxruntime-gpu
        assert pins.get(key) == version, f"{name} {version} is not pinned ({pins.get(key)})"
