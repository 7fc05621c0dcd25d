//! The shared board where samplers post signal samples and the tick loop reads them.
//! A std mutex guards it; it is never held across an `.await`.

use std::sync::Mutex;
use std::time::Duration;

use crate::decide::{Sample, Series, Signals};
use crate::model::{Reading, SignalKind, Timestamp};
use crate::signals::SignalError;
use crate::snapshot::SignalStatus;

#[derive(Debug, Default, Clone)]
struct Health {
    failures: u64,
    last_error: Option<String>,
}

#[derive(Debug)]
struct Inner {
    signals: Signals,
    queue: Health,
    latency: Health,
}

/// Latest samples and poll health of every signal.
#[derive(Debug)]
pub struct SignalBoard {
    inner: Mutex<Inner>,
}

impl SignalBoard {
    /// A board for the queue signal (polled every `queue_interval`) and, when
    /// `latency_interval` is set, the latency signal; samples are kept for `retention`.
    pub fn new(
        queue_interval: Duration,
        latency_interval: Option<Duration>,
        retention: Duration,
    ) -> Self {
        SignalBoard {
            inner: Mutex::new(Inner {
                signals: Signals {
                    queue: Series::new(queue_interval, retention),
                    latency: latency_interval.map(|i| Series::new(i, retention)),
                },
                queue: Health::default(),
                latency: Health::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the data half-written (every update is a
        // single push or assignment), so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one poll result taken at `now`. Returns true when it raised the queue lag (a
    /// fresh value above the previous one): demand may have grown, worth a tick at once.
    pub fn record(
        &self,
        kind: SignalKind,
        result: &Result<Reading, SignalError>,
        now: Timestamp,
    ) -> bool {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let (series, health) = match kind {
            SignalKind::QueueLag => (Some(&mut inner.signals.queue), &mut inner.queue),
            SignalKind::LatencyP95 => (inner.signals.latency.as_mut(), &mut inner.latency),
        };
        let before = series.as_ref().and_then(|s| s.latest()).map(|s| s.value);
        let mut raised = false;
        match result {
            Ok(reading) => {
                let value = reading.value;
                raised = kind == SignalKind::QueueLag && before.is_none_or(|b| value > b);
                let kept = series.is_some_and(|s| {
                    s.push(Sample {
                        value,
                        observed_at: now,
                        max_workers: reading.max_workers,
                    })
                });
                raised &= kept;
                if kept {
                    health.last_error = None;
                } else {
                    health.failures += 1;
                    health.last_error = Some(format!("unusable value {value}"));
                }
            }
            Err(e) => {
                health.failures += 1;
                health.last_error = Some(e.to_string());
            }
        }
        raised
    }

    /// A copy of the current signals for the planner.
    pub fn signals(&self) -> Signals {
        self.lock().signals.clone()
    }

    /// Health of every configured signal at `now`.
    pub fn status(&self, now: Timestamp, stale_after_intervals: u32) -> Vec<SignalStatus> {
        let inner = self.lock();
        let mut out = Vec::with_capacity(2);
        let entries = [
            (
                SignalKind::QueueLag,
                Some(&inner.signals.queue),
                &inner.queue,
            ),
            (
                SignalKind::LatencyP95,
                inner.signals.latency.as_ref(),
                &inner.latency,
            ),
        ];
        for (signal, series, health) in entries {
            let Some(series) = series else { continue };
            out.push(SignalStatus {
                poll_interval: series.poll_interval,
                signal,
                value: series.latest().map(|s| s.value),
                age: series.age(now),
                fresh: series.is_fresh(now, stale_after_intervals),
                failures: health.failures,
                last_error: health.last_error.clone(),
            });
        }
        out
    }
}
