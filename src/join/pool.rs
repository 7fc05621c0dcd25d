//! Pooled SSH: one authenticated connection per pod, reused by every command (one channel each,
//! multiplexed) and SFTP session; at most [`PoolSettings::per_pod`] channels at a time per pod
//! (OpenSSH's `MaxSessions` is 10); a dropped connection is replaced on next use; connections
//! idle longer than [`PoolSettings::idle_timeout`] are closed by a background task. Host keys
//! are checked by the pool's [`HostKeyPolicy`], keyed by pod id for trust on first use.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

use super::pod::PodShell;
use super::{
    connect, run_channel, ExecOutput, HostKeyPolicy, JoinError, Output, SshKey, SshTarget, Verifier,
};

type Handle = russh::client::Handle<Verifier>;

/// Pool limits and timers.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Bound on TCP connect, handshake and login.
    pub connect_timeout: Duration,
    /// A connection unused this long is closed.
    pub idle_timeout: Duration,
    /// Channels (commands, SFTP sessions) open at once per pod; more wait their turn.
    pub per_pod: usize,
    /// SSH keepalive period: a silent peer is dropped after three missed answers.
    pub keepalive: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            // Below OpenSSH's default MaxSessions (10), leaving room for an interactive login.
            per_pod: 8,
            keepalive: Duration::from_secs(15),
        }
    }
}

/// One pod's connection and its channel budget.
struct Slot {
    target: SshTarget,
    conn: tokio::sync::Mutex<Option<Arc<Handle>>>,
    permits: Arc<Semaphore>,
    last_used: Mutex<Instant>,
}

