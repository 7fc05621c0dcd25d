//! The emulator's state: pods, catalog stock, account SSH keys, faults, the seeded RNG, and the
//! rules (lifecycle, billing, capacity). Time moves only through the injected clock; every
//! request first brings the world up to `clock.now()` ([`World::advance`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use super::home::{self, Gpus};
use super::sshd::{self, PortHold, SshdProcess, SshdSpec};
use super::{EmulatorConfig, EmulatorError, Faults, GpuSpec};
use crate::clock::Clock;
use crate::model::{PodState, Timestamp};

/// An error answer: status, title, detail (rendered as problem+json).
#[derive(Debug, Clone)]
pub(super) struct Problem {
    pub(super) status: u16,
    pub(super) title: &'static str,
    pub(super) detail: String,
}

impl Problem {
    pub(super) fn new(status: u16, title: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            title,
            detail: detail.into(),
        }
    }
    fn not_found(id: &str) -> Self {
        Problem::new(404, "Not Found", format!("pod {id} not found"))
    }
}

/// The capacity message RunPod uses.
pub(super) const NO_CAPACITY: &str = "There are no longer any instances available with the requested specifications. Please refresh and try again.";
/// The resume-refused message RunPod uses.
pub(super) const HOST_FULL: &str =
    "There are not enough free GPUs on the host machine to start this pod.";
/// Data centers the emulator knows; an unknown id rejects the whole create.
pub(super) const DATA_CENTERS: [&str; 4] = ["US-KS-2", "US-TX-3", "EU-RO-1", "CA-MTL-1"];
/// vCPUs per GPU: a typical RunPod GPU pod's ratio (GraphQL `vcpuCount`, `RUNPOD_CPU_COUNT`).
const VCPUS_PER_GPU: u32 = 8;

/// The host server name of a pod (GraphQL `machine.podHostId`, `RUNPOD_POD_HOSTNAME`), in
/// RunPod's `<pod id>-<8 hex>` shape.
fn pod_host_id(id: &str) -> String {
    format!("{id}-64410a6e")
}

/// A RUNNING pod's SSH port, as the API reports it.
#[derive(Debug, Default)]
enum Ssh {
    /// No mapping.
    #[default]
    None,
    /// sshd accepts on its port.
    Up(SshdProcess),
    /// The mapping is reported but nothing accepts on it (admin `{"up": false}`,
    /// `faults.ssh_unreachable`): connections are refused.
    Down(PortHold),
}

impl Ssh {
    /// The mapped port, accepting or not.
    fn port(&self) -> Option<u16> {
        match self {
            Ssh::Up(s) => Some(s.port),
            Ssh::Down(h) => Some(h.port),
            Ssh::None => None,
        }
    }
}

/// A pod record.
#[derive(Debug)]
struct PodRecord {
    id: String,
    name: String,
    image: String,
    gpu_type: String,
    gpu_count: u32,
    cloud: String,
    env: BTreeMap<String, String>,
    ports: Vec<String>,
    disk: u32,
    /// Persistent volume in GB (GraphQL `volumeInGb`; 0 = none).
    volume_gb: u32,
    data_center_id: String,
    /// Runs an sshd when RUNNING: an official image starts one whenever `PUBLIC_KEY` is set
    /// and 22/tcp is exposed (whether the key came from the request or from `startSsh`).
    ssh_capable: bool,
    /// Missing from GET and list (RunPod's listing lag) until this time.
    visible_at: Timestamp,
    /// Spot bid per GPU-hour; `None` = on-demand.
    bid: Option<f64>,
    /// Price per GPU-hour while running.
    price: f64,
    status: PodState,
    created_at: Timestamp,
    /// When the current boot began (creation or last start).
    boot_at: Timestamp,
    started_at: Option<Timestamp>,
    terminated_at: Option<Timestamp>,
    accrued: f64,
    last_accrual: Timestamp,
    never_ready: bool,
    /// Created (or started) under `faults.ssh_unreachable`: when RUNNING its SSH mapping is
    /// reported but nothing accepts on it.
    ssh_unreachable: bool,
    keys: Vec<String>,
    ssh: Ssh,
    /// The pod's home (its container disk, see [`home`]); `None` once terminated.
    home: Option<PathBuf>,
    /// The GPUs as the pod's `nvidia-smi` reports them.
    gpus: Gpus,
    /// An sshd ran since the container last stopped: processes of its sessions may be alive.
    sessions_possible: bool,
}

impl PodRecord {
    fn billing(&self) -> bool {
        matches!(
            self.status,
            PodState::Provisioning | PodState::Starting | PodState::Running
        )
    }
    fn rate(&self) -> f64 {
        if self.billing() {
            self.price * f64::from(self.gpu_count)
        } else {
            0.0
        }
    }
    fn holds_gpus(&self) -> bool {
        self.billing()
    }
}

/// A pod as the admin endpoint reports it (terminated ones too).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdminPod {
    /// Pod id.
    pub id: String,
    /// Pod name.
    pub name: String,
    /// Current status.
    pub status: String,
    /// GPU type.
    pub gpu_type: String,
    /// GPUs.
    pub gpu_count: u32,
    /// Spot bid, when a spot pod.
    pub bid_per_gpu: Option<f64>,
    /// USD accrued so far.
    pub cost_accrued: f64,
    /// USD per hour now.
    pub usd_per_hour: f64,
    /// PID of its sshd, when one accepts connections.
    pub sshd_pid: Option<u32>,
    /// The SSH port the API reports (`ssh.direct`), whether or not anything accepts on it.
    pub ssh_port: Option<u16>,
    /// The pod's directory: `HOME` of its SSH sessions, its container disk. `None` once
    /// terminated (the directory is removed).
    pub pod_dir: Option<String>,
    /// GPU utilization (%) as the pod's `nvidia-smi` reports it; `None` without a home or when
    /// `.gpu_utilization` holds no integer from 0 to 100.
    pub gpu_utilization: Option<u8>,
    /// When it was created (emulator clock).
    pub created_at: Timestamp,
    /// When it was terminated, if it was.
    pub terminated_at: Option<Timestamp>,
    /// What it bills per hour while it runs (price × GPUs), whatever its state now.
    pub price_per_hour: f64,
}

