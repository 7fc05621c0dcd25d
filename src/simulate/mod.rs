//! Trace simulator: replays a workload trace through the same pure planner
//! ([`crate::decide::decide`]) that runs in production, with a simulated clock and a simple pod
//! model, and reports what each policy would have cost and how often it missed the SLO.
//!
//! The model, stepped every [`SimParams::tick`] from the first row's time to the end of the last
//! row's interval:
//!
//! * **Arrivals.** Each row's `arriving_jobs` are spread uniformly over its interval and join a
//!   fluid queue (fractional jobs).
//! * **Capacity.** Baseline GPUs plus the GPUs of running pods each serve
//!   [`SimParams::jobs_per_gpu_per_minute`]. Work goes to the baseline first, then to pods in
//!   creation order; a pod that served anything in a tick counts as busy at that tick.
//! * **Pods.** A launch creates a pod that boots for [`SimParams::boot_delay`] (no capacity, but
//!   billed) and then runs; a terminate removes it at once. Every existing pod costs its `$/h`.
//! * **Signals.** At each tick the planner sees the queue backlog (jobs arrived and not yet
//!   served) and a modeled p95 latency: the service-time p95 (the trace's `p95_s`, else
//!   [`SimParams::service_seconds`]) plus the time the backlog takes to drain at the current
//!   capacity. Both go through [`crate::decide::Series`], exactly as in production.
//! * **SLO.** A wall-clock minute (counted from trace start) is a violation minute when the
//!   modeled p95 of any tick in it is above the policy's `slo_p95_seconds`.
//!
//! Each tick: observe → `decide` → apply the plan → serve work → accrue cost → record the SLO.
//! Everything is pure and deterministic: no wall clock, no randomness.

mod bound;
mod trace;

#[cfg(test)]
mod tests;

pub use bound::{lower_bound, lower_bound_where, BoundError, LowerBound};
pub use trace::{TimelineError, TimelineWriter, Trace, TraceError};

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::decide::{
    decide, ClusterView, PodTemplate, PodView, Policy, PolicyKind, Sample, Series, Signals, Step,
};
use crate::model::{GpuTypeId, PodId, PodState, Timestamp, Usd};

/// Modeled queue wait when work is waiting and nothing can serve it (seconds).
const NO_CAPACITY_WAIT_S: f64 = 3600.0;
/// Served work below this many jobs does not make a pod busy (float dust).
const BUSY_EPSILON: f64 = 1e-9;

/// Knobs of the simulated world (not of the policy).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimParams {
    /// Simulated time between two planner runs (default 15 s; below 1 ms counts as 1 ms).
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// Time from launch until a pod serves work (default 120 s). It bills while booting.
    #[serde(with = "humantime_serde")]
    pub boot_delay: Duration,
    /// Jobs one GPU finishes per minute (default 4.0; negative or non-finite counts as 0).
    pub jobs_per_gpu_per_minute: f64,
    /// Service-time p95 in seconds when the trace has no `p95_s` for a row (default 10.0;
    /// negative or non-finite counts as 0).
    pub service_seconds: f64,
    /// GPU workers of the always-on local baseline (default 2, a small local pool).
    pub baseline_gpus: u32,
}

impl Default for SimParams {
    fn default() -> Self {
        SimParams {
            tick: Duration::from_secs(15),
            boot_delay: Duration::from_secs(120),
            jobs_per_gpu_per_minute: 4.0,
            service_seconds: 10.0,
            baseline_gpus: 2,
        }
    }
}

/// The reference policy for comparisons when no configuration is given: the target policy,
/// 0 to 20 one-GPU `NVIDIA RTX A5000` pods at $0.26/h, at most $12/h and 5 launches per tick,
/// 3 jobs of lag per GPU, a 60 s p95 SLO with 1-GPU latency steps, 300 s scale-down
/// stabilization and idle timeout, 180 s warm-up grace, a 10-minute boot deadline, stale after 3 intervals. Change `kind`
/// to compare policies.
pub fn default_policy() -> Policy {
    Policy {
        kind: PolicyKind::Target,
        min_pods: 0,
        max_pods: 20,
        max_usd_per_hour: Usd(12.0),
        max_launches_per_tick: 5,
        pod: PodTemplate {
            gpu_type: GpuTypeId::from("NVIDIA RTX A5000"),
            gpus: 1,
            usd_per_hour: Usd(0.26),
        },
        // A GPU clears 4 jobs a minute (SimParams::default), so with a 10 s service time a
        // backlog of 3 jobs per GPU is what it can absorb within the 60 s objective.
        lag_per_gpu: 3.0,
        slo_p95_seconds: 60.0,
        latency_step_gpus: 1,
        scale_down_stabilization: Duration::from_secs(300),
        idle_timeout: Duration::from_secs(300),
        warmup_grace: Duration::from_secs(180),
        boot_deadline: Duration::from_secs(600),
        stale_after_intervals: 3,
    }
}

