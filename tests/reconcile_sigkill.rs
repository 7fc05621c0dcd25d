//! Crash safety of the real binary: `runpod-autoscaler serve` in active mode against the RunPod
//! emulator (real time, real sshd pods, injected API faults) is killed with SIGKILL at random
//! moments and started again on the same state directory, several times per run with changing
//! demand, then once more with no demand until nothing of ours is left. From the emulator's
//! record of every pod ever created: never more than `max_pods` alive at once, never more than
//! `max_usd_per_hour`, never two live pods for one slot, none left at the end.
//!
//! `RPA_SIGKILL_RUNS` (default 20) and `RPA_SIGKILL_SEED` pick the runs; a failure prints its
//! seed.
#![cfg(feature = "emulator")]

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use runpod_autoscaler::clock::SystemClock;
use runpod_autoscaler::emulator::{sshd, EmulatorConfig, Faults, RunningEmulator};
use runpod_autoscaler::model::{PodState, Secret};
use runpod_autoscaler::reconcile::claims::RedbClaims;
use support::fleet::check_history;

const KEY: &str = "rpa_sigkill_key";
const MAX_PODS: u32 = 3;
const MAX_USD: f64 = 0.80;
/// Runs in flight at once (each mostly waits on its processes).
const CONCURRENT_RUNS: usize = 4;
/// Longest wait for the fleet to be gone once demand is zero (orphan grace 4 s, idle 1 s,
/// drain, terminate confirmations, 429/5xx backoffs).
const CLEANUP_DEADLINE: Duration = Duration::from_secs(60);

fn config(dir: &std::path::Path, key_file: &std::path::Path) -> String {
    format!(
        r#"
[service]
tick_interval = "200ms"
[policy]
max_pods = {MAX_PODS}
max_usd_per_hour = {MAX_USD}
max_launches_per_tick = 3
gpu_type = "NVIDIA RTX A5000"
pod_usd_per_hour = 0.26
lag_per_gpu = 100
scale_down_stabilization = "0s"
idle_timeout = "1s"
warmup_grace = "1s"
boot_deadline = "20s"
[signals]
poll_interval = "200ms"
[signals.queue]
source = "static"
value = 0
[runpod]
request_timeout = "3s"
call_deadline = "5s"
[reconcile]
mode = "active"
cluster = "k"
state_dir = "{state}"
image = "runpod/base:0.6.2"
ssh_key_file = "{key}"
claim_resolve_timeout = "3s"
vanish_window = "2s"
orphan_grace = "4s"
unavailable_ttl = "5s"
health_interval = "1s"
unhealthy_after = "3s"
drain_timeout = "3s"
ssh_timeout = "5s"
provider_timeout = "6s"
[join]
worker_command = "true"
"#,
        state = dir.join("state").display(),
        key = key_file.display(),
    )
}

/// `serve` with the queue lag fixed at `lag`, on free ports; returns once it is listening.
fn serve(config: &std::path::Path, emu: &RunningEmulator, lag: u32) -> Child {
    let env = [("RUNPOD_AUTOSCALER__SIGNALS__QUEUE__VALUE", lag.to_string())];
    support::active::serve(config, emu, KEY, "warn", Stdio::null(), &env).child
}

fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// One run; returns how many pods the emulator saw created.
async fn run(seed: u64) -> Result<usize, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut chance = |p: f64| rng.random_range(0.0..1.0) < p;
    let faults = Faults {
        rate_limit_rate: if chance(0.3) { 0.05 } else { 0.0 },
        server_error_rate: if chance(0.3) { 0.05 } else { 0.0 },
        error_after_create: if chance(0.5) { 2 } else { 0 },
        hide_new_pods_for: if chance(0.5) {
            Duration::from_secs(2)
        } else {
            Duration::ZERO
        },
        ..Faults::default()
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9);
    let emu = RunningEmulator::start_local(
        EmulatorConfig {
            api_keys: vec![Secret::new(KEY)],
            boot_delay: Duration::from_millis(rng.random_range(200..1500)),
            seed,
            faults,
            ..EmulatorConfig::default()
        },
        Arc::new(SystemClock),
    )
    .await
    .map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let key = dir.path().join("id_ed25519");
    sshd::generate_key(&key, "rpa-sigkill").map_err(|e| e.to_string())?;
    let config_file = dir.path().join("config.toml");
    std::fs::write(&config_file, config(dir.path(), &key)).map_err(|e| e.to_string())?;

    // Several lives, each killed at a random moment.
    let lives = rng.random_range(3..6);
    for _ in 0..lives {
        let lag = rng.random_range(0..4) * 100;
        let mut child = serve(&config_file, &emu, lag);
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..2500))).await;
        sigkill(&mut child);
    }
    // The last life: no demand; everything of ours must go.
    let mut child = serve(&config_file, &emu, 0);
    let started = Instant::now();
    let alive = |emu: &RunningEmulator| {
        emu.admin_pods()
            .into_iter()
            .filter(|p| p.status != PodState::Terminated.as_str())
            .count()
    };
    loop {
        if alive(&emu) == 0 {
            break;
        }
        if started.elapsed() > CLEANUP_DEADLINE {
            sigkill(&mut child);
            return Err(format!(
                "{} pods still alive {CLEANUP_DEADLINE:?} after demand fell to zero: {:?}",
                alive(&emu),
                emu.admin_pods()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Claims catch up with the last confirmations shortly after.
    let claims_deadline = Instant::now() + Duration::from_secs(20);
    let open = loop {
        let open = RedbClaims::read(&dir.path().join("state"))
            .map(|c| c.len())
            .unwrap_or(usize::MAX);
        if open == 0 || Instant::now() > claims_deadline {
            break open;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    if open != 0 {
        return Err(format!("{open} claims still open after the fleet was gone"));
    }
    let pods = emu.admin_pods();
    check_history(&pods, MAX_PODS, MAX_USD, "rpa-k-")?;
    Ok(pods.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_leaks_or_double_buys() {
    let started = Instant::now();
    let (created, failures) =
        support::seeded_runs("RPA_SIGKILL", 20, 0x5191_0000, CONCURRENT_RUNS, run).await;
    let runs = created.len() + failures.len();
    let created: usize = created.iter().sum();
    eprintln!(
        "{runs} SIGKILL runs in {:.1}s, {created} pods created in all",
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
    // The runs must have bought pods for the kills to land mid-work.
    assert!(created >= runs, "only {created} pods in {runs} runs");
}
