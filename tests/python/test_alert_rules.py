"""Alert rules (k8s/monitoring): promtool accepts them, their unit tests pass (each alert fires
and stays quiet when it should), deliberately broken copies fail, and the PrometheusRule carries exactly the rule files'
groups. (test_dashboard.py checks that every rule expression names only exported metrics.)

`python tests/python/test_alert_rules.py --write` regenerates prometheusrule.yaml from the
*.rules.yaml files."""

import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool comes with prometheus (scripts/test.sh installs it)"
)

# Every alert the issue asks for, by what it watches.
EXPECTED_ALERTS = {
    "RunpodAutoscalerQueueBacklog",
    "RunpodAutoscalerLatencyP95High",
    "RunpodAutoscalerPodIdleTooLong",
    "RunpodAutoscalerCheckpointMissed",
    "RunpodAutoscalerRunpodApiErrors",
    "RunpodAutoscalerSpendNearBudget",
    "RunpodAutoscalerOrphansCollected",
    "RunpodAutoscalerSignalStale",
    "RunpodAutoscalerDown",
    "RunpodAutoscalerAbsent",
}


def promtool(*args, cwd=MONITORING):
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd)


def rule_files(d=MONITORING):
    return sorted(pathlib.Path(d).glob("*.rules.yaml"))


def rule_groups(d=MONITORING):
    groups = []
    for f in rule_files(d):
        groups += yaml.safe_load(f.read_text())["groups"]
    return groups


