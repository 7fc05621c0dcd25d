//! Tests of trace parsing and of the simulated world.

use std::fmt::Write as _;
use std::time::Duration;

use super::*;

fn policy(kind: PolicyKind) -> Policy {
    Policy {
        kind,
        ..default_policy()
    }
}

fn params(baseline_gpus: u32) -> SimParams {
    SimParams {
        baseline_gpus,
        ..SimParams::default()
    }
}

fn parse(text: &str) -> Result<Trace, TraceError> {
    Trace::from_reader(text.as_bytes())
}

/// A per-minute trace (no p95 column) with `rate(minute)` jobs per minute.
fn per_minute(minutes: u64, rate: impl Fn(u64) -> f64) -> Trace {
    let mut csv = String::from("time_s,arriving_jobs\n");
    for m in 0..minutes {
        let _ = writeln!(csv, "{},{}", m * 60, rate(m));
    }
    match parse(&csv) {
        Ok(t) => t,
        Err(e) => panic!("test trace does not parse: {e}"),
    }
}

/// 3 h at 5 jobs/min with 200 jobs/min for 20 minutes from minute 60.
fn single_spike() -> Trace {
    per_minute(180, |m| if (60..80).contains(&m) { 200.0 } else { 5.0 })
}

/// 6 h at 6 jobs/min with bursts of 60-150 jobs/min lasting 3-15 minutes.
fn bursty_like() -> Trace {
    const BURSTS: [(u64, u64, f64); 8] = [
        (20, 32, 100.0),
        (55, 58, 150.0),
        (90, 105, 60.0),
        (130, 137, 120.0),
        (170, 180, 90.0),
        (215, 219, 140.0),
        (260, 274, 75.0),
        (310, 318, 110.0),
    ];
    per_minute(360, |m| {
        BURSTS
            .iter()
            .find(|(from, to, _)| (*from..*to).contains(&m))
            .map_or(6.0, |b| b.2)
    })
}

// ---- parsing ----

#[test]
fn parses_a_trace_with_p95() {
    let t = parse("time_s,arriving_jobs,p95_s\n0,10,9.5\n60, 12.5 ,\n120,0,11\n").unwrap();
    assert_eq!(
        t.rows,
        vec![
            trace::TraceRow {
                time_ms: 0,
                arriving_jobs: 10.0,
                p95_s: Some(9.5)
            },
            trace::TraceRow {
                time_ms: 60_000,
                arriving_jobs: 12.5,
                p95_s: None
            },
            trace::TraceRow {
                time_ms: 120_000,
                arriving_jobs: 0.0,
                p95_s: Some(11.0)
            },
        ]
    );
    assert_eq!(t.end_ms(), 180_000);
}

#[test]
fn parses_a_trace_without_p95_and_with_extra_columns_in_any_order() {
    let t = parse("note,arriving_jobs,time_s\nx,3,0.5\ny,4,30\n").unwrap();
    assert_eq!(t.rows.len(), 2);
    assert_eq!(t.rows[0].time_ms, 500);
    assert_eq!(t.rows[1].arriving_jobs, 4.0);
    assert!(t.rows.iter().all(|r| r.p95_s.is_none()));
    // The last row lasts as long as the one before it.
    assert_eq!(t.end_ms(), 59_500);
}

#[test]
fn a_single_row_lasts_one_minute() {
    let t = parse("time_s,arriving_jobs\n0,6\n").unwrap();
    let r = simulate(&t, &policy(PolicyKind::Target), &params(2));
    assert_eq!(r.duration_minutes, 1.0);
    assert!((r.jobs_arrived - 6.0).abs() < 1e-9);
}

