//! Timestamped samples of one signal, kept for a bounded window. Pure data: the planner reads
//! it, the sampler appends to it.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use crate::model::Timestamp;

/// One observation of a signal.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// The observed value (queue lag in messages, or latency in seconds).
    pub value: f64,
    /// When it was observed.
    pub observed_at: Timestamp,
    /// The most workers this work can keep busy (see [`crate::model::Reading`]).
    pub max_workers: Option<u32>,
}

impl Sample {
    /// A sample of `value` at `observed_at`, without a worker limit.
    pub fn at(value: f64, observed_at: Timestamp) -> Sample {
        Sample {
            value,
            observed_at,
            max_workers: None,
        }
    }
}

/// Recent samples of one signal, oldest first, bounded by a retention window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    /// How often the source is polled; freshness is judged in multiples of it.
    pub poll_interval: Duration,
    retention: Duration,
    samples: VecDeque<Sample>,
    last_nonzero_at: Option<Timestamp>,
}

impl Series {
    /// An empty series polled every `poll_interval`, keeping samples for `retention`.
    pub fn new(poll_interval: Duration, retention: Duration) -> Self {
        Series {
            poll_interval,
            retention,
            samples: VecDeque::new(),
            last_nonzero_at: None,
        }
    }

    /// Appends a sample. Non-finite or negative values and samples older than the latest are
    /// dropped (a failed read must never look like zero demand). Returns whether it was kept.
    pub fn push(&mut self, sample: Sample) -> bool {
        if !sample.value.is_finite() || sample.value < 0.0 {
            return false;
        }
        if self
            .latest()
            .is_some_and(|l| sample.observed_at < l.observed_at)
        {
            return false;
        }
        if sample.value > 0.0 {
            self.last_nonzero_at = Some(sample.observed_at);
        }
        self.samples.push_back(sample);
        let horizon = sample.observed_at.minus(self.retention);
        // Keep one sample at or before the horizon so the window is always covered.
        while self.samples.len() > 1 && self.samples[1].observed_at <= horizon {
            self.samples.pop_front();
        }
        true
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<Sample> {
        self.samples.back().copied()
    }

    /// The sample before the newest.
    pub fn previous(&self) -> Option<Sample> {
        self.samples.len().checked_sub(2).map(|i| self.samples[i])
    }

    /// When the value was last above zero, if ever seen.
    pub fn last_nonzero_at(&self) -> Option<Timestamp> {
        self.last_nonzero_at
    }

    /// Samples observed at or after `since`, oldest first.
    pub fn since(&self, since: Timestamp) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.observed_at >= since)
    }

    /// Age of the newest sample at `now`; `None` when there is none.
    pub fn age(&self, now: Timestamp) -> Option<Duration> {
        self.latest().map(|s| now.saturating_since(s.observed_at))
    }

    /// True when the newest sample is no older than `intervals` poll intervals.
    pub fn is_fresh(&self, now: Timestamp, intervals: u32) -> bool {
        self.age(now)
            .is_some_and(|age| age <= self.poll_interval.saturating_mul(intervals))
    }

    /// Number of retained samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when no sample was ever kept.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// The planner's view of demand: queue lag and, when configured, p95 latency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Signals {
    /// Kafka consumer-group lag (messages waiting).
    pub queue: Series,
    /// p95 job latency in seconds; `None` when no latency source is configured.
    pub latency: Option<Series>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: f64, t: u64) -> Sample {
        Sample::at(v, Timestamp::from_secs(t))
    }

    #[test]
    fn keeps_only_the_retention_window_plus_one() {
        let mut series = Series::new(Duration::from_secs(5), Duration::from_secs(20));
        for t in (0..=100).step_by(5) {
            assert!(series.push(s(t as f64, t)));
        }
        assert_eq!(series.since(Timestamp::from_secs(80)).count(), 5);
        assert!(series.len() <= 6, "len {}", series.len());
        assert_eq!(series.latest(), Some(s(100.0, 100)));
    }

    #[test]
    fn rejects_bad_and_out_of_order_samples() {
        let mut series = Series::new(Duration::from_secs(5), Duration::from_secs(60));
        assert!(series.push(s(3.0, 10)));
        assert!(!series.push(s(f64::NAN, 11)));
        assert!(!series.push(s(-1.0, 12)));
        assert!(!series.push(s(f64::INFINITY, 13)));
        assert!(!series.push(s(1.0, 9)));
        assert!(series.push(s(0.0, 20)));
        assert_eq!(series.len(), 2);
        assert!(!series.is_empty());
        assert!(Series::new(Duration::from_secs(5), Duration::from_secs(60)).is_empty());
        assert_eq!(series.last_nonzero_at(), Some(Timestamp::from_secs(10)));
    }

    #[test]
    fn freshness_is_measured_in_poll_intervals() {
        let mut series = Series::new(Duration::from_secs(5), Duration::from_secs(60));
        assert!(!series.is_fresh(Timestamp::from_secs(0), 3));
        series.push(s(1.0, 100));
        assert!(series.is_fresh(Timestamp::from_secs(115), 3));
        assert!(!series.is_fresh(Timestamp::from_secs(116), 3));
    }
}
