//! The planner's inputs other than signals: what exists now, and the policy to apply.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{GpuTypeId, PodId, PodState, Timestamp, Usd};

/// What the cluster has right now: the local baseline and the RunPod pods this autoscaler owns.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterView {
    /// False until the first complete provider listing after start: no decision before that.
    pub synced: bool,
    /// GPU workers the always-on local baseline provides.
    pub baseline_gpus: u32,
    /// RunPod pods owned by this autoscaler (terminated ones excluded).
    pub pods: Vec<PodView>,
}

/// One RunPod pod as the planner sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodView {
    /// RunPod's id.
    pub id: PodId,
    /// Lifecycle status.
    pub state: PodState,
    /// GPUs attached.
    pub gpus: u32,
    /// What it costs per hour now.
    pub usd_per_hour: Usd,
    /// When it was created (or, when the provider does not say, when this autoscaler first saw
    /// it: never "now", which would keep it young forever).
    pub created_at: Timestamp,
    /// Serving: running, reachable and (once the reconciler joins pods) bootstrapped.
    pub ready: bool,
    /// When it last ran work; `None` when unknown (idleness then counts from creation).
    pub last_busy_at: Option<Timestamp>,
    /// Being drained before termination: no longer counted as capacity.
    pub draining: bool,
}

impl PodView {
    /// True when the pod serves, or will serve, work.
    pub fn is_capacity(&self) -> bool {
        !self.draining && self.state.is_live()
    }

    /// True while the pod is booting (not ready yet) or inside the warm-up grace after creation.
    pub fn is_warming(&self, now: Timestamp, grace: Duration) -> bool {
        self.is_capacity() && (!self.ready || now.saturating_since(self.created_at) < grace)
    }

    /// True when the pod still is not ready `deadline` after creation: it counts as failed.
    pub fn is_boot_overdue(&self, now: Timestamp, deadline: Duration) -> bool {
        self.is_capacity() && !self.ready && now.saturating_since(self.created_at) >= deadline
    }

    /// How long the pod has had nothing to do.
    pub fn idle_for(&self, now: Timestamp) -> Duration {
        now.saturating_since(
            self.last_busy_at
                .unwrap_or(self.created_at)
                .max(self.created_at),
        )
    }
}

impl ClusterView {
    /// Pods counted as capacity (live and not draining).
    pub fn capacity_pods(&self) -> impl Iterator<Item = &PodView> {
        self.pods.iter().filter(|p| p.is_capacity())
    }

    /// Every pod that exists and may bill: what `max_pods` and the budget count.
    pub fn existing_pods(&self) -> impl Iterator<Item = &PodView> {
        self.pods.iter().filter(|p| p.state != PodState::Terminated)
    }

    /// Current spend rate of all existing pods.
    pub fn usd_per_hour(&self) -> Usd {
        self.existing_pods().map(|p| p.usd_per_hour).sum()
    }
}

/// Which decision rule to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// The original design's rule (queue depth thresholds, no baseline, no hysteresis).
    Seed,
    /// Target tracking: lag per GPU, latency step-up, baseline first, stabilized scale-down.
    Target,
    /// Target tracking priced for pods that bill while booting: scale-up for the lag projected
    /// over the boot, scale-down after the ski-rental break-even (see `decide/cost.rs`).
    Cost,
}

impl PolicyKind {
    /// Every policy, for side-by-side comparisons.
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Seed, PolicyKind::Target, PolicyKind::Cost];

    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Seed => "seed",
            PolicyKind::Target => "target",
            PolicyKind::Cost => "cost",
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shape and price of a pod the planner may launch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodTemplate {
    /// GPU type to ask RunPod for.
    pub gpu_type: GpuTypeId,
    /// GPUs per pod.
    pub gpus: u32,
    /// Expected price per hour of one pod (used for the budget before it exists).
    pub usd_per_hour: Usd,
}

/// Everything that steers a decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// Which rule.
    pub kind: PolicyKind,
    /// Never fewer RunPod pods than this (target policy only).
    pub min_pods: u32,
    /// Hard limit on existing RunPod pods, booting ones included.
    pub max_pods: u32,
    /// Hard limit on the spend rate of existing plus new pods.
    pub max_usd_per_hour: Usd,
    /// At most this many launches in one plan (RunPod API rate and blast radius).
    pub max_launches_per_tick: u32,
    /// What a new pod is.
    pub pod: PodTemplate,
    /// Queue lag one GPU worker absorbs (target policy).
    pub lag_per_gpu: f64,
    /// p95 latency objective in seconds.
    pub slo_p95_seconds: f64,
    /// GPUs added per plan while p95 is above the SLO and no new capacity is warming up.
    pub latency_step_gpus: u32,
    /// Scale down only to the highest demand seen within this window.
    pub scale_down_stabilization: Duration,
    /// A pod is removed only after it has been idle this long.
    pub idle_timeout: Duration,
    /// New pods are neither removed nor judged during this long after creation.
    pub warmup_grace: Duration,
    /// A pod not ready this long after creation counts as failed: terminated and replaced.
    pub boot_deadline: Duration,
    /// A signal older than this many poll intervals is stale.
    pub stale_after_intervals: u32,
}
