//! The least any *reactive* policy can spend on a trace in `simulate`'s model, under caps on
//! SLO-violation minutes and pod creations: a certificate of what no tuning of `seed`,
//! `target` or `cost`, nor any other rule that launches pods only when it sees a backlog,
//! can reach.
//!
//! ```text
//! cargo run --release --example reactive_floor -- TRACE.csv VIOLATIONS CREATIONS [--check]
//! ```
//!
//! The model is `simulate`'s with its reference policy limits and parameters. The trace is
//! cut into windows: a *busy* part (minutes with a tick above 7/8 of what the baseline serves)
//! and the *quiet* part after it. In a quiet part the backlog only shrinks, so the ticks
//! with a backlog (the only ones where a reactive policy may launch) are a prefix of it.
//! A dynamic program over the windows, with state (pods held into the window, creations so
//! far, violation minutes so far), takes for each window the pods launched in the busy part,
//! those launched in the quiet part's backlog prefix, the quiet part's violation minutes and
//! the pods held into the next window, and charges:
//!
//! * violation minutes no fewer than a floor: pods held in serve from the window's first
//!   tick, pods launched serve after the boot from the earliest tick and at the highest rate
//!   the limits allow, and the backlog starts at zero; capacity is pointwise at least the
//!   policy's, so the backlog and the p95 are pointwise at most its;
//! * each launch its boot, billed while it cannot serve;
//! * each pod held into the next window every quiet tick after the backlog prefix (it can
//!   neither serve then nor be launched later), less the part its own boot may cover; the
//!   prefix is at most the boot, plus a minute's ticks per violation minute, plus the most ticks a
//!   backlog can last without violating, and at most what the worst-case backlog needs to
//!   drain with the pods surely serving;
//! * the work the baseline cannot do, once, as serving pod-ticks.
//!
//! These are disjoint and each is at most what the policy pays, so the optimum is a lower
//! bound. `--check` replays a grid of reactive policies (the three kinds, their knobs
//! varied) and confirms that none spends less than the floor at its own violation minutes
//! and creations.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use runpod_autoscaler::decide::{Policy, PolicyKind};
use runpod_autoscaler::simulate::{default_policy, replay, simulate, SimParams, Trace};

/// A quiet tick brings at most this share of what the baseline serves in a tick.
const QUIET_SHARE: f64 = 0.875;

/// The model's numbers, in jobs and ticks.
struct Model {
    /// Jobs one GPU finishes in a tick.
    per_gpu_tick: f64,
    /// Baseline GPUs.
    base: f64,
    /// GPUs per pod.
    gpus: f64,
    /// Ticks a pod boots (billed, not serving).
    boot: usize,
    /// Ticks in a minute.
    per_minute: usize,
    /// Launches per tick.
    launches: usize,
    /// Most pods at once.
    max_pods: usize,
    /// Dollars per pod-tick.
    price_tick: f64,
    /// A backlog above `kappa` jobs per serving GPU violates the SLO.
    kappa: f64,
}

/// The trace as the baseline alone sees it, cut into windows.
struct World {
    /// Jobs arriving in each tick.
    arrivals: Vec<f64>,
    /// The baseline-only backlog at each tick's start (every schedule's is at most this).
    base_queue: Vec<f64>,
    /// The minute of each tick.
    minute: Vec<u64>,
    /// (busy start, quiet start, end) ticks of each window.
    windows: Vec<(usize, usize, usize)>,
    /// Most jobs a quiet tick brings.
    quiet_max: f64,
    /// Pod-ticks of serving the baseline leaves to pods.
    work: f64,
}

