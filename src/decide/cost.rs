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
//! * **Hysteresis for the marginal pods of a continuing load.** While some pods are serving,
//!   up to a third of their count of idle pods wait [`STEADY_IDLE_BREAK_EVENS`] break-even times
//!   instead of one: a load that steps around a pod's worth (noise, 5-minute rows) keeps its
//!   marginal pod instead of dropping it and buying it again a few minutes later, each time
//!   paying a boot and risking the SLO while it boots. Once no pod serves (a burst is over),
//!   every idle pod is priced by the break-even alone.
//!
//! Every hard limit, the stale-signal hold and the warm-up grace are the shared planner's, as
//! for the other policies.

use std::time::Duration;

use super::target::{tracked, Tuning};
use super::{ClusterView, Policy, Signals, SteadyLoad, Want};
use crate::model::Timestamp;

/// The shortest break-even idle time: a pod that served a moment ago is not dropped at once
/// even with a zero warm-up estimate.
const MIN_IDLE: Duration = Duration::from_secs(1);

/// How many break-even times a marginal pod of a continuing load stays idle. Measured on the
/// shipped weekly trace (`simulate --policy all`): without the hysteresis, 303 pod creations,
/// 25 SLO-violation minutes, $145.58; with 2, 4, 6 and 8 break-evens, 157, 124, 102 and 89
/// creations, and with 8, 8 violation minutes for $156.61 (8% more).
const STEADY_IDLE_BREAK_EVENS: u32 = 8;

/// Idle pods kept on the long timeout per serving pod (rounded up: one for a small load).
const STEADY_PER_SERVING: f64 = 1.0 / 3.0;

/// The cost-aware tuning of target tracking for `policy`.
pub(super) fn tuning(policy: &Policy) -> Tuning {
    let boot = policy.warmup_grace;
    let break_even = policy.idle_timeout.min(boot).max(MIN_IDLE);
    Tuning {
        lookahead: boot,
        window: Duration::ZERO,
        hold_on_breach: false,
        idle_timeout: break_even,
        spread_idle: true,
        steady: Some(SteadyLoad {
            idle_timeout: break_even.saturating_mul(STEADY_IDLE_BREAK_EVENS),
            per_serving: STEADY_PER_SERVING,
        }),
    }
}

pub(super) fn want(view: &ClusterView, signals: &Signals, policy: &Policy, now: Timestamp) -> Want {
    tracked(view, signals, policy, now, tuning(policy))
}