/// Everything the emulator knows.
pub(super) struct World {
    pub(super) faults: Faults,
    config: EmulatorConfig,
    clock: Arc<dyn Clock>,
    rng: StdRng,
    pods: BTreeMap<String, PodRecord>,
    /// Pod ids in creation order (listing order).
    order: Vec<String>,
    stock: BTreeMap<String, u32>,
    ssh_keys: Vec<String>,
    work_dir: PathBuf,
    host_key: Option<(PathBuf, String)>,
    started: Timestamp,
}

/// What starting a pod's sshd needs from the world.
struct SshCtx {
    binary: PathBuf,
    host_key: PathBuf,
    run_root: PathBuf,
}

impl World {
    pub(super) fn new(
        config: EmulatorConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<World, EmulatorError> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let work_dir =
            std::env::temp_dir().join(format!("rpa-emulator-{}-{n}", std::process::id()));
        if config.sshd {
            sshd::check_config_path(&work_dir).map_err(|e| EmulatorError::Config(e.to_string()))?;
        }
        std::fs::create_dir_all(&work_dir)?;
        let host_key = if config.sshd {
            let path = work_dir.join("ssh_host_ed25519_key");
            let public = sshd::generate_key(&path, "runpod-emulator-host").map_err(|e| {
                EmulatorError::Config(format!(
                    "generating the pods' sshd host key with ssh-keygen failed ({e}); \
                     install openssh-server (scripts/test.sh does) or set sshd = false"
                ))
            })?;
            Some((path, public))
        } else {
            None
        };
        let stock = config
            .gpus
            .iter()
            .map(|g| (g.id.clone(), g.stock))
            .collect();
        let now = clock.now();
        Ok(World {
            faults: config.faults.clone(),
            rng: StdRng::seed_from_u64(config.seed),
            clock,
            pods: BTreeMap::new(),
            order: Vec::new(),
            stock,
            ssh_keys: Vec::new(),
            work_dir,
            host_key,
            started: now,
            config,
        })
    }

    pub(super) fn host_public_key(&self) -> Option<String> {
        self.host_key.as_ref().map(|(_, k)| k.clone())
    }

    /// True when the key is accepted.
    pub(super) fn authorized(&self, key: &str) -> bool {
        !key.is_empty() && self.config.api_keys.iter().any(|k| k.expose() == key)
    }

    /// Draws the request-level faults: `Some(429 retry-after secs)` or `Some(500)`.
    pub(super) fn draw_fault(&mut self) -> Option<RequestFault> {
        let ra = self.faults.retry_after_secs;
        if self.faults.rate_limit_next > 0 {
            self.faults.rate_limit_next -= 1;
            return Some(RequestFault::RateLimited(ra));
        }
        if self.faults.server_error_next > 0 {
            self.faults.server_error_next -= 1;
            return Some(RequestFault::ServerError);
        }
        let (rl, se) = (self.faults.rate_limit_rate, self.faults.server_error_rate);
        if rl > 0.0 && self.rng.random_range(0.0..1.0) < rl {
            return Some(RequestFault::RateLimited(ra));
        }
        if se > 0.0 && self.rng.random_range(0.0..1.0) < se {
            return Some(RequestFault::ServerError);
        }
        None
    }

