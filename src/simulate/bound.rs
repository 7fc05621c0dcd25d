//! The clairvoyant lower bound: the least RunPod spend with which any schedule, knowing the
//! whole trace in advance, could serve it in the simulator's pod model without an avoidable
//! SLO-violation minute.
//!
//! It is the optimum of a linear program (microlp; the only module that uses it) over every
//! tick `t` of the replay, in pods of the policy's template:
//!
//! * `x_t ∈ [0, max_launches_per_tick]` pods launched at `t`;
//! * `y_t ∈ [0, P]` pods existing (billed) during `t`, with `P` the lesser of `max_pods` and
//!   the pods `max_usd_per_hour` pays for; `y_t ≤ y_(t-1) + x_t` (terminating is free);
//! * `R_t ≥ 0` pods serving during `t`: `R_t ≤ y_t − Σ x_j` over the `k` ticks of boot
//!   (`k = ⌈boot_delay / tick⌉`), so a pod bills while it boots and serves after;
//! * `Q_t ≥ 0` the backlog at the start of `t` (`Q_0 = 0`): what `t` serves,
//!   `Q_t + a_t − Q_(t+1)`, is at most `(baseline + gpus·R_t)·c_t`;
//! * the SLO at every enforced tick: the modeled p95 `s_t + Q_t / capacity` is within the
//!   objective, i.e. `Q_t ≤ (slo − s_t)·rate·(baseline + gpus·O_t)` where `O_t`, the pods
//!   running when `t` is observed, is `R_(t−1) + x_(t−k)`;
//! * minimize `Σ price·dt_t·y_t`.
//!
//! Every simulated schedule, with pods that were terminated before serving left out (which
//! only lowers its cost), is a point of this program, so its optimum (integrality relaxed) is
//! never above what a policy spent while meeting the SLO on the same ticks.
//!
//! Which ticks are enforced: launching as fast as the limits allow from the first tick and
//! never terminating gives at every tick the most serving pods and the least backlog any
//! schedule can have, so the ticks that schedule still violates are violated by every
//! schedule. The bound enforces the SLO at every tick of every other minute: it is the
//! cheapest schedule with the fewest violation minutes possible
//! ([`LowerBound::violation_minutes`], 0 when the SLO can be met throughout).

use microlp::{ComparisonOp, OptimizationDirection, Problem, SolveOutcome, Variable};
use serde::Serialize;

use super::{minute_of, modeled_p95, sane, tick_ms, ticks, SimParams, Tick, Trace};
use crate::decide::Policy;
use crate::model::Usd;

/// The result of [`lower_bound`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LowerBound {
    /// The least RunPod spend (dollars) of a schedule with [`Self::violation_minutes`] SLO
    /// violation minutes (the fewest possible).
    pub usd: f64,
    /// Minutes every schedule violates, whatever it spends (a demand spike beyond what
    /// `max_pods` and the launch rate can reach in time, or a service time above the SLO).
    pub violation_minutes: u64,
}

/// Why the bound could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BoundError {
    /// The solver gave no optimal answer (numerical trouble on an extreme trace).
    #[error("the lower-bound linear program of {ticks} ticks has no optimal solution: {detail}")]
    Solver {
        /// Ticks in the program.
        ticks: usize,
        /// What the solver said.
        detail: String,
    },
}

/// The model's constants shared by the bound and the fastest schedule.
struct Model {
    /// Ticks a pod boots before it serves.
    boot_ticks: usize,
    /// Most pods that may exist at once.
    max_pods: f64,
    /// Most launches per tick.
    max_launches: f64,
    /// GPUs per pod.
    gpus: f64,
    /// Jobs one GPU finishes per second.
    per_gpu_per_s: f64,
    /// Baseline GPUs.
    baseline: f64,
    /// Dollars per pod-hour.
    price: f64,
    /// The p95 objective (seconds).
    slo_s: f64,
}

impl Model {
    fn new(policy: &Policy, params: &SimParams) -> Model {
        let tick_ms = tick_ms(params);
        let boot_ms = u64::try_from(params.boot_delay.as_millis()).unwrap_or(u64::MAX);
        let price = sane(policy.pod.usd_per_hour.dollars());
        let affordable = if price > 0.0 {
            ((policy.max_usd_per_hour.dollars() + Usd::EPSILON) / price)
                .floor()
                .max(0.0)
        } else {
            f64::INFINITY
        };
        Model {
            boot_ticks: usize::try_from(boot_ms.div_ceil(tick_ms)).unwrap_or(usize::MAX),
            max_pods: f64::from(policy.max_pods).min(affordable),
            max_launches: f64::from(policy.max_launches_per_tick),
            gpus: f64::from(policy.pod.gpus),
            per_gpu_per_s: sane(params.jobs_per_gpu_per_minute) / 60.0,
            baseline: f64::from(params.baseline_gpus),
            price,
            slo_s: policy.slo_p95_seconds,
        }
    }
}

