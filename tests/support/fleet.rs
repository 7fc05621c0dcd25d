//! A reconciler driven against the in-process RunPod emulator (real HTTP, real sshd pods, a
//! real claim store file), on one `ManualClock` shared by the emulator, the RunPod client and
//! the reconciler. Tests set the queue lag, advance time and tick.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runpod_autoscaler::clock::{Clock, ManualClock};
use runpod_autoscaler::decide::offers::OfferSpec;
use runpod_autoscaler::decide::{PodTemplate, Policy, PolicyKind, Sample, Series, Signals};
use runpod_autoscaler::emulator::{sshd, AdminPod, EmulatorConfig, Faults, RunningEmulator};
use runpod_autoscaler::join::pod::{JoinPlan, SshShell, HEALTH_QUERY};
use runpod_autoscaler::join::SshKey;
use runpod_autoscaler::model::{Cloud, GpuTypeId, PodState, Secret, Timestamp, Usd};
use runpod_autoscaler::provider::runpod::{RetryPolicy, RunPodClient, RunPodSettings, Sleeper};
use runpod_autoscaler::provider::CloudProvider;
use runpod_autoscaler::reconcile::claims::{ClaimTiming, RedbClaims};
use runpod_autoscaler::reconcile::{Context, ReconcileSettings, Reconciler, TickReport};
use runpod_autoscaler::telemetry::Metrics;

/// The API key the emulator accepts.
pub const KEY: &str = "rpa_fleet_test_key";
/// The GPU type every test buys.
pub const A5000: &str = "NVIDIA RTX A5000";

/// Waits by moving the shared manual clock (so the emulator's time moves with the client's).
#[derive(Clone)]
pub struct ClockSleeper(pub ManualClock);

impl Sleeper for ClockSleeper {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.0.advance(d);
        Box::pin(tokio::task::yield_now())
    }
}

/// Turns the real client into the provider the reconciler uses (fault injection around it).
pub type WrapProvider = Box<dyn FnOnce(Arc<RunPodClient>) -> Arc<dyn CloudProvider> + Send>;

/// Knobs of a harness.
pub struct FleetConfig {
    /// Emulator faults at start.
    pub faults: Faults,
    /// Boot delay of emulated pods.
    pub boot_delay: Duration,
    /// Planner policy.
    pub policy: Policy,
    /// What the bootstrap runs on the pod (worker mode).
    pub worker_command: String,
    /// The health command.
    pub health_command: String,
    /// Offers.
    pub offers: Vec<OfferSpec>,
    /// Emulator seed.
    pub seed: u64,
    /// Run a real sshd per pod (off: pods never become reachable, for fast money-only runs).
    pub sshd: bool,
    /// Wraps the RunPod client (fault injection around the real client).
    pub wrap: Option<WrapProvider>,
    /// Pods older than this are replaced.
    pub max_pod_lifetime: Option<Duration>,
    /// An idle probe instead of GPU utilization.
    pub idle_command: Option<String>,
}

/// The reference policy of these tests: up to 4 one-GPU A5000 pods, $2/h, 100 lag per GPU, no
/// baseline; fast scale-down (no stabilization window, 60 s idle timeout, 60 s warm-up).
pub fn policy() -> Policy {
    Policy {
        kind: PolicyKind::Target,
        min_pods: 0,
        max_pods: 4,
        max_usd_per_hour: Usd(2.0),
        max_launches_per_tick: 4,
        pod: PodTemplate {
            gpu_type: GpuTypeId::from(A5000),
            gpus: 1,
            usd_per_hour: Usd(0.26),
        },
        lag_per_gpu: 100.0,
        slo_p95_seconds: 30.0,
        latency_step_gpus: 1,
        scale_down_stabilization: Duration::ZERO,
        idle_timeout: Duration::from_secs(60),
        warmup_grace: Duration::from_secs(60),
        boot_deadline: Duration::from_secs(600),
        stale_after_intervals: 3,
    }
}

/// One on-demand secure A5000 offer, spot allowed up to $0.20.
pub fn offers() -> Vec<OfferSpec> {
    vec![OfferSpec {
        gpu_type: GpuTypeId::from(A5000),
        gpus_per_pod: 1,
        cloud: Cloud::Secure,
        data_centers: vec![],
        max_bid_per_gpu: None,
        throughput: 1.0,
    }]
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            faults: Faults::default(),
            boot_delay: Duration::from_secs(20),
            policy: policy(),
            worker_command: "echo working > \"$HOME/worker-started\"".into(),
            health_command: HEALTH_QUERY.into(),
            offers: offers(),
            seed: 1,
            sshd: true,
            wrap: None,
            max_pod_lifetime: None,
            idle_command: None,
        }
    }
}