def render_prometheus_rule(d=MONITORING):
    """The PrometheusRule for the rule files in `d`."""
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "runpod-autoscaler",
            # kube-prometheus-stack's default ruleSelector (as for the ServiceMonitor in k8s/base).
            "labels": {"release": "kube-prometheus-stack"},
        },
        "spec": {"groups": rule_groups(d)},
    }
    header = (
        "# Generated from k8s/monitoring/*.rules.yaml by\n"
        "# `.venv/bin/python tests/python/test_alert_rules.py --write`; do not edit by hand\n"
        "# (tests/python/test_alert_rules.py fails when it differs from the rule files).\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, width=100, allow_unicode=True)


def prometheus_rule_mismatch(rule_path=PROMETHEUS_RULE, d=MONITORING):
    """Why the PrometheusRule at `rule_path` is not the rule files' groups (None when it is)."""
    doc = yaml.safe_load(pathlib.Path(rule_path).read_text())
    if doc.get("apiVersion") != "monitoring.coreos.com/v1" or doc.get("kind") != "PrometheusRule":
        return f"not a monitoring.coreos.com/v1 PrometheusRule: {doc.get('apiVersion')} {doc.get('kind')}"
    theirs, ours = doc["spec"]["groups"], rule_groups(d)
    if theirs != ours:
        names = lambda gs: [(g["name"], [r.get("alert") or r.get("record") for r in g["rules"]]) for g in gs]
        return f"groups differ from the rule files: {names(theirs)} vs {names(ours)} (or their rules differ)"
    return None


@needs_promtool
def test_rules_are_valid():
    files = rule_files()
    assert len(files) >= 2
    r = promtool("check", "rules", *[str(p) for p in files])
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_asked_for_exists_once():
    alerts = [r["alert"] for g in rule_groups() for r in g["rules"] if "alert" in r]
    assert sorted(alerts) == sorted(EXPECTED_ALERTS), alerts


@needs_promtool
def test_rule_unit_tests_pass():
    tests = sorted(MONITORING.glob("*.test.yaml"))
    assert len(tests) >= 2
    r = promtool("test", "rules", *[str(p) for p in tests])
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not():
    fires, quiet = set(), set()
    for f in MONITORING.glob("*.test.yaml"):
        for t in yaml.safe_load(f.read_text())["tests"]:
            for a in t.get("alert_rule_test", []):
                (fires if a.get("exp_alerts") else quiet).add(a["alertname"])
    assert EXPECTED_ALERTS - fires == set(), "never fired in a unit test"
    assert EXPECTED_ALERTS - quiet == set(), "never shown quiet in a unit test"


def copy_monitoring(d):
    for f in MONITORING.iterdir():
        shutil.copy(f, d)
    return pathlib.Path(d)


# Deliberate breakages of autoscaler.rules.yaml that still pass `promtool check rules` and the
# alert each one must make fail its unit test.
BREAKAGES = [
    # A wrong metric name: the alert would never fire.
    ('signal="queue_lag"} > 20', 'signal="queue_lags"} > 20', "RunpodAutoscalerQueueBacklog"),
    # A threshold off: 60 s exactly would fire.
    ('signal="latency_p95"} > 60', 'signal="latency_p95"} >= 60', "RunpodAutoscalerLatencyP95High"),
    # Refused calls (no capacity) counted as errors.
    ('{outcome="error"}[10m]', '{outcome!="ok"}[10m]', "RunpodAutoscalerRunpodApiErrors"),
    # A 0 budget would count as spent.
    ("and runpod_autoscaler_max_usd_per_hour > 0", "", "RunpodAutoscalerSpendNearBudget"),
    # 4 minutes instead of 4 hours.
    ("runpod_autoscaler_max_idle_seconds > 4 * 3600", "runpod_autoscaler_max_idle_seconds > 4 * 60",
     "RunpodAutoscalerPodIdleTooLong"),
    # No `for`: a single failed scrape would page.
    ("        for: 2m\n", "", "RunpodAutoscalerDown"),
]


@needs_promtool
@pytest.mark.parametrize("old,new,alert", BREAKAGES, ids=[b[2] for b in BREAKAGES])
def test_a_broken_rule_fails_its_unit_test(old, new, alert):
    with tempfile.TemporaryDirectory() as d:
        rules = copy_monitoring(d) / "autoscaler.rules.yaml"
        text = rules.read_text()
        assert text.count(old) == 1, old
        rules.write_text(text.replace(old, new))
        assert promtool("check", "rules", str(rules)).returncode == 0
        r = promtool("test", "rules", "autoscaler.test.yaml", cwd=d)
        assert r.returncode != 0
        assert alert in r.stdout + r.stderr


@needs_promtool
def test_a_broken_checkpoint_rule_fails_its_unit_test():
    with tempfile.TemporaryDirectory() as d:
        rules = copy_monitoring(d) / "checkpoints.rules.yaml"
        # The wrong metric: the alert would never fire.
        rules.write_text(rules.read_text().replace("checkpoint_missed_total", "checkpoint_mised_total"))
        assert promtool("check", "rules", str(rules)).returncode == 0
        r = promtool("test", "rules", "checkpoints.test.yaml", cwd=d)
        assert r.returncode != 0
        assert "RunpodAutoscalerCheckpointMissed" in r.stdout + r.stderr


@needs_promtool
def test_a_malformed_rule_is_rejected():
    with tempfile.TemporaryDirectory() as d:
        rules = pathlib.Path(d) / "bad.rules.yaml"
        rules.write_text((MONITORING / "checkpoints.rules.yaml").read_text().replace("[15m]) > 0", "[15m) > 0"))
        r = promtool("check", "rules", str(rules))
        assert r.returncode != 0


def test_prometheus_rule_carries_exactly_the_rule_files_groups():
    assert prometheus_rule_mismatch() is None, (
        f"{prometheus_rule_mismatch()}; run `.venv/bin/python tests/python/test_alert_rules.py --write`"
    )
    assert PROMETHEUS_RULE.read_text() == render_prometheus_rule()


def test_a_stale_prometheus_rule_is_caught():
    with tempfile.TemporaryDirectory() as d:
        d = copy_monitoring(d)
        # A threshold changed in the rule file but not in the PrometheusRule.
        rules = d / "autoscaler.rules.yaml"
        rules.write_text(rules.read_text().replace("> 4 * 3600", "> 5 * 3600"))
        assert "differ" in prometheus_rule_mismatch(d / "prometheusrule.yaml", d)
        # A group dropped from the PrometheusRule.
        shutil.copy(MONITORING / "autoscaler.rules.yaml", rules)
        doc = yaml.safe_load((d / "prometheusrule.yaml").read_text())
        doc["spec"]["groups"].pop()
        (d / "prometheusrule.yaml").write_text(yaml.safe_dump(doc))
        assert "differ" in prometheus_rule_mismatch(d / "prometheusrule.yaml", d)
        # The wrong kind.
        doc = yaml.safe_load(PROMETHEUS_RULE.read_text())
        doc["kind"] = "ConfigMap"
        (d / "prometheusrule.yaml").write_text(yaml.safe_dump(doc))
        assert "PrometheusRule" in prometheus_rule_mismatch(d / "prometheusrule.yaml", d)


def test_kustomization_lists_the_rule_and_the_dashboard():
    k = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert k["namespace"] == "gpu-system"
    assert k["resources"] == ["prometheusrule.yaml"]
    (gen,) = k["configMapGenerator"]
    assert gen["options"]["labels"] == {"grafana_dashboard": "1"}
    for entry in gen["files"]:
        src = entry.split("=", 1)[-1]
        assert (MONITORING / src).is_file(), src
    assert any(e.endswith("dashboard.json") for e in gen["files"])


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        PROMETHEUS_RULE.write_text(render_prometheus_rule())
        print(f"wrote {PROMETHEUS_RULE}")
    else:
        sys.exit("usage: test_alert_rules.py --write  (regenerates k8s/monitoring/prometheusrule.yaml)")
