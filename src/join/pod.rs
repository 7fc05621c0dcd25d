//! What the reconciler runs on a pod, and how it reads the answers: the bootstrap wrapped so
//! it runs once per pod whatever happens (markers under `$HOME/.runpod-autoscaler/`), the two
//! join modes (`worker`: start the platform's GPU worker; `kubernetes`: a `k3s agent` or
//! `kubeadm join` command), the GPU health check (`nvidia-smi`, parsed and compared with what
//! was bought) and the drain signal. Commands are built here and run through [`PodShell`]; the
//! parsing is pure.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use super::{exec_as, ExecOutput, HostKeyPolicy, JoinError, KnownHosts, SshKey, SshTarget};
use crate::model::Secret;

/// The directory on a pod where the markers live.
pub const STATE_DIR: &str = "$HOME/.runpod-autoscaler";

/// Exit status of the bootstrap wrapper when another run holds the lock (still bootstrapping).
pub const EXIT_IN_PROGRESS: u32 = 75;
/// Exit status when an earlier run failed (the pod will not join: replace it).
pub const EXIT_FAILED_BEFORE: u32 = 71;

/// The health query: one CSV line per GPU, name, memory and utilization.
pub const HEALTH_QUERY: &str =
    "nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader,nounits";

/// Runs commands on pods. One real implementation: [`SshShell`].
#[async_trait]
pub trait PodShell: Send + Sync {
    /// Runs `command` on the pod `pod_id` reachable at `target`, within `timeout`.
    async fn run(
        &self,
        pod_id: &str,
        target: &SshTarget,
        command: &str,
        timeout: Duration,
    ) -> Result<ExecOutput, JoinError>;

    /// Forgets what is remembered about a pod that is gone (its pinned host key).
    fn forget(&self, pod_id: &str);
}

/// SSH with one private key; host keys pinned per pod on first use, or a fixed set.
#[derive(Debug, Clone)]
pub struct SshShell {
    key: SshKey,
    policy: HostKeyPolicy,
}

impl SshShell {
    /// A shell logging in with `key`, trusting each pod's host key on first use.
    pub fn trust_on_first_use(key: SshKey) -> Self {
        SshShell {
            key,
            policy: HostKeyPolicy::TrustOnFirstUse(KnownHosts::new()),
        }
    }

    /// A shell accepting only these host keys (OpenSSH public key lines).
    pub fn pinned(key: SshKey, host_keys: Vec<String>) -> Self {
        SshShell {
            key,
            policy: HostKeyPolicy::Pinned(host_keys),
        }
    }
}

#[async_trait]
impl PodShell for SshShell {
    async fn run(
        &self,
        pod_id: &str,
        target: &SshTarget,
        command: &str,
        timeout: Duration,
    ) -> Result<ExecOutput, JoinError> {
        exec_as(target, pod_id, &self.key, &self.policy, command, timeout).await
    }

    fn forget(&self, pod_id: &str) {
        if let HostKeyPolicy::TrustOnFirstUse(known) = &self.policy {
            known.forget(pod_id);
        }
    }
}

/// A shell for dry runs (`plan`): nothing is run on pods; every command fails, saying why.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoShell;

#[async_trait]
impl PodShell for NoShell {
    async fn run(
        &self,
        _pod_id: &str,
        _target: &SshTarget,
        _command: &str,
        _timeout: Duration,
    ) -> Result<ExecOutput, JoinError> {
        Err(JoinError::Session(
            "dry run: commands are not run on pods".into(),
        ))
    }

    fn forget(&self, _pod_id: &str) {}
}