fn model(policy: &Policy, params: &SimParams) -> anyhow::Result<Model> {
    let tick_s = params.tick.as_secs_f64();
    ensure!(tick_s > 0.0, "the tick must be positive");
    let per_gpu_s = params.jobs_per_gpu_per_minute / 60.0;
    // A quiet part drains only with a baseline that serves, and a backlog can keep the SLO
    // only if the service time does.
    ensure!(
        params.baseline_gpus > 0 && per_gpu_s > 0.0,
        "the floor needs a baseline that serves"
    );
    // A backlog within the SLO then drains by at least a share of itself each tick (what
    // bounds the ticks it can last).
    ensure!(
        policy.slo_p95_seconds - params.service_seconds >= tick_s,
        "the floor needs an SLO at least a tick above the service time"
    );
    ensure!(
        60.0 % tick_s == 0.0,
        "the floor needs a tick that divides the minute"
    );
    let price = policy.pod.usd_per_hour.dollars();
    let affordable = (policy.max_usd_per_hour.dollars() / price).floor() as usize;
    Ok(Model {
        per_gpu_tick: per_gpu_s * tick_s,
        base: f64::from(params.baseline_gpus),
        gpus: f64::from(policy.pod.gpus),
        boot: (params.boot_delay.as_secs_f64() / tick_s).ceil() as usize,
        per_minute: (60.0 / tick_s) as usize,
        launches: policy.max_launches_per_tick as usize,
        max_pods: (policy.max_pods as usize).min(affordable),
        price_tick: price * tick_s / 3600.0,
        kappa: (policy.slo_p95_seconds - params.service_seconds) * per_gpu_s,
    })
}

fn world(trace: &Trace, policy: &Policy, params: &SimParams, m: &Model) -> anyhow::Result<World> {
    let mut alone = policy.clone();
    alone.max_pods = 0;
    let (report, ticks) = replay(trace, &alone, params);
    let tick_min = params.tick.as_secs_f64() / 60.0;
    ensure!(
        (report.duration_minutes / tick_min - ticks.len() as f64).abs() < 1e-9,
        "the trace must last a whole number of ticks"
    );
    let arrivals: Vec<f64> = ticks
        .iter()
        .map(|t| t.queue_after - t.queue_observed + t.served_baseline)
        .collect();
    if let Some(t) = ticks
        .iter()
        .find(|t| t.queue_observed <= 0.0 && (t.p95_seconds - params.service_seconds).abs() > 1e-9)
    {
        bail!(
            "minute {}: the trace sets its own p95; only the constant service time is supported",
            t.minute
        );
    }
    let quiet_limit = QUIET_SHARE * m.base * m.per_gpu_tick;
    let minute: Vec<u64> = ticks.iter().map(|t| t.minute).collect();
    let minutes = minute.last().map_or(0, |x| x + 1) as usize;
    let (mut busy, mut first_tick) = (vec![false; minutes], vec![ticks.len(); minutes]);
    for (t, (mm, a)) in minute.iter().zip(&arrivals).enumerate() {
        let mm = *mm as usize;
        busy[mm] |= *a > quiet_limit;
        first_tick[mm] = first_tick[mm].min(t);
    }
    let mut starts = Vec::new();
    let mut quiets = Vec::new();
    for (mm, b) in busy.iter().enumerate() {
        let before = mm.checked_sub(1).is_some_and(|p| busy[p]);
        if *b && !before {
            starts.push(first_tick[mm]);
        }
        if !*b && before {
            quiets.push(first_tick[mm]);
        }
    }
    ensure!(
        starts.len() == quiets.len(),
        "the trace must end with a quiet minute (one at most {quiet_limit} jobs per tick)"
    );
    let windows = (0..starts.len())
        .map(|w| {
            let end = starts.get(w + 1).copied().unwrap_or(ticks.len());
            (starts[w], quiets[w], end)
        })
        .collect();
    let quiet_max = arrivals
        .iter()
        .zip(&minute)
        .filter(|(_, mm)| !busy[**mm as usize])
        .map(|(a, _)| *a)
        .fold(0.0, f64::max);
    Ok(World {
        base_queue: ticks.iter().map(|t| t.queue_observed).collect(),
        work: (report.jobs_arrived - report.jobs_completed) / (m.gpus * m.per_gpu_tick),
        arrivals,
        minute,
        windows,
        quiet_max,
    })
}

