//! KEDA-parity triggers: `scaler: kafka` and `scaler: prometheus` with KEDA's own metadata keys
//! answer exactly as KEDA's built-in scalers would, from a cache.
//!
//! A trigger seen for the first time is read synchronously (bounded by [`FIRST_FETCH_TIMEOUT`]);
//! after that a background task refreshes every cached trigger concurrently each
//! `refresh_interval` and drops triggers unused for `idle_ttl`. Clients are shared: one Kafka
//! client per (brokers, consumer group) and one HTTP client per Prometheus server, whatever the
//! number of ScaledObjects. The Kafka and Prometheus I/O stays in `crate::signals`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Instrument};

use super::ScalerError;
use crate::clock::SystemClock;
use crate::model::SignalKind;
use crate::signals::kafka::{
    KafkaLagSettings, KafkaSecurity, LagOptions, OffsetResetPolicy, DEFAULT_PERSISTENT_LAG_WINDOW,
};
use crate::signals::prometheus::{PrometheusAuth, PrometheusSettings};
use crate::signals::{KafkaLagSource, PrometheusSource};

/// Bound on the synchronous first read of a new trigger: below KEDA's ~3 s HPA-path deadline.
pub const FIRST_FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Default refresh period: well inside KEDA's 15 s HPA sync and 30 s polling interval, so every
/// KEDA call sees a value at most this old.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Default idle lifetime: KEDA asks at least every 30 s for a live ScaledObject, so ten minutes
/// without a call means it was deleted or repointed.
pub const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(600);

/// A parsed KEDA-parity trigger.
#[derive(Debug, Clone, PartialEq)]
pub enum ParitySpec {
    /// KEDA's `kafka` scaler.
    Kafka {
        /// Brokers, group, topics and lag options.
        settings: KafkaLagSettings,
    },
    /// KEDA's `prometheus` scaler.
    Prometheus {
        /// Server and query.
        settings: PrometheusSettings,
        /// `activationThreshold`: active iff value > this.
        activation_threshold: f64,
    },
}

impl ParitySpec {
    /// A key identifying the trigger (all its settings; parity triggers carry no secrets
    /// because KEDA does not forward TriggerAuthentication to external scalers).
    fn key(&self) -> String {
        format!("{self:?}")
    }
}

/// What a parity trigger reads: the metric KEDA would report and its `IsActive` answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParityReading {
    /// The metric value (finite, ≥ 0).
    pub value: f64,
    /// KEDA's activation answer.
    pub active: bool,
}

fn bad(key: &'static str, problem: String, fix: &str) -> ScalerError {
    ScalerError::InvalidMetadata {
        key,
        problem,
        fix: fix.to_owned(),
    }
}

fn required<'a>(
    m: &'a HashMap<String, String>,
    key: &'static str,
    fix: &str,
) -> Result<&'a str, ScalerError> {
    match m.get(key).map(|s| s.trim()) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(bad(key, "is missing".into(), fix)),
    }
}

/// Go's `strconv.ParseBool`, which KEDA uses.
fn boolean(
    m: &HashMap<String, String>,
    key: &'static str,
    default: bool,
) -> Result<bool, ScalerError> {
    match m.get(key).map(|s| s.trim()) {
        None | Some("") => Ok(default),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(other) => Err(bad(
            key,
            format!("{other:?} is not a boolean"),
            "set \"true\" or \"false\"",
        )),
    }
}

fn integer(
    m: &HashMap<String, String>,
    key: &'static str,
    default: i64,
) -> Result<i64, ScalerError> {
    let Some(raw) = m.get(key).map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        return Ok(default);
    };
    raw.parse::<i64>().map_err(|_| {
        bad(
            key,
            format!("{raw:?} is not a whole number"),
            "set a whole number such as \"10\"",
        )
    })
}

fn float(
    m: &HashMap<String, String>,
    key: &'static str,
    default: Option<f64>,
) -> Result<f64, ScalerError> {
    let Some(raw) = m.get(key).map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        return default.ok_or_else(|| bad(key, "is missing".into(), "set a number such as \"5\""));
    };
    match raw.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(bad(
            key,
            format!("{raw:?} is not a finite number"),
            "set a decimal number such as \"2\" or \"0.5\"",
        )),
    }
}

