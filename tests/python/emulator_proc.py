"""Starts the `runpod-autoscaler emulator` binary on a free loopback port for a test, and a
tiny HTTP client (urllib) that returns status, headers and decoded JSON."""

import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = pathlib.Path(os.environ.get("RPA_BINARY", ROOT / "target" / "debug" / "runpod-autoscaler"))
KEY = "rpa_py_test_key_0123456789"


def wait_for(pred, what, timeout=15.0, interval=0.05):
    """Polls `pred()` every `interval` seconds until truthy and returns its value; the timeout
    is only a guard."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def policy_toml(lag):
    """The `[policy]` and `[signals]` blocks the CLI tests share: at most 2 one-GPU RTX A5000
    pods ($0.26/h, $2/h in all), 100 jobs of lag per GPU, and a static queue lag of `lag`."""
    return f"""[policy]
max_pods = 2
max_usd_per_hour = 2.0
gpu_type = "NVIDIA RTX A5000"
pod_usd_per_hour = 0.26
lag_per_gpu = 100
[signals]
poll_interval = "300ms"
[signals.queue]
source = "static"
value = {lag}
"""


class Emulator:
    def __init__(self, config_text=""):
        assert BINARY.exists(), f"{BINARY} missing: build with `cargo build` first"
        self.dir = tempfile.mkdtemp(prefix="rpa-emu-py-")
        cfg = pathlib.Path(self.dir) / "emulator.toml"
        cfg.write_text(config_text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
        self.proc = subprocess.Popen(
            [str(BINARY), "emulator", "--listen", "127.0.0.1:0", "--api-key", KEY, "--config", str(cfg)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        line = self.proc.stdout.readline()
        assert line, f"emulator printed nothing; stderr: {self.proc.stderr.read()}"
        info = json.loads(line)
        self.api_url = info["api_url"]
        self.graphql_url = info["graphql_url"]

    def env(self, key=KEY):
        return {"RUNPOD_API_URL": self.api_url, "RUNPOD_GRAPHQL_URL": self.graphql_url, "RUNPOD_API_KEY": key}

    def request(self, method, path, body=None, key=KEY):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api_url + path, data=data, method=method)
        if key is not None:
            req.add_header("Authorization", f"Bearer {key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, headers, raw = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            status, headers, raw = e.code, dict(e.headers), e.read()
        headers = {k.lower(): v for k, v in headers.items()}
        return status, headers, (json.loads(raw) if raw else None)

    def wait_for(self, pred, what, timeout=15.0):
        """Polls `pred()` until truthy; the timeout is only a guard."""
        return wait_for(pred, what, timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)
