"""What can be checked of the image and the manifests without a Docker engine or a cluster:
hadolint, the Kubernetes schemas, and that Dockerfile, manifests, README and app agree."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.app import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33.0"
DOCKER_STOP_DEFAULT_S = 10


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV (.*?)(?<!\\)$", dockerfile(), re.M | re.S):
        for key, value in re.findall(r"(\w+)=(\S+)", block):
            env[key] = value
    return env


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def merge(base: Any, patch: Any) -> Any:
    """Enough of a strategic merge patch for our overlay: dicts merge, named lists merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and base
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        by_name = {x["name"]: x for x in base}
        merged = [merge(by_name[p["name"]], p) if p["name"] in by_name else p for p in patch]
        return merged + [x for x in base if x["name"] not in {p["name"] for p in patch}]
    return copy.deepcopy(patch)


def deployment() -> dict[str, Any]:
    return load(K8S / "deployment.yaml")[0]


def gpu_deployment() -> dict[str, Any]:
    patch = load(K8S / "gpu" / "deployment-gpu.yaml")[0]
    merged: dict[str, Any] = merge(deployment(), patch)
    return merged


def container(dep: dict[str, Any]) -> dict[str, Any]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def test_hadolint_passes_with_no_ignored_rules() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    res = subprocess.run([exe, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "hadolint ignore" not in dockerfile()


def test_kustomization_resources_exist() -> None:
    for kust in (K8S / "kustomization.yaml", K8S / "gpu" / "kustomization.yaml"):
        spec = load(kust)[0]
        for ref in spec.get("resources", []):
            assert (kust.parent / ref).exists(), f"{kust}: {ref} is missing"
        for patch in spec.get("patches", []):
            assert (kust.parent / patch["path"]).is_file()


@pytest.mark.parametrize("path", sorted(p.relative_to(K8S).as_posix() for p in K8S.rglob("*.yaml")
                                        if p.name != "kustomization.yaml"
                                        and p.parent.name != "gpu"))
def test_manifests_validate_against_kubernetes_schemas(path: str) -> None:
    for doc in load(K8S / path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_gpu_variant_validates_and_asks_for_a_gpu() -> None:
    dep = gpu_deployment()
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    c = container(dep)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":gpu")
    assert {"name": "IMGSERVE_REQUIRE_GPU", "value": "true"} in c["env"]
    assert c["readinessProbe"] == container(deployment())["readinessProbe"]  # kept by the merge


def test_a_broken_manifest_is_caught() -> None:
    dep = deployment()
    container(dep)["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_image_manifests_readme_and_app_agree(tmp_path: Path) -> None:
    env = docker_env()
    text = dockerfile()
    port = int(env["IMGSERVE_PORT"])
    assert f"EXPOSE {port}" in text
    assert env["IMGSERVE_HOST"] == "0.0.0.0"
    assert 'ENTRYPOINT ["python", "-m", "service"]' in text
    model_path = env["IMGSERVE_MODEL_PATH"]
    copy_line = re.search(r"^COPY .*?(models/\S+\.onnx) (\S+)$", text, re.M)
    assert copy_line is not None
    assert model_path == copy_line.group(2) + Path(copy_line.group(1)).name
    assert (ROOT / copy_line.group(1)).is_file()
    health = re.search(r"HEALTHCHECK.*?http://127\.0\.0\.1:(\d+)(/\S+?)'", text, re.S)
    assert health is not None
    assert int(health.group(1)) == port
    # the image's drain fits inside `docker stop`'s default timeout
    assert "STOPSIGNAL SIGTERM" in text
    assert float(env["IMGSERVE_GRACEFUL_TIMEOUT_S"]) < DOCKER_STOP_DEFAULT_S

    app_paths = set(create_app(Settings()).openapi()["paths"])
    assert health.group(2) in app_paths
    for dep in (deployment(), gpu_deployment()):
        c = container(dep)
        assert c["ports"][0]["containerPort"] == port
        k8s_env = {e["name"]: e["value"] for e in c["env"]}
        assert k8s_env["IMGSERVE_MODEL_PATH"] == model_path
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] in app_paths
        assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
        assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        drain = float(k8s_env["IMGSERVE_GRACEFUL_TIMEOUT_S"])
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pause + drain
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert re.search(r"^USER 10001", text, re.M)
    assert deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001

    readme = (ROOT / "README.md").read_text()
    assert f"-p {port}:{port}" in readme
    assert "IMGSERVE_MODEL_PATH" in readme
    assert "kubectl apply -k deploy/k8s" in readme
    assert "--gpus all" in readme
