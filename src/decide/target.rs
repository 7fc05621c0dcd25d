//! Target tracking: desired GPU workers = max(ceil(lag / lag_per_gpu), a latency step-up while
//! p95 > SLO). The local baseline covers demand first and RunPod the rest, clamped to
//! [min_pods, max_pods]. Scale-up is immediate; scale-down goes only to the highest demand seen
//! in the stabilization window, and never while p95 was above the SLO in that window. A stale
//! signal holds: its last value is still reported (and served to KEDA), but it neither adds
//! capacity nor lets capacity go.

use std::time::Duration;

use super::{
    ClusterView, Hold, Policy, Reason, Sample, ScaleDown, Series, Signals, SteadyLoad, Want,
};
use crate::model::Timestamp;

/// How the tracking rule scales: the target policy's settings, or the cost-aware policy's
/// (see `cost.rs`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Tuning {
    /// Size scale-up for the lag projected this far ahead along its recent trend (zero: the
    /// lag as it is now), while no pod is still warming up.
    pub(super) lookahead: Duration,
    /// Scale down only to the highest demand seen within this window.
    pub(super) window: Duration,
    /// Any SLO breach within the window keeps the current capacity.
    pub(super) hold_on_breach: bool,
    /// A surplus pod goes after being idle this long.
    pub(super) idle_timeout: Duration,
    /// Each pod waits its own ski-rental share of `idle_timeout` (see `decide/mod.rs`).
    pub(super) spread_idle: bool,
    /// Hysteresis for the marginal pods of a continuing load, or `None`.
    pub(super) steady: Option<SteadyLoad>,
}

impl Tuning {
    /// The target policy: the configured window and idle timeout, held by any breach.
    pub(super) fn target(policy: &Policy) -> Tuning {
        Tuning {
            lookahead: Duration::ZERO,
            window: policy.scale_down_stabilization,
            hold_on_breach: true,
            idle_timeout: policy.idle_timeout,
            spread_idle: false,
            steady: None,
        }
    }
}

/// GPU workers needed to absorb a lag sample: ⌈lag / lag_per_gpu⌉, but never more than the
/// workers that lag can keep busy (one per Kafka partition that counts).
pub(super) fn lag_gpus(sample: &Sample, lag_per_gpu: f64) -> u32 {
    if sample.value <= 0.0 {
        return 0;
    }
    let gpus = (sample.value / lag_per_gpu).ceil().min(f64::from(u32::MAX)) as u32;
    gpus.min(sample.max_workers.unwrap_or(u32::MAX))
}

/// The lag `lookahead` from now if it keeps the trend of its two newest samples; never below
/// the newest (a falling lag is not counted on before it falls).
fn projected(queue: &Series, lookahead: Duration) -> Option<Sample> {
    let latest = queue.latest()?;
    if lookahead.is_zero() {
        return Some(latest);
    }
    let Some(previous) = queue.previous() else {
        return Some(latest);
    };
    let dt = latest
        .observed_at
        .saturating_since(previous.observed_at)
        .as_secs_f64();
    if dt <= 0.0 {
        return Some(latest);
    }
    let slope = (latest.value - previous.value) / dt;
    let value = latest.value + slope.max(0.0) * lookahead.as_secs_f64();
    Some(Sample { value, ..latest })
}

pub(super) fn want(view: &ClusterView, signals: &Signals, policy: &Policy, now: Timestamp) -> Want {
    tracked(view, signals, policy, now, Tuning::target(policy))
}