/// The outcome of replaying one trace with one policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReport {
    /// The policy that decided.
    pub policy: PolicyKind,
    /// Dollars spent on RunPod pods (booting ones included).
    pub total_usd: f64,
    /// Wall-clock minutes in which the modeled p95 was above the SLO at least once.
    pub slo_violation_minutes: u64,
    /// Pods launched.
    pub pod_creations: u64,
    /// Most pods existing at the same time.
    pub peak_pods: u32,
    /// Jobs the trace brought.
    pub jobs_arrived: f64,
    /// Jobs served by the end of the trace.
    pub jobs_completed: f64,
    /// Largest backlog (jobs waiting) at the end of any tick.
    pub max_queue: f64,
    /// Simulated time, in minutes.
    pub duration_minutes: f64,
}

/// One simulated tick of a replay: what the planner saw, what it did and what the world did
/// ([`replay`]; written as CSV by [`TimelineWriter`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TickRecord {
    /// Tick start, on the trace's clock.
    pub at: Timestamp,
    /// The wall-clock minute (from trace start) the tick falls in.
    pub minute: u64,
    /// Backlog the planner saw.
    pub queue_observed: f64,
    /// Modeled p95 the planner saw (seconds).
    pub p95_seconds: f64,
    /// Whether that p95 was above the objective (the tick's minute is a violation minute).
    pub violated: bool,
    /// Pods launched by this tick's plan.
    pub launched: usize,
    /// Pods terminated by this tick's plan.
    pub terminated: usize,
    /// Pods existing after the plan.
    pub pods: usize,
    /// GPUs of running pods while serving.
    pub running_gpus: u32,
    /// Spend rate of existing pods after the plan.
    pub usd_per_hour: f64,
    /// Jobs served by the baseline.
    pub served_baseline: f64,
    /// Jobs served by pods.
    pub served_pods: f64,
    /// Backlog after serving.
    pub queue_after: f64,
}

/// A simulated RunPod pod.
#[derive(Debug, Clone)]
struct SimPod {
    id: PodId,
    state: PodState,
    gpus: u32,
    usd_per_hour: Usd,
    created_at: Timestamp,
    last_busy_at: Option<Timestamp>,
}

impl SimPod {
    fn view(&self) -> PodView {
        PodView {
            id: self.id.clone(),
            state: self.state.clone(),
            gpus: self.gpus,
            usd_per_hour: self.usd_per_hour,
            created_at: self.created_at,
            ready: self.state == PodState::Running,
            last_busy_at: self.last_busy_at,
            draining: false,
        }
    }
}

/// Walks the trace's rows forward as the simulated clock advances.
struct Cursor<'a> {
    trace: &'a Trace,
    next: usize,
}

impl Cursor<'_> {
    /// Skips rows that end at or before `t`.
    fn skip_to(&mut self, t: u64) {
        let ended = (self.next..self.trace.rows.len())
            .take_while(|&i| self.trace.row_end_ms(i) <= t)
            .count();
        self.next += ended;
    }

    /// The service-time p95 the trace gives for the row containing `t`, if any.
    fn p95_at(&mut self, t: u64) -> Option<f64> {
        self.skip_to(t);
        self.trace
            .rows
            .get(self.next)
            .filter(|r| r.time_ms <= t)
            .and_then(|r| r.p95_s)
    }

    /// Jobs arriving in `[from, to)`, each row's spread uniformly over its interval (rows
    /// last at least 1 ms: times are strictly increasing).
    fn arrivals(&mut self, from: u64, to: u64) -> f64 {
        self.skip_to(from);
        let mut jobs = 0.0;
        let mut i = self.next;
        while let Some(row) = self.trace.rows.get(i) {
            if row.time_ms >= to {
                break;
            }
            let end = self.trace.row_end_ms(i);
            let overlap = to.min(end).saturating_sub(from.max(row.time_ms));
            let length = end.saturating_sub(row.time_ms).max(1);
            jobs += row.arriving_jobs * (overlap as f64 / length as f64);
            i += 1;
        }
        jobs
    }
}

