//! The one configuration: a TOML file, overridden by `RUNPOD_AUTOSCALER__SECTION__KEY`
//! environment variables, overridden by command-line flags (applied in `main`). Unknown keys are
//! rejected; [`Config::validate`] names the key and the fix for every problem. Secrets are held
//! in [`Secret`], which never prints its value.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::decide::{PodTemplate, Policy, PolicyKind};
use crate::model::{GpuTypeId, Usd};

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

/// A secret string (API key, private key, credential). Debug and Display print `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
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

/// The local baseline (OpenStack GPU servers made by Terraform).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselineConfig {
    /// GPU workers the baseline provides; counted before any RunPod pod.
    pub gpus: u32,
}

/// Scaling policy and hard limits (see the README's configuration reference).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `target` (default) or `seed`.
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
    pub fn stale_after_intervals() -> u32 {
        3
    }
    pub fn poll_interval() -> Duration {
        Duration::from_secs(5)
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
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no environment), then validates. For tests and `check-config` input.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = Figment::new()
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Parse(describe_figment(e)))?;
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
            stale_after_intervals: p.stale_after_intervals,
        }
    }
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
}
