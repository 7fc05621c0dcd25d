//! Retry timing: bounded, jittered exponential backoff, `Retry-After`/`RateLimit` parsing, and an
//! injectable [`Sleeper`] so tests control how waiting happens.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;

/// How the client retries rate limits and transient failures.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles each time.
    pub base_delay: Duration,
    /// Backoff never exceeds this (Retry-After may).
    pub max_delay: Duration,
    /// A Retry-After longer than this is not waited for: the call fails with `RateLimited` and
    /// the caller's next tick tries again.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            // Four attempts over ~0.5 + 1 + 2 s ride out a RunPod blip without holding a
            // reconciler tick (5 s) much longer than one period.
            max_attempts: 4,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            // RunPod's per-minute quota resets within 60 s; waiting longer belongs to the next tick.
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Full-jitter backoff before attempt `attempt + 1` (attempt counts from 1): a uniform
    /// random duration in [d/2, d] where d = min(base × 2^(attempt-1), max_delay).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let d = exp.min(self.max_delay);
        let factor: f64 = rand::rng().random_range(0.5..=1.0);
        d.mul_f64(factor)
    }
}

/// How the client waits between attempts. Tests can inject one that records or shortens waits.
pub trait Sleeper: Send + Sync + 'static {
    /// Waits for `d`.
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Waits on the tokio timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// A shared sleeper.
pub type SharedSleeper = Arc<dyn Sleeper>;

/// How long a 429 asks to wait: the larger of `Retry-After` (seconds) and the reset time of
/// the `RateLimit` header (`t=` in the structured form, `reset=` in the older one).
pub fn parse_wait(retry_after: Option<&str>, ratelimit: Option<&str>) -> Option<Duration> {
    let ra = retry_after
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64);
    let rl = ratelimit.and_then(|v| {
        v.split([';', ','])
            .filter_map(|part| {
                let (k, val) = part.trim().split_once('=')?;
                matches!(k.trim(), "t" | "reset")
                    .then(|| val.trim().parse::<u64>().ok())
                    .flatten()
            })
            .max()
            .map(Duration::from_secs)
    });
    match (ra, rl) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_parsed_leniently() {
        assert_eq!(parse_wait(Some("2"), None), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_wait(Some("1"), Some("\"default\";r=0;t=30")),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_wait(None, Some("limit=60, remaining=0, reset=7")),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse_wait(Some("soon"), Some("garbage")), None);
        assert_eq!(parse_wait(Some("-3"), None), None);
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let p = RetryPolicy::default();
        for attempt in 1..40 {
            let d = p.backoff(attempt);
            assert!(d <= p.max_delay, "{d:?}");
            let nominal = p
                .base_delay
                .saturating_mul(1u32 << (attempt - 1).min(16))
                .min(p.max_delay);
            assert!(d >= nominal / 2, "{d:?} < half of {nominal:?}");
        }
    }
}