/// Quotes `s` for a POSIX shell (single quotes; embedded ones closed, escaped, reopened).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `command` wrapped so that it runs at most once per pod: the first run takes a lock
/// directory (`mkdir` is atomic), a later or concurrent run exits [`EXIT_IN_PROGRESS`] while it
/// runs, 0 once it succeeded (marker `bootstrap.done`), [`EXIT_FAILED_BEFORE`] if it failed.
/// The command's output goes to `bootstrap.log` on the pod.
pub fn run_once(command: &str) -> String {
    format!(
        r#"d="{STATE_DIR}"; mkdir -p "$d" || exit 70
if [ -e "$d/bootstrap.done" ]; then exit 0; fi
if [ -e "$d/bootstrap.failed" ]; then exit {EXIT_FAILED_BEFORE}; fi
mkdir "$d/bootstrap.lock" 2>/dev/null || exit {EXIT_IN_PROGRESS}
cd "$HOME" || exit 70
( {command}
) >"$d/bootstrap.log" 2>&1 </dev/null
rc=$?
if [ "$rc" -eq 0 ]; then : >"$d/bootstrap.done"; else echo "$rc" >"$d/bootstrap.failed"; fi
exit "$rc""#
    )
}

/// How a bootstrap run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapOutcome {
    /// Done (now or earlier).
    Done,
    /// Another run is still going.
    InProgress,
    /// It failed (now or earlier), with what the pod said.
    Failed(String),
}

/// Reads a [`run_once`] result.
pub fn bootstrap_outcome(out: &ExecOutput) -> BootstrapOutcome {
    match out.exit_status {
        Some(0) => BootstrapOutcome::Done,
        Some(EXIT_IN_PROGRESS) => BootstrapOutcome::InProgress,
        Some(EXIT_FAILED_BEFORE) => {
            BootstrapOutcome::Failed("an earlier bootstrap run failed on this pod".into())
        }
        status => BootstrapOutcome::Failed(format!(
            "bootstrap exited with {}: {}",
            status.map_or("no status".to_owned(), |s| s.to_string()),
            tail(&out.stderr)
        )),
    }
}

/// The last few hundred bytes of command output, for error messages.
fn tail(bytes: &[u8]) -> String {
    const KEEP: usize = 400;
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    match text.char_indices().rev().nth(KEEP) {
        Some((i, _)) => format!("…{}", &text[i..]),
        None => text.to_owned(),
    }
}

/// Which join template `kubernetes` mode renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeJoin {
    /// `k3s agent` through the k3s install script.
    K3s,
    /// `kubeadm join`.
    Kubeadm,
}

/// What joining a pod means.
#[derive(Debug, Clone)]
pub enum JoinPlan {
    /// Start the platform's GPU worker on the pod, detached, with `env` exported.
    Worker {
        /// The worker command.
        command: String,
        /// Its environment (Kafka, S3 settings; may hold secrets).
        env: BTreeMap<String, Secret>,
    },
    /// Join the pod to a cluster as a node (hosts that allow a kubelet).
    Kubernetes {
        /// Which template.
        template: KubeJoin,
        /// API server URL (k3s) or `host:port` (kubeadm).
        server: String,
        /// The join token (from the secret file).
        token: Secret,
        /// kubeadm's `--discovery-token-ca-cert-hash`.
        ca_cert_hash: Option<String>,
        /// Extra node labels (the standard ones are always added).
        labels: BTreeMap<String, String>,
    },
}

/// The labels every node joined from RunPod carries.
pub fn node_labels(pod_id: &str, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut labels = extra.clone();
    labels.insert("nvidia.com/gpu".into(), "true".into());
    labels.insert("gpu-type".into(), "runpod".into());
    labels.insert("runpod.io/pod-id".into(), pod_id.into());
    labels
}

