//! The acting side's configuration: `[reconcile]` (mode, state, pod shape, timings), `[join]`
//! (what joining a pod means) and `[[offers]]` (what may be bought). Plain data with
//! validation; the reconciler turns it into its settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::model::{Cloud, Secret};

/// Advisory (plans published, never executed) or active (the reconciler acts on RunPod).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plans are published and served to KEDA, never executed.
    #[default]
    Advisory,
    /// The reconciler launches, joins, drains and terminates RunPod pods.
    Active,
}

/// `[reconcile]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// `advisory` (default) or `active`.
    pub mode: Mode,
    /// Part of every pod name (`<name_prefix><cluster>-<slot>-<generation>`).
    pub cluster: String,
    /// Where the claim store lives (one writer per directory).
    pub state_dir: PathBuf,
    /// Container image of new pods.
    pub image: String,
    /// Container disk (GB).
    pub disk_gb: u32,
    /// Extra environment of new pods.
    pub env: BTreeMap<String, String>,
    /// Private ed25519 key (OpenSSH format) the reconciler logs in with; its public half
    /// (`<file>.pub`) is injected into pods as `PUBLIC_KEY`.
    pub ssh_key_file: Option<PathBuf>,
    /// Host keys to accept (OpenSSH lines); empty: each pod's key is trusted on first use.
    pub ssh_host_keys: Vec<String>,
    /// An unresolved claim whose pod has not shown up this long is retired.
    #[serde(with = "humantime_serde")]
    pub claim_resolve_timeout: Duration,
    /// A bound pod missing from listings this long is looked up, then forgotten.
    #[serde(with = "humantime_serde")]
    pub vanish_window: Duration,
    /// A pod of ours that no claim explains is terminated after this long.
    #[serde(with = "humantime_serde")]
    pub orphan_grace: Duration,
    /// A market (GPU type, cloud, spot) is set aside this long after a capacity error.
    #[serde(with = "humantime_serde")]
    pub unavailable_ttl: Duration,
    /// How often prices and stock are read again.
    #[serde(with = "humantime_serde")]
    pub quotes_refresh: Duration,
    /// Health probe period (at most 30 s).
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// Probes failing this long: the pod is replaced.
    #[serde(with = "humantime_serde")]
    pub unhealthy_after: Duration,
    /// A GPU at or above this utilization (percent) is busy.
    pub busy_utilization: f64,
    /// Longest wait for a draining pod to go idle.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Pods older than this are replaced (drained first).
    #[serde(with = "humantime_serde")]
    pub max_pod_lifetime: Option<Duration>,
    /// Bound on every SSH command (the bootstrap included).
    #[serde(with = "humantime_serde")]
    pub ssh_timeout: Duration,
    /// Bound on every provider call.
    #[serde(with = "humantime_serde")]
    pub provider_timeout: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            mode: Mode::Advisory,
            cluster: "c1".into(),
            state_dir: PathBuf::from("/var/lib/runpod-autoscaler"),
            image: String::new(),
            // Enough for a worker image's scratch space; RunPod's own default is 20.
            disk_gb: 40,
            env: BTreeMap::new(),
            ssh_key_file: None,
            ssh_host_keys: Vec::new(),
            // RunPod has been seen hiding new pods from listings for seconds; a minute is far
            // beyond that and still short next to a boot.
            claim_resolve_timeout: Duration::from_secs(60),
            vanish_window: Duration::from_secs(30),
            // Long enough for a create that answered late to be claimed by its own claim first.
            orphan_grace: Duration::from_secs(180),
            // Sold-out types come back within minutes; retrying sooner just collects errors.
            unavailable_ttl: Duration::from_secs(180),
            quotes_refresh: Duration::from_secs(300),
            health_interval: Duration::from_secs(15),
            // Three missed probes: a dead pod is replaced within a minute.
            unhealthy_after: Duration::from_secs(45),
            busy_utilization: 10.0,
            drain_timeout: Duration::from_secs(600),
            max_pod_lifetime: None,
            // A k3s join downloads and installs; a worker start is instant.
            ssh_timeout: Duration::from_secs(300),
            provider_timeout: Duration::from_secs(60),
        }
    }
}

