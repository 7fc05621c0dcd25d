//! Contract tests of the RunPod client against the in-process emulator: every endpoint the
//! client uses and every injected fault, asserting the typed error and the retry behaviour.
//! Time in the emulator is a `ManualClock` the tests advance; the client's waits go through a
//! recording sleeper (real waits only where the test is about waiting at least Retry-After).
// Needs the emulator (the `emulator` cargo feature, on by default).
#![cfg(feature = "emulator")]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runpod_autoscaler::clock::ManualClock;
use runpod_autoscaler::emulator::{EmulatorConfig, Faults, GpuSpec, RunningEmulator};
use runpod_autoscaler::model::Secret;
use runpod_autoscaler::model::{GpuTypeId, PodId, PodState, Timestamp, Usd};
use runpod_autoscaler::provider::runpod::{
    PodAction, RetryPolicy, RunPodClient, RunPodSettings, Sleeper,
};
use runpod_autoscaler::provider::{
    Cloud, CloudProvider, LaunchSpec, OwnerMarker, ProviderError, Stock,
};
use tokio_util::sync::CancellationToken;

const KEY: &str = "rpa_test_key_0123456789";
const A5000: &str = "NVIDIA RTX A5000";

/// Records every wait; sleeps for real only when `real` is set.
#[derive(Clone, Default)]
struct RecordingSleeper {
    waits: Arc<Mutex<Vec<Duration>>>,
    real: bool,
}

impl Sleeper for RecordingSleeper {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.waits.lock().unwrap().push(d);
        let real = self.real;
        Box::pin(async move {
            if real {
                tokio::time::sleep(d).await;
            }
        })
    }
}

impl RecordingSleeper {
    fn waits(&self) -> Vec<Duration> {
        self.waits.lock().unwrap().clone()
    }
}

/// Advances the emulator's `ManualClock` by every wait (and records it): the client's waits
/// and the emulator's time move together, deterministically, without real sleeping.
#[derive(Clone)]
struct ClockSleeper {
    clock: ManualClock,
    waits: Arc<Mutex<Vec<Duration>>>,
}

impl Sleeper for ClockSleeper {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.waits.lock().unwrap().push(d);
        self.clock.advance(d);
        Box::pin(async {})
    }
}

impl ClockSleeper {
    fn waits(&self) -> Vec<Duration> {
        self.waits.lock().unwrap().clone()
    }
    fn total(&self) -> Duration {
        self.waits().iter().sum()
    }
}

/// A client whose waits advance `clock` and whose deadlines are measured on it.
fn clock_client(
    emu: &RunningEmulator,
    clock: &ManualClock,
    tune: impl FnOnce(&mut RunPodSettings),
) -> (RunPodClient, ClockSleeper) {
    let sleeper = ClockSleeper {
        clock: clock.clone(),
        waits: Arc::default(),
    };
    let mut s = settings(emu, KEY);
    tune(&mut s);
    let client = RunPodClient::with_sleeper(s, Arc::new(sleeper.clone()))
        .unwrap()
        .with_clock(Arc::new(clock.clone()));
    (client, sleeper)
}

struct Env {
    emu: RunningEmulator,
    clock: ManualClock,
    client: RunPodClient,
    sleeper: RecordingSleeper,
}

fn config(faults: Faults) -> EmulatorConfig {
    EmulatorConfig {
        api_keys: vec![Secret::new(KEY)],
        boot_delay: Duration::from_secs(10),
        sshd: false,
        faults,
        ..EmulatorConfig::default()
    }
}

fn settings(emu: &RunningEmulator, key: &str) -> RunPodSettings {
    let mut s = RunPodSettings::new(emu.api_url(), emu.graphql_url(), Secret::new(key));
    s.retry = RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        max_retry_after: Duration::from_secs(5),
    };
    s
}

