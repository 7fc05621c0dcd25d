//! Demand signal sources: queue lag and p95 latency, polled by the service into the planner's
//! [`crate::decide::Series`].
//! Sources sit behind [`SignalSource`]: [`StaticSource`], [`kafka::KafkaLagSource`] (rdkafka) and
//! [`prometheus::PrometheusSource`] (prometheus-http-query). This module decides nothing.

pub mod kafka;
pub mod prometheus;
pub mod source;

pub use kafka::KafkaLagSource;
pub use prometheus::PrometheusSource;
pub use source::{SignalError, SignalSource, StaticSource};
