"""The Grafana dashboard and the alert rules against a real Prometheus scraping the running
service: every PromQL expression parses, every metric it names is one the service exports, the
rules load and evaluate without error, and the dashboard is well formed. Broken copies (a
malformed expression, an unknown metric, a malformed dashboard) are caught."""

import copy
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
DASHBOARD = MONITORING / "dashboard.json"
BINARY = pathlib.Path(os.environ.get("RPA_BINARY", ROOT / "target" / "debug" / "runpod-autoscaler"))
PROMETHEUS = os.environ.get("RPA_PROMETHEUS_BIN") or shutil.which("prometheus") or "/usr/bin/prometheus"

# Grafana's variables, as a query of the dashboard would get them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${instance}": ".*",
    "$instance": ".*",
}

# Not metric names: PromQL keywords and operators that look like identifiers.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan", "atan2",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url, timeout=10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        # Prometheus answers a bad query with 400 and a JSON error.
        return json.loads(e.read())


def grafana_to_promql(expr):
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr):
    """The metric names a PromQL expression selects (functions, keywords, label names, strings,
    durations and grouping lists left out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", e):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def exported_names(metrics_text):
    """Metric names in a /metrics exposition (samples, so histograms give _bucket/_sum/_count),
    plus `up`, which Prometheus adds to every target."""
    names = {"up"}
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def problems(prom_url, expr, exported):
    """Why `expr` is not fit for the dashboard or the rules (empty when it is)."""
    out = []
    r = http_json(f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    if r.get("status") != "success":
        out.append(f"{expr!r} does not evaluate: {r.get('errorType')}: {r.get('error')}")
    names = metric_names(expr)
    if not names:
        out.append(f"{expr!r} names no metric")
    for n in sorted(names - exported):
        out.append(f"{expr!r} names {n}, which the service does not export")
    return out


def panels(dashboard):
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])


def dashboard_expressions(dashboard):
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            # label_values(METRIC, LABEL) is Grafana's; its metric selector is PromQL.
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q)
            exprs.append(m.group(1) if m else q)
    return [grafana_to_promql(e) for e in exprs]


def rule_expressions():
    exprs = []
    for f in sorted(MONITORING.glob("*.rules.yaml")):
        for g in yaml.safe_load(f.read_text())["groups"]:
            exprs += [r["expr"] for r in g["rules"]]
    return exprs


def structure_problems(d):
    """What is wrong with a Grafana dashboard's basic structure (empty when nothing)."""
    out = []
    for key in ("title", "uid", "panels", "schemaVersion"):
        if key not in d:
            out.append(f"dashboard has no {key}")
    variables = {v.get("name") for v in d.get("templating", {}).get("list", [])}
    ids = []
    for p in panels(d):
        title = p.get("title", "?")
        if not isinstance(p.get("id"), int):
            out.append(f"panel {title!r} has no integer id")
        ids.append(p.get("id"))
        grid = p.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid.get("x", 0) + grid.get("w", 0) > 24:
            out.append(f"panel {title!r} has a bad gridPos {grid}")
        if p.get("type") == "row":
            continue
        targets = p.get("targets") or []
        if not targets:
            out.append(f"panel {title!r} has no targets")
        for t in targets:
            if not t.get("expr", "").strip():
                out.append(f"panel {title!r} has a target without expr")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids) or None in ref_ids:
            out.append(f"panel {title!r} has missing or repeated refIds {ref_ids}")
        uid = (p.get("datasource") or {}).get("uid", "")
        for var in re.findall(r"\$\{?(\w+)", uid):
            if var not in variables:
                out.append(f"panel {title!r} uses datasource variable {var}, which is not defined")
    dupes = sorted({i for i in ids if ids.count(i) > 1 and i is not None})
    if dupes:
        out.append(f"panel ids repeat: {dupes}")
    return out


