//! The original design's rule, kept as the baseline the simulator compares against:
//! when queue depth > 5 or p95 > SLO, pods needed = queue_depth / 10 + 1 (capped by max_pods);
//! scale down (to zero) only when the queue is empty and a pod has been idle for 60 s.
//! It ignores the local baseline and has no stabilization window or warm-up grace.

use std::time::Duration;

use super::{ClusterView, Hold, Policy, Reason, ScaleDown, Signals, Want};
use crate::model::Timestamp;

/// Queue depth above which the seed rule adds pods (from the original design).
const QUEUE_TRIGGER: f64 = 5.0;
/// Jobs one pod is assumed to absorb (from the original design: depth / 10 + 1).
const JOBS_PER_POD: f64 = 10.0;
/// Idle time before a pod may go (from the original design).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Pods the original rule wants for a queue depth and a latency verdict, `None` when it does
/// not trigger.
fn triggered_pods(depth: f64, slow: bool) -> Option<u32> {
    (depth > QUEUE_TRIGGER || slow).then(|| {
        // Truncating division is the original rule: 0..9 jobs → 1 pod, 10..19 → 2, …
        (depth / JOBS_PER_POD).floor().min(f64::from(u32::MAX - 1)) as u32 + 1
    })
}

pub(super) fn want(view: &ClusterView, signals: &Signals, policy: &Policy, now: Timestamp) -> Want {
    let per_pod = policy.pod.gpus.max(1);
    let capacity_gpus: u32 = view.capacity_pods().map(|p| p.gpus).sum();
    let intervals = policy.stale_after_intervals;
    let queue = signals.queue.latest().map(|s| s.value);
    let lag_fresh = signals.queue.is_fresh(now, intervals);
    let latency = signals.latency.as_ref();
    let p95 = latency.and_then(|l| l.latest()).map(|s| s.value);
    let latency_fresh = latency.is_none_or(|l| l.is_fresh(now, intervals));
    let depth = queue.unwrap_or(0.0);
    let slow = p95.is_some_and(|p| p > policy.slo_p95_seconds);

    if let Some(wanted) = triggered_pods(depth, slow) {
        let pods = wanted.min(policy.max_pods);
        let gpus = pods.saturating_mul(per_pod).max(capacity_gpus);
        // A stale signal holds what exists; only fresh ones add pods.
        let fresh_gpus = triggered_pods(if lag_fresh { depth } else { 0.0 }, slow && latency_fresh)
            .map_or(0, |p| p.min(policy.max_pods).saturating_mul(per_pod));
        let acting = fresh_gpus.max(gpus.min(capacity_gpus));
        let reason = if depth > QUEUE_TRIGGER {
            Reason::QueueLag {
                lag: depth,
                needed_gpus: pods.saturating_mul(per_pod),
            }
        } else {
            Reason::LatencyAboveSlo {
                p95_seconds: p95.unwrap_or(0.0),
                slo_seconds: policy.slo_p95_seconds,
            }
        };
        return Want {
            demand_gpus: gpus,
            runpod_gpus: acting,
            reason,
            scale_down: None,
            holds: if wanted > policy.max_pods {
                vec![Hold::MaxPods {
                    max_pods: policy.max_pods,
                }]
            } else {
                Vec::new()
            },
        };
    }

    let empty = queue == Some(0.0);
    Want {
        demand_gpus: if empty { 0 } else { capacity_gpus },
        runpod_gpus: if empty { 0 } else { capacity_gpus },
        reason: Reason::QueueLag {
            lag: depth,
            needed_gpus: 0,
        },
        scale_down: empty.then_some(ScaleDown {
            idle_timeout: IDLE_TIMEOUT,
            warmup_grace: Duration::ZERO,
            spread_idle: false,
            steady: None,
        }),
        holds: Vec::new(),
    }
}
