"""RSS of the MCP server (`runpod-autoscaler mcp`) after 1,000 tool calls from the official MCP
Python SDK's stdio client, against the emulator binary's sshd pods (5 pods; 800 `exec`, 100
`list_files`, 100 `list_pods`). Run by scripts/bench_access.sh with RPA_BINARY set."""

import asyncio
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "python"))

from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402

from emulator_proc import BINARY, Emulator  # noqa: E402

PODS = 5


def rss_of_mcp_server():
    """VmRSS and VmHWM (MiB) of the `runpod-autoscaler mcp` process this script started."""
    for proc in pathlib.Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if cmd[0].endswith(b"runpod-autoscaler") and cmd[1:2] == [b"mcp"]:
                status = (proc / "status").read_text().splitlines()
                kb = {l.split(":")[0]: int(l.split()[1]) for l in status if l.startswith(("VmRSS", "VmHWM"))}
                return kb["VmRSS"] / 1024, kb["VmHWM"] / 1024
        except (OSError, IndexError, ValueError):
            continue
    raise RuntimeError("the mcp server process was not found")


async def drive(params, pods):
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            start = time.monotonic()
            for i in range(1000):
                pod = pods[i % PODS]
                if i % 10 == 0:
                    r = await session.call_tool("list_files", {"pod": pod})
                elif i % 10 == 5:
                    r = await session.call_tool("list_pods", {})
                else:
                    r = await session.call_tool("exec", {"pod": pod, "command": "echo ok"})
                assert not r.is_error, r.structured_content
            took = time.monotonic() - start
            rss, hwm = rss_of_mcp_server()
            return took, rss, hwm


def main():
    emu = Emulator('boot_delay = "1s"\n')
    d = pathlib.Path(tempfile.mkdtemp(prefix="rpa-mcp-bench-"))
    try:
        key = d / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        pub = (d / "id_ed25519.pub").read_text().strip()
        pods = []
        for i in range(PODS):
            _, _, p = emu.request("POST", "/v2/pods", {
                "name": f"rpa-bench-{i}", "image": "runpod/base:0.6.2",
                "gpu": {"id": "NVIDIA RTX A5000", "count": 1}, "cloud": "SECURE", "ports": ["22/tcp"],
                "env": {"RPA_OWNER": "runpod-autoscaler", "PUBLIC_KEY": pub}, "disk": 20})
            pods.append(p["id"])
        for pid in pods:
            emu.wait_for(lambda: emu.request("GET", f"/v2/pods/{pid}")[2].get("ssh", {}).get("direct"), "SSH")
        host = emu.request("GET", "/admin/host-key")[2]["hostKey"]
        config = d / "config.toml"
        config.write_text(f'[reconcile]\nssh_key_file = "{key}"\nssh_host_keys = ["{host}"]\n')
        env = emu.env()
        params = StdioServerParameters(command=str(BINARY), args=["mcp", "--config", str(config)], env=env)
        took, rss, hwm = asyncio.run(drive(params, pods))
        print(f"MCP server after 1,000 tool calls over {PODS} pods (800 exec, 100 list_files, "
              f"100 list_pods) in {took:.1f} s ({took:.2f} ms per call): RSS {rss:.1f} MiB, peak {hwm:.1f} MiB")
    finally:
        emu.stop()


if __name__ == "__main__":
    main()
