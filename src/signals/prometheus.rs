//! p95 latency (or any one number) from Prometheus with the semantics of KEDA's `prometheus`
//! scaler: one instant query, exactly one series, `ignoreNullValues` for empty / NaN / ±Inf.
//! prometheus-http-query (over reqwest with rustls/ring) is imported by this module only.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use prometheus_http_query::response::Data;
use prometheus_http_query::Client;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use tracing::{debug, info_span, Instrument};

use super::source::{SignalError, SignalSource};
use crate::model::{Reading, Secret, SignalKind};

const BACKEND: &str = "prometheus";

/// The query used when only a metric name is configured: the p95 of a histogram over the last
/// minute, across every series of the metric.
pub fn default_query(metric: &str) -> String {
    format!("histogram_quantile(0.95, sum(rate({metric}_bucket[1m])) by (le))")
}

/// How requests authenticate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PrometheusAuth {
    /// No credentials.
    #[default]
    None,
    /// `Authorization: Bearer <token>`.
    Bearer(Secret),
    /// HTTP basic authentication.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: Secret,
    },
}

/// Everything needed to run one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrometheusSettings {
    /// Base URL, e.g. `http://prometheus.monitoring:9090`.
    pub server_address: String,
    /// PromQL; must return exactly one series.
    pub query: String,
    /// Empty / NaN / ±Inf read as 0 when true, are an error when false (KEDA's default: true).
    pub ignore_null_values: bool,
    /// Bound on one query (sent to Prometheus too).
    pub timeout: Duration,
    /// Credentials.
    pub auth: PrometheusAuth,
    /// Extra request headers (e.g. `X-Scope-OrgID` for Thanos/Mimir).
    pub headers: BTreeMap<String, String>,
}

/// KEDA's reading of an instant-query result: `values` holds one value per returned series.
/// Pure, so the rules are unit-tested without a server.
pub fn single_value(values: &[f64], ignore_null_values: bool) -> Result<f64, SignalError> {
    match values {
        [] if ignore_null_values => Ok(0.0),
        [] => Err(SignalError::NoValue {
            backend: BACKEND,
            detail: "the query returned no series; check the metric name and labels, or set \
                     ignoreNullValues / ignore_null_values = true to read it as 0"
                .into(),
        }),
        [v] if v.is_finite() => Ok(*v),
        [_] if ignore_null_values => Ok(0.0),
        [v] => Err(SignalError::NoValue {
            backend: BACKEND,
            detail: format!(
                "the query returned {v} (no traffic in the window gives NaN); set \
                 ignoreNullValues / ignore_null_values = true to read it as 0"
            ),
        }),
        many => Err(SignalError::SeveralSeries {
            backend: BACKEND,
            count: many.len(),
        }),
    }
}

/// A Prometheus instant query as a signal. The HTTP client (and its connection pool) is built
/// once and reused.
pub struct PrometheusSource {
    client: Client,
    settings: PrometheusSettings,
    kind: SignalKind,
    poll_interval: Option<Duration>,
}

impl std::fmt::Debug for PrometheusSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusSource")
            .field("server_address", &self.settings.server_address)
            .field("query", &self.settings.query)
            .finish()
    }
}

/// The reqwest client for `settings`: timeout, auth and custom headers as default headers
/// (credentials marked sensitive so they are never printed).
fn http_client(settings: &PrometheusSettings) -> Result<reqwest::Client, SignalError> {
    let invalid = |detail: String| SignalError::InvalidRequest {
        backend: BACKEND,
        detail,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &settings.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(format!("header name {name:?} is not a valid HTTP header")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| invalid(format!("header {name}: value is not valid in HTTP")))?;
        headers.insert(name, value);
    }
    let authorization = match &settings.auth {
        PrometheusAuth::None => None,
        PrometheusAuth::Bearer(token) => Some(format!("Bearer {}", token.expose())),
        PrometheusAuth::Basic { username, password } => {
            use base64::Engine as _;
            let raw = format!("{username}:{}", password.expose());
            Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            ))
        }
    };
    if let Some(auth) = authorization {
        let mut value = HeaderValue::from_str(&auth).map_err(|_| {
            invalid("the bearer token or basic-auth credentials contain invalid characters".into())
        })?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    crate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .build()
        .map_err(|e| invalid(format!("HTTP client: {e}")))
}

impl PrometheusSource {
    /// A source of `kind` for `settings`. Does not contact the server.
    pub fn new(kind: SignalKind, settings: PrometheusSettings) -> Result<Self, SignalError> {
        let http = http_client(&settings)?;
        let client = Client::from(http, &settings.server_address).map_err(|e| {
            SignalError::InvalidRequest {
                backend: BACKEND,
                detail: format!(
                    "server address {:?} is not a URL ({e}); use e.g. http://prometheus:9090",
                    settings.server_address
                ),
            }
        })?;
        Ok(PrometheusSource {
            client,
            settings,
            kind,
            poll_interval: None,
        })
    }

