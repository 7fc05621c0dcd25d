//! Table-driven and property tests of the planner.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::model::{GpuTypeId, PodId, PodState, SignalKind, Timestamp, Usd};

const NOW: Timestamp = Timestamp::from_secs(1_000_000);
const POLL: Duration = Duration::from_secs(5);

fn policy(kind: PolicyKind) -> Policy {
    Policy {
        kind,
        min_pods: 0,
        max_pods: 10,
        max_usd_per_hour: Usd(10.0),
        max_launches_per_tick: 100,
        pod: PodTemplate {
            gpu_type: GpuTypeId::from("NVIDIA RTX A5000"),
            gpus: 1,
            usd_per_hour: Usd(0.5),
        },
        lag_per_gpu: 100.0,
        slo_p95_seconds: 2.0,
        latency_step_gpus: 1,
        scale_down_stabilization: Duration::from_secs(300),
        idle_timeout: Duration::from_secs(120),
        warmup_grace: Duration::from_secs(180),
        boot_deadline: Duration::from_secs(600),
        stale_after_intervals: 3,
    }
}

fn signals(lag: f64, p95: Option<f64>, age: Duration) -> Signals {
    let at = NOW.minus(age);
    let mut queue = Series::new(POLL, Duration::from_secs(600));
    queue.push(Sample::at(lag, at));
    let latency = p95.map(|v| {
        let mut s = Series::new(POLL, Duration::from_secs(600));
        s.push(Sample::at(v, at));
        s
    });
    Signals { queue, latency }
}

/// A pod created `age` ago, running, idle since creation.
fn pod(id: &str, state: PodState, age: Duration) -> PodView {
    PodView {
        id: PodId::from(id),
        gpus: 1,
        usd_per_hour: Usd(0.5),
        created_at: NOW.minus(age),
        ready: state == PodState::Running,
        state,
        last_busy_at: None,
        draining: false,
    }
}

fn view(baseline: u32, pods: Vec<PodView>) -> ClusterView {
    ClusterView {
        synced: true,
        baseline_gpus: baseline,
        pods,
    }
}

fn old_running(n: usize) -> Vec<PodView> {
    (0..n)
        .map(|i| {
            pod(
                &format!("p{i}"),
                PodState::Running,
                Duration::from_secs(3600),
            )
        })
        .collect()
}

const FRESH: Duration = Duration::from_secs(1);
const STALE: Duration = Duration::from_secs(60);

struct Case {
    name: &'static str,
    kind: PolicyKind,
    view: ClusterView,
    signals: Signals,
    launches: usize,
    terminations: usize,
    hold: Option<fn(&Hold) -> bool>,
}

#[test]
fn table() {
    let cases = vec![
        Case {
            name: "target: lag 700 at 100/GPU with 2 baseline GPUs launches 5",
            kind: PolicyKind::Target,
            view: view(2, vec![]),
            signals: signals(700.0, Some(1.0), FRESH),
            launches: 5,
            terminations: 0,
            hold: None,
        },
        Case {
            name: "target: baseline covers the lag, no pods",
            kind: PolicyKind::Target,
            view: view(4, vec![]),
            signals: signals(350.0, Some(1.0), FRESH),
            launches: 0,
            terminations: 0,
            hold: None,
        },
        Case {
            name: "target: capped by max_pods",
            kind: PolicyKind::Target,
            view: view(0, vec![]),
            signals: signals(5000.0, None, FRESH),
            launches: 10,
            terminations: 0,
            hold: Some(|h| matches!(h, Hold::MaxPods { .. })),
        },
        Case {
            name: "target: booting pods count toward max_pods",
            kind: PolicyKind::Target,
            view: view(
                0,
                (0..8)
                    .map(|i| pod(&format!("b{i}"), PodState::Provisioning, FRESH))
                    .collect(),
            ),
            signals: signals(5000.0, None, FRESH),
            launches: 2,
            terminations: 0,
            hold: Some(|h| matches!(h, Hold::MaxPods { .. })),
        },
        Case {
            name: "target: latency above SLO steps up by one",
            kind: PolicyKind::Target,
            view: view(2, old_running(1)),
            signals: signals(0.0, Some(3.5), FRESH),
            launches: 1,
            terminations: 0,
            hold: None,
        },
        Case {
            name: "target: latency above SLO waits while a pod warms up",
            kind: PolicyKind::Target,
            view: view(2, vec![pod("new", PodState::Starting, FRESH)]),
            signals: signals(0.0, Some(3.5), FRESH),
            launches: 0,
            terminations: 0,
            hold: Some(|h| matches!(h, Hold::WarmingUp { .. })),
        },
        Case {
            name: "target: idle surplus is removed",
            kind: PolicyKind::Target,
            view: view(0, old_running(3)),
            signals: signals(100.0, Some(1.0), FRESH),
            launches: 0,
            terminations: 2,
            hold: None,
        },
        Case {
            name: "target: stale signal never scales down",
            kind: PolicyKind::Target,
            view: view(0, old_running(3)),
            signals: signals(0.0, Some(1.0), STALE),
            launches: 0,
            terminations: 0,
            hold: Some(|h| matches!(h, Hold::StaleSignal { .. })),
        },
        Case {
            name: "target: surplus inside warm-up grace is kept",
            kind: PolicyKind::Target,
            view: view(
                0,
                vec![pod("young", PodState::Running, Duration::from_secs(30))],
            ),
            signals: signals(0.0, None, FRESH),
            launches: 0,
            terminations: 0,
            hold: Some(|h| matches!(h, Hold::WaitingForIdle { .. })),
        },
        Case {
            name: "target: exited pod is cleaned up even on stale signals",
            kind: PolicyKind::Target,
            view: view(0, vec![pod("dead", PodState::Exited, STALE)]),
            signals: signals(0.0, None, STALE),
            launches: 0,
            terminations: 1,
            hold: Some(|h| matches!(h, Hold::StaleSignal { .. })),
        },
        Case {
            name: "not synced: nothing happens",
            kind: PolicyKind::Target,
            view: ClusterView {
                synced: false,
                baseline_gpus: 0,
                pods: vec![],
            },
            signals: signals(5000.0, None, FRESH),
            launches: 0,
            terminations: 0,
            hold: Some(|h| matches!(h, Hold::NotSynced)),
        },
        Case {
            name: "seed: depth 25 wants 3 pods, ignoring the baseline",
            kind: PolicyKind::Seed,
            view: view(4, vec![]),
            signals: signals(25.0, None, FRESH),
            launches: 3,
            terminations: 0,
            hold: None,
        },
        Case {
            name: "seed: depth 5 does not trigger",
            kind: PolicyKind::Seed,
            view: view(0, vec![]),
            signals: signals(5.0, Some(1.0), FRESH),
            launches: 0,
            terminations: 0,
            hold: None,
        },
        Case {
            name: "seed: p95 above SLO with an empty queue wants one pod",
            kind: PolicyKind::Seed,
            view: view(0, vec![]),
            signals: signals(0.0, Some(9.0), FRESH),
            launches: 1,
            terminations: 0,
            hold: None,
        },
        Case {
            name: "seed: empty queue and idle > 60 s removes every pod",
            kind: PolicyKind::Seed,
            view: view(0, old_running(4)),
            signals: signals(0.0, None, FRESH),
            launches: 0,
            terminations: 4,
            hold: None,
        },
        Case {
            name: "seed: small queue holds",
            kind: PolicyKind::Seed,
            view: view(0, old_running(4)),
            signals: signals(3.0, None, FRESH),
            launches: 0,
            terminations: 0,
            hold: None,
        },
    ];
    for case in cases {
        let plan = decide(&case.view, &case.signals, &policy(case.kind), NOW);
        assert_eq!(plan.launches(), case.launches, "{}\n{plan}", case.name);
        assert_eq!(
            plan.terminations(),
            case.terminations,
            "{}\n{plan}",
            case.name
        );
        if let Some(pred) = case.hold {
            assert!(
                plan.holds.iter().any(pred),
                "{}: expected hold\n{plan}",
                case.name
            );
        }
    }
}