/// Everything a fleet test drives.
pub struct Fleet {
    /// Shared time.
    pub clock: ManualClock,
    /// The emulator.
    pub emu: RunningEmulator,
    /// The store's directory.
    pub state_dir: tempfile::TempDir,
    /// The claim store (kept across reconciler "crashes").
    pub claims: Arc<RedbClaims>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The reconciler's context.
    pub ctx: Arc<Context>,
    /// The reconciler.
    pub reconciler: Reconciler,
    /// Planner policy.
    pub policy: Policy,
    /// Queue lag the next ticks see.
    pub lag: f64,
    queue: Series,
    _keys: tempfile::TempDir,
}

impl Fleet {
    /// Starts an emulator and a reconciler on a fresh store.
    pub async fn start(cfg: FleetConfig) -> Fleet {
        let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000));
        let emu = RunningEmulator::start_local(
            EmulatorConfig {
                api_keys: vec![Secret::new(KEY)],
                boot_delay: cfg.boot_delay,
                seed: cfg.seed,
                sshd: cfg.sshd,
                faults: cfg.faults,
                ..EmulatorConfig::default()
            },
            Arc::new(clock.clone()),
        )
        .await
        .expect("emulator");
        let keys = tempfile::tempdir().unwrap();
        let key_path = keys.path().join("id_ed25519");
        let public = sshd::generate_key(&key_path, "rpa-reconciler").expect("ssh-keygen");
        let key = SshKey::load(&key_path).unwrap();
        let state_dir = tempfile::tempdir().unwrap();
        let claims = Arc::new(RedbClaims::open(state_dir.path()).unwrap());
        let metrics = Arc::new(Metrics::new());
        let client = Arc::new(client(&emu, &clock));
        let provider: Arc<dyn CloudProvider> = match cfg.wrap {
            Some(wrap) => wrap(client),
            None => client,
        };
        let ctx = Arc::new(Context {
            provider,
            shell: Arc::new(SshShell::trust_on_first_use(key)),
            claims: claims.clone(),
            clock: Arc::new(clock.clone()),
            metrics: metrics.clone(),
            checkpoints: None,
            settings: ReconcileSettings {
                max_pod_lifetime: cfg.max_pod_lifetime,
                idle_command: cfg.idle_command,
                ..settings(public, cfg.worker_command, cfg.health_command, cfg.offers)
            },
        });
        let reconciler = Reconciler::new(ctx.clone()).unwrap();
        Fleet {
            queue: Series::new(Duration::from_secs(5), Duration::from_secs(3600)),
            clock,
            emu,
            state_dir,
            claims,
            metrics,
            ctx,
            reconciler,
            policy: cfg.policy,
            lag: 0.0,
            _keys: keys,
        }
    }

    /// A new reconciler on the same store, as after a crash and restart.
    pub fn restart(&mut self) {
        self.reconciler = Reconciler::new(self.ctx.clone()).unwrap();
    }

    fn signals(&mut self) -> Signals {
        self.queue.push(Sample::at(self.lag, self.clock.now()));
        Signals {
            queue: self.queue.clone(),
            latency: None,
        }
    }

    /// One tick at the current time.
    pub async fn tick(&mut self) -> TickReport {
        let signals = self.signals();
        self.reconciler.tick(&signals, &self.policy).await
    }

    /// Moves time by `d`, ticks, and waits for the steps the tick started.
    pub async fn step(&mut self, d: Duration) -> TickReport {
        self.clock.advance(d);
        let report = self.tick().await;
        self.reconciler.settle().await;
        report
    }

    /// Steps every `every` until `done` holds, at most `max` steps; panics naming `what`.
    pub async fn until(
        &mut self,
        what: &str,
        every: Duration,
        max: usize,
        mut done: impl FnMut(&Fleet, &TickReport) -> bool,
    ) -> TickReport {
        for _ in 0..max {
            let report = self.step(every).await;
            if done(self, &report) {
                return report;
            }
        }
        let report = self.tick().await;
        // The pods' sshd logs tell why SSH failed, when it did.
        let logs: Vec<String> = self
            .alive()
            .iter()
            .filter_map(|p| {
                let dir = std::path::Path::new(p.pod_dir.as_ref()?)
                    .parent()?
                    .parent()?;
                let log = dir.join("sshd").join(&p.id).join("sshd.log");
                Some(format!(
                    "{}: {}",
                    p.id,
                    std::fs::read_to_string(log).unwrap_or_default()
                ))
            })
            .collect();
        eprintln!("sshd logs: {logs:#?}");
        panic!(
            "{what}: not reached after {max} steps of {every:?}\nplan: {}\nfleet: {:#?}\nerrors: {:?}\npods: {:#?}",
            report.plan,
            report.fleet,
            report.errors,
            self.emu.admin_pods()
        );
    }

    /// Pods the emulator has that are not terminated.
    pub fn alive(&self) -> Vec<AdminPod> {
        self.emu
            .admin_pods()
            .into_iter()
            .filter(|p| p.status != PodState::Terminated.as_str())
            .collect()
    }

    /// Sets emulator faults.
    pub fn faults(&self, faults: Faults) {
        self.emu.set_faults(faults);
    }
}

