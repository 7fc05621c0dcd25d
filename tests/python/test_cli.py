"""The binary's command-line edge: config env overrides, exit codes, secrets never printed."""

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = pathlib.Path(os.environ.get("RPA_BINARY", ROOT / "target" / "debug" / "runpod-autoscaler"))
STATIC = str(ROOT / "examples" / "static.toml")


def run(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(BINARY), *args], capture_output=True, text=True, env=full_env)


def test_env_override_is_validated_and_names_the_key():
    r = run("check-config", STATIC, env={"RUNPOD_AUTOSCALER__POLICY__MIN_PODS": "99"})
    assert r.returncode == 2
    assert "policy.min_pods" in r.stderr and "policy.max_pods" in r.stderr


def test_env_override_with_unknown_key_is_rejected():
    r = run("check-config", STATIC, env={"RUNPOD_AUTOSCALER__POLICY__MAX_PODZ": "3"})
    assert r.returncode == 2
    assert "max_podz" in r.stderr


def test_env_override_applies():
    r = run("check-config", STATIC, env={"RUNPOD_AUTOSCALER__POLICY__MAX_PODS": "12"})
    assert r.returncode == 0, r.stderr


def test_missing_config_file_says_so():
    r = run("check-config", "/nonexistent/rpa.toml")
    assert r.returncode == 2
    assert "not found" in r.stderr


def test_api_key_never_printed_even_on_errors():
    secret = "rpa_TOPSECRET_0123456789"
    r = run("check-config", STATIC, env={"RUNPOD_API_KEY": secret, "RUNPOD_AUTOSCALER__POLICY__MAX_PODS": "x"})
    assert r.returncode == 2
    assert secret not in r.stdout + r.stderr


def test_simulate_json_output():
    import json
    r = run("simulate", "--trace", str(ROOT / "benches/traces/single_spike.csv"), "--output", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out[0]["trace"] == "single_spike"
    assert [x["policy"] for x in out[0]["results"]] == ["seed", "target", "cost"]
    bound = out[0]["bound"]
    assert bound["violation_minutes"] > 0  # the spike outgrows max_pods
    for x in out[0]["results"]:
        assert x["jobs_completed"] <= x["jobs_arrived"] + 1e-6
        assert x["peak_pods"] <= 20
        assert bound["usd"] <= x["total_usd"]
        assert bound["violation_minutes"] <= x["slo_violation_minutes"]


def test_simulate_one_policy_and_the_table():
    r = run("simulate", "--trace", str(ROOT / "benches/traces/single_spike.csv"), "--policy", "cost")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("single_spike ")]
    assert [row[1] for row in rows] == ["cost", "bound"]
    cost, bound = float(rows[0][2]), float(rows[1][2])
    assert 0 < bound <= cost
    assert rows[0][3] == f"{cost / bound:.2f}"
    assert "no schedule meets the SLO in" in r.stdout


def test_simulate_timeline_is_the_report_tick_by_tick(tmp_path):
    import csv
    import json
    out = tmp_path / "timeline.csv"
    r = run("simulate", "--trace", str(ROOT / "benches/traces/single_spike.csv"), "--output", "json",
            "--timeline", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)[0]
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert {x["trace"] for x in rows} == {"single_spike"}
    for res in report["results"]:
        mine = [x for x in rows if x["policy"] == res["policy"]]
        assert len(mine) == res["duration_minutes"] * 4  # 15 s ticks
        assert sum(int(x["launched"]) for x in mine) == res["pod_creations"]
        assert sum(int(x["launched"]) - int(x["terminated"]) for x in mine) == int(mine[-1]["pods"])
        violated = {x["minute"] for x in mine if x["violated"] == "true"}
        assert len(violated) == res["slo_violation_minutes"]
        assert max(int(x["pods"]) for x in mine) == res["peak_pods"]
        usd = sum(float(x["usd_per_hour"]) * 15 / 3600 for x in mine)
        assert abs(usd - res["total_usd"]) < 1e-6


def test_simulate_timeline_to_an_unwritable_path_fails_first(tmp_path):
    target = tmp_path / "no-such-dir" / "timeline.csv"
    r = run("simulate", "--trace", str(ROOT / "benches/traces/single_spike.csv"), "--timeline", str(target))
    assert r.returncode != 0
    assert "writing the timeline to" in r.stderr and str(target) in r.stderr
    assert r.stdout == ""  # no table: it fails before replaying


def test_simulate_without_the_bound():
    import json
    spike = str(ROOT / "benches/traces/single_spike.csv")
    r = run("simulate", "--trace", spike, "--no-bound", "--output", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out[0]["bound"] is None and "bound_error" not in out[0]
    with_bound = json.loads(run("simulate", "--trace", spike, "--output", "json").stdout)
    assert out[0]["results"] == with_bound[0]["results"]
    r = run("simulate", "--trace", spike, "--no-bound", "--policy", "cost")
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("single_spike ")]
    assert [row[1] for row in rows] == ["cost"] and rows[0][3] == "-"
    assert "single_spike: no lower bound: not computed" in r.stdout


def test_simulate_bad_trace_is_a_clear_error():
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
        f.write("time_s,arriving_jobs\n0,5\n60,-3\n")
    r = run("simulate", "--trace", f.name)
    assert r.returncode != 0
    assert "line 3" in r.stderr and "arriving_jobs" in r.stderr