@pytest.fixture(scope="module")
def stack():
    """The service (static demand) and a Prometheus scraping it every second with the rules
    loaded: (Prometheus URL, names the service exports)."""
    if not (os.path.exists(PROMETHEUS) and os.access(PROMETHEUS, os.X_OK)):
        pytest.skip("prometheus comes with the Debian package (scripts/test.sh installs it)")
    service = subprocess.Popen(
        [str(BINARY), "serve", "--config", str(ROOT / "examples" / "static.toml"),
         "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    tmp = tempfile.TemporaryDirectory()
    prom = None
    try:
        http = json.loads(service.stdout.readline())["http"]
        port = free_port()
        config = pathlib.Path(tmp.name) / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in sorted(MONITORING.glob("*.rules.yaml"))],
            "scrape_configs": [{"job_name": "runpod-autoscaler", "static_configs": [{"targets": [http]}]}],
        }))
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp.name}/data",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(pathlib.Path(tmp.name) / "prometheus.log", "w"),
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert prom.poll() is None, (pathlib.Path(tmp.name) / "prometheus.log").read_text()
            try:
                r = http_json(f"{url}/api/v1/query?query=" + urllib.parse.quote("count_over_time(up[1m]) >= 3"), 2)
                if r.get("status") == "success" and r["data"]["result"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not scrape the service three times in 30 s"
            time.sleep(0.25)
        with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as r:
            exported = exported_names(r.read().decode())
        yield url, exported
    finally:
        for p in (prom, service):
            if p is not None:
                p.terminate()
                p.wait(timeout=10)
        tmp.cleanup()


def test_prometheus_scrapes_the_service(stack):
    url, _ = stack
    r = http_json(f"{url}/api/v1/query?query=" + urllib.parse.quote('up{job="runpod-autoscaler"}'))
    assert [s["value"][1] for s in r["data"]["result"]] == ["1"]
    r = http_json(f"{url}/api/v1/query?query=runpod_autoscaler_served_gpus")
    assert [s["value"][1] for s in r["data"]["result"]] == ["7"]


def test_every_dashboard_expression_evaluates_and_names_exported_metrics(stack):
    url, exported = stack
    exprs = dashboard_expressions(json.loads(DASHBOARD.read_text()))
    assert len(exprs) >= 20
    found = [p for e in exprs for p in problems(url, e, exported)]
    assert not found, "\n".join(found)


def test_every_rule_expression_evaluates_and_names_exported_metrics(stack):
    url, exported = stack
    exprs = rule_expressions()
    assert len(exprs) >= 10
    found = [p for e in exprs for p in problems(url, e, exported)]
    assert not found, "\n".join(found)


def test_prometheus_loads_and_evaluates_every_rule(stack):
    url, _ = stack
    deadline = time.monotonic() + 20
    while True:
        groups = http_json(f"{url}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r["health"] != "unknown" for r in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)
    names = sorted(r["name"] for r in rules)
    expected = sorted(r["alert"] for e in MONITORING.glob("*.rules.yaml")
                      for g in yaml.safe_load(e.read_text())["groups"] for r in g["rules"])
    assert names == expected
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad
    # The service is up and fresh: none of the service alerts is pending or firing.
    active = {r["name"] for r in rules if r["state"] != "inactive"}
    assert not active & {"RunpodAutoscalerDown", "RunpodAutoscalerAbsent", "RunpodAutoscalerSignalStale"}


def test_a_broken_expression_and_an_unknown_metric_are_caught(stack):
    url, exported = stack
    broken = problems(url, "sum(rate(runpod_autoscaler_ticks_total[1m])", exported)
    assert any("does not evaluate" in p for p in broken), broken
    unknown = problems(url, 'histogram_quantile(0.95, sum by (le) (rate(runpod_autoscaler_tick_secs_bucket[1m])))',
                       exported)
    assert unknown == [
        "'histogram_quantile(0.95, sum by (le) (rate(runpod_autoscaler_tick_secs_bucket[1m])))' names "
        "runpod_autoscaler_tick_secs_bucket, which the service does not export"
    ]
    # A dashboard with a typo in one target is caught the same way.
    d = json.loads(DASHBOARD.read_text())
    target = next(t for p in panels(d) for t in p.get("targets", []) if "desired_gpus" in t["expr"])
    target["expr"] = target["expr"].replace("desired_gpus", "desire_gpus")
    found = [p for e in dashboard_expressions(d) for p in problems(url, e, exported)]
    assert len(found) == 1 and "runpod_autoscaler_desire_gpus" in found[0], found


def test_metric_names_are_read_from_promql():
    assert metric_names(
        'sum by (op, outcome) (rate(a_total{outcome="error", x=~"b|c"}[5m])) / on(job) group_left(y) b'
        ' > 0.1 * 3600 and absent(up{job="j"}) or c offset 5m'
    ) == {"a_total", "b", "up", "c"}
    assert metric_names("histogram_quantile(0.5, sum by (le) (rate(h_bucket[1m])))") == {"h_bucket"}
    assert metric_names("1e3 * 2") == set()


def test_dashboard_structure():
    d = json.loads(DASHBOARD.read_text())
    assert structure_problems(d) == []
    text = DASHBOARD.read_text()
    # What the issue asks the dashboard to show.
    for metric in ["runpod_autoscaler_pods", "runpod_autoscaler_usd_per_hour", "runpod_autoscaler_max_usd_per_hour",
                   "runpod_autoscaler_demand_gpus", "runpod_autoscaler_served_gpus", "runpod_autoscaler_desired_gpus",
                   "runpod_autoscaler_baseline_gpus", "runpod_autoscaler_signal_value",
                   "runpod_autoscaler_signal_age_seconds", "runpod_autoscaler_launches_total",
                   "runpod_autoscaler_reconcile_failures_total", "runpod_autoscaler_join_seconds_bucket",
                   "runpod_autoscaler_tick_seconds_bucket"]:
        assert metric in text, metric


def test_a_malformed_dashboard_is_caught():
    d = json.loads(DASHBOARD.read_text())
    graphs = [p for p in d["panels"] if p["type"] != "row"]
    dup = copy.deepcopy(d)
    [p for p in dup["panels"] if p["type"] != "row"][1]["id"] = graphs[0]["id"]
    assert any("ids repeat" in p for p in structure_problems(dup))
    no_targets = copy.deepcopy(d)
    [p for p in no_targets["panels"] if p["type"] != "row"][0]["targets"] = []
    assert any("no targets" in p for p in structure_problems(no_targets))
    no_expr = copy.deepcopy(d)
    del [p for p in no_expr["panels"] if p["type"] != "row"][0]["targets"][0]["expr"]
    assert any("without expr" in p for p in structure_problems(no_expr))
    no_var = copy.deepcopy(d)
    no_var["templating"]["list"] = [v for v in no_var["templating"]["list"] if v["name"] != "datasource"]
    assert any("datasource variable" in p for p in structure_problems(no_var))
