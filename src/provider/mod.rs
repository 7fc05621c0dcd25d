//! Cloud GPU providers: the [`CloudProvider`] trait and its provider-neutral types
//! ([`LaunchSpec`], [`Pod`], [`Offering`], [`ProviderError`]). The only implementation today is
//! [`runpod::RunPodClient`] (REST v2, GraphQL for spot pods and spot prices); its wire types stay
//! private to that module.
//!
//! Ownership: every pod this autoscaler launches carries an owner marker (a name prefix and an
//! environment variable, see [`OwnerMarker`]); [`CloudProvider::list`] returns only those.

/// The RunPod implementation.
pub mod runpod;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

pub use crate::model::Cloud;
use crate::model::{GpuTypeId, PodId, PodState, Timestamp, Usd};

/// A provider failure. Exactly these kinds; [`ProviderError::is_retryable`] tells whether the
/// same request may succeed later. Messages never contain the API key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// 401/403: the key is missing, wrong or lacks access. Never retried.
    #[error("RunPod API key rejected (HTTP {status}): set RUNPOD_API_KEY or runpod.api_key to a valid key")]
    Auth {
        /// 401 or 403.
        status: u16,
    },
    /// The pod (or other resource) does not exist.
    #[error("not found: {what}")]
    NotFound {
        /// What was looked up.
        what: String,
    },
    /// 409: the action is not valid in the resource's current state.
    #[error("conflict: {detail}")]
    Conflict {
        /// The provider's explanation.
        detail: String,
    },
    /// No capacity for this GPU type (and cloud, spot or not) now: move on to another candidate
    /// instead of retrying this one in place.
    #[error("capacity exhausted for {gpu_type}: {detail}")]
    CapacityExhausted {
        /// The GPU type asked for (empty when the request had none).
        gpu_type: String,
        /// The provider's explanation.
        detail: String,
    },
    /// 429 after the retry budget was spent; `retry_after` is the provider's last hint.
    #[error("rate limited by the provider; retry after {retry_after:?}")]
    RateLimited {
        /// How long the provider asked to wait.
        retry_after: Duration,
    },
    /// 5xx, timeouts, connection failures or an unreadable answer, after the retry budget.
    #[error("transient provider failure: {detail}")]
    Transient {
        /// What failed.
        detail: String,
    },
    /// 400/422: the request itself is wrong; carries the problem's `detail`.
    #[error("invalid request: {detail}")]
    InvalidRequest {
        /// The provider's explanation (problem+json `detail`, plus `errors` when given).
        detail: String,
    },
    /// The call's overall deadline passed before it finished. A launch cut off this way is
    /// ambiguous: the pod may exist, so look it up by name before launching again.
    #[error("{op} did not finish within its {deadline:?} deadline")]
    Timeout {
        /// The public call (`launch`, `list`, …).
        op: String,
        /// The deadline it had.
        deadline: Duration,
    },
    /// Shutdown cancelled the call. Not retried: the process is stopping.
    #[error("{op} cancelled by shutdown")]
    Cancelled {
        /// The public call (`launch`, `list`, …).
        op: String,
    },
}

impl ProviderError {
    /// True when the same request may succeed later (rate limits and transient failures).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. }
                | ProviderError::Transient { .. }
                | ProviderError::Timeout { .. }
        )
    }
}

/// How this autoscaler recognises its own pods: a name prefix and an env var with the owner id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerMarker {
    /// Every pod name starts with this (e.g. `rpa-`).
    pub name_prefix: String,
    /// Value of the [`OwnerMarker::ENV`] variable on every pod (e.g. the cluster name).
    pub owner: String,
}

impl OwnerMarker {
    /// The environment variable carrying the owner id.
    pub const ENV: &'static str = "RPA_OWNER";

    /// True when a pod with this name and environment is ours.
    pub fn owns(&self, name: &str, env: &BTreeMap<String, String>) -> bool {
        self.why_not_owned(name, env).is_none()
    }

