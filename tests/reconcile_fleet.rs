//! The reconciler end to end against the in-process emulator (real sshd pods, real claim store
//! file, one manual clock): a lag spike buys, boots, joins and health-checks pods; when the
//! backlog is gone they are drained and terminated after the idle window; nothing is left.
#![cfg(feature = "emulator")]

mod support;

use std::time::Duration;

use runpod_autoscaler::reconcile::fleet::JoinState;
use support::fleet::{Fleet, FleetConfig};

const TICK: Duration = Duration::from_secs(5);

/// A health command answering like `nvidia-smi` for one A5000 at the utilization in `file`.
fn fake_gpu(file: &std::path::Path) -> String {
    format!(
        "printf 'NVIDIA RTX A5000, 24564, %s\\n' \"$(cat {} 2>/dev/null || echo 0)\"",
        file.display()
    )
}

#[tokio::test]
async fn a_lag_spike_buys_joins_then_drains_and_terminates() {
    let util = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(util.path(), "80").unwrap();
    let mut f = Fleet::start(FleetConfig {
        health_command: fake_gpu(util.path()),
        ..FleetConfig::default()
    })
    .await;

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
    // No more launches while the demand is met.
    assert_eq!(f.step(TICK).await.plan.launches(), 0);
    assert_eq!(f.alive().len(), 3);

    // The backlog is consumed and the GPUs go idle: after the idle window, drained and gone.
    f.lag = 0.0;
    std::fs::write(util.path(), "0").unwrap();
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