#[test]
fn bad_input_is_a_typed_error_naming_line_and_column() {
    type Check = dyn Fn(&TraceError) -> bool;
    let column = |c: &'static str| move |e: &TraceError| matches!(e, TraceError::BadValue { column, .. } if column == c);
    let cases: Vec<(&str, &str, Option<u64>, Box<Check>)> = vec![
        (
            "empty file",
            "",
            None,
            Box::new(|e| matches!(e, TraceError::Empty)),
        ),
        (
            "header only",
            "time_s,arriving_jobs\n",
            None,
            Box::new(|e| matches!(e, TraceError::Empty)),
        ),
        (
            "missing arriving_jobs",
            "time_s,jobs\n0,1\n",
            Some(1),
            Box::new(|e| {
                matches!(
                    e,
                    TraceError::MissingColumn {
                        column: "arriving_jobs",
                        ..
                    }
                )
            }),
        ),
        (
            "no header at all",
            "0,1\n60,2\n",
            Some(1),
            Box::new(|e| {
                matches!(
                    e,
                    TraceError::MissingColumn {
                        column: "time_s",
                        ..
                    }
                )
            }),
        ),
        (
            "negative jobs",
            "time_s,arriving_jobs\n0,1\n60,-2\n",
            Some(3),
            Box::new(column("arriving_jobs")),
        ),
        (
            "NaN time",
            "time_s,arriving_jobs\n0,1\nNaN,2\n",
            Some(3),
            Box::new(column("time_s")),
        ),
        (
            "negative time",
            "time_s,arriving_jobs\n-1,1\n",
            Some(2),
            Box::new(column("time_s")),
        ),
        (
            "infinite p95",
            "time_s,arriving_jobs,p95_s\n0,1,inf\n",
            Some(2),
            Box::new(column("p95_s")),
        ),
        (
            "negative p95",
            "time_s,arriving_jobs,p95_s\n0,1,2\n60,1,-3\n",
            Some(3),
            Box::new(column("p95_s")),
        ),
        (
            "not a number",
            "time_s,arriving_jobs\n0,1\n60,lots\n",
            Some(3),
            Box::new(column("arriving_jobs")),
        ),
        (
            "empty required cell",
            "time_s,arriving_jobs\n0,1\n,2\n",
            Some(3),
            Box::new(column("time_s")),
        ),
        (
            "equal times",
            "time_s,arriving_jobs\n0,1\n60,1\n60,1\n",
            Some(4),
            Box::new(|e| matches!(e, TraceError::NotIncreasing { .. })),
        ),
        (
            "decreasing times",
            "time_s,arriving_jobs\n0,1\n60,1\n30,1\n",
            Some(4),
            Box::new(|e| matches!(e, TraceError::NotIncreasing { .. })),
        ),
        (
            "times equal to the millisecond",
            "time_s,arriving_jobs\n0,1\n0.0001,1\n",
            Some(3),
            Box::new(|e| matches!(e, TraceError::NotIncreasing { .. })),
        ),
        (
            "too many cells",
            "time_s,arriving_jobs\n0,1\n60,1,5\n",
            Some(3),
            Box::new(|e| {
                matches!(e, TraceError::Malformed { message, .. }
                    if message.starts_with("the row has 3 cells but the header has 2"))
            }),
        ),
        (
            "a header of empty names",
            ",,\n0,1,2\n",
            None,
            Box::new(|e| matches!(e, TraceError::Empty)),
        ),
        (
            "time beyond 1e10 s",
            "time_s,arriving_jobs\n0,1\n10000000001,1\n",
            Some(3),
            Box::new(|e| {
                matches!(e, TraceError::BadValue { column, problem, .. }
                    if column == "time_s" && problem.contains("larger than 10000000000"))
            }),
        ),
    ];
    for (name, text, line, check) in cases {
        let err = match parse(text) {
            Ok(t) => panic!("{name}: parsed {t:?}"),
            Err(e) => e,
        };
        assert!(check(&err), "{name}: wrong error {err:?}");
        assert_eq!(err.line(), line, "{name}: {err}");
        let message = err.to_string();
        if let Some(line) = line {
            assert!(
                message.starts_with(&format!("line {line}")),
                "{name}: {message}"
            );
        }
        if let TraceError::BadValue { column, .. } = &err {
            assert!(
                message.contains(&format!("`{column}`")),
                "{name}: {message}"
            );
            assert!(
                message.contains("write"),
                "{name}: says what to fix: {message}"
            );
        }
    }
}

#[test]
fn invalid_utf8_bytes_are_an_error_not_a_panic() {
    let bytes: &[u8] = b"time_s,arriving_jobs\n0,1\n60,\xff\xfe\n";
    let err = Trace::from_reader(bytes).unwrap_err();
    assert_eq!(err.line(), Some(3), "{err}");
    assert!(err.to_string().contains("not valid UTF-8"), "{err}");
}

#[test]
fn values_at_their_limits_parse() {
    let t =
        parse("time_s,arriving_jobs,p95_s\n0,1000000000000,31536000\n10000000000,0,0\n").unwrap();
    assert_eq!(t.rows.len(), 2);
    assert_eq!(t.rows[1].time_ms, 10_000_000_000_000);
}

