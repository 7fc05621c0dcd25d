//! What the reconciler knows about each pod beyond its claim and the provider's listing: join
//! progress, health, idleness, and where a retiring pod is in drain → terminate → confirm.
//! In memory only (re-derived after a restart: a joined pod is probed again, a retiring one
//! drained again; both are idempotent). The transitions that only need time are pure.

use std::time::Duration;

use serde::Serialize;

use crate::model::Timestamp;

/// Where a pod is in joining.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JoinState {
    /// Waiting for the provider to report it RUNNING with an SSH endpoint.
    WaitingForSsh,
    /// The bootstrap is running (or another run holds the lock).
    Bootstrapping,
    /// Bootstrapped; the GPU check is next.
    Checking,
    /// Bootstrapped and GPUs as bought.
    Joined,
    /// The bootstrap or the GPU check failed: the pod is replaced.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Health of a joined pod, from periodic probes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Health {
    /// Last successful probe.
    pub last_ok: Option<Timestamp>,
    /// First failure of the current run of failed probes.
    pub failing_since: Option<Timestamp>,
    /// Last probe started (successful or not).
    pub last_probe: Option<Timestamp>,
    /// Last error.
    pub last_error: Option<String>,
    /// Highest GPU utilization at the last probe (percent).
    pub utilization: Option<f64>,
}

impl Health {
    /// True when a probe is due.
    pub fn probe_due(&self, now: Timestamp, interval: Duration) -> bool {
        self.last_probe
            .is_none_or(|t| now.saturating_since(t) >= interval)
    }

    /// True when probes have failed for `window` or longer.
    pub fn is_dead(&self, now: Timestamp, window: Duration) -> bool {
        self.failing_since
            .is_some_and(|since| now.saturating_since(since) >= window)
    }

    /// Records a successful probe.
    pub fn ok(&mut self, now: Timestamp, utilization: f64) {
        self.last_ok = Some(now);
        self.failing_since = None;
        self.last_error = None;
        self.utilization = Some(utilization);
    }

    /// Records a failed probe.
    pub fn failed(&mut self, now: Timestamp, error: String) {
        self.failing_since.get_or_insert(now);
        self.last_error = Some(error);
    }
}

/// Why a pod is retired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetireReason {
    /// The planner removed it (surplus, above max_pods, not serving, boot timeout).
    Planned(String),
    /// The bootstrap or the GPU check failed.
    JoinFailed,
    /// Health probes failed for too long (dead, preempted or unreachable).
    Unhealthy,
    /// Older than `max_pod_lifetime`.
    Lifetime,
    /// A second pod for one slot.
    Duplicate,
    /// A pod of ours that no claim explains.
    Orphan,
}

impl RetireReason {
    /// A metric label.
    pub fn label(&self) -> &'static str {
        match self {
            RetireReason::Planned(_) => "planned",
            RetireReason::JoinFailed => "join_failed",
            RetireReason::Unhealthy => "unhealthy",
            RetireReason::Lifetime => "lifetime",
            RetireReason::Duplicate => "duplicate",
            RetireReason::Orphan => "orphan",
        }
    }

    /// Whether the pod is drained first (only a serving pod has work to hand back).
    pub fn drains(&self) -> bool {
        matches!(self, RetireReason::Planned(_) | RetireReason::Lifetime)
    }
}

/// Where a retiring pod is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum RetirePhase {
    /// Send the drain signal.
    Drain,
    /// Wait until idle, or until the deadline.
    WaitIdle {
        /// Give up waiting then.
        deadline: Timestamp,
    },
    /// Wait until each job the pod had at the drain is checkpointed (stored and verified after
    /// the drain began) or finished, or until the deadline.
    WaitCheckpoint {
        /// Give up waiting then (counted as a missed checkpoint).
        deadline: Timestamp,
        /// The jobs in hand when the drain began.
        jobs: Vec<String>,
        /// When the drain began: only newer checkpoints count.
        since: Timestamp,
    },
    /// Send the terminate.
    Terminate,
    /// Terminate sent: confirm the pod is gone.
    Confirm,
}

/// A pod being retired.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retiring {
    /// Why.
    pub reason: RetireReason,
    /// Where.
    pub phase: RetirePhase,
    /// When retiring began.
    pub since: Timestamp,
}

impl Retiring {
    /// A new retirement: drained first when the reason calls for it and the pod joined.
    pub fn new(reason: RetireReason, joined: bool, now: Timestamp) -> Self {
        let phase = if reason.drains() && joined {
            RetirePhase::Drain
        } else {
            RetirePhase::Terminate
        };
        Retiring {
            reason,
            phase,
            since: now,
        }
    }
}

/// Backoff for a failing operation: never a hot loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Backoff {
    /// Consecutive failures.
    pub failures: u32,
    /// Not before this time.
    pub not_before: Option<Timestamp>,
}

