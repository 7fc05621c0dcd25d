//! Pod access for people and agents: a pod id is resolved to its SSH endpoint through the
//! provider, commands run on pooled SSH ([`crate::join::pool`]), files move over SFTP with
//! chunk-verified, resumable transfers ([`transfer`]), health is watched ([`watch`]) and spend
//! is totalled ([`cost`]). Every failure is an [`AccessError`] saying what is wrong and what to
//! do; [`AccessError::kind`] names it for programs (the MCP server, `--output json`).

pub mod cost;
pub mod transfer;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use crate::join::pod::PodShell;
use crate::join::pool::SshPool;
use crate::join::{ExecOutput, JoinError, Output, SshTarget};
use crate::model::PodId;
use crate::provider::{CloudProvider, Pod, ProviderError};

/// Why a pod operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccessError {
    /// The provider refused the API key.
    #[error("RunPod API key rejected: set RUNPOD_API_KEY or runpod.api_key to a valid key")]
    BadApiKey,
    /// No pod has this id.
    #[error("unknown pod {pod}: no pod has this id (see `pods list` or the list_pods tool)")]
    UnknownPod {
        /// The id asked for.
        pod: String,
    },
    /// The pod exists but is not reachable: not RUNNING, no SSH port, or sshd not answering.
    #[error(
        "pod {pod} is offline ({why}): start it, or wait until it is RUNNING with an SSH port"
    )]
    PodOffline {
        /// The pod.
        pod: String,
        /// Its state, or the connection failure.
        why: String,
    },
    /// The destination has less free space than the transfer needs.
    #[error("not enough space on {side} for {path}: {needed} bytes needed, {available} bytes free; free space there or pick another destination")]
    DiskFull {
        /// `local` or `pod <id>`.
        side: String,
        /// The destination path.
        path: String,
        /// Bytes still to write.
        needed: u64,
        /// Bytes available there.
        available: u64,
    },
    /// A path does not exist or cannot be used.
    #[error("{side}: {path}: {detail}")]
    Path {
        /// `local` or `pod <id>`.
        side: String,
        /// The path.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Data arrived different from what was sent (after a retry).
    #[error("integrity check failed for {path}: {detail}")]
    Integrity {
        /// The file.
        path: String,
        /// Which hash differed.
        detail: String,
    },
    /// SSH failed after the pod was found running (host key, login, session).
    #[error("SSH to pod {pod}: {cause}")]
    Ssh {
        /// The pod.
        pod: String,
        /// What failed.
        cause: JoinError,
    },
    /// The SFTP session failed.
    #[error("SFTP on pod {pod}: {detail}")]
    Sftp {
        /// The pod.
        pod: String,
        /// What failed.
        detail: String,
    },
    /// The provider failed otherwise (rate limit, outage).
    #[error("RunPod API: {0}")]
    Provider(ProviderError),
    /// The operation is switched off in the configuration.
    #[error("{0}")]
    Disabled(String),
}