/// The fastest schedule (launch as fast as the limits allow from the first tick, never
/// terminate): at every tick it has the most serving pods and the least backlog any schedule
/// can have.
struct Fastest {
    /// Whether it observes a p95 above the SLO at each tick: every schedule does there.
    violated: Vec<bool>,
    /// Its backlog at the start of each tick: every schedule's is at least this.
    queue: Vec<f64>,
}

/// Replays the [`Fastest`] schedule.
fn fastest(ticks: &[Tick], m: &Model) -> Fastest {
    let mut existing = Vec::with_capacity(ticks.len());
    let mut queue = 0.0_f64;
    let mut out = Fastest {
        violated: Vec::with_capacity(ticks.len()),
        queue: Vec::with_capacity(ticks.len()),
    };
    for (t, tick) in ticks.iter().enumerate() {
        let before = if t == 0 { 0.0 } else { existing[t - 1] };
        // Pods launched at or before t − k serve at t (and are seen when t is observed).
        let running_at = |existing: &[f64], i: usize| -> f64 {
            match m.boot_ticks {
                0 => existing.get(i).copied().unwrap_or(0.0),
                k => i.checked_sub(k).map_or(0.0, |j| existing[j]),
            }
        };
        let observed = if m.boot_ticks == 0 {
            before
        } else {
            running_at(&existing, t)
        };
        let observed_gpus = m.baseline + m.gpus * observed;
        let p95 = modeled_p95_f(tick.service_s, queue, observed_gpus, m.per_gpu_per_s);
        out.violated.push(p95 > m.slo_s);
        out.queue.push(queue);
        existing.push((before + m.max_launches).min(m.max_pods));
        let serving = m.baseline + m.gpus * running_at(&existing, t);
        queue = (queue + tick.arrivals - serving * m.per_gpu_per_s * tick.dt_s()).max(0.0);
    }
    out
}

/// [`modeled_p95`] for a fractional GPU count (the fastest schedule's is whole, but kept as
/// `f64` with the program's numbers).
fn modeled_p95_f(service_s: f64, queue: f64, gpus: f64, per_gpu_per_s: f64) -> f64 {
    let whole = gpus.round().clamp(0.0, f64::from(u32::MAX)) as u32;
    modeled_p95(service_s, queue, whole, per_gpu_per_s)
}

/// The clairvoyant lower bound for replaying `trace` with `policy`'s limits and pod template:
/// see the module documentation. Deterministic; ignores `min_pods` (a preference, not a need).
pub fn lower_bound(
    trace: &Trace,
    policy: &Policy,
    params: &SimParams,
) -> Result<LowerBound, BoundError> {
    let ticks = ticks(trace, params);
    let model = Model::new(policy, params);
    let fastest = fastest(&ticks, &model);
    let start_ms = trace.start_ms();
    let mut minutes: Vec<u64> = ticks
        .iter()
        .zip(&fastest.violated)
        .filter(|(_, v)| **v)
        .map(|(t, _)| minute_of(t, start_ms))
        .collect();
    minutes.dedup();
    // Enforced: every tick of every minute the fastest schedule keeps (a schedule with only the
    // unavoidable violation minutes may violate any tick within them).
    let enforce: Vec<bool> = ticks
        .iter()
        .map(|t| minutes.binary_search(&minute_of(t, start_ms)).is_err())
        .collect();
    let usd = solve(&ticks, &model, &enforce, &fastest.queue)?;
    Ok(LowerBound {
        usd,
        violation_minutes: u64::try_from(minutes.len()).unwrap_or(u64::MAX),
    })
}

/// The least spend of a schedule meeting the SLO at the ticks where `enforce` is true (one
/// entry per tick of the replay; missing entries are not enforced). A policy's own replay
/// meets it where it met the SLO, so this is never above that policy's cost.
pub fn lower_bound_where(
    trace: &Trace,
    policy: &Policy,
    params: &SimParams,
    enforce: &[bool],
) -> Result<f64, BoundError> {
    let ticks = ticks(trace, params);
    let model = Model::new(policy, params);
    let fastest = fastest(&ticks, &model);
    solve(&ticks, &model, enforce, &fastest.queue)
}

/// Ticks per linear program: a replay is bounded in segments of about this many ticks (3 h at
/// the default 15 s tick, at most twice that), each solved on its own, because the simplex time
/// grows much faster than the tick count (6 h: 0.1 s; 24 h in one program: 9 s).
const SEGMENT_TICKS: usize = 720;

/// Where the segments end: after [`SEGMENT_TICKS`], at the first tick whose SLO is enforced
/// (a cut inside a violation window would let the first segment leave the backlog it may defer
/// there to nobody), at the latest after twice that many.
pub(super) fn segment_ends(n: usize, enforce: &[bool]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut start = 0;
    while start < n {
        let earliest = start + SEGMENT_TICKS;
        let latest = (start + 2 * SEGMENT_TICKS).min(n);
        let end = if earliest >= n {
            n
        } else {
            (earliest..latest)
                .find(|&t| enforce.get(t).copied().unwrap_or(false))
                .unwrap_or(latest)
        };
        ends.push(end);
        start = end;
    }
    ends
}