impl JoinPlan {
    /// The bootstrap command for `pod_id` (to be wrapped by [`run_once`]). It holds secrets:
    /// never log it.
    pub fn command(&self, pod_id: &str) -> String {
        match self {
            JoinPlan::Worker { command, env } => {
                let mut s = String::new();
                for (k, v) in env {
                    s.push_str(&format!("export {k}={}\n", shell_quote(v.expose())));
                }
                s.push_str(&format!("export RPA_POD_ID={}\n", shell_quote(pod_id)));
                s.push_str(&format!("export RPA_DRAIN_FILE=\"{STATE_DIR}/drain\"\n"));
                // Detached from the SSH session: the worker outlives it.
                s.push_str(&format!(
                    "nohup setsid sh -c {} >\"{STATE_DIR}/worker.log\" 2>&1 </dev/null &\necho $! >\"{STATE_DIR}/worker.pid\"",
                    shell_quote(command)
                ));
                s
            }
            JoinPlan::Kubernetes {
                template,
                server,
                token,
                ca_cert_hash,
                labels,
            } => {
                let labels = node_labels(pod_id, labels)
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                match template {
                    KubeJoin::K3s => format!(
                        "curl -sfL https://get.k3s.io | K3S_URL={} K3S_TOKEN={} sh -s - agent --node-name {} --node-label {}",
                        shell_quote(server),
                        shell_quote(token.expose()),
                        shell_quote(pod_id),
                        shell_quote(&labels).replace(',', "' --node-label '")
                    ),
                    KubeJoin::Kubeadm => format!(
                        "kubeadm join {} --token {}{} --node-name {} --node-labels {}",
                        shell_quote(server),
                        shell_quote(token.expose()),
                        ca_cert_hash
                            .as_ref()
                            .map(|h| format!(" --discovery-token-ca-cert-hash {}", shell_quote(h)))
                            .unwrap_or_default(),
                        shell_quote(pod_id),
                        shell_quote(&labels)
                    ),
                }
            }
        }
    }
}

/// The command that prints the jobs a worker has in hand (its jobs file, one id per line).
pub fn read_jobs() -> String {
    format!("cat \"{STATE_DIR}/jobs\" 2>/dev/null; true")
}

/// The job ids in a jobs file's text.
pub fn parse_jobs(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The drain signal for worker mode: the worker stops taking work when this file exists.
pub fn drain_signal() -> String {
    format!("mkdir -p \"{STATE_DIR}\" && : >\"{STATE_DIR}/drain\"")
}

/// One GPU as `nvidia-smi` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    /// Model name.
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Utilization in percent.
    pub utilization: f64,
}

/// Why a health answer is not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GpuCheckError {
    /// The command failed.
    #[error("nvidia-smi failed (exit {status:?}): {detail}")]
    Failed {
        /// Its exit status.
        status: Option<u32>,
        /// What it printed on stderr.
        detail: String,
    },
    /// A line is not `name, memory, utilization`.
    #[error("cannot read nvidia-smi line {line:?}: expected `name, memory MiB, utilization %`")]
    Unreadable {
        /// The line.
        line: String,
    },
    /// Fewer or more GPUs than bought.
    #[error("expected {expected} GPU(s), nvidia-smi reports {found}")]
    Count {
        /// GPUs bought.
        expected: u32,
        /// GPUs seen.
        found: usize,
    },
    /// Another GPU model than bought.
    #[error("expected {expected} GPUs, found {found:?}")]
    Model {
        /// The type bought.
        expected: String,
        /// What the pod has.
        found: String,
    },
}

/// Parses [`HEALTH_QUERY`]'s output.
pub fn parse_gpus(out: &ExecOutput) -> Result<Vec<GpuInfo>, GpuCheckError> {
    if out.exit_status != Some(0) {
        return Err(GpuCheckError::Failed {
            status: out.exit_status,
            detail: tail(&out.stderr),
        });
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let unreadable = || GpuCheckError::Unreadable { line: line.into() };
            let mut parts = line.rsplitn(3, ',').map(str::trim);
            let utilization = parts.next().ok_or_else(unreadable)?;
            let memory = parts.next().ok_or_else(unreadable)?;
            let name = parts
                .next()
                .filter(|n| !n.is_empty())
                .ok_or_else(unreadable)?;
            // "[N/A]" utilization (e.g. MIG) reads as unknown = 0.
            let utilization = match utilization {
                "[N/A]" | "N/A" => 0.0,
                u => u.parse::<f64>().map_err(|_| unreadable())?,
            };
            Ok(GpuInfo {
                name: name.to_owned(),
                memory_mib: memory.parse().map_err(|_| unreadable())?,
                utilization,
            })
        })
        .collect()
}

