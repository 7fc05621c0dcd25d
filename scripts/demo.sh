#!/usr/bin/env bash
# The main job, locally, end to end, against real components: a tansu broker (1000 jobs on 8
# partitions, the worker group committed 300 -> lag 700) and a Prometheus scraping a small
# latency exporter, all on free 127.0.0.1 ports. Starts the service on examples/local.toml,
# answers KEDA's calls (gpu-demand, and KEDA-parity kafka and prometheus triggers), shows the
# plan and metrics; then active mode against the RunPod emulator (pods bought, bootstrapped over
# SSH, worked, drained, terminated), checkpoint/resume through s3s-fs (a preempted pod's job and
# drained pods' jobs resume elsewhere), compares policies on the shipped traces, then stops
# everything by PID.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_rust
ensure_build_deps
ensure_tansu
ensure_prometheus
ensure_sshd
ensure_s3s

log "building"
cargo build --locked --quiet --bin runpod-autoscaler --example demo_seed --example gpu_worker
BIN="$ROOT/target/debug/runpod-autoscaler"
"$BIN" check-config examples/local.toml

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_until DESCRIPTION COMMAND...: poll (bounded, 30 s) until COMMAND succeeds.
wait_until() {
  local what="$1"; shift
  for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2; return 1
}

# start_serve NAME CONFIG [VAR=VALUE...]: `serve` with CONFIG and the extra environment on free
# ports, stdout through a fifo, stderr to $WORK/NAME.log; returns once it listens, with
# SERVE_PID, SERVE_GRPC and SERVE_HTTP set (the fifo stays open on a new descriptor).
start_serve() {
  local name="$1" config="$2" line fd
  shift 2
  mkfifo "$WORK/$name"
  env "$@" "$BIN" serve --config "$config" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
    >"$WORK/$name" 2>"$WORK/$name.log" &
  SERVE_PID=$!
  PIDS+=("$SERVE_PID")
  exec {fd}<"$WORK/$name"
  read -r -t 30 line <&"$fd" || { cat "$WORK/$name.log" >&2; exit 1; }
  SERVE_GRPC=$(printf '%s' "$line" | sed -E 's/.*"grpc":"([^"]+)".*/\1/')
  SERVE_HTTP=$(printf '%s' "$line" | sed -E 's/.*"http":"([^"]+)".*/\1/')
}

KAFKA_PORT=$(free_port)
log "starting tansu on 127.0.0.1:$KAFKA_PORT"
"$RPA_TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/ \
  >"$WORK/tansu.log" 2>&1 &
PIDS+=($!)
wait_until "tansu" bash -c "exec 3<>/dev/tcp/127.0.0.1/$KAFKA_PORT"
log "producing 1000 jobs on gpu-jobs (8 partitions); group gpu-workers commits 300"
./target/debug/examples/demo_seed "127.0.0.1:$KAFKA_PORT" gpu-jobs 8 1000 gpu-workers 300

EXPORTER_PORT=$(free_port)
log "starting the latency exporter on 127.0.0.1:$EXPORTER_PORT"
python3 scripts/demo_exporter.py "$EXPORTER_PORT" &
PIDS+=($!)
PROM_PORT=$(free_port)
cat >"$WORK/prometheus.yml" <<YAML
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: demo
    static_configs: [{targets: ['127.0.0.1:$EXPORTER_PORT']}]
YAML
log "starting Prometheus on 127.0.0.1:$PROM_PORT"
"$RPA_PROMETHEUS_BIN" --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
wait_until "Prometheus /-/ready" curl -fsS "http://127.0.0.1:$PROM_PORT/-/ready"
P95_QUERY='histogram_quantile(0.95, sum(rate(job_latency_seconds_bucket[1m])) by (le))'
has_p95() {
  curl -fsS --get "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$P95_QUERY" \
    | python3 -c 'import json,sys,math; r=json.load(sys.stdin)["data"]["result"]; sys.exit(0 if r and not math.isnan(float(r[0]["value"][1])) else 1)'
}
log "waiting for the first p95 (two scrapes)"
wait_until "a p95 in Prometheus" has_p95