/// `[join] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinMode {
    /// The pod runs the platform's GPU worker outside the cluster.
    #[default]
    Worker,
    /// The pod joins the cluster as a node (hosts that allow a kubelet).
    Kubernetes,
}

/// `[join] kubernetes_template`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeTemplate {
    /// `k3s agent`.
    #[default]
    K3s,
    /// `kubeadm join`.
    Kubeadm,
}

/// `[join]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinConfig {
    /// `worker` (default) or `kubernetes`.
    pub mode: JoinMode,
    /// Worker mode: the command that starts the GPU worker (run detached, once per pod).
    pub worker_command: String,
    /// Worker mode: its environment. `KAFKA_BOOTSTRAP_SERVERS`, `KAFKA_CONSUMER_GROUP` and
    /// `KAFKA_TOPIC` default to `[signals.queue]`'s when it reads Kafka.
    pub worker_env: BTreeMap<String, String>,
    /// Worker mode: secret environment (S3 credentials…), never printed.
    pub worker_secret_env: BTreeMap<String, Secret>,
    /// Kubernetes mode: `k3s` or `kubeadm`.
    pub kubernetes_template: KubeTemplate,
    /// Kubernetes mode: API server (`https://host:6443` for k3s, `host:6443` for kubeadm).
    pub kubernetes_server: String,
    /// Kubernetes mode: file holding the join token.
    pub kubernetes_token_file: Option<PathBuf>,
    /// Kubernetes mode, kubeadm: `--discovery-token-ca-cert-hash`.
    pub kubernetes_ca_cert_hash: Option<String>,
    /// Kubernetes mode: extra node labels.
    pub kubernetes_labels: BTreeMap<String, String>,
    /// Health command (default: the nvidia-smi GPU query).
    pub health_command: Option<String>,
    /// Idle probe (exit 0 = idle); default: every GPU below `reconcile.busy_utilization`.
    pub idle_command: Option<String>,
    /// Drain command (default: the worker-mode drain file).
    pub drain_command: Option<String>,
}

/// One `[[offers]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OfferConfig {
    /// RunPod GPU type id.
    pub gpu_type: String,
    /// GPUs per pod.
    #[serde(default = "one")]
    pub gpus_per_pod: u32,
    /// `secure` (default) or `community`.
    #[serde(default = "secure")]
    pub cloud: Cloud,
    /// Allowed data centers; empty = any.
    #[serde(default)]
    pub data_centers: Vec<String>,
    /// Spot allowed, bidding at most this per GPU-hour.
    #[serde(default)]
    pub max_bid_per_gpu: Option<f64>,
    /// Work per GPU relative to the other offers (default 1).
    #[serde(default = "unit")]
    pub throughput: f64,
}

fn one() -> u32 {
    1
}
fn secure() -> Cloud {
    Cloud::Secure
}
fn unit() -> f64 {
    1.0
}

/// Health probes more than this far apart would miss the one-minute detection promise.
const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(30);