/// What the world brings in one simulated tick, whatever the policy: the same for every
/// policy and for the lower bound.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tick {
    /// Start, milliseconds on the trace's clock.
    at_ms: u64,
    /// Length in milliseconds (the last tick may be shorter).
    dt_ms: u64,
    /// Jobs arriving during the tick.
    arrivals: f64,
    /// Service-time p95 at the tick's start (seconds).
    service_s: f64,
}

impl Tick {
    /// Length in seconds.
    fn dt_s(&self) -> f64 {
        self.dt_ms as f64 / 1000.0
    }
}

/// The simulated tick length in milliseconds (at least 1).
fn tick_ms(params: &SimParams) -> u64 {
    u64::try_from(params.tick.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The ticks from the first row's time to the end of the last row's interval.
fn ticks(trace: &Trace, params: &SimParams) -> Vec<Tick> {
    let tick_ms = tick_ms(params);
    let service_s = sane(params.service_seconds);
    let end_ms = trace.end_ms();
    let mut cursor = Cursor { trace, next: 0 };
    let mut ticks = Vec::new();
    let mut t = trace.start_ms();
    while t < end_ms {
        let dt_ms = tick_ms.min(end_ms - t);
        ticks.push(Tick {
            at_ms: t,
            dt_ms,
            service_s: cursor.p95_at(t).unwrap_or(service_s),
            arrivals: cursor.arrivals(t, t + dt_ms),
        });
        t = t.saturating_add(tick_ms);
    }
    ticks
}

/// Modeled p95 (seconds) of a tick that starts with `queue` jobs waiting and `gpus` serving
/// at `per_gpu_per_s` jobs per second each: service time plus the time the backlog takes.
fn modeled_p95(service_s: f64, queue: f64, gpus: u32, per_gpu_per_s: f64) -> f64 {
    let capacity_per_s = f64::from(gpus) * per_gpu_per_s;
    let wait_s = if queue <= 0.0 {
        0.0
    } else if capacity_per_s <= 0.0 {
        NO_CAPACITY_WAIT_S
    } else {
        queue / capacity_per_s
    };
    service_s + wait_s
}

/// The wall-clock minute (from trace start) a tick falls in.
fn minute_of(tick: &Tick, start_ms: u64) -> u64 {
    (tick.at_ms - start_ms) / 60_000
}

/// Replays `trace` through [`crate::decide::decide`] with `policy`; see the module
/// documentation for the model. Pure and deterministic.
pub fn simulate(trace: &Trace, policy: &Policy, params: &SimParams) -> SimReport {
    replay(trace, policy, params).0
}

/// Served work this small is float dust: it does not make a pod busy.
fn is_dust(jobs: f64) -> bool {
    jobs <= BUSY_EPSILON
}

/// Non-negative finite, else 0.
fn sane(x: f64) -> f64 {
    if x.is_finite() {
        x.max(0.0)
    } else {
        0.0
    }
}

/// [`simulate`], also returning the per-tick timeline (one record per tick, in order).
pub fn replay(trace: &Trace, policy: &Policy, params: &SimParams) -> (SimReport, Vec<TickRecord>) {
    let tick = Duration::from_millis(tick_ms(params));
    let per_gpu_per_s = sane(params.jobs_per_gpu_per_minute) / 60.0;
    let baseline = params.baseline_gpus;
    let start_ms = trace.start_ms();
    let end_ms = trace.end_ms();

    // Retention covers the stabilization window plus a margin of a few ticks.
    let retention = policy
        .scale_down_stabilization
        .saturating_add(tick.saturating_mul(4))
        .saturating_add(Duration::from_secs(60));
    let mut signals = Signals {
        queue: Series::new(tick, retention),
        latency: Some(Series::new(tick, retention)),
    };

    let mut pods: Vec<SimPod> = Vec::new();
    let mut next_pod = 0u64;
    let mut queue = 0.0_f64;
    let mut timeline = Vec::new();
    let mut report = SimReport {
        policy: policy.kind,
        total_usd: 0.0,
        slo_violation_minutes: 0,
        pod_creations: 0,
        peak_pods: 0,
        jobs_arrived: 0.0,
        jobs_completed: 0.0,
        max_queue: 0.0,
        duration_minutes: end_ms.saturating_sub(start_ms) as f64 / 60_000.0,
    };
    let mut last_violation_minute: Option<u64> = None;

    let boot = |pods: &mut Vec<SimPod>, now: Timestamp| {
        for pod in pods.iter_mut() {
            if pod.state == PodState::Provisioning && now >= pod.created_at.plus(params.boot_delay)
            {
                pod.state = PodState::Running;
            }
        }
    };
    let running_gpus = |pods: &[SimPod]| -> u32 {
        pods.iter()
            .filter(|p| p.state == PodState::Running)
            .map(|p| p.gpus)
            .fold(0u32, u32::saturating_add)
    };

    for input in ticks(trace, params) {
        let now = Timestamp::from_millis(input.at_ms);
        let dt_s = input.dt_s();

        // Observe.
        boot(&mut pods, now);
        let queue_observed = queue;
        let p95 = modeled_p95(
            input.service_s,
            queue,
            baseline.saturating_add(running_gpus(&pods)),
            per_gpu_per_s,
        );
        signals.queue.push(Sample::at(queue, now));
        if let Some(latency) = signals.latency.as_mut() {
            latency.push(Sample::at(p95, now));
        }

        // Decide and apply.
        let view = ClusterView {
            synced: true,
            baseline_gpus: baseline,
            pods: pods.iter().map(SimPod::view).collect(),
        };
        let plan = decide(&view, &signals, policy, now);
        let mut launched = 0;
        let mut terminated = 0;
        for step in plan.steps {
            match step {
                Step::Launch {
                    gpus, usd_per_hour, ..
                } => {
                    next_pod += 1;
                    launched += 1;
                    report.pod_creations += 1;
                    pods.push(SimPod {
                        id: PodId(format!("sim-{next_pod}")),
                        state: PodState::Provisioning,
                        gpus,
                        usd_per_hour,
                        created_at: now,
                        last_busy_at: None,
                    });
                }
                Step::Terminate { pod, .. } => {
                    let before = pods.len();
                    pods.retain(|p| p.id != pod);
                    terminated += before - pods.len();
                }
            }
        }
        boot(&mut pods, now);
        let existing = u32::try_from(pods.len()).unwrap_or(u32::MAX);
        report.peak_pods = report.peak_pods.max(existing);

        // Serve: arrivals join the queue, the baseline serves first, then pods in creation order.
        report.jobs_arrived += input.arrivals;
        queue += input.arrivals;
        let per_gpu_tick = per_gpu_per_s * dt_s;
        let served_baseline = queue.min(f64::from(baseline) * per_gpu_tick);
        queue -= served_baseline;
        let mut served_pods = 0.0;
        for pod in pods.iter_mut().filter(|p| p.state == PodState::Running) {
            let served = queue.min(f64::from(pod.gpus) * per_gpu_tick);
            if !is_dust(served) {
                pod.last_busy_at = Some(now);
            }
            queue -= served;
            served_pods += served;
        }
        queue = queue.max(0.0);
        report.jobs_completed += served_baseline + served_pods;
        report.max_queue = report.max_queue.max(queue);

        // Cost.
        // An empty f64 sum is -0.0; adding 0.0 makes it the 0.0 a reader expects.
        let usd_per_hour = pods.iter().map(|p| p.usd_per_hour.dollars()).sum::<f64>() + 0.0;
        report.total_usd += usd_per_hour * dt_s / 3600.0;

        // SLO.
        let minute = minute_of(&input, start_ms);
        let violated = p95 > policy.slo_p95_seconds;
        if violated && last_violation_minute != Some(minute) {
            last_violation_minute = Some(minute);
            report.slo_violation_minutes += 1;
        }

        timeline.push(TickRecord {
            at: now,
            minute,
            queue_observed,
            p95_seconds: p95,
            violated,
            launched,
            terminated,
            pods: pods.len(),
            running_gpus: running_gpus(&pods),
            usd_per_hour,
            served_baseline,
            served_pods,
            queue_after: queue,
        });
    }
    (report, timeline)
}

/// One trace's comparison: each policy's replay and the clairvoyant lower bound.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// The trace's name (its file stem).
    pub trace: String,
    /// The least any schedule could have spent ([`lower_bound`]); `None` when it was not
    /// asked for or the solver failed (see `bound_error`).
    pub bound: Option<LowerBound>,
    /// Why there is no bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound_error: Option<String>,
    /// One replay per policy kind, in the order asked.
    pub results: Vec<SimReport>,
    /// Each replay's per-tick timeline, in the order of `results`, when asked for (else empty).
    #[serde(skip)]
    pub timelines: Vec<Vec<TickRecord>>,
}

/// What [`compare`] computes beside each policy's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extras {
    /// The clairvoyant lower bound: a linear program, seconds on a week-long trace where the
    /// replays take milliseconds.
    pub bound: bool,
    /// Each replay's per-tick timeline ([`Comparison::timelines`]).
    pub timelines: bool,
}

