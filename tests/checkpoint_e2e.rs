//! Checkpoint and resume end to end, on real components: tansu (the jobs), s3s-fs (the
//! checkpoint store), the RunPod emulator with sshd pods, and the binary in active mode running
//! `examples/gpu_worker` on its pods in steps with checkpoints every k steps.
//!
//! 1. A job on a spot pod that is preempted mid-way finishes on another pod, resumed from the
//!    dead pod's last checkpoint: it redoes at most k steps.
//! 2. A pod drained in the middle of a job (lifetime replacement) is terminated only after the
//!    job's checkpoint is stored and verified: the emulator records its termination after the
//!    manifest's time.
#![cfg(feature = "emulator")]

mod support;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use runpod_autoscaler::checkpoint::{CheckpointStore, S3Store};
use runpod_autoscaler::emulator::{sshd, AdminPod, RunningEmulator};
use support::s3::{S3s, ACCESS_KEY, BUCKET, SECRET_KEY};
use support::{even_commits, example_binary, Tansu};

const KEY: &str = "rpa_ckpt_e2e_key";
const STEPS: u64 = 24;
const EVERY: u64 = 4;
/// Steps of a job longer than a pod's 8 s lifetime (12 s of work): whenever a pod takes it, it
/// still holds it when its lifetime ends and it is drained.
const LONG_STEPS: u64 = 48;
/// Bound on each story on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(180);

struct Story {
    http: std::net::SocketAddr,
    _tansu: Tansu,
    s3: S3s,
    emu: RunningEmulator,
    child: Child,
    dir: tempfile::TempDir,
}

