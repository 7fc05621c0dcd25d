"""Active mode through the binary: `serve` with `[reconcile] mode = "active"` against the
emulator binary (sshd pods) buys and joins pods; `pods list` shows their slot, join state and
health; `plan` prints what a tick would do without doing it; `check-config` names what active
mode needs."""

import json
import os
import pathlib
import signal
import subprocess
import tempfile
import urllib.request

import pytest

from emulator_proc import BINARY, KEY, Emulator, policy_toml, wait_for

CONFIG = """
[service]
tick_interval = "300ms"
{policy}[reconcile]
mode = "active"
cluster = "py"
state_dir = "{state}"
image = "runpod/base:0.6.2"
ssh_key_file = "{key}"
health_interval = "1s"
unhealthy_after = "5s"
[join]
worker_command = "echo started > $HOME/worker-started"
"""


@pytest.fixture()
def setup():
    emu = Emulator('boot_delay = "1s"\n')
    d = pathlib.Path(tempfile.mkdtemp(prefix="rpa-active-py-"))
    key = d / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)

    def config(lag):
        path = d / f"config-{lag}.toml"
        path.write_text(CONFIG.format(policy=policy_toml(lag), state=d / "state", key=key))
        return path

    yield emu, d, config
    emu.stop()


def env_for(emu):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update(emu.env())
    return env


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def test_active_serve_buys_and_joins_and_pods_list_shows_slot_join_and_health(setup):
    emu, d, config = setup
    proc = subprocess.Popen(
        [str(BINARY), "serve", "--config", str(config(200)), "--grpc-addr", "127.0.0.1:0",
         "--http-addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(emu))
    try:
        addrs = json.loads(proc.stdout.readline())
        http = f"http://{addrs['http']}"

        def joined():
            try:
                plan = get(f"{http}/debug/plan")
            except OSError:  # 503 until the first tick
                return None
            fleet = plan["fleet"]
            return plan if len(fleet) == 2 and all(e["ready"] for e in fleet) else None

        plan = wait_for(joined, "two pods bought, bootstrapped and healthy", timeout=60.0, interval=0.2)
        assert plan["mode"] == "active"
        slots = sorted(e["claim"]["slot"] for e in plan["fleet"])
        assert slots == [0, 1]
        # The bootstrap ran on each pod (its own home).
        pods = emu.request("GET", "/admin/pods")[2]["pods"]
        for p in pods:
            assert (pathlib.Path(p["podDir"]) / "worker-started").read_text() == "started\n"

        r = subprocess.run([str(BINARY), "pods", "list", "--config", str(config(200)),
                            "--service", http, "--output", "json"],
                           capture_output=True, text=True, env=env_for(emu), timeout=30)
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert sorted(row["slot"] for row in rows) == ["0-0", "1-0"]
        assert all(row["join"] == "joined" and row["health"] == "ready" for row in rows), rows
        r = subprocess.run([str(BINARY), "pods", "list", "--config", str(config(200)), "--service", http],
                           capture_output=True, text=True, env=env_for(emu), timeout=30)
        assert r.returncode == 0, r.stderr
        assert "SLOT" in r.stdout and "joined" in r.stdout and "ready" in r.stdout

        # `plan` while it runs: reads the store without taking it, buys nothing more.
        r = subprocess.run([str(BINARY), "plan", "--config", str(config(400)), "--output", "json"],
                           capture_output=True, text=True, env=env_for(emu), timeout=30)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["plan"]["demand_gpus"] == 4
        assert len(out["fleet"]) == 2
        assert not any(s["action"] == "launch" for s in out["plan"]["steps"]), out["text"]
        assert "max_pods 2 reached" in out["text"]
        assert len(emu.request("GET", "/admin/pods")[2]["pods"]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_plan_is_a_dry_run(setup):
    emu, d, config = setup
    r = subprocess.run([str(BINARY), "plan", "--config", str(config(300))],
                       capture_output=True, text=True, env=env_for(emu), timeout=30)
    assert r.returncode == 0, r.stderr
    assert "2 x launch 1x NVIDIA RTX A5000" in r.stdout, r.stdout
    assert emu.request("GET", "/admin/pods")[2]["pods"] == []


def test_active_mode_needs_a_key_an_image_and_an_ssh_key(setup):
    emu, d, config = setup
    path = config(100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    r = subprocess.run([str(BINARY), "check-config", str(path)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "runpod.api_key" in r.stderr and "RUNPOD_API_KEY" in r.stderr, r.stderr
    r = subprocess.run([str(BINARY), "check-config", str(path)], capture_output=True, text=True,
                       env=env_for(emu))
    assert r.returncode == 0, r.stderr
    broken = path.read_text().replace(f'ssh_key_file = "{d / "id_ed25519"}"', 'ssh_key_file = "/nonexistent"')
    path.write_text(broken)
    r = subprocess.run([str(BINARY), "check-config", str(path)], capture_output=True, text=True,
                       env=env_for(emu))
    assert r.returncode == 2 and "reconcile.ssh_key_file" in r.stderr and "ssh-keygen" in r.stderr, r.stderr
    assert KEY not in r.stderr
