//! The pure planner: `decide(&view, &signals, &policy, now) -> Plan`.
//!
//! No I/O, no clock reads, no randomness: the same inputs always give the same plan. A policy
//! (`seed` or `target`) says how many RunPod GPUs demand wants; the shared part here turns that
//! into launch and terminate steps within the hard limits (`max_pods`, `max_usd_per_hour`,
//! `max_launches_per_tick`, counting pods still booting), never scales down on a stale signal,
//! and removes only pods past their warm-up grace and idle timeout.

mod cost;
pub mod offers;
mod plan;
mod seed;
mod series;
mod target;
mod view;

#[cfg(test)]
mod tests;

pub use plan::{Hold, Plan, Reason, Step};
pub use series::{Sample, Series, Signals};
pub use view::{ClusterView, PodTemplate, PodView, Policy, PolicyKind};

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::time::Duration;

use crate::model::{PodId, SignalKind, Timestamp, Usd};

/// What a policy asks for, before the shared limits are applied.
#[derive(Debug, Clone, PartialEq)]
struct Want {
    /// GPU workers demand needs in total, as the signals tell (a stale one at its last value):
    /// reported, and served to KEDA within [`served_gpus`]' ceiling.
    demand_gpus: u32,
    /// RunPod GPUs wanted (already clamped to the policy's pod range). A stale signal never
    /// raises this above the capacity that exists: it holds, it does not act.
    runpod_gpus: u32,
    /// Why capacity is added.
    reason: Reason,
    /// Removal rules, or `None` when this policy does not scale down now.
    scale_down: Option<ScaleDown>,
    /// Holds the policy itself reports.
    holds: Vec<Hold>,
}

/// When a surplus pod may be removed.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ScaleDown {
    idle_timeout: Duration,
    warmup_grace: Duration,
    /// Each pod waits its own share of `idle_timeout` ([`idle_share`]) instead of all of it.
    spread_idle: bool,
    /// Marginal pods under a continuing load wait longer, or `None`.
    steady: Option<SteadyLoad>,
}

/// Hysteresis for the marginal pods of a continuing load: while some pods are serving, up to
/// `per_serving` × their count (rounded up) of the idle pods, the last ones in removal order,
/// wait `idle_timeout` instead of the short one. A load that steps around a pod's worth then
/// keeps that pod instead of dropping and re-buying it; once no pod serves (a burst is over),
/// every idle pod is back on the short timeout.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SteadyLoad {
    idle_timeout: Duration,
    per_serving: f64,
}

/// A pod busy this recently is serving (a continuing load); one idle longer is idle. The
/// reconciler's health probes, which mark a pod busy, run at most 30 s apart.
const SERVING_WITHIN: Duration = Duration::from_secs(60);

/// The share of the break-even idle time a pod waits before it goes: between half and all of
/// it, drawn once per pod from a hash of its id (the same in a given build), following the
/// randomized ski-rental density `e^x / (e − 1)`. A burst's pods then leave over the second half of the break-even
/// time instead of all at its end, while a pod on a steady load is never dropped on its first
/// short idle spell.
fn idle_share(pod: &PodId) -> f64 {
    // SipHash with fixed keys (std's DefaultHasher): the same id gives the same share in a
    // given build, spread uniformly over ids.
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(&pod.0);
    let uniform = (hash >> 11) as f64 / (1u64 << 53) as f64;
    let ski_rental = (1.0 + uniform * (std::f64::consts::E - 1.0)).ln();
    0.5 + 0.5 * ski_rental
}