/// A duration such as `"90s"` or `"2m"` (a unit is required); `default` when absent.
fn duration(
    m: &HashMap<String, String>,
    key: &'static str,
    default: Duration,
) -> Result<Duration, ScalerError> {
    let Some(raw) = m.get(key).map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        return Ok(default);
    };
    humantime::parse_duration(raw).map_err(|e| {
        bad(
            key,
            format!("{raw:?} is not a duration ({e})"),
            "set a duration with its unit, such as \"90s\" or \"2m\"",
        )
    })
}

/// KEDA's `partitionLimitation`: comma-separated ids and inclusive ranges (`1,2,10-12`).
fn partitions(raw: &str) -> Result<Vec<i32>, ScalerError> {
    let invalid = || {
        bad(
            "partitionLimitation",
            format!("{raw:?} is not a list of partition ids"),
            "use ids and ranges such as \"0,1,4-6\"",
        )
    };
    let mut out = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: i32 = a.trim().parse().map_err(|_| invalid())?;
                let b: i32 = b.trim().parse().map_err(|_| invalid())?;
                // A bound on range length keeps a typo from allocating millions of ids.
                if a < 0 || b < a || b - a > 100_000 {
                    return Err(invalid());
                }
                out.extend(a..=b);
            }
            None => {
                let p: i32 = part.parse().map_err(|_| invalid())?;
                if p < 0 {
                    return Err(invalid());
                }
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// Parses `scaler: kafka` metadata (KEDA's keys, plus our `persistentLagWindow`: how long a
/// commit must stay put before `excludePersistentLag` takes its lag for stuck, default 2
/// minutes). Returns the spec, the target (`lagThreshold`), the activation threshold and the
/// default metric name.
pub fn parse_kafka(
    m: &HashMap<String, String>,
) -> Result<(ParitySpec, f64, f64, String), ScalerError> {
    let servers = required(
        m,
        "bootstrapServers",
        "set the brokers, e.g. \"kafka:9092\"",
    )?;
    let group = required(m, "consumerGroup", "set the consumer group of the workload")?;
    let topic = m.get("topic").map(|s| s.trim()).unwrap_or("");
    let lag_threshold = integer(m, "lagThreshold", 10)?;
    let activation_lag_threshold = integer(m, "activationLagThreshold", 0)?;
    let offset_reset_policy = match m.get("offsetResetPolicy").map(|s| s.trim()) {
        None | Some("") | Some("latest") => OffsetResetPolicy::Latest,
        Some("earliest") => OffsetResetPolicy::Earliest,
        Some(other) => {
            return Err(bad(
                "offsetResetPolicy",
                format!("{other:?} is not a policy"),
                "set \"latest\" or \"earliest\"",
            ))
        }
    };
    let allow_idle_consumers = boolean(m, "allowIdleConsumers", false)?;
    let limit_to_partitions_with_lag = boolean(m, "limitToPartitionsWithLag", false)?;
    let partition_limitation = match m.get("partitionLimitation").map(|s| s.trim()) {
        None | Some("") => Vec::new(),
        Some(raw) => partitions(raw)?,
    };
    let options = LagOptions {
        lag_threshold,
        activation_lag_threshold,
        offset_reset_policy,
        allow_idle_consumers,
        exclude_persistent_lag: boolean(m, "excludePersistentLag", false)?,
        persistent_lag_window: duration(m, "persistentLagWindow", DEFAULT_PERSISTENT_LAG_WINDOW)?,
        scale_to_zero_on_invalid_offset: boolean(m, "scaleToZeroOnInvalidOffset", false)?,
        limit_to_partitions_with_lag,
        partition_limitation,
    };
    let metric = if topic.is_empty() {
        format!("kafka-{group}-topics")
    } else {
        format!("kafka-{topic}")
    };
    let settings = KafkaLagSettings {
        bootstrap_servers: servers.to_owned(),
        group: group.to_owned(),
        topics: if topic.is_empty() {
            Vec::new()
        } else {
            vec![topic.to_owned()]
        },
        options,
        security: KafkaSecurity::default(),
        timeout: FIRST_FETCH_TIMEOUT,
    };
    settings
        .validate()
        .map_err(|e| ScalerError::InvalidMetadata {
            key: e.setting.keda_key(),
            problem: e.problem,
            fix: e.fix.to_owned(),
        })?;
    Ok((
        ParitySpec::Kafka { settings },
        lag_threshold as f64,
        activation_lag_threshold as f64,
        metric,
    ))
}

/// Parses `scaler: prometheus` metadata (KEDA's keys). Returns the spec, the target
/// (`threshold`), the activation threshold and the default metric name.
pub fn parse_prometheus(
    m: &HashMap<String, String>,
) -> Result<(ParitySpec, f64, f64, String), ScalerError> {
    let server = required(
        m,
        "serverAddress",
        "set the Prometheus URL, e.g. \"http://prometheus.monitoring:9090\"",
    )?;
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        return Err(bad(
            "serverAddress",
            format!("{server:?} is not an http(s) URL"),
            "set e.g. \"http://prometheus.monitoring:9090\"",
        ));
    }
    let query = required(m, "query", "set a PromQL query returning one series")?;
    let threshold = float(m, "threshold", None)?;
    if threshold <= 0.0 {
        return Err(bad(
            "threshold",
            format!("{threshold} is not above zero"),
            "set the target value per replica, e.g. \"5\"",
        ));
    }
    let activation_threshold = float(m, "activationThreshold", Some(0.0))?;
    let settings = PrometheusSettings {
        server_address: server.to_owned(),
        query: query.to_owned(),
        ignore_null_values: boolean(m, "ignoreNullValues", true)?,
        timeout: FIRST_FETCH_TIMEOUT,
        auth: PrometheusAuth::None,
        headers: BTreeMap::new(),
    };
    Ok((
        ParitySpec::Prometheus {
            settings,
            activation_threshold,
        },
        threshold,
        activation_threshold,
        "prometheus".to_owned(),
    ))
}

