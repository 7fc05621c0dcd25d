//! Cost of one planner decision, by fleet size and policy.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

use runpod_autoscaler::decide::{decide, ClusterView, PodTemplate, PodView, Policy, PolicyKind};
use runpod_autoscaler::decide::{Sample, Series, Signals};
use runpod_autoscaler::model::{GpuTypeId, PodId, PodState, Timestamp, Usd};

const NOW: Timestamp = Timestamp::from_secs(2_000_000);

fn policy(kind: PolicyKind) -> Policy {
    Policy {
        kind,
        min_pods: 0,
        max_pods: 500,
        max_usd_per_hour: Usd(400.0),
        max_launches_per_tick: 10,
        pod: PodTemplate {
            gpu_type: GpuTypeId::from("NVIDIA L40S"),
            gpus: 1,
            usd_per_hour: Usd(0.86),
        },
        lag_per_gpu: 100.0,
        slo_p95_seconds: 30.0,
        latency_step_gpus: 1,
        scale_down_stabilization: Duration::from_secs(300),
        idle_timeout: Duration::from_secs(300),
        warmup_grace: Duration::from_secs(180),
        boot_deadline: Duration::from_secs(600),
        stale_after_intervals: 3,
    }
}

fn inputs(pods: usize, lag: f64) -> (ClusterView, Signals) {
    let view = ClusterView {
        synced: true,
        baseline_gpus: 4,
        pods: (0..pods)
            .map(|i| PodView {
                id: PodId(format!("pod{i:05}")),
                state: PodState::Running,
                gpus: 1,
                usd_per_hour: Usd(0.5 + (i % 7) as f64 * 0.1),
                created_at: NOW.minus(Duration::from_secs(3600 + i as u64)),
                ready: true,
                last_busy_at: Some(NOW.minus(Duration::from_secs((i % 900) as u64))),
                draining: false,
            })
            .collect(),
    };
    let mut queue = Series::new(Duration::from_secs(5), Duration::from_secs(310));
    let mut latency = Series::new(Duration::from_secs(5), Duration::from_secs(310));
    for k in (0..62u64).rev() {
        let at = NOW.minus(Duration::from_secs(k * 5));
        queue.push(Sample::at(lag + (k % 5) as f64 * 10.0, at));
        latency.push(Sample::at(12.0, at));
    }
    (
        view,
        Signals {
            queue,
            latency: Some(latency),
        },
    )
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    for kind in PolicyKind::ALL {
        for pods in [0usize, 10, 100, 500] {
            // Half the fleet's worth of lag: a scale-down pass over every pod.
            let (view, signals) = inputs(pods, pods as f64 * 50.0);
            let p = policy(kind);
            group.bench_with_input(BenchmarkId::new(kind.as_str(), pods), &pods, |b, _| {
                b.iter(|| decide(black_box(&view), black_box(&signals), black_box(&p), NOW))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