/// Decides what to do now. Pure: see the module documentation.
pub fn decide(view: &ClusterView, signals: &Signals, policy: &Policy, now: Timestamp) -> Plan {
    // A pod still not ready at the boot deadline counts as failed: it is no capacity (so the
    // plan replaces it) and it is terminated, like a dead pod.
    let overdue: Vec<(PodId, Duration)> = view
        .pods
        .iter()
        .filter(|p| p.is_boot_overdue(now, policy.boot_deadline))
        .map(|p| (p.id.clone(), now.saturating_since(p.created_at)))
        .collect();
    let adjusted;
    let view = if overdue.is_empty() {
        view
    } else {
        adjusted = without_capacity(view, &overdue);
        &adjusted
    };

    let capacity_pods = count(view.capacity_pods());
    let capacity_gpus: u32 = view.capacity_pods().map(|p| p.gpus).sum();
    let want = match policy.kind {
        PolicyKind::Seed => seed::want(view, signals, policy, now),
        PolicyKind::Target => target::want(view, signals, policy, now),
        PolicyKind::Cost => cost::want(view, signals, policy, now),
    };
    let mut plan = Plan {
        at: now,
        policy: policy.kind,
        demand_gpus: want.demand_gpus,
        served_gpus: served_gpus(want.demand_gpus, view, policy),
        baseline_gpus: view.baseline_gpus,
        desired_gpus: view.baseline_gpus.saturating_add(capacity_gpus),
        capacity_pods,
        target_pods: capacity_pods,
        steps: Vec::new(),
        holds: Vec::new(),
    };
    if !view.synced {
        plan.holds.push(Hold::NotSynced);
        return plan;
    }

    // Pods that exist but will never serve are always cleaned up: they can still bill.
    for pod in view.pods.iter().filter(|p| p.state.is_dead()) {
        plan.steps.push(Step::Terminate {
            pod: pod.id.clone(),
            reason: Reason::NotServing {
                state: pod.state.clone(),
            },
        });
    }
    for (pod, waited) in overdue {
        plan.steps.push(Step::Terminate {
            pod,
            reason: Reason::BootTimeout {
                waited: Duration::from_secs(waited.as_secs()),
            },
        });
    }

    let stale = stale_holds(signals, policy, now);
    plan.holds.extend(want.holds.iter().cloned());

    let mut remaining: Vec<&PodView> = view.capacity_pods().collect();
    let mut remaining_gpus = capacity_gpus;

    // Each pass below that removes pods puts `remaining` in its own order, and only when it
    // has something to remove: most decisions sort once (scale-down) or not at all.
    // Hard limit first: pods above max_pods go, whatever the signals say.
    let excess = capacity_pods.saturating_sub(policy.max_pods) as usize;
    if excess != 0 {
        remaining.sort_unstable_by(|a, b| removal_order(a, b));
    }
    for pod in remaining.drain(..excess) {
        remaining_gpus -= pod.gpus;
        plan.steps.push(Step::Terminate {
            pod: pod.id.clone(),
            reason: Reason::AboveMaximum {
                max_pods: policy.max_pods,
            },
        });
    }

    // Money is a hard limit too: when prices rose above the budget, idle pods go, the most
    // expensive first (busy ones keep their work; the budget then blocks every launch).
    let budget = policy.max_usd_per_hour.dollars() + Usd::EPSILON;
    let mut spend = view.usd_per_hour().dollars();
    if spend > budget {
        remaining.sort_unstable_by(|a, b| {
            b.usd_per_hour
                .dollars()
                .total_cmp(&a.usd_per_hour.dollars())
                .then_with(|| removal_order(a, b))
        });
    }
    remaining.retain(|pod| {
        let idle =
            !pod.is_warming(now, policy.warmup_grace) && pod.idle_for(now) >= policy.idle_timeout;
        if spend <= budget || !idle {
            return true;
        }
        spend -= pod.usd_per_hour.dollars();
        remaining_gpus -= pod.gpus;
        plan.steps.push(Step::Terminate {
            pod: pod.id.clone(),
            reason: Reason::OverBudget {
                max_usd_per_hour: policy.max_usd_per_hour,
            },
        });
        false
    });

    // Each pass is a no-op unless it applies: launch adds nothing when the want is covered,
    // scale_down removes nothing unless what remains still covers the want.
    let launched = launch(
        view,
        policy,
        want.runpod_gpus.saturating_sub(remaining_gpus),
        &want.reason,
        &mut plan,
    );
    if let (true, Some(rules)) = (stale.is_empty(), want.scale_down) {
        scale_down(
            &mut remaining,
            &mut remaining_gpus,
            want.runpod_gpus,
            policy.min_pods,
            rules,
            now,
            &mut plan,
        );
    }
    plan.holds.extend(stale);
    let mut seen = Vec::with_capacity(plan.holds.len());
    plan.holds.retain(|h| {
        let new = !seen.contains(h);
        if new {
            seen.push(h.clone());
        }
        new
    });

    plan.target_pods = count(remaining.iter()) + launched;
    plan.desired_gpus = view
        .baseline_gpus
        .saturating_add(remaining_gpus)
        .saturating_add(launched.saturating_mul(policy.pod.gpus));
    plan
}

