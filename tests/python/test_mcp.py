"""The MCP server (`runpod-autoscaler mcp`) driven by the official MCP Python SDK's stdio
client, against the emulator binary's sshd pods: the tools are listed with their input
schemas, `list_pods`, `exec`, `upload`, `list_files`, `download` and `plan` work, and failures
come back as structured tool errors an agent can act on (unknown pod, bad API key)."""

import asyncio
import hashlib
import os
import pathlib
import subprocess

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from emulator_proc import BINARY, Emulator, policy_toml

CONFIG = """
{policy}[reconcile]
state_dir = "{state}"
ssh_key_file = "{key}"
ssh_host_keys = ["{host_key}"]
"""

TOOLS = {"list_gpus", "list_pods", "exec", "upload", "download", "list_files", "plan"}


def start_pod(emu, tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    body = {"name": "rpa-mcp-1", "image": "runpod/base:0.6.2",
            "gpu": {"id": "NVIDIA RTX A5000", "count": 1}, "cloud": "SECURE", "ports": ["22/tcp"],
            "env": {"RPA_OWNER": "runpod-autoscaler", "PUBLIC_KEY": (tmp_path / "id_ed25519.pub").read_text().strip()},
            "disk": 20}
    status, _, pod = emu.request("POST", "/v2/pods", body)
    assert status == 201, pod

    def ready():
        _, _, p = emu.request("GET", f"/v2/pods/{pod['id']}")
        return p if p["status"] == "RUNNING" and p.get("ssh", {}).get("direct") else None

    emu.wait_for(ready, "the pod to be RUNNING with SSH")
    _, _, host = emu.request("GET", "/admin/host-key")
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(policy=policy_toml(300), state=tmp_path / "state", key=key, host_key=host["hostKey"]))
    return pod["id"], config


def server(emu, config, api_key=None):
    env = emu.env() if api_key is None else emu.env(api_key)
    env["PATH"] = os.environ["PATH"]
    return StdioServerParameters(command=str(BINARY), args=["mcp", "--config", str(config)], env=env)


async def call(session, name, args=None):
    r = await session.call_tool(name, args or {})
    return r.is_error, r.structured_content


async def drive(params, pod, tmp_path):
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            assert init.server_info.name == "runpod-autoscaler"

            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert set(tools) == TOOLS, "terminate_pod is off unless access.allow_terminate"
            exec_schema = tools["exec"].input_schema
            assert exec_schema["type"] == "object"
            assert set(exec_schema["required"]) == {"pod", "command"}
            assert set(tools["upload"].input_schema["required"]) == {"pod", "local_path", "remote_path"}
            assert "pod" in tools["list_files"].input_schema["properties"]

            err, out = await call(session, "list_pods")
            assert not err, out
            assert [p["id"] for p in out["pods"]] == [pod]
            assert out["pods"][0]["state"] == "RUNNING"

            err, out = await call(session, "list_gpus")
            assert not err and any(g["gpu_type"] == "NVIDIA RTX A5000" for g in out["gpus"]), out

            err, out = await call(session, "exec", {"pod": pod, "command": "echo hi; echo oops >&2; exit 3"})
            assert not err, out
            assert (out["exit_status"], out["stdout"], out["stderr"]) == (3, "hi\n", "oops\n")

            data = os.urandom(3 * 1024 * 1024 + 17)
            src = tmp_path / "payload.bin"
            src.write_bytes(data)
            want = hashlib.sha256(data).hexdigest()
            err, out = await call(session, "upload", {"pod": pod, "local_path": str(src), "remote_path": "payload.bin"})
            assert not err, out
            assert out["files"][0]["sha256"] == want and out["bytes"] == len(data)
            err, out = await call(session, "exec", {"pod": pod, "command": "sha256sum payload.bin"})
            assert out["stdout"].split()[0] == want

            err, out = await call(session, "list_files", {"pod": pod})
            assert not err, out
            entry = next(e for e in out["entries"] if e["name"] == "payload.bin")
            assert (entry["kind"], entry["size"]) == ("file", len(data))

            back = tmp_path / "back.bin"
            err, out = await call(session, "download", {"pod": pod, "remote_path": "payload.bin", "local_path": str(back)})
            assert not err, out
            assert back.read_bytes() == data

            # Read-only plan: what a tick would do; nothing is launched.
            err, out = await call(session, "plan")
            assert not err, out
            assert out["synced"] is True and "plan" in out and isinstance(out["text"], str)

            # Errors an agent can act on.
            err, out = await call(session, "exec", {"pod": "nosuchpod", "command": "true"})
            assert err and out["error"]["kind"] == "unknown_pod", out
            assert "nosuchpod" in out["error"]["message"]
            err, out = await call(session, "list_files", {"pod": pod, "path": "no/such/dir"})
            assert err and out["error"]["kind"] == "path", out


async def bad_key(params):
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await call(session, "list_pods")


def test_an_agent_uses_pods_through_the_mcp_server(tmp_path):
    emu = Emulator('boot_delay = "1s"\n')
    try:
        pod, config = start_pod(emu, tmp_path)
        asyncio.run(drive(server(emu, config), pod, tmp_path))
        _, _, pods = emu.request("GET", "/v2/pods")
        assert len(pods["pods"]) == 1, "plan launched nothing"

        err, out = asyncio.run(bad_key(server(emu, config, api_key="not-the-key")))
        assert err and out["error"]["kind"] == "bad_api_key", out
        assert "not-the-key" not in out["error"]["message"]
    finally:
        emu.stop()


def test_terminate_is_offered_only_when_enabled(tmp_path):
    emu = Emulator('boot_delay = "1s"\n')
    try:
        pod, config = start_pod(emu, tmp_path)
        config.write_text(config.read_text() + "[access]\nallow_terminate = true\n")

        async def terminate():
            async with stdio_client(server(emu, config)) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    names = {t.name for t in (await session.list_tools()).tools}
                    assert names == TOOLS | {"terminate_pod"}
                    err, out = await call(session, "terminate_pod", {"pod": "someone-elses"})
                    assert err and out["error"]["kind"] == "unknown_pod", out
                    return await call(session, "terminate_pod", {"pod": pod})

        err, out = asyncio.run(terminate())
        assert not err and out == {"pod": pod, "terminated": True}, out
        _, _, admin = emu.request("GET", "/admin/pods")
        assert [p["status"] for p in admin["pods"] if p["id"] == pod] == ["TERMINATED"]
    finally:
        emu.stop()