/// Target tracking with `tuning`.
pub(super) fn tracked(
    view: &ClusterView,
    signals: &Signals,
    policy: &Policy,
    now: Timestamp,
    tuning: Tuning,
) -> Want {
    let per_pod = policy.pod.gpus.max(1);
    let capacity_gpus: u32 = view.capacity_pods().map(|p| p.gpus).sum();
    let total_now = view.baseline_gpus.saturating_add(capacity_gpus);
    let intervals = policy.stale_after_intervals;
    let mut holds = Vec::new();

    let latest_lag = signals.queue.latest();
    let lag = latest_lag.map_or(0.0, |s| s.value);
    let by_lag_now = latest_lag.map_or(0, |s| lag_gpus(&s, policy.lag_per_gpu));
    let by_lag_ahead =
        projected(&signals.queue, tuning.lookahead).map_or(0, |s| lag_gpus(&s, policy.lag_per_gpu));
    // Pods still warming (booting, or inside the warm-up grace) were launched for the rise seen
    // then, and the trend predates their capacity: while they warm, the projection keeps the
    // capacity that exists (nothing launched for it is dropped) but adds none (the rise their
    // launch answers would otherwise buy another round the moment they turn ready). A latency
    // step-up waits for them too.
    let warming = super::count(
        view.capacity_pods()
            .filter(|p| p.is_warming(now, policy.warmup_grace)),
    );
    let by_lag = if warming > 0 {
        by_lag_now.max(by_lag_ahead.min(total_now))
    } else {
        by_lag_ahead
    };
    let lag_fresh = signals.queue.is_fresh(now, intervals);

    let latency = signals.latency.as_ref();
    let p95 = latency.and_then(|l| l.latest()).map(|s| s.value);
    let latency_fresh = latency.is_none_or(|l| l.is_fresh(now, intervals));
    let slow = p95.filter(|&p| p > policy.slo_p95_seconds);
    let by_latency = match slow {
        None => 0,
        Some(_) => {
            if warming > 0 {
                // The last step has not taken effect yet: wait for it before adding more.
                holds.push(Hold::WarmingUp { pods: warming });
                total_now
            } else {
                total_now.saturating_add(policy.latency_step_gpus)
            }
        }
    };

    let demand_gpus = by_lag.max(by_latency);
    // What acts: a stale signal holds the capacity that exists and never adds to it (a p95
    // frozen above the SLO must not step capacity up tick after tick).
    let hold = |gpus: u32, fresh: bool| if fresh { gpus } else { gpus.min(total_now) };
    let acting_lag = hold(by_lag, lag_fresh);
    let acting_latency = hold(by_latency, latency_fresh);
    let acting = acting_lag.max(acting_latency);

    // Limits in GPUs; `launch` rounds up to whole pods.
    let clamp = |gpus: u32| -> u32 {
        gpus.clamp(
            policy.min_pods.saturating_mul(per_pod),
            policy.max_pods.max(policy.min_pods).saturating_mul(per_pod),
        )
    };
    let mut runpod_gpus = clamp(acting.saturating_sub(view.baseline_gpus));
    if acting.saturating_sub(view.baseline_gpus).div_ceil(per_pod) > policy.max_pods {
        holds.push(Hold::MaxPods {
            max_pods: policy.max_pods,
        });
    }

    let reason = match slow {
        Some(p) if acting_latency >= acting_lag && acting_latency > 0 => Reason::LatencyAboveSlo {
            p95_seconds: p,
            slo_seconds: policy.slo_p95_seconds,
        },
        // With min_pods 0 nothing launches for this reason, so it needs no guard of its own.
        _ if acting.saturating_sub(view.baseline_gpus) == 0 => Reason::BelowMinimum {
            min_pods: policy.min_pods,
        },
        _ => Reason::QueueLag {
            lag,
            needed_gpus: by_lag,
        },
    };

    if runpod_gpus < capacity_gpus {
        // Stabilization: the highest demand within the window wins; any SLO breach in the
        // window keeps the current capacity.
        let since = now.minus(tuning.window);
        let window_lag_gpus = signals
            .queue
            .since(since)
            .map(|s| lag_gpus(s, policy.lag_per_gpu))
            .fold(by_lag, u32::max);
        let breached = tuning.hold_on_breach
            && latency.is_some_and(|l| l.since(since).any(|s| s.value > policy.slo_p95_seconds));
        let window_gpus = if breached {
            capacity_gpus
        } else {
            clamp(window_lag_gpus.saturating_sub(view.baseline_gpus))
        };
        if window_gpus > runpod_gpus {
            runpod_gpus = window_gpus.min(capacity_gpus);
            holds.push(Hold::Stabilizing {
                window_pods: window_gpus.div_ceil(per_pod),
            });
        }
    }

    Want {
        demand_gpus,
        runpod_gpus,
        reason,
        scale_down: Some(ScaleDown {
            idle_timeout: tuning.idle_timeout,
            spread_idle: tuning.spread_idle,
            warmup_grace: policy.warmup_grace,
            steady: tuning.steady,
        }),
        holds,
    }
}
