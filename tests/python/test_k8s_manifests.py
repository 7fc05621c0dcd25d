"""The Kubernetes manifests (k8s/base, k8s/overlays/{dev,prd}, k8s/keda) render with the real
kustomize (the one inside the pinned kubectl of tests/python/requirements.txt), validate against
the Kubernetes 1.30 schemas and KEDA's own CRDs with unknown fields rejected, meet the
hardening the service promises, and carry configuration and trigger metadata the real binary
accepts. Every kind of check is also shown to fail on a deliberately broken copy."""

import copy
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import grpc
import jsonschema
import pytest
import yaml

from test_keda_wire import start_server, stop, stubs  # noqa: F401  (stubs is a fixture)

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BINARY = pathlib.Path(os.environ.get("RPA_BINARY", ROOT / "target" / "debug" / "runpod-autoscaler"))
VENV_BIN = pathlib.Path(sys.executable).parent
KEDA_CRDS = pathlib.Path(os.environ.get(
    "RPA_KEDA_CRDS", ROOT.parent / "shared" / "reference" / "keda-crds"))
OVERLAYS = ["dev", "prd"]
K8S_VERSION = "1.30.0"
# Kinds that are CustomResourceDefinitions; kubernetes-validate has no schema for them.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
KEDA_FILES = ["scaledobject.yaml", "scaledobject-push.yaml", "scaledjob.yaml", "triggerauthentication.yaml"]


# ---------------------------------------------------------------------------------------------
# tools

def tool(name):
    path = shutil.which(name, path=str(VENV_BIN))
    assert path, f"{name} missing from {VENV_BIN}: pip install -r tests/python/requirements.txt"
    return path