/// Violation minutes of window `w`'s busy and quiet parts with `h` pods held in, `ne` launched
/// in the busy part and `nl` in the quiet part, each as early and fast as the limits allow.
fn floors(m: &Model, wd: &World, w: usize, h: usize, ne: usize, nl: usize) -> (usize, usize) {
    let (b, e, end) = wd.windows[w];
    let ready = |from: usize, t: usize, n: usize| {
        (t + 1)
            .checked_sub(from + m.boot)
            .map_or(0, |k| (k * m.launches).min(n))
    };
    let (mut q, mut busy, mut quiet) = (0.0, Vec::new(), Vec::new());
    for t in b..end {
        let running =
            (h + ready(b, t, ne) + if t >= e { ready(e, t, nl) } else { 0 }).min(m.max_pods);
        let gpus = m.base + m.gpus * running as f64;
        if q > 0.0 && q > m.kappa * gpus {
            let part = if t < e { &mut busy } else { &mut quiet };
            if part.last() != Some(&wd.minute[t]) {
                part.push(wd.minute[t]);
            }
        }
        q = (q + wd.arrivals[t] - gpus * m.per_gpu_tick).max(0.0);
    }
    (busy.len(), quiet.len())
}

/// Most backlog ticks that do not violate after a quiet part's boot ticks, with `r` pods
/// surely serving: from the largest non-violating backlog, each such tick serves at least
/// what keeps it within the SLO and at least the baseline and those pods.
fn calm_ticks(m: &Model, wd: &World, r: usize) -> usize {
    let floor_gpus = m.base + m.gpus * r as f64;
    let mut q = m.kappa * (m.base + m.gpus * m.max_pods as f64);
    let mut n = 0;
    while q > 0.0 {
        n += 1;
        let gpus = (q / m.kappa).max(floor_gpus);
        q += wd.quiet_max - gpus * m.per_gpu_tick;
    }
    n
}

/// The longest backlog prefix of window `w`'s quiet part: the worst-case backlog (the
/// baseline-only one at the busy part's start, the most quiet arrivals) drained by the pods
/// surely serving, `r_in` from the busy part's start plus the boot and `r_tail` (taken as at
/// least `r_in`) from the quiet part's.
fn backlog_prefix(m: &Model, wd: &World, w: usize, r_in: usize, r_tail: usize) -> usize {
    let (b, e, end) = wd.windows[w];
    let gpus = |t: usize| {
        let r = if t >= e + m.boot {
            r_tail.max(r_in)
        } else if t >= b + m.boot {
            r_in
        } else {
            0
        };
        m.base + m.gpus * r as f64
    };
    let mut q = wd.base_queue[b];
    for t in b..e {
        q = (q + wd.arrivals[t] - gpus(t) * m.per_gpu_tick).max(0.0);
    }
    let mut n = 0;
    while q > 0.0 && e + n < end {
        q = (q + wd.quiet_max - gpus(e + n) * m.per_gpu_tick).max(0.0);
        n += 1;
    }
    n
}

/// The floor for every cap up to the asked ones.
struct Floor {
    /// `[v][c]`: the least spend with at most `v` violation minutes and `c` creations, `None`
    /// where no reactive policy gets there.
    grid: Vec<Vec<Option<f64>>>,
    /// The floor charges the whole work, so its class is the reactive policies that finish
    /// the trace's work. A backlog kept to the end keeps the last quiet part violating but
    /// for its boot and calm ticks; when that alone is more violation minutes than the cap,
    /// every reactive policy within the caps finishes. This says whether one might not.
    unfinished: bool,
}

