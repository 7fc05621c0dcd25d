//! The assembled service on 127.0.0.1: samplers → tick → snapshot → HTTP endpoints, a failing
//! source going stale (hold, counted failures), and graceful shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use runpod_autoscaler::config::Config;
use runpod_autoscaler::decide::Hold;
use runpod_autoscaler::proto::external_scaler_client::ExternalScalerClient;
use runpod_autoscaler::proto::{GetMetricsRequest, ScaledObjectRef};
use runpod_autoscaler::service::{self, ServiceParts};

mod support;
use runpod_autoscaler::model::{Reading, SignalKind};
use runpod_autoscaler::signals::{SignalError, SignalSource, StaticSource};
use support::service::{loopback_parts, wait_for_snapshot};

/// GET over loopback; (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    support::http_get(addr, path)
        .await
        .unwrap_or_else(|| panic!("no HTTP answer for {path}"))
}

fn static_config() -> Config {
    Config::from_toml(include_str!("../examples/static.toml")).unwrap()
}

/// Loopback parts with fast polls and ticks (50 ms) so conditions show quickly.
async fn parts(sources: Vec<Arc<dyn SignalSource>>) -> ServiceParts {
    let mut parts = loopback_parts(&static_config(), sources).await;
    parts.poll_interval = Duration::from_millis(50);
    parts.tick_interval = Duration::from_millis(50);
    parts
}

#[tokio::test]
async fn http_endpoints_serve_the_published_plan() {
    // examples/static.toml with a queue of 1000: 10 GPU workers of work, all of which can be
    // had (baseline 2 + max_pods 8 within $4/h), while one tick's plan reaches 7 (baseline 2 +
    // max_launches_per_tick 5). KEDA must be served 10, not what one tick leaves.
    let sources: Vec<Arc<dyn SignalSource>> = vec![
        Arc::new(StaticSource::new(SignalKind::QueueLag, 1000.0)),
        Arc::new(StaticSource::new(SignalKind::LatencyP95, 12.5)),
    ];
    let shutdown = CancellationToken::new();
    let running = service::start(parts(sources).await, shutdown.clone()).unwrap();
    let http = running.http_addr;
    assert_eq!(get(http, "/healthz").await, (200, "ok\n".to_owned()));

    let mut snapshots = running.snapshots.clone();
    tokio::time::timeout(Duration::from_secs(10), snapshots.wait_for(Option::is_some))
        .await
        .expect("first snapshot within 10 s")
        .unwrap();
    assert_eq!(get(http, "/readyz").await.0, 200);

    let (status, body) = get(http, "/debug/plan").await;
    assert_eq!(status, 200);
    let plan: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(plan["mode"], "advisory");
    assert_eq!(plan["gpu_demand"], 10.0);
    assert_eq!(plan["plan"]["demand_gpus"], 10);
    assert_eq!(plan["plan"]["served_gpus"], 10);
    assert_eq!(plan["plan"]["desired_gpus"], 7);
    assert_eq!(plan["plan"]["steps"].as_array().unwrap().len(), 5);
    assert!(plan["text"]
        .as_str()
        .unwrap()
        .contains("5 x launch 1x NVIDIA RTX A5000"));
    assert_eq!(plan["signals"][0]["signal"], "queue_lag");
    assert_eq!(plan["signals"][0]["fresh"], true);

    // The HTTP server sets TCP_NODELAY on what it accepts (read back while a keep-alive
    // connection is open).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(http).await.unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = conn.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let accepted = support::accepted_nodelay(http);
        assert!(
            !accepted.is_empty() && accepted.iter().all(|on| *on),
            "{accepted:?}"
        );
    }

    let (status, metrics) = get(http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("runpod_autoscaler_desired_gpus 7.0"),
        "{metrics}"
    );
    assert!(metrics.contains("runpod_autoscaler_served_gpus 10.0"));
    assert!(metrics.contains("runpod_autoscaler_baseline_gpus 2.0"));
    assert!(metrics.contains("runpod_autoscaler_signal_value{signal=\"queue_lag\"} 1000.0"));

    // And what a KEDA client reads over gRPC.
    let mut keda = ExternalScalerClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();
    let values = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(ScaledObjectRef::default()),
            metric_name: "gpu-demand".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(values.metric_values[0].metric_value, 10);
    assert!(metrics.contains("# EOF"));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.wait())
        .await
        .expect("service stops within 10 s")
        .unwrap();
}

/// A queue source that can be switched to failing.
struct Flaky {
    failing: AtomicBool,
}

#[async_trait]
impl SignalSource for Flaky {
    fn kind(&self) -> SignalKind {
        SignalKind::QueueLag
    }
    async fn sample(&self) -> Result<Reading, SignalError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(SignalError::Unreachable {
                backend: "kafka",
                detail: "connection refused".into(),
            })
        } else {
            Ok(Reading::of(0.0))
        }
    }
}

#[tokio::test]
async fn a_failing_source_goes_stale_and_the_planner_holds() {
    let flaky = Arc::new(Flaky {
        failing: AtomicBool::new(false),
    });
    let sources: Vec<Arc<dyn SignalSource>> = vec![
        flaky.clone(),
        Arc::new(StaticSource::new(SignalKind::LatencyP95, 1.0)),
    ];
    let shutdown = CancellationToken::new();
    let running = service::start(parts(sources).await, shutdown.clone()).unwrap();
    let snapshots = running.snapshots.clone();
    wait_for_snapshot(&snapshots, "fresh signals", |s| {
        s.signals.iter().all(|x| x.fresh)
    })
    .await;

    flaky.failing.store(true, Ordering::SeqCst);
    // Three poll intervals later the lag is stale: a hold, never zero demand.
    wait_for_snapshot(&snapshots, "a stale queue-lag hold", |s| {
        s.plan.holds.iter().any(|h| {
            matches!(
                h,
                Hold::StaleSignal {
                    signal: SignalKind::QueueLag,
                    ..
                }
            )
        })
    })
    .await;
    let snap = snapshots.borrow().clone().unwrap();
    let lag = snap
        .signals
        .iter()
        .find(|s| s.signal == SignalKind::QueueLag)
        .unwrap();
    assert!(!lag.fresh);
    assert!(lag.failures >= 1);
    assert!(lag
        .last_error
        .as_deref()
        .unwrap()
        .contains("connection refused"));
    let (_, metrics) = get(running.http_addr, "/metrics").await;
    assert!(metrics.contains("runpod_autoscaler_signal_failures_total{signal=\"queue_lag\"}"));
    assert!(
        metrics.contains("runpod_autoscaler_holds{kind=\"stale_signal\"} 1"),
        "{metrics}"
    );

    // Recovery: the next good sample makes it fresh again.
    flaky.failing.store(false, Ordering::SeqCst);
    wait_for_snapshot(&snapshots, "recovered signals", |s| {
        s.signals.iter().all(|x| x.fresh && x.last_error.is_none())
    })
    .await;

    shutdown.cancel();
    running.wait().await.unwrap();
}
