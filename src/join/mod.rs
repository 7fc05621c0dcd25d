//! SSH to pods (russh; the only module that uses it): connect with a timeout, verify the host
//! key by a [`HostKeyPolicy`], authenticate with a private key, run one command and return its
//! exit status and output. Knows nothing about RunPod: callers pass the endpoint the provider
//! reported. The reconciler's bootstrap/join/health steps build on [`exec`].
//!
//! Host key policy: RunPod does not publish pod host keys, so production uses
//! **trust on first use** per pod ([`HostKeyPolicy::TrustOnFirstUse`]; a later change is
//! refused as a possible man in the middle), in memory or persisted to a known-hosts file
//! ([`KnownHosts::persistent`]). When the key is known ahead (the emulator reports
//! its host key at `/admin/host-key`), [`HostKeyPolicy::Pinned`] accepts only that key.
//! Private keys are held in [`SshKey`], whose Debug output is redacted.

mod known_hosts;
pub mod pod;
pub mod pool;

pub use known_hosts::KnownHosts;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::ChannelMsg;
use tokio::time::Instant;

use crate::model::Secret;

/// An SSH failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JoinError {
    /// TCP connect or the SSH handshake failed (sshd not up yet, refused, reset).
    #[error("cannot connect to {addr}: {detail}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// What failed.
        detail: String,
    },
    /// The whole operation took longer than its timeout.
    #[error("SSH to {addr} timed out after {after:?}")]
    Timeout {
        /// `host:port`.
        addr: String,
        /// The timeout.
        after: Duration,
    },
    /// The server presented a host key the policy refuses.
    #[error("host key of {addr} is not the expected one (possible man in the middle){hint}")]
    HostKeyMismatch {
        /// `host:port`.
        addr: String,
        /// Where the expected key is recorded and how to clear it (empty when not in a file).
        hint: String,
    },
    /// The known-hosts file could not be read, parsed or written.
    #[error("known hosts file {0}")]
    KnownHosts(String),
    /// The server refused our key.
    #[error("public key authentication as {user} was rejected")]
    AuthRejected {
        /// Login user.
        user: String,
    },
    /// The private key could not be parsed.
    #[error("invalid SSH private key: {0}")]
    Key(String),
    /// A protocol error after login.
    #[error("SSH session error: {0}")]
    Session(String),
}

impl JoinError {
    /// Connect failures and timeouts may pass (sshd still starting); the rest will not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, JoinError::Connect { .. } | JoinError::Timeout { .. })
    }
}

/// A private key for public-key authentication. Never printed.
#[derive(Clone)]
pub struct SshKey(Arc<PrivateKey>);

impl SshKey {
    /// Parses an OpenSSH private key (unencrypted).
    pub fn from_openssh(pem: &Secret) -> Result<SshKey, JoinError> {
        russh::keys::decode_secret_key(pem.expose(), None)
            .map(|k| SshKey(Arc::new(k)))
            // The parser's message never contains key material.
            .map_err(|e| JoinError::Key(e.to_string()))
    }

    /// Reads an OpenSSH private key file.
    pub fn load(path: &std::path::Path) -> Result<SshKey, JoinError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| JoinError::Key(format!("reading {}: {e}", path.display())))?;
        Self::from_openssh(&Secret::new(text))
    }
}

impl fmt::Debug for SshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SshKey([redacted])")
    }
}

/// How a server's host key is checked.
#[derive(Debug, Clone)]
pub enum HostKeyPolicy {
    /// Accept only these keys (OpenSSH public key lines; the comment is ignored).
    Pinned(Vec<String>),
    /// Accept and remember the first key seen per `host:port`; refuse a different one later.
    TrustOnFirstUse(KnownHosts),
}

/// Where to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// Host or IP.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User.
    pub user: String,
}

impl SshTarget {
    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status (`None` when the server sent none, e.g. killed by a signal).
    pub exit_status: Option<u32>,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
}

/// A piece of a running command's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output<'a> {
    /// Bytes on standard output.
    Stdout(&'a [u8]),
    /// Bytes on standard error.
    Stderr(&'a [u8]),
}

/// Runs `command` on an open session channel, handing output to `sink` as it arrives; returns
/// the exit status (`None` when the server sent none).
async fn run_channel(
    mut channel: russh::Channel<russh::client::Msg>,
    command: &str,
    mut sink: impl FnMut(Output<'_>),
) -> Result<Option<u32>, JoinError> {
    channel
        .exec(true, command)
        .await
        .map_err(|e| JoinError::Session(e.to_string()))?;
    let mut status = None;
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Data { data } => sink(Output::Stdout(&data)),
            ChannelMsg::ExtendedData { data, .. } => sink(Output::Stderr(&data)),
            ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            _ => {}
        }
    }
    Ok(status)
}

