//! Kafka consumer-group lag with the semantics of KEDA's `kafka` scaler.
//!
//! Two halves: [`compute_lag`] is the pure arithmetic (committed offsets + watermarks + since
//! when each commit has not moved + the time now + options → per-partition lag, capped metric,
//! activation), and [`KafkaLagSource`] is the rdkafka I/O around it. With topics configured, one
//! poll issues one OffsetFetch for their partitions and one batched ListOffsets (latest)
//! concurrently with it; with none, one OffsetFetch lists the group's own commits (librdkafka's
//! ListConsumerGroupOffsets), then one batched ListOffsets covers the partitions of the topics
//! it committed on, and no other topic of the cluster is touched. A batched ListOffsets
//! (earliest) is added only when the earliest reset policy needs log starts. Topic metadata is
//! read per topic and cached for [`METADATA_REFRESH`]. rdkafka is imported by this module only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::bindings as rd;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;
use tracing::{debug, debug_span, info_span, warn, Instrument};

use super::source::{SignalError, SignalSource};
use crate::clock::Clock;
use crate::model::{Reading, Secret, SignalKind, Timestamp};

const BACKEND: &str = "kafka";

/// How long the topic → partitions map is reused before it is fetched again. Partitions are
/// added rarely (an operator action); 30 s bounds how long a new partition goes unseen while
/// saving one Metadata round trip on almost every poll.
pub const METADATA_REFRESH: Duration = Duration::from_secs(30);

/// librdkafka queues its logs and error events for the client to serve; the source never
/// consumes messages, so it serves them after every poll, at most this many at a time. A few
/// arrive per second at most (more with `debug=protocol`: a few per request), so 4096 per poll
/// keeps the queue empty without letting a flood stall a poll.
const MAX_EVENTS_SERVED_PER_POLL: usize = 4096;

/// How long a partition's committed offset must stay put, with lag behind it, before
/// `excludePersistentLag` counts that lag as stuck. A worker commits when a job ends, so one
/// busy on a long job looks stuck to KEDA's rule (no commit since the previous poll) at any poll
/// interval shorter than the job. Two minutes is many times a typical job here (the
/// simulator's reference workload serves 4 jobs per GPU per minute) and still well inside the
/// HPA's default 5-minute scale-down stabilization, so a truly stuck partition stops driving
/// scale-up before it could hold replicas for a whole stabilization window.
pub const DEFAULT_PERSISTENT_LAG_WINDOW: Duration = Duration::from_secs(120);

/// What a partition without a committed offset counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetResetPolicy {
    /// The consumer would start at the end: the partition counts 1 (KEDA's rule).
    #[default]
    Latest,
    /// The consumer would start at the beginning: the partition counts log-end − log-start.
    Earliest,
}

/// KEDA's kafka scaler options that shape the lag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LagOptions {
    /// Target lag per replica (`lagThreshold`, > 0).
    pub lag_threshold: i64,
    /// Active iff lag (persistent lag included) > this (`activationLagThreshold`, ≥ 0).
    pub activation_lag_threshold: i64,
    /// What a partition without a commit counts as.
    pub offset_reset_policy: OffsetResetPolicy,
    /// When false, the total is capped at partitions × `lag_threshold`.
    pub allow_idle_consumers: bool,
    /// A partition with lag whose commit has not moved for `persistent_lag_window` counts 0
    /// for scaling (still counted for activation).
    pub exclude_persistent_lag: bool,
    /// How long a commit must stay put before its lag is persistent (> 0).
    pub persistent_lag_window: Duration,
    /// Partitions without a commit count 0.
    pub scale_to_zero_on_invalid_offset: bool,
    /// Cap at partitions-with-lag × `lag_threshold` instead of all partitions.
    pub limit_to_partitions_with_lag: bool,
    /// Only these partition ids count (empty = all).
    pub partition_limitation: Vec<i32>,
}

impl Default for LagOptions {
    fn default() -> Self {
        LagOptions {
            // KEDA's defaults.
            lag_threshold: 10,
            activation_lag_threshold: 0,
            offset_reset_policy: OffsetResetPolicy::Latest,
            allow_idle_consumers: false,
            exclude_persistent_lag: false,
            persistent_lag_window: DEFAULT_PERSISTENT_LAG_WINDOW,
            scale_to_zero_on_invalid_offset: false,
            limit_to_partitions_with_lag: false,
            partition_limitation: Vec::new(),
        }
    }
}

/// The offsets of one partition as read from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffsets {
    /// Topic name.
    pub topic: String,
    /// Partition id.
    pub partition: i32,
    /// The group's committed offset; `None` when the group never committed here.
    pub committed: Option<i64>,
    /// Log start (low watermark); only needed for the earliest policy.
    pub log_start: Option<i64>,
    /// Log end (high watermark).
    pub log_end: i64,
}

/// Lag of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    /// Topic name.
    pub topic: String,
    /// Partition id.
    pub partition: i32,
    /// Lag counted for scaling (0 when excluded as persistent).
    pub lag: i64,
    /// Lag counted for activation (persistent lag included).
    pub lag_with_persistent: i64,
}

/// The result of one lag computation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LagReport {
    /// Per-partition lag, sorted by topic and partition.
    pub partitions: Vec<PartitionLag>,
    /// Σ lag before the cap.
    pub total_lag: i64,
    /// Σ lag with persistent lag included (drives activation).
    pub total_lag_with_persistent: i64,
    /// The value KEDA serves: total lag, capped unless idle consumers are allowed.
    pub metric: i64,
    /// KEDA's `IsActive`: `total_lag_with_persistent > activation_lag_threshold`.
    pub active: bool,
}

impl LagReport {
    /// What the planner reads: the whole lag (never KEDA's `lagThreshold` cap, which only
    /// shapes the HPA metric; persistent lag excluded and uncommitted partitions counted as the
    /// options say), with the most consumers that lag can keep busy: one per partition that
    /// counts (only partitions with lag under `limit_to_partitions_with_lag`), no limit under
    /// `allow_idle_consumers`.
    pub fn planner_reading(&self, options: &LagOptions) -> Reading {
        let partitions = if options.limit_to_partitions_with_lag {
            self.partitions.iter().filter(|p| p.lag > 0).count()
        } else {
            self.partitions.len()
        };
        let max_workers = (!options.allow_idle_consumers || options.limit_to_partitions_with_lag)
            .then(|| u32::try_from(partitions).unwrap_or(u32::MAX));
        Reading {
            // i64 → f64 loses precision only above 2^53 messages.
            value: self.total_lag.max(0) as f64,
            max_workers,
        }
    }
}

/// A partition's committed offset as last seen, and since when it has not moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitSeen {
    /// The committed offset.
    pub offset: i64,
    /// When this offset was first seen (the commit has not moved since).
    pub since: Timestamp,
}

/// What `excludePersistentLag` remembers between polls, per (topic, partition).
pub type CommitHistory = HashMap<(String, i32), CommitSeen>;