    /// Why a pod with this name and environment is not ours (`None` when it is), naming the
    /// marker that does not match and the setting behind it.
    pub fn why_not_owned(&self, name: &str, env: &BTreeMap<String, String>) -> Option<String> {
        if !name.starts_with(&self.name_prefix) {
            return Some(format!(
                "its name {name:?} does not start with {:?} (runpod.name_prefix)",
                self.name_prefix
            ));
        }
        match env.get(Self::ENV) {
            None => Some(format!(
                "it has no {} env var (ours carry {:?}, runpod.owner)",
                Self::ENV,
                self.owner
            )),
            Some(o) if *o != self.owner => Some(format!(
                "its {} is {o:?}, not {:?} (runpod.owner)",
                Self::ENV,
                self.owner
            )),
            Some(_) => None,
        }
    }
}

impl Default for OwnerMarker {
    fn default() -> Self {
        OwnerMarker {
            name_prefix: "rpa-".into(),
            owner: "runpod-autoscaler".into(),
        }
    }
}

/// What to launch. `name` must be unique and deterministic: it is the idempotency key an
/// ambiguous create is checked against. The owner marker is added by the provider.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchSpec {
    /// Unique pod name without the owner prefix (the provider prepends it).
    pub name: String,
    /// GPU type id, exactly as the provider spells it.
    pub gpu_type: GpuTypeId,
    /// GPUs per pod.
    pub gpu_count: u32,
    /// Secure or community cloud.
    pub cloud: Cloud,
    /// Container image.
    pub image: String,
    /// Extra environment (the SSH public key goes in `PUBLIC_KEY`).
    pub env: BTreeMap<String, String>,
    /// Spot (interruptible) pod with this bid per GPU-hour; `None` = on-demand.
    pub spot_bid_per_gpu: Option<Usd>,
    /// Allowed data centers; empty = any.
    pub data_center_ids: Vec<String>,
    /// Container disk in GB.
    pub disk_gb: u32,
}

/// Where to reach a pod's sshd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SshEndpoint {
    /// Host or IP.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Login user.
    pub username: String,
}

/// A pod as the provider reports it, in provider-neutral terms.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pod {
    /// Provider id.
    pub id: PodId,
    /// Full name (owner prefix included).
    pub name: String,
    /// Lifecycle status (unknown values kept).
    pub state: PodState,
    /// GPU type, when the pod has GPUs.
    pub gpu_type: Option<GpuTypeId>,
    /// GPUs attached.
    pub gpu_count: u32,
    /// Current price per hour (0 when stopped or gone).
    pub usd_per_hour: Usd,
    /// When it was created, when the provider says.
    pub created_at: Option<Timestamp>,
    /// Direct SSH endpoint (public mapping of 22/tcp), when there is one.
    pub ssh: Option<SshEndpoint>,
    /// Environment as reported.
    pub env: BTreeMap<String, String>,
}

impl Pod {
    /// Ready = RUNNING **and** a public mapping for SSH. RunPod has been seen reporting RUNNING
    /// while the SSH mapping is still missing.
    pub fn is_ready(&self) -> bool {
        self.state == PodState::Running && self.ssh.is_some()
    }
}

/// How much of a GPU type is available now. Unknown levels are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Stock {
    /// Plenty.
    High,
    /// Some.
    Medium,
    /// Few.
    Low,
    /// None now.
    None,
    /// A level this version does not know.
    Unknown(String),
}

impl Stock {
    /// Parses any casing of RunPod's levels; a missing level means out of stock.
    pub fn parse(s: Option<&str>) -> Stock {
        match s.map(|s| s.to_ascii_uppercase()) {
            None => Stock::None,
            Some(s) => match s.as_str() {
                "HIGH" => Stock::High,
                "MEDIUM" => Stock::Medium,
                "LOW" => Stock::Low,
                "NONE" => Stock::None,
                _ => Stock::Unknown(s),
            },
        }
    }

