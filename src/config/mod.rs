//! The one configuration: a TOML file, overridden by `RUNPOD_AUTOSCALER__SECTION__KEY`
//! environment variables, overridden by command-line flags (applied in `main`). Unknown keys are
//! rejected; [`Config::validate`] names the key and the fix for every problem. Secrets are held
//! in [`Secret`], which never prints its value.

use std::collections::BTreeMap;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod access;
mod baseline;
mod checkpoint;
mod reconcile;

pub use access::AccessConfig;
pub use baseline::{parse_terraform_output, BaselineConfig, TerraformBaseline};
pub use checkpoint::{byte_size, CheckpointConfig};
pub use reconcile::{
    public_key_path, JoinConfig, JoinMode, KubeTemplate, Mode, OfferConfig, ReconcileConfig,
};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::decide::{PodTemplate, Policy, PolicyKind};
use crate::model::{GpuTypeId, Secret, Usd};
use crate::signals::kafka::{
    KafkaLagSettings, KafkaSecurity, LagOptions, OffsetResetPolicy, DEFAULT_PERSISTENT_LAG_WINDOW,
};
use crate::signals::prometheus::{default_query, PrometheusAuth, PrometheusSettings};

/// Prefix of environment overrides; `__` separates path segments
/// (`RUNPOD_AUTOSCALER__POLICY__MAX_PODS=4`).
pub const ENV_PREFIX: &str = "RUNPOD_AUTOSCALER__";

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a value has the wrong type.
    #[error("{0}")]
    Parse(String),
    /// A value is out of range or inconsistent with another.
    #[error("invalid `{key}`: {problem}; {fix}")]
    Invalid {
        /// Dotted key path.
        key: &'static str,
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: &'static str,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners, tick, TLS, logging.
    #[serde(default)]
    pub service: ServiceConfig,
    /// The local always-on GPU capacity.
    #[serde(default)]
    pub baseline: BaselineConfig,
    /// Scaling policy and hard limits.
    pub policy: PolicyConfig,
    /// Where demand comes from.
    pub signals: SignalsConfig,
    /// RunPod account access.
    #[serde(default)]
    pub runpod: RunPodConfig,
    /// Acting on RunPod (advisory by default).
    #[serde(default)]
    pub reconcile: ReconcileConfig,
    /// What joining a pod means.
    #[serde(default)]
    pub join: JoinConfig,
    /// What may be bought, cheapest effective price first; empty: `policy.gpu_type` on demand.
    #[serde(default)]
    pub offers: Vec<OfferConfig>,
    /// Where GPU jobs checkpoint to (S3-compatible store); absent: no checkpoint store.
    #[serde(default)]
    pub checkpoint: Option<CheckpointConfig>,
    /// Pod access (`exec`, `cp`, `pods watch`, `mcp`).
    #[serde(default)]
    pub access: AccessConfig,
}

/// Listeners and loop timing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// gRPC (KEDA external scaler) listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP (`/metrics`, `/healthz`, `/readyz`, `/debug/plan`) listen address.
    pub http_addr: SocketAddr,
    /// How often to observe, decide and publish.
    #[serde(with = "humantime_serde")]
    pub tick_interval: Duration,
    /// Optional gRPC server TLS (mutual with `client_ca_file`).
    pub tls: Option<TlsConfig>,
    /// `text` or `json` logs on stderr.
    pub log_format: LogFormat,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
            http_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tick_interval: Duration::from_secs(5),
            tls: None,
            log_format: LogFormat::Text,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// gRPC server TLS material (PEM files).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain.
    pub cert_file: PathBuf,
    /// Server private key.
    pub key_file: PathBuf,
    /// CA that client certificates must chain to; when set, clients must present one.
    pub client_ca_file: Option<PathBuf>,
}

/// Scaling policy and hard limits (see the README's configuration reference).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `target` (default), `cost` or `seed`.
    #[serde(default = "defaults::kind")]
    pub kind: PolicyKind,
    /// Minimum RunPod pods kept (target policy).
    #[serde(default)]
    pub min_pods: u32,
    /// Hard limit on RunPod pods, booting ones included.
    pub max_pods: u32,
    /// Hard limit on RunPod spend per hour.
    pub max_usd_per_hour: f64,
    /// At most this many pod creations per tick.
    #[serde(default = "defaults::max_launches_per_tick")]
    pub max_launches_per_tick: u32,
    /// GPU type of new pods, exactly as RunPod spells it.
    pub gpu_type: String,
    /// GPUs per pod.
    #[serde(default = "defaults::one")]
    pub gpus_per_pod: u32,
    /// Expected price of one new pod per hour (budget check before the pod exists).
    pub pod_usd_per_hour: f64,
    /// Queue lag one GPU worker absorbs.
    #[serde(default = "defaults::lag_per_gpu")]
    pub lag_per_gpu: f64,
    /// p95 latency objective.
    #[serde(with = "humantime_serde", default = "defaults::slo_p95")]
    pub slo_p95: Duration,
    /// GPUs added per tick while p95 exceeds the objective.
    #[serde(default = "defaults::one")]
    pub latency_step_gpus: u32,
    /// Scale down only to the highest demand within this window.
    #[serde(with = "humantime_serde", default = "defaults::stabilization")]
    pub scale_down_stabilization: Duration,
    /// A pod must be idle this long before it is removed.
    #[serde(with = "humantime_serde", default = "defaults::idle_timeout")]
    pub idle_timeout: Duration,
    /// New pods are not removed or judged this long after creation.
    #[serde(with = "humantime_serde", default = "defaults::warmup_grace")]
    pub warmup_grace: Duration,
    /// A pod still not ready this long after creation counts as failed (replaced).
    #[serde(with = "humantime_serde", default = "defaults::boot_deadline")]
    pub boot_deadline: Duration,
    /// A signal older than this many poll intervals is stale (no scale-down).
    #[serde(default = "defaults::stale_after_intervals")]
    pub stale_after_intervals: u32,
}