async fn env_with(cfg: EmulatorConfig, real_sleep: bool) -> Env {
    let clock = ManualClock::new(Timestamp::from_secs(1_780_000_000));
    let emu = RunningEmulator::start_local(cfg, Arc::new(clock.clone()))
        .await
        .unwrap();
    let sleeper = RecordingSleeper {
        real: real_sleep,
        ..Default::default()
    };
    let client =
        RunPodClient::with_sleeper(settings(&emu, KEY), Arc::new(sleeper.clone())).unwrap();
    Env {
        emu,
        clock,
        client,
        sleeper,
    }
}

async fn env(faults: Faults) -> Env {
    env_with(config(faults), false).await
}

fn spec(name: &str) -> LaunchSpec {
    LaunchSpec {
        name: name.into(),
        gpu_type: GpuTypeId(A5000.into()),
        gpu_count: 1,
        cloud: Cloud::Secure,
        image: "runpod/base:0.6.2".into(),
        env: BTreeMap::new(),
        spot_bid_per_gpu: None,
        data_center_ids: vec![],
        disk_gb: 20,
    }
}

#[tokio::test]
async fn pod_lifecycle_listing_cost_and_terminate() {
    let e = env(Faults::default()).await;
    let pod = e.client.launch(&spec("w-1")).await.unwrap();
    assert_eq!(pod.name, "rpa-w-1");
    assert_eq!(pod.state, PodState::Provisioning);
    assert_eq!(pod.usd_per_hour, Usd(0.26));
    assert_eq!(pod.env.get(OwnerMarker::ENV).unwrap(), "runpod-autoscaler");
    assert!(!pod.is_ready());

    // Someone else's pod on the same account: not listed as ours.
    let mut other = settings(&e.emu, KEY);
    other.owner = OwnerMarker {
        name_prefix: "other-".into(),
        owner: "someone".into(),
    };
    let foreign = RunPodClient::new(other).unwrap();
    foreign.launch(&spec("x")).await.unwrap();
    let ours = e.client.list().await.unwrap();
    assert_eq!(ours.len(), 1);
    assert_eq!(ours[0].id, pod.id);
    assert_eq!(e.client.list_all().await.unwrap().len(), 2);

    e.clock.advance(Duration::from_secs(5));
    let p = e.client.get(&pod.id).await.unwrap().unwrap();
    assert_eq!(p.state, PodState::Starting);
    e.clock.advance(Duration::from_secs(5));
    let p = e.client.get(&pod.id).await.unwrap().unwrap();
    assert_eq!(p.state, PodState::Running);

    // One hour at $0.26/h.
    e.clock.advance(Duration::from_secs(3590));
    let bill = e.client.billing(Some(&pod.id)).await.unwrap();
    let cost = bill.per_pod[pod.id.as_str()];
    assert!((cost - 0.26).abs() < 1e-6, "accrued {cost}");
    let all = e.client.billing(None).await.unwrap();
    assert!(
        (all.total_usd - 0.52).abs() < 1e-6,
        "total {}",
        all.total_usd
    );

    e.client.terminate(&pod.id).await.unwrap();
    assert_eq!(e.client.get(&pod.id).await.unwrap(), None);
    // Not found on terminate counts as done.
    e.client.terminate(&pod.id).await.unwrap();
    e.client
        .terminate(&PodId("neverexisted".into()))
        .await
        .unwrap();
    assert!(e.client.list().await.unwrap().is_empty());

    // The admin listing keeps terminated pods with what they cost.
    e.clock.advance(Duration::from_secs(600));
    let admin = e.emu.admin_pods();
    let gone = admin.iter().find(|a| a.id == pod.id.as_str()).unwrap();
    assert_eq!(gone.status, "TERMINATED");
    assert!((gone.cost_accrued - 0.26).abs() < 1e-6);
    assert_eq!(gone.usd_per_hour, 0.0);
}