#[test]
fn lag_demand_is_capped_at_the_workers_the_partitions_can_feed() {
    let mut p = policy(PolicyKind::Target);
    p.max_pods = 100;
    p.max_usd_per_hour = Usd(100.0);
    // (lag, max_workers, demand): 8 partitions feed at most 8 workers whatever the backlog;
    // without a limit (idle consumers allowed) the lag alone decides.
    for (lag, max_workers, demand) in [
        (5000.0, Some(8), 8),
        (5000.0, None, 50),
        (350.0, Some(8), 4),
        (0.0, Some(8), 0),
        (100.0, Some(0), 0),
    ] {
        let mut queue = Series::new(POLL, Duration::from_secs(600));
        queue.push(Sample {
            value: lag,
            observed_at: NOW.minus(FRESH),
            max_workers,
        });
        let s = Signals {
            queue,
            latency: None,
        };
        let plan = decide(&view(2, vec![]), &s, &p, NOW);
        assert_eq!(
            plan.demand_gpus, demand,
            "lag {lag} cap {max_workers:?}\n{plan}"
        );
        assert_eq!(
            plan.launches() as u32,
            demand.saturating_sub(2),
            "lag {lag} cap {max_workers:?}\n{plan}"
        );
    }
}

/// The policy of `examples/static.toml`: 2 baseline GPUs, 0–8 A5000 pods at $0.26/h within
/// $4/h, 5 launches per tick, 100 messages of lag per GPU.
fn static_example() -> Policy {
    let mut p = policy(PolicyKind::Target);
    p.max_pods = 8;
    p.max_usd_per_hour = Usd(4.0);
    p.max_launches_per_tick = 5;
    p.pod.usd_per_hour = Usd(0.26);
    p
}

#[test]
fn served_demand_is_not_capped_by_the_launch_rate() {
    let p = static_example();
    // (lag, budget, demand, served, desired): the launch rate limits what one tick leaves
    // (desired), never what KEDA is served; only max_pods and the budget cap that.
    for (lag, budget, demand, served, desired) in [
        (1000.0, 4.0, 10, 10, 7),
        (5000.0, 4.0, 50, 10, 7),
        (1000.0, 1.0, 10, 5, 5),
        (150.0, 4.0, 2, 2, 2),
        (0.0, 4.0, 0, 0, 2),
    ] {
        let mut p = p.clone();
        p.max_usd_per_hour = Usd(budget);
        let plan = decide(&view(2, vec![]), &signals(lag, Some(1.0), FRESH), &p, NOW);
        assert_eq!(
            (plan.demand_gpus, plan.served_gpus, plan.desired_gpus),
            (demand, served, desired),
            "lag {lag}, budget {budget}\n{plan}"
        );
    }
}

#[test]
fn no_work_serves_zero_even_with_baseline_and_pods() {
    // Empty queue, p95 fine: nothing to do, whatever exists (so KEDA can go to zero).
    let plan = decide(
        &view(2, old_running(3)),
        &signals(0.0, Some(1.0), FRESH),
        &static_example(),
        NOW,
    );
    assert_eq!(plan.served_gpus, 0, "{plan}");
    // p95 above the SLO is work even with an empty queue.
    let plan = decide(
        &view(2, old_running(3)),
        &signals(0.0, Some(45.0), FRESH),
        &static_example(),
        NOW,
    );
    assert_eq!(plan.served_gpus, 6, "{plan}");
}

#[test]
fn not_synced_still_serves_demand() {
    let unsynced = ClusterView {
        synced: false,
        baseline_gpus: 2,
        pods: vec![],
    };
    let plan = decide(
        &unsynced,
        &signals(1000.0, None, FRESH),
        &static_example(),
        NOW,
    );
    assert!(plan.steps.is_empty());
    assert_eq!(plan.served_gpus, 10, "{plan}");
}

#[test]
fn a_stale_p95_above_the_slo_does_not_ratchet_capacity_up() {
    // Prometheus went down while p95 was 45 s (SLO 2 s): every tick sees the same old sample.
    let p = policy(PolicyKind::Target);
    let mut pods = old_running(2);
    for tick in 0..10 {
        let plan = decide(
            &view(0, pods.clone()),
            &signals(0.0, Some(45.0), STALE),
            &p,
            NOW,
        );
        assert_eq!(plan.launches(), 0, "tick {tick}\n{plan}");
        assert_eq!(plan.terminations(), 0, "tick {tick}\n{plan}");
        assert!(plan.holds.iter().any(|h| matches!(
            h,
            Hold::StaleSignal {
                signal: SignalKind::LatencyP95,
                ..
            }
        )));
        pods = apply(&view(0, pods), &plan, NOW).pods;
    }
    // Fresh, the same p95 steps up.
    let plan = decide(&view(0, pods), &signals(0.0, Some(45.0), FRESH), &p, NOW);
    assert_eq!(plan.launches(), 1, "{plan}");
}

#[test]
fn a_pod_never_ready_is_replaced_after_the_boot_deadline() {
    let p = policy(PolicyKind::Target); // boot deadline 10 min
    let minutes = |m: u64| Duration::from_secs(60 * m);
    let mut running_not_ready = pod("noip", PodState::Running, minutes(11));
    running_not_ready.ready = false;
    // (name, pod, terminated, launches) with lag asking for 1 RunPod GPU.
    for (name, pod, terminated, launches) in [
        (
            "provisioning for 11 min",
            pod("stuck", PodState::Provisioning, minutes(11)),
            true,
            1,
        ),
        ("running without SSH for 11 min", running_not_ready, true, 1),
        (
            "provisioning for 5 min",
            pod("slow", PodState::Provisioning, minutes(5)),
            false,
            0,
        ),
        (
            "ready after 11 min",
            pod("fine", PodState::Running, minutes(11)),
            false,
            0,
        ),
    ] {
        let plan = decide(&view(0, vec![pod]), &signals(100.0, None, FRESH), &p, NOW);
        let timed_out = plan.steps.iter().any(|s| {
            matches!(
                s,
                Step::Terminate {
                    reason: Reason::BootTimeout { .. },
                    ..
                }
            )
        });
        assert_eq!(timed_out, terminated, "{name}\n{plan}");
        assert_eq!(plan.launches(), launches, "{name}\n{plan}");
    }
}