/// Demand signal sources.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SignalsConfig {
    /// How often each source is polled.
    #[serde(with = "humantime_serde", default = "defaults::poll_interval")]
    pub poll_interval: Duration,
    /// Queue lag source.
    pub queue: QueueSourceConfig,
    /// p95 latency source; omit to scale on lag alone.
    pub latency: Option<LatencySourceConfig>,
}

/// Where queue lag comes from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "source", rename_all = "lowercase", deny_unknown_fields)]
pub enum QueueSourceConfig {
    /// A fixed value.
    Static {
        /// Messages waiting.
        value: f64,
    },
    /// Consumer-group lag read from Kafka (KEDA kafka-scaler semantics).
    Kafka(Box<KafkaSourceConfig>),
}

/// `[signals.queue] source = "kafka"`: the keys mirror KEDA's kafka trigger in snake_case.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Consumer group whose lag is read.
    pub consumer_group: String,
    /// Topics; empty = every topic the group has commits for.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Target lag per replica (> 0); caps the total unless idle consumers are allowed.
    #[serde(default = "defaults::lag_threshold")]
    pub lag_threshold: i64,
    /// Active iff lag > this (≥ 0).
    #[serde(default)]
    pub activation_lag_threshold: i64,
    /// `latest` (uncommitted partition counts 1) or `earliest` (log-end − log-start).
    #[serde(default)]
    pub offset_reset_policy: OffsetResetPolicy,
    /// Do not cap the total at partitions × lag_threshold.
    #[serde(default)]
    pub allow_idle_consumers: bool,
    /// A partition with lag whose commit has not moved for `persistent_lag_window` counts 0
    /// for scaling (still counted for activation).
    #[serde(default)]
    pub exclude_persistent_lag: bool,
    /// How long a commit must stay put before its lag is persistent.
    #[serde(with = "humantime_serde", default = "defaults::persistent_lag_window")]
    pub persistent_lag_window: Duration,
    /// Partitions without a commit count 0.
    #[serde(default)]
    pub scale_to_zero_on_invalid_offset: bool,
    /// Cap at partitions-with-lag × lag_threshold.
    #[serde(default)]
    pub limit_to_partitions_with_lag: bool,
    /// Only these partition ids count (empty = all).
    #[serde(default)]
    pub partition_limitation: Vec<i32>,
    /// librdkafka `security.protocol` (`plaintext`, `ssl`, `sasl_plaintext`, `sasl_ssl`).
    pub security_protocol: Option<String>,
    /// librdkafka `sasl.mechanism` (`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`).
    pub sasl_mechanism: Option<String>,
    /// SASL user.
    pub sasl_username: Option<String>,
    /// SASL password (secret).
    pub sasl_password: Option<Secret>,
    /// PEM CA file for TLS.
    pub ssl_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS.
    pub ssl_cert_file: Option<PathBuf>,
    /// PEM client key for mutual TLS.
    pub ssl_key_file: Option<PathBuf>,
    /// Bound on one poll.
    #[serde(with = "humantime_serde", default = "defaults::source_timeout")]
    pub timeout: Duration,
    /// Poll interval of this source (default: `signals.poll_interval`).
    #[serde(with = "humantime_serde", default)]
    pub poll_interval: Option<Duration>,
}

/// Where p95 latency comes from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "source", rename_all = "lowercase", deny_unknown_fields)]
pub enum LatencySourceConfig {
    /// A fixed value.
    Static {
        /// p95 in seconds.
        value: f64,
    },
    /// An instant query against Prometheus (KEDA prometheus-scaler semantics).
    Prometheus(Box<PrometheusSourceConfig>),
}