#[test]
fn a_missing_file_is_an_io_error_naming_the_path() {
    let err = Trace::from_path(std::path::Path::new("/nonexistent/trace.csv")).unwrap_err();
    assert!(matches!(err, TraceError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/trace.csv"), "{err}");
}

#[test]
fn committed_traces_parse() {
    let cases = [
        (
            include_str!("../../benches/traces/steady_diurnal.csv"),
            1440,
            true,
        ),
        (include_str!("../../benches/traces/bursty.csv"), 360, false),
        (
            include_str!("../../benches/traces/single_spike.csv"),
            180,
            false,
        ),
    ];
    for (text, rows, has_p95) in cases {
        let t = parse(text).unwrap();
        assert_eq!(t.rows.len(), rows);
        assert_eq!(t.end_ms(), rows as u64 * 60_000);
        assert!(t.rows.iter().all(|r| r.p95_s.is_some() == has_p95));
    }
}

// ---- simulation ----

#[test]
fn arrivals_are_conserved_and_partial_ticks_count() {
    // 100 s of trace with a 15 s tick: the last tick is 10 s long.
    let t = parse("time_s,arriving_jobs\n0,30\n50,20\n").unwrap();
    let (r, timeline) = replay(&t, &policy(PolicyKind::Target), &params(1));
    assert_eq!(timeline.len(), 7);
    assert!((r.jobs_arrived - 50.0).abs() < 1e-9, "{r:?}");
    let left = timeline.last().map_or(0.0, |t| t.queue_after);
    assert!(
        (r.jobs_completed + left - r.jobs_arrived).abs() < 1e-9,
        "{r:?}"
    );
    // One GPU at 4 jobs/min serves 100 s × 4/60 jobs.
    assert!(
        (r.jobs_completed - 100.0 * 4.0 / 60.0).abs() < 1e-9,
        "{r:?}"
    );
}

#[test]
fn an_empty_trace_costs_nothing() {
    let t = per_minute(120, |_| 0.0);
    for kind in PolicyKind::ALL {
        let r = simulate(&t, &policy(kind), &params(0));
        assert_eq!(r.total_usd, 0.0, "{kind}");
        assert_eq!(r.pod_creations, 0, "{kind}");
        assert_eq!(r.peak_pods, 0, "{kind}");
        assert_eq!(r.slo_violation_minutes, 0, "{kind}");
        assert_eq!(r.duration_minutes, 120.0);
    }
}

#[test]
fn a_single_spike_scales_up_then_back_to_min_pods() {
    for min_pods in [0, 1] {
        let p = Policy {
            min_pods,
            ..policy(PolicyKind::Target)
        };
        let (r, timeline) = replay(&single_spike(), &p, &params(2));
        assert!(r.pod_creations > u64::from(min_pods), "{r:?}");
        assert!(r.peak_pods > min_pods, "{r:?}");
        let during = timeline
            .iter()
            .filter(|t| (3_600_000..4_800_000).contains(&t.at.as_millis()))
            .map(|t| t.pods)
            .max();
        assert!(during > Some(min_pods as usize), "{during:?}");
        // Before the spike nothing beyond the minimum exists.
        assert!(timeline
            .iter()
            .filter(|t| t.at.as_millis() < 3_600_000)
            .all(|t| t.pods == min_pods as usize));
        assert_eq!(timeline.last().map(|t| t.pods), Some(min_pods as usize));
        assert!(r.jobs_completed > r.jobs_arrived - 1e-6, "{r:?}");
    }
}

#[test]
fn pods_serve_nothing_before_the_boot_delay() {
    // No baseline: only pods can serve.
    let t = per_minute(30, |_| 60.0);
    let sim = SimParams {
        boot_delay: Duration::from_secs(120),
        ..params(0)
    };
    let (r, timeline) = replay(&t, &policy(PolicyKind::Target), &sim);
    let first = timeline
        .iter()
        .find(|t| t.launched > 0)
        .map(|t| t.at)
        .unwrap();
    let ready = first.plus(sim.boot_delay);
    for tick in &timeline {
        if tick.at < ready {
            assert_eq!(tick.running_gpus, 0, "{tick:?}");
            assert_eq!(tick.served_pods + tick.served_baseline, 0.0, "{tick:?}");
        }
    }
    let at_ready = timeline.iter().find(|t| t.at >= ready).unwrap();
    assert!(
        at_ready.running_gpus > 0 && at_ready.served_pods > 0.0,
        "{at_ready:?}"
    );
    // Booting pods bill: money was spent before any work was done.
    assert!(timeline
        .iter()
        .any(|t| t.at < ready && t.usd_per_hour > 0.0));
    assert!(r.total_usd > 0.0);
}

#[test]
fn the_budget_and_max_pods_are_never_exceeded() {
    for kind in PolicyKind::ALL {
        for (max_usd, max_pods) in [(1.0, 20), (12.0, 4), (12.0, 20)] {
            let p = Policy {
                max_usd_per_hour: Usd(max_usd),
                max_pods,
                ..policy(kind)
            };
            let (r, timeline) = replay(&bursty_like(), &p, &params(2));
            for tick in &timeline {
                assert!(
                    tick.usd_per_hour <= max_usd + Usd::EPSILON,
                    "{kind} {max_usd}: {tick:?}"
                );
                assert!(
                    tick.pods <= max_pods as usize,
                    "{kind} {max_pods}: {tick:?}"
                );
            }
            assert!(r.pod_creations > 0, "{kind}: the limits were exercised");
        }
    }
}

#[test]
fn runs_are_deterministic() {
    for kind in PolicyKind::ALL {
        let a = replay(&bursty_like(), &policy(kind), &params(2));
        let b = replay(&bursty_like(), &policy(kind), &params(2));
        assert_eq!(a, b, "{kind}");
    }
}

/// Time from the last tick in which pods served work, after `after_ms`, until no pod is left.
fn scale_down_delay(timeline: &[TickRecord], after_ms: u64) -> Option<u64> {
    let gone = timeline
        .iter()
        .find(|t| t.at.as_millis() >= after_ms && t.pods == 0)?;
    let busy = timeline
        .iter()
        .rev()
        .find(|t| t.at < gone.at && t.served_pods > 0.0)?;
    Some(gone.at.as_millis() - busy.at.as_millis())
}

// The brief expected the seed policy to spend more than the target policy on bursty input.
// This model does not show that: bursts of 60-150 jobs/min need more than max_pods 20 under
// both policies, and what differs is the scale-down, where the seed's 60 s idle rule frees
// pods minutes before the target's stabilization window and idle timeout. The next two tests
// pin down the mechanisms the side-by-side numbers come from, not the numbers.

#[test]
fn after_a_burst_seed_scales_down_sooner_than_target() {
    // 30 quiet minutes, 10 minutes at 60 jobs/min, 60 quiet minutes; baseline 2 GPUs.
    let t = per_minute(100, |m| if (30..40).contains(&m) { 60.0 } else { 6.0 });
    let p_target = policy(PolicyKind::Target);
    let (_, seed) = replay(&t, &policy(PolicyKind::Seed), &params(2));
    let (_, target) = replay(&t, &p_target, &params(2));
    let burst_end = 40 * 60_000;
    let seed_delay = scale_down_delay(&seed, burst_end).unwrap();
    let target_delay = scale_down_delay(&target, burst_end).unwrap();
    let tick = 15_000;
    // Seed: idle 60 s after the last busy tick, then the next plan removes the pods.
    assert!(seed_delay <= 60_000 + 2 * tick, "seed took {seed_delay} ms");
    // Target: never before its idle timeout.
    assert!(
        target_delay >= p_target.idle_timeout.as_millis() as u64,
        "target took {target_delay} ms"
    );
    assert!(seed.iter().any(|t| t.pods > 0) && target.iter().any(|t| t.pods > 0));
}

#[test]
fn on_a_slow_day_curve_target_misses_the_slo_less_than_seed() {
    // 12 h rising from 4 to 40 jobs/min and back: well above the 8 jobs/min baseline for hours.
    let t = per_minute(720, |m| {
        let day = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * m as f64 / 720.0).cos();
        (4.0 + 36.0 * day).round()
    });
    let seed = simulate(&t, &policy(PolicyKind::Seed), &params(2));
    let target = simulate(&t, &policy(PolicyKind::Target), &params(2));
    // The seed rule (depth / 10 + 1 pods) settles where the backlog's wait exceeds the SLO;
    // the target rule keeps adding GPUs while p95 is above it.
    assert!(
        target.slo_violation_minutes < seed.slo_violation_minutes,
        "seed {seed:?}\ntarget {target:?}"
    );
}

#[test]
fn the_trace_p95_is_used_and_violations_count_distinct_minutes() {
    // No arrivals, service p95 above the 60 s SLO for the middle two of four minutes.
    let t = parse("time_s,arriving_jobs,p95_s\n0,0,5\n60,0,70\n120,0,\n180,0,1\n").unwrap();
    let sim = SimParams {
        service_seconds: 61.0,
        ..params(2)
    };
    let (r, timeline) = replay(&t, &policy(PolicyKind::Target), &sim);
    assert_eq!(r.slo_violation_minutes, 2, "{timeline:?}");
    assert_eq!(timeline.len(), 16);
    assert_eq!(timeline[0].p95_seconds, 5.0);
    assert_eq!(timeline[4].p95_seconds, 70.0);
    assert_eq!(timeline[8].p95_seconds, 61.0);
}

#[test]
fn violation_minutes_count_from_the_trace_start() {
    // The trace starts at 15 s; its second minute (75 s to 135 s) has a service p95 above the
    // SLO. That is one violation minute, not two halves of clock minutes.
    let t = parse("time_s,arriving_jobs,p95_s\n15,0,5\n75,0,70\n135,0,5\n").unwrap();
    let (r, timeline) = replay(&t, &policy(PolicyKind::Target), &params(2));
    assert_eq!(r.slo_violation_minutes, 1, "{timeline:?}");
    let violated: Vec<_> = timeline.iter().filter(|t| t.p95_seconds > 60.0).collect();
    assert_eq!(violated.len(), 4, "{timeline:?}");
    assert_eq!(violated[0].at, Timestamp::from_millis(75_000));
}

#[test]
fn a_p95_at_the_slo_is_no_violation() {
    let t = parse("time_s,arriving_jobs,p95_s\n0,0,60\n60,0,60.001\n").unwrap();
    let (r, timeline) = replay(&t, &policy(PolicyKind::Target), &params(2));
    assert_eq!(r.slo_violation_minutes, 1, "{timeline:?}");
}

#[test]
fn a_pod_serves_its_gpus_times_the_rate() {
    // One 2-GPU pod, 8 jobs per GPU per minute (2 per GPU per 15 s tick), no baseline, more
    // work than it can serve: once it runs it serves 4 jobs a tick.
    let mut p = policy(PolicyKind::Target);
    p.max_pods = 1;
    p.pod.gpus = 2;
    let sim = SimParams {
        jobs_per_gpu_per_minute: 8.0,
        ..params(0)
    };
    let (_, timeline) = replay(&per_minute(10, |_| 100.0), &p, &sim);
    let served: Vec<f64> = timeline.iter().map(|t| t.served_pods).collect();
    assert!(served.iter().all(|&s| s <= 4.0), "{served:?}");
    assert!(served.contains(&4.0), "{served:?}");
}

#[test]
fn bad_params_count_as_zero() {
    assert_eq!(sane(2.5), 2.5);
    assert_eq!(sane(0.0), 0.0);
    for bad in [-1.0, f64::NEG_INFINITY, f64::INFINITY, f64::NAN] {
        assert_eq!(sane(bad), 0.0, "{bad}");
    }
}

#[test]
fn queue_wait_is_modeled_and_no_capacity_is_finite() {
    // 120 jobs at once with no capacity at all: the modeled wait is capped, never infinite.
    let t = parse("time_s,arriving_jobs\n0,120\n15,0\n").unwrap();
    let p = Policy {
        max_pods: 0,
        ..policy(PolicyKind::Target)
    };
    let (r, timeline) = replay(&t, &p, &params(0));
    assert_eq!(timeline[1].p95_seconds, 10.0 + NO_CAPACITY_WAIT_S);
    assert_eq!(r.jobs_completed, 0.0);
    // With 2 GPUs (8 jobs/min), a backlog of 8 jobs waits 60 s.
    let t = parse("time_s,arriving_jobs\n0,16\n15,0\n").unwrap();
    let (_, timeline) = replay(&t, &policy(PolicyKind::Target), &params(2));
    assert!((timeline[1].queue_observed - 14.0).abs() < 1e-9);
    assert!((timeline[1].p95_seconds - (10.0 + 14.0 * 60.0 / 8.0)).abs() < 1e-9);
}

#[test]
fn odd_params_do_not_panic_or_hang() {
    let t = single_spike();
    let odd = SimParams {
        tick: Duration::ZERO,
        jobs_per_gpu_per_minute: f64::NAN,
        service_seconds: -1.0,
        ..params(2)
    };
    let short = parse("time_s,arriving_jobs\n0,1\n0.01,1\n").unwrap();
    let r = simulate(&short, &policy(PolicyKind::Seed), &odd);
    assert_eq!(r.jobs_completed, 0.0);
    let huge = SimParams {
        tick: Duration::from_secs(u64::MAX),
        ..params(2)
    };
    let r = simulate(&t, &policy(PolicyKind::Target), &huge);
    assert!((r.jobs_arrived - t.rows.iter().map(|r| r.arriving_jobs).sum::<f64>()).abs() < 1e-6);
}

/// Without the bound the replays are the same, there is no bound row or ratio, and a note says
/// the bound was not computed. Timelines come only when asked for.
#[test]
fn a_comparison_without_the_bound_says_so() {
    let spike = |bound: bool, timelines: bool| {
        compare(
            "spike",
            &single_spike(),
            &policy(PolicyKind::Target),
            &[PolicyKind::Cost],
            &params(2),
            Extras { bound, timelines },
        )
    };
    let (with, without) = (spike(true, true), spike(false, false));
    assert!(with.bound.is_some());
    assert_eq!(
        (without.bound.as_ref(), without.bound_error.as_ref()),
        (None, None)
    );
    assert_eq!(with.results, without.results);
    // Timelines only when asked for, one per result, the same as a replay's.
    assert!(without.timelines.is_empty());
    let (_, timeline) = replay(&single_spike(), &policy(PolicyKind::Cost), &params(2));
    assert_eq!(with.timelines, vec![timeline]);
    let table = render_table(&[without]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[1].starts_with("spike  cost"), "{table}");
    assert_eq!(lines[1].split_whitespace().nth(3), Some("-"), "{table}");
    assert_eq!(lines[3], "spike: no lower bound: not computed", "{table}");
}

const BOUND_ONLY: Extras = Extras {
    bound: true,
    timelines: false,
};

#[test]
fn the_table_is_aligned_and_reports_serialize() {
    let reports = vec![
        compare(
            "single_spike",
            &single_spike(),
            &policy(PolicyKind::Target),
            &PolicyKind::ALL,
            &params(2),
            BOUND_ONLY,
        ),
        compare(
            "quiet",
            &per_minute(10, |_| 0.0),
            &policy(PolicyKind::Target),
            &[PolicyKind::Target],
            &params(2),
            BOUND_ONLY,
        ),
    ];
    let table = render_table(&reports);
    let lines: Vec<&str> = table.lines().collect();
    // Header, 3 policies and the bound, 1 policy and the bound, a blank line, the spike's note.
    assert_eq!(lines.len(), 9, "{table}");
    assert!(lines[0].starts_with("trace") && lines[0].contains("total $"));
    assert!(lines[0].contains("$ / bound"), "{table}");
    assert!(lines[1].starts_with("single_spike  seed"), "{table}");
    assert!(lines[3].starts_with("single_spike  cost"), "{table}");
    assert!(lines[4].starts_with("single_spike  bound"), "{table}");
    assert!(lines[5].starts_with("quiet         target"), "{table}");
    // Nothing to serve, nothing to spend: no ratio to show.
    assert!(
        lines[6].starts_with("quiet         bound      0.00          -"),
        "{table}"
    );
    // Each policy's spend over the bound, to two decimals.
    let bound = reports[0].bound.as_ref().unwrap().usd;
    for (line, r) in lines[1..4].iter().zip(&reports[0].results) {
        let ratio = format!(" {:.2} ", r.total_usd / bound);
        assert!(line.contains(&ratio), "{ratio:?} in {table}");
    }
    let width = lines[0].len();
    assert!(lines[..7].iter().all(|l| l.len() == width), "{table}");
    assert_eq!(lines[7], "");
    assert!(
        lines[8].starts_with("single_spike: no schedule meets the SLO in "),
        "{table}"
    );

    let json = serde_json::to_value(&reports[0]).unwrap();
    assert_eq!(json["trace"], "single_spike");
    assert!(json["bound"]["usd"].is_number(), "{json}");
    assert!(json["bound"]["violation_minutes"].is_number(), "{json}");
    assert!(json.get("bound_error").is_none(), "{json}");
    let results = &json["results"];
    assert_eq!(results[0]["policy"], "seed");
    assert_eq!(results[1]["policy"], "target");
    assert_eq!(results[2]["policy"], "cost");
    for key in [
        "total_usd",
        "slo_violation_minutes",
        "pod_creations",
        "peak_pods",
        "jobs_arrived",
        "jobs_completed",
        "max_queue",
        "duration_minutes",
    ] {
        assert!(results[1][key].is_number(), "{key}: {json}");
    }
}

/// A world for hand-computed bounds: one-minute ticks, one job per GPU per minute, a service
/// time equal to the SLO (so any job waiting at a tick's start violates it), one-GPU pods at
/// $0.60/h (one cent per pod-tick).
fn tiny(baseline_gpus: u32, boot_s: u64, max_pods: u32, rate: u32) -> (Policy, SimParams) {
    let mut p = policy(PolicyKind::Target);
    p.max_pods = max_pods;
    p.max_launches_per_tick = rate;
    p.max_usd_per_hour = Usd(100.0);
    p.pod.usd_per_hour = Usd(0.60);
    p.pod.gpus = 1;
    p.slo_p95_seconds = 10.0;
    let params = SimParams {
        tick: Duration::from_secs(60),
        boot_delay: Duration::from_secs(boot_s),
        jobs_per_gpu_per_minute: 1.0,
        service_seconds: 10.0,
        baseline_gpus,
    };
    (p, params)
}

#[test]
fn the_bound_matches_a_hand_computed_optimum_without_violations() {
    // No baseline, a one-minute boot. 2 jobs in minute 2 and 1 in minute 4 must each be served
    // within their minute (none may wait into the next): 2 pods serving at minute 2, so
    // launched at minute 1 and billed for minutes 1 and 2; then 1 pod serving at minute 4,
    // billed for minutes 3 and 4 (kept or relaunched alike). 2 + 2 + 1 + 1 pod-minutes = $0.06.
    let (p, params) = tiny(0, 60, 5, 5);
    let trace = per_minute(6, |m| match m {
        2 => 2.0,
        4 => 1.0,
        _ => 0.0,
    });
    let bound = lower_bound(&trace, &p, &params).unwrap();
    assert!((bound.usd - 0.06).abs() < 1e-9, "{bound:?}");
    assert_eq!(bound.violation_minutes, 0);
    // The same with the SLO enforced at every tick by hand; none enforced needs no pod.
    let usd = lower_bound_where(&trace, &p, &params, &[true; 6]).unwrap();
    assert!((usd - 0.06).abs() < 1e-9, "{usd}");
    assert_eq!(lower_bound_where(&trace, &p, &params, &[]).unwrap(), 0.0);
    // Enforced only when minute 4 starts: minute 2's jobs must be served by then (one pod
    // serving minutes 2 and 3, launched at minute 1: 3 pod-minutes); minute 4's job may wait.
    let minute_4 = [false, false, false, false, true, false];
    let usd = lower_bound_where(&trace, &p, &params, &minute_4).unwrap();
    assert!((usd - 0.03).abs() < 1e-9, "{usd}");
}

#[test]
fn the_bound_with_slo_headroom_and_no_boot_matches_a_hand_computed_optimum() {
    // A 70 s SLO over a 10 s service time leaves 60 s of queueing: at each tick's start at most
    // 1 job may wait per GPU seen running (1 job per GPU per minute). No baseline, no boot: a
    // pod launched at a tick serves in it but is seen only at the next. 3 jobs in minute 0:
    // `a` pod-minutes in minute 0 leave 3 − a waiting at minute 1, at most a, so a ≥ 1.5;
    // minute 1 then needs half the rest, (3 − a) / 2: 1.5 + a / 2 pod-minutes, least at
    // a = 1.5: 2.25 pod-minutes, $0.0225.
    let (mut p, params) = tiny(0, 0, 5, 5);
    p.slo_p95_seconds = 70.0;
    let trace = per_minute(3, |m| if m == 0 { 3.0 } else { 0.0 });
    let bound = lower_bound(&trace, &p, &params).unwrap();
    assert!((bound.usd - 0.0225).abs() < 1e-9, "{bound:?}");
    assert_eq!(bound.violation_minutes, 0);
}

#[test]
fn a_later_segment_starts_from_the_backlog_floor_with_booted_pods() {
    // 722 one-minute ticks, so two programs cut at tick 720. One baseline GPU, at most one
    // 2-GPU pod (3 jobs a minute at most), a 60 s queueing headroom (1 job per GPU seen
    // running). 5.5 jobs in minute 719: at least 2.5 still wait at minute 720 whatever the
    // schedule, which the second program starts from, with pods already booted (they make
    // minute 720's start legal for free). Minute 721's start then allows 1 + 2·(pods seen
    // running) waiting: with R pods serving minute 720, 1.5 − 2R ≤ 1 + 2R, so R ≥ 0.125:
    // $0.00125. The first program needs no pod.
    let (mut p, params) = tiny(1, 60, 1, 1);
    p.slo_p95_seconds = 70.0;
    p.pod.gpus = 2;
    let trace = per_minute(722, |m| if m == 719 { 5.5 } else { 0.0 });
    let bound = lower_bound(&trace, &p, &params).unwrap();
    assert!((bound.usd - 0.00125).abs() < 1e-9, "{bound:?}");
    assert_eq!(bound.violation_minutes, 0);
}

#[test]
fn long_programs_are_cut_at_an_enforced_tick_between_720_and_1440_ticks() {
    use super::bound::segment_ends;
    let all = vec![true; 3000];
    assert_eq!(segment_ends(0, &all), Vec::<usize>::new());
    assert_eq!(segment_ends(100, &all), [100]);
    assert_eq!(segment_ends(720, &all), [720]);
    assert_eq!(segment_ends(721, &all), [720, 721]);
    assert_eq!(segment_ends(3000, &all), [720, 1440, 2160, 2880, 3000]);
    // Not enforced from tick 720 to 999: the first cut waits for tick 1000.
    let mut gap = all.clone();
    gap[720..1000].fill(false);
    assert_eq!(segment_ends(3000, &gap), [1000, 1720, 2440, 3000]);
    // Nothing enforced (missing entries count as not enforced): cut after 1440 ticks.
    assert_eq!(segment_ends(3000, &[]), [1440, 2880, 3000]);
}

#[test]
fn the_bound_matches_a_hand_computed_optimum_with_unavoidable_violations() {
    // One baseline GPU, a two-minute boot, at most one pod. 4 jobs in minute 0: the baseline
    // serves 1 a minute, and no pod can serve before minute 2, so 3 then 2 jobs wait at
    // minutes 1 and 2 whatever the schedule (2 unavoidable violation minutes). Minute 3 is
    // clean only if minute 2 serves both waiting jobs: one pod serving at minute 2, launched
    // at minute 0 and billed for minutes 0, 1 and 2 = $0.03.
    let (p, params) = tiny(1, 120, 1, 1);
    let trace = per_minute(5, |m| if m == 0 { 4.0 } else { 0.0 });
    let bound = lower_bound(&trace, &p, &params).unwrap();
    assert!((bound.usd - 0.03).abs() < 1e-9, "{bound:?}");
    assert_eq!(bound.violation_minutes, 2);
    // Every policy pays at least that much and violates at least those minutes.
    for kind in PolicyKind::ALL {
        let mut p = p.clone();
        p.kind = kind;
        let r = simulate(&trace, &p, &params);
        assert!(r.total_usd >= bound.usd - 1e-9, "{kind}: {r:?}");
        assert!(r.slo_violation_minutes >= 2, "{kind}: {r:?}");
    }
}

#[test]
fn a_world_without_usable_pods_has_a_zero_bound() {
    let trace = per_minute(5, |_| 30.0);
    for tweak in [
        (|p: &mut Policy, _: &mut SimParams| p.max_pods = 0) as fn(&mut Policy, &mut SimParams),
        |p, _| p.pod.gpus = 0,
        |p, _| p.pod.usd_per_hour = Usd(0.0),
        |p, _| p.max_usd_per_hour = Usd(0.0),
        |_, s| s.jobs_per_gpu_per_minute = 0.0,
    ] {
        let (mut p, mut params) = tiny(1, 60, 5, 5);
        tweak(&mut p, &mut params);
        let bound = lower_bound(&trace, &p, &params).unwrap();
        assert_eq!(bound.usd, 0.0, "{p:?} {params:?}");
    }
}

/// A random small world and trace for the bound's property test.
#[derive(Debug, Clone)]
struct BoundCase {
    rates: Vec<f64>,
    tick_s: u64,
    boot_s: u64,
    baseline: u32,
    max_pods: u32,
    launches: u32,
    gpus: u32,
    slo_s: f64,
    service_s: f64,
}

impl BoundCase {
    /// The case's trace, policy (the reference one with the case's limits) and world.
    fn world(&self) -> (Trace, Policy, SimParams) {
        let trace = per_minute(self.rates.len() as u64, |m| self.rates[m as usize].round());
        let mut p = default_policy();
        p.max_pods = self.max_pods;
        p.max_launches_per_tick = self.launches;
        p.pod.gpus = self.gpus;
        p.slo_p95_seconds = self.slo_s;
        let params = SimParams {
            tick: Duration::from_secs(self.tick_s),
            boot_delay: Duration::from_secs(self.boot_s),
            jobs_per_gpu_per_minute: 4.0,
            service_seconds: self.service_s,
            baseline_gpus: self.baseline,
        };
        (trace, p, params)
    }
}

fn arb_bound_case() -> impl proptest::strategy::Strategy<Value = BoundCase> {
    use proptest::prelude::*;
    (
        // Quiet minutes, bursts and everything between.
        proptest::collection::vec(prop_oneof![Just(0.0), 0.0f64..12.0, 20.0f64..120.0], 5..40),
        prop_oneof![Just(15u64), Just(30), Just(60)],
        0u64..240,
        0u32..4,
        1u32..12,
        1u32..6,
        1u32..3,
        5.0f64..120.0,
        0.0f64..20.0,
    )
        .prop_map(
            |(rates, tick_s, boot_s, baseline, max_pods, launches, gpus, slo_s, service_s)| {
                BoundCase {
                    rates,
                    tick_s,
                    boot_s,
                    baseline,
                    max_pods,
                    launches,
                    gpus,
                    slo_s,
                    service_s,
                }
            },
        )
}

/// The timeline is the report, tick by tick: launches add up to the creations, violated ticks
/// fall in exactly the violation minutes, the spend rate integrates to the spend.
#[test]
fn the_timeline_adds_up_to_the_report() {
    let trace = bursty_like();
    for kind in PolicyKind::ALL {
        let (r, timeline) = replay(&trace, &policy(kind), &params(2));
        assert_eq!(timeline.len(), 360 * 4, "{kind}");
        let launched: usize = timeline.iter().map(|t| t.launched).sum();
        let terminated: usize = timeline.iter().map(|t| t.terminated).sum();
        assert_eq!(launched as u64, r.pod_creations, "{kind}");
        assert!(terminated > 0, "{kind}: the bursts' pods are let go");
        let last = timeline.last().map_or(0, |t| t.pods);
        assert_eq!(launched - terminated, last, "{kind}");
        let peak = timeline.iter().map(|t| t.pods).max().unwrap_or(0);
        assert_eq!(peak as u32, r.peak_pods, "{kind}");
        let mut minutes: Vec<u64> = timeline
            .iter()
            .filter(|t| t.violated)
            .map(|t| t.minute)
            .collect();
        minutes.dedup();
        assert_eq!(minutes.len() as u64, r.slo_violation_minutes, "{kind}");
        for t in &timeline {
            assert_eq!(t.minute, t.at.as_millis() / 60_000, "{kind}");
            assert_eq!(t.violated, t.p95_seconds > 60.0, "{kind}");
            assert!(
                t.usd_per_hour.is_sign_positive(),
                "{kind}: {}",
                t.usd_per_hour
            );
        }
        let usd: f64 = timeline
            .iter()
            .map(|t| t.usd_per_hour * 15.0 / 3600.0)
            .sum();
        assert!(
            (usd - r.total_usd).abs() < 1e-9,
            "{kind}: {usd} vs {}",
            r.total_usd
        );
        let served: f64 = timeline
            .iter()
            .map(|t| t.served_baseline + t.served_pods)
            .sum();
        assert!((served - r.jobs_completed).abs() < 1e-6, "{kind}");
    }
}

/// The timeline CSV: a header, then one row per tick of each replay in the order written,
/// with a trace name that needs quoting quoted.
#[test]
fn the_timeline_csv_has_a_row_per_tick() {
    let trace = per_minute(3, |m| if m == 1 { 40.0 } else { 0.0 });
    let mut out = TimelineWriter::new(Vec::new());
    for kind in [PolicyKind::Target, PolicyKind::Cost] {
        let (_, ticks) = replay(&trace, &policy(kind), &params(1));
        out.write("spike, small", kind, &ticks).unwrap();
    }
    let text = String::from_utf8(out.finish().unwrap()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "trace,policy,time_s,minute,queue_observed,p95_s,violated,launched,terminated,pods,\
         running_gpus,usd_per_hour,served_baseline,served_pods,queue_after"
    );
    assert_eq!(lines.len(), 1 + 2 * 12);
    assert_eq!(
        lines[1],
        "\"spike, small\",target,0.0,0,0.0,10.0,false,0,0,0,0,0.0,0.0,0.0,0.0"
    );
    assert!(
        lines[13].starts_with("\"spike, small\",cost,0.0,0,"),
        "{}",
        lines[13]
    );
    // Minute 1 brings 10 jobs a tick; one baseline GPU serves 1. At 75 s the target policy sees
    // 9 jobs (p95 10 + 9 / (1 × 4/60) = 145 s), wants ⌈9/3⌉ = 3 GPUs, launches 2 pods
    // ($0.52/h, still booting), and 9 + 10 − 1 = 18 jobs wait after the tick.
    assert_eq!(
        lines[6],
        "\"spike, small\",target,75.0,1,9.0,145.0,true,2,0,2,0,0.52,1.0,0.0,18.0"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// The bound is a lower bound: for every policy, the cheapest schedule meeting the SLO
    /// wherever that policy met it costs no more than the policy did; no policy has fewer
    /// violation minutes than the bound's; and one with just as few paid at least the bound.
    #[test]
    fn the_bound_is_never_above_a_policy(case in arb_bound_case()) {
        let (trace, mut p, params) = case.world();
        let bound = lower_bound(&trace, &p, &params).unwrap();
        for kind in PolicyKind::ALL {
            p.kind = kind;
            let (report, timeline) = replay(&trace, &p, &params);
            let met: Vec<bool> = timeline.iter().map(|t| t.p95_seconds <= p.slo_p95_seconds).collect();
            let own = lower_bound_where(&trace, &p, &params, &met).unwrap();
            let slack = 1e-6 * (1.0 + report.total_usd);
            proptest::prop_assert!(own <= report.total_usd + slack,
                "{kind}: bound at its own SLO {own} above its cost {}", report.total_usd);
            proptest::prop_assert!(bound.violation_minutes <= report.slo_violation_minutes,
                "{kind}: {} violation minutes, fewer than the unavoidable {}",
                report.slo_violation_minutes, bound.violation_minutes);
            if report.slo_violation_minutes == bound.violation_minutes {
                proptest::prop_assert!(bound.usd <= report.total_usd + slack,
                    "{kind}: bound {} above its cost {}", bound.usd, report.total_usd);
            }
        }
    }

    /// Every policy is reactive: it launches only at a tick whose observed backlog is above
    /// zero or whose p95 is above the objective, never on an empty queue within the SLO (no
    /// pod is bought without a signal asking for it).
    #[test]
    fn no_policy_launches_without_a_signal(case in arb_bound_case()) {
        let (trace, mut p, params) = case.world();
        for kind in PolicyKind::ALL {
            p.kind = kind;
            let (_, timeline) = replay(&trace, &p, &params);
            for t in timeline.iter().filter(|t| t.launched > 0) {
                proptest::prop_assert!(t.queue_observed > 0.0 || t.violated,
                    "{kind} launched {} at {:?} on an empty queue with p95 {}",
                    t.launched, t.at, t.p95_seconds);
            }
        }
    }
}
