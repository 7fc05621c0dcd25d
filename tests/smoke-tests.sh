#!/usr/bin/env bash
# Smoke tests for a running runpod-autoscaler:
#
#   tests/smoke-tests.sh [GRPC_ADDR [HTTP_ADDR]]     (defaults 127.0.0.1:9090 127.0.0.1:8080)
#
# Checks the gRPC side as KEDA uses it (grpc.health.v1 Check, IsActive, StreamIsActive (first
# message), GetMetricSpec, GetMetrics for gpu-demand) and the HTTP side (/healthz, /readyz,
# /metrics with the core series, /debug/plan as JSON with a plan). Prints one line per check,
# `ok   NAME: detail` or `FAIL NAME: why`, and exits 1 when any check failed (2 on bad usage).
#
# TLS (service.tls): set SMOKE_CA_FILE to the CA that signed the server certificate; for mutual
# TLS also SMOKE_CERT_FILE and SMOKE_KEY_FILE (the client's). SMOKE_TLS_SERVER_NAME overrides
# the name checked in the server certificate (default: the host of GRPC_ADDR).
# SMOKE_TIMEOUT (seconds, default 10) bounds the wait for the first tick and each call.
#
# Needs the project venv (scripts/test.sh creates .venv with grpcio and grpcio-tools) or
# RPA_PYTHON pointing at a Python that has them, and curl.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GRPC_ADDR="${1:-127.0.0.1:9090}"
HTTP_ADDR="${2:-127.0.0.1:8080}"
TIMEOUT="${SMOKE_TIMEOUT:-10}"
PYTHON="${RPA_PYTHON:-$ROOT/.venv/bin/python}"
if [ $# -gt 2 ]; then
  echo "usage: $0 [GRPC_ADDR [HTTP_ADDR]]" >&2
  exit 2
fi

failed=0
pass() { echo "ok   $1: $2"; }
fail() { echo "FAIL $1: $2"; failed=1; }

# ---- gRPC (KEDA's side), through a client generated from proto/ at run time ----------------
if [ ! -x "$PYTHON" ]; then
  fail "grpc" "no Python at $PYTHON (run scripts/test.sh to create .venv, or set RPA_PYTHON)"
else
  grpc_out="$("$PYTHON" - "$ROOT/proto/externalscaler.proto" "$GRPC_ADDR" "$TIMEOUT" <<'PY'
import os, sys, tempfile, time

proto, addr, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
try:
    import grpc
    from grpc_tools import protoc
except ImportError as e:
    print(f"FAIL grpc: {e} (pip install grpcio grpcio-tools)")
    sys.exit(0)

HEALTH = """syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
"""
out = tempfile.mkdtemp(prefix="rpa-smoke-")
with open(os.path.join(out, "health.proto"), "w") as f:
    f.write(HEALTH)
for include, source in [(os.path.dirname(proto), proto), (out, os.path.join(out, "health.proto"))]:
    if protoc.main(["protoc", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", source]) != 0:
        print(f"FAIL grpc: protoc could not compile {source}")
        sys.exit(0)
sys.path.insert(0, out)
import externalscaler_pb2 as pb2, externalscaler_pb2_grpc as pb2_grpc
import health_pb2, health_pb2_grpc

def read(name):
    path = os.environ.get(name)
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()

ca = read("SMOKE_CA_FILE")
if ca is not None:
    creds = grpc.ssl_channel_credentials(ca, read("SMOKE_KEY_FILE"), read("SMOKE_CERT_FILE"))
    options = []
    if os.environ.get("SMOKE_TLS_SERVER_NAME"):
        options.append(("grpc.ssl_target_name_override", os.environ["SMOKE_TLS_SERVER_NAME"]))
    channel = grpc.secure_channel(addr, creds, options)
    mode = "TLS"
else:
    channel = grpc.insecure_channel(addr)
    mode = "plaintext"

def why(e):
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"

try:
    grpc.channel_ready_future(channel).result(timeout=timeout)
except grpc.FutureTimeoutError:
    # Every call would fail the same way: say so once per check, with the transport's reason.
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        reason = "not connected"
    except Exception as e:
        reason = why(e)
    for name in ["grpc health", "IsActive", "StreamIsActive", "GetMetricSpec", "GetMetrics gpu-demand"]:
        print(f"FAIL {name}: cannot connect to {addr} ({mode}) within {timeout:g}s: {reason}")
    sys.exit(0)

stub = pb2_grpc.ExternalScalerStub(channel)
ref = pb2.ScaledObjectRef(name="smoke-test", namespace="smoke-test", scalerMetadata={"metricName": "gpu-demand"})
deadline = time.monotonic() + timeout

def call(f):
    """f() retried while the service answers UNAVAILABLE (no tick published yet)."""
    while True:
        try:
            return f()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)

def check(name, f):
    try:
        print(f"ok   {name}: {f()}")
    except Exception as e:
        print(f"FAIL {name}: {why(e)}")

def health():
    health = health_pb2_grpc.HealthStub(channel)
    states = {}
    for service in ["", "externalscaler.ExternalScaler"]:
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        states[service or "(server)"] = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    if any(s != "SERVING" for s in states.values()):
        raise RuntimeError(f"not serving: {states}")
    return f"SERVING ({mode})"

def is_active():
    return f"result={call(lambda: stub.IsActive(ref, timeout=timeout)).result}"

def stream_is_active():
    stream = stub.StreamIsActive(ref, timeout=timeout)
    try:
        first = next(stream)
    finally:
        stream.cancel()
    return f"first message result={first.result}"

def metric_spec():
    specs = call(lambda: stub.GetMetricSpec(ref, timeout=timeout)).metricSpecs
    if not any(s.metricName == "gpu-demand" for s in specs):
        raise RuntimeError(f"no gpu-demand spec in {[s.metricName for s in specs]}")
    return ", ".join(f"{s.metricName} target {s.targetSizeFloat:g}" for s in specs)

def metrics():
    req = pb2.GetMetricsRequest(scaledObjectRef=ref, metricName="gpu-demand")
    values = call(lambda: stub.GetMetrics(req, timeout=timeout)).metricValues
    if not values:
        raise RuntimeError("no metric values")
    return ", ".join(f"{v.metricName}={v.metricValueFloat:g}" for v in values)

check("grpc health", health)
check("IsActive", is_active)
check("StreamIsActive", stream_is_active)
check("GetMetricSpec", metric_spec)
check("GetMetrics gpu-demand", metrics)
PY
)"
  [ -n "$grpc_out" ] && echo "$grpc_out"
  if [ -z "$grpc_out" ] || grep -q '^FAIL' <<<"$grpc_out"; then
    [ -z "$grpc_out" ] && fail "grpc" "the gRPC checker printed nothing"
    failed=1
  fi
fi

# ---- HTTP ------------------------------------------------------------------------------------
# get PATH: the body in $body, the status (or curl's error) in $status.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
get() {
  body=""
  if status="$(curl -sS --max-time "$TIMEOUT" -o "$tmp/body" -w '%{http_code}' "http://$HTTP_ADDR$1" 2>"$tmp/err")"; then
    body="$(cat "$tmp/body")"
  else
    status="unreachable: $(head -n1 "$tmp/err" | sed 's/^curl: //')"
  fi
}

# /readyz is 503 until the first tick: wait for it within the timeout.
get /healthz
if [ "$status" = 200 ]; then pass "/healthz" "200"; else fail "/healthz" "$status"; fi

end=$((SECONDS + ${TIMEOUT%.*}))
while :; do
  get /readyz
  [ "$status" = 200 ] || [ "$SECONDS" -ge "$end" ] || [[ "$status" == unreachable* ]] && break
  sleep 0.3
done
if [ "$status" = 200 ]; then pass "/readyz" "200"; else fail "/readyz" "$status${body:+ ${body:0:200}}"; fi

get /metrics
if [ "$status" != 200 ]; then
  fail "/metrics" "$status"
else
  missing=()
  for series in runpod_autoscaler_served_gpus runpod_autoscaler_demand_gpus runpod_autoscaler_desired_gpus \
    runpod_autoscaler_baseline_gpus runpod_autoscaler_ticks_total runpod_autoscaler_signal_value \
    runpod_autoscaler_grpc_requests_total; do
    grep -qE "^${series}(\{| )" <<<"$body" || missing+=("$series")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    pass "/metrics" "core series present ($(grep -cv '^#' <<<"$body") samples)"
  else
    fail "/metrics" "missing ${missing[*]}"
  fi
fi

get /debug/plan
if [ "$status" != 200 ]; then
  fail "/debug/plan" "$status"
elif plan="$("$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)
p = d["plan"]
print("mode %s, served %s, desired %s, %d step(s)" % (d.get("mode"), p["served_gpus"], p["desired_gpus"], len(p["steps"])))
' <<<"$body" 2>&1)"; then
  pass "/debug/plan" "$plan"
else
  fail "/debug/plan" "not JSON with a plan: ${plan##*$'\n'}"
fi

if [ "$failed" -ne 0 ]; then
  echo "smoke tests FAILED against grpc $GRPC_ADDR, http $HTTP_ADDR"
  exit 1
fi
echo "smoke tests passed against grpc $GRPC_ADDR, http $HTTP_ADDR"
