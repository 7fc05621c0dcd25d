//! The whole acting path end to end, on real components: a tansu broker with a backlog, a
//! Prometheus serving p95, the RunPod emulator with sshd pods, and the `runpod-autoscaler`
//! binary in active mode. The lag buys pods; each is bootstrapped over SSH with
//! `examples/gpu_worker` (which consumes the topic from the pod) and health-checked; the
//! backlog falls to zero; the idle pods are drained and terminated; nothing of ours is left.
#![cfg(feature = "emulator")]

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runpod_autoscaler::clock::SystemClock;
use runpod_autoscaler::emulator::{sshd, RunningEmulator};
use runpod_autoscaler::model::PodState;
use runpod_autoscaler::signals::kafka::{
    KafkaLagSettings, KafkaSecurity, LagOptions, OffsetResetPolicy,
};
use runpod_autoscaler::signals::KafkaLagSource;
use support::{even_commits, example_binary, http_get, Exporter, Prometheus, Tansu};

const KEY: &str = "rpa_e2e_key";
const TOPIC: &str = "e2e-jobs";
const GROUP: &str = "e2e-workers";
/// A generous bound for the whole story on a loaded 2-core machine (it takes ~20 s).
const DEADLINE: Duration = Duration::from_secs(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_bought_for_worked_off_on_pods_and_then_nothing_is_left() {
    let tansu = Tansu::start().await;
    tansu.create_topic(TOPIC, 4).await;
    tansu.produce(TOPIC, 4, 120);
    tansu.commit(GROUP, TOPIC, &even_commits(4, 0));
    let exporter = Exporter::latency("job_latency_seconds").await;
    let prometheus = Prometheus::start(&[exporter.addr]).await;
    let emu = support::active::emulator(KEY).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id_ed25519");
    sshd::generate_key(&key, "rpa-e2e").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[service]
tick_interval = "500ms"
[policy]
max_pods = 2
max_usd_per_hour = 2.0
gpu_type = "NVIDIA RTX A5000"
pod_usd_per_hour = 0.26
lag_per_gpu = 20
scale_down_stabilization = "2s"
idle_timeout = "3s"
warmup_grace = "1s"
[signals]
poll_interval = "500ms"
[signals.queue]
source = "kafka"
bootstrap_servers = "{kafka}"
consumer_group = "{GROUP}"
topics = ["{TOPIC}"]
timeout = "500ms"
[signals.latency]
source = "prometheus"
server_address = "{prometheus}"
metric = "job_latency_seconds"
timeout = "500ms"
[reconcile]
mode = "active"
cluster = "e2e"
state_dir = "{state}"
image = "runpod/base:0.6.2"
ssh_key_file = "{key}"
health_interval = "1s"
unhealthy_after = "10s"
drain_timeout = "20s"
[join]
worker_command = "exec {worker}"
worker_env = {{ WORK_MS_PER_JOB = "40" }}
"#,
            kafka = tansu.servers(),
            prometheus = prometheus.url(),
            state = dir.path().join("state").display(),
            key = key.display(),
            worker = example_binary("gpu_worker").display(),
        ),
    )
    .unwrap();
    let support::active::Serve { mut child, http } =
        support::active::serve(&config, &emu, KEY, "warn", Stdio::null(), &[]);

    let lag = KafkaLagSource::new(
        KafkaLagSettings {
            bootstrap_servers: tansu.servers(),
            group: GROUP.into(),
            topics: vec![TOPIC.into()],
            options: LagOptions {
                offset_reset_policy: OffsetResetPolicy::Earliest,
                allow_idle_consumers: true,
                ..LagOptions::default()
            },
            security: KafkaSecurity::default(),
            timeout: Duration::from_secs(5),
        },
        Arc::new(SystemClock),
    )
    .unwrap();
    let started = Instant::now();
    let (mut joined, mut drained_to_zero) = (false, false);
    let alive = |emu: &RunningEmulator| {
        emu.admin_pods()
            .into_iter()
            .filter(|p| p.status != PodState::Terminated.as_str())
            .count()
    };
    loop {
        assert!(
            started.elapsed() < DEADLINE,
            "not done within {DEADLINE:?}: joined {joined}, backlog gone {drained_to_zero}, pods {:#?}",
            emu.admin_pods()
        );
        if let Some((200, body)) = http_get(http, "/debug/plan").await {
            let plan: serde_json::Value = serde_json::from_str(&body).unwrap();
            let fleet = plan["fleet"].as_array().cloned().unwrap_or_default();
            joined |= !fleet.is_empty() && fleet.iter().all(|e| e["ready"] == true);
        }
        if joined && !drained_to_zero {
            drained_to_zero = lag.poll().await.is_ok_and(|r| r.total_lag == 0);
        }
        if drained_to_zero && alive(&emu) == 0 {
            // The service has confirmed every termination and dropped every claim.
            let confirmed = http_get(http, "/metrics").await.is_some_and(|(_, m)| {
                m.contains("runpod_autoscaler_claims_open 0")
                    && m.contains("runpod_autoscaler_terminations_total{reason=\"planned\"}")
            });
            if confirmed {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Pods were bought and bootstrapped, and the worker on them did the work.
    let pods = emu.admin_pods();
    assert!(!pods.is_empty() && pods.len() <= 4, "{pods:#?}");
    let (_, metrics) = http_get(http, "/metrics").await.unwrap();
    assert!(
        metrics.contains("runpod_autoscaler_launches_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("runpod_autoscaler_terminations_total{reason=\"planned\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("runpod_autoscaler_signal_value{signal=\"latency_p95\"}"),
        "Prometheus read: {metrics}"
    );
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    assert!(child.wait().unwrap().success());
}
