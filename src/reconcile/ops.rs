//! The reconciler's I/O steps, each one bounded call (or two) with a deadline, run as tasks
//! whose outcome the next tick reads: join (bootstrap once + GPU check), health probe, drain
//! signal, terminate, and lookups. None of them retries: a later tick does, with backoff.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info_span, Instrument};

use crate::checkpoint::CheckpointStore;
use crate::join::pod::{
    bootstrap_outcome, check_gpus, drain_signal, parse_gpus, parse_jobs, read_jobs, run_once,
    BootstrapOutcome, PodShell,
};
use crate::join::{JoinError, SshTarget};
use crate::model::{PodId, Timestamp};
use crate::provider::{CloudProvider, Pod, ProviderError};
use crate::telemetry::Metrics;

use super::claims::ClaimKey;

/// What finished.
#[derive(Debug)]
pub(super) struct OpResult {
    /// The pod it was about.
    pub pod: PodId,
    /// Its claim, when it has one.
    pub claim: Option<ClaimKey>,
    /// When the step started (reconciler clock).
    pub started: Timestamp,
    /// How it ended.
    pub outcome: Outcome,
}

/// How a step ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Join: bootstrap, then the GPU check.
    Join(JoinOutcome),
    /// Health probe: the highest GPU utilization, or why it failed.
    Probe(Result<f64, String>),
    /// Drain signal sent, with the jobs in hand (or why not).
    Drained(Result<Vec<String>, String>),
    /// Jobs of a draining pod still without a verified checkpoint.
    Checkpoints(Vec<String>),
    /// Terminate sent.
    Terminated(Result<(), ProviderError>),
    /// A lookup by id: `None` = gone.
    Looked(Result<Option<Pod>, ProviderError>),
}

/// How joining ended.
#[derive(Debug)]
pub(super) enum JoinOutcome {
    /// Bootstrapped and the GPUs are as bought.
    Joined,
    /// Another bootstrap run still holds the lock.
    InProgress,
    /// It will not join: replace it.
    Failed(String),
    /// SSH failed in a way that may pass (sshd starting, network).
    Unreachable(JoinError),
}

/// What a join needs.
pub(super) struct JoinJob {
    pub shell: Arc<dyn PodShell>,
    pub pod: PodId,
    pub target: SshTarget,
    /// The bootstrap command (holds secrets: never logged).
    pub command: String,
    pub health_command: String,
    pub gpu_type: String,
    pub gpus: u32,
    pub timeout: Duration,
}

/// Bootstrap (once per pod) then check the GPUs.
pub(super) async fn join(job: JoinJob) -> JoinOutcome {
    let span = info_span!("reconcile.join", pod = %job.pod);
    async move {
        let pod = job.pod.as_str();
        let out = match job
            .shell
            .run(pod, &job.target, &run_once(&job.command), job.timeout)
            .await
        {
            Ok(out) => out,
            Err(e) if e.is_retryable() => return JoinOutcome::Unreachable(e),
            Err(e) => return JoinOutcome::Failed(e.to_string()),
        };
        match bootstrap_outcome(&out) {
            BootstrapOutcome::Done => {}
            BootstrapOutcome::InProgress => return JoinOutcome::InProgress,
            BootstrapOutcome::Failed(why) => return JoinOutcome::Failed(why),
        }
        let health = match job
            .shell
            .run(pod, &job.target, &job.health_command, job.timeout)
            .await
        {
            Ok(out) => out,
            Err(e) if e.is_retryable() => return JoinOutcome::Unreachable(e),
            Err(e) => return JoinOutcome::Failed(e.to_string()),
        };
        match parse_gpus(&health).and_then(|gpus| check_gpus(&gpus, &job.gpu_type, job.gpus)) {
            Ok(()) => JoinOutcome::Joined,
            Err(e) => JoinOutcome::Failed(format!("GPU check: {e}")),
        }
    }
    .instrument(span)
    .await
}

/// One health probe: the GPU query must answer; returns the highest utilization.
pub(super) async fn probe(
    shell: Arc<dyn PodShell>,
    pod: PodId,
    target: SshTarget,
    command: String,
    idle_command: Option<String>,
    timeout: Duration,
) -> Result<f64, String> {
    let span = info_span!("reconcile.probe", pod = %pod);
    async move {
        let out = shell
            .run(pod.as_str(), &target, &command, timeout)
            .await
            .map_err(|e| e.to_string())?;
        let gpus = parse_gpus(&out).map_err(|e| e.to_string())?;
        if gpus.is_empty() {
            return Err("nvidia-smi reports no GPU".into());
        }
        let utilization = gpus.iter().map(|g| g.utilization).fold(0.0, f64::max);
        let Some(idle_command) = idle_command else {
            return Ok(utilization);
        };
        // A configured idle probe decides instead: exit 0 = idle (reads as 0 %), else busy.
        let idle = shell
            .run(pod.as_str(), &target, &idle_command, timeout)
            .await
            .map_err(|e| e.to_string())?;
        Ok(if idle.exit_status == Some(0) {
            0.0
        } else {
            100.0
        })
    }
    .instrument(span)
    .await
}

