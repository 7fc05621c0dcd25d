//! Cost-aware: target tracking re-priced for a fleet whose pods bill while they boot.
//!
//! * **Scale-up for the backlog the pods will meet.** A pod launched now serves only after it
//!   boots (`warmup_grace` is the planner's estimate of that), so scale-up is sized for the lag
//!   projected that far ahead along its current rise, not for the lag as it is now: fewer
//!   rounds of launches chasing a growing queue, and earlier relief. While a pod is still
//!   warming up (booting, or inside `warmup_grace`) the rise is not projected again: that pod
//!   was launched for it, and the trend does not show its capacity yet.
//! * **Scale-down priced like renting.** An idle pod is kept only as long as keeping it costs
//!   less than the boot of the replacement it would spare (the ski-rental break-even: idle for
//!   about the boot time, then go), so `idle_timeout` is capped at the warm-up estimate and
//!   each pod waits its own share of it (between half and all, see `idle_share` in
//!   `decide/mod.rs`), so that a burst's pods leave one after another. No stabilization
//!   window and no hold after an SLO breach: a pod still serving the backlog is not idle, and
//!   an idle one is priced by the rule above.
//!
//! Every hard limit, the stale-signal hold and the warm-up grace are the shared planner's, as
//! for the other policies.

use std::time::Duration;

use super::target::{tracked, Tuning};
use super::{ClusterView, Policy, Signals, Want};
use crate::model::Timestamp;

/// The shortest break-even idle time: a pod that served a moment ago is not dropped at once
/// even with a zero warm-up estimate.
const MIN_IDLE: Duration = Duration::from_secs(1);

/// The cost-aware tuning of target tracking for `policy`.
pub(super) fn tuning(policy: &Policy) -> Tuning {
    let boot = policy.warmup_grace;
    Tuning {
        lookahead: boot,
        window: Duration::ZERO,
        hold_on_breach: false,
        idle_timeout: policy.idle_timeout.min(boot).max(MIN_IDLE),
        spread_idle: true,
    }
}

pub(super) fn want(view: &ClusterView, signals: &Signals, policy: &Policy, now: Timestamp) -> Want {
    tracked(view, signals, policy, now, tuning(policy))
}