#[test]
fn when_prices_rise_above_the_budget_idle_pods_go_dearest_first() {
    let mut p = policy(PolicyKind::Target);
    p.max_usd_per_hour = Usd(2.0);
    // Four old idle pods whose prices rose: $0.9 + $0.8 + $0.5 + $0.4 = $2.6 > $2.
    let mut pods = old_running(4);
    for (pod, price) in pods.iter_mut().zip([0.5, 0.9, 0.4, 0.8]) {
        pod.usd_per_hour = Usd(price);
    }
    // Demand still wants all four: money wins, but only as far as needed.
    let plan = decide(
        &view(0, pods.clone()),
        &signals(400.0, None, STALE),
        &p,
        NOW,
    );
    let gone: Vec<&str> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Terminate {
                pod,
                reason: Reason::OverBudget { .. },
            } => Some(pod.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        gone,
        ["p1"],
        "the $0.9 pod alone brings spend to $1.7\n{plan}"
    );
    assert_eq!(plan.launches(), 0, "{plan}");
    // A busy pod is not taken, however dear: the next idle one is.
    pods[1].last_busy_at = Some(NOW);
    let plan = decide(&view(0, pods), &signals(400.0, None, STALE), &p, NOW);
    let gone: Vec<String> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Terminate { pod, .. } => Some(pod.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(gone, ["p3"], "{plan}");
}

#[test]
fn budget_limits_launches() {
    let mut p = policy(PolicyKind::Target);
    p.max_usd_per_hour = Usd(1.6);
    let plan = decide(
        &view(0, old_running(1)),
        &signals(900.0, None, FRESH),
        &p,
        NOW,
    );
    // 0.5 running + 2 × 0.5 = 1.5 ≤ 1.6; a third would be 2.0.
    assert_eq!(plan.launches(), 2, "{plan}");
    assert!(plan.holds.iter().any(|h| matches!(h, Hold::Budget { .. })));
}

#[test]
fn stabilization_window_keeps_recent_peak() {
    let p = policy(PolicyKind::Target);
    let mut queue = Series::new(POLL, Duration::from_secs(600));
    for (age, lag) in [(200, 400.0), (100, 50.0), (1, 0.0)] {
        queue.push(Sample::at(lag, NOW.minus(Duration::from_secs(age))));
    }
    let s = Signals {
        queue,
        latency: None,
    };
    let plan = decide(&view(0, old_running(5)), &s, &p, NOW);
    // The peak 400 within 300 s asks for 4 pods: one of five may go.
    assert_eq!(plan.terminations(), 1, "{plan}");
    assert!(plan
        .holds
        .iter()
        .any(|h| matches!(h, Hold::Stabilizing { window_pods: 4 })));
}

#[test]
fn plan_renders_steps_and_holds() {
    let mut p = policy(PolicyKind::Target);
    p.max_pods = 3;
    let plan = decide(&view(2, vec![]), &signals(700.0, Some(1.0), FRESH), &p, NOW);
    let text = plan.to_string();
    assert_eq!(
        text,
        "plan at 1970-01-12T13:46:40.000Z (policy target): demand 7 GPUs (served 5), baseline 2, RunPod pods 0 -> 3, desired 5 GPUs\n\
         \x20 3 x launch 1x NVIDIA RTX A5000 at $0.50/h: queue lag 700 needs 7 GPU workers\n\
         \x20 hold: max_pods 3 reached\n"
    );
    // A single step renders without a count.
    let plan = decide(&view(2, vec![]), &signals(300.0, None, FRESH), &p, NOW);
    assert!(
        plan.to_string().ends_with(
            "\n  launch 1x NVIDIA RTX A5000 at $0.50/h: queue lag 300 needs 3 GPU workers\n"
        ),
        "{plan}"
    );
}

/// Applies a plan to a view the way a perfect reconciler would.
fn apply(view: &ClusterView, plan: &Plan, now: Timestamp) -> ClusterView {
    let mut next = view.clone();
    for (i, step) in plan.steps.iter().enumerate() {
        match step {
            Step::Launch {
                gpus, usd_per_hour, ..
            } => next.pods.push(PodView {
                id: PodId(format!("new-{i}")),
                state: PodState::Provisioning,
                gpus: *gpus,
                usd_per_hour: *usd_per_hour,
                created_at: now,
                ready: false,
                last_busy_at: None,
                draining: false,
            }),
            Step::Terminate { pod, .. } => next.pods.retain(|p| &p.id != pod),
        }
    }
    next
}

fn arb_state() -> impl Strategy<Value = PodState> {
    prop_oneof![
        6 => Just(PodState::Running),
        1 => Just(PodState::Provisioning),
        1 => Just(PodState::Starting),
        1 => Just(PodState::Exited),
        1 => Just(PodState::Error),
        1 => Just(PodState::Unknown("HIBERNATING".into())),
    ]
}

prop_compose! {
    fn arb_pod()(id in 0u32..1000, state in arb_state(), gpus in 1u32..=2,
                 price in 0.1f64..2.0, age in 0u64..7200, busy in proptest::option::of(0u64..7200),
                 draining in proptest::bool::weighted(0.1),
                 ready in proptest::bool::weighted(0.9)) -> PodView {
        PodView {
            id: PodId(format!("p{id}")),
            ready: ready && state == PodState::Running,
            state,
            gpus,
            usd_per_hour: Usd(price),
            created_at: NOW.minus(Duration::from_secs(age)),
            last_busy_at: busy.map(|b| NOW.minus(Duration::from_secs(b))),
            draining,
        }
    }
}

prop_compose! {
    fn arb_view()(baseline in 0u32..8, pods in proptest::collection::vec(arb_pod(), 0..12)) -> ClusterView {
        let mut pods = pods;
        pods.sort_by(|a, b| a.id.cmp(&b.id));
        pods.dedup_by(|a, b| a.id == b.id);
        ClusterView { synced: true, baseline_gpus: baseline, pods }
    }
}

prop_compose! {
    fn arb_policy()(kind in 0usize..3, min_pods in 0u32..3, max_pods in 0u32..15,
                    budget in 0.0f64..20.0, rate in 1u32..20, gpus in 1u32..=2, price in 0.05f64..3.0,
                    lag_per_gpu in 1.0f64..500.0, slo in 0.5f64..10.0, step in 1u32..4,
                    stab in 0u64..600, idle in 0u64..600, grace in 0u64..600,
                    boot in 60u64..1800) -> Policy {
        Policy {
            kind: PolicyKind::ALL[kind],
            min_pods: min_pods.min(max_pods),
            max_pods,
            max_usd_per_hour: Usd(budget),
            max_launches_per_tick: rate,
            pod: PodTemplate { gpu_type: GpuTypeId::from("NVIDIA L40S"), gpus, usd_per_hour: Usd(price) },
            lag_per_gpu,
            slo_p95_seconds: slo,
            latency_step_gpus: step,
            scale_down_stabilization: Duration::from_secs(stab),
            idle_timeout: Duration::from_secs(idle),
            warmup_grace: Duration::from_secs(grace),
            boot_deadline: Duration::from_secs(boot),
            stale_after_intervals: 3,
        }
    }
}

prop_compose! {
    fn arb_signals()(lags in proptest::collection::vec((0u64..900, 0.0f64..5000.0), 1..8),
                     p95 in proptest::option::of(proptest::collection::vec((0u64..900, 0.0f64..10.0), 1..8)),
                     zero_lag in proptest::bool::weighted(0.3),
                     max_workers in proptest::option::of(0u32..16)) -> Signals {
        let mut queue = Series::new(POLL, Duration::from_secs(900));
        let mut lags = lags;
        lags.sort_by_key(|a| std::cmp::Reverse(a.0));
        for (age, lag) in lags {
            queue.push(Sample {
                value: if zero_lag { 0.0 } else { lag },
                observed_at: NOW.minus(Duration::from_secs(age)),
                max_workers,
            });
        }
        let latency = p95.map(|mut v| {
            v.sort_by_key(|a| std::cmp::Reverse(a.0));
            let mut s = Series::new(POLL, Duration::from_secs(900));
            for (age, p) in v {
                s.push(Sample::at(p, NOW.minus(Duration::from_secs(age))));
            }
            s
        });
        Signals { queue, latency }
    }
}

/// `series` with every value replaced by `value` (times and worker limits kept).
fn with_values(series: &Series, value: f64) -> Series {
    let mut out = Series::new(series.poll_interval, Duration::from_secs(900));
    for s in series.since(Timestamp::EPOCH) {
        out.push(Sample { value, ..*s });
    }
    out
}

fn fresh(signals: &Signals, policy: &Policy) -> bool {
    signals.queue.is_fresh(NOW, policy.stale_after_intervals)
        && signals
            .latency
            .as_ref()
            .is_none_or(|l| l.is_fresh(NOW, policy.stale_after_intervals))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn never_launches_past_max_pods_or_budget(view in arb_view(), signals in arb_signals(), policy in arb_policy()) {
        let plan = decide(&view, &signals, &policy, NOW);
        let existing = view.existing_pods().count() as u32;
        let launches = plan.launches() as u32;
        if launches > 0 {
            prop_assert!(existing + launches <= policy.max_pods, "{plan}");
            let spend = view.usd_per_hour().dollars() + f64::from(launches) * policy.pod.usd_per_hour.dollars();
            prop_assert!(spend <= policy.max_usd_per_hour.dollars() + 1e-5, "spend {spend}\n{plan}");
            prop_assert!(launches <= policy.max_launches_per_tick);
        }
        prop_assert!(plan.target_pods <= policy.max_pods.max(existing.min(plan.capacity_pods)), "{plan}");
    }

    #[test]
    fn stale_signals_never_scale_down(view in arb_view(), signals in arb_signals(), policy in arb_policy()) {
        prop_assume!(!fresh(&signals, &policy));
        let plan = decide(&view, &signals, &policy, NOW);
        for step in &plan.steps {
            if let Step::Terminate { reason, .. } = step {
                prop_assert!(!matches!(reason, Reason::Surplus { .. }), "{plan}");
            }
        }
    }

    #[test]
    fn stale_signals_never_scale_up_on_their_own(view in arb_view(), signals in arb_signals(), policy in arb_policy(), other in 0.0f64..10_000.0) {
        // Whatever value a stale signal last had, the plan launches exactly what it launches
        // with that signal at 0 or at any other value: a stale signal holds, it does not act.
        let intervals = policy.stale_after_intervals;
        let plan = decide(&view, &signals, &policy, NOW);
        if !signals.queue.is_fresh(NOW, intervals) {
            for v in [0.0, other] {
                let changed = Signals { queue: with_values(&signals.queue, v), ..signals.clone() };
                let again = decide(&view, &changed, &policy, NOW);
                prop_assert_eq!(plan.launches(), again.launches(), "stale lag at {}:\n{}\nvs\n{}", v, plan, again);
            }
        }
        if let Some(latency) = signals.latency.as_ref().filter(|l| !l.is_fresh(NOW, intervals)) {
            for v in [0.0, other] {
                let changed = Signals { latency: Some(with_values(latency, v)), ..signals.clone() };
                let again = decide(&view, &changed, &policy, NOW);
                prop_assert_eq!(plan.launches(), again.launches(), "stale p95 at {}:\n{}\nvs\n{}", v, plan, again);
            }
        }
    }

    #[test]
    fn served_demand_is_demand_within_what_can_ever_be_had(view in arb_view(), signals in arb_signals(), policy in arb_policy()) {
        let plan = decide(&view, &signals, &policy, NOW);
        let affordable = (policy.max_usd_per_hour.dollars() + Usd::EPSILON) / policy.pod.usd_per_hour.dollars();
        let ever = (policy.max_pods as f64).min(affordable.floor()) as u32 * policy.pod.gpus;
        let capacity: u32 = view.capacity_pods().filter(|p| !p.is_boot_overdue(NOW, policy.boot_deadline)).map(|p| p.gpus).sum();
        prop_assert_eq!(plan.served_gpus, plan.demand_gpus.min(view.baseline_gpus + ever.max(capacity)), "{}", plan);
    }

    #[test]
    fn applying_a_plan_converges(view in arb_view(), signals in arb_signals(), policy in arb_policy()) {
        // Stated for one pod shape: after a change of gpus_per_pod, rounding whole pods may
        // rebalance once (a small old pod goes once larger new ones cover its GPUs).
        let mut view = view;
        for pod in &mut view.pods {
            pod.gpus = policy.pod.gpus;
        }
        let plan = decide(&view, &signals, &policy, NOW);
        let next = apply(&view, &plan, NOW);
        let again = decide(&next, &signals, &policy, NOW);
        // A launch cut short by the per-tick rate, or by a limit that this plan's own
        // terminations free, legitimately continues next tick.
        let continues = plan.holds.iter().any(|h| match h {
            Hold::LaunchRate { .. } => true,
            Hold::MaxPods { .. } | Hold::Budget { .. } => plan.terminations() > 0,
            _ => false,
        });
        if !continues {
            prop_assert!(again.is_noop(), "first:\n{plan}\nagain:\n{again}");
        }
    }

    #[test]
    fn desired_gpus_is_what_the_plan_leaves(view in arb_view(), signals in arb_signals(), policy in arb_policy()) {
        let plan = decide(&view, &signals, &policy, NOW);
        let next = apply(&view, &plan, NOW);
        let gpus: u32 = next.capacity_pods().map(|p| p.gpus).sum();
        prop_assert_eq!(plan.desired_gpus, view.baseline_gpus + gpus);
    }
}

#[test]
fn hold_kind_matches_its_json_tag() {
    use crate::model::Usd;
    let holds = [
        Hold::NotSynced,
        Hold::StaleSignal {
            signal: SignalKind::QueueLag,
            age: None,
        },
        Hold::MaxPods { max_pods: 1 },
        Hold::Budget {
            max_usd_per_hour: Usd(1.0),
            current: Usd(1.0),
        },
        Hold::LaunchRate {
            max_launches_per_tick: 1,
        },
        Hold::Stabilizing { window_pods: 1 },
        Hold::WaitingForIdle { pods: 1 },
        Hold::WarmingUp { pods: 1 },
    ];
    for hold in holds {
        let json = serde_json::to_value(&hold).unwrap();
        assert_eq!(json["kind"], hold.kind(), "{hold:?}");
    }
}

/// A lag series with `values` sampled every `POLL`, the newest fresh.
fn lag_series(values: &[f64]) -> Signals {
    let mut queue = Series::new(POLL, Duration::from_secs(900));
    let n = values.len() as u32;
    for (i, v) in values.iter().enumerate() {
        queue.push(Sample::at(*v, NOW.minus(POLL * (n - 1 - i as u32))));
    }
    Signals {
        queue,
        latency: None,
    }
}

#[test]
fn cost_scales_up_for_the_lag_projected_over_the_boot() {
    let cost = policy(PolicyKind::Cost);
    let target = policy(PolicyKind::Target);
    // Lag rising 100 per 5 s poll: over the 180 s warm-up it would gain 3600, i.e. 36 more GPU
    // workers; max_pods (10) caps the launch.
    let rising = lag_series(&[300.0, 400.0]);
    let plan = decide(&view(2, vec![]), &rising, &cost, NOW);
    assert_eq!(plan.demand_gpus, 40, "{plan}");
    assert_eq!(plan.launches(), 10, "{plan}");
    // Target sizes for the lag as it is: 4 GPUs, 2 from the baseline.
    let plan = decide(&view(2, vec![]), &rising, &target, NOW);
    assert_eq!(plan.demand_gpus, 4, "{plan}");
    assert_eq!(plan.launches(), 2, "{plan}");
    // A slower rise projects proportionally: +10 per poll → +360 → 4 + 4 = 8 GPUs.
    let plan = decide(&view(2, vec![]), &lag_series(&[390.0, 400.0]), &cost, NOW);
    assert_eq!(plan.demand_gpus, 8, "{plan}");
    assert_eq!(plan.launches(), 6, "{plan}");
    // While a pod launched for the rise still boots, the rise is not projected again: the lag
    // as it is (4 GPUs) is covered by the baseline and the booting pod plus one more launch.
    let booting = pod("b", PodState::Provisioning, Duration::from_secs(30));
    let plan = decide(&view(2, vec![booting.clone()]), &rising, &cost, NOW);
    assert_eq!(plan.demand_gpus, 4, "{plan}");
    assert_eq!(plan.launches(), 1, "{plan}");
    // Just ready, inside its warm-up grace: the trend still predates its capacity, so it is
    // not projected yet either.
    let mut served = booting;
    served.state = PodState::Running;
    served.ready = true;
    let plan = decide(&view(2, vec![served.clone()]), &rising, &cost, NOW);
    assert_eq!(plan.demand_gpus, 4, "{plan}");
    assert_eq!(plan.launches(), 1, "{plan}");
    // Past the grace (180 s), the trend counts again.
    served.created_at = NOW.minus(Duration::from_secs(180));
    let plan = decide(&view(2, vec![served]), &rising, &cost, NOW);
    assert_eq!(plan.demand_gpus, 40, "{plan}");
    assert_eq!(plan.launches(), 9, "{plan}");
    // A falling lag is not counted on: the newest value decides.
    let plan = decide(&view(2, vec![]), &lag_series(&[900.0, 400.0]), &cost, NOW);
    assert_eq!(plan.demand_gpus, 4, "{plan}");
    // One sample: no trend.
    let plan = decide(&view(2, vec![]), &lag_series(&[400.0]), &cost, NOW);
    assert_eq!(plan.demand_gpus, 4, "{plan}");
    // Two samples at the same instant: no trend either (no division by zero).
    let mut same = lag_series(&[400.0]);
    same.queue.push(Sample::at(500.0, NOW));
    let plan = decide(&view(2, vec![]), &same, &cost, NOW);
    assert_eq!(plan.demand_gpus, 5, "{plan}");
}

/// `n` running one-GPU pods, warmed up long ago, each last busy `idle` ago.
fn idle_pods(n: usize, idle: Duration) -> Vec<PodView> {
    (0..n)
        .map(|i| {
            let mut p = pod(
                &format!("pod-{i}"),
                PodState::Running,
                Duration::from_secs(3600),
            );
            p.last_busy_at = Some(NOW.minus(idle));
            p
        })
        .collect()
}

#[test]
fn cost_releases_idle_pods_over_the_second_half_of_the_break_even() {
    let mut cost = policy(PolicyKind::Cost);
    cost.max_pods = 30;
    cost.max_usd_per_hour = Usd(100.0);
    // Break-even: min(idle_timeout 120 s, warm-up 180 s) = 120 s; each pod waits 60–120 s.
    let quiet = lag_series(&[0.0]);
    let gone = |idle_s: u64| {
        decide(
            &view(2, idle_pods(20, Duration::from_secs(idle_s))),
            &quiet,
            &cost,
            NOW,
        )
        .terminations()
    };
    assert_eq!(gone(59), 0);
    let midway = gone(90);
    assert!(0 < midway && midway < 20, "{midway} of 20 gone at 90 s");
    assert_eq!(gone(120), 20);
    // The count only grows with idle time.
    let counts: Vec<usize> = (55..=125).step_by(5).map(gone).collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    // No stabilization window: a high lag a minute ago does not hold idle pods (target's would).
    let was_busy = lag_series(&[5000.0, 0.0]);
    let pods = idle_pods(3, Duration::from_secs(150));
    let plan = decide(&view(2, pods.clone()), &was_busy, &cost, NOW);
    assert_eq!(plan.terminations(), 3, "{plan}");
    let mut target = policy(PolicyKind::Target);
    target.idle_timeout = Duration::from_secs(120);
    let plan = decide(&view(2, pods), &was_busy, &target, NOW);
    assert_eq!(plan.terminations(), 0, "{plan}");
}

#[test]
fn idle_shares_lie_in_the_second_half_and_spread() {
    let shares: Vec<f64> = (0..1000)
        .map(|i| idle_share(&PodId::from(format!("pod-{i}").as_str())))
        .collect();
    assert!(shares.iter().all(|s| (0.5..=1.0).contains(s)));
    assert_eq!(idle_share(&PodId::from("a")), idle_share(&PodId::from("a")));
    // The ski-rental density e^x / (e − 1) on [0, 1] has mean 1 / (e − 1) ≈ 0.582, so the mean
    // share is 0.5 + 0.5 × 0.582 ≈ 0.791; P(x < 0.5) = (√e − 1) / (e − 1) ≈ 0.378.
    let mean = shares.iter().sum::<f64>() / shares.len() as f64;
    assert!((mean - 0.791).abs() < 0.02, "mean share {mean}");
    let below = shares.iter().filter(|s| **s < 0.75).count();
    assert!((330..430).contains(&below), "{below} of 1000 below 0.75");
}

#[test]
fn several_pods_go_in_one_plan_and_the_rest_still_covers_demand() {
    let p = policy(PolicyKind::Target);
    // 5 idle one-GPU pods, a lag asking for 2 GPUs beyond a zero baseline: 3 go, 2 stay.
    let plan = decide(
        &view(0, idle_pods(5, Duration::from_secs(600))),
        &signals(200.0, None, FRESH),
        &p,
        NOW,
    );
    assert_eq!(plan.terminations(), 3, "{plan}");
    assert_eq!(plan.target_pods, 2, "{plan}");
    assert_eq!(plan.desired_gpus, 2, "{plan}");
    // Two-GPU pods: a 3-GPU want keeps two of them (one would leave 2 < 3).
    let mut big = idle_pods(4, Duration::from_secs(600));
    for pod in &mut big {
        pod.gpus = 2;
    }
    let plan = decide(&view(0, big), &signals(300.0, None, FRESH), &p, NOW);
    assert_eq!(plan.terminations(), 2, "{plan}");
    assert_eq!(plan.desired_gpus, 4, "{plan}");
}

#[test]
fn a_fleet_above_a_lowered_max_pods_shrinks_to_it_whatever_the_demand() {
    let mut p = policy(PolicyKind::Target);
    p.max_pods = 3;
    // 5 busy pods and a lag that wants all of them: 2 still go, the newest first.
    let mut pods = old_running(5);
    for (i, pod) in pods.iter_mut().enumerate() {
        pod.last_busy_at = Some(NOW);
        pod.created_at = NOW.minus(Duration::from_secs(3600 - i as u64));
    }
    let plan = decide(&view(0, pods), &signals(500.0, None, FRESH), &p, NOW);
    let gone: Vec<&PodId> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Terminate {
                pod,
                reason: Reason::AboveMaximum { max_pods: 3 },
            } => Some(pod),
            _ => None,
        })
        .collect();
    assert_eq!(gone, [&PodId::from("p4"), &PodId::from("p3")], "{plan}");
    assert_eq!(plan.launches(), 0, "{plan}");
    assert_eq!(plan.target_pods, 3, "{plan}");
    assert_eq!(plan.desired_gpus, 3, "{plan}");
    // Exactly at the limit nothing goes.
    p.max_pods = 5;
    let plan = decide(
        &view(0, old_running(5)),
        &signals(500.0, None, FRESH),
        &p,
        NOW,
    );
    assert_eq!(plan.terminations(), 0, "{plan}");
}

