//! SSH from Rust (the `join` module) to an emulated RUNNING pod: a real OpenSSH `sshd` at the
//! endpoint the API reports, authorizing the key injected as `PUBLIC_KEY`. Login works; after
//! terminate it is refused and the sshd process is gone. Needs `/usr/sbin/sshd`
//! (`scripts/test.sh` installs openssh-server).
// Needs the emulator (the `emulator` cargo feature, on by default).
#![cfg(feature = "emulator")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use runpod_autoscaler::clock::ManualClock;
use runpod_autoscaler::emulator::{sshd, EmulatorConfig, RunningEmulator};
use runpod_autoscaler::join::{self, HostKeyPolicy, JoinError, KnownHosts, SshKey, SshTarget};
use runpod_autoscaler::model::Secret;
use runpod_autoscaler::model::{GpuTypeId, Timestamp};
use runpod_autoscaler::provider::runpod::{RunPodClient, RunPodSettings};
use runpod_autoscaler::provider::{Cloud, CloudProvider, LaunchSpec};
use tokio::time::Instant;

/// Where to SSH for an endpoint the API reports.
fn target_of(ep: &runpod_autoscaler::provider::SshEndpoint) -> SshTarget {
    SshTarget {
        host: ep.host.clone(),
        port: ep.port,
        user: ep.username.clone(),
    }
}

/// Runs `cmd` once the pod's sshd answers (5 s per attempt, 50 ms between, SSH_DEADLINE in all).
async fn login(
    target: &SshTarget,
    key: &SshKey,
    policy: &HostKeyPolicy,
    cmd: &str,
) -> join::ExecOutput {
    join::exec_when_up(
        target,
        key,
        policy,
        cmd,
        Duration::from_secs(5),
        Duration::from_millis(50),
        Instant::now() + SSH_DEADLINE,
    )
    .await
    .unwrap()
}