    /// A short label.
    pub fn as_str(&self) -> &str {
        match self {
            Stock::High => "high",
            Stock::Medium => "medium",
            Stock::Low => "low",
            Stock::None => "none",
            Stock::Unknown(s) => s,
        }
    }
}

/// A GPU type one can rent, with prices (per GPU-hour) and stock.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Offering {
    /// GPU type id.
    pub gpu_type: GpuTypeId,
    /// Human name.
    pub display_name: String,
    /// GPU memory in GB.
    pub memory_gb: u32,
    /// On-demand price in the secure cloud, when offered there.
    pub secure_usd: Option<Usd>,
    /// On-demand price in the community cloud, when offered there.
    pub community_usd: Option<Usd>,
    /// Spot price in the secure cloud, when offered.
    pub secure_spot_usd: Option<Usd>,
    /// Spot price in the community cloud, when offered.
    pub community_spot_usd: Option<Usd>,
    /// Lowest accepted spot bid, when known.
    pub minimum_bid_usd: Option<Usd>,
    /// Current stock for pods.
    pub stock: Stock,
}

/// A GPU cloud the autoscaler can launch pods on.
#[async_trait]
pub trait CloudProvider: Send + Sync {
    /// Creates a pod. An ambiguous failure (5xx, timeout) is followed by a lookup by name
    /// before any retry, so a pod is never created twice.
    async fn launch(&self, spec: &LaunchSpec) -> Result<Pod, ProviderError>;

    /// Creates a pod once, for a caller that has persisted its intent and resolves an ambiguous
    /// outcome from its own later listings (the reconciler's claims): rate limits are waited
    /// out (nothing was created), any other failure is returned at once and never followed by
    /// a second create; a spot rent returns its id without waiting for GET to show it.
    async fn create(&self, spec: &LaunchSpec) -> Result<Pod, ProviderError>;

    /// One pod by id; `Ok(None)` when it does not exist.
    async fn get(&self, id: &PodId) -> Result<Option<Pod>, ProviderError>;

    /// Every pod this autoscaler owns (owner marker), in any state.
    async fn list(&self) -> Result<Vec<Pod>, ProviderError>;

    /// Terminates a pod for good. A pod that is already gone counts as done (`Ok`).
    async fn terminate(&self, id: &PodId) -> Result<(), ProviderError>;

    /// GPU types with on-demand and spot prices and current stock.
    async fn offerings(&self) -> Result<Vec<Offering>, ProviderError>;

    /// Ids of the account's interruptible (spot) pods: the ones the provider may stop at any
    /// time to reclaim capacity. A pod's kind is fixed for its life, so callers may remember
    /// it. A provider that cannot tell answers an empty set (every pod taken as on-demand).
    async fn interruptible(&self) -> Result<BTreeSet<PodId>, ProviderError> {
        Ok(BTreeSet::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_says_which_marker_does_not_match() {
        let m = OwnerMarker::default();
        let env = |o: Option<&str>| {
            o.map(|o| BTreeMap::from([(OwnerMarker::ENV.to_owned(), o.to_owned())]))
                .unwrap_or_default()
        };
        assert!(m.owns("rpa-a", &env(Some("runpod-autoscaler"))));
        let why = m
            .why_not_owned("manual", &env(Some("runpod-autoscaler")))
            .unwrap();
        assert!(
            why.contains("\"rpa-\"") && why.contains("runpod.name_prefix"),
            "{why}"
        );
        let why = m.why_not_owned("rpa-a", &env(None)).unwrap();
        assert!(why.contains("no RPA_OWNER"), "{why}");
        let why = m.why_not_owned("rpa-a", &env(Some("other"))).unwrap();
        assert!(
            why.contains("\"other\"") && why.contains("runpod.owner"),
            "{why}"
        );
    }
}
