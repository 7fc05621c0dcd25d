//! Domain newtypes shared by every module: time, money, pod and GPU identities, pod states.
//! Nothing here does I/O.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time, in milliseconds since the Unix epoch. Produced by a [`crate::clock::Clock`],
/// never read from the system inside pure code.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// A timestamp `secs` seconds after the epoch.
    pub const fn from_secs(secs: u64) -> Self {
        Timestamp(secs * 1000)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`; zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_millis(d)))
    }

    /// `self - d`, saturating at the epoch.
    pub fn minus(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(duration_millis(d)))
    }

    /// Converts a system time (before the epoch → the epoch).
    pub fn from_system(t: SystemTime) -> Timestamp {
        Timestamp(
            t.duration_since(UNIX_EPOCH)
                .map(duration_millis)
                .unwrap_or(0),
        )
    }

    /// The system time this timestamp denotes.
    pub fn to_system(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_millis(self.to_system()))
    }
}

/// US dollars (per hour where the name says so). Plain `f64`: prices are fractional cents and
/// comparisons against limits use [`Usd::EPSILON`].
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Usd(pub f64);

impl Usd {
    /// Tolerance for money comparisons: a tenth of a cent absorbs float rounding of sums.
    pub const EPSILON: f64 = 1e-6;

    /// The amount in dollars.
    pub fn dollars(self) -> f64 {
        self.0
    }
}

impl std::ops::Add for Usd {
    type Output = Usd;
    fn add(self, rhs: Usd) -> Usd {
        Usd(self.0 + rhs.0)
    }
}

impl std::iter::Sum for Usd {
    fn sum<I: Iterator<Item = Usd>>(iter: I) -> Usd {
        Usd(iter.map(|u| u.0).sum())
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${:.2}", self.0)
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_owned())
            }
        }
    };
}

string_id!(
    /// A RunPod pod id (e.g. `3lrlq2ijz4sqdz`).
    PodId
);
string_id!(
    /// A RunPod GPU type id, exactly as RunPod spells it (e.g. `NVIDIA RTX A5000`).
    GpuTypeId
);

/// A RunPod pod's lifecycle status. Unknown values from the API are kept, not rejected.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum PodState {
    /// Being placed on a host; billing may already run.
    Provisioning,
    /// Container starting (image pull, boot).
    Starting,
    /// Container running (not necessarily reachable yet).
    Running,
    /// Stopped (by us, by the user, or by spot preemption); holds its disk.
    Exited,
    /// Failed.
    Error,
    /// Gone for good.
    Terminated,
    /// A status this version does not know.
    Unknown(String),
}

impl PodState {
    /// True while the pod is, or is becoming, a worker.
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            PodState::Provisioning | PodState::Starting | PodState::Running | PodState::Unknown(_)
        )
    }

    /// True for pods that still exist but will never serve without intervention.
    pub fn is_dead(&self) -> bool {
        matches!(self, PodState::Exited | PodState::Error)
    }

    /// The API's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            PodState::Provisioning => "PROVISIONING",
            PodState::Starting => "STARTING",
            PodState::Running => "RUNNING",
            PodState::Exited => "EXITED",
            PodState::Error => "ERROR",
            PodState::Terminated => "TERMINATED",
            PodState::Unknown(s) => s,
        }
    }
}

impl From<String> for PodState {
    fn from(s: String) -> Self {
        match s.to_ascii_uppercase().as_str() {
            "PROVISIONING" | "CREATED" => PodState::Provisioning,
            "STARTING" => PodState::Starting,
            "RUNNING" => PodState::Running,
            "EXITED" => PodState::Exited,
            "ERROR" => PodState::Error,
            "TERMINATED" => PodState::Terminated,
            _ => PodState::Unknown(s),
        }
    }
}

impl From<PodState> for String {
    fn from(s: PodState) -> String {
        s.as_str().to_owned()
    }
}

impl fmt::Display for PodState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which RunPod cloud a pod runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    /// RunPod's own data centers.
    Secure,
    /// Community hosts (cheaper, less reliable).
    Community,
}

impl Cloud {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Cloud::Secure => "SECURE",
            Cloud::Community => "COMMUNITY",
        }
    }
}

/// One poll of a demand signal.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reading {
    /// The value: queue lag in messages, or latency in seconds.
    pub value: f64,
    /// The most workers this work can keep busy at once (Kafka: the partitions that count,
    /// since a partition feeds one consumer of the group); `None` when unlimited.
    pub max_workers: Option<u32>,
}

impl Reading {
    /// A reading without a worker limit.
    pub fn of(value: f64) -> Reading {
        Reading {
            value,
            max_workers: None,
        }
    }
}

/// A secret string (API key, private key, credential). Debug and Display print `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// Which signal a source produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    /// Messages waiting in the job queue (Kafka consumer-group lag).
    QueueLag,
    /// p95 job latency in seconds.
    LatencyP95,
}

impl SignalKind {
    /// What it is, in words (plans and logs).
    pub fn describe(self) -> &'static str {
        match self {
            SignalKind::QueueLag => "queue lag",
            SignalKind::LatencyP95 => "p95 latency",
        }
    }

    /// A short label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SignalKind::QueueLag => "queue_lag",
            SignalKind::LatencyP95 => "latency_p95",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_pod_states_are_kept() {
        let s: PodState = serde_json::from_str("\"HIBERNATING\"").unwrap();
        assert_eq!(s, PodState::Unknown("HIBERNATING".into()));
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"HIBERNATING\"");
        let r: PodState = serde_json::from_str("\"RUNNING\"").unwrap();
        assert_eq!(r, PodState::Running);
    }

    #[test]
    fn timestamps_saturate() {
        let a = Timestamp::from_secs(10);
        let b = Timestamp::from_secs(4);
        assert_eq!(a.saturating_since(b), Duration::from_secs(6));
        assert_eq!(b.saturating_since(a), Duration::ZERO);
        assert_eq!(b.minus(Duration::from_secs(100)), Timestamp::EPOCH);
        assert_eq!(a.to_string(), "1970-01-01T00:00:10.000Z");
    }
}