/// The dynamic program of the module documentation, up to `vcap` violation minutes and
/// `ccap` creations.
fn solve(m: &Model, wd: &World, vcap: usize, ccap: usize) -> Floor {
    let p = m.max_pods;
    let calm: Vec<usize> = (0..=p).map(|r| calm_ticks(m, wd, r)).collect();
    let last_quiet = wd.windows.last().map_or(0, |&(_, e, end)| end - e);
    let unfinished = last_quiet
        .saturating_sub(m.boot + calm[0])
        .div_ceil(m.per_minute)
        <= vcap;
    let idx = |h: usize, c: usize, v: usize| (h * (ccap + 1) + c) * (vcap + 1) + v;
    let mut cur = vec![f64::INFINITY; (p + 1) * (ccap + 1) * (vcap + 1)];
    cur[idx(0, 0, 0)] = 0.0;
    for (w, &(b, e, end)) in wd.windows.iter().enumerate() {
        let quiet = end - e;
        let drains: Vec<Vec<usize>> = (0..=p)
            .map(|r_in| {
                (0..=p)
                    .map(|r_tail| backlog_prefix(m, wd, w, r_in, r_tail))
                    .collect()
            })
            .collect();
        let mut table: Vec<Vec<(usize, usize, usize, f64)>> = Vec::with_capacity(p + 1);
        for h in 0..=p {
            let mut best = vec![f64::INFINITY; (p + 1) * (ccap + 1) * (vcap + 1)];
            let mut cache = vec![vec![None; p + 1]; p + 1];
            // Launches are not capped by max_pods (a policy may terminate and launch again);
            // capacity is, so the floors are those of the capped counts.
            for ne in 0..=ccap {
                for nl in 0..=(ccap - ne) {
                    let (ce, cl) = (ne.min(p - h), nl.min(p));
                    let (fb, fq) =
                        *cache[ce][cl].get_or_insert_with(|| floors(m, wd, w, h, ce, cl));
                    for h2 in 0..=(h + ne + nl).min(p) {
                        let r_tail = h2.saturating_sub(nl);
                        let r_in = h2.saturating_sub(nl + ne).min(h);
                        let drain = drains[r_in][r_tail];
                        for mq in fq..=quiet.div_ceil(m.per_minute) {
                            let dv = fb + mq;
                            if dv > vcap {
                                break;
                            }
                            let tail = (m.boot + m.per_minute * mq + calm[r_tail])
                                .min(drain)
                                .min(quiet);
                            let hold = (quiet - tail) as f64;
                            // A pod held in may still boot at b (launched late in the window
                            // before, its boot billed there).
                            let in_boot = ((b + m.boot).saturating_sub(e + tail) as f64).min(hold);
                            let cost = (m.boot * (ne + nl)) as f64
                                + r_in as f64 * (hold - in_boot)
                                + (h2 - r_in) as f64 * (hold - m.boot as f64).max(0.0);
                            let i = idx(h2, ne + nl, dv);
                            best[i] = best[i].min(cost);
                        }
                    }
                }
            }
            // Only the options no other beats with as few creations and violations.
            let mut options = Vec::new();
            let mut below = vec![f64::INFINITY; (ccap + 1) * (vcap + 1)];
            for h2 in 0..=p {
                below.fill(f64::INFINITY);
                for c in 0..=ccap {
                    for v in 0..=vcap {
                        let cost = best[idx(h2, c, v)];
                        let fewer = f64::min(
                            c.checked_sub(1)
                                .map_or(f64::INFINITY, |c| below[c * (vcap + 1) + v]),
                            v.checked_sub(1)
                                .map_or(f64::INFINITY, |v| below[c * (vcap + 1) + v]),
                        );
                        if cost < fewer {
                            options.push((h2, c, v, cost));
                        }
                        below[c * (vcap + 1) + v] = cost.min(fewer);
                    }
                }
            }
            table.push(options);
        }
        let mut next = vec![f64::INFINITY; cur.len()];
        for h in 0..=p {
            for c in 0..=ccap {
                for v in 0..=vcap {
                    let base = cur[idx(h, c, v)];
                    if !base.is_finite() {
                        continue;
                    }
                    for &(h2, dc, dv, cost) in &table[h] {
                        if c + dc <= ccap && v + dv <= vcap {
                            let i = idx(h2, c + dc, v + dv);
                            next[i] = next[i].min(base + cost);
                        }
                    }
                }
            }
        }
        cur = next;
    }
    // The least over held pods, then over fewer violations and creations.
    let mut grid = vec![vec![f64::INFINITY; ccap + 1]; vcap + 1];
    for v in 0..=vcap {
        for c in 0..=ccap {
            let mut x = (0..=p)
                .map(|h| cur[idx(h, c, v)])
                .fold(f64::INFINITY, f64::min);
            if v > 0 {
                x = x.min(grid[v - 1][c]);
            }
            if c > 0 {
                x = x.min(grid[v][c - 1]);
            }
            grid[v][c] = x;
        }
    }
    let grid = grid
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|x| x.is_finite().then_some((x + wd.work) * m.price_tick))
                .collect()
        })
        .collect();
    Floor { grid, unfinished }
}

