#!/usr/bin/env bash
# Pod access against OpenSSH in the same run, on the emulator's sshd pods: pooled exec vs
# `ssh` per command, 1 GiB transfers vs scp/sftp, 50 concurrent commands over 5 pods, RSS after
# 1,000 operations. Release builds; needs openssh-server and openssh-client (scripts/test.sh
# installs them). RPA_BENCH_GIB=0.25 for a smaller transfer.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin runpod-autoscaler --example bench_access
RPA_BINARY="$PWD/target/release/runpod-autoscaler" target/release/examples/bench_access
# The MCP server's own memory after 1,000 tool calls from the official MCP Python SDK client.
. scripts/lib.sh
ensure_venv
RPA_BINARY="$PWD/target/release/runpod-autoscaler" .venv/bin/python scripts/bench_mcp_rss.py