/// `[signals.latency] source = "prometheus"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusSourceConfig {
    /// Base URL, e.g. `http://prometheus:9090`.
    pub server_address: String,
    /// Full PromQL returning one series, in seconds; overrides `metric`.
    pub query: Option<String>,
    /// Histogram metric name (without `_bucket`); the query becomes its p95 over 1 minute.
    pub metric: Option<String>,
    /// Empty / NaN / ±Inf read as 0 (true, KEDA's default) or are an error (false).
    #[serde(default = "defaults::yes")]
    pub ignore_null_values: bool,
    /// Bound on one query.
    #[serde(with = "humantime_serde", default = "defaults::source_timeout")]
    pub timeout: Duration,
    /// Bearer token (secret); exclusive with basic auth.
    pub bearer_token: Option<Secret>,
    /// Basic-auth user.
    pub basic_auth_username: Option<String>,
    /// Basic-auth password (secret).
    pub basic_auth_password: Option<Secret>,
    /// Extra request headers, e.g. `{ "X-Scope-OrgID" = "team-a" }`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Poll interval of this source (default: `signals.poll_interval`).
    #[serde(with = "humantime_serde", default)]
    pub poll_interval: Option<Duration>,
}

impl KafkaSourceConfig {
    /// The signal-layer settings.
    pub fn settings(&self) -> KafkaLagSettings {
        KafkaLagSettings {
            bootstrap_servers: self.bootstrap_servers.clone(),
            group: self.consumer_group.clone(),
            topics: self.topics.clone(),
            options: LagOptions {
                lag_threshold: self.lag_threshold,
                activation_lag_threshold: self.activation_lag_threshold,
                offset_reset_policy: self.offset_reset_policy,
                allow_idle_consumers: self.allow_idle_consumers,
                exclude_persistent_lag: self.exclude_persistent_lag,
                persistent_lag_window: self.persistent_lag_window,
                scale_to_zero_on_invalid_offset: self.scale_to_zero_on_invalid_offset,
                limit_to_partitions_with_lag: self.limit_to_partitions_with_lag,
                partition_limitation: self.partition_limitation.clone(),
            },
            security: KafkaSecurity {
                protocol: self.security_protocol.clone(),
                sasl_mechanism: self.sasl_mechanism.clone(),
                sasl_username: self.sasl_username.clone(),
                sasl_password: self.sasl_password.clone(),
                ssl_ca_file: self.ssl_ca_file.clone(),
                ssl_cert_file: self.ssl_cert_file.clone(),
                ssl_key_file: self.ssl_key_file.clone(),
            },
            timeout: self.timeout,
        }
    }
}

impl PrometheusSourceConfig {
    /// The signal-layer settings.
    pub fn settings(&self) -> PrometheusSettings {
        let query = match (&self.query, &self.metric) {
            (Some(q), _) => q.clone(),
            (None, Some(m)) => default_query(m),
            (None, None) => String::new(),
        };
        let auth = match (&self.bearer_token, &self.basic_auth_username) {
            (Some(token), _) => PrometheusAuth::Bearer(token.clone()),
            (None, Some(user)) => PrometheusAuth::Basic {
                username: user.clone(),
                password: self.basic_auth_password.clone().unwrap_or_default(),
            },
            (None, None) => PrometheusAuth::None,
        };
        PrometheusSettings {
            server_address: self.server_address.clone(),
            query,
            ignore_null_values: self.ignore_null_values,
            timeout: self.timeout,
            auth,
            headers: self.headers.clone(),
        }
    }
}

/// RunPod API access.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunPodConfig {
    /// API key; the `RUNPOD_API_KEY` environment variable takes precedence.
    pub api_key: Option<Secret>,
    /// REST base URL (paths start with `/v2`); `RUNPOD_API_URL` takes precedence.
    pub api_url: String,
    /// GraphQL endpoint; `RUNPOD_GRAPHQL_URL` takes precedence.
    pub graphql_url: String,
    /// Every pod this autoscaler creates is named with this prefix.
    pub name_prefix: String,
    /// Value of the `RPA_OWNER` env var on our pods (e.g. the cluster name); with the prefix,
    /// it decides which pods are ours.
    pub owner: String,
    /// Per-request timeout.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// One overall deadline per provider call (retries, waits and nested calls included).
    #[serde(with = "humantime_serde")]
    pub call_deadline: Duration,
}

impl Default for RunPodConfig {
    fn default() -> Self {
        RunPodConfig {
            api_key: None,
            api_url: "https://api.runpod.io".into(),
            graphql_url: "https://api.runpod.io/graphql".into(),
            name_prefix: "rpa-".into(),
            owner: "runpod-autoscaler".into(),
            // RunPod answers within a few seconds; 30 s bounds a hung call.
            request_timeout: Duration::from_secs(30),
            // A create with its ambiguous-create lookup window (~8 s) and retries fits; a tick
            // never waits on one call longer than a minute.
            call_deadline: Duration::from_secs(60),
        }
    }
}

impl RunPodConfig {
    /// Applies `RUNPOD_API_KEY`, `RUNPOD_API_URL` and `RUNPOD_GRAPHQL_URL` when set and non-empty.
    pub fn apply_env(&mut self) {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(key) = var("RUNPOD_API_KEY") {
            self.api_key = Some(Secret::new(key));
        }
        if let Some(url) = var("RUNPOD_API_URL") {
            self.api_url = url;
        }
        if let Some(url) = var("RUNPOD_GRAPHQL_URL") {
            self.graphql_url = url;
        }
    }

