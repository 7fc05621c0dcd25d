//! Pod access against the emulator's real sshd pods: the `exec`, `cp`, `pods watch`, `cost`
//! commands of the binary and the SSH pool under them. Needs `/usr/sbin/sshd` and its
//! `sftp-server` (`scripts/test.sh` installs openssh-server); the full-disk test mounts a small
//! tmpfs (root, as in CI).
#![cfg(feature = "emulator")]

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runpod_autoscaler::access::transfer::{parse_journal, TransferSettings};
use runpod_autoscaler::access::PodAccess;
use runpod_autoscaler::emulator::{sshd, RunningEmulator};
use runpod_autoscaler::join::pod::PodShell;
use runpod_autoscaler::join::pool::{PoolSettings, SshPool};
use runpod_autoscaler::join::{HostKeyPolicy, SshKey, SshTarget};
use runpod_autoscaler::provider::runpod::{PodAction, RunPodClient};
use runpod_autoscaler::provider::{CloudProvider, Pod};
use sha2::{Digest, Sha256};

const KEY: &str = "rpa_access_test_key";
/// Guards only: each wait ends as soon as its condition holds.
const BOOT_DEADLINE: Duration = Duration::from_secs(30);

struct Fixture {
    emu: RunningEmulator,
    dir: tempfile::TempDir,
    key_path: PathBuf,
    config: PathBuf,
    client: RunPodClient,
    pods: Vec<Pod>,
}

/// The emulator with `n` RUNNING on-demand pods authorizing a fresh key, and a config pinning
/// the emulator's host key.
async fn fixture(n: usize) -> Fixture {
    fixture_with(n, 0).await
}

/// [`fixture`] whose first `spot` pods are spot (interruptible) pods.
async fn fixture_with(n: usize, spot: usize) -> Fixture {
    assert!(
        Path::new(sshd::DEFAULT_SSHD).exists(),
        "/usr/sbin/sshd missing: run scripts/test.sh (installs openssh-server)"
    );
    let emu = support::active::emulator(KEY).await;
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("id_ed25519");
    let public = sshd::generate_key(&key_path, "rpa-access").unwrap();
    let host_key = emu.host_public_key().unwrap();
    let config = dir.path().join("access.toml");
    std::fs::write(
        &config,
        format!(
            "[reconcile]\nssh_key_file = {:?}\nssh_host_keys = [{:?}]\n",
            key_path.display().to_string(),
            host_key
        ),
    )
    .unwrap();
    let client = support::active::client(&emu, KEY);
    let mut ids = Vec::new();
    for i in 0..n {
        let mut spec = support::active::ssh_pod(&format!("access-{i}"), &public);
        if i < spot {
            // Any bid at or above the floor rents; this one is well above it.
            spec.spot_bid_per_gpu = Some(runpod_autoscaler::model::Usd(5.0));
        }
        let pod = client.launch(&spec).await.unwrap();
        ids.push(pod.id);
    }
    let mut pods = Vec::new();
    for id in ids {
        pods.push(
            support::eventually("pod RUNNING with SSH", BOOT_DEADLINE, || {
                let client = &client;
                let id = id.clone();
                async move {
                    client
                        .get(&id)
                        .await
                        .ok()
                        .flatten()
                        .filter(|p| p.is_ready())
                }
            })
            .await,
        );
    }
    Fixture {
        emu,
        dir,
        key_path,
        config,
        client,
        pods,
    }
}

impl Fixture {
    /// The binary with the emulator's API settings and the config (`--config` goes before a
    /// `--`, after which everything is the remote command).
    fn cli(&self, args: &[&str]) -> Command {
        self.cli_with(&self.config, args)
    }

    /// [`Fixture::cli`] with another config file.
    fn cli_with(&self, config: &Path, args: &[&str]) -> Command {
        let config = config.to_str().unwrap();
        let at = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let mut c = Command::new(env!("CARGO_BIN_EXE_runpod-autoscaler"));
        c.args(&args[..at])
            .args(["--config", config])
            .args(&args[at..])
            .env("RUNPOD_API_URL", self.emu.api_url())
            .env("RUNPOD_GRAPHQL_URL", self.emu.graphql_url())
            .env("RUNPOD_API_KEY", KEY)
            .env_remove("RUST_LOG");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cli(args).output().unwrap()
    }