/// Checks the acting side; only called for `mode = "active"` beyond the basic ranges.
pub(super) fn validate(
    r: &ReconcileConfig,
    j: &JoinConfig,
    offers: &[OfferConfig],
    has_api_key: bool,
) -> Result<(), ConfigError> {
    let invalid = |key, problem: String, fix| Err(ConfigError::Invalid { key, problem, fix });
    let cluster_ok = !r.cluster.is_empty()
        && r.cluster.len() <= 24
        && r.cluster
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !cluster_ok {
        return invalid(
            "reconcile.cluster",
            format!(
                "{:?} is not 1–24 lowercase letters, digits or '-'",
                r.cluster
            ),
            "set a short cluster id, e.g. \"prod-eu\" (it is part of every pod name)",
        );
    }
    if r.health_interval.is_zero() || r.health_interval > MAX_HEALTH_INTERVAL {
        return invalid(
            "reconcile.health_interval",
            format!("{:?} is not within (0, 30s]", r.health_interval),
            "set e.g. \"15s\": a dead pod must be noticed within a minute",
        );
    }
    if r.unhealthy_after < r.health_interval {
        return invalid(
            "reconcile.unhealthy_after",
            "is shorter than reconcile.health_interval".into(),
            "set it to a few health intervals, e.g. \"45s\"",
        );
    }
    if !(r.busy_utilization.is_finite() && (0.0..=100.0).contains(&r.busy_utilization)) {
        return invalid(
            "reconcile.busy_utilization",
            format!("{} is not a percentage", r.busy_utilization),
            "set 0–100, e.g. 10",
        );
    }
    for (key, d) in [
        ("reconcile.claim_resolve_timeout", r.claim_resolve_timeout),
        ("reconcile.vanish_window", r.vanish_window),
        ("reconcile.orphan_grace", r.orphan_grace),
        ("reconcile.unavailable_ttl", r.unavailable_ttl),
        ("reconcile.quotes_refresh", r.quotes_refresh),
        ("reconcile.drain_timeout", r.drain_timeout),
        ("reconcile.ssh_timeout", r.ssh_timeout),
        ("reconcile.provider_timeout", r.provider_timeout),
    ] {
        if d.is_zero() {
            return invalid(key, "is 0".into(), "set a positive duration, e.g. \"60s\"");
        }
    }
    if r.orphan_grace < r.claim_resolve_timeout {
        return invalid(
            "reconcile.orphan_grace",
            "is shorter than reconcile.claim_resolve_timeout, so a slow create's pod could be \
             collected as an orphan before its claim adopts it"
                .into(),
            "set orphan_grace ≥ claim_resolve_timeout (defaults: 3m and 60s)",
        );
    }
    for (i, o) in offers.iter().enumerate() {
        let bad_bid = o
            .max_bid_per_gpu
            .is_some_and(|b| !(b.is_finite() && b > 0.0));
        if o.gpu_type.trim().is_empty() || o.gpus_per_pod == 0 || bad_bid {
            return invalid(
                "offers",
                format!(
                    "entry {} needs a gpu_type, gpus_per_pod ≥ 1 and a positive max_bid_per_gpu when set",
                    i + 1
                ),
                "fix that [[offers]] entry",
            );
        }
        if !(o.throughput.is_finite() && o.throughput > 0.0) {
            return invalid(
                "offers",
                format!(
                    "entry {} has throughput {} (must be > 0)",
                    i + 1,
                    o.throughput
                ),
                "set the relative work per GPU, e.g. 1.0",
            );
        }
    }
    if r.mode == Mode::Advisory {
        return Ok(());
    }
    if !has_api_key {
        return invalid(
            "runpod.api_key",
            "is missing while reconcile.mode = \"active\"".into(),
            "set RUNPOD_API_KEY (or runpod.api_key), or use mode = \"advisory\"",
        );
    }
    if r.image.trim().is_empty() {
        return invalid(
            "reconcile.image",
            "is empty while reconcile.mode = \"active\"".into(),
            "set the container image of GPU pods",
        );
    }
    match &r.ssh_key_file {
        None => {
            return invalid(
                "reconcile.ssh_key_file",
                "is missing while reconcile.mode = \"active\"".into(),
                "point it at an ed25519 private key whose public half is <file>.pub",
            )
        }
        Some(p) if !p.is_file() || !public_key_path(p).is_file() => {
            return invalid(
                "reconcile.ssh_key_file",
                format!("{} or its .pub is not a readable file", p.display()),
                "create one with `ssh-keygen -t ed25519 -N '' -f FILE`",
            )
        }
        Some(_) => {}
    }
    match j.mode {
        JoinMode::Worker if j.worker_command.trim().is_empty() => invalid(
            "join.worker_command",
            "is empty in worker mode".into(),
            "set the command that starts the GPU worker on a pod",
        ),
        JoinMode::Kubernetes if j.kubernetes_server.trim().is_empty() => invalid(
            "join.kubernetes_server",
            "is empty in kubernetes mode".into(),
            "set the API server, e.g. \"https://10.0.0.1:6443\"",
        ),
        JoinMode::Kubernetes
            if j.kubernetes_token_file
                .as_ref()
                .is_none_or(|p| !p.is_file()) =>
        {
            invalid(
                "join.kubernetes_token_file",
                "is not a readable file".into(),
                "point it at the file holding the join token",
            )
        }
        _ => Ok(()),
    }
}

/// Where the public half of an SSH key is: `<file>.pub`.
pub fn public_key_path(private: &std::path::Path) -> PathBuf {
    let mut s = private.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}