const KEY: &str = "rpa_ssh_test_key";
/// sshd is listening within milliseconds of spawn; 10 s only guards a broken machine.
const SSH_DEADLINE: Duration = Duration::from_secs(10);

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn login_to_a_running_pod_then_refused_after_terminate() {
    assert!(
        std::path::Path::new(sshd::DEFAULT_SSHD).exists(),
        "/usr/sbin/sshd missing: run scripts/test.sh (installs openssh-server)"
    );
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("id_ed25519");
    let public = sshd::generate_key(&key_path, "rpa-test").unwrap();
    let other_path = dir.path().join("other");
    sshd::generate_key(&other_path, "intruder").unwrap();

    let clock = ManualClock::new(Timestamp::from_secs(1_780_000_000));
    let cfg = EmulatorConfig {
        api_keys: vec![Secret::new(KEY)],
        boot_delay: Duration::from_secs(2),
        ..EmulatorConfig::default()
    };
    let emu = RunningEmulator::start_local(cfg, Arc::new(clock.clone()))
        .await
        .unwrap();
    let client = RunPodClient::new(RunPodSettings::new(
        emu.api_url(),
        emu.graphql_url(),
        Secret::new(KEY),
    ))
    .unwrap();
    let mut env = BTreeMap::new();
    env.insert("PUBLIC_KEY".to_string(), public);
    let pod = client
        .launch(&LaunchSpec {
            name: "ssh-1".into(),
            gpu_type: GpuTypeId("NVIDIA RTX A5000".into()),
            gpu_count: 1,
            cloud: Cloud::Secure,
            image: "runpod/base:0.6.2".into(),
            env,
            spot_bid_per_gpu: None,
            data_center_ids: vec![],
            disk_gb: 20,
        })
        .await
        .unwrap();
    assert!(pod.ssh.is_none(), "no SSH while provisioning");
    clock.advance(Duration::from_secs(2));
    let pod = client.get(&pod.id).await.unwrap().unwrap();
    assert!(pod.is_ready(), "{pod:?}");
    let target = target_of(pod.ssh.as_ref().unwrap());
    let key = SshKey::load(&key_path).unwrap();
    assert_eq!(format!("{key:?}"), "SshKey([redacted])");
    let pinned = HostKeyPolicy::Pinned(vec![emu.host_public_key().unwrap()]);

    let out = login(&target, &key, &pinned, "echo ok").await;
    assert_eq!(out.exit_status, Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    let out = join::exec(&target, &key, &pinned, "exit 3", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(out.exit_status, Some(3));

    // Trust on first use remembers the key; a different pinned key is refused.
    let known = KnownHosts::default();
    let tofu = HostKeyPolicy::TrustOnFirstUse(known.clone());
    join::exec(&target, &key, &tofu, "true", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(known
        .get(&format!("{}:{}", target.host, target.port))
        .is_some());
    join::exec(&target, &key, &tofu, "true", Duration::from_secs(5))
        .await
        .unwrap();
    let wrong = HostKeyPolicy::Pinned(vec![
        std::fs::read_to_string(dir.path().join("other.pub")).unwrap()
    ]);
    let err = join::exec(&target, &key, &wrong, "true", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, JoinError::HostKeyMismatch { .. }), "{err:?}");
    assert!(!err.is_retryable());

    // A key the pod was not given is rejected.
    let intruder = SshKey::load(&other_path).unwrap();
    let err = join::exec(&target, &intruder, &pinned, "true", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, JoinError::AuthRejected { .. }), "{err:?}");

    // Spot preemption: RUNNING → EXITED, its sshd killed, login refused.
    let mut env = BTreeMap::new();
    env.insert(
        "PUBLIC_KEY".to_string(),
        std::fs::read_to_string(dir.path().join("id_ed25519.pub")).unwrap(),
    );
    let spot = client
        .launch(&LaunchSpec {
            name: "spot-1".into(),
            gpu_type: GpuTypeId("NVIDIA RTX A5000".into()),
            gpu_count: 1,
            cloud: Cloud::Community,
            image: "runpod/base:0.6.2".into(),
            env,
            spot_bid_per_gpu: Some(runpod_autoscaler::model::Usd(0.12)),
            data_center_ids: vec![],
            disk_gb: 20,
        })
        .await
        .unwrap();
    clock.advance(Duration::from_secs(2));
    let spot = client.get(&spot.id).await.unwrap().unwrap();
    let spot_target = target_of(spot.ssh.as_ref().expect("spot pod reachable"));
    let out = login(&spot_target, &key, &pinned, "echo spot").await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "spot");
    let spot_pid = emu
        .admin_pods()
        .iter()
        .find(|p| p.id == spot.id.as_str())
        .and_then(|p| p.sshd_pid)
        .unwrap();
    assert!(emu.preempt(spot.id.as_str()));
    assert!(!pid_alive(spot_pid), "preempted pod's sshd still running");
    let spot = client.get(&spot.id).await.unwrap().unwrap();
    assert_eq!(spot.state, runpod_autoscaler::model::PodState::Exited);
    assert!(spot.ssh.is_none());
    let err = join::exec(&spot_target, &key, &pinned, "true", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, JoinError::Connect { .. }), "{err:?}");

    // Terminate: the sshd process is killed and login is refused.
    let pid = emu
        .admin_pods()
        .iter()
        .find(|p| p.id == pod.id.as_str())
        .and_then(|p| p.sshd_pid)
        .unwrap();
    assert!(pid_alive(pid));
    client.terminate(&pod.id).await.unwrap();
    assert!(!pid_alive(pid), "sshd {pid} still running after terminate");
    let err = join::exec(&target, &key, &pinned, "echo ok", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, JoinError::Connect { .. }), "{err:?}");

    emu.shutdown().await;
}

#[tokio::test]
async fn emulator_shutdown_kills_every_sshd() {
    let dir = tempfile::tempdir().unwrap();
    let public = sshd::generate_key(&dir.path().join("k"), "t").unwrap();
    let cfg = EmulatorConfig {
        api_keys: vec![Secret::new(KEY)],
        boot_delay: Duration::ZERO,
        ..EmulatorConfig::default()
    };
    let clock = ManualClock::new(Timestamp::from_secs(1_780_000_000));
    let emu = RunningEmulator::start_local(cfg, Arc::new(clock))
        .await
        .unwrap();
    let client = RunPodClient::new(RunPodSettings::new(
        emu.api_url(),
        emu.graphql_url(),
        Secret::new(KEY),
    ))
    .unwrap();
    for i in 0..3 {
        let mut env = BTreeMap::new();
        env.insert("PUBLIC_KEY".to_string(), public.clone());
        client
            .launch(&LaunchSpec {
                name: format!("k{i}"),
                gpu_type: GpuTypeId("NVIDIA RTX A5000".into()),
                gpu_count: 1,
                cloud: Cloud::Community,
                image: "img".into(),
                env,
                spot_bid_per_gpu: None,
                data_center_ids: vec![],
                disk_gb: 20,
            })
            .await
            .unwrap();
    }
    let pids: Vec<u32> = emu.admin_pods().iter().filter_map(|p| p.sshd_pid).collect();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|p| pid_alive(*p)));
    drop(emu);
    assert!(
        pids.iter().all(|p| !pid_alive(*p)),
        "sshd leaked after drop"
    );
}