/// The least spend meeting the SLO at the enforced ticks, as the sum of the optima of
/// consecutive segments. A segment after the first starts in the best state a schedule could
/// be in there: the [`Fastest`] schedule's backlog (every schedule has at least that much
/// waiting), and any number of pods already booted (billed from the segment's start, their
/// boot paid before). Every schedule's restriction to a segment is a point of that segment's
/// program, so the sum is still a lower bound, slightly below the single program's optimum
/// (one boot per pod alive at a boundary).
fn solve(ticks: &[Tick], m: &Model, enforce: &[bool], floor: &[f64]) -> Result<f64, BoundError> {
    let mut total = 0.0;
    let mut from = 0;
    for end in segment_ends(ticks.len(), enforce) {
        let enforced = enforce.get(from..).unwrap_or(&[]);
        let backlog = floor.get(from).copied().unwrap_or(0.0);
        total += solve_segment(&ticks[from..end], m, enforced, backlog, from == 0)?;
        from = end;
    }
    Ok(total)
}

/// Builds and solves one segment's program; returns its optimal objective in dollars.
fn solve_segment(
    ticks: &[Tick],
    m: &Model,
    enforce: &[bool],
    backlog: f64,
    first: bool,
) -> Result<f64, BoundError> {
    let n = ticks.len();
    let fail = |detail: String| BoundError::Solver { ticks: n, detail };
    let mut lp = Problem::new(OptimizationDirection::Minimize);
    // Pods already booted when the segment starts (none at the trace's start).
    let initial = lp.add_var(0.0, (0.0, if first { 0.0 } else { m.max_pods }));
    let x: Vec<Variable> = (0..n)
        .map(|_| lp.add_var(0.0, (0.0, m.max_launches)))
        .collect();
    let y: Vec<Variable> = ticks
        .iter()
        .map(|t| lp.add_var(m.price * t.dt_s() / 3600.0, (0.0, m.max_pods)))
        .collect();
    let r: Vec<Variable> = (0..n)
        .map(|_| lp.add_var(0.0, (0.0, f64::INFINITY)))
        .collect();
    // q[t]: backlog at the start of tick t (`backlog` at the segment's start); q[n] after the
    // last.
    let q: Vec<Variable> = (0..=n)
        .map(|t| {
            let range = if t == 0 {
                (backlog, backlog)
            } else {
                (0.0, f64::INFINITY)
            };
            lp.add_var(0.0, range)
        })
        .collect();
    let k = m.boot_ticks;
    for (t, tick) in ticks.iter().enumerate() {
        // Growth only by launches.
        let before = if t == 0 { initial } else { y[t - 1] };
        lp.add_constraint(
            [(y[t], 1.0), (x[t], -1.0), (before, -1.0)].as_slice(),
            ComparisonOp::Le,
            0.0,
        );
        // Serving pods: existing ones minus those still booting.
        // (With no boot, `(t + 1)..=t` is empty.)
        let mut serving = vec![(r[t], 1.0), (y[t], -1.0)];
        serving.extend(x[(t + 1).saturating_sub(k)..=t].iter().map(|v| (*v, 1.0)));
        lp.add_constraint(serving.as_slice(), ComparisonOp::Le, 0.0);
        // Service: q_t + a_t − q_(t+1) ≤ (baseline + gpus·R_t)·rate·dt.
        let per_gpu = m.per_gpu_per_s * tick.dt_s();
        lp.add_constraint(
            [(q[t], 1.0), (q[t + 1], -1.0), (r[t], -m.gpus * per_gpu)].as_slice(),
            ComparisonOp::Le,
            m.baseline * per_gpu - tick.arrivals,
        );
        // The SLO where enforced and where a constraint can say something linear.
        let headroom_s = m.slo_s - tick.service_s;
        if !enforce.get(t).copied().unwrap_or(false)
            || !(0.0..super::NO_CAPACITY_WAIT_S).contains(&headroom_s)
        {
            continue;
        }
        let kappa = headroom_s * m.per_gpu_per_s;
        // Pods seen running when t is observed: those serving at t − 1 plus those whose boot
        // ends now (at a segment's start, the pods it starts with).
        let mut slo = vec![(q[t], 1.0)];
        match t.checked_sub(1) {
            None => slo.push((initial, -kappa * m.gpus)),
            Some(prev) => {
                slo.push((r[prev], -kappa * m.gpus));
                if let Some(j) = t.checked_sub(k).filter(|_| k > 0) {
                    slo.push((x[j], -kappa * m.gpus));
                }
            }
        }
        lp.add_constraint(slo.as_slice(), ComparisonOp::Le, kappa * m.baseline);
    }
    let outcome = lp.solve().map_err(|e| fail(e.to_string()))?;
    match outcome {
        SolveOutcome::Solution(solution) => Ok(solution.objective().max(0.0)),
        SolveOutcome::Interrupted(_) => Err(fail("interrupted by a limit".to_owned())),
    }
}
