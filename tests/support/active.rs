//! The binary in active mode against a local emulator: what the end-to-end suites share.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use runpod_autoscaler::clock::SystemClock;
use runpod_autoscaler::emulator::{EmulatorConfig, RunningEmulator};
use runpod_autoscaler::model::Secret;

/// A running `serve`.
pub struct Serve {
    /// The process (killed by its owner).
    pub child: Child,
    /// Its HTTP listener (`/debug/plan`, `/metrics`).
    pub http: SocketAddr,
}

/// Starts `serve --config config` on free ports against `emu` with API key `key`, `RUST_LOG`
/// at `log`, stderr to `stderr` and the `env` overrides; returns once it is listening.
pub fn serve(
    config: &Path,
    emu: &RunningEmulator,
    key: &str,
    log: &str,
    stderr: Stdio,
    env: &[(&str, String)],
) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_runpod-autoscaler"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .env("RUNPOD_API_URL", emu.api_url())
        .env("RUNPOD_GRAPHQL_URL", emu.graphql_url())
        .env("RUNPOD_API_KEY", key)
        .env("RUST_LOG", log)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("starting runpod-autoscaler");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("reading the listening line");
    assert!(
        line.contains("listening"),
        "the service did not start: {line:?}"
    );
    let listening: serde_json::Value = serde_json::from_str(&line).unwrap();
    let http = listening["http"].as_str().unwrap().parse().unwrap();
    Serve { child, http }
}

/// The emulator on a free port with API key `key`, pods booting in 1 s with an sshd each, on the
/// system clock.
pub async fn emulator(key: &str) -> RunningEmulator {
    RunningEmulator::start_local(
        EmulatorConfig {
            api_keys: vec![Secret::new(key)],
            boot_delay: Duration::from_secs(1),
            ..EmulatorConfig::default()
        },
        Arc::new(SystemClock),
    )
    .await
    .unwrap()
}

/// A one-GPU A5000 pod in the secure cloud whose sshd authorizes `public_key` (`PUBLIC_KEY`).
pub fn ssh_pod(name: &str, public_key: &str) -> runpod_autoscaler::provider::LaunchSpec {
    runpod_autoscaler::provider::LaunchSpec {
        name: name.into(),
        gpu_type: runpod_autoscaler::model::GpuTypeId("NVIDIA RTX A5000".into()),
        gpu_count: 1,
        cloud: runpod_autoscaler::provider::Cloud::Secure,
        image: "runpod/base:0.6.2".into(),
        env: [("PUBLIC_KEY".to_owned(), public_key.to_owned())].into(),
        spot_bid_per_gpu: None,
        data_center_ids: vec![],
        disk_gb: 20,
    }
}

/// The real RunPod client pointed at `emu`, with API key `key`.
pub fn client(
    emu: &RunningEmulator,
    key: &str,
) -> runpod_autoscaler::provider::runpod::RunPodClient {
    use runpod_autoscaler::provider::runpod::{RunPodClient, RunPodSettings};
    RunPodClient::new(RunPodSettings::new(
        emu.api_url(),
        emu.graphql_url(),
        Secret::new(key),
    ))
    .unwrap()
}