/// The key type and base64 data of an OpenSSH public key line.
fn key_id(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks server host keys against a [`HostKeyPolicy`].
pub(crate) struct Verifier {
    policy: HostKeyPolicy,
    /// Whose key this is for trust on first use (`host:port`, or a pod id).
    host_id: String,
    /// `host:port`.
    addr: String,
    /// Why the key was refused, for the caller (russh only reports a generic failure).
    refused: Arc<Mutex<Option<JoinError>>>,
}

impl Verifier {
    fn refuse(&self, why: JoinError) -> bool {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        false
    }
}

impl russh::client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let mismatch = || JoinError::HostKeyMismatch {
            addr: self.addr.clone(),
            hint: String::new(),
        };
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_public_key else {
            return Ok(self.refuse(mismatch()));
        };
        let seen = key.to_openssh().map(|s| key_id(&s)).unwrap_or_default();
        Ok(match &self.policy {
            HostKeyPolicy::Pinned(keys) if keys.iter().any(|k| key_id(k) == seen) => true,
            HostKeyPolicy::Pinned(_) => self.refuse(mismatch()),
            HostKeyPolicy::TrustOnFirstUse(known) => {
                match known.check(&self.host_id, &self.addr, &seen) {
                    Ok(()) => true,
                    Err(why) => self.refuse(why),
                }
            }
        })
    }
}

/// Logs in to `target` with `key`, runs `command`, and returns its status and output, all
/// within `timeout`. Trust on first use remembers the host key per `host:port`.
pub async fn exec(
    target: &SshTarget,
    key: &SshKey,
    policy: &HostKeyPolicy,
    command: &str,
    timeout: Duration,
) -> Result<ExecOutput, JoinError> {
    exec_as(target, &target.addr(), key, policy, command, timeout).await
}

/// Like [`exec`], with trust on first use keyed by `host_id` (e.g. a pod id: addresses are
/// reused by other pods, a pod's key must not be).
pub async fn exec_as(
    target: &SshTarget,
    host_id: &str,
    key: &SshKey,
    policy: &HostKeyPolicy,
    command: &str,
    timeout: Duration,
) -> Result<ExecOutput, JoinError> {
    let addr = target.addr();
    let span = tracing::info_span!("ssh.exec", addr = %addr, user = %target.user);
    let fut = tokio::time::timeout(timeout, exec_inner(target, host_id, key, policy, command));
    match tracing::Instrument::instrument(fut, span).await {
        Ok(r) => r,
        Err(_) => Err(JoinError::Timeout {
            addr,
            after: timeout,
        }),
    }
}

/// TCP connect, host key check by `policy` (trust on first use keyed by `host_id`) and
/// public-key login: an authenticated session ready for channels.
pub(crate) async fn connect(
    target: &SshTarget,
    host_id: &str,
    key: &SshKey,
    policy: &HostKeyPolicy,
    config: russh::client::Config,
) -> Result<russh::client::Handle<Verifier>, JoinError> {
    let addr = target.addr();
    let refused = Arc::new(Mutex::new(None));
    let handler = Verifier {
        policy: policy.clone(),
        host_id: host_id.to_owned(),
        addr: addr.clone(),
        refused: refused.clone(),
    };
    let mut session = match russh::client::connect(
        Arc::new(config),
        (target.host.as_str(), target.port),
        handler,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let why = refused.lock().unwrap_or_else(|p| p.into_inner()).take();
            return Err(why.unwrap_or(JoinError::Connect {
                addr,
                detail: e.to_string(),
            }));
        }
    };
    let auth = session
        .authenticate_publickey(
            target.user.clone(),
            PrivateKeyWithHashAlg::new(key.0.clone(), None),
        )
        .await
        .map_err(|e| JoinError::Session(e.to_string()))?;
    if !auth.success() {
        return Err(JoinError::AuthRejected {
            user: target.user.clone(),
        });
    }
    Ok(session)
}

async fn exec_inner(
    target: &SshTarget,
    host_id: &str,
    key: &SshKey,
    policy: &HostKeyPolicy,
    command: &str,
) -> Result<ExecOutput, JoinError> {
    let addr = target.addr();
    let config = russh::client::Config {
        // A join command is short; an idle session this long is a hung server.
        inactivity_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let session = connect(target, host_id, key, policy, config).await?;
    let channel = session
        .channel_open_session()
        .await
        .map_err(|e| JoinError::Session(e.to_string()))?;
    let mut out = ExecOutput {
        exit_status: None,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    out.exit_status = run_channel(channel, command, |o| match o {
        Output::Stdout(d) => out.stdout.extend_from_slice(d),
        Output::Stderr(d) => out.stderr.extend_from_slice(d),
    })
    .await?;
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    tracing::debug!(addr = %addr, status = ?out.exit_status, "ssh exec done");
    Ok(out)
}

/// Like [`exec`], but retries connect failures (sshd still starting) until `deadline`,
/// polling every `poll`.
pub async fn exec_when_up(
    target: &SshTarget,
    key: &SshKey,
    policy: &HostKeyPolicy,
    command: &str,
    per_try: Duration,
    poll: Duration,
    deadline: Instant,
) -> Result<ExecOutput, JoinError> {
    loop {
        match exec(target, key, policy, command, per_try).await {
            Err(e) if e.is_retryable() && Instant::now() + poll < deadline => {
                tokio::time::sleep(poll).await;
            }
            other => return other,
        }
    }
}
