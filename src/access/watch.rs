//! Health watch: every interval, the provider's view of our pods plus an SSH probe of each
//! RUNNING one (`nvidia-smi` over the pool: liveness and GPU utilization). [`Watch`] turns
//! those observations into events — `online`, `offline` (with the reason), `preempted` (a spot
//! pod the provider stopped: it left RUNNING for EXITED; an on-demand pod stopped the same way
//! is `offline`), `gone`, and
//! `utilization` when a pod's mean GPU utilization moved by [`UTILIZATION_STEP`] points or
//! more. Offline is reported at the first poll that sees it: with the default 30 s interval and
//! a probe bounded by the interval, within a minute. [`Watch`] is pure; [`run`] does the I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{ssh_target, AccessError, PodAccess};
use crate::clock::Clock;
use crate::join::pod::{parse_gpus, PodShell, HEALTH_QUERY};
use crate::model::{PodId, PodState, Timestamp};
use crate::provider::Pod;

/// Change in mean GPU utilization (percentage points) worth an event.
pub const UTILIZATION_STEP: f64 = 10.0;

/// What one poll saw of one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Pod id.
    pub pod: String,
    /// Provider state.
    pub state: PodState,
    /// A spot pod (the provider may stop it at any time).
    pub interruptible: bool,
    /// The SSH probe: per-GPU utilization, or why it failed; `None` when not probed (the pod
    /// is not RUNNING with an SSH port).
    pub probe: Option<Result<Vec<f64>, String>>,
}

/// A change worth reporting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// When it was seen (ms since the epoch).
    pub at: Timestamp,
    /// Pod id.
    pub pod: String,
    /// `online`, `offline`, `preempted`, `gone` or `utilization`.
    pub event: &'static str,
    /// Provider state.
    pub state: String,
    /// Why offline or preempted (provider state or SSH failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Per-GPU utilization in percent, when probed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpu_utilization: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Status {
    Online { mean: f64 },
    Offline,
}

/// What was last reported per pod, with the provider state last seen.
#[derive(Debug, Default)]
pub struct Watch {
    last: BTreeMap<String, (Status, PodState)>,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

impl Watch {
    /// A watch that has seen nothing yet (the first poll reports every pod's status).
    pub fn new() -> Watch {
        Watch::default()
    }