/// Replays `trace` with `policy` once per kind in `kinds` and adds the `extras` asked for: the
/// lower bound for the policy's limits and pod template, the replays' timelines.
pub fn compare(
    name: &str,
    trace: &Trace,
    policy: &Policy,
    kinds: &[PolicyKind],
    params: &SimParams,
    extras: Extras,
) -> Comparison {
    let mut results = Vec::with_capacity(kinds.len());
    let mut timelines = Vec::new();
    for &kind in kinds {
        let policy = Policy {
            kind,
            ..policy.clone()
        };
        let (report, timeline) = replay(trace, &policy, params);
        results.push(report);
        if extras.timelines {
            timelines.push(timeline);
        }
    }
    let (bound, bound_error) = if !extras.bound {
        (None, None)
    } else {
        match lower_bound(trace, policy, params) {
            Ok(bound) => (Some(bound), None),
            Err(e) => (None, Some(e.to_string())),
        }
    };
    Comparison {
        trace: name.to_owned(),
        bound,
        bound_error,
        results,
        timelines,
    }
}

/// `usd / bound` to two decimals, or `-` when there is no positive bound.
fn ratio(usd: f64, bound: Option<&LowerBound>) -> String {
    match bound {
        Some(b) if b.usd > 0.0 => format!("{:.2}", usd / b.usd),
        _ => "-".to_owned(),
    }
}

