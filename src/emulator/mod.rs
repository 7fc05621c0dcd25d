//! A RunPod API emulator for tests and local demos: REST v2 pods, actions, GPU catalog, billing
//! and SSH keys, plus the GraphQL that RunPod's public clients use (parsed and answered field
//! by field, see `graphql`), with the spec's shapes, status codes and RFC 9457 problem+json errors,
//! Bearer auth, a clock the caller injects, per-type stock, per-second cost accrual, seeded
//! fault injection, and admin endpoints for tests (`/admin/...`, unauthenticated, loopback).
//!
//! Pods go PROVISIONING → STARTING (half the boot delay) → RUNNING (the boot delay); a RUNNING
//! pod is a real `sshd` on its own 127.0.0.1 port (see [`sshd`]) unless `sshd = false`, with
//! its own home directory holding an `nvidia-smi` for its GPUs (see `home`).
//! Never used by production code paths; compiled only with the `emulator` cargo feature (on by
//! default, off in the image).
#![cfg(feature = "emulator")]

mod graphql;
mod home;
mod http;
/// Real sshd processes for RUNNING pods (also key generation for tests).
pub mod sshd;
mod world;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::model::Secret;

pub use world::AdminPod;

/// A problem starting the emulator.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The configuration file is unreadable or invalid.
    #[error("emulator config: {0}")]
    Config(String),
    /// Binding the listener or preparing the work directory failed.
    #[error("emulator I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl EmulatorError {
    /// Never: a broken setup stays broken.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// The emulator's configuration (TOML; every key optional).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmulatorConfig {
    /// Accepted API keys (`Authorization: Bearer KEY`); anything else is 401.
    pub api_keys: Vec<Secret>,
    /// PROVISIONING → RUNNING takes this long (STARTING from the half).
    #[serde(with = "humantime_serde")]
    pub boot_delay: Duration,
    /// Seed of the RNG behind fault rates and pod ids: same seed, same faults.
    pub seed: u64,
    /// Start a real sshd per RUNNING pod (off for load benchmarks).
    pub sshd: bool,
    /// The sshd binary (absolute path).
    pub sshd_binary: PathBuf,
    /// GPU types offered.
    pub gpus: Vec<GpuSpec>,
    /// Injected faults.
    pub faults: Faults,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            api_keys: Vec::new(),
            // A few seconds: long enough to see PROVISIONING and STARTING, short for demos.
            boot_delay: Duration::from_secs(3),
            seed: 1,
            sshd: true,
            sshd_binary: PathBuf::from(sshd::DEFAULT_SSHD),
            gpus: default_catalog(),
            faults: Faults::default(),
        }
    }
}

impl EmulatorConfig {
    /// Reads a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Self, EmulatorError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EmulatorError::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, EmulatorError> {
        crate::config::parse_toml(text).map_err(|e| EmulatorError::Config(e.to_string()))
    }
}

/// One GPU type in the catalog. Prices are per GPU-hour.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// RunPod's id, e.g. `NVIDIA RTX A5000`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Memory in GB.
    pub memory_gb: u32,
    /// On-demand price, secure cloud.
    pub secure_price: f64,
    /// On-demand price, community cloud.
    pub community_price: f64,
    /// Spot price, secure cloud (`None`: no spot).
    #[serde(default)]
    pub secure_spot_price: Option<f64>,
    /// Spot price, community cloud.
    #[serde(default)]
    pub community_spot_price: Option<f64>,
    /// Free GPUs of this type now.
    pub stock: u32,
}

/// The faults to inject. All off by default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Fraction of API requests answered 429.
    pub rate_limit_rate: f64,
    /// `Retry-After` seconds on those 429s.
    pub retry_after_secs: u64,
    /// The next N API requests are answered 429 (deterministic, for tests).
    pub rate_limit_next: u32,
    /// The next N API requests are answered 500 before doing anything (deterministic).
    pub server_error_next: u32,
    /// Fraction of API requests answered 500 (before doing anything).
    pub server_error_rate: f64,
    /// The next N successful creates (REST or spot) answer 500 although the pod was created.
    pub error_after_create: u32,
    /// GPU type ids with no capacity (create → 400 / GraphQL error).
    pub capacity_exhausted: Vec<String>,
    /// Every API answer is delayed this long.
    #[serde(with = "humantime_serde")]
    pub slow_response: Duration,
    /// New pods reach RUNNING but never get an SSH mapping (no sshd, `ssh.direct` null).
    pub never_ready: bool,
    /// New pods reach RUNNING with an SSH mapping (`ssh.direct`, `runtime.ports`) on which
    /// nothing accepts: connections are refused (until `POST /admin/pods/{id}/ssh` brings
    /// their sshd up).
    pub ssh_unreachable: bool,
    /// `start` of a stopped pod fails: not enough free GPUs on its host.
    pub resume_refused: bool,
    /// Spot pods are preempted (RUNNING → EXITED, sshd killed) after running this long.
    #[serde(with = "humantime_serde")]
    pub preempt_spot_after: Option<Duration>,
    /// RunPod's listing lag: a new pod is missing from `GET /v2/pods/{id}` (404), `GET
    /// /v2/pods` and GraphQL pod queries for this long after creation (emulator clock).
    #[serde(with = "humantime_serde")]
    pub hide_new_pods_for: Duration,
}