log "starting the service (examples/local.toml: real Kafka lag, real Prometheus p95, baseline 2 GPUs)"
start_serve service examples/local.toml \
  RUNPOD_AUTOSCALER__SIGNALS__QUEUE__BOOTSTRAP_SERVERS="127.0.0.1:$KAFKA_PORT" \
  RUNPOD_AUTOSCALER__SIGNALS__LATENCY__SERVER_ADDRESS="http://127.0.0.1:$PROM_PORT"
SERVICE=$SERVE_PID GRPC=$SERVE_GRPC HTTP=$SERVE_HTTP
log "gRPC on $GRPC, HTTP on $HTTP"
wait_until "the first plan" curl -fsS "http://$HTTP/readyz"

log "KEDA calls, gpu-demand trigger (targetSize=1): 700 lag / 100 per GPU = 7 GPU workers"
"$BIN" scaler-probe --addr "http://$GRPC" -m targetSize=1

log "KEDA-parity kafka trigger (lagThreshold=100): lag 700 (the cap, 8 partitions x 100, is not reached)"
"$BIN" scaler-probe --addr "http://$GRPC" -m scaler=kafka -m "bootstrapServers=127.0.0.1:$KAFKA_PORT" \
  -m consumerGroup=gpu-workers -m topic=gpu-jobs -m lagThreshold=100

log "KEDA-parity kafka trigger (lagThreshold=10): capped at 8 partitions x 10 = 80"
"$BIN" scaler-probe --addr "http://$GRPC" -m scaler=kafka -m "bootstrapServers=127.0.0.1:$KAFKA_PORT" \
  -m consumerGroup=gpu-workers -m topic=gpu-jobs -m lagThreshold=10

log "KEDA-parity prometheus trigger (threshold=5, activationThreshold=10): p95 19.5 s"
"$BIN" scaler-probe --addr "http://$GRPC" -m scaler=prometheus -m "serverAddress=http://127.0.0.1:$PROM_PORT" \
  -m "query=$P95_QUERY" -m threshold=5 -m activationThreshold=10

log "KEDA calls with bad metadata (lagThreshold=many) -> INVALID_ARGUMENT"
"$BIN" scaler-probe --addr "http://$GRPC" -m scaler=kafka -m "bootstrapServers=127.0.0.1:$KAFKA_PORT" \
  -m consumerGroup=gpu-workers -m lagThreshold=many || true

log "the plan (/debug/plan)"
curl -fsS "http://$HTTP/debug/plan" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(d["text"], end="")
for s in d["signals"]:
    print("  signal %(signal)s: value %(value)s, fresh %(fresh)s, failures %(failures)s" % s)'

log "metrics (/metrics, excerpt)"
curl -fsS "http://$HTTP/metrics" | grep -E '^runpod_autoscaler_(desired_gpus|demand_gpus|baseline_gpus|signal_value|grpc_requests_total)' || true

log "stopping the service (SIGTERM): the tick finishes, streams end OK, exit 0"
kill -TERM "$SERVICE"
wait "$SERVICE"