    /// Sets the source's own poll interval (the service's default otherwise).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = Some(interval);
        self
    }

    /// A source running another query on the same server that shares this source's HTTP client
    /// (its connection pool, credentials and headers).
    pub fn sharing_client(&self, query: String, ignore_null_values: bool) -> PrometheusSource {
        PrometheusSource {
            client: self.client.clone(),
            settings: PrometheusSettings {
                query,
                ignore_null_values,
                ..self.settings.clone()
            },
            kind: self.kind,
            poll_interval: self.poll_interval,
        }
    }

    /// The settings this source queries with.
    pub fn settings(&self) -> &PrometheusSettings {
        &self.settings
    }

    /// Runs the query once, bounded by the timeout.
    pub async fn query(&self) -> Result<f64, SignalError> {
        let timeout = self.settings.timeout;
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let span = info_span!("prometheus_query", server = %self.settings.server_address);
        let request = self
            .client
            .query(&self.settings.query)
            .timeout(i64::try_from(timeout_ms).unwrap_or(i64::MAX))
            .get();
        let result = match tokio::time::timeout(timeout, request.instrument(span)).await {
            Err(_) => {
                return Err(SignalError::Timeout {
                    backend: BACKEND,
                    timeout_ms,
                })
            }
            Ok(r) => r,
        };
        let data = match result {
            Ok(r) => r.into_inner().0,
            Err(e) => return Err(self.map_error(e, timeout_ms)),
        };
        let values: Vec<f64> = match &data {
            Data::Vector(v) => v.iter().map(|s| s.sample().value()).collect(),
            Data::Scalar(s) => vec![s.value()],
            Data::Matrix(m) => {
                return Err(SignalError::InvalidRequest {
                    backend: BACKEND,
                    detail: format!(
                        "the query returned a range vector ({} series); use an instant \
                         expression such as rate(x[1m]) instead of x[1m]",
                        m.len()
                    ),
                })
            }
        };
        let value = single_value(&values, self.settings.ignore_null_values)?;
        debug!(value, "prometheus value");
        Ok(value)
    }

    fn map_error(&self, e: prometheus_http_query::Error, timeout_ms: u64) -> SignalError {
        use prometheus_http_query::Error as E;
        let server = &self.settings.server_address;
        match e {
            E::Prometheus(p) if p.is_timeout() => SignalError::Timeout {
                backend: BACKEND,
                timeout_ms,
            },
            E::Prometheus(p) if p.is_bad_data() || p.is_execution() => {
                SignalError::InvalidRequest {
                    backend: BACKEND,
                    detail: format!("bad query {:?}: {}", self.settings.query, p.message()),
                }
            }
            E::Client(c) => {
                let inner = c.inner();
                if inner.is_some_and(|i| i.is_timeout()) {
                    SignalError::Timeout {
                        backend: BACKEND,
                        timeout_ms,
                    }
                } else if let Some(status) = inner.and_then(|i| i.status()) {
                    if status.as_u16() == 401 || status.as_u16() == 403 {
                        SignalError::Unauthorized {
                            backend: BACKEND,
                            detail: format!(
                                "{server} answered {status}; check the bearer token or \
                                 basic-auth credentials"
                            ),
                        }
                    } else {
                        SignalError::BadAnswer {
                            backend: BACKEND,
                            detail: format!("{server} answered {status}"),
                        }
                    }
                } else if inner.is_some_and(|i| i.is_connect() || i.is_request()) {
                    SignalError::Unreachable {
                        backend: BACKEND,
                        detail: format!("cannot connect to {server}; check server_address"),
                    }
                } else {
                    SignalError::BadAnswer {
                        backend: BACKEND,
                        detail: format!("{server}: {c}"),
                    }
                }
            }
            other => SignalError::BadAnswer {
                backend: BACKEND,
                detail: format!("{server}: {other}"),
            },
        }
    }
}

#[async_trait]
impl SignalSource for PrometheusSource {
    fn kind(&self) -> SignalKind {
        self.kind
    }

    fn poll_interval(&self) -> Option<Duration> {
        self.poll_interval
    }

    async fn sample(&self) -> Result<Reading, SignalError> {
        self.query().await.map(Reading::of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_value_rules() {
        let nan = f64::NAN;
        let inf = f64::INFINITY;
        for (values, ignore, want) in [
            (vec![], true, Some(0.0)),
            (vec![], false, None),
            (vec![nan], true, Some(0.0)),
            (vec![nan], false, None),
            (vec![inf], true, Some(0.0)),
            (vec![-inf], false, None),
            (vec![2.5], false, Some(2.5)),
            (vec![1.0, 2.0], true, None),
        ] {
            let got = single_value(&values, ignore).ok();
            assert_eq!(got, want, "{values:?} ignore={ignore}");
        }
        let err = single_value(&[1.0, 2.0, 3.0], true).unwrap_err();
        assert!(err.to_string().contains("3 series"), "{err}");
        let err = single_value(&[], false).unwrap_err();
        assert!(err.to_string().contains("no series"), "{err}");
    }

    #[test]
    fn default_query_is_the_p95_of_the_histogram() {
        assert_eq!(
            default_query("job_seconds"),
            "histogram_quantile(0.95, sum(rate(job_seconds_bucket[1m])) by (le))"
        );
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let s = PrometheusSettings {
            server_address: "http://127.0.0.1:1".into(),
            query: "up".into(),
            ignore_null_values: true,
            timeout: Duration::from_secs(1),
            auth: PrometheusAuth::Basic {
                username: "u".into(),
                password: Secret::new("hunter2"),
            },
            headers: BTreeMap::new(),
        };
        assert!(!format!("{s:?}").contains("hunter2"));
        let source = PrometheusSource::new(SignalKind::LatencyP95, s).unwrap();
        assert!(!format!("{source:?}").contains("hunter2"));
    }
}