/// The catalog of `shared/reference/runpod.md` with 20 free GPUs of each type.
pub fn default_catalog() -> Vec<GpuSpec> {
    // (id, name, GB, secure, community, secure spot, community spot)
    type Row = (
        &'static str,
        &'static str,
        u32,
        f64,
        f64,
        Option<f64>,
        Option<f64>,
    );
    let rows: [Row; 9] = [
        (
            "NVIDIA GeForce RTX 4090",
            "RTX 4090",
            24,
            0.69,
            0.34,
            Some(0.35),
            Some(0.20),
        ),
        (
            "NVIDIA RTX A5000",
            "RTX A5000",
            24,
            0.26,
            0.16,
            Some(0.14),
            Some(0.11),
        ),
        (
            "NVIDIA RTX A6000",
            "RTX A6000",
            48,
            0.49,
            0.33,
            Some(0.33),
            Some(0.25),
        ),
        (
            "NVIDIA RTX 6000 Ada Generation",
            "RTX 6000 Ada",
            48,
            0.77,
            0.74,
            Some(0.39),
            Some(0.40),
        ),
        (
            "NVIDIA L40S",
            "L40S",
            48,
            0.86,
            0.79,
            Some(0.43),
            Some(0.40),
        ),
        (
            "NVIDIA A100 80GB PCIe",
            "A100 PCIe",
            80,
            1.64,
            1.19,
            Some(0.82),
            Some(0.60),
        ),
        (
            "NVIDIA A100-SXM4-80GB",
            "A100 SXM",
            80,
            1.74,
            1.39,
            Some(0.95),
            Some(0.79),
        ),
        (
            "NVIDIA H100 80GB HBM3",
            "H100 SXM",
            80,
            2.99,
            2.69,
            Some(1.75),
            Some(1.50),
        ),
        ("NVIDIA H200", "H200 SXM", 141, 3.99, 3.59, None, None),
    ];
    rows.iter()
        .map(|&(id, name, mem, s, c, ss, cs)| GpuSpec {
            id: id.into(),
            name: name.into(),
            memory_gb: mem,
            secure_price: s,
            community_price: c,
            secure_spot_price: ss,
            community_spot_price: cs,
            // Enough for a handful of tests side by side; the bench configures more.
            stock: 20,
        })
        .collect()
}

/// A running emulator. Dropping it (or [`RunningEmulator::shutdown`]) stops the server and
/// kills every sshd it started.
pub struct RunningEmulator {
    addr: SocketAddr,
    world: Arc<Mutex<world::World>>,
    token: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl RunningEmulator {
    /// Starts the emulator on `listener` with `config`, reading time from `clock`.
    pub async fn start(
        listener: tokio::net::TcpListener,
        config: EmulatorConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<RunningEmulator, EmulatorError> {
        let addr = listener.local_addr()?;
        let world = Arc::new(Mutex::new(world::World::new(config, clock)?));
        let token = CancellationToken::new();
        let router = http::router(world.clone());
        let stop = token.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(RunningEmulator {
            addr,
            world,
            token,
            task: Some(task),
        })
    }

    /// Binds `127.0.0.1:0` and starts.
    pub async fn start_local(
        config: EmulatorConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<RunningEmulator, EmulatorError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::start(listener, config, clock).await
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// REST base URL (`http://ADDR`).
    pub fn api_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// GraphQL URL (`http://ADDR/graphql`).
    pub fn graphql_url(&self) -> String {
        format!("http://{}/graphql", self.addr)
    }

    /// Replaces the faults (as `PUT /admin/faults` does).
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Every pod ever created, terminated ones included, with cost accrued.
    pub fn admin_pods(&self) -> Vec<AdminPod> {
        self.lock().admin_pods()
    }

    /// Preempts a spot (or any RUNNING) pod now: RUNNING → EXITED, sshd killed.
    pub fn preempt(&self, id: &str) -> bool {
        self.lock().preempt(id)
    }

    /// The public host key every emulated sshd presents (OpenSSH format).
    pub fn host_public_key(&self) -> Option<String> {
        self.lock().host_public_key()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, world::World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops serving and kills every sshd; waits for the server task.
    pub async fn shutdown(mut self) {
        self.token.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.lock().kill_all();
    }

    /// Waits until the server stops (after cancellation by `token`).
    pub async fn serve_until(mut self, token: CancellationToken) {
        token.cancelled().await;
        self.token.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.lock().kill_all();
    }
}

impl Drop for RunningEmulator {
    fn drop(&mut self) {
        self.token.cancel();
        self.lock().kill_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_faults_and_rejects_unknown_keys() {
        let c = EmulatorConfig::from_toml(
            r#"
            api_keys = ["k"]
            boot_delay = "500ms"
            sshd = false
            [faults]
            rate_limit_rate = 0.25
            retry_after_secs = 2
            capacity_exhausted = ["NVIDIA H200"]
            preempt_spot_after = "10m"
            ssh_unreachable = true
            "#,
        )
        .unwrap();
        assert_eq!(c.boot_delay, Duration::from_millis(500));
        assert_eq!(c.faults.rate_limit_rate, 0.25);
        assert_eq!(c.faults.preempt_spot_after, Some(Duration::from_secs(600)));
        assert!(c.faults.ssh_unreachable && !c.faults.never_ready);
        assert_eq!(c.gpus.len(), 9, "default catalog");
        assert_eq!(format!("{:?}", c.api_keys), "[[redacted]]");
        let err = EmulatorConfig::from_toml("[faults]\nrate_limit = 1.0").unwrap_err();
        assert!(err.to_string().contains("rate_limit"), "{err}");
    }
}
