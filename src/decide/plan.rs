//! The planner's output: data describing what to do and why, rendered for humans by `Display`
//! and for machines by serde.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::view::PolicyKind;
use crate::model::{GpuTypeId, PodId, PodState, SignalKind, Timestamp, Usd};

/// What the planner wants done in one tick.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// When it was decided.
    pub at: Timestamp,
    /// The rule that decided.
    pub policy: PolicyKind,
    /// GPU workers demand asks for, before limits (what the signals say is needed).
    pub demand_gpus: u32,
    /// The `gpu-demand` metric served to KEDA: `demand_gpus` limited only by what can ever be
    /// had (the baseline plus `max_pods` pods, as far as `max_usd_per_hour` pays for them),
    /// never by the per-tick launch rate or by pods still booting. 0 when there is no work.
    pub served_gpus: u32,
    /// GPU workers the local baseline covers.
    pub baseline_gpus: u32,
    /// GPU workers that will exist once the plan is applied: baseline plus RunPod capacity
    /// (what this tick leaves, launch rate and limits included).
    pub desired_gpus: u32,
    /// RunPod pods counted as capacity before the plan.
    pub capacity_pods: u32,
    /// RunPod pods counted as capacity after the plan.
    pub target_pods: u32,
    /// Actions, in order.
    pub steps: Vec<Step>,
    /// Why something the demand asked for is not (yet) done.
    pub holds: Vec<Hold>,
}

impl Plan {
    /// True when the plan changes nothing.
    pub fn is_noop(&self) -> bool {
        self.steps.is_empty()
    }

    /// Number of launch steps.
    pub fn launches(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Launch { .. }))
            .count()
    }

    /// Number of terminate steps.
    pub fn terminations(&self) -> usize {
        self.steps.len() - self.launches()
    }
}

/// One action.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Step {
    /// Create one RunPod pod.
    Launch {
        /// GPU type to request.
        gpu_type: GpuTypeId,
        /// GPUs in the pod.
        gpus: u32,
        /// Expected price per hour.
        usd_per_hour: Usd,
        /// Why.
        reason: Reason,
    },
    /// Drain and terminate one RunPod pod.
    Terminate {
        /// Which pod.
        pod: PodId,
        /// Why.
        reason: Reason,
    },
}

/// Why a step is taken.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// Queue lag needs more GPU workers than exist.
    QueueLag {
        /// Messages waiting.
        lag: f64,
        /// GPU workers that lag needs.
        needed_gpus: u32,
    },
    /// p95 latency above the objective.
    LatencyAboveSlo {
        /// Observed p95 (s).
        p95_seconds: f64,
        /// Objective (s).
        slo_seconds: f64,
    },
    /// Keeping the configured minimum.
    BelowMinimum {
        /// The minimum.
        min_pods: u32,
    },
    /// More capacity than demand, and this pod has been idle long enough.
    Surplus {
        /// Pods wanted.
        target_pods: u32,
        /// How long the pod has been idle.
        #[serde(with = "humantime_serde")]
        idle_for: Duration,
    },
    /// The pod is above the configured maximum.
    AboveMaximum {
        /// The maximum.
        max_pods: u32,
    },
    /// The pod exists but will not serve (exited or failed) and may still bill.
    NotServing {
        /// Its state.
        state: PodState,
    },
    /// Spend is above `max_usd_per_hour` (prices rose): an idle pod goes, the dearest first.
    OverBudget {
        /// The limit.
        max_usd_per_hour: Usd,
    },
    /// The pod did not become ready within the boot deadline: counted as failed and replaced.
    BootTimeout {
        /// How long it has existed without becoming ready.
        #[serde(with = "humantime_serde")]
        waited: Duration,
    },
}

/// Why the plan does less than demand asks.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Hold {
    /// The provider has not been listed completely since start.
    NotSynced,
    /// A signal is stale or missing: no scale-down.
    StaleSignal {
        /// Which signal.
        signal: SignalKind,
        /// Age of its newest sample (`None`: never sampled).
        #[serde(with = "humantime_serde")]
        age: Option<Duration>,
    },
    /// `max_pods` reached.
    MaxPods {
        /// The limit.
        max_pods: u32,
    },
    /// `max_usd_per_hour` would be exceeded.
    Budget {
        /// The limit.
        max_usd_per_hour: Usd,
        /// Current spend rate.
        current: Usd,
    },
    /// `max_launches_per_tick` reached; the next tick continues.
    LaunchRate {
        /// The limit.
        max_launches_per_tick: u32,
    },
    /// Demand within the stabilization window was higher: no scale-down yet.
    Stabilizing {
        /// Pods that window still asks for.
        window_pods: u32,
    },
    /// Surplus pods are not idle long enough, or still warming up.
    WaitingForIdle {
        /// Surplus pods that cannot be removed yet.
        pods: u32,
    },
    /// New capacity is warming up; latency is not judged until it is ready.
    WarmingUp {
        /// Pods warming up.
        pods: u32,
    },
}

