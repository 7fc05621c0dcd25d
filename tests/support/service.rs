//! Starting the assembled service on loopback and waiting on its published snapshots.

use std::sync::Arc;
use std::time::Duration;

use runpod_autoscaler::clock::SystemClock;
use runpod_autoscaler::config::Config;
use runpod_autoscaler::service::ServiceParts;
use runpod_autoscaler::signals::SignalSource;
use runpod_autoscaler::snapshot::{Snapshot, SnapshotReceiver};
use runpod_autoscaler::telemetry::Metrics;

/// Tick period for tests: fast enough that a condition shows within a few hundred ms.
pub const TEST_TICK: Duration = Duration::from_millis(100);

/// Service parts on free 127.0.0.1 ports with `config`'s policy, baseline and poll interval,
/// the system clock and [`TEST_TICK`]; callers adjust fields as needed.
pub async fn loopback_parts(config: &Config, sources: Vec<Arc<dyn SignalSource>>) -> ServiceParts {
    ServiceParts {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tls: None,
        sources,
        poll_interval: config.signals.poll_interval,
        tick_interval: TEST_TICK,
        baseline_gpus: config.baseline.gpus,
        policy: config.planner_policy(),
        clock: Arc::new(SystemClock),
        metrics: Arc::new(Metrics::new()),
        reconciler: None,
    }
}

/// Waits until a published snapshot satisfies `pred`; fails the test after 20 s naming `what`.
pub async fn wait_for_snapshot(
    snapshots: &SnapshotReceiver,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) {
    let mut rx = snapshots.clone();
    tokio::time::timeout(
        Duration::from_secs(20),
        rx.wait_for(|s| s.as_ref().is_some_and(|s| pred(s))),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    .expect("snapshot channel closed");
}
