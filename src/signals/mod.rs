//! Demand signals: queue lag and p95 latency, sampled on intervals and kept as [`Series`].
//! Sources sit behind [`SignalSource`]; this module decides nothing.

mod series;
pub mod source;

pub use series::{Sample, Series, Signals};
pub use source::{SignalError, SignalKind, SignalSource, StaticSource};
