//! The reconciler end to end against the in-process emulator (real sshd pods, real claim store
//! file, one manual clock): a lag spike buys, boots, joins and health-checks pods; when the
//! backlog is gone they are drained and terminated after the idle window; nothing is left.
#![cfg(feature = "emulator")]

mod support;

use std::time::Duration;

use runpod_autoscaler::reconcile::fleet::JoinState;
use support::fleet::{Fleet, FleetConfig};

const TICK: Duration = Duration::from_secs(5);

/// Sets the GPU utilization every pod's `nvidia-smi` reports (as a busy worker would).
fn set_utilization(f: &Fleet, percent: u8) {
    for p in f.alive() {
        if let Some(dir) = &p.pod_dir {
            std::fs::write(
                std::path::Path::new(dir).join(".gpu_utilization"),
                percent.to_string(),
            )
            .unwrap();
        }
    }
}

#[tokio::test]
async fn a_lag_spike_buys_joins_then_drains_and_terminates() {
    let mut f = Fleet::start(FleetConfig::default()).await;

    // Nothing happens without work.
    let report = f.step(TICK).await;
    assert_eq!(report.plan.launches(), 0, "{}", report.plan);
    assert!(f.alive().is_empty());

    // A spike: 300 messages at 100 per GPU → 3 pods, created at once.
    f.lag = 300.0;
    let report = f.step(TICK).await;
    assert_eq!(report.plan.launches(), 3, "{}", report.plan);
    assert_eq!(f.alive().len(), 3);
    assert_eq!(f.reconciler.claims().count(), 3);
    assert!(f.reconciler.claims().all(|c| c.pod.is_some()));
    let mut slots: Vec<u32> = f.reconciler.claims().map(|c| c.key.slot).collect();
    slots.sort();
    assert_eq!(slots, [0, 1, 2]);
    assert!(f.alive().iter().all(|p| p.name.starts_with("rpa-t1-")));

    // Booted (20 s), then joined and healthy.
    let report = f
        .until("every pod joined and ready", TICK, 20, |_, r| {
            r.fleet.len() == 3 && r.fleet.iter().all(|e| e.ready)
        })
        .await;
    assert!(report
        .fleet
        .iter()
        .all(|e| e.join == Some(JoinState::Joined)));
    assert!(f.reconciler.claims().all(|c| c.joined));
    // The workers are busy on the backlog.
    set_utilization(&f, 90);
    // Bootstrapped, as seen on each pod: the worker command ran once, the marker is there.
    for p in f.alive() {
        let home = std::path::PathBuf::from(p.pod_dir.clone().expect("a running pod has a home"));
        assert_eq!(
            std::fs::read_to_string(home.join("worker-started")).unwrap_or_default(),
            "working\n",
            "{}",
            p.name
        );
        assert!(home.join(".runpod-autoscaler/bootstrap.done").exists());
    }
    // No more launches while the demand is met.
    assert_eq!(f.step(TICK).await.plan.launches(), 0);
    assert_eq!(f.alive().len(), 3);

    // The backlog is consumed, but the GPUs are still busy finishing: nothing is removed.
    f.lag = 0.0;
    set_utilization(&f, 90);
    for _ in 0..30 {
        let r = f.step(TICK).await;
        assert_eq!(r.plan.terminations(), 0, "busy pods are kept\n{}", r.plan);
        set_utilization(&f, 90);
    }
    assert_eq!(f.alive().len(), 3);
    // Idle now: after the idle window, drained and gone.
    set_utilization(&f, 0);
    f.until("every pod terminated", TICK, 60, |f, _| {
        f.alive().is_empty() && f.reconciler.claims().count() == 0
    })
    .await;
    f.step(TICK).await;
    let metrics = f.metrics.render();
    assert!(
        metrics.contains("runpod_autoscaler_launches_total{market=\"on_demand\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("runpod_autoscaler_terminations_total{reason=\"planned\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("runpod_autoscaler_claims_open 0"));
}

#[tokio::test]
async fn pods_past_their_lifetime_are_replaced_drained_first() {
    let mut f = Fleet::start(FleetConfig {
        max_pod_lifetime: Some(Duration::from_secs(180)),
        ..FleetConfig::default()
    })
    .await;
    f.lag = 100.0;
    f.until("one pod joined", TICK, 20, |_, r| {
        r.fleet.len() == 1 && r.fleet[0].ready
    })
    .await;
    let first = f.alive()[0].id.clone();
    set_utilization(&f, 0);
    // Past its lifetime it is drained and terminated; a new pod takes over the work.
    let report = f
        .until("the old pod replaced", TICK, 80, |f, r| {
            !f.alive().iter().any(|p| p.id == first) && r.fleet.iter().any(|e| e.ready)
        })
        .await;
    assert_eq!(report.fleet.len(), 1, "{:#?}", report.fleet);
    let metrics = f.metrics.render();
    assert!(
        metrics.contains("runpod_autoscaler_terminations_total{reason=\"lifetime\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_configured_idle_probe_decides_when_a_pod_may_go() {
    let mut f = Fleet::start(FleetConfig {
        idle_command: Some("test ! -e \"$HOME/busy\"".into()),
        ..FleetConfig::default()
    })
    .await;
    f.lag = 100.0;
    f.until("one pod joined", TICK, 20, |_, r| {
        r.fleet.len() == 1 && r.fleet[0].ready
    })
    .await;
    let home = std::path::PathBuf::from(f.alive()[0].pod_dir.clone().unwrap());
    // The probe says busy (GPU utilization would say idle): kept past the idle timeout.
    std::fs::write(home.join("busy"), "").unwrap();
    f.lag = 0.0;
    for _ in 0..30 {
        let r = f.step(TICK).await;
        assert_eq!(r.plan.terminations(), 0, "{}", r.plan);
    }
    std::fs::remove_file(home.join("busy")).unwrap();
    f.until("the idle pod gone", TICK, 60, |f, _| f.alive().is_empty())
        .await;
}