impl Slot {
    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle_since(&self) -> Instant {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A channel slot in use; releasing it marks the connection used now.
struct Lease {
    slot: Arc<Slot>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slot.touch();
    }
}

struct Inner {
    key: SshKey,
    policy: HostKeyPolicy,
    settings: PoolSettings,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    handshakes: AtomicU64,
}

/// SSH connections to pods, shared. Clones share the pool.
#[derive(Clone)]
pub struct SshPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SshPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshPool")
            .field("connections", &self.connections())
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl SshPool {
    /// A pool logging in with `key`. Inside a tokio runtime, a task closes idle connections
    /// (it ends when the last clone of the pool is dropped).
    pub fn new(key: SshKey, policy: HostKeyPolicy, settings: PoolSettings) -> SshPool {
        let inner = Arc::new(Inner {
            key,
            policy,
            settings,
            slots: Mutex::new(HashMap::new()),
            handshakes: AtomicU64::new(0),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            let every = (inner.settings.idle_timeout / 2)
                .clamp(Duration::from_millis(50), Duration::from_secs(30));
            tokio::spawn(reap(Arc::downgrade(&inner), every));
        }
        SshPool { inner }
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.slots()
            .values()
            .filter(|s| {
                s.conn
                    .try_lock()
                    .map(|c| c.as_ref().is_some_and(|h| !h.is_closed()))
                    .unwrap_or(true)
            })
            .count()
    }

    /// SSH handshakes done since the pool was made (one per connection, reconnects included).
    pub fn handshakes(&self) -> u64 {
        self.inner.handshakes.load(Ordering::SeqCst)
    }

    /// Runs `command` on pod `pod_id` at `target`, handing output to `sink` as it arrives;
    /// returns the exit status. `timeout` bounds waiting for a channel and the command.
    pub async fn exec_streaming(
        &self,
        pod_id: &str,
        target: &SshTarget,
        command: &str,
        timeout: Duration,
        sink: impl FnMut(Output<'_>) + Send,
    ) -> Result<Option<u32>, JoinError> {
        let span = tracing::info_span!("ssh.pool.exec", pod = %pod_id, addr = %target.addr());
        let work = async {
            let (channel, _lease) = self.channel(pod_id, target).await?;
            run_channel(channel, command, sink).await
        };
        match tokio::time::timeout(timeout, work).instrument(span).await {
            Ok(r) => r,
            Err(_) => Err(JoinError::Timeout {
                addr: target.addr(),
                after: timeout,
            }),
        }
    }

    /// Opens the `subsystem` (e.g. `sftp`) on a pooled channel; the stream holds one of the
    /// pod's channel slots until dropped.
    pub async fn subsystem(
        &self,
        pod_id: &str,
        target: &SshTarget,
        subsystem: &str,
    ) -> Result<SubsystemStream, JoinError> {
        let span = tracing::info_span!("ssh.pool.subsystem", pod = %pod_id, addr = %target.addr(), subsystem);
        let work = async {
            let (channel, lease) = self.channel(pod_id, target).await?;
            channel
                .request_subsystem(true, subsystem)
                .await
                .map_err(|e| JoinError::Session(e.to_string()))?;
            Ok(SubsystemStream {
                stream: channel.into_stream(),
                _lease: lease,
            })
        };
        let timeout = self.inner.settings.connect_timeout;
        match tokio::time::timeout(timeout, work).instrument(span).await {
            Ok(r) => r,
            Err(_) => Err(JoinError::Timeout {
                addr: target.addr(),
                after: timeout,
            }),
        }
    }

    /// Closes the connection to `pod_id`, if any (e.g. the pod stopped).
    pub async fn close(&self, pod_id: &str) {
        let slot = self
            .inner
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(pod_id);
        if let Some(slot) = slot {
            disconnect(&slot).await;
        }
    }

    /// Closes every connection unused for the idle timeout and not in use; returns how many.
    pub async fn close_idle(&self) -> usize {
        close_idle(&self.inner).await
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.inner.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pod's slot; a pod that moved to another endpoint gets a fresh one.
    fn slot(&self, pod_id: &str, target: &SshTarget) -> Arc<Slot> {
        let mut slots = self.slots();
        if let Some(s) = slots.get(pod_id).filter(|s| s.target == *target) {
            return s.clone();
        }
        let slot = Arc::new(Slot {
            target: target.clone(),
            conn: tokio::sync::Mutex::new(None),
            permits: Arc::new(Semaphore::new(self.inner.settings.per_pod.max(1))),
            last_used: Mutex::new(Instant::now()),
        });
        slots.insert(pod_id.to_owned(), slot.clone());
        slot
    }

    /// A new channel on the pod's connection (connecting first when there is none or it
    /// dropped), with the slot it holds.
    async fn channel(
        &self,
        pod_id: &str,
        target: &SshTarget,
    ) -> Result<(russh::Channel<russh::client::Msg>, Lease), JoinError> {
        let slot = self.slot(pod_id, target);
        let permit = slot
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| JoinError::Session("connection pool closed".into()))?;
        let lease = Lease {
            slot: slot.clone(),
            _permit: permit,
        };
        // A connection that died since its last use fails to open a channel: replace it once.
        let handle = self.handle(&slot, pod_id).await?;
        let channel = match handle.channel_open_session().await {
            Ok(ch) => ch,
            Err(e) => {
                tracing::debug!(pod = %pod_id, error = %e, "pooled SSH connection dropped; reconnecting");
                {
                    let mut conn = slot.conn.lock().await;
                    if conn.as_ref().is_some_and(|h| Arc::ptr_eq(h, &handle)) {
                        *conn = None;
                    }
                }
                self.handle(&slot, pod_id)
                    .await?
                    .channel_open_session()
                    .await
                    .map_err(|e| JoinError::Session(e.to_string()))?
            }
        };
        slot.touch();
        Ok((channel, lease))
    }

    /// The slot's live connection, connecting when there is none.
    async fn handle(&self, slot: &Slot, pod_id: &str) -> Result<Arc<Handle>, JoinError> {
        let mut conn = slot.conn.lock().await;
        if let Some(h) = conn.as_ref().filter(|h| !h.is_closed()) {
            return Ok(h.clone());
        }
        let s = &self.inner.settings;
        let config = russh::client::Config {
            keepalive_interval: Some(s.keepalive),
            keepalive_max: 3,
            // Bulk transfers: a larger window keeps the pipe full on a long round trip.
            window_size: 16 * 1024 * 1024,
            nodelay: true,
            // AES-GCM first: with AES-NI (every x86 RunPod host) it costs a fraction of
            // ChaCha20-Poly1305 per byte, on both ends; the rest of the default order follows.
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Borrowed(&[
                    russh::cipher::AES_256_GCM,
                    russh::cipher::CHACHA20_POLY1305,
                    russh::cipher::AES_256_CTR,
                ]),
                ..russh::Preferred::DEFAULT
            },
            ..Default::default()
        };
        let addr = slot.target.addr();
        let span = tracing::info_span!("ssh.connect", pod = %pod_id, addr = %addr);
        let fut = connect(
            &slot.target,
            pod_id,
            &self.inner.key,
            &self.inner.policy,
            config,
        );
        let handle = match tokio::time::timeout(s.connect_timeout, fut)
            .instrument(span)
            .await
        {
            Ok(r) => Arc::new(r?),
            Err(_) => {
                return Err(JoinError::Timeout {
                    addr,
                    after: s.connect_timeout,
                })
            }
        };
        self.inner.handshakes.fetch_add(1, Ordering::SeqCst);
        *conn = Some(handle.clone());
        Ok(handle)
    }
}

/// Commands over the pool: each pod's one connection, reused.
#[async_trait::async_trait]
impl PodShell for SshPool {
    /// Runs `command` and collects its output.
    async fn run(
        &self,
        pod_id: &str,
        target: &SshTarget,
        command: &str,
        timeout: Duration,
    ) -> Result<ExecOutput, JoinError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let exit_status = self
            .exec_streaming(pod_id, target, command, timeout, |o| match o {
                Output::Stdout(d) => stdout.extend_from_slice(d),
                Output::Stderr(d) => stderr.extend_from_slice(d),
            })
            .await?;
        Ok(ExecOutput {
            exit_status,
            stdout,
            stderr,
        })
    }

    /// Drops the pod's connection and, under trust on first use, its remembered host key.
    fn forget(&self, pod_id: &str) {
        self.slots().remove(pod_id);
        if let HostKeyPolicy::TrustOnFirstUse(known) = &self.inner.policy {
            known.forget(pod_id);
        }
    }
}

async fn disconnect(slot: &Slot) {
    let handle = slot.conn.lock().await.take();
    if let Some(h) = handle {
        let _ = h
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

async fn close_idle(inner: &Inner) -> usize {
    let idle = inner.settings.idle_timeout;
    let per_pod = inner.settings.per_pod.max(1);
    let closing: Vec<Arc<Slot>> = {
        let mut slots = inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<String> = slots
            .iter()
            .filter(|(_, s)| {
                s.permits.available_permits() == per_pod && s.idle_since().elapsed() >= idle
            })
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter().filter_map(|id| slots.remove(id)).collect()
    };
    for slot in &closing {
        disconnect(slot).await;
    }
    closing.len()
}

async fn reap(inner: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let n = close_idle(&inner).await;
        if n > 0 {
            tracing::debug!(closed = n, "closed idle SSH connections");
        }
    }
}

/// A subsystem's byte stream (SFTP runs over it), holding one of the pod's channel slots.
pub struct SubsystemStream {
    stream: russh::ChannelStream<russh::client::Msg>,
    _lease: Lease,
}

impl AsyncRead for SubsystemStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SubsystemStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
