//! Observation: provider pods → the planner's [`ClusterView`]. Pure apart from its memory of
//! when each pod was first seen, which stands in for a creation time the provider does not
//! report (a pod without one must age like any other, not stay "just created" forever).

use std::collections::HashMap;

use crate::decide::{ClusterView, PodView};
use crate::model::{PodId, PodState, Timestamp};
use crate::provider::Pod;

/// Remembers when each pod was first seen; builds views.
#[derive(Debug, Default)]
pub struct PodObserver {
    first_seen: HashMap<PodId, Timestamp>,
}

impl PodObserver {
    /// An observer that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The planner's view of `pods` (one complete listing of ours) at `now`. Terminated pods are
    /// left out; pods no longer listed are forgotten.
    pub fn view(&mut self, pods: &[Pod], baseline_gpus: u32, now: Timestamp) -> ClusterView {
        self.first_seen
            .retain(|id, _| pods.iter().any(|p| &p.id == id));
        let views = pods
            .iter()
            .filter(|p| p.state != PodState::Terminated)
            .map(|p| {
                let first_seen = *self.first_seen.entry(p.id.clone()).or_insert(now);
                pod_view(p, first_seen)
            })
            .collect();
        ClusterView {
            synced: true,
            baseline_gpus,
            pods: views,
        }
    }
}

/// One pod as the planner sees it; `first_seen` dates it when the provider gives no creation
/// time (or one later than when we first saw it, e.g. a skewed clock).
pub fn pod_view(pod: &Pod, first_seen: Timestamp) -> PodView {
    PodView {
        id: pod.id.clone(),
        state: pod.state.clone(),
        gpus: pod.gpu_count,
        usd_per_hour: pod.usd_per_hour,
        created_at: pod.created_at.map_or(first_seen, |c| c.min(first_seen)),
        ready: pod.is_ready(),
        last_busy_at: None,
        draining: false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::decide::{decide, Hold, PodTemplate, Policy, PolicyKind, Reason, Series, Signals};
    use crate::decide::{Sample, Step};
    use crate::model::{GpuTypeId, Usd};
    use crate::provider::SshEndpoint;

    fn pod(id: &str, state: PodState, created_at: Option<Timestamp>, ssh: bool) -> Pod {
        Pod {
            id: PodId::from(id),
            name: format!("rpa-{id}"),
            state,
            gpu_type: Some(GpuTypeId::from("NVIDIA RTX A5000")),
            gpu_count: 1,
            usd_per_hour: Usd(0.26),
            created_at,
            ssh: ssh.then(|| SshEndpoint {
                host: "127.0.0.1".into(),
                port: 2222,
                username: "root".into(),
            }),
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn a_pod_without_a_creation_time_ages_from_when_it_was_first_seen() {
        let t0 = Timestamp::from_secs(1_000_000);
        let mut observer = PodObserver::new();
        let pods = vec![pod("anon", PodState::Provisioning, None, false)];
        let first = observer.view(&pods, 0, t0);
        assert_eq!(first.pods[0].created_at, t0);
        // Eleven minutes later it is eleven minutes old, not created "now".
        let later = t0.plus(Duration::from_secs(660));
        let view = observer.view(&pods, 0, later);
        assert_eq!(view.pods[0].created_at, t0);
        assert!(view.pods[0].is_boot_overdue(later, Duration::from_secs(600)));

        // So the planner replaces it at the boot deadline.
        let policy = Policy {
            kind: PolicyKind::Target,
            min_pods: 0,
            max_pods: 4,
            max_usd_per_hour: Usd(4.0),
            max_launches_per_tick: 5,
            pod: PodTemplate {
                gpu_type: GpuTypeId::from("NVIDIA RTX A5000"),
                gpus: 1,
                usd_per_hour: Usd(0.26),
            },
            lag_per_gpu: 100.0,
            slo_p95_seconds: 30.0,
            latency_step_gpus: 1,
            scale_down_stabilization: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(300),
            warmup_grace: Duration::from_secs(180),
            boot_deadline: Duration::from_secs(600),
            stale_after_intervals: 3,
        };
        let mut queue = Series::new(Duration::from_secs(5), Duration::from_secs(600));
        queue.push(Sample::at(100.0, later));
        let signals = Signals {
            queue,
            latency: None,
        };
        let plan = decide(&view, &signals, &policy, later);
        assert!(
            plan.steps.iter().any(|s| matches!(
                s,
                Step::Terminate {
                    reason: Reason::BootTimeout { .. },
                    ..
                }
            )),
            "{plan}"
        );
        assert_eq!(plan.launches(), 1, "{plan}");
        assert!(!plan.holds.contains(&Hold::NotSynced));
    }

    #[test]
    fn views_keep_provider_times_readiness_and_forget_gone_pods() {
        let t0 = Timestamp::from_secs(2_000_000);
        let created = Timestamp::from_secs(1_999_000);
        let mut observer = PodObserver::new();
        let pods = vec![
            pod("ready", PodState::Running, Some(created), true),
            pod("no-ssh", PodState::Running, Some(created), false),
            pod("gone", PodState::Terminated, Some(created), false),
        ];
        let view = observer.view(&pods, 2, t0);
        assert_eq!(view.baseline_gpus, 2);
        assert_eq!(view.pods.len(), 2, "terminated pods are not in the view");
        assert!(view.pods[0].ready && !view.pods[1].ready);
        assert_eq!(view.pods[0].created_at, created);
        // A creation time after we first saw the pod (clock skew) does not make it younger.
        let skewed = vec![pod(
            "late",
            PodState::Running,
            Some(t0.plus(Duration::from_secs(90))),
            true,
        )];
        let view = observer.view(&skewed, 0, t0);
        assert_eq!(view.pods[0].created_at, t0);
        assert_eq!(observer.first_seen.len(), 1, "unlisted pods are forgotten");
    }
}
