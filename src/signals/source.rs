//! The [`SignalSource`] trait every demand signal implements, and the static source used when
//! nothing else is installed (fixed values from the configuration).

use async_trait::async_trait;

use crate::model::{Reading, SignalKind};

/// Why a sample could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// The backend could not be reached (connection refused, DNS, TLS).
    #[error("{backend} unreachable: {detail}")]
    Unreachable {
        /// Which backend.
        backend: &'static str,
        /// What failed.
        detail: String,
    },
    /// The backend did not answer in time.
    #[error("{backend} did not answer within {timeout_ms} ms")]
    Timeout {
        /// Which backend.
        backend: &'static str,
        /// The timeout.
        timeout_ms: u64,
    },
    /// A named object does not exist (unknown topic or consumer group).
    #[error("{backend}: {detail}")]
    NotFound {
        /// Which backend.
        backend: &'static str,
        /// What is missing and how to fix it.
        detail: String,
    },
    /// Authentication or authorization failed.
    #[error("{backend}: {detail}")]
    Unauthorized {
        /// Which backend.
        backend: &'static str,
        /// What failed and what to check.
        detail: String,
    },
    /// The request itself is wrong (bad query, rejected client configuration).
    #[error("{backend}: {detail}")]
    InvalidRequest {
        /// Which backend.
        backend: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The answer holds no usable value (no series, NaN or ±Inf while nulls are not ignored).
    #[error("{backend}: {detail}")]
    NoValue {
        /// Which backend.
        backend: &'static str,
        /// What came back and what to change.
        detail: String,
    },
    /// The query returned more than one series where exactly one is needed.
    #[error("{backend}: the query returned {count} series, exactly one is needed; aggregate it (e.g. with sum(...) or a label matcher)")]
    SeveralSeries {
        /// Which backend.
        backend: &'static str,
        /// How many series came back.
        count: usize,
    },
    /// The backend answered, but the answer cannot be used.
    #[error("{backend}: {detail}")]
    BadAnswer {
        /// Which backend.
        backend: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

impl SignalError {
    /// True when polling again may succeed without a configuration change.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SignalError::Unreachable { .. }
                | SignalError::Timeout { .. }
                | SignalError::NoValue { .. }
        )
    }
}

/// A source of one demand signal. Implementations keep their connections between polls and
/// bound every poll with a timeout.
#[async_trait]
pub trait SignalSource: Send + Sync + 'static {
    /// The signal produced.
    fn kind(&self) -> SignalKind;
    /// The source's own poll interval; `None` uses the service default (`signals.poll_interval`).
    fn poll_interval(&self) -> Option<std::time::Duration> {
        None
    }
    /// Takes one sample.
    async fn sample(&self) -> Result<Reading, SignalError>;
}

/// A source that always reads the same value: for demos and for running without Kafka or
/// Prometheus.
#[derive(Debug, Clone, Copy)]
pub struct StaticSource {
    kind: SignalKind,
    value: f64,
}

impl StaticSource {
    /// A source of `kind` that always reads `value`.
    pub fn new(kind: SignalKind, value: f64) -> Self {
        StaticSource { kind, value }
    }
}

#[async_trait]
impl SignalSource for StaticSource {
    fn kind(&self) -> SignalKind {
        self.kind
    }

    async fn sample(&self) -> Result<Reading, SignalError> {
        Ok(Reading::of(self.value))
    }
}