    /// The events one poll's observations (every pod listed) mean, given what came before.
    pub fn observe(&mut self, at: Timestamp, seen: &[Observation]) -> Vec<Event> {
        let mut events = Vec::new();
        let mut next = BTreeMap::new();
        for o in seen {
            if o.state == PodState::Terminated {
                continue;
            }
            let event = |event, reason: Option<String>, util: Vec<f64>| Event {
                at,
                pod: o.pod.clone(),
                event,
                state: o.state.as_str().to_owned(),
                reason,
                gpu_utilization: util,
            };
            let (status, reason, util) = match &o.probe {
                Some(Ok(util)) if o.state == PodState::Running => {
                    (Status::Online { mean: mean(util) }, None, util.clone())
                }
                Some(Err(why)) => (
                    Status::Offline,
                    Some(format!("SSH probe failed: {why}")),
                    Vec::new(),
                ),
                _ => (
                    Status::Offline,
                    Some(if o.state == PodState::Running {
                        "RUNNING without an SSH port".to_owned()
                    } else {
                        format!("provider state {}", o.state.as_str())
                    }),
                    Vec::new(),
                ),
            };
            let last = self.last.get(&o.pod);
            let preempted = o.interruptible
                && o.state == PodState::Exited
                && last.is_some_and(|(_, state)| *state == PodState::Running);
            match (last.map(|(s, _)| s), &status) {
                _ if preempted => events.push(event(
                    "preempted",
                    Some("spot pod stopped by the provider (RUNNING → EXITED)".into()),
                    util,
                )),
                (Some(Status::Online { mean: before }), Status::Online { mean: now }) => {
                    if (now - before).abs() >= UTILIZATION_STEP {
                        events.push(event("utilization", None, util));
                    } else {
                        // Keep the reported level so slow drifts add up to an event.
                        let kept = Status::Online { mean: *before };
                        next.insert(o.pod.clone(), (kept, o.state.clone()));
                        continue;
                    }
                }
                (Some(Status::Offline), Status::Offline) => {}
                (_, Status::Online { .. }) => events.push(event("online", None, util)),
                (_, Status::Offline) => events.push(event("offline", reason, util)),
            }
            next.insert(o.pod.clone(), (status, o.state.clone()));
        }
        for pod in self.last.keys().filter(|p| !next.contains_key(*p)) {
            events.push(Event {
                at,
                pod: pod.clone(),
                event: "gone",
                state: PodState::Terminated.as_str().to_owned(),
                reason: Some("no longer listed (terminated)".into()),
                gpu_utilization: Vec::new(),
            });
        }
        self.last = next;
        events
    }
}

/// Probes one pod: `nvidia-smi` over SSH within `timeout`.
async fn probe(access: &PodAccess, pod: &Pod, spot: bool, timeout: Duration) -> Observation {
    let probe = match ssh_target(pod) {
        Err(_) => None,
        Ok(target) => {
            let id = pod.id.as_str();
            let out = access.pool().run(id, &target, HEALTH_QUERY, timeout).await;
            Some(match out {
                Err(e) => Err(e.to_string()),
                Ok(o) => parse_gpus(&o)
                    .map(|g| g.iter().map(|g| g.utilization).collect())
                    .map_err(|e| e.to_string()),
            })
        }
    };
    Observation {
        pod: pod.id.to_string(),
        state: pod.state.clone(),
        interruptible: spot,
        probe,
    }
}

/// Polls every `interval` until `stop`, handing each event to `emit`. A rejected API key ends
/// the watch with the error; other provider failures are reported through `on_error` and the
/// next poll tries again.
pub async fn run(
    access: &PodAccess,
    clock: Arc<dyn Clock>,
    interval: Duration,
    stop: CancellationToken,
    mut emit: impl FnMut(Event),
    mut on_error: impl FnMut(AccessError),
) -> Result<(), AccessError> {
    let mut watch = Watch::new();
    // Which pods are spot: a pod's kind is fixed for its life, so the provider is asked again
    // only when a pod not classified yet is listed.
    let mut spot = BTreeSet::<PodId>::new();
    let mut classified = BTreeSet::<PodId>::new();
    // A probe never outlives the poll period (and never takes more than 10 s).
    let probe_timeout = interval.min(Duration::from_secs(10));
    loop {
        match access.pods().await {
            Err(AccessError::BadApiKey) => return Err(AccessError::BadApiKey),
            Err(e) => on_error(e),
            Ok(pods) => {
                if pods.iter().any(|p| !classified.contains(&p.id)) {
                    match access.provider().interruptible().await {
                        Ok(ids) => {
                            classified.extend(pods.iter().map(|p| p.id.clone()));
                            spot.extend(ids);
                        }
                        // Unclassified pods count as on-demand until a later poll can tell.
                        Err(e) => on_error(AccessError::from_provider(e)),
                    }
                }
                let seen = join_all(
                    pods.iter()
                        .map(|p| probe(access, p, spot.contains(&p.id), probe_timeout)),
                )
                .await;
                for e in watch.observe(clock.now(), &seen) {
                    emit(e);
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(pod: &str, state: PodState, probe: Option<Result<Vec<f64>, String>>) -> Observation {
        Observation {
            pod: pod.into(),
            state,
            interruptible: false,
            probe,
        }
    }

    fn kinds(events: &[Event]) -> Vec<(&str, &str)> {
        events.iter().map(|e| (e.pod.as_str(), e.event)).collect()
    }

    #[test]
    fn transitions_are_reported_once() {
        let mut w = Watch::new();
        let t = Timestamp::from_secs(100);
        let up = |u: f64| obs("a", PodState::Running, Some(Ok(vec![u])));
        let first = w.observe(t, &[up(5.0), obs("b", PodState::Starting, None)]);
        assert_eq!(kinds(&first), [("a", "online"), ("b", "offline")]);
        assert_eq!(first[0].gpu_utilization, [5.0]);
        assert_eq!(first[1].reason.as_deref(), Some("provider state STARTING"));
        assert!(w
            .observe(t, &[up(9.0), obs("b", PodState::Starting, None)])
            .is_empty());

        // Utilization drifting by 3 points a poll is reported once it adds up to 10.
        assert!(w.observe(t, &[up(12.0)]).len() == 1, "b gone");
        let e = w.observe(t, &[up(16.0)]);
        assert_eq!(kinds(&e), [("a", "utilization")]);

        // SSH stops answering on a RUNNING pod: offline with the reason; back: online.
        let e = w.observe(
            t,
            &[obs("a", PodState::Running, Some(Err("refused".into())))],
        );
        assert_eq!(kinds(&e), [("a", "offline")]);
        assert!(e[0].reason.as_deref().unwrap().contains("refused"));
        let e = w.observe(t, &[obs("a", PodState::Exited, None)]);
        assert!(e.is_empty(), "still offline");
        let e = w.observe(t, &[up(0.0)]);
        assert_eq!(kinds(&e), [("a", "online")]);
        let e = w.observe(t, &[obs("a", PodState::Terminated, None)]);
        assert_eq!(kinds(&e), [("a", "gone")]);
    }

    #[test]
    fn a_spot_pod_leaving_running_for_exited_is_preempted() {
        let mut w = Watch::new();
        let t = Timestamp::from_secs(100);
        let spot = |state, probe| Observation {
            interruptible: true,
            ..obs("s", state, probe)
        };
        let up = || Some(Ok(vec![50.0]));
        let first = w.observe(
            t,
            &[
                spot(PodState::Running, up()),
                obs("d", PodState::Running, up()),
            ],
        );
        assert_eq!(kinds(&first), [("s", "online"), ("d", "online")]);
        // Both stop: the spot one was preempted, the on-demand one is offline.
        let e = w.observe(
            t,
            &[
                spot(PodState::Exited, None),
                obs("d", PodState::Exited, None),
            ],
        );
        assert_eq!(kinds(&e), [("s", "preempted"), ("d", "offline")]);
        assert_eq!(e[0].state, "EXITED");
        let again = [
            spot(PodState::Exited, None),
            obs("d", PodState::Exited, None),
        ];
        assert!(w.observe(t, &again).is_empty(), "reported once");

        // Already unreachable over SSH while RUNNING, then EXITED: still preempted.
        let mut w = Watch::new();
        w.observe(t, &[spot(PodState::Running, Some(Err("refused".into())))]);
        let e = w.observe(t, &[spot(PodState::Exited, None)]);
        assert_eq!(kinds(&e), [("s", "preempted")]);
        // A spot pod first seen EXITED, or stopped before it ever ran: offline, not preempted.
        let mut w = Watch::new();
        let e = w.observe(t, &[spot(PodState::Starting, None)]);
        assert_eq!(kinds(&e), [("s", "offline")]);
        assert!(w.observe(t, &[spot(PodState::Exited, None)]).is_empty());
        let e = Watch::new().observe(t, &[spot(PodState::Exited, None)]);
        assert_eq!(kinds(&e), [("s", "offline")]);
    }
}