/// Reactive policies to replay against the floor: the three kinds with their knobs varied
/// over `lags`, `idles` (seconds), `stabilizations` (seconds) and `warmups` (seconds).
fn policies(lags: &[f64], idles: &[u64], stabilizations: &[u64], warmups: &[u64]) -> Vec<Policy> {
    let mut out = Vec::new();
    for kind in [PolicyKind::Seed, PolicyKind::Target, PolicyKind::Cost] {
        for &lag in lags {
            for &idle in idles {
                for &stabilization in stabilizations {
                    for &warmup in warmups {
                        let mut p = default_policy();
                        p.kind = kind;
                        p.lag_per_gpu = lag;
                        p.idle_timeout = Duration::from_secs(idle);
                        p.scale_down_stabilization = Duration::from_secs(stabilization);
                        p.warmup_grace = Duration::from_secs(warmup);
                        out.push(p);
                    }
                }
            }
        }
    }
    out
}

/// What [`check`] found.
struct Checked {
    /// Replays within the floor's caps (and finishing their work where the floor needs it).
    compared: usize,
    /// The replay closest to the floor: its spend over the floor, and what it was.
    tightest: Option<(f64, String)>,
}

/// Replays `policies` and fails unless each spends at least the floor at its own violation
/// minutes and creations.
fn check(
    trace: &Trace,
    params: &SimParams,
    floor: &Floor,
    policies: &[Policy],
) -> anyhow::Result<Checked> {
    let mut out = Checked {
        compared: 0,
        tightest: None,
    };
    for p in policies {
        let r = simulate(trace, p, params);
        let (v, c) = (r.slo_violation_minutes as usize, r.pod_creations as usize);
        let name = format!(
            "{:?} (lag {}, idle {} s, stabilization {} s, warm-up {} s)",
            p.kind,
            p.lag_per_gpu,
            p.idle_timeout.as_secs(),
            p.scale_down_stabilization.as_secs(),
            p.warmup_grace.as_secs()
        );
        let finished = r.jobs_completed + 1e-6 >= r.jobs_arrived;
        let Some(least) = floor.grid.get(v).and_then(|row| row.get(c)) else {
            continue;
        };
        if floor.unfinished && !finished {
            continue;
        }
        out.compared += 1;
        let Some(least) = least else {
            bail!("{name}: {v} violation minutes and {c} creations, which the floor says no reactive policy reaches");
        };
        ensure!(
            r.total_usd + 1e-9 >= *least,
            "{name} spends ${:.4} with {v} violation minutes and {c} creations, below the floor ${least:.4}",
            r.total_usd
        );
        let ratio = r.total_usd / least;
        if out.tightest.as_ref().is_none_or(|(x, _)| ratio < *x) {
            out.tightest = Some((
                ratio,
                format!("{name}: ${:.3}, {v} min, {c} creations", r.total_usd),
            ));
        }
    }
    Ok(out)
}

