//! Pod access against OpenSSH, in the same run, on the same emulated sshd pods (the emulator
//! binary in its own process, 5 RUNNING pods):
//! - warm pooled exec p50/p95 over 100 commands vs `ssh host cmd` per command (and vs `ssh`
//!   with a ControlMaster, OpenSSH's own connection reuse);
//! - 1 GiB upload and download (chunked, SHA-256 checked on the receiving side) vs `scp` and
//!   `sftp` (no checks);
//! - 50 concurrent commands across the 5 pods, p95, vs 50 concurrent `ssh`;
//! - this process's RSS after 1,000 operations (commands and file listings over the pool).
//!
//! Run: `scripts/bench_access.sh` (release build of the binary and this example; the binary's
//! path in `RPA_BINARY`); `RPA_BENCH_GIB=0.25` for a smaller transfer.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};

#[path = "../tests/support/emulator_process.rs"]
mod emulator_process;
use emulator_process::EmulatorProcess;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use runpod_autoscaler::access::transfer::TransferSettings;
use runpod_autoscaler::access::PodAccess;
use runpod_autoscaler::join::pod::PodShell;
use runpod_autoscaler::join::pool::{PoolSettings, SshPool};
use runpod_autoscaler::join::{HostKeyPolicy, SshKey, SshTarget};
use runpod_autoscaler::model::{GpuTypeId, Secret};
use runpod_autoscaler::provider::runpod::{RunPodClient, RunPodSettings};
use runpod_autoscaler::provider::{Cloud, CloudProvider, LaunchSpec, Pod};

const KEY: &str = "bench_access_key";
const PODS: usize = 5;

/// Latency percentiles of a run.
struct Lat(Vec<Duration>);

impl Lat {
    fn at(&self, q: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v[i].as_secs_f64() * 1e3
    }

    fn row(&self, what: &str) {
        println!("| {what} | {:.1} | {:.1} |", self.at(0.5), self.at(0.95));
    }
}

fn target(p: &Pod) -> SshTarget {
    let ep = p.ssh.as_ref().unwrap();
    SshTarget {
        host: ep.host.clone(),
        port: ep.port,
        user: ep.username.clone(),
    }
}

/// OpenSSH client options for a pod: the same key, the emulator's host key pinned.
fn ssh_opts(key: &Path, known: &Path) -> Vec<String> {
    vec![
        "-i".into(),
        key.display().to_string(),
        "-o".into(),
        format!("UserKnownHostsFile={}", known.display()),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
    ]
}

fn timed(mut c: Command) -> Duration {
    let t = Instant::now();
    let s = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(s.success(), "{c:?} failed");
    t.elapsed()
}

fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let binary =
        std::env::var("RPA_BINARY").unwrap_or_else(|_| "target/release/runpod-autoscaler".into());
    let emu = EmulatorProcess::start(Path::new(&binary), KEY, "boot_delay = \"1s\"\n");
    let key_path = dir.path().join("id_ed25519");
    let s = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f"])
        .arg(&key_path)
        .status()
        .unwrap();
    assert!(s.success());
    let public = std::fs::read_to_string(dir.path().join("id_ed25519.pub"))
        .unwrap()
        .trim()
        .to_owned();
    let client = RunPodClient::new(RunPodSettings::new(
        &emu.api_url,
        &emu.graphql_url,
        Secret::new(KEY),
    ))
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..PODS {
        let pod = client
            .launch(&LaunchSpec {
                name: format!("bench-{i}"),
                gpu_type: GpuTypeId("NVIDIA RTX A5000".into()),
                gpu_count: 1,
                cloud: Cloud::Secure,
                image: "runpod/base:0.6.2".into(),
                env: BTreeMap::from([("PUBLIC_KEY".to_owned(), public.clone())]),
                spot_bid_per_gpu: None,
                data_center_ids: vec![],
                disk_gb: 20,
            })
            .await
            .unwrap();
        ids.push(pod.id);
    }
    let mut pods = Vec::new();
    for id in &ids {
        loop {
            if let Some(p) = client.get(id).await.unwrap().filter(|p| p.is_ready()) {
                pods.push(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let host_key: String = reqwest::get(format!("{}/admin/host-key", emu.api_url))
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["hostKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let known = dir.path().join("known_hosts");
    std::fs::write(
        &known,
        pods.iter()
            .map(|p| format!("[127.0.0.1]:{} {host_key}\n", target(p).port))
            .collect::<String>(),
    )
    .unwrap();
    let pool = SshPool::new(
        SshKey::load(&key_path).unwrap(),
        HostKeyPolicy::Pinned(vec![host_key.clone()]),
        PoolSettings::default(),
    );
    let access = PodAccess::new(
        Arc::new(client.clone()),
        pool.clone(),
        Duration::from_secs(600),
    );
    let opts = ssh_opts(&key_path, &known);
    let (p0, t0) = (pods[0].id.to_string(), target(&pods[0]));
    let ssh = |extra: &[String], cmd: &str| {
        let mut c = Command::new("ssh");
        c.args(&opts).args(extra).args([
            "-p",
            &t0.port.to_string(),
            &format!("root@{}", t0.host),
            cmd,
        ]);
        c
    };

    println!("\n## Pod access vs OpenSSH (same run, same emulated sshd pods)\n");
    println!("| exec, 100 sequential `true` | p50 ms | p95 ms |\n|---|---|---|");
    pool.run(&p0, &t0, "true", Duration::from_secs(10))
        .await
        .unwrap();
    let mut ours = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let o = pool
            .run(&p0, &t0, "true", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(o.exit_status, Some(0));
        ours.push(t.elapsed());
    }
    Lat(ours).row("runpod-autoscaler pooled (warm)");
    let mut looked_up = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        access.exec(&p0, "true").await.unwrap();
        looked_up.push(t.elapsed());
    }
    Lat(looked_up)
        .row("runpod-autoscaler `PodAccess::exec` (API lookup + pooled SSH, as `exec`/MCP)");
    let plain: Vec<Duration> = (0..100).map(|_| timed(ssh(&[], "true"))).collect();
    Lat(plain).row("`ssh host true` per command");
    let control = dir.path().join("cm-%p");
    let cm = vec![
        "-o".to_owned(),
        "ControlMaster=auto".to_owned(),
        "-o".to_owned(),
        format!("ControlPath={}", control.display()),
        "-o".to_owned(),
        "ControlPersist=60".to_owned(),
    ];
    timed(ssh(&cm, "true"));
    let muxed: Vec<Duration> = (0..100).map(|_| timed(ssh(&cm, "true"))).collect();
    Lat(muxed).row("`ssh` with ControlMaster (warm)");
    let _ = Command::new("ssh")
        .args(&opts)
        .args(&cm)
        .args(["-O", "exit", "-p", &t0.port.to_string(), "root@127.0.0.1"])
        .stderr(Stdio::null())
        .status();

    // 50 concurrent commands across the 5 pods.
    println!("\n| 50 concurrent commands over 5 pods | p50 ms | p95 ms |\n|---|---|---|");
    let cmd = "sleep 0.05";
    let runs = (0..50).map(|i| {
        let (pool, p) = (pool.clone(), &pods[i % PODS]);
        let (id, t) = (p.id.to_string(), target(p));
        async move {
            let s = Instant::now();
            pool.run(&id, &t, cmd, Duration::from_secs(30))
                .await
                .unwrap();
            s.elapsed()
        }
    });
    let wall = Instant::now();
    let lat = join_all(runs).await;
    let ours_wall = wall.elapsed();
    Lat(lat).row(&format!(
        "runpod-autoscaler pooled (wall {:.0} ms)",
        ours_wall.as_secs_f64() * 1e3
    ));
    let wall = Instant::now();
    let procs: Vec<(Instant, Child)> = (0..50)
        .map(|i| {
            let t = target(&pods[i % PODS]);
            let c = Command::new("ssh")
                .args(&opts)
                .args(["-p", &t.port.to_string(), "root@127.0.0.1", cmd])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            (Instant::now(), c)
        })
        .collect();
    let lat: Vec<Duration> = procs
        .into_iter()
        .map(|(s, mut c)| {
            assert!(c.wait().unwrap().success());
            s.elapsed()
        })
        .collect();
    let ssh_wall = wall.elapsed();
    Lat(lat).row(&format!(
        "50 × `ssh` processes (wall {:.0} ms)",
        ssh_wall.as_secs_f64() * 1e3
    ));

    // Transfers.
    let gib: f64 = std::env::var("RPA_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let size = (gib * (1u64 << 30) as f64) as u64;
    let src = dir.path().join("big.bin");
    let s = Command::new("head")
        .args(["-c", &size.to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(&src).unwrap())
        .status()
        .unwrap();
    assert!(s.success());
    println!("\n| {gib} GiB transfer | upload MB/s | download MB/s |\n|---|---|---|");
    let settings = TransferSettings::default();
    let t = Instant::now();
    let up = access
        .upload(&p0, &src, "ours.bin", &settings)
        .await
        .unwrap();
    let up_t = t.elapsed();
    let back = dir.path().join("ours-back.bin");
    let t = Instant::now();
    let down = access
        .download(&p0, "ours.bin", &back, &settings)
        .await
        .unwrap();
    let down_t = t.elapsed();
    assert_eq!(up.files[0].sha256, down.files[0].sha256);
    println!(
        "| runpod-autoscaler cp (8 MiB chunks, SHA-256 per chunk and file checked) | {:.0} | {:.0} |",
        mbps(size, up_t),
        mbps(size, down_t)
    );
    let port = t0.port.to_string();
    let mut c = Command::new("scp");
    c.args(&opts)
        .args(["-P", &port])
        .arg(&src)
        .arg("root@127.0.0.1:scp.bin");
    let scp_up = timed(c);
    let mut c = Command::new("scp");
    c.args(&opts)
        .args(["-P", &port, "root@127.0.0.1:scp.bin"])
        .arg(dir.path().join("scp-back.bin"));
    let scp_down = timed(c);
    println!(
        "| `scp` (no checks) | {:.0} | {:.0} |",
        mbps(size, scp_up),
        mbps(size, scp_down)
    );
    let batch = |cmds: String| {
        let f = dir.path().join("batch");
        std::fs::write(&f, cmds).unwrap();
        let mut c = Command::new("sftp");
        c.args(&opts)
            .args(["-P", &port, "-b"])
            .arg(&f)
            .arg("root@127.0.0.1");
        timed(c)
    };
    let sftp_up = batch(format!("put {} sftp.bin\n", src.display()));
    let sftp_down = batch(format!(
        "get sftp.bin {}\n",
        dir.path().join("sftp-back.bin").display()
    ));
    println!(
        "| `sftp` (no checks) | {:.0} | {:.0} |",
        mbps(size, sftp_up),
        mbps(size, sftp_down)
    );
    for f in ["ours-back.bin", "scp-back.bin", "sftp-back.bin", "big.bin"] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }

    // Memory after 1,000 operations (commands and listings over the pool, across pods).
    let small = dir.path().join("small.txt");
    std::fs::write(&small, "x".repeat(4096)).unwrap();
    for i in 0..1000 {
        let id = pods[i % PODS].id.to_string();
        match i % 10 {
            0 => {
                access.list_files(&id, ".").await.unwrap();
            }
            5 => {
                access
                    .upload(&id, &small, "small.txt", &settings)
                    .await
                    .unwrap();
            }
            _ => {
                access.exec(&id, "echo ok").await.unwrap();
            }
        }
    }
    let (rss, hwm) = rss_mib();
    println!(
        "\nRSS of this client process after 1,000 operations (800 exec, 100 list_files, 100 upload; \
         after the {gib} GiB transfers): {rss:.1} MiB (peak {hwm:.1} MiB); SSH handshakes: {}",
        pool.handshakes()
    );
}