/// The view with the `pods` marked as no longer capacity (they still exist and bill).
fn without_capacity(view: &ClusterView, pods: &[(PodId, Duration)]) -> ClusterView {
    let mut adjusted = view.clone();
    for pod in &mut adjusted.pods {
        if pods.iter().any(|(id, _)| *id == pod.id) {
            pod.draining = true;
        }
    }
    adjusted
}

/// The value served to KEDA: `demand` limited only by what can ever be had, the baseline plus
/// `max_pods` pods of the template (as many as `max_usd_per_hour` pays for), or the capacity
/// that exists now when that is more.
fn served_gpus(demand: u32, view: &ClusterView, policy: &Policy) -> u32 {
    let price = policy.pod.usd_per_hour.dollars();
    let affordable = if price <= 0.0 {
        u32::MAX
    } else {
        // Truncation is the intent: whole pods within the budget.
        ((policy.max_usd_per_hour.dollars() + Usd::EPSILON) / price)
            .floor()
            .clamp(0.0, f64::from(u32::MAX)) as u32
    };
    let runpod_ever = policy
        .max_pods
        .min(affordable)
        .saturating_mul(policy.pod.gpus.max(1));
    let capacity: u32 = view.capacity_pods().map(|p| p.gpus).sum();
    demand.min(view.baseline_gpus.saturating_add(runpod_ever.max(capacity)))
}

fn count<I: Iterator>(it: I) -> u32 {
    u32::try_from(it.count()).unwrap_or(u32::MAX)
}

/// Holds for every signal that is stale or was never sampled.
fn stale_holds(signals: &Signals, policy: &Policy, now: Timestamp) -> Vec<Hold> {
    let mut holds = Vec::new();
    let named = [
        (SignalKind::QueueLag, Some(&signals.queue)),
        (SignalKind::LatencyP95, signals.latency.as_ref()),
    ];
    for (name, series) in named {
        let Some(series) = series else { continue };
        if !series.is_fresh(now, policy.stale_after_intervals) {
            holds.push(Hold::StaleSignal {
                signal: name,
                age: series.age(now),
            });
        }
    }
    holds
}

/// Adds launch steps for `missing_gpus`, within max_pods, budget and launch rate. Returns the
/// number of pods launched.
fn launch(
    view: &ClusterView,
    policy: &Policy,
    missing_gpus: u32,
    reason: &Reason,
    plan: &mut Plan,
) -> u32 {
    let per_pod = policy.pod.gpus.max(1);
    let wanted = missing_gpus.div_ceil(per_pod);
    let existing = count(view.existing_pods());
    let by_pods = policy.max_pods.saturating_sub(existing);
    let spend = view.usd_per_hour();
    let headroom = policy.max_usd_per_hour.dollars() - spend.dollars() + Usd::EPSILON;
    let price = policy.pod.usd_per_hour.dollars();
    let by_budget = if price <= 0.0 {
        u32::MAX
    } else if headroom <= 0.0 {
        0
    } else {
        // Truncation is the intent: only whole pods that fit in the remaining budget.
        (headroom / price).floor().min(f64::from(u32::MAX)) as u32
    };
    let n = wanted
        .min(by_pods)
        .min(by_budget)
        .min(policy.max_launches_per_tick);
    // Each limit that cuts the launch short says so (none does when all of it fits).
    if by_pods < wanted {
        plan.holds.push(Hold::MaxPods {
            max_pods: policy.max_pods,
        });
    }
    if by_budget < wanted {
        plan.holds.push(Hold::Budget {
            max_usd_per_hour: policy.max_usd_per_hour,
            current: spend,
        });
    }
    if policy.max_launches_per_tick < wanted.min(by_pods).min(by_budget) {
        plan.holds.push(Hold::LaunchRate {
            max_launches_per_tick: policy.max_launches_per_tick,
        });
    }
    for _ in 0..n {
        plan.steps.push(Step::Launch {
            gpu_type: policy.pod.gpu_type.clone(),
            gpus: policy.pod.gpus,
            usd_per_hour: policy.pod.usd_per_hour,
            reason: reason.clone(),
        });
    }
    n
}