    /// Brings every pod up to now: accrues cost, moves boots along, preempts spot pods.
    pub(super) fn advance(&mut self) {
        let now = self.clock.now();
        let boot = self.config.boot_delay;
        let preempt_after = self.faults.preempt_spot_after;
        let mut to_start = Vec::new();
        let mut to_reopen = Vec::new();
        let mut to_preempt = Vec::new();
        for pod in self.pods.values_mut() {
            let elapsed = now.saturating_since(pod.last_accrual);
            pod.accrued += pod.rate() * elapsed.as_secs_f64() / 3600.0;
            pod.last_accrual = now;
            let since_boot = now.saturating_since(pod.boot_at);
            match pod.status {
                PodState::Provisioning | PodState::Starting if since_boot >= boot => {
                    to_start.push(pod.id.clone())
                }
                PodState::Provisioning if since_boot >= boot / 2 => pod.status = PodState::Starting,
                PodState::Running => {
                    // An sshd that died (lost its port to another process) is restarted on
                    // a new port, as a pod's container would be.
                    if let Ssh::Up(s) = &mut pod.ssh {
                        if s.exited() {
                            to_reopen.push(pod.id.clone());
                        }
                    }
                    if let (Some(after), Some(_), Some(started)) =
                        (preempt_after, pod.bid, pod.started_at)
                    {
                        if now.saturating_since(started) >= after {
                            to_preempt.push(pod.id.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        for id in to_start {
            self.make_running(&id, now);
        }
        for id in to_reopen {
            if let Err(e) = self.switch_ssh(&id, true) {
                tracing::warn!(pod = %id, error = %e, "emulator: sshd did not restart");
            }
        }
        to_preempt.dedup();
        for id in to_preempt {
            self.preempt(&id);
        }
    }

    fn make_running(&mut self, id: &str, now: Timestamp) {
        let sshd_on = self.ssh_ctx().is_some();
        let Some(pod) = self.pods.get_mut(id) else {
            return;
        };
        if pod.status != PodState::Running {
            pod.status = PodState::Running;
            pod.started_at = Some(now);
        }
        if sshd_on && !pod.never_ready && pod.ssh_capable && matches!(pod.ssh, Ssh::None) {
            let up = !pod.ssh_unreachable;
            if let Err(e) = self.switch_ssh(id, up) {
                tracing::warn!(pod = id, error = %e, "emulator: sshd did not start");
            }
        }
    }

    /// The sshd settings, when pods run sshd at all (`sshd = true` and a host key).
    fn ssh_ctx(&self) -> Option<SshCtx> {
        let (host_key, _) = self.host_key.as_ref().filter(|_| self.config.sshd)?;
        Some(SshCtx {
            binary: self.config.sshd_binary.clone(),
            host_key: host_key.clone(),
            run_root: self.work_dir.join("sshd"),
        })
    }

    /// Puts pod `id`'s SSH mapping up (sshd accepting) or down (the port held, connections
    /// refused), on the port it has when that is free, else a new one. Down kills only the
    /// listening sshd: sessions already open go on, as when a pod's sshd dies.
    fn switch_ssh(&mut self, id: &str, up: bool) -> std::io::Result<()> {
        let Some(ctx) = self.ssh_ctx() else {
            return Err(std::io::Error::other("the emulator runs no sshd"));
        };
        let Some(pod) = self.pods.get_mut(id) else {
            return Ok(());
        };
        let port = match std::mem::take(&mut pod.ssh) {
            Ssh::Up(mut s) => {
                if s.exited() {
                    // It lost its port: the next sshd gets a new one.
                    s.kill();
                    None
                } else if up {
                    pod.ssh = Ssh::Up(s);
                    return Ok(());
                } else {
                    s.kill();
                    Some(s.port)
                }
            }
            Ssh::Down(h) => {
                if !up {
                    pod.ssh = Ssh::Down(h);
                    return Ok(());
                }
                Some(h.port)
            }
            Ssh::None => None,
        };
        if !up {
            let hold = match port {
                Some(p) => PortHold::bind(p).or_else(|_| PortHold::bind(0)),
                None => PortHold::bind(0),
            }?;
            pod.ssh = Ssh::Down(hold);
            return Ok(());
        }
        let had_port = port.is_some();
        let port = match port {
            Some(p) => p,
            None => sshd::free_port()?,
        };
        let Some(home) = pod.home.clone() else {
            return Err(std::io::Error::other("the pod has no home (terminated)"));
        };
        let spec = SshdSpec {
            binary: &ctx.binary,
            run_dir: ctx.run_root.join(&pod.id),
            host_key: &ctx.host_key,
            home: &home,
            keys: &pod.keys,
            env: session_env(pod, port),
            port,
        };
        match SshdProcess::spawn(spec) {
            Ok(p) => {
                pod.ssh = Ssh::Up(p);
                pod.sessions_possible = true;
                Ok(())
            }
            Err(e) => {
                // Still tell the truth: a mapping the pod had stays, nothing accepts on it.
                if had_port {
                    if let Ok(hold) = PortHold::bind(port) {
                        pod.ssh = Ssh::Down(hold);
                    }
                }
                Err(e)
            }
        }
    }

    /// RUNNING → EXITED with the sshd killed and the GPUs released. False when not running.
    pub(super) fn preempt(&mut self, id: &str) -> bool {
        self.advance_accrual_only();
        let Some(pod) = self.pods.get_mut(id) else {
            return false;
        };
        if pod.status != PodState::Running {
            return false;
        }
        Self::stop_pod(pod, &mut self.stock);
        Self::reset_home(pod);
        true
    }

    fn advance_accrual_only(&mut self) {
        let now = self.clock.now();
        for pod in self.pods.values_mut() {
            let elapsed = now.saturating_since(pod.last_accrual);
            pod.accrued += pod.rate() * elapsed.as_secs_f64() / 3600.0;
            pod.last_accrual = now;
        }
    }

    /// → EXITED: GPUs released, the container's processes ended (its home is left to the
    /// caller: reset on stop, removed on terminate).
    fn stop_pod(pod: &mut PodRecord, stock: &mut BTreeMap<String, u32>) {
        if pod.holds_gpus() {
            *stock.entry(pod.gpu_type.clone()).or_insert(0) += pod.gpu_count;
        }
        Self::end_container(pod);
        pod.status = PodState::Exited;
        pod.started_at = None;
    }

    /// Ends everything the pod's container runs: its sshd with every connection, and every
    /// process of its sessions (found by [`sshd::POD_MARKER_VAR`]).
    fn end_container(pod: &mut PodRecord) {
        match std::mem::take(&mut pod.ssh) {
            Ssh::Up(mut s) => s.kill_with_connections(),
            Ssh::Down(h) => drop(h),
            Ssh::None => {}
        }
        if pod.sessions_possible {
            if let Some(home) = &pod.home {
                sshd::kill_pod_processes(home);
            }
            pod.sessions_possible = false;
        }
    }

    /// The container disk is volatile: a new container starts with a fresh home.
    fn reset_home(pod: &PodRecord) {
        if let Some(home) = &pod.home {
            if let Err(e) = home::reset(home, &pod.id, &pod.gpus) {
                tracing::warn!(pod = %pod.id, error = %e, "emulator: resetting the pod's home failed");
            }
        }
    }

    fn new_id(&mut self) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        loop {
            let id: String = (0..14)
                .map(|_| ALPHABET[self.rng.random_range(0..ALPHABET.len())] as char)
                .collect();
            if !self.pods.contains_key(&id) {
                return id;
            }
        }
    }

    fn gpu(&self, id: &str) -> Option<&GpuSpec> {
        self.config.gpus.iter().find(|g| g.id == id)
    }

    /// Creates a pod after every check; `bid` makes it a spot pod.
    pub(super) fn create(&mut self, req: CreateRequest) -> Result<String, Problem> {
        let Some(gpu) = self.gpu(&req.gpu_type).cloned() else {
            return Err(Problem::new(
                400,
                "Bad Request",
                format!("unknown GPU type id {:?}", req.gpu_type),
            ));
        };
        if req.gpu_count == 0 {
            return Err(Problem::new(
                422,
                "Unprocessable Entity",
                "gpu.count must be at least 1",
            ));
        }
        if let Some(dc) = req
            .data_center_ids
            .iter()
            .find(|d| !DATA_CENTERS.contains(&d.as_str()))
        {
            return Err(Problem::new(
                400,
                "Bad Request",
                format!("unknown data center id {dc:?}"),
            ));
        }
        let price = match (req.bid, req.cloud.as_str()) {
            (None, "COMMUNITY") => gpu.community_price,
            (None, _) => gpu.secure_price,
            (Some(bid), cloud) => {
                check_bid(&gpu, cloud, bid)?;
                bid
            }
        };
        if let Some((name, _)) = req
            .env
            .iter()
            .find(|(k, v)| k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0'))
        {
            return Err(Problem::new(
                400,
                "Bad Request",
                format!(
                    "env variable {name:?} cannot be set in a container: names must be \
                     non-empty without '=' or NUL, values without NUL"
                ),
            ));
        }
        let free = self.stock.get(&gpu.id).copied().unwrap_or(0);
        if self.faults.capacity_exhausted.contains(&gpu.id) || free < req.gpu_count {
            return Err(Problem::new(400, "Bad Request", NO_CAPACITY));
        }
        let id = self.new_id();
        let gpus = Gpus::new(&id, &gpu.id, req.gpu_count, gpu.memory_gb);
        let home = self.work_dir.join("pods").join(&id);
        if let Err(e) = home::provision(&home, &id, &gpus) {
            let _ = home::remove(&home);
            return Err(Problem::new(
                500,
                "Internal Server Error",
                format!(
                    "the emulator could not create the pod's home {}: {e}",
                    home.display()
                ),
            ));
        }
        self.stock.insert(gpu.id.clone(), free - req.gpu_count);
        let now = self.clock.now();
        // `startSsh` only injects the account's keys as PUBLIC_KEY (unless the request already
        // sets one); with no keys registered it does nothing.
        let mut env = req.env;
        if req.start_ssh && !env.contains_key("PUBLIC_KEY") && !self.ssh_keys.is_empty() {
            env.insert("PUBLIC_KEY".into(), self.ssh_keys.join("\n"));
        }
        let keys: Vec<String> = env
            .get("PUBLIC_KEY")
            .map(|k| {
                k.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let exposes_ssh = req.ports.iter().any(|p| p.trim() == "22/tcp");
        let pod = PodRecord {
            id: id.clone(),
            name: req.name,
            image: req.image,
            gpu_type: gpu.id.clone(),
            gpu_count: req.gpu_count,
            cloud: req.cloud,
            env,
            ports: req.ports,
            disk: req.disk,
            volume_gb: req.volume_gb,
            data_center_id: req
                .data_center_ids
                .first()
                .cloned()
                .unwrap_or_else(|| DATA_CENTERS[0].to_owned()),
            ssh_capable: exposes_ssh && !keys.is_empty(),
            visible_at: now.plus(self.faults.hide_new_pods_for),
            bid: req.bid,
            price,
            status: PodState::Provisioning,
            created_at: now,
            boot_at: now,
            started_at: None,
            terminated_at: None,
            accrued: 0.0,
            last_accrual: now,
            never_ready: self.faults.never_ready,
            ssh_unreachable: self.faults.ssh_unreachable,
            keys,
            ssh: Ssh::None,
            home: Some(home),
            gpus,
            sessions_possible: false,
        };
        self.pods.insert(id.clone(), pod);
        self.order.push(id.clone());
        // A zero boot delay means RUNNING at once.
        self.advance();
        Ok(id)
    }

    /// Consumes one "500 after a successful create" fault, if armed.
    pub(super) fn take_error_after_create(&mut self) -> bool {
        if self.faults.error_after_create > 0 {
            self.faults.error_after_create -= 1;
            true
        } else {
            false
        }
    }

    fn live(&self, id: &str) -> Option<&PodRecord> {
        self.pods
            .get(id)
            .filter(|p| p.status != PodState::Terminated)
    }

    /// Live and past its listing lag (`faults.hide_new_pods_for`): what GET and list show.
    fn visible(&self, id: &str) -> Option<&PodRecord> {
        let now = self.clock.now();
        self.live(id).filter(|p| now >= p.visible_at)
    }

    /// `GET /v2/pods/{id}`: 404 when gone or not yet visible.
    pub(super) fn pod_json(&self, id: &str) -> Result<Value, Problem> {
        self.visible(id)
            .map(|p| self.render(p))
            .ok_or_else(|| Problem::not_found(id))
    }

    /// The pod as a create or an action answers it (never hidden: the caller just made it).
    pub(super) fn pod_json_fresh(&self, id: &str) -> Result<Value, Problem> {
        self.live(id)
            .map(|p| self.render(p))
            .ok_or_else(|| Problem::not_found(id))
    }

    pub(super) fn list_json(&self) -> Value {
        let pods: Vec<Value> = self
            .order
            .iter()
            .filter_map(|id| self.visible(id))
            .map(|p| self.render(p))
            .collect();
        json!({ "pods": pods })
    }

    pub(super) fn terminate(&mut self, id: &str) -> Result<(), Problem> {
        let now = self.clock.now();
        let stock = &mut self.stock;
        let Some(pod) = self
            .pods
            .get_mut(id)
            .filter(|p| p.status != PodState::Terminated)
        else {
            return Err(Problem::not_found(id));
        };
        Self::stop_pod(pod, stock);
        if let Some(home) = pod.home.take() {
            if let Err(e) = home::remove(&home) {
                tracing::warn!(pod = id, error = %e, "emulator: removing the pod's home failed");
            }
        }
        pod.status = PodState::Terminated;
        pod.terminated_at = Some(now);
        Ok(())
    }

    /// start / stop / restart (terminate is handled by the caller).
    pub(super) fn action(&mut self, id: &str, action: &str) -> Result<Value, Problem> {
        let now = self.clock.now();
        let resume_refused = self.faults.resume_refused;
        let never_ready = self.faults.never_ready;
        let ssh_unreachable = self.faults.ssh_unreachable;
        let Some(status) = self.live(id).map(|p| p.status.clone()) else {
            return Err(Problem::not_found(id));
        };
        if !actions(&status).contains(&action) {
            return Err(Problem::new(
                409,
                "Conflict",
                format!("action {action} is not valid for a pod in status {status}"),
            ));
        }
        match action {
            "stop" => {
                let stock = &mut self.stock;
                if let Some(pod) = self.pods.get_mut(id) {
                    Self::stop_pod(pod, stock);
                    Self::reset_home(pod);
                }
            }
            "start" => {
                let (gpu, count) = {
                    let p = &self.pods[id];
                    (p.gpu_type.clone(), p.gpu_count)
                };
                let free = self.stock.get(&gpu).copied().unwrap_or(0);
                if resume_refused || free < count {
                    return Err(Problem::new(400, "Bad Request", HOST_FULL));
                }
                self.stock.insert(gpu, free - count);
                if let Some(pod) = self.pods.get_mut(id) {
                    pod.status = PodState::Provisioning;
                    pod.boot_at = now;
                    pod.never_ready = never_ready;
                    pod.ssh_unreachable = ssh_unreachable;
                }
                self.advance();
            }
            "restart" => {
                if let Some(pod) = self.pods.get_mut(id) {
                    // A new container: processes ended, a fresh home.
                    Self::end_container(pod);
                    Self::reset_home(pod);
                    pod.status = PodState::Starting;
                    pod.boot_at = now.minus(self.config.boot_delay / 2);
                    pod.started_at = None;
                }
                self.advance();
            }
            other => {
                return Err(Problem::new(
                    422,
                    "Unprocessable Entity",
                    format!("unknown action {other:?}"),
                ))
            }
        }
        self.pod_json_fresh(id)
    }

    pub(super) fn catalog_json(&self, availability: bool) -> Value {
        let gpus: Vec<Value> = self
            .config
            .gpus
            .iter()
            .map(|g| {
                let mut v = json!({
                    "id": g.id, "name": g.name, "pool": null, "manufacturer": "NVIDIA",
                    "memory": g.memory_gb, "secure": true, "community": true,
                    "price": {"secure": g.secure_price, "community": g.community_price},
                    "maxCount": {"secure": 8, "community": 8},
                });
                if availability {
                    let level = self.level(&g.id);
                    v["availability"] = json!(level);
                    v["dataCenters"] = json!([{"id": DATA_CENTERS[0], "name": "US Kansas 2", "availability": level}]);
                }
                v
            })
            .collect();
        json!({ "gpus": gpus })
    }

    fn free(&self, gpu: &str) -> u32 {
        if self.faults.capacity_exhausted.iter().any(|g| g == gpu) {
            0
        } else {
            self.stock.get(gpu).copied().unwrap_or(0)
        }
    }

    /// Stock level of a GPU type now (see [`level_of`]).
    fn level(&self, gpu: &str) -> &'static str {
        level_of(u64::from(self.free(gpu)))
    }

    /// Every GPU type as a GraphQL `GpuType` source (all fields; the caller projects the
    /// selection). `_free` (never selectable) feeds `lowestPrice(input: {gpuCount})`.
    pub(super) fn gql_gpu_types(&self, id: Option<&str>) -> Vec<Value> {
        self.config
            .gpus
            .iter()
            .filter(|g| id.is_none_or(|id| g.id == id))
            .map(|g| {
                json!({
                    "id": g.id, "displayName": g.name, "manufacturer": "Nvidia",
                    "memoryInGb": g.memory_gb, "cudaCores": 0,
                    "secureCloud": true, "communityCloud": true,
                    "securePrice": g.secure_price, "communityPrice": g.community_price,
                    "secureSpotPrice": g.secure_spot_price, "communitySpotPrice": g.community_spot_price,
                    // Reserved terms are not emulated: the on-demand price stands in.
                    "oneWeekPrice": g.secure_price, "oneMonthPrice": g.secure_price,
                    "threeMonthPrice": g.secure_price,
                    "maxGpuCount": 8, "maxGpuCountSecureCloud": 8, "maxGpuCountCommunityCloud": 8,
                    "_free": self.free(&g.id),
                })
            })
            .collect()
    }

    /// `GpuType.lowestPrice(input: {gpuCount})` of a [`World::gql_gpu_types`] source.
    pub(super) fn gql_lowest_price(gpu: &Value, gpu_count: u32) -> Value {
        let min_bid = match (
            gpu["secureSpotPrice"].as_f64(),
            gpu["communitySpotPrice"].as_f64(),
        ) {
            (Some(a), Some(b)) => json!(a.min(b)),
            (a, b) => json!(a.or(b)),
        };
        let on_demand = match (gpu["securePrice"].as_f64(), gpu["communityPrice"].as_f64()) {
            (Some(a), Some(b)) => json!(a.min(b)),
            (a, b) => json!(a.or(b)),
        };
        let free = gpu["_free"].as_u64().unwrap_or(0);
        let stock = if free < u64::from(gpu_count.max(1)) {
            Value::Null
        } else {
            match level_of(free) {
                "LOW" => json!("Low"),
                "MEDIUM" => json!("Medium"),
                _ => json!("High"),
            }
        };
        json!({"minimumBidPrice": min_bid, "uninterruptablePrice": on_demand,
               "stockStatus": stock, "gpuName": gpu["displayName"], "gpuTypeId": gpu["id"]})
    }

    /// A visible pod as a GraphQL `Pod` source (`pod(input: {podId})`).
    pub(super) fn gql_pod(&self, id: &str) -> Option<Value> {
        self.visible(id).map(|p| self.gql_render(p))
    }

    /// A pod just created or changed by a mutation (never hidden from its caller).
    pub(super) fn gql_pod_fresh(&self, id: &str) -> Option<Value> {
        self.live(id).map(|p| self.gql_render(p))
    }

    /// Every visible pod (`myself { pods }`).
    pub(super) fn gql_pods(&self) -> Vec<Value> {
        self.order
            .iter()
            .filter_map(|id| self.visible(id))
            .map(|p| self.gql_render(p))
            .collect()
    }

    /// `podBidResume`: a stopped spot pod starts again at a new bid (at least the floor).
    pub(super) fn bid_resume(&mut self, id: &str, bid: f64) -> Result<Value, Problem> {
        let Some(pod) = self.live(id) else {
            return Err(Problem::not_found(id));
        };
        let Some(gpu) = self.gpu(&pod.gpu_type) else {
            return Err(Problem::not_found(id));
        };
        check_bid(gpu, &pod.cloud, bid)?;
        let (old_bid, old_price) = (pod.bid, pod.price);
        if let Some(p) = self.pods.get_mut(id) {
            p.bid = Some(bid);
            p.price = bid;
        }
        let result = self.action(id, "start");
        if result.is_err() {
            if let Some(p) = self.pods.get_mut(id) {
                p.bid = old_bid;
                p.price = old_price;
            }
        }
        result
    }

    fn gql_render(&self, p: &PodRecord) -> Value {
        let now = self.clock.now();
        let running = p.status == PodState::Running;
        let uptime = p
            .started_at
            .map(|t| now.saturating_since(t).as_secs())
            .unwrap_or(0);
        let runtime = if running && !p.never_ready {
            let util = utilization(p);
            let gpus: Vec<Value> = (0..p.gpu_count)
                .map(|i| json!({"id": p.gpus.uuid(i), "gpuUtilPercent": util, "memoryUtilPercent": 0}))
                .collect();
            let ports: Vec<Value> = p
                .ssh
                .port()
                .map(|port| {
                    json!({"ip": "127.0.0.1", "isIpPublic": true, "privatePort": 22,
                           "publicPort": port, "type": "tcp"})
                })
                .into_iter()
                .collect();
            json!({"uptimeInSeconds": uptime, "gpus": gpus, "ports": ports})
        } else {
            Value::Null
        };
        let desired = match p.status {
            PodState::Exited | PodState::Error => "EXITED",
            PodState::Terminated => "TERMINATED",
            _ => "RUNNING",
        };
        let gpu_name = self
            .gpu(&p.gpu_type)
            .map(|g| g.name.clone())
            .unwrap_or_default();
        json!({
            "id": p.id, "name": p.name, "imageName": p.image,
            "env": p.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "gpuCount": p.gpu_count, "vcpuCount": VCPUS_PER_GPU * p.gpu_count, "memoryInGb": 62 * p.gpu_count,
            "containerDiskInGb": p.disk, "volumeInGb": p.volume_gb, "volumeMountPath": "/workspace",
            "costPerHr": p.rate(), "adjustedCostPerHr": p.rate(), "desiredStatus": desired,
            "lastStatusChange": format!("{}: {}", p.status.as_str(), fmt_time(p.boot_at)),
            "dockerArgs": "", "dockerId": null, "machineId": format!("m{}", &p.id[..8.min(p.id.len())]),
            "podType": if p.bid.is_some() { "INTERRUPTABLE" } else { "RESERVED" },
            "port": null, "ports": p.ports.join(","), "uptimeSeconds": uptime, "locked": false,
            "runtime": runtime,
            "machine": {"podHostId": pod_host_id(&p.id), "gpuDisplayName": gpu_name},
        })
    }

    pub(super) fn billing_json(&self, pod_filter: Option<&str>, bucket: &str) -> Value {
        let start = fmt_time(self.started);
        let end = fmt_time(self.clock.now());
        let records: Vec<Value> = self
            .order
            .iter()
            .filter(|id| pod_filter.is_none_or(|f| f == id.as_str()))
            .filter_map(|id| self.pods.get(id))
            .map(|p| {
                json!({"startTime": start, "endTime": end, "podId": p.id,
                       "totalAmount": p.accrued, "gpuAmount": p.accrued,
                       "cpuAmount": 0.0, "diskAmount": 0.0})
            })
            .collect();
        let total: f64 = records
            .iter()
            .filter_map(|r| r["totalAmount"].as_f64())
            .sum();
        let count = records.len();
        json!({
            "records": records,
            "metadata": {
                "query": {"startTime": start, "endTime": end, "bucketSize": bucket, "podId": pod_filter},
                "recordCount": count, "uniquePodCount": count,
                "totals": {"totalAmount": total, "gpuAmount": total, "cpuAmount": 0.0, "diskAmount": 0.0},
            }
        })
    }

    pub(super) fn ssh_keys_json(&self) -> Value {
        json!({ "keys": self.ssh_keys })
    }

    pub(super) fn set_ssh_keys(&mut self, keys: Vec<String>) {
        self.ssh_keys = keys;
    }

    pub(super) fn admin_pods(&self) -> Vec<AdminPod> {
        self.order
            .iter()
            .filter_map(|id| self.pods.get(id))
            .map(admin_pod)
            .collect()
    }

    /// A live pod for an admin change: 404 when unknown, 409 when terminated.
    fn admin_target(&self, id: &str) -> Result<&PodRecord, Problem> {
        match self.pods.get(id) {
            None => Err(Problem::not_found(id)),
            Some(p) if p.status == PodState::Terminated => Err(Problem::new(
                409,
                "Conflict",
                format!("pod {id} is TERMINATED: it has no sshd or home any more"),
            )),
            Some(p) => Ok(p),
        }
    }

    /// `POST /admin/pods/{id}/ssh`: the pod's sshd up (accepting, on its port when free) or
    /// down (its mapping still reported, connections refused).
    pub(super) fn set_ssh(&mut self, id: &str, up: bool) -> Result<AdminPod, Problem> {
        let pod = self.admin_target(id)?;
        let refuse = |why: String| Err(Problem::new(409, "Conflict", why));
        if pod.status != PodState::Running {
            return refuse(format!(
                "pod {id} is {}: SSH can be switched only on a RUNNING pod",
                pod.status
            ));
        }
        if self.ssh_ctx().is_none() {
            return refuse("the emulator runs no sshd (sshd = false in its config)".into());
        }
        if pod.never_ready {
            return refuse(format!(
                "pod {id} started under faults.never_ready: it has no SSH mapping to switch"
            ));
        }
        if !pod.ssh_capable {
            return refuse(format!(
                "pod {id} runs no sshd: it needs PUBLIC_KEY in its env (or startSsh with \
                 account SSH keys) and 22/tcp in its ports"
            ));
        }
        if let Err(e) = self.switch_ssh(id, up) {
            return Err(Problem::new(
                500,
                "Internal Server Error",
                format!(
                    "switching the sshd of pod {id} {} failed: {e}",
                    if up { "up" } else { "down" }
                ),
            ));
        }
        if let Some(pod) = self.pods.get_mut(id) {
            // Brought up by hand, it stays up through restarts.
            pod.ssh_unreachable &= !up;
        }
        self.admin_target(id).map(admin_pod)
    }

    /// `PUT /admin/pods/{id}/utilization`: what the pod's `nvidia-smi` reports from now on.
    pub(super) fn set_utilization(&mut self, id: &str, percent: u8) -> Result<AdminPod, Problem> {
        let pod = self.admin_target(id)?;
        let Some(home) = &pod.home else {
            return Err(Problem::new(
                409,
                "Conflict",
                format!("pod {id} has no home any more"),
            ));
        };
        if let Err(e) = home::write_utilization(home, percent) {
            return Err(Problem::new(
                500,
                "Internal Server Error",
                format!(
                    "writing {} of pod {id} failed: {e}",
                    home.join(home::UTILIZATION_FILE).display()
                ),
            ));
        }
        Ok(admin_pod(pod))
    }

    /// Shutdown: every sshd and every process of the pods' sessions killed, every pod's home
    /// removed.
    pub(super) fn kill_all(&mut self) {
        let mut sessions = false;
        for pod in self.pods.values_mut() {
            match std::mem::take(&mut pod.ssh) {
                Ssh::Up(mut s) => s.kill_with_connections(),
                Ssh::Down(h) => drop(h),
                Ssh::None => {}
            }
            sessions |= std::mem::take(&mut pod.sessions_possible);
            pod.home = None;
        }
        let pods_dir = self.work_dir.join("pods");
        if sessions {
            sshd::kill_pod_processes(&pods_dir);
        }
        if let Err(e) = home::remove(&pods_dir) {
            tracing::warn!(error = %e, "emulator: removing the pods' homes failed");
        }
    }

    fn render(&self, p: &PodRecord) -> Value {
        let now = self.clock.now();
        let running = p.status == PodState::Running;
        // RUNNING with a runtime (RunPod's readiness trap aside: never_ready); the SSH
        // mapping whenever a port is mapped, accepting or not.
        let (direct, runtime) = if running && !p.never_ready {
            let util = utilization(p);
            let gpus: Vec<Value> = (0..p.gpu_count)
                .map(|_| json!({"util": util, "memoryUtil": 0}))
                .collect();
            let uptime = p
                .started_at
                .map(|t| now.saturating_since(t).as_secs())
                .unwrap_or(0);
            match p.ssh.port() {
                Some(port) => (
                    json!({"host": "127.0.0.1", "port": port, "username": "root",
                           "command": format!("ssh root@127.0.0.1 -p {port}")}),
                    json!({"uptime": uptime, "gpus": gpus,
                           "ports": [{"private": 22, "public": port, "type": "tcp", "ip": "127.0.0.1"}]}),
                ),
                None => (
                    Value::Null,
                    json!({"uptime": uptime, "gpus": gpus, "ports": []}),
                ),
            }
        } else {
            (Value::Null, Value::Null)
        };
        json!({
            "id": p.id, "name": p.name, "image": p.image, "args": "", "disk": p.disk,
            "ports": p.ports, "env": p.env, "registry": null, "status": p.status.as_str(),
            "actions": actions(&p.status), "mounts": {},
            "gpu": {"id": p.gpu_type, "count": p.gpu_count},
            "cloud": p.cloud, "dataCenterId": p.data_center_id, "cudaVersion": "12.8",
            "ssh": {"proxy": null, "direct": direct},
            "template": null, "cost": p.rate(), "locked": false,
            "globalNetworking": {"enabled": false},
            "runtime": runtime,
            "createdAt": fmt_time(p.created_at),
            "startedAt": p.started_at.map(fmt_time),
        })
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}

/// The pod's GPU utilization as its `nvidia-smi` reports it (0 when unreadable: the API's
/// telemetry has nothing better).
fn utilization(p: &PodRecord) -> u8 {
    p.home
        .as_deref()
        .and_then(home::read_utilization)
        .unwrap_or(0)
}

/// A pod as `/admin/pods` reports it.
fn admin_pod(p: &PodRecord) -> AdminPod {
    AdminPod {
        id: p.id.clone(),
        name: p.name.clone(),
        status: p.status.to_string(),
        gpu_type: p.gpu_type.clone(),
        gpu_count: p.gpu_count,
        bid_per_gpu: p.bid,
        cost_accrued: p.accrued,
        usd_per_hour: p.rate(),
        sshd_pid: match &p.ssh {
            Ssh::Up(s) => Some(s.pid()),
            _ => None,
        },
        ssh_port: p.ssh.port(),
        pod_dir: p.home.as_ref().map(|h| h.to_string_lossy().into_owned()),
        gpu_utilization: p.home.as_deref().and_then(home::read_utilization),
        created_at: p.created_at,
        terminated_at: p.terminated_at,
        price_per_hour: p.price * f64::from(p.gpu_count),
    }
}

/// The environment of the pod's SSH sessions: the pod's own (its create request), then what
/// RunPod sets in every pod (its docs' list, as far as it applies here). Not set:
/// `RUNPOD_API_KEY` (a pod-scoped key the emulator does not have; handing out an account key
/// would leak it), `RUNPOD_VOLUME_ID` (no network volumes), `CUDA_VERSION` and
/// `PYTORCH_VERSION` (the image's, not RunPod's), `RUNPOD_ALLOW_IP` (set by the user).
fn session_env(p: &PodRecord, ssh_port: u16) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> =
        p.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    env.extend(
        [
            ("RUNPOD_POD_ID", p.id.clone()),
            ("RUNPOD_POD_HOSTNAME", pod_host_id(&p.id)),
            ("RUNPOD_GPU_COUNT", p.gpu_count.to_string()),
            (
                "RUNPOD_CPU_COUNT",
                (VCPUS_PER_GPU * p.gpu_count).to_string(),
            ),
            ("RUNPOD_PUBLIC_IP", "127.0.0.1".to_owned()),
            ("RUNPOD_TCP_PORT_22", ssh_port.to_string()),
            ("RUNPOD_DC_ID", p.data_center_id.clone()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    env
}

/// Stock level: 0 → NONE, 1–2 LOW, 3–7 MEDIUM, 8+ HIGH (a full 8-GPU host).
fn level_of(free: u64) -> &'static str {
    match free {
        0 => "NONE",
        1..=2 => "LOW",
        3..=7 => "MEDIUM",
        _ => "HIGH",
    }
}

/// A request-level fault drawn for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum RequestFault {
    /// 429 with this Retry-After (seconds).
    RateLimited(u64),
    /// 500.
    ServerError,
}

/// A validated create (REST or spot).
#[derive(Debug)]
pub(super) struct CreateRequest {
    pub(super) name: String,
    pub(super) image: String,
    pub(super) gpu_type: String,
    pub(super) gpu_count: u32,
    pub(super) cloud: String,
    pub(super) env: BTreeMap<String, String>,
    pub(super) ports: Vec<String>,
    pub(super) disk: u32,
    pub(super) volume_gb: u32,
    pub(super) data_center_ids: Vec<String>,
    pub(super) start_ssh: bool,
    pub(super) bid: Option<f64>,
}

/// Actions valid in a status (the spec's table).
fn actions(status: &PodState) -> Vec<&'static str> {
    match status {
        PodState::Running => vec!["stop", "restart", "terminate"],
        PodState::Exited | PodState::Error => vec!["start", "terminate"],
        PodState::Provisioning | PodState::Starting => vec!["stop", "terminate"],
        _ => vec![],
    }
}

fn fmt_time(t: Timestamp) -> String {
    humantime::format_rfc3339_seconds(t.to_system()).to_string()
}

/// A spot bid on `gpu` in `cloud` is valid when that cloud has a spot offer for it and the bid
/// is a finite amount at least its floor (the minimum bid).
fn check_bid(gpu: &GpuSpec, cloud: &str, bid: f64) -> Result<(), Problem> {
    let floor = if cloud == "COMMUNITY" {
        gpu.community_spot_price
    } else {
        gpu.secure_spot_price
    };
    let Some(floor) = floor else {
        return Err(Problem::new(
            400,
            "Bad Request",
            format!("{} has no spot offer", gpu.id),
        ));
    };
    if !(bid.is_finite() && bid + 1e-9 >= floor) {
        return Err(Problem::new(
            400,
            "Bad Request",
            format!("bid {bid} is below the minimum bid {floor}"),
        ));
    }
    Ok(())
}