impl Backoff {
    /// First retry after a failure waits this long; it doubles per failure.
    pub const BASE: Duration = Duration::from_secs(2);
    /// Never longer than this: a pod is worth retrying within a minute.
    pub const MAX: Duration = Duration::from_secs(60);

    /// True when the operation may run now.
    pub fn ready(&self, now: Timestamp) -> bool {
        self.not_before.is_none_or(|t| now >= t)
    }

    /// Records a failure at `now`.
    pub fn fail(&mut self, now: Timestamp) {
        self.failures = self.failures.saturating_add(1);
        let wait = Self::BASE
            .saturating_mul(1u32 << (self.failures - 1).min(16))
            .min(Self::MAX);
        self.not_before = Some(now.plus(wait));
    }

    /// Records a success.
    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// Everything in memory about one pod.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodRuntime {
    /// Join progress.
    pub join: JoinState,
    /// When joining started (first SSH attempt), for the join-duration metric.
    pub join_started: Option<Timestamp>,
    /// Health.
    pub health: Health,
    /// Last time a probe saw it busy.
    pub last_busy_at: Option<Timestamp>,
    /// Retirement, once decided.
    pub retiring: Option<Retiring>,
    /// Backoff of its next operation.
    pub backoff: Backoff,
    /// The last step failure not recorded by the health probes (joining).
    pub last_error: Option<String>,
}

impl PodRuntime {
    /// A pod just bound: nothing known yet (or, after a restart, `joined` from its claim).
    pub fn new(joined: bool) -> Self {
        PodRuntime {
            join: if joined {
                JoinState::Joined
            } else {
                JoinState::WaitingForSsh
            },
            join_started: None,
            health: Health::default(),
            last_busy_at: None,
            retiring: None,
            backoff: Backoff::default(),
            last_error: None,
        }
    }

    /// Ready to serve: joined, probed healthy at least once since, not failing, not retiring.
    pub fn is_ready(&self) -> bool {
        self.join == JoinState::Joined
            && self.health.last_ok.is_some()
            && self.health.failing_since.is_none()
            && self.retiring.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_secs(1_000);

    #[test]
    fn backoff_doubles_to_a_minute_and_resets() {
        let mut b = Backoff::default();
        assert!(b.ready(T0));
        let mut waits = Vec::new();
        for _ in 0..8 {
            b.fail(T0);
            waits.push(b.not_before.unwrap().saturating_since(T0).as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);
        assert!(!b.ready(T0.plus(Duration::from_secs(59))));
        assert!(b.ready(T0.plus(Duration::from_secs(60))));
        b.reset();
        assert!(b.ready(T0));
    }

    #[test]
    fn health_tracks_failing_runs_and_due_probes() {
        let mut h = Health::default();
        assert!(h.probe_due(T0, Duration::from_secs(15)));
        h.last_probe = Some(T0);
        assert!(!h.probe_due(T0.plus(Duration::from_secs(14)), Duration::from_secs(15)));
        h.failed(T0, "refused".into());
        h.failed(T0.plus(Duration::from_secs(30)), "refused".into());
        assert_eq!(h.failing_since, Some(T0));
        assert!(!h.is_dead(T0.plus(Duration::from_secs(44)), Duration::from_secs(45)));
        assert!(h.is_dead(T0.plus(Duration::from_secs(45)), Duration::from_secs(45)));
        h.ok(T0.plus(Duration::from_secs(50)), 12.0);
        assert!(h.failing_since.is_none() && h.last_error.is_none());
    }

    #[test]
    fn only_serving_pods_are_drained() {
        let planned = Retiring::new(RetireReason::Planned("surplus".into()), true, T0);
        assert_eq!(planned.phase, RetirePhase::Drain);
        let not_joined = Retiring::new(RetireReason::Planned("surplus".into()), false, T0);
        assert_eq!(not_joined.phase, RetirePhase::Terminate);
        for r in [
            RetireReason::Unhealthy,
            RetireReason::JoinFailed,
            RetireReason::Orphan,
            RetireReason::Duplicate,
        ] {
            assert_eq!(Retiring::new(r, true, T0).phase, RetirePhase::Terminate);
        }
    }

    #[test]
    fn readiness_needs_join_a_good_probe_and_no_retirement() {
        let mut r = PodRuntime::new(true);
        assert!(!r.is_ready(), "no probe yet");
        r.health.ok(T0, 0.0);
        assert!(r.is_ready());
        r.health.failed(T0, "x".into());
        assert!(!r.is_ready());
        r.health.ok(T0, 0.0);
        r.retiring = Some(Retiring::new(RetireReason::Lifetime, true, T0));
        assert!(!r.is_ready());
    }
}
