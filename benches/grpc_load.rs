//! Load bench of `GetMetrics` over loopback, side by side in one run: our scaler (the real
//! `scaler::serve` on a listener bound by the caller, as in `main`) and a bare tonic 0.14
//! `ExternalScaler` that answers a constant from a server tonic binds itself (its defaults).
//!
//! Two loads per server, servers alternating so neither gets a warmer machine:
//! * closed loop, like `h2load -n N -c C -m M`: C HTTP/2 connections, M requests in flight on
//!   each, N requests in all;
//! * open loop: a fixed request rate spread over the C connections for a few seconds.
//!
//! Reports p50, p99, p99.9, max, requests above 10 ms and requests/s for each. The load comes
//! from tonic clients in this process and, when `h2load` (Debian's nghttp2-client) is
//! installed, also from h2load in its own process (its per-request log gives the latencies).
//! Tune with RPA_LOAD_REQUESTS (40000), RPA_LOAD_CONNECTIONS (8), RPA_LOAD_STREAMS (8),
//! RPA_LOAD_RPS (2000), RPA_LOAD_SECS (10). `cargo test --benches` runs a short smoke version.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

use runpod_autoscaler::decide::{Plan, PolicyKind};
use runpod_autoscaler::model::Timestamp;
use runpod_autoscaler::proto::external_scaler_client::ExternalScalerClient;
use runpod_autoscaler::proto::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use runpod_autoscaler::proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use runpod_autoscaler::scaler::{self, ScalerService};
use runpod_autoscaler::snapshot::{self, Snapshot};
use runpod_autoscaler::telemetry::Metrics;

/// A request slower than this is a stall (loopback answers take ~1 ms under this load).
const STALL: Duration = Duration::from_millis(10);

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

fn report(server: &str, load: &str, mut lat: Vec<Duration>, errors: usize, elapsed: Duration) {
    lat.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let stalls = lat.iter().filter(|d| **d > STALL).count();
    println!(
        "{server:<18} {load:<34} n={:<6} err={errors:<3} {:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  >10ms {stalls}",
        lat.len(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        ms(percentile(&lat, 0.999)),
        ms(*lat.last().unwrap_or(&Duration::ZERO)),
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

/// The peer: tonic's generated service answering constants, nothing else.
struct Bare;

#[tonic::async_trait]
impl ExternalScaler for Bare {
    async fn is_active(
        &self,
        _: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        Ok(Response::new(IsActiveResponse { result: true }))
    }

    type StreamIsActiveStream = tokio_stream::Empty<Result<IsActiveResponse, Status>>;

    async fn stream_is_active(
        &self,
        _: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        Ok(Response::new(tokio_stream::empty()))
    }

    async fn get_metric_spec(
        &self,
        _: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: "gpu-demand".into(),
                target_size: 1,
                target_size_float: 1.0,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        _: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: "gpu-demand".into(),
                metric_value: 7,
                metric_value_float: 7.0,
            }],
        }))
    }
}

/// Our scaler on a listener bound here, serving a fixed snapshot.
async fn start_ours(shutdown: CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = snapshot::channel();
    tx.send_replace(Some(Arc::new(Snapshot {
        at: Timestamp::from_secs(1),
        plan: Plan {
            at: Timestamp::from_secs(1),
            policy: PolicyKind::Target,
            demand_gpus: 7,
            served_gpus: 7,
            baseline_gpus: 2,
            desired_gpus: 7,
            capacity_pods: 5,
            target_pods: 5,
            steps: vec![],
            holds: vec![],
        },
        signals: vec![],
        mode: "advisory",
        fleet: vec![],
        errors: vec![],
    })));
    let service = ScalerService::new(rx, shutdown.clone(), Arc::new(Metrics::new()));
    tokio::spawn(async move {
        // Keep the sender alive as long as the server.
        let _tx = tx;
        scaler::serve(listener, service, None).await
    });
    addr
}

/// The bare tonic server on a free port it binds itself (tonic's default socket options).
async fn start_bare(shutdown: CancellationToken) -> SocketAddr {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    tokio::spawn(
        Server::builder()
            .add_service(ExternalScalerServer::new(Bare))
            .serve_with_shutdown(addr, shutdown.cancelled_owned()),
    );
    addr
}

async fn connect(addr: SocketAddr, connections: usize) -> Vec<ExternalScalerClient<Channel>> {
    let mut pool = Vec::with_capacity(connections);
    for _ in 0..connections {
        // The server may still be binding: retry briefly.
        let mut tries = 0;
        let client = loop {
            match ExternalScalerClient::connect(format!("http://{addr}")).await {
                Ok(c) => break c,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("connecting to {addr}: {e}"),
            }
        };
        pool.push(client);
    }
    for c in &mut pool {
        for _ in 0..50 {
            c.get_metrics(request()).await.expect("warm-up");
        }
    }
    pool
}

/// Closed loop: `streams` requests in flight on each connection, `total` requests in all.
async fn closed_loop(
    pool: &[ExternalScalerClient<Channel>],
    streams: usize,
    total: usize,
) -> (Vec<Duration>, usize, Duration) {
    let workers = pool.len() * streams;
    let per_worker = total.div_ceil(workers);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let mut client = pool[w % pool.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_worker);
            let mut errors = 0usize;
            for _ in 0..per_worker {
                let t = Instant::now();
                match client.get_metrics(request()).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let (mut lat, mut errors) = (Vec::with_capacity(total), 0);
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        lat.extend(l);
        errors += e;
    }
    (lat, errors, t0.elapsed())
}