impl AccessError {
    /// A stable machine-readable name: `bad_api_key`, `unknown_pod`, `pod_offline`,
    /// `disk_full`, `path`, `integrity`, `ssh`, `sftp`, `provider`, `disabled`.
    pub fn kind(&self) -> &'static str {
        match self {
            AccessError::BadApiKey => "bad_api_key",
            AccessError::UnknownPod { .. } => "unknown_pod",
            AccessError::PodOffline { .. } => "pod_offline",
            AccessError::DiskFull { .. } => "disk_full",
            AccessError::Path { .. } => "path",
            AccessError::Integrity { .. } => "integrity",
            AccessError::Ssh { .. } => "ssh",
            AccessError::Sftp { .. } => "sftp",
            AccessError::Provider(_) => "provider",
            AccessError::Disabled(_) => "disabled",
        }
    }

    /// True when trying again later may succeed (connection drops, provider hiccups).
    pub fn is_retryable(&self) -> bool {
        match self {
            AccessError::Ssh { cause, .. } => cause.is_retryable(),
            AccessError::Sftp { .. } | AccessError::PodOffline { .. } => true,
            AccessError::Provider(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// A provider failure: a rejected key is [`AccessError::BadApiKey`].
    pub fn from_provider(e: ProviderError) -> AccessError {
        match e {
            ProviderError::Auth { .. } => AccessError::BadApiKey,
            other => AccessError::Provider(other),
        }
    }

    /// An SSH failure on `pod`: one that never reached a login means the pod is offline.
    fn ssh(pod: &str, e: JoinError) -> AccessError {
        if e.is_retryable() {
            AccessError::PodOffline {
                pod: pod.to_owned(),
                why: e.to_string(),
            }
        } else {
            AccessError::Ssh {
                pod: pod.to_owned(),
                cause: e,
            }
        }
    }
}

/// Where a pod's sshd is, when it has one and is RUNNING.
pub fn ssh_target(pod: &Pod) -> Result<SshTarget, AccessError> {
    match &pod.ssh {
        Some(ep) if pod.is_ready() => Ok(SshTarget {
            host: ep.host.clone(),
            port: ep.port,
            user: ep.username.clone(),
        }),
        _ => Err(AccessError::PodOffline {
            pod: pod.id.to_string(),
            why: if pod.ssh.is_none() && pod.state == crate::model::PodState::Running {
                "RUNNING without an SSH port yet".into()
            } else {
                pod.state.as_str().to_owned()
            },
        }),
    }
}

/// Pods by id through the provider, commands and files over pooled SSH.
#[derive(Clone)]
pub struct PodAccess {
    provider: Arc<dyn CloudProvider>,
    pool: SshPool,
    timeout: Duration,
}

impl PodAccess {
    /// Access through `provider` and `pool`; every command is bounded by `timeout`.
    pub fn new(provider: Arc<dyn CloudProvider>, pool: SshPool, timeout: Duration) -> PodAccess {
        PodAccess {
            provider,
            pool,
            timeout,
        }
    }

    /// The SSH pool.
    pub fn pool(&self) -> &SshPool {
        &self.pool
    }

    /// The provider.
    pub fn provider(&self) -> &Arc<dyn CloudProvider> {
        &self.provider
    }

    /// Our pods (owner marker), in any state.
    pub async fn pods(&self) -> Result<Vec<Pod>, AccessError> {
        self.provider
            .list()
            .await
            .map_err(AccessError::from_provider)
    }

    /// The pod `id` and where to SSH to it.
    pub async fn resolve(&self, id: &str) -> Result<(Pod, SshTarget), AccessError> {
        let pod = self
            .provider
            .get(&PodId(id.to_owned()))
            .await
            .map_err(AccessError::from_provider)?
            .filter(|p| p.state != crate::model::PodState::Terminated)
            .ok_or_else(|| AccessError::UnknownPod { pod: id.to_owned() })?;
        let target = ssh_target(&pod)?;
        Ok((pod, target))
    }

    /// Runs `command` on pod `id`, streaming its output to `sink`; returns the exit status.
    pub async fn exec_streaming(
        &self,
        id: &str,
        command: &str,
        sink: impl FnMut(Output<'_>) + Send,
    ) -> Result<Option<u32>, AccessError> {
        let (_, target) = self.resolve(id).await?;
        self.exec_on(id, &target, command, sink).await
    }

    /// Runs `command` on pod `id` and collects its output.
    pub async fn exec(&self, id: &str, command: &str) -> Result<ExecOutput, AccessError> {
        let (_, target) = self.resolve(id).await?;
        self.pool
            .run(id, &target, command, self.timeout)
            .await
            .map_err(|e| AccessError::ssh(id, e))
    }

    /// Runs `command` at a known endpoint (no provider lookup).
    pub async fn exec_on(
        &self,
        id: &str,
        target: &SshTarget,
        command: &str,
        sink: impl FnMut(Output<'_>) + Send,
    ) -> Result<Option<u32>, AccessError> {
        self.pool
            .exec_streaming(id, target, command, self.timeout, sink)
            .await
            .map_err(|e| AccessError::ssh(id, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PodState, Usd};
    use crate::provider::SshEndpoint;

    fn pod(state: PodState, ssh: bool) -> Pod {
        Pod {
            id: PodId("p1".into()),
            name: "rpa-x".into(),
            state,
            gpu_type: None,
            gpu_count: 1,
            usd_per_hour: Usd(0.5),
            created_at: None,
            ssh: ssh.then(|| SshEndpoint {
                host: "127.0.0.1".into(),
                port: 2222,
                username: "root".into(),
            }),
            env: Default::default(),
        }
    }

    #[test]
    fn only_running_pods_with_a_port_are_reachable() {
        assert_eq!(
            ssh_target(&pod(PodState::Running, true)).unwrap().port,
            2222
        );
        let e = ssh_target(&pod(PodState::Exited, true)).unwrap_err();
        assert_eq!(e.kind(), "pod_offline");
        assert!(e.to_string().contains("EXITED"), "{e}");
        let e = ssh_target(&pod(PodState::Running, false)).unwrap_err();
        assert!(e.to_string().contains("without an SSH port"), "{e}");
    }

    #[test]
    fn errors_name_their_kind_and_say_what_to_do() {
        assert_eq!(
            AccessError::from_provider(ProviderError::Auth { status: 401 }),
            AccessError::BadApiKey
        );
        let full = AccessError::DiskFull {
            side: "pod p1".into(),
            path: "/data".into(),
            needed: 10,
            available: 3,
        };
        assert_eq!(full.kind(), "disk_full");
        assert!(full.to_string().contains("10 bytes needed, 3 bytes free"));
        let offline = AccessError::ssh(
            "p1",
            JoinError::Connect {
                addr: "h:1".into(),
                detail: "refused".into(),
            },
        );
        assert_eq!(offline.kind(), "pod_offline");
        let rejected = AccessError::ssh(
            "p1",
            JoinError::AuthRejected {
                user: "root".into(),
            },
        );
        assert_eq!(rejected.kind(), "ssh");
        assert!(!rejected.is_retryable());
    }
}