/// Checks the GPUs against what was bought: count and model (RunPod ids are nvidia-smi names,
/// compared without case).
pub fn check_gpus(gpus: &[GpuInfo], gpu_type: &str, count: u32) -> Result<(), GpuCheckError> {
    if gpus.len() != count as usize {
        return Err(GpuCheckError::Count {
            expected: count,
            found: gpus.len(),
        });
    }
    let want = gpu_type.to_ascii_lowercase();
    match gpus
        .iter()
        .find(|g| !g.name.to_ascii_lowercase().contains(&want))
    {
        Some(g) => Err(GpuCheckError::Model {
            expected: gpu_type.to_owned(),
            found: g.name.clone(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(status: u32, stdout: &str) -> ExecOutput {
        ExecOutput {
            exit_status: Some(status),
            stdout: stdout.as_bytes().to_vec(),
            stderr: b"boom".to_vec(),
        }
    }

    #[test]
    fn gpus_parse_and_check() {
        let o = out(
            0,
            "NVIDIA RTX A5000, 24564, 37\nNVIDIA RTX A5000, 24564, [N/A]\n",
        );
        let gpus = parse_gpus(&o).unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].memory_mib, 24564);
        assert_eq!(gpus[0].utilization, 37.0);
        assert_eq!(gpus[1].utilization, 0.0);
        assert!(check_gpus(&gpus, "NVIDIA RTX A5000", 2).is_ok());
        assert_eq!(
            check_gpus(&gpus, "NVIDIA RTX A5000", 1),
            Err(GpuCheckError::Count {
                expected: 1,
                found: 2
            })
        );
        assert!(matches!(
            check_gpus(&gpus, "NVIDIA L40S", 2),
            Err(GpuCheckError::Model { .. })
        ));
        // A comma in the model name is kept (the last two fields are numbers).
        let odd = parse_gpus(&out(0, "Weird, Inc GPU, 1024, 5")).unwrap();
        assert_eq!(odd[0].name, "Weird, Inc GPU");
        for bad in ["NVIDIA, x, 3", "just a name", ", 1, 2"] {
            assert!(
                matches!(
                    parse_gpus(&out(0, bad)),
                    Err(GpuCheckError::Unreadable { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_gpus(&out(127, "")),
            Err(GpuCheckError::Failed {
                status: Some(127),
                ..
            })
        ));
    }

    #[test]
    fn bootstrap_outcomes() {
        assert_eq!(bootstrap_outcome(&out(0, "")), BootstrapOutcome::Done);
        assert_eq!(
            bootstrap_outcome(&out(EXIT_IN_PROGRESS, "")),
            BootstrapOutcome::InProgress
        );
        assert!(matches!(
            bootstrap_outcome(&out(3, "")),
            BootstrapOutcome::Failed(m) if m.contains("exited with 3") && m.contains("boom")
        ));
    }

    /// Runs a shell script locally (the same POSIX sh a pod has) with `HOME` set.
    fn sh(home: &std::path::Path, script: &str) -> u32 {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("HOME", home)
            .status()
            .unwrap();
        status.code().unwrap() as u32
    }

    #[test]
    fn the_bootstrap_runs_once_even_when_asked_again_or_concurrently() {
        let home = tempfile::tempdir().unwrap();
        let counter = home.path().join("runs");
        let cmd = format!("echo x >> {}", counter.display());
        assert_eq!(sh(home.path(), &run_once(&cmd)), 0);
        assert_eq!(sh(home.path(), &run_once(&cmd)), 0, "done before: 0 again");
        assert_eq!(std::fs::read_to_string(&counter).unwrap(), "x\n");

        // A slow first run: the second one sees the lock and does not start the command.
        let slow_home = tempfile::tempdir().unwrap();
        let marker = slow_home.path().join("started");
        let release = slow_home.path().join("release");
        let slow = format!(
            "echo s >> {m}; while [ ! -e {r} ]; do sleep 0.05; done",
            m = marker.display(),
            r = release.display()
        );
        let script = run_once(&slow);
        let mut first = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env("HOME", slow_home.path())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !marker.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "first run never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(sh(slow_home.path(), &script), EXIT_IN_PROGRESS);
        std::fs::write(&release, "").unwrap();
        assert_eq!(first.wait().unwrap().code(), Some(0));
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "s\n");

        // A failed run is remembered: the pod will not be bootstrapped twice.
        let bad_home = tempfile::tempdir().unwrap();
        assert_eq!(sh(bad_home.path(), &run_once("exit 9")), 9);
        assert_eq!(sh(bad_home.path(), &run_once("true")), EXIT_FAILED_BEFORE);
    }

    #[test]
    fn join_commands_quote_values_and_label_nodes() {
        let mut env = BTreeMap::new();
        env.insert("KAFKA_TOPIC".to_owned(), Secret::new("jobs"));
        env.insert(
            "S3_SECRET_ACCESS_KEY".to_owned(),
            Secret::new("it's secret"),
        );
        let worker = JoinPlan::Worker {
            command: "python -m worker --gpu".into(),
            env,
        };
        let cmd = worker.command("pod1");
        assert!(
            cmd.contains("export S3_SECRET_ACCESS_KEY='it'\\''s secret'"),
            "{cmd}"
        );
        assert!(cmd.contains("export RPA_POD_ID='pod1'"));
        assert!(cmd.contains("nohup setsid sh -c 'python -m worker --gpu'"));

        let k3s = JoinPlan::Kubernetes {
            template: KubeJoin::K3s,
            server: "https://10.0.0.1:6443".into(),
            token: Secret::new("K10::tok"),
            ca_cert_hash: None,
            labels: BTreeMap::new(),
        }
        .command("abc123");
        assert!(k3s.contains("K3S_URL='https://10.0.0.1:6443'"), "{k3s}");
        assert!(k3s.contains("--node-label 'nvidia.com/gpu=true'"), "{k3s}");
        assert!(
            k3s.contains("--node-label 'runpod.io/pod-id=abc123'"),
            "{k3s}"
        );
        assert!(k3s.contains("--node-label 'gpu-type=runpod'"), "{k3s}");

        let kubeadm = JoinPlan::Kubernetes {
            template: KubeJoin::Kubeadm,
            server: "10.0.0.1:6443".into(),
            token: Secret::new("abcdef.0123456789abcdef"),
            ca_cert_hash: Some("sha256:00ff".into()),
            labels: [("zone".to_owned(), "runpod".to_owned())].into(),
        }
        .command("abc123");
        assert!(
            kubeadm.contains("--discovery-token-ca-cert-hash 'sha256:00ff'"),
            "{kubeadm}"
        );
        assert!(
            kubeadm.contains(
                "--node-labels 'gpu-type=runpod,nvidia.com/gpu=true,runpod.io/pod-id=abc123,zone=runpod'"
            ),
            "{kubeadm}"
        );
    }

    #[test]
    fn a_worker_bootstrap_starts_a_detached_process_that_sees_its_env() {
        let home = tempfile::tempdir().unwrap();
        let mut env = BTreeMap::new();
        env.insert("GREETING".to_owned(), Secret::new("hello there"));
        let plan = JoinPlan::Worker {
            command: "echo \"$GREETING $RPA_POD_ID $RPA_DRAIN_FILE\" > \"$HOME/seen\"".into(),
            env,
        };
        assert_eq!(sh(home.path(), &run_once(&plan.command("p9"))), 0);
        let seen = home.path().join("seen");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !seen.exists() {
            assert!(std::time::Instant::now() < deadline, "worker never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = std::fs::read_to_string(seen).unwrap();
        assert!(text.starts_with("hello there p9 "), "{text}");
        assert!(
            text.trim_end().ends_with(".runpod-autoscaler/drain"),
            "{text}"
        );
    }
}