#[tokio::test]
async fn actions_stop_start_conflict_and_resume_refused() {
    let e = env(Faults::default()).await;
    let pod = e.client.launch(&spec("a")).await.unwrap();
    e.clock.advance(Duration::from_secs(10));
    let p = e.client.action(&pod.id, PodAction::Stop).await.unwrap();
    assert_eq!(p.state, PodState::Exited);
    assert_eq!(p.usd_per_hour, Usd(0.0));
    let err = e.client.action(&pod.id, PodAction::Stop).await.unwrap_err();
    assert!(matches!(err, ProviderError::Conflict { .. }), "{err:?}");
    assert!(!err.is_retryable());

    let p = e.client.action(&pod.id, PodAction::Start).await.unwrap();
    assert_eq!(p.state, PodState::Provisioning);
    e.clock.advance(Duration::from_secs(10));
    let p = e.client.action(&pod.id, PodAction::Restart).await.unwrap();
    assert_eq!(p.state, PodState::Starting);
    e.client.action(&pod.id, PodAction::Stop).await.unwrap();

    e.emu.set_faults(Faults {
        resume_refused: true,
        ..Faults::default()
    });
    let err = e
        .client
        .action(&pod.id, PodAction::Start)
        .await
        .unwrap_err();
    match err {
        ProviderError::CapacityExhausted { detail, .. } => {
            assert!(detail.contains("not enough free GPUs"), "{detail}")
        }
        other => panic!("expected capacity exhausted, got {other:?}"),
    }
    let err = e
        .client
        .action(&PodId("nope".into()), PodAction::Start)
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn offerings_have_prices_and_stock() {
    let mut cfg = config(Faults {
        capacity_exhausted: vec!["NVIDIA H100 80GB HBM3".into()],
        ..Faults::default()
    });
    cfg.gpus.retain(|g| g.id != "NVIDIA RTX A6000");
    cfg.gpus.push(GpuSpec {
        id: "NVIDIA RTX A6000".into(),
        name: "RTX A6000".into(),
        memory_gb: 48,
        secure_price: 0.49,
        community_price: 0.33,
        secure_spot_price: Some(0.33),
        community_spot_price: Some(0.25),
        stock: 2,
    });
    let e = env_with(cfg, false).await;
    let offers = e.client.offerings().await.unwrap();
    assert_eq!(offers.len(), 9);
    let a5000 = offers
        .iter()
        .find(|o| o.gpu_type.as_str() == A5000)
        .unwrap();
    assert_eq!(a5000.memory_gb, 24);
    assert_eq!(a5000.secure_usd, Some(Usd(0.26)));
    assert_eq!(a5000.community_usd, Some(Usd(0.16)));
    assert_eq!(a5000.secure_spot_usd, Some(Usd(0.14)));
    assert_eq!(a5000.community_spot_usd, Some(Usd(0.11)));
    assert_eq!(a5000.minimum_bid_usd, Some(Usd(0.11)));
    assert_eq!(a5000.stock, Stock::High);
    let h100 = offers
        .iter()
        .find(|o| o.gpu_type.as_str() == "NVIDIA H100 80GB HBM3")
        .unwrap();
    assert_eq!(h100.stock, Stock::None);
    let a6000 = offers
        .iter()
        .find(|o| o.gpu_type.as_str() == "NVIDIA RTX A6000")
        .unwrap();
    assert_eq!(a6000.stock, Stock::Low);
    let h200 = offers
        .iter()
        .find(|o| o.gpu_type.as_str() == "NVIDIA H200")
        .unwrap();
    assert_eq!(h200.secure_spot_usd, None);
}

#[tokio::test]
async fn bad_key_fails_fast_with_a_clear_message_and_no_retry() {
    let e = env(Faults::default()).await;
    let bad = RunPodClient::with_sleeper(
        settings(&e.emu, "rpa_WRONG_secret_value"),
        Arc::new(e.sleeper.clone()),
    )
    .unwrap();
    for result in [
        bad.list().await.map(|_| ()),
        bad.launch(&spec("k")).await.map(|_| ()),
        bad.offerings().await.map(|_| ()),
        bad.terminate(&PodId("x".into())).await,
    ] {
        let err = result.unwrap_err();
        assert_eq!(err, ProviderError::Auth { status: 401 });
        assert!(err.to_string().contains("RunPod API key rejected"), "{err}");
        assert!(!err.is_retryable());
        assert!(!err.to_string().contains("WRONG"));
    }
    assert!(
        e.sleeper.waits().is_empty(),
        "auth errors must not be retried"
    );
    assert!(!format!("{bad:?}").contains("WRONG"));
    assert!(e.emu.admin_pods().is_empty());
}

#[tokio::test]
async fn rate_limit_waits_at_least_retry_after_then_succeeds() {
    let e = env_with(
        config(Faults {
            rate_limit_next: 1,
            retry_after_secs: 1,
            ..Faults::default()
        }),
        true,
    )
    .await;
    let started = Instant::now();
    e.client.list().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(e.sleeper.waits().len(), 1);
    assert!(e.sleeper.waits()[0] >= Duration::from_secs(1));
}

#[tokio::test]
async fn persistent_rate_limit_ends_typed_with_the_hint() {
    let e = env(Faults {
        rate_limit_rate: 1.0,
        retry_after_secs: 3,
        ..Faults::default()
    })
    .await;
    let err = e.client.list().await.unwrap_err();
    assert_eq!(
        err,
        ProviderError::RateLimited {
            retry_after: Duration::from_secs(3)
        }
    );
    assert!(err.is_retryable());
    let waits = e.sleeper.waits();
    assert_eq!(waits.len(), 3, "4 attempts, 3 waits");
    assert!(waits.iter().all(|w| *w >= Duration::from_secs(3)));
    // A create rejected by 429 created nothing.
    let err = e.client.launch(&spec("rl")).await.unwrap_err();
    assert!(matches!(err, ProviderError::RateLimited { .. }));
    assert!(e.emu.admin_pods().is_empty());
}

#[tokio::test]
async fn transient_errors_back_off_with_bounded_jitter() {
    let e = env(Faults {
        server_error_next: 2,
        ..Faults::default()
    })
    .await;
    e.client.list().await.unwrap();
    let waits = e.sleeper.waits();
    assert_eq!(waits.len(), 2);
    assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
    assert!(waits[1] >= Duration::from_millis(100) && waits[1] <= Duration::from_millis(200));

    e.emu.set_faults(Faults {
        server_error_rate: 1.0,
        ..Faults::default()
    });
    let err = e.client.get(&PodId("x".into())).await.unwrap_err();
    assert!(matches!(err, ProviderError::Transient { .. }), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn seeded_fault_rates_are_deterministic_and_survivable() {
    let faults = Faults {
        server_error_rate: 0.3,
        rate_limit_rate: 0.1,
        retry_after_secs: 0,
        // Creates that succeed behind a 500: only the lookup by name keeps names unique.
        error_after_create: 3,
        ..Faults::default()
    };
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let e = env(faults.clone()).await;
        let mut ok = 0;
        for i in 0..20 {
            match e.client.launch(&spec(&format!("s{i}"))).await {
                Ok(_) => ok += 1,
                // A launch that gives up says the next tick may try again.
                Err(err) => assert!(err.is_retryable(), "{err:?}"),
            }
        }
        // Never more pods than names, whatever failed.
        let pods = e.emu.admin_pods();
        let mut names: Vec<_> = pods.iter().map(|p| p.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), pods.len(), "a name was created twice");
        outcomes.push((ok, pods.len(), e.sleeper.waits().len()));
    }
    assert_eq!(outcomes[0], outcomes[1], "same seed, same faults");
    // Each ambiguous create now costs a window of lookups, each of which can draw a fault
    // too; most launches still get through.
    assert!(outcomes[0].0 >= 15, "{outcomes:?}");
}

#[tokio::test]
async fn error_after_create_ends_with_exactly_one_pod() {
    let e = env(Faults {
        error_after_create: 1,
        ..Faults::default()
    })
    .await;
    let pod = e.client.launch(&spec("once")).await.unwrap();
    assert_eq!(pod.name, "rpa-once");
    let admin = e.emu.admin_pods();
    assert_eq!(admin.len(), 1, "{admin:?}");
    assert_eq!(admin[0].id, pod.id.as_str());
    assert!(
        e.sleeper.waits().is_empty(),
        "found by name, no retry needed"
    );

    // Spot creates (GraphQL) get the same treatment.
    e.emu.set_faults(Faults {
        error_after_create: 1,
        ..Faults::default()
    });
    let mut s = spec("spot-once");
    s.spot_bid_per_gpu = Some(Usd(0.2));
    let pod = e.client.launch(&s).await.unwrap();
    assert_eq!(e.emu.admin_pods().len(), 2);
    assert_eq!(pod.usd_per_hour, Usd(0.2));
}

#[tokio::test]
async fn error_before_create_is_retried_after_the_lookup() {
    let e = env(Faults {
        server_error_next: 1,
        ..Faults::default()
    })
    .await;
    e.client.launch(&spec("retry")).await.unwrap();
    assert_eq!(e.emu.admin_pods().len(), 1);
    // The lookup window (0.25 s doubling, 8 s in all) passed without the pod, then one
    // more POST.
    let waits = e.sleeper.waits();
    assert_eq!(waits[0], Duration::from_millis(250));
    assert_eq!(waits.iter().sum::<Duration>(), Duration::from_secs(8));
}

#[tokio::test]
async fn capacity_exhaustion_is_typed_for_rest_graphql_and_stock() {
    let e = env(Faults {
        capacity_exhausted: vec![A5000.into()],
        ..Faults::default()
    })
    .await;
    let err = e.client.launch(&spec("c")).await.unwrap_err();
    match &err {
        ProviderError::CapacityExhausted { gpu_type, detail } => {
            assert_eq!(gpu_type, A5000);
            assert!(detail.contains("no longer any instances available"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_retryable());
    let mut s = spec("c-spot");
    s.spot_bid_per_gpu = Some(Usd(0.3));
    let err = e.client.launch(&s).await.unwrap_err();
    assert!(
        matches!(err, ProviderError::CapacityExhausted { .. }),
        "{err:?}"
    );
    assert!(e.sleeper.waits().is_empty(), "no retry in place");

    // Real stock runs out too: 20 A6000 GPUs, asking 8 + 8 + 8.
    let mut big = spec("big");
    big.gpu_type = GpuTypeId("NVIDIA RTX A6000".into());
    big.gpu_count = 8;
    for i in 0..2 {
        big.name = format!("big{i}");
        e.client.launch(&big).await.unwrap();
    }
    big.name = "big2".into();
    let err = e.client.launch(&big).await.unwrap_err();
    assert!(
        matches!(err, ProviderError::CapacityExhausted { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn invalid_requests_carry_the_detail() {
    let e = env(Faults::default()).await;
    let mut s = spec("dc");
    s.data_center_ids = vec!["XX-NOWHERE-9".into()];
    match e.client.launch(&s).await.unwrap_err() {
        ProviderError::InvalidRequest { detail } => assert!(detail.contains("XX-NOWHERE-9")),
        other => panic!("{other:?}"),
    }
    let mut s = spec("zero");
    s.gpu_count = 0;
    match e.client.launch(&s).await.unwrap_err() {
        ProviderError::InvalidRequest { detail } => assert!(detail.contains("count")),
        other => panic!("{other:?}"),
    }
    let mut s = spec("lowbid");
    s.spot_bid_per_gpu = Some(Usd(0.01));
    match e.client.launch(&s).await.unwrap_err() {
        ProviderError::InvalidRequest { detail } => assert!(detail.contains("minimum bid")),
        other => panic!("{other:?}"),
    }
    let err = e
        .client
        .set_ssh_keys(&["not a key".into()])
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProviderError::InvalidRequest { .. }),
        "{err:?}"
    );
    assert!(e.emu.admin_pods().is_empty());
    assert!(e.sleeper.waits().is_empty());
}

#[tokio::test]
async fn ssh_keys_round_trip() {
    let e = env(Faults::default()).await;
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILXGDN/SclOozk1xsDztpmhGiKkkrfQB9SKoO8dSIQQZ me@example.com".to_string();
    assert_eq!(
        e.client
            .set_ssh_keys(std::slice::from_ref(&key))
            .await
            .unwrap(),
        vec![key]
    );
}

#[tokio::test]
async fn spot_pods_bid_and_get_preempted() {
    let e = env(Faults {
        preempt_spot_after: Some(Duration::from_secs(600)),
        ..Faults::default()
    })
    .await;
    let mut s = spec("spot");
    s.spot_bid_per_gpu = Some(Usd(0.15));
    s.gpu_count = 2;
    let pod = e.client.launch(&s).await.unwrap();
    assert_eq!(pod.usd_per_hour, Usd(0.30));
    assert_eq!(e.emu.admin_pods()[0].bid_per_gpu, Some(0.15));
    e.clock.advance(Duration::from_secs(10));
    assert_eq!(
        e.client.get(&pod.id).await.unwrap().unwrap().state,
        PodState::Running
    );
    e.clock.advance(Duration::from_secs(600));
    let p = e.client.get(&pod.id).await.unwrap().unwrap();
    assert_eq!(p.state, PodState::Exited);
    assert_eq!(p.usd_per_hour, Usd(0.0));

    // Preemption on demand through the admin API.
    let mut s2 = spec("spot2");
    s2.spot_bid_per_gpu = Some(Usd(0.15));
    let p2 = e.client.launch(&s2).await.unwrap();
    assert!(!e.emu.preempt(p2.id.as_str()), "not running yet");
    e.clock.advance(Duration::from_secs(10));
    e.client.get(&p2.id).await.unwrap();
    assert!(e.emu.preempt(p2.id.as_str()));
    assert_eq!(
        e.client.get(&p2.id).await.unwrap().unwrap().state,
        PodState::Exited
    );
}

#[tokio::test]
async fn never_ready_pods_run_without_an_ssh_mapping() {
    let mut cfg = config(Faults {
        never_ready: true,
        ..Faults::default()
    });
    cfg.sshd = true;
    let e = env_with(cfg, false).await;
    let mut s = spec("nr");
    s.env
        .insert("PUBLIC_KEY".into(), "ssh-ed25519 AAAA x".into());
    let pod = e.client.launch(&s).await.unwrap();
    e.clock.advance(Duration::from_secs(60));
    let p = e.client.get(&pod.id).await.unwrap().unwrap();
    assert_eq!(p.state, PodState::Running);
    assert_eq!(p.ssh, None);
    assert!(!p.is_ready());
    assert_eq!(e.emu.admin_pods()[0].sshd_pid, None);
}

#[tokio::test]
async fn slow_responses_time_out_as_transient() {
    let e = env(Faults {
        slow_response: Duration::from_millis(600),
        ..Faults::default()
    })
    .await;
    let mut s = settings(&e.emu, KEY);
    s.request_timeout = Duration::from_millis(200);
    s.retry.max_attempts = 1;
    let client = RunPodClient::new(s).unwrap();
    let err = client.list().await.unwrap_err();
    match &err {
        ProviderError::Transient { detail } => assert!(detail.contains("timeout"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // A slow create that times out is looked up by name before anything else: here the
    // lookup is slow too, so the launch fails rather than creating blindly.
    let err = client.launch(&spec("slow")).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    // The default client (30 s timeout) just waits.
    e.client.list().await.unwrap();
}

/// A writer that appends to a shared buffer (log capture).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_key_never_appears_in_logs_or_errors() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let e = env(Faults {
        server_error_next: 1,
        rate_limit_next: 1,
        ..Faults::default()
    })
    .await;
    let mut errors = Vec::new();
    e.client.list().await.unwrap();
    let pod = e.client.launch(&spec("log")).await.unwrap();
    e.client.terminate(&pod.id).await.unwrap();
    e.client.offerings().await.unwrap();
    let bad = RunPodClient::new(settings(&e.emu, "rpa_OTHER_SECRET_zz")).unwrap();
    errors.push(format!(
        "{:?} {}",
        bad.list().await.unwrap_err(),
        bad.list().await.unwrap_err()
    ));
    errors.push(format!("{bad:?} {:?}", e.client));

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("runpod.request"),
        "requests are traced: {text}"
    );
    assert!(
        text.contains("status=") && text.contains("latency_ms="),
        "{text}"
    );
    for secret in [KEY, "rpa_OTHER_SECRET_zz"] {
        assert!(!text.contains(secret), "key leaked into logs");
        assert!(
            errors.iter().all(|e| !e.contains(secret)),
            "key leaked into errors"
        );
    }
}

#[tokio::test]
async fn ambiguous_create_waits_out_the_listing_lag_and_adopts_the_pod() {
    // RunPod answers 500 although it created the pod, and the pod stays invisible to GET and
    // list for a few seconds: the client must keep looking rather than create a second one.
    let e = env(Faults {
        error_after_create: 1,
        hide_new_pods_for: Duration::from_secs(3),
        ..Faults::default()
    })
    .await;
    let (client, sleeper) = clock_client(&e.emu, &e.clock, |_| {});
    let pod = client.launch(&spec("lagged")).await.unwrap();
    let admin = e.emu.admin_pods();
    assert_eq!(admin.len(), 1, "a second pod was created: {admin:?}");
    assert_eq!(admin[0].id, pod.id.as_str());
    assert_eq!(pod.name, "rpa-lagged");
    let waited = sleeper.total();
    assert!(
        waited >= Duration::from_secs(3) && waited <= Duration::from_secs(8),
        "waited {waited:?} ({:?})",
        sleeper.waits()
    );

    // Past the whole window without the pod (here: the 500 came before anything was created),
    // the create is sent again, once.
    e.emu.set_faults(Faults {
        server_error_next: 1,
        ..Faults::default()
    });
    let (client, sleeper) = clock_client(&e.emu, &e.clock, |_| {});
    client.launch(&spec("retried")).await.unwrap();
    assert_eq!(e.emu.admin_pods().len(), 2);
    assert!(
        sleeper.total() >= Duration::from_secs(7),
        "{:?}",
        sleeper.waits()
    );
}

#[tokio::test]
async fn a_failed_lookup_after_an_ambiguous_create_never_creates_blindly() {
    // The create and the first lookup both answer 500; with one attempt per request the
    // lookup cannot tell whether the pod exists, so the launch fails instead of re-POSTing.
    let e = env(Faults {
        server_error_next: 2,
        ..Faults::default()
    })
    .await;
    let (client, _) = clock_client(&e.emu, &e.clock, |s| s.retry.max_attempts = 1);
    let err = client.launch(&spec("blind")).await.unwrap_err();
    assert!(matches!(err, ProviderError::Transient { .. }), "{err:?}");
    assert!(e.emu.admin_pods().is_empty());
}

#[tokio::test]
async fn spot_rent_with_a_lagging_get_returns_the_id_and_rents_once() {
    let e = env(Faults {
        hide_new_pods_for: Duration::from_secs(2),
        ..Faults::default()
    })
    .await;
    let (client, sleeper) = clock_client(&e.emu, &e.clock, |_| {});
    let mut s = spec("spot-lag");
    s.spot_bid_per_gpu = Some(Usd(0.2));
    let pod = client.launch(&s).await.unwrap();
    assert_eq!(e.emu.admin_pods().len(), 1);
    assert_eq!(e.emu.admin_pods()[0].id, pod.id.as_str());
    assert_eq!(pod.usd_per_hour, Usd(0.2), "read once visible");
    assert!(sleeper.total() >= Duration::from_secs(2));

    // Still invisible after the whole window: the pod is returned from what is known.
    e.emu.set_faults(Faults {
        hide_new_pods_for: Duration::from_secs(600),
        ..Faults::default()
    });
    let mut s = spec("spot-invisible");
    s.spot_bid_per_gpu = Some(Usd(0.2));
    s.gpu_count = 2;
    let pod = client.launch(&s).await.unwrap();
    let admin = e.emu.admin_pods();
    assert_eq!(admin.len(), 2, "rented twice: {admin:?}");
    assert_eq!(admin[1].id, pod.id.as_str());
    assert_eq!(pod.name, "rpa-spot-invisible");
    assert_eq!(pod.state, PodState::Provisioning);
    assert_eq!(pod.gpu_type, Some(GpuTypeId(A5000.into())));
    assert_eq!(pod.gpu_count, 2);
    assert_eq!(pod.created_at, None);
}

#[tokio::test]
async fn persistent_server_errors_end_within_the_call_deadline() {
    let e = env(Faults {
        server_error_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let deadline = Duration::from_secs(5);
    let tune = |s: &mut RunPodSettings| {
        s.call_deadline = deadline;
        // Far more attempts than the deadline allows: the deadline must be what ends it.
        s.retry.max_attempts = 50;
        s.retry.base_delay = Duration::from_secs(1);
        s.retry.max_delay = Duration::from_secs(8);
    };
    let (client, sleeper) = clock_client(&e.emu, &e.clock, tune);
    let err = client.list().await.unwrap_err();
    assert!(matches!(err, ProviderError::Transient { .. }), "{err:?}");
    let waits = sleeper.waits();
    assert!(
        !waits.is_empty() && sleeper.total() <= deadline,
        "{waits:?}"
    );

    // Nested calls (the lookup after an ambiguous create) share the launch's one deadline.
    let (client, sleeper) = clock_client(&e.emu, &e.clock, tune);
    let err = client.launch(&spec("deadline")).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(sleeper.total() <= deadline, "{:?}", sleeper.waits());
    assert!(e.emu.admin_pods().is_empty());
}

#[tokio::test]
async fn the_deadline_also_holds_in_real_time() {
    let e = env(Faults {
        slow_response: Duration::from_secs(3),
        ..Faults::default()
    })
    .await;
    let mut s = settings(&e.emu, KEY);
    s.call_deadline = Duration::from_millis(300);
    let client = RunPodClient::new(s).unwrap();
    let started = Instant::now();
    let err = client.list().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        err,
        ProviderError::Timeout {
            op: "list".into(),
            deadline: Duration::from_millis(300)
        }
    );
    assert!(err.is_retryable());
}

#[tokio::test]
async fn shutdown_cancels_a_call_waiting_out_a_long_retry_after() {
    let e = env(Faults {
        rate_limit_rate: 1.0,
        retry_after_secs: 30,
        ..Faults::default()
    })
    .await;
    let mut s = settings(&e.emu, KEY);
    s.retry.max_retry_after = Duration::from_secs(60);
    let token = CancellationToken::new();
    // The real tokio timer: the call is really stuck in a 30 s wait when shutdown comes.
    let client = RunPodClient::new(s).unwrap().with_shutdown(token.clone());
    let call = tokio::spawn(async move { client.list().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    token.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the call was still waiting 5 s after shutdown")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let err = result.unwrap_err();
    assert_eq!(err, ProviderError::Cancelled { op: "list".into() });
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn create_waits_out_a_rate_limit_but_returns_an_ambiguous_failure_untouched() {
    // A 429 created nothing: `create` waits it out and sends again.
    let e = env(Faults {
        rate_limit_next: 1,
        retry_after_secs: 1,
        ..Faults::default()
    })
    .await;
    let pod = e.client.create(&spec("limited")).await.unwrap();
    assert_eq!(pod.name, "rpa-limited");
    assert_eq!(e.emu.admin_pods().len(), 1);
    assert_eq!(e.sleeper.waits().len(), 1);
    assert!(e.sleeper.waits()[0] >= Duration::from_secs(1));

    // A 500 after the pod was made is ambiguous: `create` neither looks the pod up nor sends
    // again (its caller resolves it from the claim it persisted), so exactly one pod exists.
    e.emu.set_faults(Faults {
        error_after_create: 1,
        ..Faults::default()
    });
    let err = e.client.create(&spec("ambiguous")).await.unwrap_err();
    assert!(matches!(err, ProviderError::Transient { .. }), "{err:?}");
    assert_eq!(e.emu.admin_pods().len(), 2);
    assert_eq!(e.sleeper.waits().len(), 1, "no lookup window, no retry");
}