impl Story {
    /// The service's log so far (`RUST_LOG=info`, plain text).
    fn serve_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// What a failed wait shows: each pod's state and worker log, and the service's log tail.
    fn dump(&self) -> String {
        let mut out = String::new();
        for p in self.emu.admin_pods() {
            out.push_str(&format!(
                "--- pod {} {} terminated_at={:?}\n{}\n",
                p.id,
                p.status,
                p.terminated_at,
                worker_log(&p)
            ));
        }
        let log = self.serve_log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        out.push_str("--- serve.log (tail)\n");
        for l in tail.into_iter().rev() {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    async fn wait_for<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "timed out waiting for {what}\n{}",
                self.dump()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Story {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The emulator, tansu with `jobs` jobs on `topic`, s3s-fs, and `serve` in active mode with the
/// given extra policy/reconcile lines.
/// `agent` is the worker's checkpoint agent (`None`: this binary); a job is `steps` steps.
async fn story(
    topic: &str,
    jobs: usize,
    steps: u64,
    agent: Option<&str>,
    reconcile_extra: &str,
) -> Story {
    let tansu = Tansu::start().await;
    tansu.create_topic(topic, 2).await;
    tansu.produce(topic, 2, jobs);
    tansu.commit("ckpt-workers", topic, &even_commits(2, 0));
    let s3 = S3s::start().await;
    let emu = support::active::emulator(KEY).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id_ed25519");
    sshd::generate_key(&key, "rpa-ckpt-e2e").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[service]
tick_interval = "500ms"
[policy]
max_pods = 2
max_usd_per_hour = 2.0
gpu_type = "NVIDIA RTX A5000"
pod_usd_per_hour = 0.26
lag_per_gpu = 1
scale_down_stabilization = "1s"
idle_timeout = "2s"
warmup_grace = "1s"
[signals]
poll_interval = "500ms"
[signals.queue]
source = "kafka"
bootstrap_servers = "{kafka}"
consumer_group = "ckpt-workers"
topics = ["{topic}"]
timeout = "500ms"
[reconcile]
mode = "active"
cluster = "ck"
state_dir = "{state}"
image = "runpod/base:0.6.2"
ssh_key_file = "{key}"
health_interval = "1s"
unhealthy_after = "10s"
{reconcile_extra}
[join]
worker_command = "exec {worker}"
worker_env = {{ WORK_MS_PER_JOB = "250", STEPS_PER_JOB = "{steps}", CHECKPOINT_EVERY = "{EVERY}", RPA_AGENT = "{agent}" }}
[checkpoint]
bucket = "{BUCKET}"
prefix = "jobs"
endpoint = "{endpoint}"
region = "us-east-1"
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET_KEY}"
keep = 50
[[offers]]
gpu_type = "NVIDIA RTX A5000"
max_bid_per_gpu = 0.20
"#,
            kafka = tansu.servers(),
            state = dir.path().join("state").display(),
            key = key.display(),
            worker = example_binary("gpu_worker").display(),
            agent = agent.unwrap_or(env!("CARGO_BIN_EXE_runpod-autoscaler")),
            endpoint = s3.endpoint(),
        ),
    )
    .unwrap();
    let serve_log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let support::active::Serve { child, http } =
        support::active::serve(&config, &emu, KEY, "info", serve_log.into(), &[]);
    Story {
        http,
        _tansu: tansu,
        s3,
        emu,
        child,
        dir,
    }
}

/// The worker's logs on a pod (its stdout and stderr go to `worker.log` in its home).
fn worker_log(pod: &AdminPod) -> String {
    pod.pod_dir
        .as_ref()
        .map(|d| Path::new(d).join(".runpod-autoscaler/worker.log"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default()
}

/// Steps a worker last checkpointed a job at, from its log.
fn last_checkpoint_step(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .filter_map(|l| l.split(" checkpointed at step ").nth(1))
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_spot_pods_job_resumes_elsewhere_redoing_at_most_k_steps() {
    let s = story("ckpt-preempt", 1, STEPS, None, "drain_timeout = \"60s\"").await;
    // The one job runs on one spot pod; once it checkpointed twice, the pod is preempted.
    let (victim, checkpointed) = s
        .wait_for("a checkpoint at step 8 on the working pod", || {
            s.emu.admin_pods().into_iter().find_map(|p| {
                let step = last_checkpoint_step(&worker_log(&p))?;
                (step >= 2 * EVERY).then_some((p, step))
            })
        })
        .await;
    assert!(s.emu.preempt(&victim.id), "preempting {}", victim.id);
    // The job is delivered again and finishes on a new pod, resumed from a checkpoint.
    let (resumed_from, finisher) = s
        .wait_for("the job finished on another pod", || {
            s.emu.admin_pods().into_iter().find_map(|p| {
                if p.id == victim.id {
                    return None;
                }
                let log = worker_log(&p);
                let done = log
                    .lines()
                    .find(|l| l.contains(" job topic=ckpt-preempt "))?;
                let from: u64 = done
                    .split("resumed_from=")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()?;
                Some((from, p.id))
            })
        })
        .await;
    let redone = checkpointed + EVERY - resumed_from;
    assert!(
        resumed_from >= checkpointed && resumed_from % EVERY == 0,
        "resumed from step {resumed_from}, the preempted pod had checkpointed step {checkpointed}"
    );
    assert!(redone <= EVERY, "redid {redone} steps (k = {EVERY})");
    assert_ne!(finisher, victim.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_pod_is_terminated_only_after_its_jobs_checkpoint_is_verified() {
    // Pods live 8 s and the job is 12 s of work: whichever pod takes it is drained mid-job.
    const JOB: &str = "ckpt-drain-0-0";
    let s = story(
        "ckpt-drain",
        1,
        LONG_STEPS,
        None,
        "drain_timeout = \"60s\"\nmax_pod_lifetime = \"8s\"",
    )
    .await;
    // A terminated pod's home is gone with it: keep each live pod's worker log as it grows.
    let mut logs = std::collections::HashMap::<String, String>::new();
    let (drained, terminated_at, finisher_log) = s
        .wait_for(
            "a pod drained mid-job, terminated, and the job finished elsewhere",
            || {
                let pods = s.emu.admin_pods();
                for p in &pods {
                    let log = worker_log(p);
                    if !log.is_empty() {
                        logs.insert(p.id.clone(), log);
                    }
                }
                let serve = s.serve_log();
                let drained = pods.iter().find(|p| {
                    p.terminated_at.is_some()
                        && serve.contains(&format!(
                            "drained; waiting for the jobs' checkpoints pod={} jobs=[\"{JOB}\"]",
                            p.id
                        ))
                })?;
                let finisher = logs.iter().find(|(id, log)| {
                    **id != drained.id
                        && log.contains(" job topic=ckpt-drain ")
                        && log.contains(" committed=")
                })?;
                Some((drained.clone(), drained.terminated_at?, finisher.1.clone()))
            },
        )
        .await;
    // The service terminated it only once every job was checkpointed and verified.
    let serve = s.serve_log();
    let waited = serve
        .find(&format!(
            "drained; waiting for the jobs' checkpoints pod={}",
            drained.id
        ))
        .unwrap();
    let released = serve
        .find(&format!(
            "every job checkpointed and verified (or finished); terminating pod={}",
            drained.id
        ))
        .expect("the drained pod released by a verified checkpoint, not by the drain timeout");
    assert!(waited < released);
    // Its last checkpoint of the job is complete, verifies, and predates its termination.
    let store = S3Store::connect(&s.s3.config("jobs")).await.unwrap();
    let mut last = None;
    for g in store.list(Some(JOB)).await.unwrap() {
        if let Some(m) = store.manifest(JOB, g.seq).await.unwrap() {
            if m.writer == drained.id {
                last = Some(m);
            }
        }
    }
    let manifest = last.expect("a checkpoint of the job written by the drained pod");
    store.verify(&manifest).await.unwrap();
    assert!(
        terminated_at >= manifest.created,
        "terminated at {terminated_at}, checkpoint written at {}",
        manifest.created
    );
    // The next worker resumed from it (or later) instead of starting over.
    let step: u64 = manifest.meta["step"].parse().unwrap();
    let resumed_from: u64 = finisher_log
        .split("resumed_from=")
        .nth(1)
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .expect("the finishing worker's job line");
    assert!(
        resumed_from >= step && step > 0,
        "the job resumed from step {resumed_from}; the drained pod had checkpointed step {step}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_pod_whose_checkpoint_fails_is_held_until_the_drain_deadline_and_counted() {
    // The worker's agent always fails: the drain checkpoint never lands, the job stays listed.
    let s = story(
        "ckpt-nostore",
        1,
        LONG_STEPS,
        Some("/bin/false"),
        "drain_timeout = \"6s\"\nmax_pod_lifetime = \"8s\"",
    )
    .await;
    let (pod, terminated_at) = s
        .wait_for("the drained pod terminated at its drain deadline", || {
            let serve = s.serve_log();
            s.emu.admin_pods().into_iter().find_map(|p| {
                let t = p.terminated_at?;
                serve
                    .contains(&format!(
                        "drained; waiting for the jobs' checkpoints pod={} jobs=[\"ckpt-nostore-0-0\"]",
                        p.id
                    ))
                    .then_some((p.id, t))
            })
        })
        .await;
    let serve = s.serve_log();
    assert!(
        serve.contains(&format!(
            "drain deadline passed without every checkpoint; terminating pod={pod}"
        )),
        "{}",
        s.dump()
    );
    assert!(!serve.contains(&format!(
        "every job checkpointed and verified (or finished); terminating pod={pod}"
    )));
    let (_, metrics) = support::http_get(s.http, "/metrics").await.unwrap();
    assert!(
        metrics.contains("runpod_autoscaler_checkpoint_missed_total 1"),
        "{metrics}"
    );
    // Held for the whole drain timeout: drained at its 8 s lifetime, terminated 6 s later.
    let created = s
        .emu
        .admin_pods()
        .into_iter()
        .find(|p| p.id == pod)
        .map(|p| p.created_at)
        .unwrap();
    let lived = terminated_at.saturating_since(created);
    assert!(lived >= Duration::from_secs(13), "lived {lived:?}");
}
