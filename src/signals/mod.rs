//! Demand signals: queue lag and p95 latency, sampled on intervals and kept as [`Series`].
//! Sources sit behind [`SignalSource`]: [`StaticSource`], [`kafka::KafkaLagSource`] (rdkafka) and
//! [`prometheus::PrometheusSource`] (prometheus-http-query). This module decides nothing.

pub mod kafka;
pub mod prometheus;
mod series;
pub mod source;

pub use kafka::KafkaLagSource;
pub use prometheus::PrometheusSource;
pub use series::{Sample, Series, Signals};
pub use source::{SignalError, SignalKind, SignalSource, StaticSource};