/// Open loop: `rps` requests per second for `secs`, started on a 1 ms schedule whatever the
/// answers do, round-robin over the connections.
async fn open_loop(
    pool: &[ExternalScalerClient<Channel>],
    rps: u64,
    secs: u64,
) -> (Vec<Duration>, usize, Duration) {
    let per_ms = (rps as f64 / 1000.0).max(0.001);
    let total = (rps * secs) as usize;
    let inflight = Arc::new(Semaphore::new(1024));
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::channel::<Option<Duration>>(total.max(1));
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut sent, mut budget) = (0usize, 0.0f64);
    while sent < total {
        ticker.tick().await;
        budget += per_ms;
        while budget >= 1.0 && sent < total {
            budget -= 1.0;
            let mut client = pool[sent % pool.len()].clone();
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
    let (mut lat, mut errors) = (Vec::with_capacity(total), 0);
    while let Some(r) = lat_rx.recv().await {
        match r {
            Some(d) => lat.push(d),
            None => errors += 1,
        }
    }
    (lat, errors, start.elapsed())
}

/// One GetMetrics request as a gRPC message body (1-byte flag, 4-byte length, protobuf).
fn grpc_body() -> Vec<u8> {
    use prost::Message;
    let msg = request().encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&msg);
    body
}

/// Runs h2load against `addr` with `args` and returns per-request latencies, errors and the
/// elapsed time; `None` when h2load is not installed.
fn h2load(addr: SocketAddr, args: &[String]) -> Option<(Vec<Duration>, usize, Duration)> {
    let dir = tempfile::tempdir().ok()?;
    let body = dir.path().join("body");
    let log = dir.path().join("log");
    std::fs::write(&body, grpc_body()).ok()?;
    let started = Instant::now();
    let out = std::process::Command::new("h2load")
        .args(args)
        .arg("-d")
        .arg(&body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg(format!("--log-file={}", log.display()))
        .arg(format!(
            "http://{addr}/externalscaler.ExternalScaler/GetMetrics"
        ))
        .output()
        .ok()?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        eprintln!("h2load failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    // Each line: start time (µs since the epoch), HTTP status, latency (µs).
    let text = std::fs::read_to_string(&log).ok()?;
    let (mut lat, mut errors) = (Vec::new(), 0);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match (f.get(1), f.get(2).and_then(|d| d.parse::<u64>().ok())) {
            (Some(&"200"), Some(us)) => lat.push(Duration::from_micros(us)),
            _ => errors += 1,
        }
    }
    Some((lat, errors, elapsed))
}

fn h2load_available() -> bool {
    std::process::Command::new("h2load")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run briefly then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let total = if quick {
        400
    } else {
        env("RPA_LOAD_REQUESTS", 40_000) as usize
    };
    let connections = env("RPA_LOAD_CONNECTIONS", 8).max(1) as usize;
    let streams = env("RPA_LOAD_STREAMS", 8).max(1) as usize;
    let rps = env("RPA_LOAD_RPS", 2000);
    let secs = if quick { 1 } else { env("RPA_LOAD_SECS", 10) };

    let shutdown = CancellationToken::new();
    let servers = [
        ("runpod-autoscaler", start_ours(shutdown.clone()).await),
        ("bare tonic", start_bare(shutdown.clone()).await),
    ];
    let mut pools = Vec::new();
    for (_, addr) in &servers {
        pools.push(connect(*addr, connections).await);
    }

    let closed = format!("closed loop -c {connections} -m {streams}");
    for ((name, _), pool) in servers.iter().zip(&pools) {
        let (lat, errors, elapsed) = closed_loop(pool, streams, total).await;
        report(name, &closed, lat, errors, elapsed);
    }
    let open = format!("open loop {rps} req/s, {connections} conns");
    for ((name, _), pool) in servers.iter().zip(&pools) {
        let (lat, errors, elapsed) = open_loop(pool, rps, secs).await;
        report(name, &open, lat, errors, elapsed);
    }
    if h2load_available() {
        // h2load in its own process: the load generator no longer shares this runtime.
        let closed_args: Vec<String> = vec![
            "-n".into(),
            total.to_string(),
            "-c".into(),
            connections.to_string(),
            "-m".into(),
            streams.to_string(),
        ];
        let per_client = (rps / connections as u64).max(1);
        let open_args: Vec<String> = vec![
            "-c".into(),
            connections.to_string(),
            "-m".into(),
            streams.to_string(),
            format!("--rps={per_client}"),
            "-D".into(),
            secs.to_string(),
        ];
        for (load, args) in [
            (
                format!("h2load -n {total} -c {connections} -m {streams}"),
                &closed_args,
            ),
            (format!("h2load --rps {rps} -D {secs}"), &open_args),
        ] {
            for (name, addr) in &servers {
                let addr = *addr;
                let args = args.clone();
                let result = tokio::task::spawn_blocking(move || h2load(addr, &args))
                    .await
                    .ok()
                    .flatten();
                if let Some((lat, errors, elapsed)) = result {
                    report(name, &load, lat, errors, elapsed);
                }
            }
        }
    } else {
        println!("(h2load not installed: `apt-get install nghttp2-client` adds its runs)");
    }
    shutdown.cancel();
}
