//! Seeded chaos against the reconciler, in process: the real RunPod client and emulator (one
//! manual clock), the real claim store file, injected API faults (429s, 5xx, 500 after
//! create, listing lag, capacity exhaustion, never-ready pods, spot preemption, SSH failures)
//! and crashes at random points (the reconciler is dropped mid-step — before or after a
//! provider call reached the API — and a new one starts on the same claim store).
//!
//! After every run, from the emulator's record of every pod ever created: never more than
//! `max_pods` alive at once, never more than `max_usd_per_hour` at once, never two live pods
//! for one slot, and none alive once demand is zero and the GC grace has passed.
//!
//! `RPA_CHAOS_RUNS` (default 200) and `RPA_CHAOS_SEED` (default: fixed) size and pick the runs;
//! a failure prints the seed to rerun it alone (`RPA_CHAOS_SEED=<seed> RPA_CHAOS_RUNS=1`).
#![cfg(feature = "emulator")]

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::Notify;

use runpod_autoscaler::decide::offers::OfferSpec;
use runpod_autoscaler::emulator::Faults;
use runpod_autoscaler::model::{Cloud, GpuTypeId, PodId, Usd};
use runpod_autoscaler::provider::runpod::RunPodClient;
use runpod_autoscaler::provider::{CloudProvider, LaunchSpec, Offering, Pod, ProviderError};
use support::fleet::{check_history, policy, Fleet, FleetConfig, A5000};

const STEP: Duration = Duration::from_secs(5);
/// Steps with demand (a few minutes of simulated time).
const BUSY_STEPS: usize = 24;
/// Most steps allowed for everything to be gone after demand drops to zero (longer than the
/// orphan grace, the idle timeout, the drain and every backoff).
const DRAIN_STEPS: usize = 200;
/// Runs in flight at once (each is mostly waiting on loopback I/O).
const CONCURRENT_RUNS: usize = 4;

/// Where the next crash happens: the `at`-th provider call of the armed tick, before it is sent
/// or after its answer arrived.
#[derive(Default)]
struct Crash {
    armed: AtomicBool,
    at: AtomicU64,
    after: AtomicBool,
    calls: AtomicU64,
    tripped: Notify,
}