enum Reader {
    Kafka(KafkaLagSource),
    Prometheus {
        source: PrometheusSource,
        activation_threshold: f64,
    },
}

impl Reader {
    async fn read(&self) -> Result<ParityReading, String> {
        match self {
            Reader::Kafka(source) => {
                let r = source.poll().await.map_err(|e| e.to_string())?;
                Ok(ParityReading {
                    value: r.metric.max(0) as f64,
                    active: r.active,
                })
            }
            Reader::Prometheus {
                source,
                activation_threshold,
            } => {
                let v = source.query().await.map_err(|e| e.to_string())?;
                Ok(ParityReading {
                    // KEDA reports what Prometheus returns; KEDA's HPA side cannot use a
                    // negative metric (#7880), so it is floored at 0.
                    value: if v.is_finite() { v.max(0.0) } else { 0.0 },
                    active: v > *activation_threshold,
                })
            }
        }
    }
}

/// Which shared client an entry reads through.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ClientKey {
    Kafka(String, String),
    Prometheus(String),
}

struct Entry {
    reader: Reader,
    client: ClientKey,
    first: OnceCell<()>,
    state: Mutex<EntryState>,
}

struct EntryState {
    last: Option<Result<ParityReading, String>>,
    last_used: Instant,
}

impl Entry {
    fn state(&self) -> std::sync::MutexGuard<'_, EntryState> {
        // Updates are single assignments: a poisoned lock still holds consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn refresh(&self) {
        let result = self.reader.read().await;
        self.state().last = Some(result);
    }
}

#[derive(Default)]
struct Registry {
    entries: HashMap<String, Arc<Entry>>,
    kafka_clients: HashMap<ClientKey, Arc<KafkaLagSource>>,
    prometheus_clients: HashMap<ClientKey, Arc<PrometheusSource>>,
}

/// The cache of parity triggers and their shared clients.
pub struct Parity {
    registry: Mutex<Registry>,
    refresh_interval: Duration,
    idle_ttl: Duration,
    refresher: OnceCell<()>,
    shutdown: CancellationToken,
}

