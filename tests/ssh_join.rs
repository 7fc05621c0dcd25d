//! SSH from Rust (the `join` module) to an emulated RUNNING pod: a real OpenSSH `sshd` at the
//! endpoint the API reports, authorizing the key injected as `PUBLIC_KEY`. Login works; after
//! terminate it is refused and the sshd process is gone. Needs `/usr/sbin/sshd`
//! (`scripts/test.sh` installs openssh-server).
// Needs the emulator (the `emulator` cargo feature, on by default).
#![cfg(feature = "emulator")]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use runpod_autoscaler::clock::ManualClock;
use runpod_autoscaler::emulator::{sshd, AdminPod, EmulatorConfig, Faults, RunningEmulator};
use runpod_autoscaler::join::{self, HostKeyPolicy, JoinError, KnownHosts, SshKey, SshTarget};
use runpod_autoscaler::model::Secret;
use runpod_autoscaler::model::{GpuTypeId, PodId, Timestamp};
use runpod_autoscaler::provider::runpod::{PodAction, RunPodClient};
use runpod_autoscaler::provider::{Cloud, CloudProvider, LaunchSpec, Pod};
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

/// True while `pid` runs (a zombie, killed but not yet reaped by its new parent, is dead).
fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
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
    let client = support::active::client(&emu, KEY);
    let pod = client
        .launch(&support::active::ssh_pod("ssh-1", &public))
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
    let client = support::active::client(&emu, KEY);
    for i in 0..3 {
        client
            .launch(&LaunchSpec {
                cloud: Cloud::Community,
                image: "img".into(),
                ..support::active::ssh_pod(&format!("k{i}"), &public)
            })
            .await
            .unwrap();
    }
    let pids: Vec<u32> = emu.admin_pods().iter().filter_map(|p| p.sshd_pid).collect();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|p| pid_alive(*p)));
    let dirs: Vec<String> = emu
        .admin_pods()
        .iter()
        .filter_map(|p| p.pod_dir.clone())
        .collect();
    assert_eq!(dirs.len(), 3);
    assert!(dirs.iter().all(|d| std::path::Path::new(d).is_dir()));
    drop(emu);
    assert!(
        pids.iter().all(|p| !pid_alive(*p)),
        "sshd leaked after drop"
    );
    assert!(
        dirs.iter().all(|d| !std::path::Path::new(d).exists()),
        "pod homes left after drop: {dirs:?}"
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
    let client = support::active::client(&emu, KEY);
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

/// An emulator (boot delay 0, the given faults) with a RunPod client and an SSH key pair.
struct Pods {
    emu: RunningEmulator,
    client: RunPodClient,
    key: SshKey,
    public: String,
    pinned: HostKeyPolicy,
    _dir: tempfile::TempDir,
}

impl Pods {
    async fn start(faults: Faults) -> Pods {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("id_ed25519");
        let public = sshd::generate_key(&key_path, "rpa-test").unwrap();
        let cfg = EmulatorConfig {
            api_keys: vec![Secret::new(KEY)],
            boot_delay: Duration::ZERO,
            faults,
            ..EmulatorConfig::default()
        };
        let clock = ManualClock::new(Timestamp::from_secs(1_780_000_000));
        let emu = RunningEmulator::start_local(cfg, Arc::new(clock))
            .await
            .unwrap();
        let client = support::active::client(&emu, KEY);
        let pinned = HostKeyPolicy::Pinned(vec![emu.host_public_key().unwrap()]);
        Pods {
            key: SshKey::load(&key_path).unwrap(),
            emu,
            client,
            public,
            pinned,
            _dir: dir,
        }
    }

    /// A RUNNING pod of `count` × `gpu` authorizing our key (with `WORKER_MODE` in its env).
    async fn launch(&self, name: &str, gpu: &str, count: u32) -> Pod {
        let mut env = BTreeMap::new();
        env.insert("PUBLIC_KEY".to_string(), self.public.clone());
        env.insert("WORKER_MODE".to_string(), "ssh-test".to_string());
        let pod = self
            .client
            .launch(&LaunchSpec {
                name: name.into(),
                gpu_type: GpuTypeId(gpu.into()),
                gpu_count: count,
                cloud: Cloud::Secure,
                image: "runpod/base:0.6.2".into(),
                env,
                spot_bid_per_gpu: None,
                data_center_ids: vec![],
                disk_gb: 20,
            })
            .await
            .unwrap();
        self.client.get(&pod.id).await.unwrap().unwrap()
    }

    fn admin(&self, id: &PodId) -> AdminPod {
        self.emu
            .admin_pods()
            .into_iter()
            .find(|p| p.id == id.as_str())
            .unwrap()
    }

    /// Runs `cmd` on `pod` (retrying while its sshd starts).
    async fn run(&self, pod: &Pod, cmd: &str) -> (Option<u32>, String, String) {
        let out = login(
            &target_of(pod.ssh.as_ref().unwrap()),
            &self.key,
            &self.pinned,
            cmd,
        )
        .await;
        (
            out.exit_status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// One attempt at `cmd` on `pod` (no retry).
    async fn try_run(&self, pod: &Pod, cmd: &str) -> Result<join::ExecOutput, JoinError> {
        join::exec(
            &target_of(pod.ssh.as_ref().unwrap()),
            &self.key,
            &self.pinned,
            cmd,
            Duration::from_secs(5),
        )
        .await
    }

    /// An admin call: status and JSON body.
    async fn admin_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .request(method, format!("{}{path}", self.emu.api_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }
}

fn refused(err: &JoinError) -> bool {
    matches!(err, JoinError::Connect { detail, .. } if detail.to_lowercase().contains("refused"))
}

#[tokio::test]
async fn sessions_get_the_pod_home_path_and_runpod_env_and_pods_are_isolated() {
    let t = Pods::start(Faults::default()).await;
    let a = t.launch("home-a", "NVIDIA RTX A5000", 2).await;
    let b = t.launch("home-b", "NVIDIA RTX A5000", 1).await;
    let dir_a = t.admin(&a.id).pod_dir.expect("pod a has a directory");
    let dir_b = t.admin(&b.id).pod_dir.expect("pod b has a directory");
    assert_ne!(dir_a, dir_b);

    let (status, out, err) = t
        .run(
            &a,
            "printf '%s\\n' \"$HOME\" \"$(pwd)\" \"$PATH\" \"$RUNPOD_POD_ID\" \"$RUNPOD_GPU_COUNT\" \
             \"$RUNPOD_POD_HOSTNAME\" \"$RUNPOD_TCP_PORT_22\" \"$WORKER_MODE\" \"$(command -v nvidia-smi)\"",
        )
        .await;
    assert_eq!(status, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    let port = a.ssh.as_ref().unwrap().port.to_string();
    let bin = format!("{dir_a}/bin");
    assert_eq!(lines[0], dir_a, "HOME");
    assert_eq!(lines[1], dir_a, "a session starts in its home");
    assert!(
        lines[2].starts_with(&format!("{bin}:")),
        "PATH {}",
        lines[2]
    );
    assert!(
        lines[2].split(':').any(|p| p == "/usr/bin"),
        "system PATH after: {}",
        lines[2]
    );
    assert_eq!(lines[3], a.id.as_str(), "RUNPOD_POD_ID");
    assert_eq!(lines[4], "2", "RUNPOD_GPU_COUNT");
    assert!(
        lines[5].starts_with(&format!("{}-", a.id.as_str())),
        "RUNPOD_POD_HOSTNAME {}",
        lines[5]
    );
    assert_eq!(lines[6], port, "RUNPOD_TCP_PORT_22");
    assert_eq!(lines[7], "ssh-test", "the pod's own env");
    assert_eq!(lines[8], format!("{bin}/nvidia-smi"));
    // A login shell (no command) keeps the pod's bin first although /etc/profile resets PATH.
    let (_, out, _) = t.run(&a, "exec \"$SHELL\" -l -c 'echo $PATH'").await;
    assert!(
        out.starts_with(&format!("{bin}:")),
        "login shell PATH {out}"
    );

    // What one pod writes under $HOME the other does not see.
    let (status, _, err) = t
        .run(&a, "mkdir -p \"$HOME/.runpod-autoscaler\" && echo done > \"$HOME/.runpod-autoscaler/bootstrapped\"")
        .await;
    assert_eq!(status, Some(0), "{err}");
    assert!(std::path::Path::new(&dir_a)
        .join(".runpod-autoscaler/bootstrapped")
        .is_file());
    let (status, out, _) = t
        .run(
            &b,
            "test -e \"$HOME/.runpod-autoscaler/bootstrapped\"; echo \"$? $HOME\"",
        )
        .await;
    assert_eq!(status, Some(0));
    assert_eq!(out.trim(), format!("1 {dir_b}"));

    // A pod's processes die with it, even one detached from its session.
    let (_, out, _) = t
        .run(&a, "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!")
        .await;
    let worker: u32 = out.trim().parse().unwrap();
    assert!(pid_alive(worker));

    // Restart: a new container, with a fresh home (RunPod's container disk is volatile).
    t.client.action(&b.id, PodAction::Restart).await.unwrap();
    let b = t.client.get(&b.id).await.unwrap().unwrap();
    assert!(b.is_ready(), "{b:?}");
    let (_, out, _) = t
        .run(
            &b,
            "test -e .runpod-autoscaler/bootstrapped; echo $?; ls bin",
        )
        .await;
    assert_eq!(out, "1\nnvidia-smi\n");

    // Terminate: its directory is gone, its processes ended; the other pod keeps its own.
    t.client.terminate(&a.id).await.unwrap();
    assert!(
        !std::path::Path::new(&dir_a).exists(),
        "{dir_a} left after terminate"
    );
    assert_eq!(t.admin(&a.id).pod_dir, None);
    assert!(
        !pid_alive(worker),
        "a process of the terminated pod is still running"
    );
    assert!(std::path::Path::new(&dir_b)
        .join("bin/nvidia-smi")
        .is_file());
    t.emu.shutdown().await;
    assert!(
        !std::path::Path::new(&dir_b).exists(),
        "{dir_b} left after shutdown"
    );
}

#[tokio::test]
async fn nvidia_smi_reports_the_pods_gpus_and_follows_utilization_set_both_ways() {
    let t = Pods::start(Faults::default()).await;
    let pod = t.launch("smi", "NVIDIA RTX A6000", 2).await;
    const QUERY: &str =
        "nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader,nounits";
    /// (name, MiB, util) per line, as the reconciler's health check parses them.
    fn parse(out: &str) -> Vec<(String, u64, u32)> {
        out.lines()
            .map(|l| {
                let f: Vec<&str> = l.split(',').map(str::trim).collect();
                assert_eq!(f.len(), 3, "{l:?}");
                (
                    f[0].to_owned(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                )
            })
            .collect()
    }
    let gpu = |util| ("NVIDIA RTX A6000".to_owned(), 48 * 1024, util);

    let (status, out, err) = t.run(&pod, QUERY).await;
    assert_eq!(status, Some(0), "{err}");
    assert_eq!(parse(&out), vec![gpu(0), gpu(0)]);
    let (_, out, _) = t.run(&pod, "nvidia-smi -L").await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for (i, l) in lines.iter().enumerate() {
        let rest = l
            .strip_prefix(&format!("GPU {i}: NVIDIA RTX A6000 (UUID: GPU-"))
            .unwrap_or_else(|| panic!("{l}"));
        assert!(rest.ends_with(')') && rest.len() == 37, "{l}");
    }

    // The admin API sets it; nvidia-smi, /admin/pods and the pod's runtime report it.
    let path = format!("/admin/pods/{}/utilization", pod.id.as_str());
    let (code, body) = t
        .admin_call(
            reqwest::Method::PUT,
            &path,
            serde_json::json!({"percent": 65}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["gpuUtilization"], 65);
    assert_eq!(parse(&t.run(&pod, QUERY).await.1), vec![gpu(65), gpu(65)]);
    let rest: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v2/pods/{}", t.emu.api_url(), pod.id.as_str()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rest["runtime"]["gpus"][1]["util"], 65, "{rest}");

    // A process on the pod sets it (a worker writing it while busy).
    let (status, _, _) = t.run(&pod, "echo 12 > \"$HOME/.gpu_utilization\"").await;
    assert_eq!(status, Some(0));
    assert_eq!(parse(&t.run(&pod, QUERY).await.1), vec![gpu(12), gpu(12)]);
    assert_eq!(t.admin(&pod.id).gpu_utilization, Some(12));

    // Bad flags fail as the real tool does: exit status 2, a message, no output.
    for cmd in [
        "nvidia-smi -q",
        "nvidia-smi --query-gpu=name,power.draw --format=csv",
        "nvidia-smi --query-gpu=name",
        "nvidia-smi --query-gpu=name --format=xml",
    ] {
        let (status, out, err) = t.run(&pod, cmd).await;
        assert_eq!(status, Some(2), "{cmd}: {out}");
        assert!(
            out.is_empty() && err.contains("nvidia-smi"),
            "{cmd}: {out} / {err}"
        );
    }

    // Out-of-range or malformed utilization is 422 naming the field; unknown pods 404.
    for bad in [
        serde_json::json!({"percent": 101}),
        serde_json::json!({"percent": -1}),
        serde_json::json!({"percent": 50.5}),
        serde_json::json!({"percent": "50"}),
        serde_json::json!({"pct": 5}),
        serde_json::json!({}),
    ] {
        let (code, body) = t.admin_call(reqwest::Method::PUT, &path, bad.clone()).await;
        assert_eq!(code, 422, "{bad}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains("percent"),
            "{body}"
        );
    }
    let (code, _) = t
        .admin_call(
            reqwest::Method::PUT,
            "/admin/pods/nosuchpod/utilization",
            serde_json::json!({"percent": 1}),
        )
        .await;
    assert_eq!(code, 404);
    assert_eq!(parse(&t.run(&pod, QUERY).await.1), vec![gpu(12), gpu(12)]);
    t.emu.shutdown().await;
}

#[tokio::test]
async fn ssh_down_refuses_connections_and_up_restores_them_on_the_same_port() {
    let t = Pods::start(Faults::default()).await;
    let pod = t.launch("chaos", "NVIDIA RTX A5000", 1).await;
    let port = pod.ssh.as_ref().unwrap().port;
    assert_eq!(t.run(&pod, "echo up").await.1.trim(), "up");
    let old_pid = t.admin(&pod.id).sshd_pid.unwrap();
    let path = format!("/admin/pods/{}/ssh", pod.id.as_str());

    let (code, body) = t
        .admin_call(
            reqwest::Method::POST,
            &path,
            serde_json::json!({"up": false}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["sshPort"], port);
    assert!(body["sshdPid"].is_null(), "{body}");
    assert!(!pid_alive(old_pid), "sshd still running after down");
    // The API still reports the mapping (RunPod's port mapping outlives a dead sshd) ...
    let seen = t.client.get(&pod.id).await.unwrap().unwrap();
    assert_eq!(seen.ssh.as_ref().map(|s| s.port), Some(port));
    // ... and nothing accepts on it.
    let err = t.try_run(&pod, "true").await.unwrap_err();
    assert!(refused(&err), "{err:?}");
    // Down again is a no-op.
    let (code, _) = t
        .admin_call(
            reqwest::Method::POST,
            &path,
            serde_json::json!({"up": false}),
        )
        .await;
    assert_eq!(code, 200);

    let (code, body) = t
        .admin_call(
            reqwest::Method::POST,
            &path,
            serde_json::json!({"up": true}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["sshPort"], port, "same port when free");
    assert!(body["sshdPid"].as_u64().is_some(), "{body}");
    assert_eq!(t.run(&pod, "echo again").await.1.trim(), "again");
    assert_eq!(
        t.client
            .get(&pod.id)
            .await
            .unwrap()
            .unwrap()
            .ssh
            .map(|s| s.port),
        Some(port)
    );

    // Bad input and wrong states are clear errors.
    for (body, want) in [
        (serde_json::json!({"up": "yes"}), 422),
        (serde_json::json!({}), 422),
        (serde_json::json!({"up": true, "port": 22}), 422),
    ] {
        let (code, resp) = t
            .admin_call(reqwest::Method::POST, &path, body.clone())
            .await;
        assert_eq!(code, want, "{body}: {resp}");
        assert!(resp["detail"].as_str().unwrap().contains("up"), "{resp}");
    }
    let (code, _) = t
        .admin_call(
            reqwest::Method::POST,
            "/admin/pods/nosuchpod/ssh",
            serde_json::json!({"up": true}),
        )
        .await;
    assert_eq!(code, 404);
    t.client.action(&pod.id, PodAction::Stop).await.unwrap();
    let (code, resp) = t
        .admin_call(
            reqwest::Method::POST,
            &path,
            serde_json::json!({"up": true}),
        )
        .await;
    assert_eq!(code, 409, "{resp}");
    assert!(
        resp["detail"].as_str().unwrap().contains("RUNNING"),
        "{resp}"
    );
    t.emu.shutdown().await;
}

#[tokio::test]
async fn ssh_unreachable_pods_report_a_mapping_that_refuses() {
    let t = Pods::start(Faults::default()).await;
    // Settable through /admin/faults like every fault.
    let (code, body) = t
        .admin_call(
            reqwest::Method::PUT,
            "/admin/faults",
            serde_json::json!({"ssh_unreachable": true}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["ssh_unreachable"], true);
    let pod = t.launch("dark", "NVIDIA RTX A5000", 1).await;
    assert!(pod.is_ready(), "RUNNING with an SSH mapping: {pod:?}");
    let admin = t.admin(&pod.id);
    assert_eq!(admin.ssh_port, Some(pod.ssh.as_ref().unwrap().port));
    assert_eq!(admin.sshd_pid, None);
    let err = t.try_run(&pod, "true").await.unwrap_err();
    assert!(refused(&err), "{err:?}");

    // never_ready is different: no mapping at all.
    t.emu.set_faults(Faults {
        never_ready: true,
        ..Faults::default()
    });
    let hidden = t.launch("hidden", "NVIDIA RTX A5000", 1).await;
    assert!(hidden.ssh.is_none() && !hidden.is_ready(), "{hidden:?}");
    let (code, _) = t
        .admin_call(
            reqwest::Method::POST,
            &format!("/admin/pods/{}/ssh", hidden.id.as_str()),
            serde_json::json!({"up": true}),
        )
        .await;
    assert_eq!(code, 409);

    // Brought up by hand, the unreachable pod accepts logins on its reported port.
    t.emu.set_faults(Faults::default());
    let (code, body) = t
        .admin_call(
            reqwest::Method::POST,
            &format!("/admin/pods/{}/ssh", pod.id.as_str()),
            serde_json::json!({"up": true}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["sshPort"], pod.ssh.as_ref().unwrap().port);
    assert_eq!(t.run(&pod, "echo lit").await.1.trim(), "lit");
    t.emu.shutdown().await;
}