/// KEDA's kafka-scaler lag arithmetic. Pure: given the offsets read `now`, what was remembered
/// of each commit (offset and since when unchanged) and the options, returns the report and the
/// history to remember for the next poll. A partition's lag is persistent once its commit has
/// not moved for `persistent_lag_window`; a commit seen for the first time is taken as moving
/// now. Negative differences (a commit past a stale watermark) count 0.
pub fn compute_lag(
    offsets: &[PartitionOffsets],
    history: &CommitHistory,
    options: &LagOptions,
    now: Timestamp,
) -> (LagReport, CommitHistory) {
    let mut next = CommitHistory::new();
    let mut partitions = Vec::with_capacity(offsets.len());
    let (mut total, mut total_persistent, mut counted, mut with_lag) = (0i64, 0i64, 0i64, 0i64);
    let mut sorted: Vec<&PartitionOffsets> = offsets
        .iter()
        .filter(|p| {
            options.partition_limitation.is_empty()
                || options.partition_limitation.contains(&p.partition)
        })
        .collect();
    sorted.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    for p in sorted {
        let (lag, lag_with_persistent) = match p.committed {
            None => {
                let v = if options.scale_to_zero_on_invalid_offset {
                    0
                } else {
                    match options.offset_reset_policy {
                        OffsetResetPolicy::Latest => 1,
                        OffsetResetPolicy::Earliest => {
                            p.log_end.saturating_sub(p.log_start.unwrap_or(0)).max(0)
                        }
                    }
                };
                (v, v)
            }
            Some(committed) => {
                let lag = p.log_end.saturating_sub(committed).max(0);
                let mut persistent = false;
                if options.exclude_persistent_lag {
                    let key = (p.topic.clone(), p.partition);
                    let since = match history.get(&key) {
                        Some(seen) if seen.offset == committed => seen.since,
                        _ => now,
                    };
                    persistent =
                        lag > 0 && now.saturating_since(since) >= options.persistent_lag_window;
                    next.insert(
                        key,
                        CommitSeen {
                            offset: committed,
                            since,
                        },
                    );
                }
                if persistent {
                    (0, lag)
                } else {
                    (lag, lag)
                }
            }
        };
        total = total.saturating_add(lag);
        total_persistent = total_persistent.saturating_add(lag_with_persistent);
        counted += 1;
        if lag > 0 {
            with_lag += 1;
        }
        partitions.push(PartitionLag {
            topic: p.topic.clone(),
            partition: p.partition,
            lag,
            lag_with_persistent,
        });
    }
    let mut metric = total;
    if !options.allow_idle_consumers || options.limit_to_partitions_with_lag {
        let upper = if options.limit_to_partitions_with_lag {
            with_lag
        } else {
            counted
        };
        let threshold = options.lag_threshold.max(1);
        // KEDA compares with integer division: total / threshold > upper.
        if total / threshold > upper {
            metric = upper.saturating_mul(threshold);
        }
    }
    let report = LagReport {
        partitions,
        total_lag: total,
        total_lag_with_persistent: total_persistent,
        metric,
        active: total_persistent > options.activation_lag_threshold,
    };
    (report, next)
}

/// Client security settings passed through to librdkafka.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaSecurity {
    /// `security.protocol`: `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: Option<String>,
    /// `sasl.mechanism`, e.g. `PLAIN` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// `sasl.username`.
    pub sasl_username: Option<String>,
    /// `sasl.password` (never logged).
    pub sasl_password: Option<Secret>,
    /// `ssl.ca.location`.
    pub ssl_ca_file: Option<PathBuf>,
    /// `ssl.certificate.location`.
    pub ssl_cert_file: Option<PathBuf>,
    /// `ssl.key.location`.
    pub ssl_key_file: Option<PathBuf>,
}

/// Everything needed to read one consumer group's lag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaLagSettings {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Consumer group whose commits are read.
    pub group: String,
    /// Topics; empty = every topic the group has commits for.
    pub topics: Vec<String>,
    /// KEDA's options.
    pub options: LagOptions,
    /// Security pass-through.
    pub security: KafkaSecurity,
    /// Bound on one whole poll.
    pub timeout: Duration,
}

/// A Kafka lag setting, with the names the configuration file and KEDA's trigger metadata use
/// for it, so that one validation ([`KafkaLagSettings::validate`]) serves both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagSetting {
    /// The broker list.
    BootstrapServers,
    /// The consumer group.
    ConsumerGroup,
    /// The topic list.
    Topics,
    /// The target lag per replica.
    LagThreshold,
    /// The activation threshold.
    ActivationLagThreshold,
    /// Cap at partitions with lag.
    LimitToPartitionsWithLag,
    /// Partition ids that count.
    PartitionLimitation,
    /// How long a commit must stay put before its lag is persistent.
    PersistentLagWindow,
    /// SASL user name.
    SaslUsername,
    /// Bound on one poll.
    Timeout,
}

impl LagSetting {
    /// The key in the configuration file.
    pub fn config_key(self) -> &'static str {
        match self {
            LagSetting::BootstrapServers => "signals.queue.bootstrap_servers",
            LagSetting::ConsumerGroup => "signals.queue.consumer_group",
            LagSetting::Topics => "signals.queue.topics",
            LagSetting::LagThreshold => "signals.queue.lag_threshold",
            LagSetting::ActivationLagThreshold => "signals.queue.activation_lag_threshold",
            LagSetting::LimitToPartitionsWithLag => "signals.queue.limit_to_partitions_with_lag",
            LagSetting::PartitionLimitation => "signals.queue.partition_limitation",
            LagSetting::PersistentLagWindow => "signals.queue.persistent_lag_window",
            LagSetting::SaslUsername => "signals.queue.sasl_username",
            LagSetting::Timeout => "signals.queue.timeout",
        }
    }

    /// The key in a KEDA `kafka` trigger's metadata.
    pub fn keda_key(self) -> &'static str {
        match self {
            LagSetting::BootstrapServers => "bootstrapServers",
            LagSetting::ConsumerGroup => "consumerGroup",
            LagSetting::Topics => "topic",
            LagSetting::LagThreshold => "lagThreshold",
            LagSetting::ActivationLagThreshold => "activationLagThreshold",
            LagSetting::LimitToPartitionsWithLag => "limitToPartitionsWithLag",
            LagSetting::PartitionLimitation => "partitionLimitation",
            LagSetting::PersistentLagWindow => "persistentLagWindow",
            LagSetting::SaslUsername => "sasl.username",
            LagSetting::Timeout => "timeout",
        }
    }
}

/// A Kafka lag setting that cannot work: which one, what is wrong, what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}; {fix}")]
pub struct InvalidLagSetting {
    /// The setting.
    pub setting: LagSetting,
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: &'static str,
}