def kustomize(directory):
    """`kubectl kustomize DIR` (kustomize v5 built into kubectl)."""
    return subprocess.run([tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True)


def render(directory):
    result = kustomize(directory)
    assert result.returncode == 0, f"kustomize {directory}: {result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def kubernetes_validate(docs):
    """kubernetes-validate --strict on DOCS; returns (ok, output, number of 'passed' lines)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(docs, f)
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--kubernetes-version", K8S_VERSION, f.name],
        capture_output=True, text=True,
    )
    out = result.stdout + result.stderr
    return result.returncode == 0, out, out.count(" passed for resource ")


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def load(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def rendered():
    return {o: render(K8S / "overlays" / o) for o in OVERLAYS}


# ---------------------------------------------------------------------------------------------
# rendering and Kubernetes schemas

EXPECTED_KINDS = {"Namespace", "ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Deployment",
                  "Service", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_service(rendered, overlay):
    docs = rendered[overlay]
    assert EXPECTED_KINDS <= {d["kind"] for d in docs}
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "gpu-system", d["metadata"]
    # Least privilege: nothing grants Kubernetes API access, and no Secret is rendered.
    assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "Secret"} & {d["kind"] for d in docs}
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_pass_kubernetes_validate_strict(rendered, overlay):
    docs = [d for d in rendered[overlay] if d["kind"] not in CRD_KINDS]
    ok, out, passed = kubernetes_validate(docs)
    assert ok, out
    assert passed == len(docs), f"not every object was validated against a schema:\n{out}"


def test_kubernetes_validate_rejects_an_unknown_field_in_a_deployment(rendered):
    deploy = copy.deepcopy(one(rendered["prd"], "Deployment"))
    deploy["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {"privileged": True}
    ok, out, _ = kubernetes_validate([deploy])
    assert not ok, out
    assert "securityContex" in out


def test_kubernetes_validate_rejects_a_wrongly_typed_field(rendered):
    deploy = copy.deepcopy(one(rendered["prd"], "Deployment"))
    deploy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = "yes"
    ok, out, _ = kubernetes_validate([deploy])
    assert not ok, out


def test_a_broken_overlay_fails_to_render():
    with tempfile.TemporaryDirectory() as tmp:
        copy_dir = pathlib.Path(tmp) / "k8s"
        shutil.copytree(K8S, copy_dir)
        prd = copy_dir / "overlays" / "prd"
        assert kustomize(prd).returncode == 0  # the copy itself renders
        # A patch for a Deployment the base does not have.
        patch = prd / "deployment-patch.yaml"
        patch.write_text(patch.read_text().replace("name: runpod-autoscaler\n", "name: runpod-autoscaler-typo\n", 1))
        result = kustomize(prd)
        assert result.returncode != 0
        assert "runpod-autoscaler-typo" in result.stderr
        # And a kustomization naming a file that is not there.
        dev = copy_dir / "overlays" / "dev"
        (dev / "deployment-patch.yaml").unlink()
        assert kustomize(dev).returncode != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_ships_the_alert_rules_and_the_dashboard(rendered, overlay):
    docs = rendered[overlay]
    rule = one(docs, "PrometheusRule")
    assert rule["spec"]["groups"], rule
    dashboard = one(docs, "ConfigMap", "runpod-autoscaler-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (body,) = dashboard["data"].values()
    assert json.loads(body)["panels"]


# ---------------------------------------------------------------------------------------------
# hardening

def pod_and_container(deploy):
    pod = deploy["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "runpod-autoscaler"]
    return pod, container


def hardening_problems(deploy, pvc_name, state_dir):
    """What is wrong with DEPLOY against the promised hardening (empty list: nothing)."""
    problems = []
    spec = deploy["spec"]
    if spec.get("replicas") != 1:
        problems.append("replicas is not 1")
    if spec.get("strategy", {}).get("type") != "Recreate":
        problems.append("strategy is not Recreate")
    pod, c = pod_and_container(deploy)
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or csc.get("runAsNonRoot", True) is not True:
        problems.append("runAsNonRoot is not true")
    if psc.get("runAsUser", 1) == 0 or csc.get("runAsUser", 1) == 0:
        problems.append("runs as uid 0")
    if csc.get("privileged", False) is not False:
        problems.append("privileged")
    if csc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if csc.get("readOnlyRootFilesystem") is not True:
        problems.append("root filesystem is writable")
    if csc.get("capabilities", {}).get("drop") != ["ALL"] or csc.get("capabilities", {}).get("add"):
        problems.append("capabilities are not drop [ALL] with nothing added")
    seccomp = csc.get("seccompProfile") or psc.get("seccompProfile") or {}
    if seccomp.get("type") != "RuntimeDefault":
        problems.append("seccomp is not RuntimeDefault")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append("shares a host namespace")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("service account token is mounted")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    state = mounts.get(state_dir)
    if not state or volumes.get(state["name"], {}).get("persistentVolumeClaim", {}).get("claimName") != pvc_name:
        problems.append(f"{state_dir} is not the PVC {pvc_name}")
    elif state.get("readOnly"):
        problems.append(f"{state_dir} is read-only")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if ports != {"grpc": 9090, "http": 8080}:
        problems.append(f"ports are {ports}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("http", 8080):
            problems.append(f"{probe} is not GET {path} on the http port")
    res = c.get("resources", {})
    if not all(k in res.get("requests", {}) and k in res.get("limits", {}) for k in ("cpu", "memory")):
        problems.append("cpu/memory requests and limits are not all set")
    return problems


def config_toml(docs):
    deploy = one(docs, "Deployment")
    pod, _ = pod_and_container(deploy)
    (cm_name,) = [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
    return one(docs, "ConfigMap", cm_name)["data"]["config.toml"]


def state_dir_of(text):
    import tomllib
    return tomllib.loads(text).get("reconcile", {}).get("state_dir", "/var/lib/runpod-autoscaler")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_is_hardened(rendered, overlay):
    docs = rendered[overlay]
    pvc = one(docs, "PersistentVolumeClaim")
    problems = hardening_problems(one(docs, "Deployment"), pvc["metadata"]["name"], state_dir_of(config_toml(docs)))
    assert problems == []
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


BREAKAGES = {
    "privileged": lambda pod, c: c["securityContext"].update(privileged=True),
    "no runAsNonRoot": lambda pod, c: (pod["securityContext"].pop("runAsNonRoot"), c["securityContext"].pop("runAsNonRoot")),
    "root uid": lambda pod, c: pod["securityContext"].update(runAsUser=0),
    "writable root": lambda pod, c: c["securityContext"].update(readOnlyRootFilesystem=False),
    "escalation": lambda pod, c: c["securityContext"].pop("allowPrivilegeEscalation"),
    "cap added": lambda pod, c: c["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
    "no seccomp": lambda pod, c: (pod["securityContext"].pop("seccompProfile"), c["securityContext"].pop("seccompProfile")),
    "state on emptyDir": lambda pod, c: [v.update(persistentVolumeClaim=None) or v.pop("persistentVolumeClaim") or v.update(emptyDir={})
                                         for v in pod["volumes"] if v["name"] == "state"],
    "liveness on /readyz": lambda pod, c: c["livenessProbe"]["httpGet"].update(path="/readyz"),
    "token mounted": lambda pod, c: pod.update(automountServiceAccountToken=True),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_hardening_check_rejects_a_broken_deployment(rendered, breakage):
    docs = rendered["prd"]
    deploy = copy.deepcopy(one(docs, "Deployment"))
    pod, c = pod_and_container(deploy)
    BREAKAGES[breakage](pod, c)
    assert hardening_problems(deploy, one(docs, "PersistentVolumeClaim")["metadata"]["name"],
                              state_dir_of(config_toml(docs)))


def test_hardening_check_rejects_two_replicas_or_rolling_updates(rendered):
    docs = rendered["prd"]
    args = (one(docs, "PersistentVolumeClaim")["metadata"]["name"], state_dir_of(config_toml(docs)))
    two = copy.deepcopy(one(docs, "Deployment"))
    two["spec"]["replicas"] = 2
    assert hardening_problems(two, *args) == ["replicas is not 1"]
    rolling = copy.deepcopy(one(docs, "Deployment"))
    rolling["spec"]["strategy"] = {"type": "RollingUpdate"}
    assert hardening_problems(rolling, *args) == ["strategy is not Recreate"]


# ---------------------------------------------------------------------------------------------
# the ConfigMap's config.toml and the container environment, as the binary sees them

def check_config(text, env):
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "config.toml"
        path.write_text(text)
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith("RUNPOD_AUTOSCALER__") and k != "RUNPOD_API_KEY"}
        return subprocess.run([str(BINARY), "check-config", str(path)],
                              capture_output=True, text=True, env={**clean, **env})


def mounted_files_as_temp(text, tmp):
    """Env overrides pointing every file the config names (TLS, SSH key) at temp files."""
    import tomllib
    cfg = tomllib.loads(text)
    env = {}
    for key, path in cfg.get("service", {}).get("tls", {}).items():
        f = pathlib.Path(tmp) / f"tls-{key}"
        f.write_text("-----BEGIN CERTIFICATE-----\n")
        env[f"RUNPOD_AUTOSCALER__SERVICE__TLS__{key.upper()}"] = str(f)
    if "ssh_key_file" in cfg.get("reconcile", {}):
        key = pathlib.Path(tmp) / "id_ed25519"
        key.write_text("key\n")
        (pathlib.Path(tmp) / "id_ed25519.pub").write_text("ssh-ed25519 AAAA test\n")
        env["RUNPOD_AUTOSCALER__RECONCILE__SSH_KEY_FILE"] = str(key)
    return env


def container_env(deploy, with_secrets=True):
    """The container's environment: literal values as they are, Secret references as dummies."""
    _, c = pod_and_container(deploy)
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif with_secrets and "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = f"dummy-{e['valueFrom']['secretKeyRef']['key'].lower()}"
    return env


def test_base_config_toml_passes_check_config():
    text = (K8S / "base" / "config.toml").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        result = check_config(text, mounted_files_as_temp(text, tmp))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_and_container_env_pass_check_config(rendered, overlay):
    docs = rendered[overlay]
    text = config_toml(docs)
    with tempfile.TemporaryDirectory() as tmp:
        result = check_config(text, {**container_env(one(docs, "Deployment")), **mounted_files_as_temp(text, tmp)})
    assert result.returncode == 0, result.stderr


def test_prd_is_active_and_dev_advisory(rendered):
    """Active mode needs the RunPod key and the SSH key: without them prd's configuration is
    refused, dev's (advisory) is not."""
    for overlay, refused in (("prd", True), ("dev", False)):
        docs = rendered[overlay]
        text = config_toml(docs)
        with tempfile.TemporaryDirectory() as tmp:
            files = mounted_files_as_temp(text, tmp)
            env = container_env(one(docs, "Deployment"), with_secrets=False)
            result = check_config(text, {**env, **files})
            assert (result.returncode == 2) == refused, (overlay, result.stderr)
            if refused:
                assert "runpod.api_key" in result.stderr
                del files["RUNPOD_AUTOSCALER__RECONCILE__SSH_KEY_FILE"]
                result = check_config(text, {**env, **files, "RUNPOD_API_KEY": "k"})
                assert result.returncode == 2 and "reconcile.ssh_key_file" in result.stderr, result.stderr


def test_check_config_rejects_a_broken_configmap(rendered):
    text = config_toml(rendered["prd"]).replace("max_pods = 8", "max_pods = -8")
    with tempfile.TemporaryDirectory() as tmp:
        result = check_config(text, mounted_files_as_temp(text, tmp))
    assert result.returncode == 2 and "policy.max_pods" in result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_files_the_config_names_are_mounted_from_the_secrets(rendered, overlay):
    import tomllib
    docs = rendered[overlay]
    cfg = tomllib.loads(config_toml(docs))
    pod, c = pod_and_container(one(docs, "Deployment"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    examples = {d["metadata"]["name"]: d for d in load(K8S / "base" / "secret.example.yaml")}

    def secret_key_for(path):
        for m in c["volumeMounts"]:
            prefix = m["mountPath"].rstrip("/") + "/"
            if path.startswith(prefix) and "secret" in volumes[m["name"]]:
                return volumes[m["name"]]["secret"]["secretName"], path[len(prefix):]
        raise AssertionError(f"{path} is not in a mounted Secret")

    paths = list(cfg["service"]["tls"].values()) + [cfg["reconcile"]["ssh_key_file"], cfg["reconcile"]["ssh_key_file"] + ".pub"]
    for path in paths:
        name, key = secret_key_for(path)
        assert key in examples[name]["stringData"], f"{name} example lacks {key}"
    # Environment from Secrets: the example Secret has every key the Deployment reads.
    for e in c["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in examples[ref["name"]]["stringData"]
    # The config file itself is the generated ConfigMap, at the path `serve --config` reads.
    cfg_mount = next(m for m in c["volumeMounts"] if "configMap" in volumes[m["name"]])
    assert c["args"] == ["serve", "--config", cfg_mount["mountPath"]]


def test_example_secrets_are_valid_and_hold_no_values():
    for path in (K8S / "base" / "secret.example.yaml", K8S / "keda" / "secret.example.yaml"):
        docs = load(path)
        ok, out, passed = kubernetes_validate(docs)
        assert ok and passed == len(docs), out
        for d in docs:
            for value in d["stringData"].values():
                assert "replace" in value and "PRIVATE KEY-----\n" not in value
    for kust in (K8S / "base" / "kustomization.yaml", K8S / "keda" / "kustomization.yaml"):
        assert "secret.example.yaml" not in kust.read_text().split("#")[0]


# ---------------------------------------------------------------------------------------------
# Service, NetworkPolicy, PDB, ServiceMonitor

def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_pdb_select_the_pod(rendered, overlay):
    docs = rendered[overlay]
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    svc = one(docs, "Service")
    assert selects({"matchLabels": svc["spec"]["selector"]}, labels)
    assert {(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {("grpc", 9090, "grpc"), ("http", 8080, "http")}
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], labels)
    # One replica: minAvailable 1 would block every node drain.
    assert "minAvailable" not in pdb["spec"] and pdb["spec"]["maxUnavailable"] == 1


def ns_selector(peer):
    return peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")


def netpol_problems(np, pod_labels):
    problems = []
    spec = np["spec"]
    if not selects(spec["podSelector"], pod_labels):
        problems.append("does not select the pod")
    if sorted(spec.get("policyTypes", [])) != ["Egress", "Ingress"]:
        problems.append("not both Ingress and Egress")
    ingress = set()
    for rule in spec.get("ingress", []):
        peers = rule.get("from")
        if not peers or any(ns_selector(p) is None or "ipBlock" in p for p in peers):
            problems.append("an ingress rule is not limited to a namespace")
        if not rule.get("ports"):
            problems.append("an ingress rule allows every port")
        for p in peers or []:
            for port in rule.get("ports", []):
                ingress.add((ns_selector(p), port.get("protocol", "TCP"), port["port"]))
    if ingress != {("keda", "TCP", 9090), ("monitoring", "TCP", 8080)}:
        problems.append(f"ingress is {sorted(ingress, key=str)}")
    egress = set()
    for rule in spec.get("egress", []):
        if not rule.get("ports") or not rule.get("to"):
            problems.append("an egress rule allows every port or destination")
        for p in rule.get("to", []):
            where = ns_selector(p) or p.get("ipBlock", {}).get("cidr")
            for port in rule.get("ports", []):
                egress.add((where, port.get("protocol", "TCP"), port["port"]))
    for need in [("kube-system", "UDP", 53), ("kube-system", "TCP", 53), ("0.0.0.0/0", "TCP", 443),
                 ("kafka", "TCP", 9092), ("monitoring", "TCP", 9090), ("minio", "TCP", 9000)]:
        if need not in egress:
            problems.append(f"no egress {need}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_networkpolicy_allows_only_what_is_needed(rendered, overlay):
    docs = rendered[overlay]
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert netpol_problems(one(docs, "NetworkPolicy"), labels) == []


def test_networkpolicy_check_rejects_an_open_ingress(rendered):
    docs = rendered["prd"]
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    np = copy.deepcopy(one(docs, "NetworkPolicy"))
    np["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 9090}]})
    assert netpol_problems(np, labels)
    np = copy.deepcopy(one(docs, "NetworkPolicy"))
    np["spec"]["egress"] = [r for r in np["spec"]["egress"] if r["ports"][0]["port"] != 53]
    assert netpol_problems(np, labels) == ["no egress ('kube-system', 'UDP', 53)", "no egress ('kube-system', 'TCP', 53)"]


def servicemonitor_problems(sm, services):
    """The ServiceMonitor CRD's required fields (monitoring.coreos.com/v1: spec, spec.selector,
    spec.endpoints) plus what makes it scrape something: it selects a Service in a namespace
    it names, on a port that Service has, at /metrics."""
    problems = []
    if sm.get("apiVersion") != "monitoring.coreos.com/v1" or sm.get("kind") != "ServiceMonitor":
        problems.append("not a monitoring.coreos.com/v1 ServiceMonitor")
    allowed_spec = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
                    "sampleLimit", "scrapeProtocols", "attachMetadata", "labelLimit", "scrapeClass"}
    spec = sm.get("spec") or {}
    if set(spec) - allowed_spec:
        problems.append(f"unknown spec fields {sorted(set(spec) - allowed_spec)}")
    if "selector" not in spec or not spec.get("endpoints"):
        problems.append("spec.selector and spec.endpoints are required")
        return problems
    names = spec.get("namespaceSelector", {}).get("matchNames") or [sm["metadata"].get("namespace")]
    targets = [s for s in services if s["metadata"]["namespace"] in names and selects(spec["selector"], s["metadata"].get("labels", {}))]
    if not targets:
        problems.append("selects no Service")
    for ep in spec["endpoints"]:
        if not any(ep.get("port") in {p.get("name") for p in s["spec"]["ports"]} for s in targets):
            problems.append(f"endpoint port {ep.get('port')!r} is not a port name of the Service")
        if ep.get("path", "/metrics") != "/metrics":
            problems.append("endpoint path is not /metrics")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_the_service(rendered, overlay):
    docs = rendered[overlay]
    sm = one(docs, "ServiceMonitor")
    assert servicemonitor_problems(sm, [d for d in docs if d["kind"] == "Service"]) == []


def test_servicemonitor_check_rejects_a_broken_copy(rendered):
    docs = rendered["prd"]
    services = [d for d in docs if d["kind"] == "Service"]
    sm = copy.deepcopy(one(docs, "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["port"] = "metrics"
    assert servicemonitor_problems(sm, services) == ["endpoint port 'metrics' is not a port name of the Service"]
    sm = copy.deepcopy(one(docs, "ServiceMonitor"))
    del sm["spec"]["endpoints"]
    assert servicemonitor_problems(sm, services)
    sm = copy.deepcopy(one(docs, "ServiceMonitor"))
    sm["spec"]["selector"] = {"matchLabels": {"app": "other"}}
    assert "selects no Service" in servicemonitor_problems(sm, services)


# ---------------------------------------------------------------------------------------------
# KEDA objects against KEDA's CRDs, unknown fields rejected

def strict(schema):
    """KEDA's openAPIV3Schema as the API server applies it: an object with `properties` and no
    `additionalProperties` / `x-kubernetes-preserve-unknown-fields` prunes (here: rejects)
    unknown fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


@pytest.fixture(scope="module")
def keda_validators():
    assert KEDA_CRDS.is_dir(), f"KEDA CRDs not found at {KEDA_CRDS} (set RPA_KEDA_CRDS)"
    validators = {}
    for f in KEDA_CRDS.glob("keda.sh_*.yaml"):
        crd = yaml.safe_load(f.read_text())
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                key = (f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])
                validators[key] = jsonschema.Draft7Validator(strict(v["schema"]["openAPIV3Schema"]))
    assert ("keda.sh/v1alpha1", "ScaledObject") in validators
    return validators


def keda_errors(validators, doc):
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert key in validators, f"no KEDA CRD for {key}"
    return sorted(validators[key].iter_errors(doc), key=lambda e: list(e.path))


def keda_docs():
    return [(f, d) for f in KEDA_FILES for d in load(K8S / "keda" / f)]


@pytest.mark.parametrize("name", KEDA_FILES)
def test_keda_objects_match_kedas_crds(keda_validators, name):
    for doc in load(K8S / "keda" / name):
        errors = keda_errors(keda_validators, doc)
        assert errors == [], [f"{list(e.path)}: {e.message}" for e in errors]
        assert doc["metadata"]["namespace"] == "media"


def test_keda_kustomization_renders():
    kinds = sorted(d["kind"] for d in render(K8S / "keda"))
    assert kinds == ["ScaledObject", "TriggerAuthentication"]


@pytest.mark.parametrize("mutate,field", [
    (lambda so: so["spec"].update(maxReplicas=3), "maxReplicas"),
    (lambda so: so["spec"]["triggers"][0].update(metdata={}), "metdata"),
    (lambda so: so["spec"]["triggers"][2]["authenticationRef"].update(namespace="media"), "namespace"),
    (lambda so: so["spec"]["scaleTargetRef"].update(replicas=1), "replicas"),
])
def test_kedas_crd_rejects_unknown_fields_in_a_scaledobject(keda_validators, mutate, field):
    (so,) = load(K8S / "keda" / "scaledobject.yaml")
    so = copy.deepcopy(so)
    mutate(so)
    errors = keda_errors(keda_validators, so)
    assert errors and any(field in e.message for e in errors), [e.message for e in errors]


def test_kedas_crd_rejects_a_broken_scaledjob_and_triggerauthentication(keda_validators):
    (sj,) = load(K8S / "keda" / "scaledjob.yaml")
    sj = copy.deepcopy(sj)
    sj["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert keda_errors(keda_validators, sj)
    (ta,) = load(K8S / "keda" / "triggerauthentication.yaml")
    ta = copy.deepcopy(ta)
    ta["spec"]["secretTargetRef"][0]["secret"] = ta["spec"]["secretTargetRef"][0].pop("name")
    assert keda_errors(keda_validators, ta)


def test_scaledjob_job_template_is_a_valid_job():
    (sj,) = load(K8S / "keda" / "scaledjob.yaml")
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "gpu-worker-long", "namespace": "media"},
           "spec": sj["spec"]["jobTargetRef"]}
    ok, out, passed = kubernetes_validate([job])
    assert ok and passed == 1, out


def test_keda_triggers_are_the_ones_asked_for():
    (so,) = load(K8S / "keda" / "scaledobject.yaml")
    (push,) = load(K8S / "keda" / "scaledobject-push.yaml")
    for doc, scaler_type in ((so, "external"), (push, "external-push")):
        assert doc["spec"]["scaleTargetRef"]["name"] == "gpu-worker"
        by_type = {t["type"]: t for t in doc["spec"]["triggers"]}
        assert sorted(by_type) == sorted(["kafka", "prometheus", scaler_type])
        assert by_type["kafka"]["metadata"]["lagThreshold"] == "5"
        prom = by_type["prometheus"]["metadata"]
        assert prom["threshold"] == "30" and prom["query"].startswith("histogram_quantile(0.95,")
        ext = by_type[scaler_type]
        assert ext["metadata"]["metricName"] == "gpu-demand"
        assert ext["authenticationRef"]["name"] == "runpod-autoscaler-client"


def test_trigger_authentication_carries_the_client_certificate():
    (ta,) = load(K8S / "keda" / "triggerauthentication.yaml")
    (secret,) = load(K8S / "keda" / "secret.example.yaml")
    refs = {r["parameter"]: r for r in ta["spec"]["secretTargetRef"]}
    assert set(refs) == {"caCert", "tlsClientCert", "tlsClientKey"}
    for r in refs.values():
        assert r["name"] == secret["metadata"]["name"] and r["key"] in secret["stringData"]
    assert ta["metadata"]["namespace"] == secret["metadata"]["namespace"] == "media"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaler_address_is_the_services_grpc_port(rendered, overlay):
    svc = one(rendered[overlay], "Service")
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    ext = [t for _, d in keda_docs() for t in d["spec"].get("triggers", []) if t["type"].startswith("external")]
    assert len(ext) == 3
    for t in ext:
        host, port = t["metadata"]["scalerAddress"].rsplit(":", 1)
        assert host == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
        assert int(port) == grpc_port


# ---------------------------------------------------------------------------------------------
# trigger metadata against the real service

@pytest.fixture(scope="module")
def scaler(stubs):  # noqa: F811
    pb2, pb2_grpc = stubs
    proc, addrs = start_server(300)
    channel = grpc.insecure_channel(addrs["grpc"])
    yield pb2, pb2_grpc.ExternalScalerStub(channel)
    channel.close()
    stop(proc)


def call(scaler, metadata, deadline=20):
    """GetMetricSpec then GetMetrics with METADATA, as KEDA sends it. Returns the status codes
    (OK or the error's code) and the metric spec; GetMetrics is retried while UNAVAILABLE
    before the first plan (a parity read that cannot reach its backend stays UNAVAILABLE)."""
    import time
    pb2, stub = scaler
    ref = pb2.ScaledObjectRef(name="gpu-worker", namespace="media", scalerMetadata=metadata)
    try:
        spec = stub.GetMetricSpec(ref, timeout=5)
    except grpc.RpcError as e:
        return e.code(), None, None
    name = spec.metricSpecs[0].metricName
    end = time.monotonic() + deadline
    while True:
        try:
            stub.GetMetrics(pb2.GetMetricsRequest(scaledObjectRef=ref, metricName=name), timeout=5)
            return grpc.StatusCode.OK, spec, grpc.StatusCode.OK
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end or "scaler" in metadata:
                return grpc.StatusCode.OK, spec, e.code()
            time.sleep(0.2)


def external_triggers():
    return [(f, t) for f, d in keda_docs() for t in d["spec"].get("triggers", []) if t["type"].startswith("external")]


def parity_triggers():
    return [(f, t) for f, d in keda_docs() for t in d["spec"].get("triggers", []) if t["type"] in ("kafka", "prometheus")]


def test_external_trigger_metadata_is_accepted_by_the_service(scaler):
    triggers = external_triggers()
    assert {t["type"] for _, t in triggers} == {"external", "external-push"}
    for f, t in triggers:
        spec_code, spec, metrics_code = call(scaler, t["metadata"])
        assert (spec_code, metrics_code) == (grpc.StatusCode.OK, grpc.StatusCode.OK), (f, t["name"])
        assert spec.metricSpecs[0].metricName == t["metadata"]["metricName"]
        assert spec.metricSpecs[0].targetSizeFloat == float(t["metadata"]["targetSize"])


def test_kafka_and_prometheus_trigger_metadata_is_accepted_in_parity_mode(scaler):
    """The same keys sent as a parity trigger (`scaler: kafka|prometheus`): the service accepts
    them (no INVALID_ARGUMENT); the brokers and Prometheus are not reachable from here, so the
    read itself may answer UNAVAILABLE."""
    triggers = parity_triggers()
    assert sorted({t["type"] for _, t in triggers}) == ["kafka", "prometheus"]
    seen = set()
    for f, t in triggers:
        key = (t["type"], tuple(sorted(t["metadata"].items())))
        if key in seen:
            continue
        seen.add(key)
        spec_code, spec, metrics_code = call(scaler, {**t["metadata"], "scaler": t["type"]})
        assert grpc.StatusCode.INVALID_ARGUMENT not in (spec_code, metrics_code), (f, t["name"])
        if spec is not None:
            target = t["metadata"]["lagThreshold" if t["type"] == "kafka" else "threshold"]
            assert spec.metricSpecs[0].targetSizeFloat == float(target)


@pytest.mark.parametrize("kind,change,key", [
    ("external", {"targetSize": "-1"}, "targetSize"),
    ("external", {"scope": "cluster"}, "scope"),
    ("external-push", {"activationThreshold": "none"}, "activationThreshold"),
    ("kafka", {"lagThreshold": "five"}, "lagThreshold"),
    ("kafka", {"consumerGroup": ""}, "consumerGroup"),
    ("prometheus", {"threshold": "0"}, "threshold"),
])
def test_bad_trigger_metadata_is_invalid_argument(scaler, stubs, kind, change, key):  # noqa: F811
    pb2, stub = scaler
    (f, t) = next((f, t) for f, t in external_triggers() + parity_triggers() if t["type"] == kind)
    metadata = {**t["metadata"], **change}
    if kind in ("kafka", "prometheus"):
        metadata["scaler"] = kind
    with pytest.raises(grpc.RpcError) as err:
        stub.GetMetricSpec(pb2.ScaledObjectRef(name="w", namespace="media", scalerMetadata=metadata), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert key in err.value.details()