impl Hold {
    /// A short stable name of the hold's kind (the `kind` of its JSON form), for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Hold::NotSynced => "not_synced",
            Hold::StaleSignal { .. } => "stale_signal",
            Hold::MaxPods { .. } => "max_pods",
            Hold::Budget { .. } => "budget",
            Hold::LaunchRate { .. } => "launch_rate",
            Hold::Stabilizing { .. } => "stabilizing",
            Hold::WaitingForIdle { .. } => "waiting_for_idle",
            Hold::WarmingUp { .. } => "warming_up",
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "plan at {} (policy {}): demand {} GPUs (served {}), baseline {}, RunPod pods {} -> {}, desired {} GPUs",
            self.at,
            self.policy,
            self.demand_gpus,
            self.served_gpus,
            self.baseline_gpus,
            self.capacity_pods,
            self.target_pods,
            self.desired_gpus
        )?;
        if self.steps.is_empty() {
            writeln!(f, "  (no steps)")?;
        }
        // Identical consecutive steps (a burst of launches) render as one line with a count.
        let mut i = 0;
        while i < self.steps.len() {
            let step = &self.steps[i];
            let run = self.steps[i..].iter().take_while(|s| *s == step).count();
            if run > 1 {
                writeln!(f, "  {run} x {step}")?;
            } else {
                writeln!(f, "  {step}")?;
            }
            i += run;
        }
        for hold in &self.holds {
            writeln!(f, "  hold: {hold}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Launch {
                gpu_type,
                gpus,
                usd_per_hour,
                reason,
            } => write!(f, "launch {gpus}x {gpu_type} at {usd_per_hour}/h: {reason}"),
            Step::Terminate { pod, reason } => write!(f, "terminate {pod}: {reason}"),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::QueueLag { lag, needed_gpus } => {
                write!(f, "queue lag {lag} needs {needed_gpus} GPU workers")
            }
            Reason::LatencyAboveSlo {
                p95_seconds,
                slo_seconds,
            } => write!(f, "p95 {p95_seconds:.3}s above SLO {slo_seconds:.3}s"),
            Reason::BelowMinimum { min_pods } => write!(f, "keeping min_pods {min_pods}"),
            Reason::Surplus {
                target_pods,
                idle_for,
            } => write!(
                f,
                "surplus (target {target_pods} pods), idle for {}",
                humantime::format_duration(*idle_for)
            ),
            Reason::AboveMaximum { max_pods } => write!(f, "above max_pods {max_pods}"),
            Reason::NotServing { state } => write!(f, "pod is {state} and will not serve"),
            Reason::OverBudget { max_usd_per_hour } => {
                write!(
                    f,
                    "spend above max_usd_per_hour {max_usd_per_hour}/h; idle, dearest first"
                )
            }
            Reason::BootTimeout { waited } => write!(
                f,
                "not ready after {}: counted as failed",
                humantime::format_duration(Duration::from_secs(waited.as_secs()))
            ),
        }
    }
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::NotSynced => write!(f, "provider not yet listed since start; no action"),
            Hold::StaleSignal { signal, age: None } => {
                write!(f, "{} never sampled; no scale-down", signal.describe())
            }
            Hold::StaleSignal {
                signal,
                age: Some(age),
            } => write!(
                f,
                "{} stale (newest sample {} old); no scale-down",
                signal.describe(),
                humantime::format_duration(Duration::from_secs(age.as_secs()))
            ),
            Hold::MaxPods { max_pods } => write!(f, "max_pods {max_pods} reached"),
            Hold::Budget {
                max_usd_per_hour,
                current,
            } => write!(
                f,
                "budget: spending {current}/h, max_usd_per_hour {max_usd_per_hour}/h"
            ),
            Hold::LaunchRate {
                max_launches_per_tick,
            } => write!(
                f,
                "max_launches_per_tick {max_launches_per_tick} reached; next tick continues"
            ),
            Hold::Stabilizing { window_pods } => {
                write!(f, "stabilization window still asks for {window_pods} pods")
            }
            Hold::WaitingForIdle { pods } => {
                write!(f, "{pods} surplus pods not idle long enough yet")
            }
            Hold::WarmingUp { pods } => {
                write!(
                    f,
                    "{pods} pods warming up; latency judged once they are ready"
                )
            }
        }
    }
}
