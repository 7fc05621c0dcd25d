"""The `gpus` and `pods` commands against the emulator binary (URLs and key from the
environment): output, ownership filtering, confirmation rules, and the key never printed."""

import json
import os
import subprocess

import pytest

from emulator_proc import BINARY, KEY, Emulator


@pytest.fixture()
def emu():
    e = Emulator('boot_delay = "0s"\nsshd = false\n')
    yield e
    e.stop()


def run(emu, *args, key=KEY, stdin=subprocess.DEVNULL):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update(emu.env(key))
    return subprocess.run([str(BINARY), *args], capture_output=True, text=True, env=env, stdin=stdin)


def make_pod(emu, name, owner="runpod-autoscaler"):
    status, _, pod = emu.request("POST", "/v2/pods", {
        "name": name, "image": "img", "gpu": {"id": "NVIDIA RTX A5000", "count": 2},
        "env": {"RPA_OWNER": owner}, "ports": ["22/tcp"]})
    assert status == 201, pod
    return pod["id"]


def test_gpus_json_and_table(emu):
    r = run(emu, "gpus", "--output", "json")
    assert r.returncode == 0, r.stderr
    gpus = {g["gpu_type"]: g for g in json.loads(r.stdout)}
    a5000 = gpus["NVIDIA RTX A5000"]
    assert a5000["memory_gb"] == 24 and a5000["secure_usd"] == 0.26 and a5000["community_spot_usd"] == 0.11
    assert a5000["stock"] == "High"
    r = run(emu, "gpus")
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("NVIDIA RTX A5000 "))
    assert "0.26" in line and "0.16" in line and "high" in line


def test_pods_list_shows_only_ours(emu):
    ours = make_pod(emu, "rpa-cli-1")
    make_pod(emu, "rpa-cli-2", owner="someone-else")
    make_pod(emu, "manual-pod")
    r = run(emu, "pods", "list", "--output", "json")
    assert r.returncode == 0, r.stderr
    pods = json.loads(r.stdout)
    assert [p["id"] for p in pods] == [ours]
    r = run(emu, "pods", "list")
    assert r.returncode == 0, r.stderr
    assert ours in r.stdout and "RUNNING" in r.stdout and "0.52" in r.stdout
    assert "manual-pod" not in r.stdout


def test_terminate_refuses_without_yes_when_not_a_tty(emu):
    pid = make_pod(emu, "rpa-keep")
    r = run(emu, "pods", "terminate", pid)
    assert r.returncode != 0
    assert "--yes" in r.stderr and "not a terminal" in r.stderr
    assert emu.request("GET", f"/v2/pods/{pid}")[0] == 200


def test_terminate_one_and_all_owned(emu):
    a, b = make_pod(emu, "rpa-a"), make_pod(emu, "rpa-b")
    foreign = make_pod(emu, "theirs")
    r = run(emu, "pods", "terminate", a, "--yes")
    assert r.returncode == 0, r.stderr
    assert f"terminated {a}" in r.stdout
    # Already gone counts as done.
    r = run(emu, "pods", "terminate", a, "--yes")
    assert r.returncode == 0, r.stderr
    r = run(emu, "pods", "terminate", "--all-owned", "--yes")
    assert r.returncode == 0, r.stderr
    assert f"terminated {b}" in r.stdout and foreign not in r.stdout
    assert emu.request("GET", f"/v2/pods/{foreign}")[0] == 200
    assert emu.request("GET", f"/v2/pods/{b}")[0] == 404
    r = run(emu, "pods", "terminate", "--all-owned", "--yes")
    assert r.returncode == 0 and "no pods" in r.stdout


def test_bad_key_is_a_clear_error_and_never_printed(emu):
    secret = "rpa_WRONG_KEY_value_42"
    for args in (["gpus"], ["pods", "list"], ["pods", "terminate", "--all-owned", "--yes"]):
        r = run(emu, *args, key=secret)
        assert r.returncode != 0
        assert "RunPod API key rejected" in r.stderr
        assert secret not in r.stdout + r.stderr


def test_missing_key_says_how_to_set_it(emu):
    r = run(emu, "gpus", key="")
    assert r.returncode != 0
    assert "RUNPOD_API_KEY" in r.stderr


def test_emulator_requires_a_key():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    r = subprocess.run([str(BINARY), "emulator", "--listen", "127.0.0.1:0"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode != 0 and "--api-key" in r.stderr


@pytest.mark.parametrize("answer,terminated", [("n\n", False), ("y\n", True)])
def test_terminate_asks_on_a_terminal(emu, answer, terminated):
    import pty
    pid = make_pod(emu, "rpa-ask")
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update(emu.env())
    proc = subprocess.Popen([str(BINARY), "pods", "terminate", pid], stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    os.close(slave)
    os.write(master, answer.encode())
    out, err = proc.communicate(timeout=30)
    os.close(master)
    assert "Terminate 1 pod(s)" in err
    assert (proc.returncode == 0) == terminated, err
    assert (f"terminated {pid}" in out) == terminated
    assert emu.request("GET", f"/v2/pods/{pid}")[0] == (404 if terminated else 200)


def test_terminate_refuses_a_pod_we_do_not_own_unless_forced(emu):
    unprefixed = make_pod(emu, "theirs")
    other_owner = make_pod(emu, "rpa-lookalike", owner="someone-else")
    for pid, why in ((unprefixed, '"rpa-"'), (other_owner, '"someone-else"')):
        r = run(emu, "pods", "terminate", pid, "--yes")
        assert r.returncode != 0, r.stdout
        assert "not owned by this autoscaler" in r.stderr and why in r.stderr, r.stderr
        assert "--force" in r.stderr
        assert emu.request("GET", f"/v2/pods/{pid}")[0] == 200
    r = run(emu, "pods", "terminate", unprefixed, "--yes", "--force")
    assert r.returncode == 0, r.stderr
    assert f"terminated {unprefixed}" in r.stdout
    assert emu.request("GET", f"/v2/pods/{unprefixed}")[0] == 404
    # Gone: said so, and nothing to do.
    r = run(emu, "pods", "terminate", unprefixed, "--yes")
    assert r.returncode == 0, r.stderr
    assert f"{unprefixed} is already gone" in r.stdout
    # --force is only for one id.
    r = run(emu, "pods", "terminate", "--all-owned", "--force", "--yes")
    assert r.returncode != 0
