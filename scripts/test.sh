#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need (idempotent,
# cached in git-ignored folders), builds, runs the Rust tests and the cross-stack Python tests.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_rust
ensure_build_deps
ensure_venv
# Real components for the integration tests: a tansu broker and Prometheus (exports
# RPA_TANSU_BIN and RPA_PROMETHEUS_BIN, which the tests require) and OpenSSH's sshd (the
# stand-in for a RunPod pod's sshd in the emulator) and s3s-fs, the S3-compatible store of the
# checkpoint tests (exports RPA_S3S_BIN).
ensure_tansu
ensure_prometheus
ensure_sshd
ensure_s3s
# checkov for the Terraform baseline (its own venv; exports RPA_CHECKOV_BIN).
ensure_checkov

log "building"
# Every locked package, whatever its target (test_image.py reads `cargo metadata --offline`).
cargo fetch --locked
cargo build --locked --no-default-features --bin runpod-autoscaler && if ./target/debug/runpod-autoscaler emulator --help >/dev/null 2>&1; then echo "built without the emulator feature, the binary still has an emulator subcommand" >&2; exit 1; fi
cargo build --locked --all-targets

log "Rust tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast
else
  cargo test --locked --no-fail-fast
fi

log "Python tests against the built binary (KEDA grpcio wire, emulator OpenAPI conformance, CLI)"
RPA_BINARY="$ROOT/target/debug/runpod-autoscaler" "$ROOT/.venv/bin/python" -m pytest -q tests/python

log "checking the example configuration and the simulator CLI"
./target/debug/runpod-autoscaler check-config examples/static.toml
./target/debug/runpod-autoscaler check-config examples/local.toml
./target/debug/runpod-autoscaler simulate --trace benches/traces/single_spike.csv --policy all >/dev/null