impl KafkaLagSettings {
    /// Checks ranges and consistency (the one place for both the `[signals.queue]` table and
    /// KEDA-parity triggers).
    pub fn validate(&self) -> Result<(), InvalidLagSetting> {
        let invalid = |setting, problem: String, fix| {
            Err(InvalidLagSetting {
                setting,
                problem,
                fix,
            })
        };
        let o = &self.options;
        if self
            .bootstrap_servers
            .split(',')
            .all(|s| s.trim().is_empty())
        {
            return invalid(
                LagSetting::BootstrapServers,
                "is empty".into(),
                "set the brokers as host:port[,host:port], e.g. \"kafka:9092\"",
            );
        }
        if self.group.trim().is_empty() {
            return invalid(
                LagSetting::ConsumerGroup,
                "is empty".into(),
                "set the consumer group of the GPU workers",
            );
        }
        if self.topics.iter().any(|t| t.trim().is_empty()) {
            return invalid(
                LagSetting::Topics,
                "contains an empty name".into(),
                "list topic names, or leave it empty for every topic the group committed on",
            );
        }
        if o.lag_threshold <= 0 {
            return invalid(
                LagSetting::LagThreshold,
                format!("{} is not above zero", o.lag_threshold),
                "set the target lag per replica, e.g. 10",
            );
        }
        if o.activation_lag_threshold < 0 {
            return invalid(
                LagSetting::ActivationLagThreshold,
                format!("{} is negative", o.activation_lag_threshold),
                "set 0 or more",
            );
        }
        if o.allow_idle_consumers && o.limit_to_partitions_with_lag {
            return invalid(
                LagSetting::LimitToPartitionsWithLag,
                "is set together with allow idle consumers (KEDA rejects this too)".into(),
                "set only one of them",
            );
        }
        if o.partition_limitation.iter().any(|p| *p < 0) {
            return invalid(
                LagSetting::PartitionLimitation,
                "contains a negative partition id".into(),
                "list partition ids ≥ 0, e.g. 0, 1, 2",
            );
        }
        if !o.partition_limitation.is_empty() && self.topics.len() != 1 {
            return invalid(
                LagSetting::PartitionLimitation,
                "needs exactly one topic".into(),
                "name exactly one topic, or remove the partition limitation",
            );
        }
        if o.persistent_lag_window.is_zero() {
            return invalid(
                LagSetting::PersistentLagWindow,
                "is 0".into(),
                "set how long a commit must stay put before its lag counts as stuck, e.g. \"2m\"",
            );
        }
        if self.security.sasl_password.is_some() && self.security.sasl_username.is_none() {
            return invalid(
                LagSetting::SaslUsername,
                "is missing while a SASL password is set".into(),
                "set the SASL user name",
            );
        }
        if self.timeout.is_zero() {
            return invalid(LagSetting::Timeout, "is 0".into(), "set e.g. \"3s\"");
        }
        Ok(())
    }
}

/// Broker requests one poll issued, counted by this module (each is one round trip to one
/// broker; with topics configured the OffsetFetch and the ListOffsets go out concurrently,
/// without them the group's OffsetFetch comes first), and the partitions they covered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RequestCount {
    /// Metadata requests (one per topic whose cached partitions expired).
    pub metadata: u32,
    /// OffsetFetch requests (committed offsets; without topics, the group's whole list).
    pub offset_fetch: u32,
    /// ListOffsets requests (one per leader broker per end of the log).
    pub list_offsets: u32,
    /// Partitions whose log offsets were asked (not a request count).
    pub partitions: u32,
}

impl RequestCount {
    /// All requests.
    pub fn total(&self) -> u32 {
        self.metadata + self.offset_fetch + self.list_offsets
    }
}

/// Topic → (partition id, leader broker id) pairs.
type TopicMap = BTreeMap<String, Vec<(i32, i32)>>;

/// Committed offsets by (topic, partition); a partition without a commit is absent.
type Commits = HashMap<(String, i32), i64>;

/// librdkafka callbacks: its logs and errors go to `tracing`; when protocol debugging is on
/// (`debug=protocol`, see [`KafkaLagSource::with_request_counting`]) every request librdkafka
/// sends to a broker is counted, so round trips are measured by the library itself.
#[derive(Debug, Default)]
pub struct KafkaClientContext {
    sent: Mutex<BTreeMap<String, u64>>,
    logs: AtomicU64,
}

impl KafkaClientContext {
    /// Requests sent to brokers so far (0 unless `debug=protocol` is set on the client).
    pub fn requests_sent(&self) -> u64 {
        self.requests_by_type().values().sum()
    }

    /// Requests sent to brokers so far, by request type (e.g. `OffsetFetch`).
    pub fn requests_by_type(&self) -> BTreeMap<String, u64> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ClientContext for KafkaClientContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.logs.fetch_add(1, Ordering::Relaxed);
        // librdkafka logs "[thrd:..]: broker: Sent <Type>Request (v.., .. bytes, CorrId ..)"
        // under SEND.
        if fac == "SEND" {
            if let Some((_, rest)) = message.split_once(": Sent ") {
                let kind = rest.split("Request").next().unwrap_or(rest).to_owned();
                let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
                *sent.entry(kind).or_default() += 1;
                return;
            }
        }
        // Connection failures repeat about once a second while a broker is down and every poll
        // already reports them as a typed error, so only librdkafka's severe logs are warnings.
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                warn!(target: "librdkafka", fac, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::trace!(target: "librdkafka", fac, "{message}"),
            _ => debug!(target: "librdkafka", fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Connection errors repeat while a broker is down; the poll reports them typed.
        debug!(target: "librdkafka", %error, reason, "client error");
    }
}

impl ConsumerContext for KafkaClientContext {}

/// The consumer type every Kafka read uses.
type Client = BaseConsumer<KafkaClientContext>;

#[derive(Default)]
struct Cache {
    /// Per topic: its partitions with their leaders, and when they were read. A topic the
    /// group committed on that no longer exists is kept with no partitions.
    topics: HashMap<String, (Instant, Vec<(i32, i32)>)>,
    /// Commits and since when they have not moved (`excludePersistentLag`).
    history: CommitHistory,
}

/// Consumer-group lag from a Kafka-compatible broker. The rdkafka client is created once and
/// reused by every poll; it never joins the group (it only reads its commits).
pub struct KafkaLagSource {
    consumer: Arc<Client>,
    settings: KafkaLagSettings,
    cache: Mutex<Cache>,
    poll_interval: Option<Duration>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for KafkaLagSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLagSource")
            .field("bootstrap_servers", &self.settings.bootstrap_servers)
            .field("group", &self.settings.group)
            .field("topics", &self.settings.topics)
            .finish()
    }
}

/// The librdkafka configuration for `settings` (secrets included: never log it).
fn client_config(settings: &KafkaLagSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    // librdkafka's allowed ranges: socket.timeout.ms ≥ 10, connection setup ≥ 1000 ms. The
    // poll itself is still bounded by `settings.timeout` from the outside.
    let ms = settings.timeout.as_millis();
    let timeout_ms = ms.clamp(10, i32::MAX as u128).to_string();
    let setup_ms = ms.clamp(1000, i32::MAX as u128).to_string();
    c.set("bootstrap.servers", &settings.bootstrap_servers)
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("socket.timeout.ms", &timeout_ms)
        .set("socket.connection.setup.timeout.ms", &setup_ms)
        // Reconnect attempts to a dead broker back off to at most 1 s, so a restarted broker is
        // read again within a poll or two.
        .set("reconnect.backoff.max.ms", "1000")
        .set_log_level(RDKafkaLogLevel::Warning);
    let s = &settings.security;
    if let Some(v) = &s.protocol {
        c.set("security.protocol", v);
    }
    if let Some(v) = &s.sasl_mechanism {
        c.set("sasl.mechanism", v);
    }
    if let Some(v) = &s.sasl_username {
        c.set("sasl.username", v);
    }
    if let Some(v) = &s.sasl_password {
        c.set("sasl.password", v.expose());
    }
    for (key, path) in [
        ("ssl.ca.location", &s.ssl_ca_file),
        ("ssl.certificate.location", &s.ssl_cert_file),
        ("ssl.key.location", &s.ssl_key_file),
    ] {
        if let Some(p) = path {
            c.set(key, p.to_string_lossy());
        }
    }
    c
}