log "RunPod side: the API emulator (v2 REST + GraphQL subset), read by the real client"
mkfifo "$WORK/emu"
"$BIN" emulator --listen 127.0.0.1:0 --api-key demo-key >"$WORK/emu" 2>"$WORK/emulator.log" &
PIDS+=($!)
exec 4<"$WORK/emu"
read -r -t 30 EMU_LINE <&4 || { cat "$WORK/emulator.log" >&2; exit 1; }
RUNPOD_API_URL=$(printf '%s' "$EMU_LINE" | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_url"])')
RUNPOD_GRAPHQL_URL=$(printf '%s' "$EMU_LINE" | python3 -c 'import json,sys; print(json.load(sys.stdin)["graphql_url"])')
export RUNPOD_API_URL RUNPOD_GRAPHQL_URL RUNPOD_API_KEY=demo-key
"$BIN" gpus
# Two pods created straight through the API: one carries our owner marker, one does not.
create_pod() {
  curl -fsS -X POST "$RUNPOD_API_URL/v2/pods" -H "Authorization: Bearer demo-key" \
    -H 'Content-Type: application/json' \
    -d "{\"name\":\"$1\",\"image\":\"gpu-worker:1\",\"gpu\":{\"id\":\"NVIDIA RTX A5000\",\"count\":1},\"ports\":[\"22/tcp\"],\"env\":{\"RPA_OWNER\":\"$2\"}}" >/dev/null
}
create_pod rpa-manual-0 runpod-autoscaler
create_pod someone-elses-pod other-team
log "pods list shows only the pods this autoscaler owns"
"$BIN" pods list
"$BIN" pods terminate --all-owned --yes
log "a rejected key fails fast with a clear message"
RUNPOD_API_KEY=not-the-key "$BIN" gpus || true

log "POD ACCESS: pooled exec, chunk-verified transfers and spend (agents get the same as MCP tools: runpod-autoscaler mcp)"
ssh-keygen -q -t ed25519 -N '' -C rpa-demo -f "$WORK/id_ed25519"
export XDG_STATE_HOME="$WORK/xdg-state"   # where trust-on-first-use pins the pods' host keys
POD=$(curl -fsS -X POST "$RUNPOD_API_URL/v2/pods" -H "Authorization: Bearer demo-key" \
  -H 'Content-Type: application/json' \
  -d "{\"name\":\"rpa-access-0\",\"image\":\"gpu-worker:1\",\"gpu\":{\"id\":\"NVIDIA RTX A5000\",\"count\":1},\"ports\":[\"22/tcp\"],\"env\":{\"RPA_OWNER\":\"runpod-autoscaler\",\"PUBLIC_KEY\":\"$(cat "$WORK/id_ed25519.pub")\"}}" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for _ in $(seq 60); do
  "$BIN" exec -i "$WORK/id_ed25519" "$POD" -- true 2>/dev/null && break
  sleep 0.5
done
"$BIN" exec -i "$WORK/id_ed25519" "$POD" -- nvidia-smi --query-gpu=name,utilization.gpu --format=csv
head -c 24000000 /dev/urandom >"$WORK/blob"
"$BIN" cp -i "$WORK/id_ed25519" "$WORK/blob" "$POD:blob" --output json
"$BIN" cp -i "$WORK/id_ed25519" "$POD:blob" "$WORK/blob.back" --output json
cmp "$WORK/blob" "$WORK/blob.back" && echo "  24 MB up and back down: identical"
status=0; "$BIN" exec -i "$WORK/id_ed25519" "$POD" -- 'echo on the pod; exit 3' || status=$?; echo "  exec exited with the remote status: $status"
"$BIN" cost
"$BIN" pods terminate --all-owned --yes

log "ACTIVE MODE: the autoscaler buys, bootstraps, health-checks, drains and terminates pods"
# A backlog on its own topic: 200 jobs on 4 partitions, nothing done yet by group burst-workers.
./target/debug/examples/demo_seed "127.0.0.1:$KAFKA_PORT" burst-jobs 4 200 burst-workers 0
start_serve active examples/emulator.toml \
  RUNPOD_AUTOSCALER__SIGNALS__QUEUE__BOOTSTRAP_SERVERS="127.0.0.1:$KAFKA_PORT" \
  RUNPOD_AUTOSCALER__SIGNALS__QUEUE__TOPICS='["burst-jobs"]' \
  RUNPOD_AUTOSCALER__SIGNALS__QUEUE__CONSUMER_GROUP=burst-workers \
  RUNPOD_AUTOSCALER__SIGNALS__LATENCY__SERVER_ADDRESS="http://127.0.0.1:$PROM_PORT" \
  RUNPOD_AUTOSCALER__RECONCILE__STATE_DIR="$WORK/state" \
  RUNPOD_AUTOSCALER__RECONCILE__SSH_KEY_FILE="$WORK/id_ed25519" \
  RUNPOD_AUTOSCALER__JOIN__WORKER_COMMAND="exec $ROOT/target/debug/examples/gpu_worker"
ACTIVE=$SERVE_PID AHTTP=$SERVE_HTTP
log "watching the fleet (/debug/plan) while the 200 jobs are worked off (each pod runs examples/gpu_worker)"
AHTTP="$AHTTP" RUNPOD_API_URL="$RUNPOD_API_URL" python3 - <<'PY'
import json, os, sys, time, urllib.request
http, api = os.environ["AHTTP"], os.environ["RUNPOD_API_URL"]
def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)
seen, bought, last_line, deadline = {}, set(), None, time.time() + 180
while time.time() < deadline:
    try:
        plan = get(f"http://{http}/debug/plan")
    except Exception:
        time.sleep(0.5)
        continue
    lag = next((s["value"] for s in plan["signals"] if s["signal"] == "queue_lag"), None)
    fleet = plan["fleet"]
    for e in fleet:
        pod = e["pod"] or "claim %s-%s" % (e["claim"]["slot"], e["claim"]["generation"])
        if e["pod"]:
            bought.add(e["pod"])
        join = (e.get("join") or {}).get("state", "-")
        retiring = (e.get("retiring") or {}).get("phase", {}).get("phase") if e.get("retiring") else None
        busy = (e.get("utilization") or 0) >= 10
        state = (e["state"], join, "ready" if e["ready"] else "", retiring or "", busy)
        if seen.get(pod) != state:
            seen[pod] = state
            util = e.get("utilization")
            print(f"  {time.strftime('%H:%M:%S')} {pod:<16} {e['state']:<12} join={join:<13} "
                  f"{'READY' if e['ready'] else '     '} util={util if util is not None else '-':<4} "
                  f"{'retiring: ' + retiring if retiring else ''}", flush=True)
    line = f"  {time.strftime('%H:%M:%S')} lag {lag}, pods {len(fleet)}, served {plan['plan']['served_gpus']} GPUs"
    if line.split(' ', 3)[-1] != (last_line or '').split(' ', 3)[-1]:
        print(line, flush=True)
        last_line = line
    if bought and not fleet and lag == 0:
        break
    time.sleep(1)
pods = get(f"{api}/admin/pods")["pods"]
ours = [p for p in pods if p["name"].startswith("rpa-demo-")]
alive = [p for p in ours if p["status"] != "TERMINATED"]
print(f"  emulator: {len(ours)} pods of ours created, {len(alive)} alive, "
      f"${sum(p['costAccrued'] for p in ours):.4f} spent")
sys.exit(0 if bought and not alive else 1)
PY
log "the active service's metrics (launches, terminations, joins, spend)"
curl -fsS "http://$AHTTP/metrics" | grep -E '^runpod_autoscaler_(launches_total|terminations_total|join_seconds_count|spend_usd_total|claims_open|pods\{)' || true
kill -TERM "$ACTIVE"
wait "$ACTIVE"

log "CHECKPOINTS: long jobs on a spot pod, checkpointed to S3 (s3s-fs); one pod preempted, the others drained"
S3_PORT=$(free_port)
mkdir -p "$WORK/s3/checkpoints"
"$RPA_S3S_BIN" --host 127.0.0.1 --port "$S3_PORT" --access-key demo-access \
  --secret-key demo-secret-0123456789 "$WORK/s3" >"$WORK/s3s.log" 2>&1 &
PIDS+=($!)
wait_until "s3s-fs" bash -c "exec 3<>/dev/tcp/127.0.0.1/$S3_PORT"
# Two jobs of 40 steps x 250 ms on one partition, one pod at a time that lives 12 s
# (examples/checkpoint.toml): every pod is preempted or drained mid-job.
./target/debug/examples/demo_seed "127.0.0.1:$KAFKA_PORT" long-jobs 1 2 long-workers 0
export RUNPOD_AUTOSCALER__CHECKPOINT__ENDPOINT="http://127.0.0.1:$S3_PORT" \
  RUNPOD_AUTOSCALER__CHECKPOINT__ACCESS_KEY_ID=demo-access \
  RUNPOD_AUTOSCALER__CHECKPOINT__SECRET_ACCESS_KEY=demo-secret-0123456789
start_serve ckpt examples/checkpoint.toml RUST_LOG=info \
  RUNPOD_AUTOSCALER__SIGNALS__QUEUE__BOOTSTRAP_SERVERS="127.0.0.1:$KAFKA_PORT" \
  RUNPOD_AUTOSCALER__RECONCILE__STATE_DIR="$WORK/state-ckpt" \
  RUNPOD_AUTOSCALER__RECONCILE__SSH_KEY_FILE="$WORK/id_ed25519" \
  RUNPOD_AUTOSCALER__JOIN__WORKER_COMMAND="RPA_AGENT=$BIN exec $ROOT/target/debug/examples/gpu_worker"
CKPT=$SERVE_PID CHTTP=$SERVE_HTTP
log "following the workers' logs on the pods and the service's drain decisions"
CHTTP="$CHTTP" SERVE_LOG="$WORK/ckpt.log" RUNPOD_API_URL="$RUNPOD_API_URL" python3 - <<'PY'
import json, os, re, sys, time, urllib.request
http, api, serve_log = os.environ["CHTTP"], os.environ["RUNPOD_API_URL"], os.environ["SERVE_LOG"]
def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)
def post(url):
    req = urllib.request.Request(url, method="POST", headers={"Authorization": "Bearer demo-key"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status
INTERESTING = re.compile(r"assigned partitions|resumed from|checkpointed at step|job topic=|stop requested|agent:|failed|cannot")
SERVE = re.compile(r"launched|joined|drained; waiting|every job checkpointed|drain deadline|pod gone")
seen_lines, serve_pos, preempted, finished = {}, 0, None, set()
deadline = time.time() + 240
def show(who, text):
    print(f"  {time.strftime('%H:%M:%S')} {who:<15} {text}", flush=True)
while time.time() < deadline:
    pods = [p for p in get(f"{api}/admin/pods")["pods"] if p["name"].startswith("rpa-ckpt-")]
    for p in pods:
        if not p.get("podDir"):
            continue
        try:
            lines = open(os.path.join(p["podDir"], ".runpod-autoscaler/worker.log")).read().splitlines()
        except OSError:
            continue
        for line in lines[seen_lines.get(p["id"], 0):]:
            if INTERESTING.search(line):
                text = re.sub(r"^\S+ gpu_worker(\[\d+\])?:? ?(pod=\S+ )?", "", line)
                show(p["id"], text)
            m = re.search(r"job topic=long-jobs partition=0 offset=(\d+)", line)
            if m:
                finished.add(m.group(1))
            # Preempt the first pod that has checkpointed its job twice (step 8).
            if preempted is None and "checkpointed at step 8" in line and "on drain" not in line:
                preempted = p["id"]
                post(f"{api}/admin/pods/{p['id']}/preempt")
                show(p["id"], "PREEMPTED (spot capacity reclaimed) by the demo")
        seen_lines[p["id"]] = len(lines)
    with open(serve_log, errors="replace") as f:
        f.seek(serve_pos)
        chunk = f.read()
        serve_pos = f.tell()
    for line in chunk.splitlines():
        if SERVE.search(line):
            msg = re.sub(r"^\S+\s+INFO\s+(tick: )?\S+: ", "", line)
            show("autoscaler", msg)
    if len(finished) == 2 and not [p for p in pods if p["status"] != "TERMINATED"]:
        break
    time.sleep(0.3)
pods = [p for p in get(f"{api}/admin/pods")["pods"] if p["name"].startswith("rpa-ckpt-")]
alive = [p for p in pods if p["status"] != "TERMINATED"]
print(f"  both jobs done: {len(finished) == 2}; emulator: {len(pods)} pods created, "
      f"{len(alive)} alive, ${sum(p['costAccrued'] for p in pods):.4f} spent")
sys.exit(0 if len(finished) == 2 and not alive and preempted else 1)
PY
log "the checkpoints in the store (written by several pods: each resume continued another pod's work)"
"$BIN" checkpoint ls --config examples/checkpoint.toml
"$BIN" checkpoint show long-jobs-0-1 --verify --config examples/checkpoint.toml
curl -fsS "http://$CHTTP/metrics" | grep -E '^runpod_autoscaler_(checkpoint_missed_total|terminations_total)' || true
kill -TERM "$CKPT"
wait "$CKPT"

log "policies side by side on the shipped traces"
"$BIN" simulate --policy all \
  --trace benches/traces/steady_diurnal.csv \
  --trace benches/traces/bursty.csv \
  --trace benches/traces/single_spike.csv
