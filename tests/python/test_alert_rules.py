"""Alert rules: promtool accepts them, their unit tests pass (each alert fires and stays quiet
when it should), a deliberately broken copy fails, and every metric they name is one the
running service exports."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ALERTS = ROOT / "k8s" / "alerts"
BINARY = pathlib.Path(os.environ.get("RPA_BINARY", ROOT / "target" / "debug" / "runpod-autoscaler"))
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool comes with prometheus (scripts/test.sh installs it)")


def promtool(*args, cwd=ALERTS):
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd)


def rule_files():
    return sorted(ALERTS.glob("*.rules.yaml"))


def test_rules_are_valid():
    r = promtool("check", "rules", *[str(p) for p in rule_files()])
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_unit_tests_pass():
    tests = sorted(ALERTS.glob("*.test.yaml"))
    assert tests
    r = promtool("test", "rules", *[str(p) for p in tests])
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_broken_rule_fails_its_unit_test():
    with tempfile.TemporaryDirectory() as d:
        for f in ALERTS.iterdir():
            shutil.copy(f, d)
        rules = pathlib.Path(d) / "checkpoints.rules.yaml"
        # The wrong metric: the alert would never fire.
        rules.write_text(rules.read_text().replace("checkpoint_missed_total", "checkpoint_mised_total"))
        assert promtool("check", "rules", str(rules)).returncode == 0
        r = promtool("test", "rules", "checkpoints.test.yaml", cwd=d)
        assert r.returncode != 0
        assert "RunpodAutoscalerCheckpointMissed" in r.stdout + r.stderr


def test_a_malformed_rule_is_rejected():
    with tempfile.TemporaryDirectory() as d:
        rules = pathlib.Path(d) / "bad.rules.yaml"
        rules.write_text((ALERTS / "checkpoints.rules.yaml").read_text().replace("[15m]) > 0", "[15m) > 0"))
        r = promtool("check", "rules", str(rules))
        assert r.returncode != 0


def test_every_metric_the_rules_name_is_exported():
    names = set()
    for f in rule_files():
        names |= set(re.findall(r"\brunpod_autoscaler_[a-z_]+", f.read_text()))
    assert names
    proc = subprocess.Popen(
        [str(BINARY), "serve", "--config", str(ROOT / "examples" / "static.toml"),
         "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        listening = json.loads(proc.stdout.readline())
        with urllib.request.urlopen(f"http://{listening['http']}/metrics", timeout=10) as r:
            exported = r.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    missing = [n for n in sorted(names) if not re.search(rf"^{n}(\{{| )", exported, re.M)]
    assert not missing, f"rules name metrics the service does not export: {missing}"