/// Maps an rdkafka error to a typed, actionable [`SignalError`]. Never includes secrets
/// (librdkafka's messages carry no credentials).
fn map_error(e: &KafkaError, settings: &KafkaLagSettings, what: &str) -> SignalError {
    use RDKafkaErrorCode as C;
    let servers = &settings.bootstrap_servers;
    let timeout_ms = u64::try_from(settings.timeout.as_millis()).unwrap_or(u64::MAX);
    match e.rdkafka_error_code() {
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition) => {
            SignalError::NotFound {
                backend: BACKEND,
                detail: format!(
                    "{what}: unknown topic or partition on {servers}; create the topic or fix \
                     its name"
                ),
            }
        }
        Some(C::GroupIdNotFound | C::InvalidGroupId) => SignalError::NotFound {
            backend: BACKEND,
            detail: format!(
                "{what}: consumer group {:?} not found on {servers}; check the group name",
                settings.group
            ),
        },
        Some(
            C::SaslAuthenticationFailed
            | C::Authentication
            | C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::ClusterAuthorizationFailed,
        ) => SignalError::Unauthorized {
            backend: BACKEND,
            detail: format!(
                "{what}: authentication or authorization failed on {servers}; check the SASL/TLS \
                 settings and the ACLs for group {:?}",
                settings.group
            ),
        },
        Some(C::OperationTimedOut | C::RequestTimedOut) => SignalError::Timeout {
            backend: BACKEND,
            timeout_ms,
        },
        Some(C::BrokerTransportFailure | C::AllBrokersDown | C::Resolve | C::NetworkException) => {
            SignalError::Unreachable {
                backend: BACKEND,
                detail: format!("{what}: cannot reach {servers}: {e}"),
            }
        }
        _ => SignalError::Unreachable {
            backend: BACKEND,
            detail: format!("{what}: {servers}: {e}; check that the brokers are up and reachable"),
        },
    }
}

impl KafkaLagSource {
    /// A source for `settings`, timing `excludePersistentLag` with `clock` (the system clock in
    /// production). Creating the client does not contact the broker; the first poll does.
    /// Fails only on an invalid librdkafka configuration (e.g. TLS asked from a build without
    /// it).
    pub fn new(settings: KafkaLagSettings, clock: Arc<dyn Clock>) -> Result<Self, SignalError> {
        Self::build(settings, clock, false)
    }

    /// Like [`new`](Self::new), with librdkafka's protocol debugging on so that
    /// [`requests_sent`](Self::requests_sent) counts every broker request (for benchmarks and
    /// diagnosis; it logs a line per request at trace level).
    pub fn with_request_counting(
        settings: KafkaLagSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SignalError> {
        Self::build(settings, clock, true)
    }

    /// Broker requests librdkafka sent so far, by type (counted only when created
    /// [`with_request_counting`](Self::with_request_counting)).
    pub fn requests_sent(&self) -> BTreeMap<String, u64> {
        self.serve_events();
        self.consumer.context().requests_by_type()
    }

    /// Serves queued librdkafka events (logs → `tracing` and the request counter, errors)
    /// without blocking, so the queue never grows.
    fn serve_events(&self) {
        let logs = || self.consumer.context().logs.load(Ordering::Relaxed);
        for _ in 0..MAX_EVENTS_SERVED_PER_POLL {
            let before = logs();
            // With no partition assigned the consumer yields no message: `Some` is an error
            // event (the poll reports errors typed), `None` with no new log line means the
            // queue is empty.
            if self.consumer.poll(Duration::ZERO).is_none() && logs() == before {
                return;
            }
        }
    }

    fn build(
        settings: KafkaLagSettings,
        clock: Arc<dyn Clock>,
        count_requests: bool,
    ) -> Result<Self, SignalError> {
        let mut config = client_config(&settings);
        if count_requests {
            // Protocol debug lines are logged at debug level: let them through.
            config
                .set("debug", "protocol")
                .set_log_level(RDKafkaLogLevel::Debug);
        }
        let consumer: Client = config
            .create_with_context(KafkaClientContext::default())
            .map_err(|e| SignalError::InvalidRequest {
                backend: BACKEND,
                detail: format!("client configuration rejected: {e}"),
            })?;
        Ok(KafkaLagSource {
            consumer: Arc::new(consumer),
            settings,
            cache: Mutex::new(Cache::default()),
            poll_interval: None,
            clock,
        })
    }

    /// Sets the source's own poll interval (the service's default otherwise).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = Some(interval);
        self
    }

    /// A source for other topics and options of the same brokers and group that shares this
    /// source's client (its connections and metadata) and clock; its topic cache and
    /// persistent-lag memory are its own.
    pub fn sharing_client(&self, topics: Vec<String>, options: LagOptions) -> KafkaLagSource {
        KafkaLagSource {
            consumer: Arc::clone(&self.consumer),
            settings: KafkaLagSettings {
                topics,
                options,
                ..self.settings.clone()
            },
            cache: Mutex::new(Cache::default()),
            poll_interval: self.poll_interval,
            clock: Arc::clone(&self.clock),
        }
    }

    /// The settings this source reads with.
    pub fn settings(&self) -> &KafkaLagSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // Every update replaces whole entries or fields, so a poisoned lock holds consistent
        // data.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One poll: reads offsets and computes the lag, bounded by the configured timeout.
    pub async fn poll(&self) -> Result<LagReport, SignalError> {
        self.poll_counted().await.map(|(r, _)| r)
    }