/// Creates a pod over raw REST (the client always sends `startSsh`; these bodies do not).
async fn create_raw(emu: &RunningEmulator, body: serde_json::Value) -> String {
    let resp = reqwest::Client::new()
        .post(format!("{}/v2/pods", emu.api_url()))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let pod: serde_json::Value = resp.json().await.unwrap();
    pod["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn public_key_and_port_22_start_sshd_without_start_ssh() {
    // Per the v2 spec, startSsh only injects the account keys as PUBLIC_KEY; an official image
    // runs sshd whenever PUBLIC_KEY is set and 22/tcp is exposed.
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("id_ed25519");
    let public = sshd::generate_key(&key_path, "rpa-test").unwrap();
    let clock = ManualClock::new(Timestamp::from_secs(1_780_000_000));
    let cfg = EmulatorConfig {
        api_keys: vec![Secret::new(KEY)],
        boot_delay: Duration::ZERO,
        ..EmulatorConfig::default()
    };
    let emu = RunningEmulator::start_local(cfg, Arc::new(clock))
        .await
        .unwrap();
    let client = RunPodClient::new(RunPodSettings::new(
        emu.api_url(),
        emu.graphql_url(),
        Secret::new(KEY),
    ))
    .unwrap();
    let base = serde_json::json!({"image": "runpod/base:0.6.2",
        "gpu": {"id": "NVIDIA RTX A5000", "count": 1}, "ports": ["22/tcp"]});
    let with = |extra: serde_json::Value| {
        let mut b = base.clone();
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };

    let keyed = create_raw(
        &emu,
        with(serde_json::json!({"name": "keyed", "env": {"PUBLIC_KEY": public}})),
    )
    .await;
    let pod = client
        .get(&runpod_autoscaler::model::PodId(keyed))
        .await
        .unwrap()
        .unwrap();
    assert!(pod.is_ready(), "PUBLIC_KEY + 22/tcp must run sshd: {pod:?}");
    let key = SshKey::load(&key_path).unwrap();
    let pinned = HostKeyPolicy::Pinned(vec![emu.host_public_key().unwrap()]);
    let out = login(
        &target_of(pod.ssh.as_ref().unwrap()),
        &key,
        &pinned,
        "echo in",
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "in");

    // No key anywhere (startSsh with no account keys registered): no sshd.
    for body in [
        serde_json::json!({"name": "keyless"}),
        serde_json::json!({"name": "keyless-ssh", "startSsh": true}),
    ] {
        let id = create_raw(&emu, with(body)).await;
        let pod = client
            .get(&runpod_autoscaler::model::PodId(id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pod.state, runpod_autoscaler::model::PodState::Running);
        assert!(pod.ssh.is_none(), "a pod without any key got sshd: {pod:?}");
    }

    // A key but 22/tcp not exposed: no sshd either.
    let id = create_raw(
        &emu,
        with(serde_json::json!({"name": "closed", "ports": ["8888/http"],
            "env": {"PUBLIC_KEY": public}})),
    )
    .await;
    let pod = client
        .get(&runpod_autoscaler::model::PodId(id))
        .await
        .unwrap()
        .unwrap();
    assert!(pod.ssh.is_none(), "{pod:?}");

    // startSsh with account keys: they are injected as PUBLIC_KEY and authorize the login.
    client
        .set_ssh_keys(std::slice::from_ref(&public))
        .await
        .unwrap();
    let id = create_raw(
        &emu,
        with(serde_json::json!({"name": "account", "startSsh": true})),
    )
    .await;
    let pod = client
        .get(&runpod_autoscaler::model::PodId(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pod.env.get("PUBLIC_KEY"), Some(&public));
    let out = login(
        &target_of(pod.ssh.as_ref().unwrap()),
        &key,
        &pinned,
        "echo acct",
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "acct");
    emu.shutdown().await;
}