impl Parity {
    /// A cache refreshed every `refresh_interval`, dropping triggers unused for `idle_ttl`; the
    /// refresher stops when `shutdown` fires.
    pub fn new(
        refresh_interval: Duration,
        idle_ttl: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Parity {
            registry: Mutex::new(Registry::default()),
            refresh_interval,
            idle_ttl,
            refresher: OnceCell::new(),
            shutdown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Updates are single inserts/removes: a poisoned lock still holds consistent data.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How often cached triggers are refreshed.
    pub fn refresh_interval(&self) -> Duration {
        self.refresh_interval
    }

    /// Number of cached triggers and of distinct clients (Kafka, Prometheus).
    pub fn sizes(&self) -> (usize, usize, usize) {
        let r = self.lock();
        (
            r.entries.len(),
            r.kafka_clients.len(),
            r.prometheus_clients.len(),
        )
    }

    /// The cached entry for `spec`, created (sharing clients) when new.
    fn entry(&self, spec: &ParitySpec) -> Result<Arc<Entry>, ScalerError> {
        let key = spec.key();
        let mut r = self.lock();
        if let Some(e) = r.entries.get(&key) {
            e.state().last_used = Instant::now();
            return Ok(Arc::clone(e));
        }
        let unavailable =
            |e: crate::signals::SignalError| ScalerError::SourceUnavailable(e.to_string());
        let (reader, client) = match spec {
            ParitySpec::Kafka { settings } => {
                let client_key =
                    ClientKey::Kafka(settings.bootstrap_servers.clone(), settings.group.clone());
                let base = match r.kafka_clients.get(&client_key) {
                    Some(b) => Arc::clone(b),
                    None => {
                        // The parity cache has no injected clock: `persistentLagWindow` is
                        // timed by the wall clock, like the service's own source.
                        let clock = Arc::new(SystemClock);
                        let b = Arc::new(
                            KafkaLagSource::new(settings.clone(), clock).map_err(unavailable)?,
                        );
                        r.kafka_clients.insert(client_key.clone(), Arc::clone(&b));
                        b
                    }
                };
                let reader = Reader::Kafka(
                    base.sharing_client(settings.topics.clone(), settings.options.clone()),
                );
                (reader, client_key)
            }
            ParitySpec::Prometheus {
                settings,
                activation_threshold,
            } => {
                let client_key = ClientKey::Prometheus(settings.server_address.clone());
                let base = match r.prometheus_clients.get(&client_key) {
                    Some(b) => Arc::clone(b),
                    None => {
                        let b = Arc::new(
                            PrometheusSource::new(SignalKind::LatencyP95, settings.clone())
                                .map_err(unavailable)?,
                        );
                        r.prometheus_clients
                            .insert(client_key.clone(), Arc::clone(&b));
                        b
                    }
                };
                let reader = Reader::Prometheus {
                    source: base
                        .sharing_client(settings.query.clone(), settings.ignore_null_values),
                    activation_threshold: *activation_threshold,
                };
                (reader, client_key)
            }
        };
        let entry = Arc::new(Entry {
            reader,
            client,
            first: OnceCell::new(),
            state: Mutex::new(EntryState {
                last: None,
                last_used: Instant::now(),
            }),
        });
        r.entries.insert(key, Arc::clone(&entry));
        Ok(entry)
    }

    /// The current reading of `spec`: from the cache, or read now (bounded) the first time.
    /// A failed read is an error (KEDA then applies its fallback), never a fake 0.
    pub async fn read(self: &Arc<Self>, spec: &ParitySpec) -> Result<ParityReading, ScalerError> {
        self.start_refresher().await;
        let entry = self.entry(spec)?;
        entry
            .first
            .get_or_init(|| async {
                let span = info_span!("parity_first_fetch");
                if tokio::time::timeout(FIRST_FETCH_TIMEOUT, entry.refresh().instrument(span))
                    .await
                    .is_err()
                {
                    entry.state().last = Some(Err(format!(
                        "first read did not finish within {} ms; retry shortly",
                        FIRST_FETCH_TIMEOUT.as_millis()
                    )));
                }
            })
            .await;
        let last = entry.state().last.clone();
        match last {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(ScalerError::SourceUnavailable(e)),
            None => Err(ScalerError::SourceUnavailable(
                "no reading yet; retry shortly".into(),
            )),
        }
    }

    /// Registers `spec` so its first read starts in the background (GetMetricSpec does this).
    pub async fn prefetch(self: &Arc<Self>, spec: &ParitySpec) {
        let this = Arc::clone(self);
        let spec = spec.clone();
        tokio::spawn(async move {
            let _ = this.read(&spec).await;
        });
    }

    async fn start_refresher(self: &Arc<Self>) {
        self.refresher
            .get_or_init(|| async {
                let weak = Arc::downgrade(self);
                let (interval, shutdown) = (self.refresh_interval, self.shutdown.clone());
                tokio::spawn(async move {
                    let mut ticks = tokio::time::interval(interval);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    ticks.tick().await;
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = ticks.tick() => {}
                        }
                        let Some(this) = weak.upgrade() else { return };
                        this.refresh_all()
                            .instrument(info_span!("parity_refresh"))
                            .await;
                    }
                });
            })
            .await;
    }