    /// Like [`poll`](Self::poll), also returning the broker requests issued.
    pub async fn poll_counted(&self) -> Result<(LagReport, RequestCount), SignalError> {
        let timeout = self.settings.timeout;
        let span = info_span!(
            "kafka_lag",
            servers = %self.settings.bootstrap_servers,
            group = %self.settings.group
        );
        let result = tokio::time::timeout(timeout, self.read_offsets().instrument(span)).await;
        self.serve_events();
        match result {
            Ok(Ok((offsets, count))) => {
                // The commits were just read: this is when they were seen.
                let now = self.clock.now();
                let history = self.lock().history.clone();
                let (report, next) = compute_lag(&offsets, &history, &self.settings.options, now);
                self.lock().history = next;
                debug!(
                    metric = report.metric,
                    total = report.total_lag,
                    partitions = count.partitions,
                    "kafka lag"
                );
                Ok((report, count))
            }
            Ok(Err(e)) => {
                if matches!(e, SignalError::NotFound { .. }) {
                    // A topic or partition vanished (or was never there): read the partitions
                    // afresh next time instead of trusting the cache for up to
                    // METADATA_REFRESH.
                    self.lock().topics.clear();
                }
                Err(e)
            }
            Err(_) => Err(SignalError::Timeout {
                backend: BACKEND,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    /// Partitions and leaders of `names`, from the cache or one Metadata request per topic
    /// whose entry expired (concurrently). A configured topic that does not exist is an error;
    /// a topic the group committed on that no longer exists (`discovered`) has no partitions.
    async fn topics(
        &self,
        names: &BTreeSet<String>,
        discovered: bool,
        count: &mut RequestCount,
    ) -> Result<TopicMap, SignalError> {
        let expired: Vec<String> = {
            let mut cache = self.lock();
            cache.topics.retain(|name, _| names.contains(name));
            names
                .iter()
                .filter(|n| {
                    cache
                        .topics
                        .get(*n)
                        .is_none_or(|(at, _)| at.elapsed() >= METADATA_REFRESH)
                })
                .cloned()
                .collect()
        };
        count.metadata += u32::try_from(expired.len()).unwrap_or(u32::MAX);
        let reads = expired.into_iter().map(|name| {
            let (consumer, settings) = (Arc::clone(&self.consumer), self.settings.clone());
            let span = debug_span!("kafka_metadata", topic = %name);
            blocking(move || {
                let parts = topic_partitions(&consumer, &settings, &name)?;
                Ok((name, parts))
            })
            .instrument(span)
        });
        let read = futures_util::future::join_all(reads).await;
        let mut cache = self.lock();
        for result in read {
            let (name, parts) = result?;
            let parts = known_partitions(&name, parts, discovered, &self.settings)?;
            cache.topics.insert(name, (Instant::now(), parts));
        }
        Ok(names
            .iter()
            .filter_map(|n| cache.topics.get(n).map(|(_, p)| (n.clone(), p.clone())))
            .collect())
    }

    async fn read_offsets(&self) -> Result<(Vec<PartitionOffsets>, RequestCount), SignalError> {
        let mut count = RequestCount::default();
        // No topic configured: the topics the group has commits for (KEDA's rule), listed with
        // the commits themselves in one OffsetFetch; no other topic of the cluster is read.
        let (names, group_commits) = if self.settings.topics.is_empty() {
            let (consumer, settings) = (Arc::clone(&self.consumer), self.settings.clone());
            let commits = blocking(move || list_group_commits(&consumer, &settings))
                .instrument(debug_span!("kafka_list_group_commits"))
                .await?;
            count.offset_fetch += 1;
            let names: BTreeSet<String> = commits.keys().map(|(t, _)| t.clone()).collect();
            (names, Some(commits))
        } else {
            (self.settings.topics.iter().cloned().collect(), None)
        };
        let topics = self
            .topics(&names, group_commits.is_some(), &mut count)
            .await?;
        let limit = &self.settings.options.partition_limitation;
        let mut all = TopicPartitionList::new();
        let mut leaders = std::collections::HashSet::new();
        for (topic, parts) in &topics {
            for (p, leader) in parts {
                if limit.is_empty() || limit.contains(p) {
                    all.add_partition(topic, *p);
                    leaders.insert(*leader);
                }
            }
        }
        if all.count() == 0 {
            return Ok((Vec::new(), count));
        }
        count.partitions = u32::try_from(all.count()).unwrap_or(u32::MAX);
        let leaders = u32::try_from(leaders.len()).unwrap_or(u32::MAX).max(1);
        let need_start = self.settings.options.offset_reset_policy == OffsetResetPolicy::Earliest
            && !self.settings.options.scale_to_zero_on_invalid_offset;

        // Configured topics: one OffsetFetch for their partitions, concurrently with one
        // batched ListOffsets per end of the log.
        let fetch_commits = group_commits.is_none();
        let committed = async {
            if let Some(commits) = group_commits {
                return Ok(commits);
            }
            let (consumer, settings, tpl) = (
                Arc::clone(&self.consumer),
                self.settings.clone(),
                all.clone(),
            );
            blocking(move || committed_offsets(&consumer, &settings, tpl))
                .instrument(debug_span!("kafka_offset_fetch"))
                .await
        };
        let ends = self.list_offsets(&all, Offset::End);
        let starts = async {
            if need_start {
                self.list_offsets(&all, Offset::Beginning).await.map(Some)
            } else {
                Ok(None)
            }
        };
        let (committed, ends, starts) = tokio::join!(committed, ends, starts);
        let (committed, ends, starts) = (committed?, ends?, starts?);
        if fetch_commits {
            count.offset_fetch += 1;
        }
        count.list_offsets += leaders * if need_start { 2 } else { 1 };
        Ok((merge(&all, &committed, &ends, starts.as_ref())?, count))
    }

    /// One batched ListOffsets for every partition in `tpl` at `end` (log start or end).
    async fn list_offsets(
        &self,
        tpl: &TopicPartitionList,
        end: Offset,
    ) -> Result<HashMap<(String, i32), i64>, SignalError> {
        let mut query = TopicPartitionList::new();
        for e in tpl.elements() {
            query
                .add_partition_offset(e.topic(), e.partition(), end)
                .map_err(|e| map_error(&e, &self.settings, "list offsets"))?;
        }
        let (consumer, settings) = (Arc::clone(&self.consumer), self.settings.clone());
        blocking(move || {
            let answer = consumer
                .offsets_for_times(query, settings.timeout)
                .map_err(|e| map_error(&e, &settings, "list offsets"))?;
            let mut out = HashMap::new();
            for e in answer.elements() {
                e.error().map_err(|err| {
                    let what = format!("list offsets of {}/{}", e.topic(), e.partition());
                    map_error(&err, &settings, &what)
                })?;
                match e.offset() {
                    Offset::Offset(o) => {
                        out.insert((e.topic().to_owned(), e.partition()), o);
                    }
                    other => {
                        return Err(SignalError::BadAnswer {
                            backend: BACKEND,
                            detail: format!(
                                "no log offset for {}/{}: {other:?}",
                                e.topic(),
                                e.partition()
                            ),
                        })
                    }
                }
            }
            Ok(out)
        })
        .instrument(debug_span!("kafka_list_offsets", end = ?end))
        .await
    }
}

/// The partitions of `topic` as metadata described them (`None`: the broker does not know it).
/// A configured topic must exist; a topic the group listed commits for (`discovered`) that no
/// longer exists has no partitions: it was deleted between the group's listing and the
/// metadata (Kafka drops a deleted topic's commits), and there is no lag left to work off.
fn known_partitions(
    topic: &str,
    parts: Option<Vec<(i32, i32)>>,
    discovered: bool,
    settings: &KafkaLagSettings,
) -> Result<Vec<(i32, i32)>, SignalError> {
    match parts {
        Some(parts) => Ok(parts),
        None if discovered => {
            debug!(
                topic,
                "the group committed on a topic that no longer exists"
            );
            Ok(Vec::new())
        }
        None => Err(SignalError::NotFound {
            backend: BACKEND,
            detail: format!(
                "unknown topic {topic:?} on {}; create it or fix the topic name",
                settings.bootstrap_servers
            ),
        }),
    }
}

/// Partitions and leaders of `topic` from one Metadata request naming only it; `None` when the
/// broker does not know the topic. Blocking.
fn topic_partitions(
    consumer: &Client,
    settings: &KafkaLagSettings,
    topic: &str,
) -> Result<Option<Vec<(i32, i32)>>, SignalError> {
    let what = format!("metadata of topic {topic:?}");
    let md = consumer
        .fetch_metadata(Some(topic), settings.timeout)
        .map_err(|e| map_error(&e, settings, &what))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    if let Some(code) = t.error() {
        let code = RDKafkaErrorCode::from(code);
        if matches!(
            code,
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
        ) {
            return Ok(None);
        }
        return Err(map_error(&KafkaError::MetadataFetch(code), settings, &what));
    }
    Ok(Some(
        t.partitions()
            .iter()
            .map(|p| (p.id(), p.leader()))
            .collect(),
    ))
}

/// The group's commits for the partitions in `tpl` (one OffsetFetch). Blocking.
fn committed_offsets(
    consumer: &Client,
    settings: &KafkaLagSettings,
    tpl: TopicPartitionList,
) -> Result<Commits, SignalError> {
    let committed = consumer
        .committed_offsets(tpl, settings.timeout)
        .map_err(|e| map_error(&e, settings, "committed offsets"))?;
    let mut out = Commits::new();
    for e in committed.elements() {
        // A per-partition error (e.g. not authorized) must not read as "no commit".
        e.error().map_err(|err| {
            let what = format!("committed offset of {}/{}", e.topic(), e.partition());
            map_error(&err, settings, &what)
        })?;
        if let Offset::Offset(o) = e.offset() {
            if o >= 0 {
                out.insert((e.topic().to_owned(), e.partition()), o);
            }
        }
    }
    Ok(out)
}

/// A librdkafka object destroyed with its own destructor when dropped (null is skipped).
struct Native<T> {
    ptr: *mut T,
    destroy: unsafe extern "C" fn(*mut T),
}

impl<T> Drop for Native<T> {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr` came from the librdkafka constructor matching `destroy`, is owned
            // by this guard alone and is destroyed exactly once, here.
            unsafe { (self.destroy)(self.ptr) }
        }
    }
}

/// Every commit of the group: librdkafka's ListConsumerGroupOffsets with no partition list,
/// which sends the group coordinator one OffsetFetch naming no topic (Kafka answers it with all
/// of the group's committed partitions). The rdkafka crate has no safe wrapper for it, so this
/// calls librdkafka's admin API on the source's own client. Blocking, bounded by the timeout.
fn list_group_commits(
    consumer: &Client,
    settings: &KafkaLagSettings,
) -> Result<Commits, SignalError> {
    let what = "list the group's commits";
    let group = CString::new(settings.group.as_str()).map_err(|_| SignalError::InvalidRequest {
        backend: BACKEND,
        detail: "the consumer group name contains a NUL character; fix the group name".into(),
    })?;
    let timeout_ms = c_int::try_from(settings.timeout.as_millis())
        .unwrap_or(c_int::MAX)
        .max(1);
    let failed = |code: rd::rd_kafka_resp_err_t| {
        map_error(
            &KafkaError::OffsetFetch(RDKafkaErrorCode::from(code)),
            settings,
            what,
        )
    };
    let no_error = rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is the live client handle owned by `consumer`, which outlives this call.
    // Every object created here is owned by a `Native` guard and destroyed once; the request is
    // copied by librdkafka when enqueued. The result event, and every group result, partition
    // list and topic name read from it, stay valid until the event guard drops at the end of
    // this block, and nothing read from them outlives it (names are copied into `String`s).
    unsafe {
        let queue = Native {
            ptr: rd::rd_kafka_queue_new(rk),
            destroy: rd::rd_kafka_queue_destroy,
        };
        let options = Native {
            ptr: rd::rd_kafka_AdminOptions_new(
                rk,
                rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_LISTCONSUMERGROUPOFFSETS,
            ),
            destroy: rd::rd_kafka_AdminOptions_destroy,
        };
        let mut errstr = [0 as c_char; 256];
        let set = rd::rd_kafka_AdminOptions_set_request_timeout(
            options.ptr,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        if set != no_error {
            return Err(SignalError::InvalidRequest {
                backend: BACKEND,
                detail: format!(
                    "{what}: request timeout rejected: {}",
                    CStr::from_ptr(errstr.as_ptr()).to_string_lossy()
                ),
            });
        }
        let request = Native {
            ptr: rd::rd_kafka_ListConsumerGroupOffsets_new(group.as_ptr(), std::ptr::null()),
            destroy: rd::rd_kafka_ListConsumerGroupOffsets_destroy,
        };
        let mut requests = [request.ptr];
        rd::rd_kafka_ListConsumerGroupOffsets(
            rk,
            requests.as_mut_ptr(),
            requests.len(),
            options.ptr,
            queue.ptr,
        );
        let event = Native {
            ptr: rd::rd_kafka_queue_poll(queue.ptr, timeout_ms),
            destroy: rd::rd_kafka_event_destroy,
        };
        if event.ptr.is_null() {
            return Err(SignalError::Timeout {
                backend: BACKEND,
                timeout_ms: u64::try_from(timeout_ms).unwrap_or(u64::MAX),
            });
        }
        let code = rd::rd_kafka_event_error(event.ptr);
        if code != no_error {
            return Err(failed(code));
        }
        let result = rd::rd_kafka_event_ListConsumerGroupOffsets_result(event.ptr);
        if result.is_null() {
            return Err(SignalError::BadAnswer {
                backend: BACKEND,
                detail: format!("{what}: librdkafka returned an event of another kind"),
            });
        }
        let mut n = 0usize;
        let groups = rd::rd_kafka_ListConsumerGroupOffsets_result_groups(result, &mut n);
        let mut out = Commits::new();
        for i in 0..n {
            let group = *groups.add(i);
            let error = rd::rd_kafka_group_result_error(group);
            if !error.is_null() {
                return Err(failed(rd::rd_kafka_error_code(error)));
            }
            let list = rd::rd_kafka_group_result_partitions(group);
            if list.is_null() {
                continue;
            }
            let len = usize::try_from((*list).cnt).unwrap_or(0);
            if len == 0 {
                continue;
            }
            for p in std::slice::from_raw_parts((*list).elems, len) {
                if p.err != no_error {
                    return Err(failed(p.err));
                }
                if p.topic.is_null() || p.offset < 0 {
                    continue;
                }
                let topic = CStr::from_ptr(p.topic).to_string_lossy().into_owned();
                out.insert((topic, p.partition), p.offset);
            }
        }
        Ok(out)
    }
}

/// Joins committed offsets and watermarks into [`PartitionOffsets`].
fn merge(
    all: &TopicPartitionList,
    committed: &Commits,
    ends: &HashMap<(String, i32), i64>,
    starts: Option<&HashMap<(String, i32), i64>>,
) -> Result<Vec<PartitionOffsets>, SignalError> {
    let mut out = Vec::with_capacity(all.count());
    for e in all.elements() {
        let key = (e.topic().to_owned(), e.partition());
        let log_end = *ends.get(&key).ok_or_else(|| SignalError::BadAnswer {
            backend: BACKEND,
            detail: format!("broker returned no log end for {}/{}", key.0, key.1),
        })?;
        out.push(PartitionOffsets {
            log_start: starts.and_then(|s| s.get(&key).copied()),
            committed: committed.get(&key).copied(),
            topic: key.0,
            partition: key.1,
            log_end,
        });
    }
    Ok(out)
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SignalError> + Send + 'static,
) -> Result<T, SignalError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(SignalError::BadAnswer {
            backend: BACKEND,
            detail: format!("kafka client task failed: {e}"),
        })
    })
}

#[async_trait]
impl SignalSource for KafkaLagSource {
    fn kind(&self) -> SignalKind {
        SignalKind::QueueLag
    }

    fn poll_interval(&self) -> Option<Duration> {
        self.poll_interval
    }

    async fn sample(&self) -> Result<Reading, SignalError> {
        self.poll()
            .await
            .map(|r| r.planner_reading(&self.settings.options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    /// An arbitrary time for computations that do not depend on it.
    const T0: Timestamp = Timestamp::from_secs(1_000);

    fn p(partition: i32, committed: Option<i64>, start: i64, end: i64) -> PartitionOffsets {
        PartitionOffsets {
            topic: "jobs".into(),
            partition,
            committed,
            log_start: Some(start),
            log_end: end,
        }
    }

    fn opts(f: impl FnOnce(&mut LagOptions)) -> LagOptions {
        let mut o = LagOptions {
            lag_threshold: 100,
            ..LagOptions::default()
        };
        f(&mut o);
        o
    }

    #[test]
    fn table() {
        let four = vec![
            p(0, Some(10), 0, 100),
            p(1, Some(50), 0, 100),
            p(2, None, 20, 100),
            p(3, Some(100), 0, 100),
        ];
        // (name, offsets, options, metric, total_with_persistent, active)
        type Case = (
            &'static str,
            Vec<PartitionOffsets>,
            LagOptions,
            i64,
            i64,
            bool,
        );
        let cases: Vec<Case> = vec![
            (
                "latest: uncommitted counts 1",
                four.clone(),
                opts(|_| {}),
                141,
                141,
                true,
            ),
            (
                "earliest: uncommitted counts end - start",
                four.clone(),
                opts(|o| o.offset_reset_policy = OffsetResetPolicy::Earliest),
                220,
                220,
                true,
            ),
            (
                "scale to zero on invalid offset",
                four.clone(),
                opts(|o| {
                    o.offset_reset_policy = OffsetResetPolicy::Earliest;
                    o.scale_to_zero_on_invalid_offset = true
                }),
                140,
                140,
                true,
            ),
            (
                "cap at partitions x threshold",
                four.clone(),
                opts(|o| o.lag_threshold = 10),
                40,
                141,
                true,
            ),
            (
                "idle consumers allowed: no cap",
                four.clone(),
                opts(|o| {
                    o.lag_threshold = 10;
                    o.allow_idle_consumers = true
                }),
                141,
                141,
                true,
            ),
            (
                "limit to partitions with lag (3 of 4)",
                four.clone(),
                opts(|o| {
                    o.lag_threshold = 10;
                    o.allow_idle_consumers = true;
                    o.limit_to_partitions_with_lag = true
                }),
                30,
                141,
                true,
            ),
            (
                "integer division: 141/40=3 is not > 4, no cap",
                four.clone(),
                opts(|o| o.lag_threshold = 40),
                141,
                141,
                true,
            ),
            (
                "partition limitation",
                four.clone(),
                opts(|o| o.partition_limitation = vec![0, 3]),
                90,
                90,
                true,
            ),
            (
                "activation is strict",
                vec![p(0, Some(95), 0, 100)],
                opts(|o| o.activation_lag_threshold = 5),
                5,
                5,
                false,
            ),
            (
                "commit past a stale watermark counts 0",
                vec![p(0, Some(120), 0, 100)],
                opts(|_| {}),
                0,
                0,
                false,
            ),
            ("no partitions", vec![], opts(|_| {}), 0, 0, false),
        ];
        for (name, offsets, o, metric, with_persistent, active) in cases {
            let (r, _) = compute_lag(&offsets, &CommitHistory::new(), &o, T0);
            assert_eq!(r.metric, metric, "{name}: metric");
            assert_eq!(
                r.total_lag_with_persistent, with_persistent,
                "{name}: total"
            );
            assert_eq!(r.active, active, "{name}: active");
        }
    }

    #[test]
    fn the_planner_reads_the_whole_lag_and_the_partition_cap() {
        let four = vec![
            p(0, Some(10), 0, 100),
            p(1, Some(50), 0, 100),
            p(2, None, 20, 100),
            p(3, Some(100), 0, 100),
        ];
        // (name, options, lag value, max workers)
        let cases: Vec<(&str, LagOptions, f64, Option<u32>)> = vec![
            (
                "lagThreshold caps only KEDA's metric, not the planner's lag",
                opts(|o| o.lag_threshold = 10),
                141.0,
                Some(4),
            ),
            (
                "earliest policy counts the uncommitted partition whole",
                opts(|o| o.offset_reset_policy = OffsetResetPolicy::Earliest),
                220.0,
                Some(4),
            ),
            (
                "idle consumers allowed: no worker limit",
                opts(|o| o.allow_idle_consumers = true),
                141.0,
                None,
            ),
            (
                "limit to partitions with lag: 3 of 4 have lag",
                opts(|o| o.limit_to_partitions_with_lag = true),
                141.0,
                Some(3),
            ),
            (
                "partition limitation counts only the listed partitions",
                opts(|o| o.partition_limitation = vec![0, 3]),
                90.0,
                Some(2),
            ),
        ];
        for (name, o, value, max_workers) in cases {
            let (r, _) = compute_lag(&four, &CommitHistory::new(), &o, T0);
            assert_eq!(
                r.planner_reading(&o),
                Reading { value, max_workers },
                "{name}"
            );
        }
    }

    #[test]
    fn persistent_lag_needs_a_commit_unmoved_for_the_whole_window() {
        const WINDOW: Duration = Duration::from_secs(120);
        let seen = |offset, since_ms| CommitSeen {
            offset,
            since: Timestamp::from_millis(since_ms),
        };
        // (name, remembered, committed, log end, now in ms, excludePersistentLag,
        //  lag for scaling, lag with persistent, remembered next)
        type Case = (
            &'static str,
            Option<CommitSeen>,
            Option<i64>,
            i64,
            u64,
            bool,
            i64,
            i64,
            Option<CommitSeen>,
        );
        let cases: Vec<Case> = vec![
            (
                "first sighting: taken as moving now",
                None,
                Some(10),
                100,
                5_000,
                true,
                90,
                90,
                Some(seen(10, 5_000)),
            ),
            (
                "unmoved for 1 s (a busy worker at a 1 s poll): still counts",
                Some(seen(10, 4_000)),
                Some(10),
                100,
                5_000,
                true,
                90,
                90,
                Some(seen(10, 4_000)),
            ),
            (
                "unmoved for just under the window: still counts",
                Some(seen(10, 0)),
                Some(10),
                100,
                119_999,
                true,
                90,
                90,
                Some(seen(10, 0)),
            ),
            (
                "unmoved for the whole window: persistent, counts only for activation",
                Some(seen(10, 0)),
                Some(10),
                100,
                120_000,
                true,
                0,
                90,
                Some(seen(10, 0)),
            ),
            (
                "the commit moved after a long pause: counts, and the window restarts",
                Some(seen(10, 0)),
                Some(11),
                100,
                600_000,
                true,
                89,
                89,
                Some(seen(11, 600_000)),
            ),
            (
                "no lag is never persistent lag, but its commit is remembered",
                Some(seen(100, 0)),
                Some(100),
                100,
                600_000,
                true,
                0,
                0,
                Some(seen(100, 0)),
            ),
            (
                "a clock that went back is no reason to exclude",
                Some(seen(10, 500_000)),
                Some(10),
                100,
                100_000,
                true,
                90,
                90,
                Some(seen(10, 500_000)),
            ),
            (
                "an uncommitted partition is never persistent and not remembered",
                None,
                None,
                100,
                600_000,
                true,
                1,
                1,
                None,
            ),
            (
                "without the option nothing is remembered or excluded",
                Some(seen(10, 0)),
                Some(10),
                100,
                600_000,
                false,
                90,
                90,
                None,
            ),
        ];
        let key = ("jobs".to_owned(), 0);
        for (name, remembered, committed, end, now, exclude, lag, with_persistent, next) in cases {
            let o = opts(|o| {
                o.exclude_persistent_lag = exclude;
                o.persistent_lag_window = WINDOW;
            });
            let history: CommitHistory = remembered.map(|r| (key.clone(), r)).into_iter().collect();
            let (r, after) = compute_lag(
                &[p(0, committed, 0, end)],
                &history,
                &o,
                Timestamp::from_millis(now),
            );
            assert_eq!(r.partitions[0].lag, lag, "{name}: lag");
            assert_eq!(
                r.partitions[0].lag_with_persistent, with_persistent,
                "{name}: lag with persistent"
            );
            assert_eq!(r.metric, lag, "{name}: metric");
            assert_eq!(r.active, with_persistent > 0, "{name}: active");
            assert_eq!(after.get(&key).copied(), next, "{name}: remembered");
        }
    }

    #[test]
    fn a_custom_window_applies_per_partition() {
        let o = opts(|o| {
            o.exclude_persistent_lag = true;
            o.persistent_lag_window = Duration::from_secs(30);
        });
        let t = |s| Timestamp::from_secs(s);
        let first = vec![p(0, Some(10), 0, 100), p(1, Some(50), 0, 100)];
        let (r, h) = compute_lag(&first, &CommitHistory::new(), &o, t(1_000));
        assert_eq!(r.metric, 140);
        // 20 s later partition 1 moved, partition 0 did not: both still count.
        let second = vec![p(0, Some(10), 0, 110), p(1, Some(60), 0, 110)];
        let (r, h) = compute_lag(&second, &h, &o, t(1_020));
        assert_eq!(r.metric, 150);
        // 30 s after partition 0 was first seen: it is stuck; partition 1 (moved at 1,020) is
        // not yet.
        let (r, _) = compute_lag(&second, &h, &o, t(1_030));
        assert_eq!((r.partitions[0].lag, r.partitions[1].lag), (0, 50));
        assert_eq!((r.metric, r.total_lag_with_persistent), (50, 150));
        assert!(r.active);
    }

    #[test]
    fn a_zero_window_is_rejected_naming_both_keys() {
        let mut s = settings(KafkaSecurity::default());
        s.options.persistent_lag_window = Duration::ZERO;
        let err = s.validate().unwrap_err();
        assert_eq!(err.setting, LagSetting::PersistentLagWindow);
        assert_eq!(
            err.setting.config_key(),
            "signals.queue.persistent_lag_window"
        );
        assert_eq!(err.setting.keda_key(), "persistentLagWindow");
        assert!(err.fix.contains("2m"), "{err}");
    }

    fn settings(security: KafkaSecurity) -> KafkaLagSettings {
        KafkaLagSettings {
            bootstrap_servers: "127.0.0.1:1".into(),
            group: "g".into(),
            topics: vec!["jobs".into()],
            options: LagOptions::default(),
            security,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn security_options_reach_librdkafka_and_secrets_stay_out_of_errors() {
        // SASL PLAIN is built into librdkafka: accepted.
        let plain = KafkaSecurity {
            protocol: Some("sasl_plaintext".into()),
            sasl_mechanism: Some("PLAIN".into()),
            sasl_username: Some("u".into()),
            sasl_password: Some(Secret::new("hunter2")),
            ..KafkaSecurity::default()
        };
        let source = KafkaLagSource::new(settings(plain), Arc::new(SystemClock)).unwrap();
        assert!(!format!("{source:?}").contains("hunter2"));
        // TLS and SCRAM: librdkafka is built with OpenSSL (the `ssl` feature).
        let scram = KafkaSecurity {
            protocol: Some("sasl_ssl".into()),
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            sasl_username: Some("u".into()),
            sasl_password: Some(Secret::new("hunter2")),
            ..KafkaSecurity::default()
        };
        let source = KafkaLagSource::new(settings(scram), Arc::new(SystemClock)).unwrap();
        assert!(!format!("{source:?}").contains("hunter2"));
        // A value librdkafka does not know is a clear configuration error naming the property.
        let bogus = KafkaSecurity {
            protocol: Some("tls13".into()),
            sasl_password: Some(Secret::new("hunter2")),
            ..KafkaSecurity::default()
        };
        let err = KafkaLagSource::new(settings(bogus), Arc::new(SystemClock)).unwrap_err();
        assert!(matches!(err, SignalError::InvalidRequest { .. }), "{err:?}");
        assert!(err.to_string().contains("security.protocol"), "{err}");
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn a_missing_topic_is_an_error_only_when_configured() {
        let s = settings(KafkaSecurity::default());
        let parts = vec![(0, 1), (1, 1)];
        assert_eq!(
            known_partitions("jobs", Some(parts.clone()), false, &s).unwrap(),
            parts
        );
        assert_eq!(
            known_partitions("jobs", Some(parts.clone()), true, &s).unwrap(),
            parts
        );
        // Listed by the group but gone from the cluster: nothing to read, no error.
        assert!(known_partitions("retired", None, true, &s)
            .unwrap()
            .is_empty());
        // Configured but unknown: a typed error naming the topic and the fix.
        let err = known_partitions("typo", None, false, &s).unwrap_err();
        assert!(matches!(err, SignalError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("\"typo\""), "{err}");
        assert!(err.to_string().contains("fix the topic name"), "{err}");
    }

    #[test]
    fn huge_offsets_saturate() {
        let (r, _) = compute_lag(
            &[p(0, Some(0), 0, i64::MAX), p(1, Some(0), 0, i64::MAX)],
            &CommitHistory::new(),
            &opts(|o| o.allow_idle_consumers = true),
            T0,
        );
        assert_eq!(r.metric, i64::MAX);
    }
}