/// A side-by-side text table: per trace, one row per policy and one for the lower bound
/// (`bound`), columns aligned; then one note per trace whose SLO no schedule can meet
/// throughout, or whose bound failed.
pub fn render_table(comparisons: &[Comparison]) -> String {
    const HEADER: [&str; 11] = [
        "trace",
        "policy",
        "total $",
        "$ / bound",
        "SLO-viol min",
        "pod creations",
        "peak pods",
        "jobs arrived",
        "jobs done",
        "max queue",
        "minutes",
    ];
    let mut rows: Vec<[String; 11]> = vec![HEADER.map(str::to_owned)];
    let mut notes = Vec::new();
    for c in comparisons {
        let bound = c.bound.as_ref();
        for r in &c.results {
            rows.push([
                c.trace.clone(),
                r.policy.to_string(),
                format!("{:.2}", r.total_usd),
                ratio(r.total_usd, bound),
                r.slo_violation_minutes.to_string(),
                r.pod_creations.to_string(),
                r.peak_pods.to_string(),
                format!("{:.0}", r.jobs_arrived),
                format!("{:.0}", r.jobs_completed),
                format!("{:.1}", r.max_queue),
                format!("{:.0}", r.duration_minutes),
            ]);
        }
        let dash = || "-".to_owned();
        match (bound, &c.bound_error) {
            (Some(b), _) => {
                let minutes = c
                    .results
                    .first()
                    .map_or_else(dash, |r| format!("{:.0}", r.duration_minutes));
                rows.push([
                    c.trace.clone(),
                    "bound".to_owned(),
                    format!("{:.2}", b.usd),
                    ratio(b.usd, bound),
                    b.violation_minutes.to_string(),
                    dash(),
                    dash(),
                    dash(),
                    dash(),
                    dash(),
                    minutes,
                ]);
                if b.violation_minutes > 0 {
                    notes.push(format!(
                        "{}: no schedule meets the SLO in {} minute{} (more backlog than the \
                         baseline and the pods max_pods and the launch rate allow can absorb \
                         in time); the bound is for that fewest number of violation minutes",
                        c.trace,
                        b.violation_minutes,
                        if b.violation_minutes == 1 { "" } else { "s" }
                    ));
                }
            }
            (None, error) => notes.push(format!(
                "{}: no lower bound: {}",
                c.trace,
                error.as_deref().unwrap_or("not computed")
            )),
        }
    }
    let mut widths = [0usize; 11];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            // Text columns (trace, policy) align left, numbers right.
            if i < 2 {
                let _ = write!(line, "{cell:<w$}");
            } else {
                let _ = write!(line, "{cell:>w$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if !notes.is_empty() {
        out.push('\n');
        for note in notes {
            out.push_str(&note);
            out.push('\n');
        }
    }
    out
}