/// Removes eligible pods, most expensive first, while the rest still covers `want_gpus` and
/// `min_pods`. An eligible pod is past its warm-up grace and idle for the idle timeout.
fn scale_down(
    remaining: &mut Vec<&PodView>,
    remaining_gpus: &mut u32,
    want_gpus: u32,
    min_pods: u32,
    rules: ScaleDown,
    now: Timestamp,
    plan: &mut Plan,
) {
    // Below the want nothing can go: no pod to remove, no pod waiting for its idle time.
    if *remaining_gpus < want_gpus {
        return;
    }
    // In order already when the max_pods pass sorted it and the budget pass did not (the
    // check is linear, the sort is not).
    if !remaining.is_sorted_by(|a, b| removal_order(a, b).is_le()) {
        remaining.sort_unstable_by(|a, b| removal_order(a, b));
    }
    let mut pods_left = count(remaining.iter());
    let mut not_idle = 0u32;
    // A warmed-up pod is serving when busy within SERVING_WITHIN, else idle. Under a steady
    // load the last idle pods in removal order are its marginal ones: the first
    // `short_first` idle pods keep the short timeout, the rest wait the steady one.
    let idle_now =
        |p: &PodView| !p.is_warming(now, rules.warmup_grace) && p.idle_for(now) >= SERVING_WITHIN;
    let mut steady = rules.steady.map(|s| {
        let warm = count(
            remaining
                .iter()
                .filter(|p| !p.is_warming(now, rules.warmup_grace)),
        );
        let idle = count(remaining.iter().filter(|p| idle_now(p)));
        let kept = (f64::from(warm - idle) * s.per_serving)
            .ceil()
            .min(f64::from(u32::MAX)) as u32;
        (s.idle_timeout, idle.saturating_sub(kept))
    });
    remaining.retain(|pod| {
        let marginal = match steady.as_mut() {
            Some((timeout, short_first)) if idle_now(pod) => {
                if *short_first > 0 {
                    *short_first -= 1;
                    None
                } else {
                    Some(*timeout)
                }
            }
            _ => None,
        };
        let covers = *remaining_gpus >= want_gpus.saturating_add(pod.gpus);
        if !covers || pods_left <= min_pods {
            return true;
        }
        let idle_for = pod.idle_for(now);
        let timeout = if let Some(steady) = marginal {
            steady
        } else if rules.spread_idle {
            rules.idle_timeout.mul_f64(idle_share(&pod.id))
        } else {
            rules.idle_timeout
        };
        if pod.is_warming(now, rules.warmup_grace) || idle_for < timeout {
            not_idle += 1;
            return true;
        }
        *remaining_gpus -= pod.gpus;
        pods_left -= 1;
        plan.steps.push(Step::Terminate {
            pod: pod.id.clone(),
            reason: Reason::Surplus {
                target_pods: pods_left,
                idle_for: Duration::from_secs(idle_for.as_secs()),
            },
        });
        false
    });
    if not_idle > 0 {
        plan.holds.push(Hold::WaitingForIdle { pods: not_idle });
    }
}

/// Removal preference: most expensive per GPU first, then the newest, then by id.
fn removal_order(a: &PodView, b: &PodView) -> std::cmp::Ordering {
    let per_gpu = |p: &PodView| p.usd_per_hour.dollars() / f64::from(p.gpus.max(1));
    per_gpu(b)
        .total_cmp(&per_gpu(a))
        .then_with(|| b.created_at.cmp(&a.created_at))
        .then_with(|| a.id.cmp(&b.id))
}