    /// Drops idle triggers (and clients no trigger uses), then refreshes the rest concurrently.
    pub async fn refresh_all(&self) {
        let entries: Vec<Arc<Entry>> = {
            let mut r = self.lock();
            let ttl = self.idle_ttl;
            r.entries.retain(|_, e| e.state().last_used.elapsed() < ttl);
            let used: std::collections::HashSet<ClientKey> =
                r.entries.values().map(|e| e.client.clone()).collect();
            r.kafka_clients.retain(|k, _| used.contains(k));
            r.prometheus_clients.retain(|k, _| used.contains(k));
            r.entries.values().cloned().collect()
        };
        debug!(triggers = entries.len(), "refreshing parity triggers");
        let refreshes = entries
            .iter()
            .filter(|e| e.first.initialized())
            .map(|e| e.refresh());
        futures_util::future::join_all(refreshes).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn kafka_keys_and_defaults() {
        let (spec, target, activation, metric) = parse_kafka(&meta(&[
            ("bootstrapServers", "k:9092"),
            ("consumerGroup", "g"),
            ("topic", "jobs"),
            ("partitionLimitation", "0, 2-4"),
            ("offsetResetPolicy", "earliest"),
            ("excludePersistentLag", "True"),
        ]))
        .unwrap();
        assert_eq!(
            (target, activation, metric.as_str()),
            (10.0, 0.0, "kafka-jobs")
        );
        let ParitySpec::Kafka { settings } = spec else {
            panic!()
        };
        assert_eq!(settings.options.partition_limitation, vec![0, 2, 3, 4]);
        assert_eq!(
            settings.options.offset_reset_policy,
            OffsetResetPolicy::Earliest
        );
        assert!(settings.options.exclude_persistent_lag);
        assert_eq!(
            settings.options.persistent_lag_window,
            DEFAULT_PERSISTENT_LAG_WINDOW
        );
        // Our extension: how long a commit must stay put before its lag is persistent.
        let (spec, ..) = parse_kafka(&meta(&[
            ("bootstrapServers", "k:9092"),
            ("consumerGroup", "g"),
            ("excludePersistentLag", "true"),
            ("persistentLagWindow", "90s"),
        ]))
        .unwrap();
        let ParitySpec::Kafka { settings } = spec else {
            panic!()
        };
        assert_eq!(
            settings.options.persistent_lag_window,
            Duration::from_secs(90)
        );
    }

    #[test]
    fn bad_keys_are_named() {
        let base = [("bootstrapServers", "k:9092"), ("consumerGroup", "g")];
        for (extra, key) in [
            (vec![], ""),
            (vec![("lagThreshold", "0")], "lagThreshold"),
            (vec![("lagThreshold", "1.5")], "lagThreshold"),
            (
                vec![("activationLagThreshold", "-1")],
                "activationLagThreshold",
            ),
            (vec![("offsetResetPolicy", "newest")], "offsetResetPolicy"),
            (vec![("allowIdleConsumers", "yes")], "allowIdleConsumers"),
            (vec![("partitionLimitation", "1,2")], "partitionLimitation"),
            (vec![("persistentLagWindow", "0s")], "persistentLagWindow"),
            (vec![("persistentLagWindow", "120")], "persistentLagWindow"),
            (vec![("persistentLagWindow", "-2m")], "persistentLagWindow"),
            (
                vec![
                    ("allowIdleConsumers", "true"),
                    ("limitToPartitionsWithLag", "true"),
                ],
                "limitToPartitionsWithLag",
            ),
        ] {
            let mut m = meta(&base);
            m.extend(meta(&extra));
            let r = parse_kafka(&m);
            if key.is_empty() {
                assert!(r.is_ok());
            } else {
                let err = r.unwrap_err().to_string();
                assert!(err.contains(key), "{err}");
            }
        }
        let err = parse_kafka(&meta(&[("consumerGroup", "g")])).unwrap_err();
        assert!(err.to_string().contains("bootstrapServers"));
        for (pairs, key) in [
            (vec![("query", "up"), ("threshold", "1")], "serverAddress"),
            (
                vec![
                    ("serverAddress", "prom:9090"),
                    ("query", "up"),
                    ("threshold", "1"),
                ],
                "serverAddress",
            ),
            (
                vec![("serverAddress", "http://p"), ("threshold", "1")],
                "query",
            ),
            (
                vec![("serverAddress", "http://p"), ("query", "up")],
                "threshold",
            ),
            (
                vec![
                    ("serverAddress", "http://p"),
                    ("query", "up"),
                    ("threshold", "0"),
                ],
                "threshold",
            ),
            (
                vec![
                    ("serverAddress", "http://p"),
                    ("query", "up"),
                    ("threshold", "1"),
                    ("ignoreNullValues", "maybe"),
                ],
                "ignoreNullValues",
            ),
        ] {
            let err = parse_prometheus(&meta(&pairs)).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }
}