#[test]
fn surplus_goes_dearest_per_gpu_first_not_dearest_per_pod() {
    let mut p = policy(PolicyKind::Target);
    p.min_pods = 1;
    // A: 1 GPU at $1/h ($1 per GPU); B: 4 GPUs at $2/h ($0.50 per GPU). Only one may go.
    let mut a = idle_pods(1, Duration::from_secs(600)).remove(0);
    a.id = PodId::from("a");
    a.usd_per_hour = Usd(1.0);
    let mut b = idle_pods(1, Duration::from_secs(600)).remove(0);
    b.id = PodId::from("b");
    b.gpus = 4;
    b.usd_per_hour = Usd(2.0);
    let plan = decide(&view(0, vec![b, a]), &signals(0.0, None, FRESH), &p, NOW);
    assert_eq!(plan.terminations(), 1, "{plan}");
    assert!(
        matches!(&plan.steps[0], Step::Terminate { pod, .. } if pod.0 == "a"),
        "{plan}"
    );
}

/// An idle pod `id` with `gpus` GPUs at `usd`/h (last busy ten minutes ago, created an hour
/// ago).
fn priced_pod(id: &str, gpus: u32, usd: f64) -> PodView {
    let mut p = idle_pods(1, Duration::from_secs(600)).remove(0);
    p.id = PodId::from(id);
    p.gpus = gpus;
    p.usd_per_hour = Usd(usd);
    p
}

