//! Reconciler benchmarks (real time, loopback; the emulator as a separate process so the
//! reconciler's own memory is what RSS shows):
//!
//! 1. **Lag spike → first create request**: the service in active mode (1 s signal poll, 5 s
//!    tick) sees the queue lag jump from 0; time until the emulator receives the first create.
//! 2. **RUNNING → joined**: pods with a real sshd; time from the first listing that shows a pod
//!    RUNNING with SSH to the tick that reads it joined (bootstrap once + GPU check over SSH).
//! 3. **A tick with 1,000 pods** (sshd off): wall and CPU time of a steady-state tick (list
//!    1,000 pods, resolve 1,000 claims, plan) and the process's RSS.
//!
//! `cargo bench --bench reconcile`; `RPA_BENCH_PODS` (1000) and `RPA_BENCH_SPIKES` (10) size it.
//! `cargo test --benches` runs a small smoke version.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use runpod_autoscaler::clock::{Clock, SystemClock};
use runpod_autoscaler::decide::offers::OfferSpec;
use runpod_autoscaler::decide::{PodTemplate, Policy, PolicyKind, Sample, Series, Signals};
use runpod_autoscaler::emulator::sshd;
use runpod_autoscaler::join::pod::{JoinPlan, SshShell, HEALTH_QUERY};
use runpod_autoscaler::join::SshKey;
use runpod_autoscaler::model::{Cloud, GpuTypeId, Reading, Secret, SignalKind, Usd};
use runpod_autoscaler::provider::runpod::{RunPodClient, RunPodSettings};
use runpod_autoscaler::reconcile::claims::{ClaimTiming, RedbClaims};
use runpod_autoscaler::reconcile::{Context, ReconcileSettings, Reconciler};
use runpod_autoscaler::service::{self, ServiceParts};
use runpod_autoscaler::signals::{SignalError, SignalSource, StaticSource};
use runpod_autoscaler::telemetry::Metrics;

const KEY: &str = "rpa_bench_key";
const A5000: &str = "NVIDIA RTX A5000";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[path = "../tests/support/emulator_process.rs"]
mod emulator_process;
use emulator_process::EmulatorProcess;

/// Starts the emulator binary on a free port with `config` (TOML).
fn start_emulator(config: &str) -> EmulatorProcess {
    EmulatorProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_runpod-autoscaler")),
        KEY,
        config,
    )
}

impl EmulatorProcess {
    fn client(&self) -> RunPodClient {
        RunPodClient::new(RunPodSettings::new(
            &self.api_url,
            &self.graphql_url,
            Secret::new(KEY),
        ))
        .unwrap()
    }

