//! Load bench of `GetMetrics` over loopback: an open-loop load at a fixed rate from several
//! concurrent HTTP/2 clients against the real tonic server, then a closed-loop saturation run.
//! Prints p50/p90/p99/max latency and achieved requests/s.
//!
//! Tune with RPA_LOAD_RPS (default 2000), RPA_LOAD_SECS (default 10), RPA_LOAD_CLIENTS (default 8).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use runpod_autoscaler::decide::{Plan, PolicyKind};
use runpod_autoscaler::model::Timestamp;
use runpod_autoscaler::proto::external_scaler_client::ExternalScalerClient;
use runpod_autoscaler::proto::{GetMetricsRequest, ScaledObjectRef};
use runpod_autoscaler::scaler::{self, ScalerService};
use runpod_autoscaler::snapshot::{self, Snapshot};
use runpod_autoscaler::telemetry::Metrics;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn report(name: &str, mut lat: Vec<Duration>, errors: usize, elapsed: Duration) {
    lat.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{name}: {} ok, {errors} errors in {:.2}s = {:.0} req/s; latency p50 {:.0}µs p90 {:.0}µs p99 {:.0}µs max {:.0}µs",
        lat.len(),
        elapsed.as_secs_f64(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        us(percentile(&lat, 0.50)),
        us(percentile(&lat, 0.90)),
        us(percentile(&lat, 0.99)),
        us(*lat.last().unwrap_or(&Duration::ZERO)),
    );
}

fn request() -> GetMetricsRequest {
    GetMetricsRequest {
        scaled_object_ref: Some(ScaledObjectRef {
            name: "workers".into(),
            namespace: "media".into(),
            scaler_metadata: [("targetSize", "1"), ("activationThreshold", "0")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }),
        metric_name: "gpu-demand".into(),
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run briefly then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rps = env("RPA_LOAD_RPS", 2000);
    let secs = if quick { 1 } else { env("RPA_LOAD_SECS", 10) };
    let clients = env("RPA_LOAD_CLIENTS", 8).max(1) as usize;

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = snapshot::channel();
    tx.send_replace(Some(Arc::new(Snapshot {
        at: Timestamp::from_secs(1),
        plan: Plan {
            at: Timestamp::from_secs(1),
            policy: PolicyKind::Target,
            demand_gpus: 7,
            baseline_gpus: 2,
            served_gpus: 7,
            desired_gpus: 7,
            capacity_pods: 5,
            target_pods: 5,
            steps: vec![],
            holds: vec![],
        },
        signals: vec![],
        mode: "advisory",
    })));
    let shutdown = CancellationToken::new();
    let service = ScalerService::new(rx, shutdown.clone(), Arc::new(Metrics::new()));
    let server = tokio::spawn(scaler::serve(listener, service, None));

    let mut pool: Vec<ExternalScalerClient<Channel>> = Vec::with_capacity(clients);
    for _ in 0..clients {
        pool.push(
            ExternalScalerClient::connect(format!("http://{addr}"))
                .await
                .expect("connect"),
        );
    }
    // Warm-up.
    for c in &mut pool {
        for _ in 0..50 {
            c.get_metrics(request()).await.expect("warm-up");
        }
    }

    // Open loop: every millisecond, start rps/1000 requests spread round-robin over clients.
    let per_ms = (rps as f64 / 1000.0).max(0.001);
    let total = (rps * secs) as usize;
    let inflight = Arc::new(Semaphore::new(1024));
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::channel::<Option<Duration>>(total.max(1));
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0usize;
    let mut budget = 0.0f64;
    while sent < total {
        ticker.tick().await;
        budget += per_ms;
        while budget >= 1.0 && sent < total {
            budget -= 1.0;
            let mut client = pool[sent % clients].clone();
            let permit = Arc::clone(&inflight)
                .acquire_owned()
                .await
                .expect("semaphore");
            let lat_tx = lat_tx.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let ok = client.get_metrics(request()).await.is_ok();
                let _ = lat_tx.send(ok.then(|| t.elapsed())).await;
                drop(permit);
            });
            sent += 1;
        }
    }
    drop(lat_tx);
    let mut lat = Vec::with_capacity(total);
    let mut errors = 0;
    while let Some(r) = lat_rx.recv().await {
        match r {
            Some(d) => lat.push(d),
            None => errors += 1,
        }
    }
    report(
        &format!("open loop at {rps} req/s target, {clients} clients"),
        lat,
        errors,
        start.elapsed(),
    );

    // Closed loop: each client issues requests back to back for the same duration.
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in &pool {
        let mut client = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            while t0.elapsed() < Duration::from_secs(secs) {
                let t = Instant::now();
                match client.get_metrics(request()).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        lat.extend(l);
        errors += e;
    }
    report(
        &format!("closed loop, {clients} clients"),
        lat,
        errors,
        t0.elapsed(),
    );

    shutdown.cancel();
    let _ = server.await;
}