    /// Reads only the `[runpod]` table of a configuration file (for the `gpus` and `pods`
    /// commands, which need no policy), then applies the environment.
    pub fn load_section(path: Option<&Path>) -> Result<RunPodConfig, ConfigError> {
        #[derive(Deserialize)]
        struct Only {
            #[serde(default)]
            runpod: RunPodConfig,
        }
        let mut c = match path {
            None => RunPodConfig::default(),
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::Parse(format!(
                        "config file {} not found",
                        path.display()
                    )));
                }
                Figment::new()
                    .merge(Toml::file_exact(path))
                    .extract::<Only>()
                    .map_err(|e| ConfigError::Parse(describe_figment(e)))?
                    .runpod
            }
        };
        c.apply_env();
        Ok(c)
    }
}

impl ReconcileConfig {
    /// Reads only the `[reconcile]` table of a configuration file (and its environment
    /// overrides), for the `pods` commands.
    pub fn load_section(path: &Path) -> Result<ReconcileConfig, ConfigError> {
        #[derive(Deserialize)]
        struct Only {
            #[serde(default)]
            reconcile: ReconcileConfig,
        }
        if !path.exists() {
            return Err(ConfigError::Parse(format!(
                "config file {} not found",
                path.display()
            )));
        }
        Figment::new()
            .merge(Toml::file_exact(path))
            .merge(
                Env::prefixed(ENV_PREFIX)
                    .split("__")
                    .lowercase(true)
                    .only(&["reconcile.state_dir"]),
            )
            .extract::<Only>()
            .map(|o| o.reconcile)
            .map_err(|e| ConfigError::Parse(describe_figment(e)))
    }
}

mod defaults {
    use super::*;
    pub fn kind() -> PolicyKind {
        PolicyKind::Target
    }
    pub fn one() -> u32 {
        1
    }
    /// Small enough that a bad signal cannot buy a fleet in one tick.
    pub fn max_launches_per_tick() -> u32 {
        5
    }
    pub fn lag_per_gpu() -> f64 {
        100.0
    }
    pub fn slo_p95() -> Duration {
        Duration::from_secs(30)
    }
    /// HPA's default scale-down stabilization.
    pub fn stabilization() -> Duration {
        Duration::from_secs(300)
    }
    /// RunPod bills per second; five idle minutes cost less than a cold start after a lull.
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(300)
    }
    /// Image pull plus node join usually completes within three minutes.
    pub fn warmup_grace() -> Duration {
        Duration::from_secs(180)
    }
    /// RunPod provisioning (image pull) usually takes a few minutes; other tools give up after
    /// 10 to 20. Ten minutes replaces a stuck pod without giving up on a slow pull too early.
    pub fn boot_deadline() -> Duration {
        Duration::from_secs(600)
    }
    pub fn stale_after_intervals() -> u32 {
        3
    }
    pub fn poll_interval() -> Duration {
        Duration::from_secs(5)
    }
    /// KEDA's kafka-scaler default.
    pub fn lag_threshold() -> i64 {
        10
    }
    /// See [`DEFAULT_PERSISTENT_LAG_WINDOW`] for why two minutes.
    pub fn persistent_lag_window() -> Duration {
        DEFAULT_PERSISTENT_LAG_WINDOW
    }
    pub fn yes() -> bool {
        true
    }
    /// Below the default 5 s poll interval, so a stuck backend is noticed within one poll;
    /// well above a healthy loopback or in-cluster answer (milliseconds).
    pub fn source_timeout() -> Duration {
        Duration::from_secs(3)
    }
}