    fn id(&self, i: usize) -> String {
        self.pods[i].id.to_string()
    }

    /// The pod's home (its container disk) on this machine.
    fn home(&self, i: usize) -> PathBuf {
        let id = self.id(i);
        let pod = self
            .emu
            .admin_pods()
            .into_iter()
            .find(|p| p.id == id)
            .unwrap();
        PathBuf::from(pod.pod_dir.unwrap())
    }

    /// A random local file `name` of `size` bytes, its SHA-256, and the journal its upload to
    /// the pod's home keeps there.
    fn source(&self, name: &str, size: usize) -> (PathBuf, String, PathBuf) {
        let src = self.dir.path().join(name);
        random_file(&src, size);
        let want = sha_file(&src);
        (src, want, self.home(0).join(format!("{name}.rpa-journal")))
    }

    /// The library's pod access over a pool of its own, and 1 MiB transfer chunks.
    fn access(&self) -> (PodAccess, TransferSettings) {
        let access = PodAccess::new(
            Arc::new(self.client.clone()),
            self.pool(PoolSettings::default()),
            Duration::from_secs(60),
        );
        let settings = TransferSettings {
            chunk_size: 1 << 20,
            ..TransferSettings::default()
        };
        (access, settings)
    }

    fn pool(&self, settings: PoolSettings) -> SshPool {
        SshPool::new(
            SshKey::load(&self.key_path).unwrap(),
            HostKeyPolicy::Pinned(vec![self.emu.host_public_key().unwrap()]),
            settings,
        )
    }