    /// Creation times of every pod the emulator made (from its admin record).
    async fn created(&self) -> Vec<u64> {
        let body = reqwest_free_get(&format!("{}/admin/pods", self.api_url)).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["pods"]
            .as_array()
            .map(|pods| {
                pods.iter()
                    .filter_map(|p| p["createdAt"].as_u64())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A plain HTTP/1.1 GET over loopback (the admin API; no client crate needed).
async fn reqwest_free_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn policy(max_pods: u32) -> Policy {
    Policy {
        kind: PolicyKind::Target,
        min_pods: 0,
        max_pods,
        max_usd_per_hour: Usd(f64::from(max_pods)),
        max_launches_per_tick: max_pods,
        pod: PodTemplate {
            gpu_type: GpuTypeId::from(A5000),
            gpus: 1,
            usd_per_hour: Usd(0.26),
        },
        lag_per_gpu: 100.0,
        slo_p95_seconds: 30.0,
        latency_step_gpus: 1,
        scale_down_stabilization: Duration::from_secs(300),
        idle_timeout: Duration::from_secs(300),
        warmup_grace: Duration::from_secs(60),
        boot_deadline: Duration::from_secs(600),
        stale_after_intervals: 3,
    }
}

fn settings(public_key: String) -> ReconcileSettings {
    ReconcileSettings {
        baseline_gpus: 0,
        cluster: "b".into(),
        name_prefix: "rpa-".into(),
        image: "runpod/base:0.6.2".into(),
        disk_gb: 20,
        env: BTreeMap::new(),
        public_key,
        offers: vec![OfferSpec {
            gpu_type: GpuTypeId::from(A5000),
            gpus_per_pod: 1,
            cloud: Cloud::Secure,
            data_centers: vec![],
            max_bid_per_gpu: None,
            throughput: 1.0,
        }],
        timing: ClaimTiming {
            resolve_timeout: Duration::from_secs(60),
            vanish_window: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(180),
        },
        unavailable_ttl: Duration::from_secs(180),
        quotes_refresh: Duration::from_secs(300),
        join: JoinPlan::Worker {
            command: "true".into(),
            env: BTreeMap::new(),
        },
        health_command: HEALTH_QUERY.into(),
        idle_command: None,
        drain_command: None,
        ssh_timeout: Duration::from_secs(10),
        provider_timeout: Duration::from_secs(30),
        health_interval: Duration::from_secs(15),
        unhealthy_after: Duration::from_secs(45),
        busy_utilization: 10.0,
        drain_timeout: Duration::from_secs(60),
        max_pod_lifetime: None,
    }
}

struct Keys {
    _dir: tempfile::TempDir,
    key: SshKey,
    public: String,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("id_ed25519");
    let public = sshd::generate_key(&path, "rpa-bench").expect("ssh-keygen");
    Keys {
        key: SshKey::load(&path).unwrap(),
        public,
        _dir: dir,
    }
}

fn context(
    emu: &EmulatorProcess,
    keys: &Keys,
    state: &std::path::Path,
    metrics: Arc<Metrics>,
) -> Arc<Context> {
    Arc::new(Context {
        provider: Arc::new(emu.client()),
        shell: Arc::new(SshShell::trust_on_first_use(keys.key.clone())),
        claims: Arc::new(RedbClaims::open(state).unwrap()),
        clock: Arc::new(SystemClock),
        metrics,
        checkpoints: None,
        settings: settings(keys.public.clone()),
    })
}

/// A queue-lag source the bench sets.
struct Lag(AtomicU64);

#[async_trait]
impl SignalSource for Lag {
    fn kind(&self) -> SignalKind {
        SignalKind::QueueLag
    }
    fn poll_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }
    async fn sample(&self) -> Result<Reading, SignalError> {
        Ok(Reading::of(self.0.load(Ordering::SeqCst) as f64))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// 1. Lag spike → first create request, through the assembled service.
async fn spike_to_create(spikes: usize) {
    let keys = keys();
    let mut samples = Vec::new();
    for _ in 0..spikes {
        let emu = start_emulator("sshd = false\nboot_delay = \"1s\"\n");
        let state = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let reconciler =
            Reconciler::new(context(&emu, &keys, state.path(), metrics.clone())).unwrap();
        let lag = Arc::new(Lag(AtomicU64::new(0)));
        let shutdown = CancellationToken::new();
        let running = service::start(
            ServiceParts {
                grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
                http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
                tls: None,
                sources: vec![
                    lag.clone(),
                    Arc::new(StaticSource::new(SignalKind::LatencyP95, 1.0)),
                ],
                poll_interval: Duration::from_secs(1),
                tick_interval: Duration::from_secs(5),
                baseline_gpus: 0,
                policy: policy(4),
                clock: Arc::new(SystemClock),
                metrics,
                reconciler: Some(reconciler),
            },
            shutdown.clone(),
        )
        .unwrap();
        // Let it settle on zero demand, then the spike.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let spiked_at = SystemClock.now();
        lag.0.store(400, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = loop {
            if let Some(t) = emu.created().await.into_iter().min() {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "no create within 30 s of the spike"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        samples.push(Duration::from_millis(
            first.saturating_sub(spiked_at.as_millis()),
        ));
        shutdown.cancel();
        let _ = running.wait().await;
    }
    samples.sort_unstable();
    println!(
        "lag spike -> first create request: n={} p50 {:?} max {:?} (1 s signal poll, 5 s tick)",
        samples.len(),
        percentile(&samples, 0.5),
        samples.last().unwrap()
    );
}

fn signals(lag: f64) -> Signals {
    let mut queue = Series::new(Duration::from_secs(1), Duration::from_secs(600));
    queue.push(Sample::at(lag, SystemClock.now()));
    Signals {
        queue,
        latency: None,
    }
}

/// 2. RUNNING → joined, on real sshd pods.
async fn running_to_joined(pods: u32) {
    let keys = keys();
    let emu = start_emulator("boot_delay = \"0s\"\n");
    let state = tempfile::tempdir().unwrap();
    let mut r =
        Reconciler::new(context(&emu, &keys, state.path(), Arc::new(Metrics::new()))).unwrap();
    let p = policy(pods);
    let mut running_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut joined = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while joined.len() < pods as usize {
        assert!(Instant::now() < deadline, "pods not joined within 60 s");
        let report = r.tick(&signals(f64::from(pods) * 100.0), &p).await;
        for e in &report.fleet {
            let Some(pod) = &e.pod else { continue };
            if e.state == "RUNNING" {
                running_at
                    .entry(pod.to_string())
                    .or_insert_with(Instant::now);
            }
            if e.ready && !joined.iter().any(|(id, _)| id == pod.as_str()) {
                if let Some(t) = running_at.get(pod.as_str()) {
                    joined.push((pod.to_string(), t.elapsed()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut d: Vec<Duration> = joined.into_iter().map(|(_, d)| d).collect();
    d.sort_unstable();
    println!(
        "RUNNING -> joined (bootstrap + GPU check over SSH): n={} p50 {:?} max {:?}",
        d.len(),
        percentile(&d, 0.5),
        d.last().unwrap()
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 (1-based); after ')' they are 12 and 13 (1-based).
    let ticks: u64 = fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
    // The kernel's USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// 3. Steady-state ticks with `pods` pods and claims.
async fn big_fleet(pods: u32) {
    let keys = keys();
    let emu = start_emulator(&format!(
        "sshd = false\nboot_delay = \"0s\"\n[[gpus]]\nid = \"{A5000}\"\nname = \"RTX A5000\"\nmemory_gb = 24\nsecure_price = 0.26\ncommunity_price = 0.16\nstock = {}\n",
        pods + 10
    ));
    let state = tempfile::tempdir().unwrap();
    let mut r =
        Reconciler::new(context(&emu, &keys, state.path(), Arc::new(Metrics::new()))).unwrap();
    let p = policy(pods);
    let rss_before = rss_kib();
    let fill = Instant::now();
    while r.claims().filter(|c| c.pod.is_some()).count() < pods as usize {
        r.tick(&signals(f64::from(pods) * 100.0), &p).await;
        r.settle().await;
    }
    let filled_in = fill.elapsed();
    // Steady state: every pod exists; ticks list, resolve, view and plan (no launches).
    let ticks = 20;
    let (cpu0, t0) = (cpu_time(), Instant::now());
    let mut walls = Vec::new();
    for _ in 0..ticks {
        let t = Instant::now();
        let report = r.tick(&signals(f64::from(pods) * 100.0), &p).await;
        walls.push(t.elapsed());
        assert_eq!(report.plan.launches(), 0);
        r.settle().await;
    }
    let cpu = cpu_time().saturating_sub(cpu0);
    walls.sort_unstable();
    println!(
        "{pods} pods: filled in {filled_in:.1?}; steady tick wall p50 {:?} max {:?}, CPU {:?}/tick \
         ({ticks} ticks in {:.1?}); RSS {} MiB (was {} MiB before the fleet)",
        percentile(&walls, 0.5),
        walls.last().unwrap(),
        cpu / ticks,
        t0.elapsed(),
        rss_kib() / 1024,
        rss_before / 1024,
    );
}

#[tokio::main]
async fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let pods = if quick {
        20
    } else {
        env("RPA_BENCH_PODS", 1000) as u32
    };
    let spikes = if quick {
        1
    } else {
        env("RPA_BENCH_SPIKES", 10) as usize
    };
    spike_to_create(spikes).await;
    running_to_joined(if quick { 2 } else { 8 }).await;
    big_fleet(pods).await;
}