fn client(emu: &RunningEmulator, clock: &ManualClock) -> RunPodClient {
    let mut s = RunPodSettings::new(emu.api_url(), emu.graphql_url(), Secret::new(KEY));
    s.retry = RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(4),
        max_retry_after: Duration::from_secs(30),
    };
    s.request_timeout = Duration::from_secs(10);
    RunPodClient::with_sleeper(s, Arc::new(ClockSleeper(clock.clone())))
        .unwrap()
        .with_clock(Arc::new(clock.clone()))
}

fn settings(
    public_key: String,
    worker_command: String,
    health_command: String,
    offers: Vec<OfferSpec>,
) -> ReconcileSettings {
    ReconcileSettings {
        baseline_gpus: 0,
        cluster: "t1".into(),
        name_prefix: "rpa-".into(),
        image: "runpod/base:0.6.2".into(),
        disk_gb: 20,
        env: BTreeMap::new(),
        public_key,
        offers,
        timing: ClaimTiming {
            resolve_timeout: Duration::from_secs(60),
            vanish_window: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(180),
        },
        unavailable_ttl: Duration::from_secs(180),
        quotes_refresh: Duration::from_secs(300),
        join: JoinPlan::Worker {
            command: worker_command,
            env: BTreeMap::from([("KAFKA_TOPIC".to_owned(), Secret::new("gpu-jobs"))]),
        },
        health_command,
        idle_command: None,
        drain_command: None,
        ssh_timeout: Duration::from_secs(10),
        provider_timeout: Duration::from_secs(30),
        health_interval: Duration::from_secs(15),
        unhealthy_after: Duration::from_secs(45),
        busy_utilization: 10.0,
        drain_timeout: Duration::from_secs(300),
        max_pod_lifetime: None,
    }
}

/// Records waits without moving any clock (for tests about real-time behaviour).
#[derive(Clone, Default)]
pub struct RecordingSleeper(pub Arc<Mutex<Vec<Duration>>>);

impl Sleeper for RecordingSleeper {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.0.lock().unwrap().push(d);
        Box::pin(async {})
    }
}

/// Checks the money and slot invariants over the whole history; `Err` says which and when.
pub fn check_history(
    pods: &[AdminPod],
    max_pods: u32,
    max_usd: f64,
    prefix: &str,
) -> Result<(), String> {
    // Every instant something changes is a creation; the peak is at one of them.
    let alive_at = |t: Timestamp| {
        pods.iter()
            .filter(move |p| p.created_at <= t && p.terminated_at.is_none_or(|e| e > t))
    };
    for p in pods {
        let t = p.created_at;
        let alive: Vec<&AdminPod> = alive_at(t).collect();
        if alive.len() as u32 > max_pods {
            return Err(format!(
                "{} pods alive at {t} (max_pods {max_pods}): {:?}",
                alive.len(),
                alive.iter().map(|p| &p.name).collect::<Vec<_>>()
            ));
        }
        let spend: f64 = alive.iter().map(|p| p.price_per_hour).sum();
        if spend > max_usd + 1e-6 {
            return Err(format!("${spend:.2}/h alive at {t} (max ${max_usd:.2}/h)"));
        }
        let mut slots = std::collections::BTreeMap::new();
        for a in &alive {
            let slot = a
                .name
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('-').next())
                .map(str::to_owned);
            if let Some(slot) = slot {
                if let Some(other) = slots.insert(slot.clone(), &a.name) {
                    return Err(format!(
                        "two live pods for slot {slot} at {t}: {other} and {}",
                        a.name
                    ));
                }
            }
        }
    }
    Ok(())
}
