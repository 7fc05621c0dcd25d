//! Create/list round-trip latency through the real RunPod client and the emulator over
//! loopback HTTP, at 100 and 1,000 pods (sshd off: this measures the API path, not process
//! spawning). Prints p50/p99 create latency and the wall time of one `list()` at each size.
//!
//! Run: `cargo bench --bench provider_latency` (set `RPA_BENCH_SIZES=100,1000` to choose sizes).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runpod_autoscaler::clock::SystemClock;
use runpod_autoscaler::emulator::{EmulatorConfig, RunningEmulator};
use runpod_autoscaler::model::GpuTypeId;
use runpod_autoscaler::model::Secret;
use runpod_autoscaler::provider::runpod::{RunPodClient, RunPodSettings};
use runpod_autoscaler::provider::{Cloud, CloudProvider, LaunchSpec};

/// Repetitions of `list()` per size; the median is reported (5 smooths scheduler noise on a
/// 2-core machine without making the 1,000-pod run long).
const LIST_REPS: usize = 5;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn run(n: usize) {
    let mut cfg = EmulatorConfig {
        api_keys: vec![Secret::new("bench")],
        boot_delay: Duration::ZERO,
        sshd: false,
        ..EmulatorConfig::default()
    };
    for g in &mut cfg.gpus {
        g.stock = 100_000;
    }
    let emu = RunningEmulator::start_local(cfg, Arc::new(SystemClock))
        .await
        .expect("emulator");
    let client = RunPodClient::new(RunPodSettings::new(
        emu.api_url(),
        emu.graphql_url(),
        Secret::new("bench"),
    ))
    .expect("client");
    let mut creates = Vec::with_capacity(n);
    for i in 0..n {
        let spec = LaunchSpec {
            name: format!("bench-{i}"),
            gpu_type: GpuTypeId("NVIDIA RTX A5000".into()),
            gpu_count: 1,
            cloud: Cloud::Secure,
            image: "runpod/base:0.6.2".into(),
            env: BTreeMap::new(),
            spot_bid_per_gpu: None,
            data_center_ids: vec![],
            disk_gb: 20,
        };
        let t = Instant::now();
        client.launch(&spec).await.expect("create");
        creates.push(t.elapsed());
    }
    creates.sort();
    let mut lists = Vec::with_capacity(LIST_REPS);
    for _ in 0..LIST_REPS {
        let t = Instant::now();
        let pods = client.list().await.expect("list");
        lists.push(t.elapsed());
        assert_eq!(pods.len(), n);
    }
    lists.sort();
    println!(
        "pods={n:>5}  create p50={:>7.2} ms  p99={:>7.2} ms  max={:>7.2} ms  list(all {n})={:>8.2} ms (median of {LIST_REPS})",
        ms(percentile(&creates, 0.5)),
        ms(percentile(&creates, 0.99)),
        ms(*creates.last().unwrap()),
        ms(percentile(&lists, 0.5)),
    );
    emu.shutdown().await;
}

fn main() {
    // `cargo test --benches` runs benches with `--bench` absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("RPA_BENCH_SIZES")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for n in sizes {
        rt.block_on(run(n));
    }
}