/// The pods a plan terminates, in plan order.
fn terminated(plan: &Plan) -> Vec<&str> {
    plan.steps
        .iter()
        .filter_map(|s| match s {
            Step::Terminate { pod, .. } => Some(pod.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn after_the_budget_pass_surplus_still_goes_dearest_per_gpu_first() {
    let mut p = policy(PolicyKind::Target);
    p.max_usd_per_hour = Usd(2.8);
    // $3.90/h in all: the budget takes the dearest pod, a ($1.20), leaving $2.70. Demand then
    // wants 2 of the 5 GPUs left. Per GPU, b ($0.90) > c ($0.70) > e ($0.40) > d ($0.30); per
    // pod, e ($0.80) comes before c. Going per GPU, b, c and d go (e's 2 GPUs would cut
    // below the want); per pod it would be b and e.
    let pods = vec![
        priced_pod("d", 1, 0.3),
        priced_pod("e", 2, 0.8),
        priced_pod("a", 2, 1.2),
        priced_pod("c", 1, 0.7),
        priced_pod("b", 1, 0.9),
    ];
    let plan = decide(&view(0, pods), &signals(200.0, None, FRESH), &p, NOW);
    assert_eq!(terminated(&plan), ["a", "b", "c", "d"], "{plan}");
    assert!(
        matches!(
            &plan.steps[0],
            Step::Terminate {
                reason: Reason::OverBudget { .. },
                ..
            }
        ),
        "{plan}"
    );
}

#[test]
fn over_budget_pods_of_equal_price_go_newest_first_then_by_id() {
    let mut p = policy(PolicyKind::Target);
    p.max_usd_per_hour = Usd(2.5);
    // Four idle pods at $1/h: two must go. Demand wants all four, so only money removes.
    let mut pods: Vec<PodView> = ["old", "y", "x", "new"]
        .iter()
        .map(|id| priced_pod(id, 1, 1.0))
        .collect();
    pods[0].created_at = NOW.minus(Duration::from_secs(7200));
    pods[3].created_at = NOW.minus(Duration::from_secs(900));
    let plan = decide(&view(0, pods), &signals(400.0, None, STALE), &p, NOW);
    // The newest first, then of the two created together the smaller id.
    assert_eq!(terminated(&plan), ["new", "x"], "{plan}");
}

#[test]
fn a_pod_without_gpus_goes_when_the_rest_exactly_covers_demand() {
    let p = policy(PolicyKind::Target);
    // One GPU wanted and one GPU there: the GPU-less pod (a CPU pod) adds nothing but bills.
    let pods = vec![priced_pod("gpu", 1, 0.5), priced_pod("cpu", 0, 0.1)];
    let plan = decide(&view(0, pods), &signals(100.0, None, FRESH), &p, NOW);
    assert_eq!(terminated(&plan), ["cpu"], "{plan}");
}

#[test]
fn a_step_up_is_attributed_to_whichever_signal_asks_more() {
    let p = policy(PolicyKind::Target);
    let reason = |lag: f64, p95: f64| {
        let plan = decide(&view(2, vec![]), &signals(lag, Some(p95), FRESH), &p, NOW);
        match plan.steps.first() {
            Some(Step::Launch { reason, .. }) => reason.clone(),
            other => panic!("expected a launch, got {other:?}\n{plan}"),
        }
    };
    // Lag 1000 asks for 10 GPUs, the latency step for 3: the lag decides.
    assert!(matches!(
        reason(1000.0, 9.0),
        Reason::QueueLag {
            needed_gpus: 10,
            ..
        }
    ));
    // Lag 100 asks for 1, the latency step for 3: latency decides.
    assert!(matches!(reason(100.0, 9.0), Reason::LatencyAboveSlo { .. }));
    // Equal asks (lag 300 → 3 GPUs, step 2 + 1 = 3): latency is named.
    assert!(matches!(reason(300.0, 9.0), Reason::LatencyAboveSlo { .. }));
}

#[test]
fn min_pods_is_kept_without_demand_and_named_as_the_reason() {
    for kind in [PolicyKind::Target, PolicyKind::Cost] {
        let mut p = policy(kind);
        p.min_pods = 2;
        let plan = decide(&view(2, vec![]), &signals(0.0, None, FRESH), &p, NOW);
        assert_eq!(plan.launches(), 2, "{plan}");
        assert!(
            plan.steps.iter().all(|s| matches!(
                s,
                Step::Launch {
                    reason: Reason::BelowMinimum { min_pods: 2 },
                    ..
                }
            )),
            "{plan}"
        );
        // With demand the baseline cannot cover, the lag is the reason.
        let plan = decide(&view(2, vec![]), &signals(500.0, None, FRESH), &p, NOW);
        assert!(
            matches!(
                plan.steps.first(),
                Some(Step::Launch {
                    reason: Reason::QueueLag { .. },
                    ..
                })
            ),
            "{plan}"
        );
    }
}

#[test]
fn launch_limits_hold_only_when_they_bind() {
    let has = |plan: &Plan, kind: &str| plan.holds.iter().any(|h| h.kind() == kind);
    let mut p = policy(PolicyKind::Target);
    p.max_launches_per_tick = 3;
    p.max_usd_per_hour = Usd(1.5); // 3 pods at $0.50/h exactly
                                   // Lag 500 → 5 GPUs, 2 from the baseline: 3 wanted, exactly what rate and budget allow.
    let plan = decide(&view(2, vec![]), &signals(500.0, None, FRESH), &p, NOW);
    assert_eq!(plan.launches(), 3, "{plan}");
    assert!(
        !has(&plan, "launch_rate") && !has(&plan, "budget"),
        "{plan}"
    );
    // One more wanted: the budget binds (rate would too, but the budget is tighter or equal).
    let plan = decide(&view(2, vec![]), &signals(600.0, None, FRESH), &p, NOW);
    assert_eq!(plan.launches(), 3, "{plan}");
    assert!(has(&plan, "budget"), "{plan}");
    assert!(!has(&plan, "launch_rate"), "{plan}");
    // With room in the budget, the rate binds alone.
    p.max_usd_per_hour = Usd(10.0);
    let plan = decide(&view(2, vec![]), &signals(600.0, None, FRESH), &p, NOW);
    assert_eq!(plan.launches(), 3, "{plan}");
    assert!(has(&plan, "launch_rate") && !has(&plan, "budget"), "{plan}");
    // Spend exactly at the budget: no headroom, nothing launches.
    p.max_usd_per_hour = Usd(1.0);
    let plan = decide(
        &view(2, old_running(2)),
        &signals(2000.0, None, FRESH),
        &p,
        NOW,
    );
    assert_eq!(plan.launches(), 0, "{plan}");
    assert!(has(&plan, "budget"), "{plan}");
}

#[test]
fn spend_exactly_at_the_budget_is_within_it() {
    let mut p = policy(PolicyKind::Target);
    p.max_usd_per_hour = Usd(2.0);
    // Five idle pods at $0.50/h: $2.50, one over. Removing one leaves exactly $2.00: one goes.
    let pods = idle_pods(5, Duration::from_secs(600));
    let plan = decide(&view(0, pods), &signals(500.0, None, STALE), &p, NOW);
    let over_budget = plan
        .steps
        .iter()
        .filter(|s| {
            matches!(
                s,
                Step::Terminate {
                    reason: Reason::OverBudget { .. },
                    ..
                }
            )
        })
        .count();
    assert_eq!(over_budget, 1, "{plan}");
    // Four: exactly at the budget, none goes.
    let plan = decide(
        &view(0, idle_pods(4, Duration::from_secs(600))),
        &signals(500.0, None, STALE),
        &p,
        NOW,
    );
    assert_eq!(plan.terminations(), 0, "{plan}");
}

#[test]
fn max_pods_holds_only_when_it_cuts_the_launch() {
    let has = |plan: &Plan| plan.holds.iter().any(|h| h.kind() == "max_pods");
    let mut p = policy(PolicyKind::Target);
    p.max_pods = 3;
    // Lag 500 → 5 GPUs, 2 from the baseline: 3 pods wanted, exactly max_pods.
    let plan = decide(&view(2, vec![]), &signals(500.0, None, FRESH), &p, NOW);
    assert_eq!(plan.launches(), 3, "{plan}");
    assert!(!has(&plan), "{plan}");
    // One more wanted: max_pods cuts it.
    let plan = decide(&view(2, vec![]), &signals(600.0, None, FRESH), &p, NOW);
    assert_eq!(plan.launches(), 3, "{plan}");
    assert!(has(&plan), "{plan}");
}

#[test]
fn a_budget_that_is_an_exact_multiple_of_the_price_pays_for_every_pod() {
    let mut p = policy(PolicyKind::Target);
    p.max_usd_per_hour = Usd(2.0); // 4 pods at $0.50/h, to the cent
    let plan = decide(&view(2, vec![]), &signals(5000.0, None, FRESH), &p, NOW);
    assert_eq!(plan.served_gpus, 2 + 4, "{plan}");
    assert_eq!(plan.launches(), 4, "{plan}");
}

#[test]
fn scale_down_stops_at_min_pods_and_names_the_target_left() {
    let mut p = policy(PolicyKind::Target);
    p.min_pods = 2;
    // Five idle pods and no demand: three go, each naming the pods left after it.
    let plan = decide(
        &view(0, idle_pods(5, Duration::from_secs(600))),
        &signals(0.0, None, FRESH),
        &p,
        NOW,
    );
    let left: Vec<u32> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Terminate {
                reason: Reason::Surplus { target_pods, .. },
                ..
            } => Some(*target_pods),
            _ => None,
        })
        .collect();
    assert_eq!(left, [4, 3, 2], "{plan}");
    // Nothing is waiting to be idle: no hold says so.
    assert!(plan.holds.is_empty(), "{plan}");
}

#[test]
fn a_pod_idle_for_exactly_the_timeout_goes() {
    let p = policy(PolicyKind::Target); // idle_timeout 120 s
    let plan = decide(
        &view(2, idle_pods(1, Duration::from_secs(120))),
        &signals(0.0, None, FRESH),
        &p,
        NOW,
    );
    assert_eq!(plan.terminations(), 1, "{plan}");
    let plan = decide(
        &view(2, idle_pods(1, Duration::from_secs(119))),
        &signals(0.0, None, FRESH),
        &p,
        NOW,
    );
    assert_eq!(plan.terminations(), 0, "{plan}");
    assert!(
        plan.holds.contains(&Hold::WaitingForIdle { pods: 1 }),
        "{plan}"
    );
}

#[test]
fn a_plan_with_steps_is_not_a_noop() {
    let p = policy(PolicyKind::Target);
    let plan = decide(&view(0, vec![]), &signals(500.0, None, FRESH), &p, NOW);
    assert!(!plan.is_noop(), "{plan}");
    assert_eq!((plan.launches(), plan.terminations()), (5, 0), "{plan}");
    let quiet = decide(&view(2, vec![]), &signals(0.0, None, FRESH), &p, NOW);
    assert!(quiet.is_noop(), "{quiet}");
}

#[test]
fn seed_rule_boundaries_reasons_and_its_max_pods_hold() {
    let mut p = policy(PolicyKind::Seed);
    p.max_pods = 3;
    p.max_usd_per_hour = Usd(100.0);
    let plan_for =
        |lag: f64, p95: Option<f64>| decide(&view(0, vec![]), &signals(lag, p95, FRESH), &p, NOW);
    let first_reason = |plan: &Plan| match plan.steps.first() {
        Some(Step::Launch { reason, .. }) => reason.clone(),
        other => panic!("expected a launch, got {other:?}\n{plan}"),
    };
    // p95 exactly at the SLO is within it: no trigger.
    assert_eq!(plan_for(0.0, Some(2.0)).launches(), 0);
    // Above it with a short queue: latency is the reason (depth 5 does not trigger by itself).
    let plan = plan_for(5.0, Some(2.5));
    assert_eq!(plan.launches(), 1, "{plan}");
    assert!(
        matches!(first_reason(&plan), Reason::LatencyAboveSlo { .. }),
        "{plan}"
    );
    // Depth above 5: the queue is the reason; 25 jobs → 25/10 + 1 = 3 pods, exactly max_pods.
    let plan = plan_for(25.0, Some(2.5));
    assert_eq!(plan.launches(), 3, "{plan}");
    assert!(
        matches!(first_reason(&plan), Reason::QueueLag { needed_gpus: 3, .. }),
        "{plan}"
    );
    assert!(plan.holds.is_empty(), "{plan}");
    // One pod more than max_pods: the hold says so.
    let plan = plan_for(30.0, None);
    assert_eq!(plan.launches(), 3, "{plan}");
    assert!(
        plan.holds.contains(&Hold::MaxPods { max_pods: 3 }),
        "{plan}"
    );
    // An absurd depth neither overflows nor exceeds the limit.
    let plan = plan_for(1e12, None);
    assert_eq!(plan.launches(), 3, "{plan}");
}

#[test]
fn a_p95_exactly_at_the_slo_is_within_it() {
    for kind in [PolicyKind::Target, PolicyKind::Cost] {
        let p = policy(kind); // SLO 2 s
        let at = decide(&view(2, vec![]), &signals(0.0, Some(2.0), FRESH), &p, NOW);
        assert_eq!(at.launches(), 0, "{at}");
        let above = decide(&view(2, vec![]), &signals(0.0, Some(2.01), FRESH), &p, NOW);
        assert_eq!(above.launches(), 1, "{above}");
    }
}

/// Signals with lag samples `(age_s, value)` and p95 samples `(age_s, value)`, oldest first.
fn history(lags: &[(u64, f64)], p95s: &[(u64, f64)]) -> Signals {
    let series = |points: &[(u64, f64)]| {
        let mut s = Series::new(POLL, Duration::from_secs(600));
        for (age, v) in points {
            s.push(Sample::at(*v, NOW.minus(Duration::from_secs(*age))));
        }
        s
    };
    Signals {
        queue: series(lags),
        latency: (!p95s.is_empty()).then(|| series(p95s)),
    }
}

#[test]
fn stabilization_holds_only_what_it_must_and_a_p95_at_the_slo_is_no_breach() {
    let p = policy(PolicyKind::Target); // SLO 2 s, window 300 s, 100 lag per GPU
    let stabilizing = |plan: &Plan| plan.holds.iter().any(|h| h.kind() == "stabilizing");
    // Three idle pods and a lag asking for all three now: no surplus, so a higher peak in the
    // window (500) holds nothing back and says nothing.
    let s = history(&[(200, 500.0), (1, 300.0)], &[]);
    let plan = decide(&view(0, old_running(3)), &s, &p, NOW);
    assert_eq!(plan.terminations(), 0, "{plan}");
    assert!(!stabilizing(&plan), "{plan}");
    // The peak asks for exactly what the current lag asks for: no hold.
    let s = history(&[(200, 200.0), (1, 200.0)], &[]);
    let plan = decide(&view(0, old_running(3)), &s, &p, NOW);
    assert_eq!(plan.terminations(), 1, "{plan}");
    assert!(!stabilizing(&plan), "{plan}");
    // A p95 exactly at the SLO in the window is no breach: the idle pods go.
    let s = history(&[(1, 0.0)], &[(200, 2.0), (1, 1.0)]);
    let plan = decide(&view(0, old_running(3)), &s, &p, NOW);
    assert_eq!(plan.terminations(), 3, "{plan}");
    // Above it, the window keeps them.
    let s = history(&[(1, 0.0)], &[(200, 2.5), (1, 1.0)]);
    let plan = decide(&view(0, old_running(3)), &s, &p, NOW);
    assert_eq!(plan.terminations(), 0, "{plan}");
    assert!(stabilizing(&plan), "{plan}");
}

#[test]
fn min_pods_is_the_reason_even_with_a_stale_slow_p95() {
    let mut p = policy(PolicyKind::Target);
    p.min_pods = 2;
    // p95 above the SLO but stale, no lag, nothing running: the stale p95 adds nothing, so
    // the launches are for min_pods.
    let plan = decide(&view(0, vec![]), &signals(0.0, Some(9.0), STALE), &p, NOW);
    assert_eq!(plan.launches(), 2, "{plan}");
    assert!(
        matches!(
            plan.steps.first(),
            Some(Step::Launch {
                reason: Reason::BelowMinimum { min_pods: 2 },
                ..
            })
        ),
        "{plan}"
    );
}

#[test]
fn a_pod_warms_while_not_ready_or_inside_the_grace_and_not_from_its_end() {
    let grace = Duration::from_secs(180);
    let young = pod("a", PodState::Running, Duration::from_secs(60));
    assert!(young.is_warming(NOW, grace));
    let booting_long = pod("b", PodState::Provisioning, Duration::from_secs(3600));
    assert!(booting_long.is_warming(NOW, grace));
    let at_end = pod("c", PodState::Running, grace);
    assert!(!at_end.is_warming(NOW, grace));
    let old = pod("d", PodState::Running, Duration::from_secs(3600));
    assert!(!old.is_warming(NOW, grace));
}

/// A running one-GPU pod named `id`, created `age` ago and last busy `idle` ago.
fn busy_pod(id: &str, age: Duration, idle: Duration) -> PodView {
    let mut p = pod(id, PodState::Running, age);
    p.last_busy_at = Some(NOW.minus(idle));
    p
}

#[test]
fn cost_keeps_a_continuing_loads_marginal_pods_for_eight_break_evens() {
    let cost = policy(PolicyKind::Cost);
    let quiet = lag_series(&[0.0]);
    let hour = Duration::from_secs(3600);
    let serving = |n: usize| -> Vec<PodView> {
        (0..n)
            .map(|i| busy_pod(&format!("busy-{i}"), hour, Duration::from_secs(10)))
            .collect()
    };
    let gone = |pods: Vec<PodView>, p: &Policy| -> Vec<String> {
        decide(&view(2, pods), &quiet, p, NOW)
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Terminate { pod, .. } => Some(pod.0.clone()),
                Step::Launch { .. } => None,
            })
            .collect()
    };
    // Break-even: min(idle_timeout 120 s, warm-up 180 s) = 120 s, so the marginal pod of a
    // continuing load waits 8 × 120 = 960 s.
    let with_idle = |n: usize, idle_s: u64| {
        let mut pods = serving(n);
        pods.push(busy_pod("idle", hour, Duration::from_secs(idle_s)));
        pods
    };
    assert!(gone(with_idle(3, 300), &cost).is_empty());
    assert!(gone(with_idle(3, 959), &cost).is_empty());
    assert_eq!(gone(with_idle(3, 960), &cost), ["idle"]);
    // The target policy has no such hysteresis: its idle timeout is all the pod waits.
    assert_eq!(
        gone(with_idle(3, 300), &policy(PolicyKind::Target)),
        ["idle"]
    );

    // A third of the serving pods' count, rounded up, of idle pods is kept: the last ones in
    // removal order (the oldest); the others go at the break-even.
    let idle_three = |n: usize| {
        let mut pods = serving(n);
        for (i, age) in [3000, 2000, 1000].into_iter().enumerate() {
            pods.push(busy_pod(
                &format!("idle-{i}"),
                Duration::from_secs(age),
                Duration::from_secs(300),
            ));
        }
        pods
    };
    let mut three = gone(idle_three(3), &cost);
    three.sort();
    assert_eq!(three, ["idle-1", "idle-2"]);
    assert_eq!(gone(idle_three(4), &cost), ["idle-2"]);
    assert!(gone(idle_three(7), &cost).is_empty());
    // Serving pods first in removal order (the newest) do not shift which idle pods are kept.
    let mut pods = idle_three(0);
    for i in 0..3 {
        pods.push(busy_pod(
            &format!("new-{i}"),
            Duration::from_secs(500),
            Duration::from_secs(10),
        ));
    }
    let mut newest_serving = gone(pods, &cost);
    newest_serving.sort();
    assert_eq!(newest_serving, ["idle-1", "idle-2"]);

    // No pod serving (the burst is over): every idle pod goes at the break-even.
    let mut none = gone(idle_three(0), &cost);
    none.sort();
    assert_eq!(none, ["idle-0", "idle-1", "idle-2"]);
    // Busy 59 s ago is serving; 60 s ago is idle, so nothing serves and the idle pod goes.
    let mut pods = vec![busy_pod("recent", hour, Duration::from_secs(59))];
    pods.push(busy_pod("idle", hour, Duration::from_secs(300)));
    assert!(gone(pods, &cost).is_empty());
    // (The idle pod is the older, last in removal order: it would be the one kept.)
    let mut pods = vec![busy_pod("recent", hour, Duration::from_secs(60))];
    pods.push(busy_pod("idle", hour * 2, Duration::from_secs(300)));
    assert!(gone(pods, &cost).contains(&"idle".to_owned()));
    // A pod still warming up does not count as serving, even when it has served.
    let pods = vec![
        busy_pod("warming", Duration::from_secs(30), Duration::from_secs(5)),
        busy_pod("idle", hour, Duration::from_secs(300)),
    ];
    assert_eq!(gone(pods, &cost), ["idle"]);
}