/// Tells the worker on the pod to stop taking work; returns the jobs it had in hand.
pub(super) async fn drain(
    shell: Arc<dyn PodShell>,
    pod: PodId,
    target: SshTarget,
    command: Option<String>,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let span = info_span!("reconcile.drain", pod = %pod);
    async move {
        let command = command.unwrap_or_else(drain_signal);
        let out = shell
            .run(pod.as_str(), &target, &command, timeout)
            .await
            .map_err(|e| e.to_string())?;
        if out.exit_status != Some(0) {
            return Err(format!(
                "drain command exited with {:?}: {}",
                out.exit_status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let jobs = shell
            .run(pod.as_str(), &target, &read_jobs(), timeout)
            .await
            .map_err(|e| e.to_string())?;
        Ok(parse_jobs(&jobs.stdout))
    }
    .instrument(span)
    .await
}

/// What the reconciler needs from the checkpoint store: whether a job has a checkpoint
/// written by a given pod at or after a time, stored completely and verified.
#[async_trait::async_trait]
pub trait CheckpointCheck: Send + Sync {
    /// The creation time of the newest checkpoint of `job` if `writer` wrote it at or after
    /// `since` and every part of it verifies; `None` when there is no such checkpoint (yet).
    /// `since` is the controller's clock and `created` the writer's: a writer whose clock runs
    /// behind makes the reconciler wait longer, never shorter.
    async fn verified_since(
        &self,
        job: &str,
        writer: &str,
        since: Timestamp,
    ) -> Result<Option<Timestamp>, String>;
}

/// Verified generations [`StoreCheck`] remembers at most (far more than jobs draining at once).
const VERIFIED_REMEMBERED: usize = 4096;

/// [`CheckpointCheck`] over the checkpoint store: the newest manifest of the job, if the pod
/// asked about wrote it since the time asked, with every part read back and hashed. A verified generation is
/// remembered, so a draining pod's job is verified once, not at every tick.
pub struct StoreCheck {
    store: Arc<dyn CheckpointStore>,
    verified: std::sync::Mutex<std::collections::BTreeSet<(String, u64)>>,
}

impl StoreCheck {
    /// Checks against `store`.
    pub fn new(store: Arc<dyn CheckpointStore>) -> Self {
        StoreCheck {
            store,
            verified: std::sync::Mutex::new(std::collections::BTreeSet::new()),
        }
    }
}

#[async_trait::async_trait]
impl CheckpointCheck for StoreCheck {
    async fn verified_since(
        &self,
        job: &str,
        writer: &str,
        since: Timestamp,
    ) -> Result<Option<Timestamp>, String> {
        let Some(manifest) = self.store.latest(job).await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        if manifest.writer != writer || manifest.created < since {
            return Ok(None);
        }
        let key = (manifest.job.clone(), manifest.seq);
        let known = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key);
        if !known {
            self.store
                .verify(&manifest)
                .await
                .map_err(|e| e.to_string())?;
            let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            // Only generations of pods draining now matter: forget old ones rather than grow.
            if verified.len() >= VERIFIED_REMEMBERED {
                verified.clear();
            }
            verified.insert(key);
        }
        Ok(Some(manifest.created))
    }
}

/// Of `jobs` (in hand when the drain began at `since`), those not yet safe. A job is safe when
/// a checkpoint written since the drain began is stored and verifies, or, without one, when
/// the pod no longer lists it (it finished). An unreadable pod keeps unverified jobs pending.
pub(super) async fn pending_checkpoints(
    shell: Arc<dyn PodShell>,
    store: Arc<dyn CheckpointCheck>,
    pod: PodId,
    target: SshTarget,
    jobs: Vec<String>,
    since: Timestamp,
    timeout: Duration,
) -> Vec<String> {
    let span = info_span!("reconcile.checkpoints", pod = %pod, jobs = jobs.len());
    async move {
        let listed = match shell
            .run(pod.as_str(), &target, &read_jobs(), timeout)
            .await
        {
            Ok(out) => Some(parse_jobs(&out.stdout)),
            Err(_) => None,
        };
        let mut pending = Vec::new();
        for job in jobs {
            let unlisted = listed.as_ref().is_some_and(|l| !l.contains(&job));
            match store.verified_since(&job, pod.as_str(), since).await {
                // This pod checkpointed it since the drain began, every part verified.
                Ok(Some(_)) => {}
                // No checkpoint since: safe only if the worker finished the job.
                Ok(None) if unlisted => {}
                Ok(None) => pending.push(job),
                Err(e) => {
                    tracing::debug!(%job, error = %e, "checkpoint not verified yet");
                    pending.push(job);
                }
            }
        }
        pending
    }
    .instrument(span)
    .await
}

/// Terminates a pod (gone already = done).
pub(super) async fn terminate(
    provider: Arc<dyn CloudProvider>,
    metrics: Arc<Metrics>,
    pod: PodId,
    timeout: Duration,
) -> Result<(), ProviderError> {
    let span = info_span!("reconcile.terminate", pod = %pod);
    bounded(&metrics, timeout, "terminate", provider.terminate(&pod))
        .instrument(span)
        .await
}

/// Looks a pod up by id.
pub(super) async fn look_up(
    provider: Arc<dyn CloudProvider>,
    metrics: Arc<Metrics>,
    pod: PodId,
    timeout: Duration,
) -> Result<Option<Pod>, ProviderError> {
    let span = info_span!("reconcile.lookup", pod = %pod);
    bounded(&metrics, timeout, "get", provider.get(&pod))
        .instrument(span)
        .await
}

/// `fut` within `timeout`; running out is a retryable provider timeout. Every provider call
/// goes through here and is counted in `provider_requests` by its outcome.
pub(super) async fn bounded<T>(
    metrics: &Metrics,
    timeout: Duration,
    op: &'static str,
    fut: impl std::future::Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    let result = tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Err(ProviderError::Timeout {
            op: op.into(),
            deadline: timeout,
        }));
    if let Some(outcome) = provider_outcome(&result) {
        metrics.provider_request(op, outcome);
    }
    result
}

/// The `provider_requests` outcome of a call: `ok`; `refused` when the API answered but said no
/// (the pod is gone, a state conflict, no capacity); `error` when the call failed; none for a
/// call cancelled by shutdown (not the API's doing).
pub(super) fn provider_outcome<T>(result: &Result<T, ProviderError>) -> Option<&'static str> {
    match result {
        Ok(_) => Some("ok"),
        Err(
            ProviderError::NotFound { .. }
            | ProviderError::Conflict { .. }
            | ProviderError::CapacityExhausted { .. },
        ) => Some("refused"),
        Err(
            ProviderError::Auth { .. }
            | ProviderError::RateLimited { .. }
            | ProviderError::Transient { .. }
            | ProviderError::InvalidRequest { .. }
            | ProviderError::Timeout { .. },
        ) => Some("error"),
        Err(ProviderError::Cancelled { .. }) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::ExecOutput;

    /// A pod whose jobs file holds `jobs`, or that cannot be reached (`None`).
    struct Jobs(Option<&'static str>);

    #[async_trait::async_trait]
    impl PodShell for Jobs {
        async fn run(
            &self,
            _pod: &str,
            target: &SshTarget,
            command: &str,
            timeout: Duration,
        ) -> Result<ExecOutput, JoinError> {
            assert_eq!(command, read_jobs());
            match self.0 {
                Some(jobs) => Ok(ExecOutput {
                    exit_status: Some(0),
                    stdout: jobs.as_bytes().to_vec(),
                    stderr: Vec::new(),
                }),
                None => Err(JoinError::Timeout {
                    addr: format!("{}:{}", target.host, target.port),
                    after: timeout,
                }),
            }
        }
        fn forget(&self, _pod: &str) {}
    }

    /// Verified checkpoints: job → (writer, creation time); `"broken"` fails verification.
    struct Store(&'static [(&'static str, &'static str, u64)]);

    #[async_trait::async_trait]
    impl CheckpointCheck for Store {
        async fn verified_since(
            &self,
            job: &str,
            writer: &str,
            since: Timestamp,
        ) -> Result<Option<Timestamp>, String> {
            if job == "broken" {
                return Err("part 0: sha256 mismatch".into());
            }
            Ok(self
                .0
                .iter()
                .find(|(j, w, _)| *j == job && *w == writer)
                .map(|(_, _, t)| Timestamp::from_millis(*t))
                .filter(|t| *t >= since))
        }
    }

    async fn pending(shell: Jobs, store: Store, jobs: &[&str]) -> Vec<String> {
        pending_checkpoints(
            Arc::new(shell),
            Arc::new(store),
            PodId::from("pod-1"),
            SshTarget {
                host: "127.0.0.1".into(),
                port: 22,
                user: "root".into(),
            },
            jobs.iter().map(|j| (*j).to_owned()).collect(),
            Timestamp::from_millis(1_000),
            Duration::from_secs(1),
        )
        .await
    }

    #[tokio::test]
    async fn a_job_is_safe_once_checkpointed_since_the_drain_or_finished() {
        // Checkpointed after the drain began: safe even though still listed.
        assert!(
            pending(Jobs(Some("a\n")), Store(&[("a", "pod-1", 1_500)]), &["a"])
                .await
                .is_empty()
        );
        // Checkpointed since, but by another pod: this pod's progress is not in it.
        assert_eq!(
            pending(Jobs(Some("a\n")), Store(&[("a", "pod-2", 1_500)]), &["a"]).await,
            ["a"]
        );
        // Only an older checkpoint, still listed: pending.
        assert_eq!(
            pending(Jobs(Some("a\n")), Store(&[("a", "pod-1", 900)]), &["a"]).await,
            ["a"]
        );
        // No checkpoint and no longer listed: it finished.
        assert!(pending(Jobs(Some("")), Store(&[]), &["a"]).await.is_empty());
        // A checkpoint that fails verification keeps the job pending, listed or not.
        assert_eq!(
            pending(Jobs(Some("")), Store(&[]), &["broken"]).await,
            ["broken"]
        );
        // An unreachable pod cannot show a job finished: only checkpoints count.
        assert_eq!(
            pending(Jobs(None), Store(&[("b", "pod-1", 2_000)]), &["a", "b"]).await,
            ["a"]
        );
    }

    #[test]
    fn provider_outcomes_tell_answers_from_failures() {
        let ok: Result<(), ProviderError> = Ok(());
        assert_eq!(provider_outcome(&ok), Some("ok"));
        let refused = [
            ProviderError::NotFound { what: "pod".into() },
            ProviderError::Conflict { detail: "x".into() },
            ProviderError::CapacityExhausted {
                gpu_type: "A5000".into(),
                detail: "x".into(),
            },
        ];
        for e in refused {
            assert_eq!(
                provider_outcome::<()>(&Err(e.clone())),
                Some("refused"),
                "{e}"
            );
        }
        let errors = [
            ProviderError::Auth { status: 401 },
            ProviderError::RateLimited {
                retry_after: Duration::from_secs(1),
            },
            ProviderError::Transient {
                detail: "502".into(),
            },
            ProviderError::InvalidRequest { detail: "x".into() },
            ProviderError::Timeout {
                op: "list".into(),
                deadline: Duration::from_secs(1),
            },
        ];
        for e in errors {
            assert_eq!(
                provider_outcome::<()>(&Err(e.clone())),
                Some("error"),
                "{e}"
            );
        }
        let cancelled = ProviderError::Cancelled { op: "list".into() };
        assert_eq!(provider_outcome::<()>(&Err(cancelled)), None);
    }

    #[tokio::test]
    async fn bounded_counts_each_call_by_outcome_and_a_deadline_as_an_error() {
        let metrics = Metrics::new();
        let count = |m: &Metrics, op: &str, outcome: &str| {
            let series = format!(
                "runpod_autoscaler_provider_requests_total{{op=\"{op}\",outcome=\"{outcome}\"}} "
            );
            m.render()
                .lines()
                .find_map(|l| l.strip_prefix(series.as_str())?.parse::<u64>().ok())
        };
        let t = Duration::from_secs(5);
        let _ = bounded(&metrics, t, "list", async { Ok::<_, ProviderError>(()) }).await;
        let _ = bounded(&metrics, t, "get", async {
            Err::<(), _>(ProviderError::NotFound { what: "p".into() })
        })
        .await;
        let slow = bounded(&metrics, Duration::from_millis(10), "create", async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, ProviderError>(())
        })
        .await;
        assert!(matches!(slow, Err(ProviderError::Timeout { .. })));
        let _ = bounded(&metrics, t, "terminate", async {
            Err::<(), _>(ProviderError::Cancelled {
                op: "terminate".into(),
            })
        })
        .await;
        assert_eq!(count(&metrics, "list", "ok"), Some(1));
        assert_eq!(count(&metrics, "get", "refused"), Some(1));
        assert_eq!(count(&metrics, "create", "error"), Some(1));
        assert_eq!(count(&metrics, "create", "ok"), Some(0));
        for outcome in ["ok", "refused", "error"] {
            assert_eq!(count(&metrics, "terminate", outcome), Some(0));
        }
    }
}
