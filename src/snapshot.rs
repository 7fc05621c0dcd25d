//! The snapshot each tick publishes: the latest plan and signal health. The gRPC scaler and the
//! HTTP endpoints read it; nothing reads Kafka, Prometheus or RunPod to answer a request.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::decide::Plan;
use crate::model::{SignalKind, Timestamp};
use crate::reconcile::FleetEntry;

/// Health of one signal source at snapshot time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SignalStatus {
    /// Which signal.
    pub signal: SignalKind,
    /// Newest value, if any.
    pub value: Option<f64>,
    /// Age of the newest value.
    #[serde(with = "humantime_serde")]
    pub age: Option<Duration>,
    /// How often the source is polled (freshness is judged in multiples of it).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Whether the newest value is fresh enough to scale down on.
    pub fresh: bool,
    /// Failed polls since start.
    pub failures: u64,
    /// The most recent failure, if the last poll failed.
    pub last_error: Option<String>,
}

/// Everything one tick produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// When the tick ran.
    pub at: Timestamp,
    /// The plan decided.
    pub plan: Plan,
    /// Signal health.
    pub signals: Vec<SignalStatus>,
    /// `advisory` (plans only) or `active` (the reconciler acts on RunPod).
    pub mode: &'static str,
    /// The RunPod fleet as the reconciler sees it (empty in advisory mode).
    pub fleet: Vec<FleetEntry>,
    /// Problems of the tick (provider or store failures).
    pub errors: Vec<String>,
}

impl Snapshot {
    /// GPU workers the work needs, within what can ever be had: the `gpu-demand` metric
    /// served to KEDA (see [`Plan::served_gpus`]).
    pub fn gpu_demand(&self) -> f64 {
        f64::from(self.plan.served_gpus)
    }
}

/// Receiving side of published snapshots; `None` until the first tick completes.
pub type SnapshotReceiver = watch::Receiver<Option<Arc<Snapshot>>>;
/// Publishing side of snapshots.
pub type SnapshotSender = watch::Sender<Option<Arc<Snapshot>>>;

/// A new snapshot channel with nothing published yet.
pub fn channel() -> (SnapshotSender, SnapshotReceiver) {
    watch::channel(None)
}