impl Config {
    /// Reads `path`, applies environment overrides from `env` (pairs of name and value), and
    /// validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Parse(format!(
                "config file {} not found; pass an existing TOML file (see examples/static.toml)",
                path.display()
            )));
        }
        let mut config: Config = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed(ENV_PREFIX).split("__").lowercase(true))
            .extract()
            .map_err(|e| ConfigError::Parse(describe_figment(e)))?;
        config.runpod.apply_env();
        let dir = path.parent().unwrap_or(Path::new("."));
        config.baseline.resolve(dir)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no environment), then validates. For tests and `check-config` input.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = Figment::new()
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Parse(describe_figment(e)))?;
        config.baseline.resolve(Path::new("."))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and consistency; every error names the key and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.policy;
        let invalid = |key, problem: String, fix| Err(ConfigError::Invalid { key, problem, fix });
        if p.min_pods > p.max_pods {
            return invalid(
                "policy.min_pods",
                format!("{} is above policy.max_pods {}", p.min_pods, p.max_pods),
                "lower policy.min_pods or raise policy.max_pods",
            );
        }
        if !(p.max_usd_per_hour.is_finite() && p.max_usd_per_hour >= 0.0) {
            return invalid(
                "policy.max_usd_per_hour",
                format!("{} is not a non-negative amount", p.max_usd_per_hour),
                "set the hourly RunPod budget in USD, e.g. 10.0",
            );
        }
        if !(p.pod_usd_per_hour.is_finite() && p.pod_usd_per_hour > 0.0) {
            return invalid(
                "policy.pod_usd_per_hour",
                format!("{} is not a positive price", p.pod_usd_per_hour),
                "set the expected hourly price of one pod, e.g. 0.26 for an RTX A5000",
            );
        }
        if p.min_pods > 0 && f64::from(p.min_pods) * p.pod_usd_per_hour > p.max_usd_per_hour {
            return invalid(
                "policy.min_pods",
                format!(
                    "{} pods at {}/h exceed policy.max_usd_per_hour {}",
                    p.min_pods, p.pod_usd_per_hour, p.max_usd_per_hour
                ),
                "lower policy.min_pods or raise policy.max_usd_per_hour",
            );
        }
        if p.gpu_type.trim().is_empty() {
            return invalid(
                "policy.gpu_type",
                "is empty".into(),
                "set a RunPod GPU type id, e.g. \"NVIDIA RTX A5000\"",
            );
        }
        if p.gpus_per_pod == 0 {
            return invalid("policy.gpus_per_pod", "is 0".into(), "set 1 or more");
        }
        if p.max_launches_per_tick == 0 && p.max_pods > 0 {
            return invalid(
                "policy.max_launches_per_tick",
                "is 0, so no pod could ever start".into(),
                "set 1 or more",
            );
        }
        if !(p.lag_per_gpu.is_finite() && p.lag_per_gpu > 0.0) {
            return invalid(
                "policy.lag_per_gpu",
                format!("{} is not a positive number", p.lag_per_gpu),
                "set the queue lag one GPU worker absorbs, e.g. 100",
            );
        }
        if p.slo_p95.is_zero() {
            return invalid(
                "policy.slo_p95",
                "is 0".into(),
                "set a latency objective, e.g. \"30s\"",
            );
        }
        if p.boot_deadline.is_zero() {
            return invalid(
                "policy.boot_deadline",
                "is 0, so every new pod would count as failed".into(),
                "set how long a pod may take to become ready, e.g. \"10m\"",
            );
        }
        if p.stale_after_intervals == 0 {
            return invalid(
                "policy.stale_after_intervals",
                "is 0, so every signal would be stale".into(),
                "set 2 or more (3 is a good default)",
            );
        }
        if self.service.tick_interval.is_zero() {
            return invalid("service.tick_interval", "is 0".into(), "set e.g. \"5s\"");
        }
        if self.signals.poll_interval.is_zero() {
            return invalid("signals.poll_interval", "is 0".into(), "set e.g. \"5s\"");
        }
        match &self.signals.queue {
            QueueSourceConfig::Static { value } if !(value.is_finite() && *value >= 0.0) => {
                return invalid(
                    "signals.queue.value",
                    format!("{value} is not a non-negative number"),
                    "set the fixed queue depth, e.g. 700",
                );
            }
            QueueSourceConfig::Static { .. } => {}
            QueueSourceConfig::Kafka(k) => {
                validate_kafka(k)?;
                timeout_within_poll(
                    SourceKeys::QUEUE,
                    k.timeout,
                    k.poll_interval,
                    self.signals.poll_interval,
                )?;
            }
        }
        match &self.signals.latency {
            Some(LatencySourceConfig::Static { value })
                if !(value.is_finite() && *value >= 0.0) =>
            {
                return invalid(
                    "signals.latency.value",
                    format!("{value} is not a non-negative number of seconds"),
                    "set the fixed p95 in seconds, e.g. 1.5",
                );
            }
            Some(LatencySourceConfig::Prometheus(p)) => {
                validate_prometheus(p)?;
                timeout_within_poll(
                    SourceKeys::LATENCY,
                    p.timeout,
                    p.poll_interval,
                    self.signals.poll_interval,
                )?;
            }
            _ => {}
        }
        if self.runpod.name_prefix.trim().is_empty() {
            return invalid(
                "runpod.name_prefix",
                "is empty, so every pod of the account would look like ours".into(),
                "set a distinctive prefix, e.g. \"rpa-\"",
            );
        }
        if self.runpod.owner.trim().is_empty() {
            return invalid(
                "runpod.owner",
                "is empty".into(),
                "set an owner id, e.g. the cluster name",
            );
        }
        if self.runpod.request_timeout.is_zero() {
            return invalid("runpod.request_timeout", "is 0".into(), "set e.g. \"30s\"");
        }
        if self.runpod.call_deadline.is_zero() {
            return invalid("runpod.call_deadline", "is 0".into(), "set e.g. \"60s\"");
        }
        reconcile::validate(
            &self.reconcile,
            &self.join,
            &self.offers,
            self.runpod.api_key.as_ref().is_some_and(|k| !k.is_empty()),
        )?;
        if let Some(c) = &self.checkpoint {
            c.validate()?;
        }
        if let Some(tls) = &self.service.tls {
            for (key, path) in [
                ("service.tls.cert_file", Some(&tls.cert_file)),
                ("service.tls.key_file", Some(&tls.key_file)),
                ("service.tls.client_ca_file", tls.client_ca_file.as_ref()),
            ] {
                if let Some(path) = path {
                    if !path.is_file() {
                        return invalid(
                            key,
                            format!("{} is not a readable file", path.display()),
                            "point it at a PEM file, or remove [service.tls]",
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The planner policy this configuration describes.
    pub fn planner_policy(&self) -> Policy {
        let p = &self.policy;
        Policy {
            kind: p.kind,
            min_pods: p.min_pods,
            max_pods: p.max_pods,
            max_usd_per_hour: Usd(p.max_usd_per_hour),
            max_launches_per_tick: p.max_launches_per_tick,
            pod: PodTemplate {
                gpu_type: GpuTypeId(p.gpu_type.clone()),
                gpus: p.gpus_per_pod,
                usd_per_hour: Usd(p.pod_usd_per_hour),
            },
            lag_per_gpu: p.lag_per_gpu,
            slo_p95_seconds: p.slo_p95.as_secs_f64(),
            latency_step_gpus: p.latency_step_gpus,
            scale_down_stabilization: p.scale_down_stabilization,
            idle_timeout: p.idle_timeout,
            warmup_grace: p.warmup_grace,
            boot_deadline: p.boot_deadline,
            stale_after_intervals: p.stale_after_intervals,
        }
    }
}

/// The keys of one source's `timeout` rule, with the fix for each place its poll interval
/// comes from (its own key or `signals.poll_interval`).
struct SourceKeys {
    timeout: &'static str,
    fix_own: &'static str,
    fix_inherited: &'static str,
    own_poll: &'static str,
}

impl SourceKeys {
    const QUEUE: SourceKeys = SourceKeys {
        timeout: "signals.queue.timeout",
        own_poll: "signals.queue.poll_interval",
        fix_own: "lower signals.queue.timeout to at most signals.queue.poll_interval, or raise \
                  signals.queue.poll_interval",
        fix_inherited: "lower signals.queue.timeout to at most signals.poll_interval, or set a \
                        longer signals.queue.poll_interval",
    };
    const LATENCY: SourceKeys = SourceKeys {
        timeout: "signals.latency.timeout",
        own_poll: "signals.latency.poll_interval",
        fix_own: "lower signals.latency.timeout to at most signals.latency.poll_interval, or \
                  raise signals.latency.poll_interval",
        fix_inherited: "lower signals.latency.timeout to at most signals.poll_interval, or set \
                        a longer signals.latency.poll_interval",
    };
}

/// A poll that may outlast its interval runs into the next one: the source is polled less
/// often than configured, and its samples age past the staleness bound while a slow backend
/// is still "within its timeout". So a source's timeout must fit in its effective interval.
fn timeout_within_poll(
    keys: SourceKeys,
    timeout: Duration,
    own_poll: Option<Duration>,
    default_poll: Duration,
) -> Result<(), ConfigError> {
    let (poll, poll_key, fix) = match own_poll {
        Some(p) => (p, keys.own_poll, keys.fix_own),
        None => (default_poll, "signals.poll_interval", keys.fix_inherited),
    };
    if timeout > poll {
        return Err(ConfigError::Invalid {
            key: keys.timeout,
            problem: format!(
                "{} is longer than {poll_key} {}, so one poll could run into the next",
                humantime::format_duration(timeout),
                humantime::format_duration(poll)
            ),
            fix,
        });
    }
    Ok(())
}

fn validate_kafka(k: &KafkaSourceConfig) -> Result<(), ConfigError> {
    k.settings().validate().map_err(|e| ConfigError::Invalid {
        key: e.setting.config_key(),
        problem: e.problem,
        fix: e.fix,
    })?;
    if k.poll_interval.is_some_and(|d| d.is_zero()) {
        return Err(ConfigError::Invalid {
            key: "signals.queue.poll_interval",
            problem: "is 0".into(),
            fix: "set e.g. \"5s\"",
        });
    }
    Ok(())
}

fn validate_prometheus(p: &PrometheusSourceConfig) -> Result<(), ConfigError> {
    let invalid = |key, problem: String, fix| Err(ConfigError::Invalid { key, problem, fix });
    let addr = p.server_address.trim();
    if !(addr.starts_with("http://") || addr.starts_with("https://")) {
        return invalid(
            "signals.latency.server_address",
            format!("{addr:?} is not an http(s) URL"),
            "set e.g. \"http://prometheus.monitoring:9090\"",
        );
    }
    match (&p.query, &p.metric) {
        (Some(q), _) if q.trim().is_empty() => {
            return invalid(
                "signals.latency.query",
                "is empty".into(),
                "set a PromQL expression returning one series, or use metric",
            );
        }
        (None, Some(m)) if m.trim().is_empty() => {
            return invalid(
                "signals.latency.metric",
                "is empty".into(),
                "set the histogram metric name without _bucket, e.g. \"job_duration_seconds\"",
            );
        }
        (None, None) => {
            return invalid(
                "signals.latency.query",
                "neither query nor metric is set".into(),
                "set metric (a histogram name) or query (full PromQL)",
            );
        }
        _ => {}
    }
    if p.bearer_token.is_some() && p.basic_auth_username.is_some() {
        return invalid(
            "signals.latency.bearer_token",
            "is set together with basic_auth_username".into(),
            "use either a bearer token or basic auth, not both",
        );
    }
    if p.basic_auth_password.is_some() && p.basic_auth_username.is_none() {
        return invalid(
            "signals.latency.basic_auth_username",
            "is missing while basic_auth_password is set".into(),
            "set the basic-auth user name",
        );
    }
    if p.timeout.is_zero() {
        return invalid("signals.latency.timeout", "is 0".into(), "set e.g. \"3s\"");
    }
    if p.poll_interval.is_some_and(|d| d.is_zero()) {
        return invalid(
            "signals.latency.poll_interval",
            "is 0".into(),
            "set e.g. \"5s\"",
        );
    }
    Ok(())
}

/// Parses TOML text into any configuration type (unknown keys rejected by its serde attributes),
/// with figment's key-naming error messages. For configuration files other than [`Config`].
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    Figment::new()
        .merge(Toml::string(text))
        .extract()
        .map_err(|e| ConfigError::Parse(describe_figment(e)))
}

/// Figment's message, minus its profile prefix, so keys read as they are written in the file.
fn describe_figment(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| e.to_string().replace("default.", ""))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [policy]
        max_pods = 4
        max_usd_per_hour = 3.0
        gpu_type = "NVIDIA RTX A5000"
        pod_usd_per_hour = 0.26
        [signals.queue]
        source = "static"
        value = 700
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.policy.kind, PolicyKind::Target);
        assert_eq!(c.service.tick_interval, Duration::from_secs(5));
        assert_eq!(c.policy.lag_per_gpu, 100.0);
        assert!(c.signals.latency.is_none());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                MINIMAL.replace("max_pods = 4", "max_pods = \"four\""),
                "policy.max_pods",
            ),
            (
                MINIMAL.replace("max_pods = 4", "max_pods = 4\nmax_podz = 1"),
                "max_podz",
            ),
            (format!("{MINIMAL}\nmin_pods = 9"), "signals.queue"),
            (
                MINIMAL.replace("value = 700", "value = -1"),
                "signals.queue.value",
            ),
            (
                MINIMAL.replace("pod_usd_per_hour = 0.26", "pod_usd_per_hour = 0"),
                "policy.pod_usd_per_hour",
            ),
            (
                MINIMAL.replace("source = \"static\"", "source = \"kafkaa\""),
                "kafkaa",
            ),
            (
                MINIMAL.replace("max_pods = 4", "max_pods = 4\nmin_pods = 5"),
                "policy.min_pods",
            ),
            (
                MINIMAL.replace("max_pods = 4", "max_pods = 4\nslo_p95 = \"soon\""),
                "policy.slo_p95",
            ),
            (
                format!("{MINIMAL}\n[runpod]\nname_prefix = \"\""),
                "runpod.name_prefix",
            ),
            (
                format!("{MINIMAL}\n[runpod]\nrequest_timeout = \"0s\""),
                "runpod.request_timeout",
            ),
            (
                format!("{MINIMAL}\n[runpod]\ncall_deadline = \"0s\""),
                "runpod.call_deadline",
            ),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(key), "expected {key:?} in: {err}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("rpa_SUPERSECRET");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        let c = Config::from_toml(&format!(
            "{MINIMAL}\n[runpod]\napi_key = \"rpa_SUPERSECRET\""
        ))
        .unwrap();
        assert!(!format!("{c:?}").contains("SUPERSECRET"));
        assert!(!serde_json::to_string(&c).unwrap().contains("SUPERSECRET"));
        assert_eq!(c.runpod.api_key.unwrap().expose(), "rpa_SUPERSECRET");
    }

    const KAFKA_PROM: &str = r#"
        [policy]
        max_pods = 4
        max_usd_per_hour = 3.0
        gpu_type = "NVIDIA RTX A5000"
        pod_usd_per_hour = 0.26
        [signals]
        poll_interval = "7s"
        [signals.queue]
        source = "kafka"
        bootstrap_servers = "k1:9092,k2:9092"
        consumer_group = "workers"
        topics = ["jobs"]
        lag_threshold = 50
        offset_reset_policy = "earliest"
        partition_limitation = [0, 1]
        security_protocol = "sasl_plaintext"
        sasl_mechanism = "PLAIN"
        sasl_username = "svc"
        sasl_password = "hunter2"
        [signals.latency]
        source = "prometheus"
        server_address = "http://prom:9090"
        metric = "job_latency_seconds"
        bearer_token = "tok-123"
        headers = { "X-Scope-OrgID" = "team-a" }
        poll_interval = "2s"
        timeout = "2s"
    "#;

    #[test]
    fn kafka_and_prometheus_sources_parse_with_defaults() {
        let c = Config::from_toml(KAFKA_PROM).unwrap();
        let QueueSourceConfig::Kafka(k) = &c.signals.queue else {
            panic!("kafka expected")
        };
        let s = k.settings();
        assert_eq!(s.options.lag_threshold, 50);
        assert_eq!(s.options.offset_reset_policy, OffsetResetPolicy::Earliest);
        assert_eq!(s.timeout, Duration::from_secs(3));
        assert_eq!(k.poll_interval, None);
        assert_eq!(s.options.persistent_lag_window, Duration::from_secs(120));
        let Some(LatencySourceConfig::Prometheus(p)) = &c.signals.latency else {
            panic!("prometheus expected")
        };
        let ps = p.settings();
        assert_eq!(
            ps.query,
            "histogram_quantile(0.95, sum(rate(job_latency_seconds_bucket[1m])) by (le))"
        );
        assert!(ps.ignore_null_values);
        assert_eq!(p.poll_interval, Some(Duration::from_secs(2)));
        // Secrets never print.
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok-123"),
            "{shown}"
        );
    }

    #[test]
    fn kafka_and_prometheus_errors_name_the_key() {
        let cases = [
            (
                "lag_threshold = 50",
                "lag_threshold = 0",
                "signals.queue.lag_threshold",
            ),
            (
                "consumer_group = \"workers\"",
                "consumer_group = \"\"",
                "signals.queue.consumer_group",
            ),
            (
                "bootstrap_servers = \"k1:9092,k2:9092\"",
                "bootstrap_servers = \" \"",
                "signals.queue.bootstrap_servers",
            ),
            (
                "topics = [\"jobs\"]",
                "topics = [\"a\", \"b\"]",
                "signals.queue.partition_limitation",
            ),
            (
                "offset_reset_policy = \"earliest\"",
                "offset_reset_policy = \"newest\"",
                "newest",
            ),
            (
                "lag_threshold = 50",
                "lag_threshold = 50\npersistent_lag_window = \"0s\"",
                "signals.queue.persistent_lag_window",
            ),
            (
                "lag_threshold = 50",
                "lag_threshold = 50\npersistent_lag_window = \"soon\"",
                "\"soon\", expected a duration",
            ),
            (
                "lag_threshold = 50",
                "lag_threshold = 50\nlag_treshold = 5",
                "lag_treshold",
            ),
            (
                "server_address = \"http://prom:9090\"",
                "server_address = \"prom:9090\"",
                "signals.latency.server_address",
            ),
            (
                "metric = \"job_latency_seconds\"",
                "",
                "signals.latency.query",
            ),
            (
                "bearer_token = \"tok-123\"",
                "bearer_token = \"t\"\nbasic_auth_username = \"u\"",
                "signals.latency.bearer_token",
            ),
            (
                "poll_interval = \"2s\"",
                "poll_interval = \"0s\"",
                "signals.latency.poll_interval",
            ),
        ];
        for (from, to, key) in cases {
            let text = KAFKA_PROM.replacen(from, to, 1);
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(key), "expected {key:?} in: {err}");
        }
    }

    #[test]
    fn a_source_timeout_longer_than_its_poll_interval_is_rejected() {
        // KAFKA_PROM: signals.poll_interval 7s; kafka polls at that with the default 3s
        // timeout; prometheus polls every 2s (its own) with a 2s timeout.
        Config::from_toml(KAFKA_PROM).unwrap();
        let prometheus_own_poll = "poll_interval = \"2s\"";
        // (replacements in the fixture, keys the error must name)
        type Case = (Vec<(&'static str, &'static str)>, [&'static str; 2]);
        let cases: [Case; 4] = [
            (
                vec![(
                    "lag_threshold = 50",
                    "lag_threshold = 50\ntimeout = \"2s\"\npoll_interval = \"1s\"",
                )],
                ["signals.queue.timeout", "signals.queue.poll_interval"],
            ),
            (
                vec![(
                    "lag_threshold = 50",
                    "lag_threshold = 50\ntimeout = \"10s\"",
                )],
                ["signals.queue.timeout", "signals.poll_interval"],
            ),
            (
                vec![("timeout = \"2s\"", "timeout = \"2500ms\"")],
                ["signals.latency.timeout", "signals.latency.poll_interval"],
            ),
            (
                vec![
                    (prometheus_own_poll, ""),
                    ("timeout = \"2s\"", "timeout = \"8s\""),
                ],
                ["signals.latency.timeout", "signals.poll_interval"],
            ),
        ];
        for (replacements, keys) in cases {
            let mut text = KAFKA_PROM.to_owned();
            for (from, to) in replacements {
                assert!(text.contains(from), "{from:?} not in the fixture");
                text = text.replacen(from, to, 1);
            }
            let err = Config::from_toml(&text).unwrap_err().to_string();
            for key in keys {
                assert!(err.contains(key), "expected {key:?} in: {err}");
            }
            assert!(err.contains("lower"), "the fix is missing: {err}");
        }
        // A timeout equal to the poll interval is fine: one poll ends before the next starts.
        let equal = KAFKA_PROM.replacen(
            "lag_threshold = 50",
            "lag_threshold = 50\ntimeout = \"1s\"\npoll_interval = \"1s\"",
            1,
        );
        Config::from_toml(&equal).unwrap();
    }

    #[test]
    fn the_local_example_is_valid() {
        Config::from_toml(include_str!("../../examples/local.toml")).unwrap();
    }
}