    fn target(&self, i: usize) -> SshTarget {
        let ep = self.pods[i].ssh.as_ref().unwrap();
        SshTarget {
            host: ep.host.clone(),
            port: ep.port,
            user: ep.username.clone(),
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sha_file(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// `size` bytes that do not repeat in any useful way (a chunk mix-up changes the hash).
fn random_file(path: &Path, size: usize) {
    let status = Command::new("head")
        .arg("-c")
        .arg(size.to_string())
        .arg("/dev/urandom")
        .stdout(std::fs::File::create(path).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_output_and_exits_with_the_remote_status() {
    let f = fixture(2).await;
    let pod = f.id(0);
    let out = f.run(&["exec", &pod, "--", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    // Arguments after `--` are one command line, as with ssh; the session is the pod's home.
    let out = f.run(&[
        "exec",
        &pod,
        "--",
        "pwd;",
        "nvidia-smi",
        "-L",
        "|",
        "wc",
        "-l",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}\n1\n", f.home(0).display()));

    // --all: every pod, lines prefixed, the highest status returned.
    let out = f.run(&[
        "exec",
        "--all",
        "--",
        "echo \"$RUNPOD_POD_ID\"; [ \"$RUNPOD_POD_ID\" = ",
        &pod,
        "] && exit 4; echo done",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{stdout} {}", text(&out.stderr));
    for i in 0..2 {
        let id = f.id(i);
        assert!(stdout.contains(&format!("[{id}] {id}\n")), "{stdout}");
    }
    assert!(
        stdout.contains(&format!("[{}] done\n", f.id(1))),
        "{stdout}"
    );
    assert!(!stdout.contains(&format!("[{pod}] done")), "{stdout}");
    assert!(text(&out.stderr).contains(&format!("[{pod}] exit 4")));

    // A host key other than the pinned one is refused; --identity overrides the config's key.
    let other = f.dir.path().join("other");
    let other_pub = sshd::generate_key(&other, "intruder").unwrap();
    let wrong = f.dir.path().join("wrong-host.toml");
    std::fs::write(
        &wrong,
        format!(
            "[reconcile]\nssh_key_file = {:?}\nssh_host_keys = [{other_pub:?}]\n",
            f.key_path.display().to_string()
        ),
    )
    .unwrap();
    let out = f
        .cli_with(&wrong, &["exec", &pod, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("host key")
            && text(&out.stderr).contains("not the expected one"),
        "{}",
        text(&out.stderr)
    );
    let out = f.run(&["exec", &pod, "-i", other.to_str().unwrap(), "--", "true"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("authentication as root was rejected"),
        "{}",
        text(&out.stderr)
    );

    // Clear errors: an unknown pod, a stopped one, a bad API key.
    let out = f.run(&["exec", "nosuchpod", "--", "true"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("unknown pod nosuchpod"),
        "{}",
        text(&out.stderr)
    );
    f.client
        .action(&f.pods[1].id, PodAction::Stop)
        .await
        .unwrap();
    let out = f.run(&["exec", &f.id(1), "--", "true"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("is offline (EXITED)"),
        "{}",
        text(&out.stderr)
    );
    let out = f
        .cli(&["exec", &pod, "--", "true"])
        .env("RUNPOD_API_KEY", "wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("API key rejected"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !text(&out.stderr).contains("wrong"),
        "the key is never printed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_on_first_use_pins_host_keys_across_invocations() {
    let f = fixture(1).await;
    let pod = f.id(0);
    let host_key = f.emu.host_public_key().unwrap();
    let host_key = host_key
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let tofu = |extra: &str| {
        let config = f.dir.path().join("tofu.toml");
        std::fs::write(
            &config,
            format!(
                "[reconcile]\nssh_key_file = {:?}\n{extra}",
                f.key_path.display().to_string()
            ),
        )
        .unwrap();
        config
    };

    // No access.known_hosts: the default file under $XDG_STATE_HOME.
    let state = f.dir.path().join("state");
    let config = tofu("");
    let out = f
        .cli_with(&config, &["exec", &pod, "--", "echo first"])
        .env("XDG_STATE_HOME", &state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let default = state.join("runpod-autoscaler/known_hosts");
    let recorded = std::fs::read_to_string(&default).unwrap();
    let addr = {
        let ssh = f.pods[0].ssh.as_ref().unwrap();
        format!("{}:{}", ssh.host, ssh.port)
    };
    assert!(
        recorded.contains(&format!("{pod} {addr} {host_key}\n")),
        "{recorded}"
    );

    // access.known_hosts names the file; the first exec records, the second trusts the record.
    let file = f.dir.path().join("pins/known_hosts");
    let config = tofu(&format!(
        "[access]\nknown_hosts = {:?}\n",
        file.display().to_string()
    ));
    for _ in 0..2 {
        let out = f
            .cli_with(&config, &["exec", &pod, "--", "echo ok"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "ok\n");
    }
    let text_of = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text_of.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one entry: {text_of}");
    assert_eq!(lines[1], format!("{pod} {addr} {host_key}"));

    // The recorded key replaced by another valid key: the next exec is refused, naming the
    // file and the line to remove, and printing no secret.
    let other_pub = sshd::generate_key(&f.dir.path().join("other"), "other").unwrap();
    let other = other_pub
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(&file, text_of.replace(&host_key, &other)).unwrap();
    let out = f
        .cli_with(&config, &["exec", &pod, "--", "echo never"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr}");
    assert!(text(&out.stdout).is_empty());
    assert!(
        stderr.contains("not the expected one")
            && stderr.contains(&format!("{} line 2", file.display())),
        "{stderr}"
    );
    let private = std::fs::read_to_string(&f.key_path).unwrap();
    let secret_body = private.lines().nth(1).unwrap();
    assert!(
        !stderr.contains(KEY) && !stderr.contains(secret_body),
        "{stderr}"
    );

    // A corrupt file is a clear error, not a panic.
    std::fs::write(&file, "garbage\n").unwrap();
    let out = f
        .cli_with(&config, &["exec", &pod, "--", "true"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains("known hosts file")
            && stderr.contains("line 1")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_reuses_one_connection_bounds_channels_and_reconnects() {
    let f = fixture(1).await;
    let pool = f.pool(PoolSettings {
        per_pod: 3,
        idle_timeout: Duration::from_millis(400),
        ..PoolSettings::default()
    });
    let (id, target) = (f.id(0), f.target(0));
    for i in 0..10 {
        let out = pool
            .run(&id, &target, &format!("echo {i}"), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(text(&out.stdout), format!("{i}\n"));
    }
    assert_eq!(pool.handshakes(), 1, "ten commands, one login");

    // 12 at once on 3 channels: all run, never more than 3 at a time (counted on the pod).
    let home = f.home(0);
    let script = "mkdir -p c; t=c/$$; : > $t; n=$(ls c | wc -l); echo $n; sleep 0.2; rm $t";
    let runs = (0..12).map(|_| pool.run(&id, &target, script, Duration::from_secs(30)));
    let outs = futures_util::future::join_all(runs).await;
    let most = outs
        .into_iter()
        .map(|o| text(&o.unwrap().stdout).trim().parse::<u32>().unwrap())
        .max()
        .unwrap();
    assert!(
        (1..=3).contains(&most),
        "at most 3 channels at once, saw {most}"
    );
    assert_eq!(pool.handshakes(), 1);
    assert!(home.join("c").exists());

    // A restart kills the pod's sshd and every connection: the next command reconnects.
    f.client
        .action(&f.pods[0].id, PodAction::Restart)
        .await
        .unwrap();
    let pod = support::eventually("pod back with SSH", BOOT_DEADLINE, || async {
        f.client
            .get(&f.pods[0].id)
            .await
            .ok()
            .flatten()
            .filter(|p| p.is_ready())
    })
    .await;
    let ep = pod.ssh.unwrap();
    let target = SshTarget {
        host: ep.host,
        port: ep.port,
        user: ep.username,
    };
    let out = pool
        .run(&id, &target, "echo again", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(text(&out.stdout), "again\n");
    assert_eq!(pool.handshakes(), 2, "one new login after the drop");

    // Idle connections are closed by the pool's own task.
    support::eventually(
        "idle connection closed",
        Duration::from_secs(10),
        || async { (pool.connections() == 0).then_some(()) },
    )
    .await;
    pool.run(&id, &target, "true", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(pool.handshakes(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_file_goes_up_and_down_verified_and_directories_too() {
    let f = fixture(1).await;
    let pod = f.id(0);
    let src = f.dir.path().join("big.bin");
    random_file(&src, 100 << 20);
    let want = sha_file(&src);

    let out = f.run(&[
        "cp",
        src.to_str().unwrap(),
        &format!("{pod}:big.bin"),
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let up: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(up["direction"], "upload");
    assert_eq!(up["bytes"], 100u64 << 20);
    assert_eq!(up["files"][0]["sha256"], want.as_str());
    assert_eq!(up["files"][0]["chunks"], 13, "8 MiB chunks");
    assert_eq!(up["sent_chunks"], 13);
    assert_eq!(sha_file(&f.home(0).join("big.bin")), want);
    assert!(!f.home(0).join("big.bin.rpa-part").exists());
    assert!(!f.home(0).join("big.bin.rpa-journal").exists());

    let back = f.dir.path().join("back.bin");
    let out = f.run(&[
        "cp",
        &format!("{pod}:big.bin"),
        back.to_str().unwrap(),
        "--output",
        "json",
        "--chunk-size",
        "4MiB",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let down: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(down["direction"], "download");
    assert_eq!(down["files"][0]["chunks"], 25);
    assert_eq!(down["files"][0]["sha256"], want.as_str());
    assert_eq!(sha_file(&back), want);

    // A directory tree, up into an existing pod directory and back down.
    let tree = f.dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::write(tree.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(tree.join("sub/deeper/b.txt"), "beta\n").unwrap();
    std::fs::write(tree.join("sub/empty"), "").unwrap();
    std::fs::create_dir_all(f.home(0).join("work")).unwrap();
    let out = f.run(&["cp", tree.to_str().unwrap(), &format!("{pod}:work")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("uploaded 3 file(s)"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(f.home(0).join("work/tree/sub/deeper/b.txt")).unwrap(),
        "beta\n"
    );
    let down_dir = f.dir.path().join("down");
    let out = f.run(&[
        "cp",
        &format!("{pod}:work/tree"),
        down_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(down_dir.join("sub/deeper/b.txt")).unwrap(),
        "beta\n"
    );
    assert_eq!(std::fs::read(down_dir.join("sub/empty")).unwrap(), b"");
    assert_eq!(
        std::fs::read_to_string(down_dir.join("a.txt")).unwrap(),
        "alpha\n"
    );

    // A missing source says where.
    let out = f.run(&["cp", &format!("{pod}:nope"), down_dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("pod ") && text(&out.stderr).contains("nope"),
        "{}",
        text(&out.stderr)
    );
}

/// Lines in a journal (the header and one per verified chunk).
fn journal_entries(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count().saturating_sub(1))
        .unwrap_or(0)
}

/// Chunks a journal of a 100 MiB file in 1 MiB chunks records as verified, as a resume reads
/// it: a line cut short by the kill, or a chunk recorded twice, counts once or not at all.
fn journal_verified(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| parse_journal(&t, 100 << 20, 1 << 20).len())
        .unwrap_or(0)
}

/// Starts `cp` and SIGKILLs it once `journal` has `at_least` chunk lines; returns the chunks the
/// journal then records as verified.
fn kill_midway(f: &Fixture, args: &[&str], journal: &Path, at_least: usize) -> usize {
    let mut child = f
        .cli(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = journal_entries(journal);
        if n >= at_least {
            child.kill().unwrap();
            child.wait().unwrap();
            return journal_verified(journal);
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("cp ended ({s}) before it could be interrupted; journal had {n} entries");
        }
        assert!(Instant::now() < deadline, "no progress in the journal");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `cp args`, kills it mid-way, checks nothing is in place at `dst`, runs it again and
/// checks it resumed: the chunks verified before the kill are not sent again, the file is whole.
fn kill_and_resume(f: &Fixture, args: &[&str], journal: &Path, dst: &Path, want: &str) {
    let verified = kill_midway(f, args, journal, 5);
    assert!(verified < 100, "killed before the end");
    assert!(!dst.exists(), "not in place before it is whole");
    let out = f.run(args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let resumed = r["resumed_chunks"].as_u64().unwrap();
    assert!(
        resumed >= verified as u64,
        "{resumed} resumed, {verified} verified before the kill"
    );
    assert_eq!(r["sent_chunks"].as_u64().unwrap() + resumed, 100);
    assert_eq!(r["sent_bytes"].as_u64().unwrap(), (100 - resumed) << 20);
    assert_eq!(sha_file(dst), want);
    assert!(!journal.exists(), "the journal goes with the part file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_transfer_resumes_without_resending_verified_chunks() {
    let f = fixture(1).await;
    let pod = f.id(0);
    let (src, want, journal) = f.source("resume.bin", 100 << 20);
    let remote = f.home(0).join("resume.bin");

    // Upload with 1 MiB chunks, killed after a few verified chunks, then run again.
    let up = [
        "cp",
        src.to_str().unwrap(),
        &format!("{pod}:resume.bin"),
        "--chunk-size",
        "1MiB",
        "--output",
        "json",
    ];
    kill_and_resume(&f, &up, &journal, &remote, &want);

    // Download the same way.
    let dst = f.dir.path().join("resumed-down.bin");
    let local_journal = f.dir.path().join("resumed-down.bin.rpa-journal");
    let down = [
        "cp",
        &format!("{pod}:resume.bin"),
        dst.to_str().unwrap(),
        "--chunk-size",
        "1MiB",
        "--output",
        "json",
    ];
    kill_and_resume(&f, &down, &local_journal, &dst, &want);

    // A journal that is not for this file (size, chunk size) is ignored: everything is sent.
    std::fs::write(&journal, "garbage").unwrap();
    let (lib, settings) = f.access();
    let r = lib
        .upload(&pod, &src, "resume.bin", &settings)
        .await
        .unwrap();
    assert_eq!(
        (r.sent_chunks, r.resumed_chunks),
        (100, 0),
        "a foreign journal is ignored"
    );
}

/// SIGKILLs every connection process of the sshd listening as `pid` (and their sessions):
/// each client sees its TCP connection cut.
fn cut_connections(pid: u32) -> usize {
    let procs = sshd::descendants(pid);
    if !procs.is_empty() {
        let mut kill = Command::new("kill");
        kill.arg("-9").args(procs.iter().map(u32::to_string));
        let _ = kill.status();
    }
    procs.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_is_resumed_in_process() {
    let f = fixture(1).await;
    let pod = f.id(0);
    let (src, want, journal) = f.source("cut.bin", 64 << 20);
    let sshd_pid = f
        .emu
        .admin_pods()
        .into_iter()
        .find(|p| p.id == pod)
        .and_then(|p| p.sshd_pid)
        .unwrap();
    let (access, settings) = f.access();
    let upload = {
        let (access, pod, src) = (access.clone(), pod.clone(), src.clone());
        tokio::spawn(async move { access.upload(&pod, &src, "cut.bin", &settings).await })
    };
    support::eventually("a few verified chunks", Duration::from_secs(60), || async {
        (journal_entries(&journal) >= 3).then_some(())
    })
    .await;
    assert!(cut_connections(sshd_pid) > 0, "no connection to cut");
    let r = upload.await.unwrap().expect("the upload survives the cut");
    assert!(r.resumed_chunks >= 3, "{r:?}");
    assert_eq!(r.sent_chunks + r.resumed_chunks, 64);
    assert_eq!(sha_file(&f.home(0).join("cut.bin")), want);
    assert!(access.pool().handshakes() >= 2, "it reconnected");
}

/// Unmounts a tmpfs when the test ends, however it ends.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_before_anything_is_sent() {
    let f = fixture(1).await;
    let pod = f.id(0);
    let small = f.home(0).join("small");
    std::fs::create_dir_all(&small).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=5m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "mounting a 5 MiB tmpfs needs root (CI runs as root)"
    );
    let _mount = Mount(small.clone());
    let src = f.dir.path().join("eight.bin");
    random_file(&src, 8 << 20);
    let started = Instant::now();
    let out = f.run(&[
        "cp",
        src.to_str().unwrap(),
        &format!("{pod}:small/eight.bin"),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("not enough space on pod {pod} for small/eight.bin: {} bytes needed, 5242880 bytes free", 8 << 20)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        std::fs::read_dir(&small).unwrap().count(),
        0,
        "nothing written"
    );

    // A file that fits goes through.
    random_file(&src, 1 << 20);
    let out = f.run(&["cp", src.to_str().unwrap(), &format!("{pod}:small/one.bin")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sha_file(&small.join("one.bin")), sha_file(&src));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_watch_reports_a_stopped_pod_offline_within_the_window() {
    // Pod 0 is a spot pod, pod 1 on-demand.
    let f = fixture_with(2, 1).await;
    std::fs::write(f.home(0).join(".gpu_utilization"), "37\n").unwrap();
    let mut child = f
        .cli(&["pods", "watch", "--interval", "1s", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                return;
            }
        }
    });
    let next = |pod: &str, event: &str| -> (serde_json::Value, Instant) {
        loop {
            let e = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no {event} event for {pod} within a minute"));
            if e["pod"] == pod && (event.is_empty() || e["event"] == event) {
                return (e, Instant::now());
            }
        }
    };
    let (p0, p1) = (f.id(0), f.id(1));
    let (online, _) = next(&p0, "online");
    assert_eq!(online["gpu_utilization"], serde_json::json!([37.0]));
    next(&p1, "online");

    // Stopped through the API: offline at the next poll.
    let stopped_at = Instant::now();
    f.client
        .action(&f.pods[1].id, PodAction::Stop)
        .await
        .unwrap();
    let (off, seen_at) = next(&p1, "offline");
    assert!(seen_at - stopped_at < Duration::from_secs(60));
    assert_eq!(off["state"], "EXITED");

    assert!(off["reason"].as_str().unwrap().contains("EXITED"), "{off}");

    // The spot pod preempted (spot reclaim: the container and its sshd end): its own event,
    // and never reported offline.
    let preempted_at = Instant::now();
    assert!(f.emu.preempt(&p0));
    let (pre, seen_at) = loop {
        let (e, at) = next(&p0, "");
        assert_ne!(e["event"], "offline", "{e}");
        if e["event"] == "preempted" {
            break (e, at);
        }
    };
    assert!(seen_at - preempted_at < Duration::from_secs(60));
    assert_eq!(pre["state"], "EXITED");
    assert!(pre["reason"].as_str().unwrap().contains("spot"), "{pre}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_and_pods_list_show_rates_and_spend() {
    let f = fixture(2).await;
    let out = f.run(&["cost", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lines = lines.as_array().unwrap();
    assert_eq!(lines.len(), 2, "one GPU type and the total");
    assert_eq!(lines[0]["gpu_type"], "NVIDIA RTX A5000");
    assert_eq!(lines[0]["pods"], 2);
    let rate: f64 = f.pods.iter().map(|p| p.usd_per_hour.dollars()).sum();
    assert!((lines[1]["usd_per_hour"].as_f64().unwrap() - rate).abs() < 1e-9);
    let billed: f64 = f.emu.admin_pods().iter().map(|p| p.cost_accrued).sum();
    let accrued = lines[1]["accrued_usd"].as_f64().unwrap();
    assert!(
        accrued > 0.0 && accrued <= billed + 1e-9,
        "{accrued} vs {billed}"
    );

    let out = f.run(&["pods", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.lines().next().unwrap().contains("SPENT"), "{table}");
}
