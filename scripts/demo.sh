#!/usr/bin/env bash
# The main job, locally, end to end: build, start the service on examples/static.toml on free
# 127.0.0.1 ports, answer KEDA's calls (GetMetricSpec, GetMetrics, IsActive) like KEDA would,
# show the plan and metrics, compare policies on the shipped traces, then stop gracefully.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_rust

log "building"
cargo build --locked --quiet
BIN="$ROOT/target/debug/runpod-autoscaler"
"$BIN" check-config examples/static.toml

WORK="$(mktemp -d)"
PID=""
cleanup() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

log "starting the service (examples/static.toml: queue lag 700, p95 12.5s, baseline 2 GPUs)"
mkfifo "$WORK/out"
"$BIN" serve --config examples/static.toml --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
  >"$WORK/out" 2>"$WORK/service.log" &
PID=$!
exec 3<"$WORK/out"
read -r -t 30 LISTENING <&3 || { cat "$WORK/service.log" >&2; exit 1; }
GRPC=$(printf '%s' "$LISTENING" | sed -E 's/.*"grpc":"([^"]+)".*/\1/')
HTTP=$(printf '%s' "$LISTENING" | sed -E 's/.*"http":"([^"]+)".*/\1/')
log "gRPC on $GRPC, HTTP on $HTTP"

# Wait (bounded) for the first tick to publish a plan.
for _ in $(seq 1 100); do
  curl -fsS "http://$HTTP/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

log "KEDA calls (trigger metadata targetSize=1)"
"$BIN" scaler-probe --addr "http://$GRPC" -m targetSize=1

log "KEDA calls with bad metadata (targetSize=many) -> INVALID_ARGUMENT"
"$BIN" scaler-probe --addr "http://$GRPC" -m targetSize=many || true

log "the plan (/debug/plan)"
curl -fsS "http://$HTTP/debug/plan" | python3 -c 'import json,sys; print(json.load(sys.stdin)["text"], end="")'

log "metrics (/metrics, excerpt)"
curl -fsS "http://$HTTP/metrics" | grep -E '^runpod_autoscaler_(desired_gpus|demand_gpus|baseline_gpus|ticks_total|grpc_requests_total)' || true

log "stopping (SIGTERM): the tick finishes, streams end OK, exit 0"
kill -TERM "$PID"
wait "$PID"
PID=""

log "policies side by side on the shipped traces"
"$BIN" simulate --policy all \
  --trace benches/traces/steady_diurnal.csv \
  --trace benches/traces/bursty.csv \
  --trace benches/traces/single_spike.csv