/// The floor of `trace` with the reference policy's limits and parameters.
fn reference_floor(
    trace: &Trace,
    vcap: usize,
    ccap: usize,
) -> anyhow::Result<(Model, World, Floor)> {
    let (policy, params) = (default_policy(), SimParams::default());
    let m = model(&policy, &params)?;
    let wd = world(trace, &policy, &params, &m)?;
    let floor = solve(&m, &wd, vcap, ccap);
    Ok((m, wd, floor))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (flags, args): (Vec<&String>, Vec<&String>) =
        args.iter().partition(|a| a.starts_with("--"));
    let check_too = match flags.as_slice() {
        [] => false,
        [flag] if flag.as_str() == "--check" => true,
        _ => bail!("the only option is --check, not {flags:?}"),
    };
    let [path, vcap, ccap] = args.as_slice() else {
        bail!("usage: reactive_floor TRACE.csv VIOLATION_MINUTES CREATIONS [--check]");
    };
    let vcap: usize = vcap
        .parse()
        .context("VIOLATION_MINUTES must be a whole number")?;
    let ccap: usize = ccap.parse().context("CREATIONS must be a whole number")?;
    let trace = Trace::from_path(Path::new(path.as_str()))?;
    let (m, wd, floor) = reference_floor(&trace, vcap, ccap)?;
    // `none`: no reactive policy gets within those caps.
    let dollars = |x: Option<f64>| x.map_or("none".to_owned(), |x| format!("${x:.3}"));
    println!(
        "{path}: {} windows, quiet ticks bring at most {:.2} jobs, pods must serve {:.0} pod-ticks (${:.3})",
        wd.windows.len(),
        wd.quiet_max,
        wd.work,
        wd.work * m.price_tick
    );
    println!(
        "a reactive policy with <= {vcap} violation minutes and <= {ccap} creations spends at least: {}",
        dollars(floor.grid[vcap][ccap])
    );
    let caps: Vec<String> = (0..=ccap)
        .filter(|c| c % 10 == 0 || *c == ccap)
        .map(|c| format!("{c}: {}", dollars(floor.grid[vcap][c])))
        .collect();
    println!(
        "at least, by creations (<= {vcap} violation minutes): {}",
        caps.join(", ")
    );
    if floor.unfinished {
        println!(
            "note: a schedule within the caps could leave a backlog at the trace's end; the floor is for policies that finish the work"
        );
    } else {
        println!("every schedule within the caps finishes the trace's work");
    }
    if check_too {
        let all = policies(
            &[0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 15.0],
            &[0, 30, 60, 120, 300, 600, 1200, 2400],
            &[0, 60, 300, 900],
            &[0, 120, 180, 300],
        );
        let found = check(&trace, &SimParams::default(), &floor, &all)?;
        println!(
            "check: {} replays, {} within the caps, none below the floor; tightest {}",
            all.len(),
            found.compared,
            found
                .tightest
                .map_or("-".to_owned(), |(r, n)| format!("{r:.3}x ({n})"))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(rows: &[f64]) -> Trace {
        let mut text = String::from("time_s,arriving_jobs\n");
        for (m, jobs) in rows.iter().enumerate() {
            text += &format!("{},{jobs}\n", m * 60);
        }
        Trace::from_reader(text.as_bytes()).expect("a well-formed trace")
    }

    /// One busy minute of 40 jobs (10 a tick) and twenty quiet ones. The two baseline GPUs serve
    /// 2 a tick and keep the SLO while at most 6.67 jobs wait: alone they violate minutes 1-5
    /// (the backlog peaks at 32 at 120 s) and then drain it, so the pods need do no work. A
    /// pod launched on the busy minute's first tick serves from 180 s, when 24 wait: one pod
    /// (within the SLO at 10 waiting) spares minute 5, two (13.3) minute 4 as well, and no
    /// number spares minute 3, as five is the most that serve by then (23.3 < 24).
    #[test]
    fn one_burst_by_hand() {
        let mut rows = vec![0.0, 40.0];
        rows.extend([0.0; 20]);
        let (m, wd, floor) = reference_floor(&trace(&rows), 6, 20).expect("a floor");
        assert_eq!(wd.windows, [(4, 8, 88)]);
        assert_eq!(wd.work, 0.0);
        // A backlog kept through 20 quiet minutes would violate in more than 6 of them.
        assert!(!floor.unfinished);
        let (_, _, short) = reference_floor(&trace(&rows[..12]), 6, 20).expect("a floor");
        assert!(short.unfinished, "10 quiet minutes cannot rule it out");
        let boot = 8.0 * m.price_tick;
        let at = |v: usize, c: usize| floor.grid[v][c];
        assert_eq!(at(5, 0), Some(0.0));
        assert_eq!(at(4, 0), None);
        assert!((at(4, 1).expect("one pod") - boot).abs() < 1e-12);
        assert_eq!(at(3, 1), None);
        assert!((at(3, 2).expect("two pods") - 2.0 * boot).abs() < 1e-12);
        assert!((at(3, 20).expect("two pods") - 2.0 * boot).abs() < 1e-12);
        assert_eq!(at(2, 20), None);
    }

    /// The case the property test found against the first version: pods let go before the
    /// trace's end served its last backlog, and the floor had called `seed`'s schedule (9
    /// violation minutes, 20 creations) impossible.
    #[test]
    fn pods_let_go_before_the_end_still_count_as_serving() {
        let mut rows = vec![0.0, 0.0, 0.0, 0.0, 25.0, 136.0, 94.0, 75.0, 107.0, 123.0];
        rows.extend([0.0; 5]);
        let trace = trace(&rows);
        let params = SimParams::default();
        let seed = policies(&[1.0], &[0], &[0], &[180]).remove(0);
        let r = simulate(&trace, &seed, &params);
        assert_eq!((r.slo_violation_minutes, r.pod_creations), (9, 20));
        let (_, _, floor) = reference_floor(&trace, 9, 20).expect("a floor");
        let least = floor.grid[9][20].expect("within reach");
        assert!(least <= r.total_usd, "{least} above {}", r.total_usd);
        check(&trace, &params, &floor, &[seed]).expect("not below the floor");
    }

    /// A trace the floor cannot cut says why.
    #[test]
    fn a_trace_outside_the_model_is_refused_with_the_reason() {
        let busy_to_the_end = trace(&[0.0, 40.0]);
        let e = reference_floor(&busy_to_the_end, 5, 5)
            .err()
            .expect("refused");
        assert!(
            e.to_string().contains("must end with a quiet minute"),
            "{e}"
        );
        let own_p95 =
            Trace::from_reader("time_s,arriving_jobs,p95_s\n0,0,20\n60,0,20\n".as_bytes())
                .expect("a well-formed trace");
        let e = reference_floor(&own_p95, 5, 5).err().expect("refused");
        assert!(e.to_string().contains("sets its own p95"), "{e}");
        let refused = |params: SimParams| {
            model(&default_policy(), &params)
                .err()
                .expect("refused")
                .to_string()
        };
        let no_baseline = SimParams {
            baseline_gpus: 0,
            ..SimParams::default()
        };
        assert!(refused(no_baseline).contains("a baseline that serves"));
        let slow_service = SimParams {
            service_seconds: 50.0,
            ..SimParams::default()
        };
        assert!(refused(slow_service).contains("a tick above the service time"));
        let odd_tick = SimParams {
            tick: Duration::from_secs(7),
            ..SimParams::default()
        };
        assert!(refused(odd_tick).contains("divides the minute"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

        /// No reactive policy spends less than the floor at its own violation minutes and
        /// creations, on quiet stretches with bursts of any size between them.
        #[test]
        fn no_reactive_policy_spends_less_than_the_floor(
            rows in proptest::collection::vec(
                proptest::prop_oneof![3 => 0u32..=7, 1 => 20u32..=150], 10..40)
        ) {
            let mut rows: Vec<f64> = rows.into_iter().map(f64::from).collect();
            rows.extend([0.0; 5]);
            let trace = trace(&rows);
            let params = SimParams::default();
            let all = policies(&[1.0, 3.0, 8.0], &[0, 300, 1200], &[0, 300], &[180]);
            let (mut vcap, mut ccap) = (0, 0);
            for p in &all {
                let r = simulate(&trace, p, &params);
                vcap = vcap.max(r.slo_violation_minutes as usize);
                ccap = ccap.max(r.pod_creations as usize);
            }
            let (_, _, floor) = reference_floor(&trace, vcap, ccap).expect("a floor");
            let found = check(&trace, &params, &floor, &all);
            proptest::prop_assert!(found.is_ok(), "{:?}", found.err());
        }
    }
}