impl Crash {
    fn arm(&self, at: u64, after: bool) {
        self.calls.store(0, Ordering::SeqCst);
        self.at.store(at, Ordering::SeqCst);
        self.after.store(after, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Called around every provider call; never returns when this is the crash point.
    async fn point(&self, after_call: bool) {
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        let n = if after_call {
            self.calls.load(Ordering::SeqCst)
        } else {
            self.calls.fetch_add(1, Ordering::SeqCst) + 1
        };
        if n == self.at.load(Ordering::SeqCst) && after_call == self.after.load(Ordering::SeqCst) {
            self.armed.store(false, Ordering::SeqCst);
            self.tripped.notify_one();
            std::future::pending::<()>().await;
        }
    }
}

/// The real client with crash points around each call.
struct Crashing {
    inner: Arc<RunPodClient>,
    crash: Arc<Crash>,
}

impl Crashing {
    async fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        self.crash.point(false).await;
        let r = f.await;
        self.crash.point(true).await;
        r
    }
}

#[async_trait]
impl CloudProvider for Crashing {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Pod, ProviderError> {
        self.call(self.inner.launch(spec)).await
    }
    async fn create(&self, spec: &LaunchSpec) -> Result<Pod, ProviderError> {
        self.call(self.inner.create(spec)).await
    }
    async fn get(&self, id: &PodId) -> Result<Option<Pod>, ProviderError> {
        self.call(self.inner.get(id)).await
    }
    async fn list(&self) -> Result<Vec<Pod>, ProviderError> {
        self.call(self.inner.list()).await
    }
    async fn terminate(&self, id: &PodId) -> Result<(), ProviderError> {
        self.call(self.inner.terminate(id)).await
    }
    async fn offerings(&self) -> Result<Vec<Offering>, ProviderError> {
        self.call(self.inner.offerings()).await
    }
}

/// What one run looks like, drawn from its seed.
struct Scenario {
    faults: Faults,
    max_pods: u32,
    max_usd_per_hour: f64,
    max_launches: u32,
    spot: bool,
    sshd: bool,
    lags: Vec<f64>,
    crash_chance: f64,
}

fn scenario(seed: u64) -> Scenario {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut chance = |p: f64| rng.random_range(0.0..1.0) < p;
    let rate_limit = chance(0.3);
    let server_errors = chance(0.3);
    let after_create = chance(0.4);
    let list_lag = chance(0.4);
    let sold_out = chance(0.2);
    let never_ready = chance(0.1);
    let spot = chance(0.3);
    let preempt = spot && chance(0.6);
    // Real sshd pods cost process spawns: a tenth of the runs, enough to exercise joins,
    // probes, drains and SSH failures under the same faults.
    let sshd = chance(0.1);
    let ssh_down = sshd && chance(0.5);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let faults = Faults {
        rate_limit_rate: if rate_limit {
            rng.random_range(0.02..0.15)
        } else {
            0.0
        },
        retry_after_secs: rng.random_range(0..3),
        server_error_rate: if server_errors {
            rng.random_range(0.02..0.15)
        } else {
            0.0
        },
        error_after_create: if after_create {
            rng.random_range(1..4)
        } else {
            0
        },
        hide_new_pods_for: if list_lag {
            Duration::from_secs(rng.random_range(1..20))
        } else {
            Duration::ZERO
        },
        capacity_exhausted: if sold_out { vec![A5000.into()] } else { vec![] },
        never_ready,
        preempt_spot_after: preempt.then(|| Duration::from_secs(rng.random_range(30..150))),
        ssh_unreachable: ssh_down,
        ..Faults::default()
    };
    let max_pods = rng.random_range(1..6);
    // Sometimes the budget, not max_pods, is the binding limit.
    let max_usd_per_hour = if rng.random_range(0.0..1.0) < 0.5 {
        f64::from(max_pods) * 0.30
    } else {
        rng.random_range(0.3..1.2)
    };
    let lags = (0..BUSY_STEPS)
        .map(|i| {
            if i < 2 {
                0.0
            } else {
                f64::from(rng.random_range(0u32..9)) * 100.0
            }
        })
        .collect();
    Scenario {
        faults,
        max_pods,
        max_usd_per_hour,
        max_launches: rng.random_range(1..5),
        spot,
        sshd,
        lags,
        crash_chance: 0.15,
    }
}

fn offers(spot: bool) -> Vec<OfferSpec> {
    vec![
        OfferSpec {
            gpu_type: GpuTypeId::from(A5000),
            gpus_per_pod: 1,
            cloud: Cloud::Secure,
            data_centers: vec![],
            max_bid_per_gpu: spot.then_some(Usd(0.20)),
            throughput: 1.0,
        },
        OfferSpec {
            gpu_type: GpuTypeId::from("NVIDIA RTX A6000"),
            gpus_per_pod: 1,
            cloud: Cloud::Community,
            data_centers: vec![],
            max_bid_per_gpu: None,
            throughput: 1.0,
        },
    ]
}

async fn run(seed: u64) -> Result<(), String> {
    let s = scenario(seed);
    let crash = Arc::new(Crash::default());
    let wrap_crash = crash.clone();
    let mut p = policy();
    p.max_pods = s.max_pods;
    p.max_usd_per_hour = Usd(s.max_usd_per_hour);
    p.max_launches_per_tick = s.max_launches;
    let mut f = Fleet::start(FleetConfig {
        faults: s.faults.clone(),
        boot_delay: Duration::from_secs(10),
        policy: p,
        offers: offers(s.spot),
        seed,
        sshd: s.sshd,
        wrap: Some(Box::new(move |client| {
            Arc::new(Crashing {
                inner: client,
                crash: wrap_crash,
            }) as Arc<dyn CloudProvider>
        })),
        ..FleetConfig::default()
    })
    .await;
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc4a5);
    let mut crashes = 0;
    let steps = s.lags.len() + DRAIN_STEPS;
    for i in 0..steps {
        f.lag = s.lags.get(i).copied().unwrap_or(0.0);
        f.clock.advance(STEP);
        if rng.random_range(0.0..1.0) < s.crash_chance {
            crash.arm(rng.random_range(1..6), rng.random_range(0.0..1.0) < 0.5);
            let crashed = tokio::select! {
                _ = f.tick() => false,
                _ = crash.tripped.notified() => true,
            };
            crash.armed.store(false, Ordering::SeqCst);
            if crashed {
                crashes += 1;
                f.restart();
                continue;
            }
        } else {
            f.tick().await;
        }
        f.reconciler.settle().await;
        if i >= s.lags.len() && f.alive().is_empty() && f.reconciler.claims().count() == 0 {
            break;
        }
    }
    let pods = f.emu.admin_pods();
    check_history(&pods, s.max_pods, s.max_usd_per_hour, "rpa-t1-")?;
    let left: Vec<String> = f
        .alive()
        .iter()
        .map(|p| format!("{} {}", p.name, p.status))
        .collect();
    if !left.is_empty() || f.reconciler.claims().count() > 0 {
        return Err(format!(
            "left alive after demand fell to zero: {left:?}; open claims: {:?} ({crashes} crashes)",
            f.reconciler.claims().map(|c| c.key).collect::<Vec<_>>()
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_chaos_never_exceeds_limits_never_doubles_a_slot_and_leaves_nothing() {
    let started = std::time::Instant::now();
    let (ok, failures) =
        support::seeded_runs("RPA_CHAOS", 200, 0x7e57_c4a0, CONCURRENT_RUNS, run).await;
    let runs = ok.len() + failures.len();
    eprintln!(
        "{runs} chaos runs in {:.1}s ({:.0} runs/min)",
        started.elapsed().as_secs_f64(),
        runs as f64 * 60.0 / started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
}
