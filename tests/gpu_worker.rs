//! The demo's GPU worker (`examples/gpu_worker.rs`) as a real process against a real tansu
//! broker: it works a 30-message backlog on 4 partitions down to lag 0 (utilization 90 while
//! busy, 0 once idle) and exits 0 on the drain file; drained or sent SIGTERM mid-backlog, it
//! exits 0 promptly having committed exactly the jobs it did, and a second worker finishes the
//! rest; bad settings exit 2 naming the variable; a drain file present at start means no join.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runpod_autoscaler::clock::SystemClock;
use runpod_autoscaler::signals::kafka::{
    KafkaLagSettings, KafkaSecurity, LagOptions, OffsetResetPolicy,
};
use runpod_autoscaler::signals::KafkaLagSource;
use support::{eventually, example_binary, Tansu};

const TOPIC: &str = "gpu-jobs";
const GROUP: &str = "gpu-workers";
const PARTITIONS: i32 = 4;
const MESSAGES: i64 = 30;

/// Joining a group on tansu takes a few seconds (session timeout 6 s); a loaded 2-core machine
/// can take several times that.
const JOIN_DEADLINE: Duration = Duration::from_secs(60);
/// A drain must end the process within this: the job in hand (≤ 300 ms here), one commit and
/// leaving the group.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// The group's lag as the autoscaler reads it. Earliest: a partition the group never committed
/// on counts all its messages, so the total is exactly the messages not yet committed.
fn lag_source(tansu: &Tansu) -> KafkaLagSource {
    KafkaLagSource::new(
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
    .unwrap()
}

async fn lag(source: &KafkaLagSource) -> Option<i64> {
    source.poll().await.ok().map(|r| r.total_lag)
}

async fn wait_for_lag(source: &KafkaLagSource, want: i64, deadline: Duration) {
    eventually(&format!("lag {want}"), deadline, || async move {
        (lag(source).await == Some(want)).then_some(())
    })
    .await;
}

/// A broker with the topic and its 30 messages, and the group's lag read back as 30.
async fn backlog() -> (Tansu, KafkaLagSource) {
    let tansu = Tansu::start().await;
    tansu.create_topic(TOPIC, PARTITIONS).await;
    tansu.produce(TOPIC, PARTITIONS, usize::try_from(MESSAGES).unwrap());
    let source = lag_source(&tansu);
    wait_for_lag(&source, MESSAGES, Duration::from_secs(20)).await;
    (tansu, source)
}

/// A worker process with its own `HOME`, output captured to files there; killed on drop.
struct Worker {
    child: Child,
    home: tempfile::TempDir,
    exited: Option<ExitStatus>,
}

impl Worker {
    /// Starts the example with exactly `env` (nothing inherited) and `HOME` = a fresh tempdir.
    fn spawn(env: &[(&str, String)]) -> Worker {
        Worker::spawn_in(tempfile::tempdir().unwrap(), env)
    }

    fn spawn_in(home: tempfile::TempDir, env: &[(&str, String)]) -> Worker {
        let out = std::fs::File::create(home.path().join("stdout")).unwrap();
        let err = std::fs::File::create(home.path().join("stderr")).unwrap();
        let child = Command::new(example_binary("gpu_worker"))
            .env_clear()
            .env("HOME", home.path())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting the gpu_worker example");
        Worker {
            child,
            home,
            exited: None,
        }
    }

    /// A worker of the group on the broker, `work_ms` per job, its drain file in its `HOME`.
    fn start(tansu: &Tansu, pod: &str, work_ms: u64) -> Worker {
        let home = tempfile::tempdir().unwrap();
        let drain = home.path().join("drain");
        Worker::spawn_in(
            home,
            &[
                ("KAFKA_BOOTSTRAP_SERVERS", tansu.servers()),
                ("KAFKA_CONSUMER_GROUP", GROUP.into()),
                ("KAFKA_TOPIC", TOPIC.into()),
                ("RPA_POD_ID", pod.into()),
                ("RPA_DRAIN_FILE", drain.display().to_string()),
                ("WORK_MS_PER_JOB", work_ms.to_string()),
            ],
        )
    }

    fn drain_file(&self) -> PathBuf {
        self.home.path().join("drain")
    }

    fn utilization(&self) -> Option<String> {
        std::fs::read_to_string(self.home.path().join(".gpu_utilization")).ok()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.home.path().join("stdout")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.home.path().join("stderr")).unwrap_or_default()
    }

    /// (partition, offset) of every job logged so far, each checked to have been committed as
    /// offset + 1.
    fn jobs(&self) -> Vec<(i32, i64)> {
        self.stdout()
            .lines()
            .filter(|l| l.contains(" job "))
            .map(|l| {
                let field = |name: &str| -> i64 {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| panic!("job line without {name}: {l}"))
                };
                let (partition, offset) = (field("partition"), field("offset"));
                assert_eq!(field("committed"), offset + 1, "{l}");
                (i32::try_from(partition).unwrap(), offset)
            })
            .collect()
    }

    /// Waits for the process to exit (polling, bounded by `deadline`).
    async fn exit_within(&mut self, deadline: Duration, what: &str) -> ExitStatus {
        let child = &mut self.child;
        let status = eventually(what, deadline, || {
            let status = child.try_wait().unwrap();
            async move { status }
        })
        .await;
        self.exited = Some(status);
        status
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- worker stdout ---\n{}--- worker stderr ---\n{}",
                self.stdout(),
                self.stderr()
            );
        }
    }
}

#[tokio::test]
async fn works_the_backlog_down_to_zero_then_drains_on_the_drain_file() {
    let (tansu, source) = backlog().await;
    let started = Instant::now();
    let mut worker = Worker::start(&tansu, "pod-a", 20);

    // Lag falls to 0; utilization read 90 at some point on the way.
    let seen_busy = std::cell::Cell::new(false);
    let (seen, w, src) = (&seen_busy, &worker, &source);
    eventually(
        "the worker to bring the lag to 0",
        JOIN_DEADLINE,
        || async move {
            if w.utilization().as_deref() == Some("90") {
                seen.set(true);
            }
            (lag(src).await == Some(0)).then_some(())
        },
    )
    .await;
    let to_zero = started.elapsed();
    assert!(seen_busy.get(), "utilization never read 90 while busy");

    // Every message done exactly once, each commit one past its offset.
    let jobs = worker.jobs();
    let distinct: BTreeSet<_> = jobs.iter().copied().collect();
    assert_eq!(jobs.len(), 30, "{jobs:?}");
    assert_eq!(distinct.len(), 30, "{jobs:?}");
    assert_eq!(
        distinct.iter().map(|(p, _)| *p).collect::<BTreeSet<_>>(),
        (0..PARTITIONS).collect()
    );

    // Idle after ~1 s without a message.
    eventually("utilization 0 once idle", Duration::from_secs(10), || {
        let u = worker.utilization();
        async move { (u.as_deref() == Some("0")).then_some(()) }
    })
    .await;

    std::fs::write(worker.drain_file(), "").unwrap();
    let drain = Instant::now();
    let status = worker
        .exit_within(DRAIN_DEADLINE, "the worker to exit on the drain file")
        .await;
    let drained_in = drain.elapsed();
    assert_eq!(status.code(), Some(0), "{}", worker.stderr());
    assert_eq!(worker.utilization().as_deref(), Some("0"));
    assert!(
        worker.stderr().contains("left the group"),
        "{}",
        worker.stderr()
    );
    assert_eq!(lag(&source).await, Some(0));
    eprintln!("lag 30 -> 0 in {to_zero:?} from process start; drain -> exit in {drained_in:?}");
}

/// Drains (by file or signal) a worker that has done its first job of a slow backlog: it must
/// exit 0 promptly, having committed exactly the jobs it logged; a second worker then does the
/// rest (lag 0, no message done twice).
async fn drain_mid_backlog(stop: impl FnOnce(&Worker)) {
    let (tansu, source) = backlog().await;
    let mut worker = Worker::start(&tansu, "pod-a", 300);
    let w = &worker;
    eventually("the first job", JOIN_DEADLINE, || {
        let done = !w.jobs().is_empty();
        async move { done.then_some(()) }
    })
    .await;

    stop(&worker);
    let drain = Instant::now();
    let status = worker
        .exit_within(DRAIN_DEADLINE, "the worker to exit on drain")
        .await;
    let drained_in = drain.elapsed();
    assert_eq!(status.code(), Some(0), "{}", worker.stderr());
    assert_eq!(worker.utilization().as_deref(), Some("0"));

    let first = worker.jobs();
    let done = i64::try_from(first.len()).unwrap();
    assert!((1..MESSAGES).contains(&done), "{first:?}");
    // What it did is committed, and nothing else.
    wait_for_lag(&source, MESSAGES - done, Duration::from_secs(10)).await;

    // The rest is still there for the group: a second worker finishes it.
    let joined = Instant::now();
    let second = Worker::start(&tansu, "pod-b", 20);
    wait_for_lag(&source, 0, JOIN_DEADLINE).await;
    let rest = second.jobs();
    let all: BTreeSet<_> = first.iter().chain(&rest).copied().collect();
    assert_eq!(first.len() + rest.len(), 30, "{first:?} then {rest:?}");
    assert_eq!(
        all.len(),
        30,
        "a message was done twice: {first:?} then {rest:?}"
    );
    eprintln!(
        "drained after {done} job(s) in {drained_in:?}; second worker took the other {} to lag 0 in {:?}",
        rest.len(),
        joined.elapsed()
    );
}

#[tokio::test]
async fn a_drain_file_mid_backlog_exits_0_leaving_the_rest_uncommitted() {
    drain_mid_backlog(|w| std::fs::write(w.drain_file(), "").unwrap()).await;
}

#[tokio::test]
async fn sigterm_mid_backlog_drains_the_same_way() {
    drain_mid_backlog(|w| {
        let ok = Command::new("kill")
            .args(["-TERM", &w.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {}", w.pid());
    })
    .await;
}

/// The settings of a worker that would start (no broker is contacted before they are checked).
fn good_env(drain: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9".into()),
        ("KAFKA_CONSUMER_GROUP", GROUP.into()),
        ("KAFKA_TOPIC", TOPIC.into()),
        ("RPA_POD_ID", "pod-a".into()),
        ("RPA_DRAIN_FILE", drain.display().to_string()),
    ]
}

#[tokio::test]
async fn bad_settings_exit_2_naming_the_variable() {
    let scratch = tempfile::tempdir().unwrap();
    let drain = scratch.path().join("drain");
    let without = |var: &str| {
        good_env(&drain)
            .into_iter()
            .filter(|(k, _)| *k != var)
            .collect::<Vec<_>>()
    };
    let with = |var: &'static str, value: &str| {
        let mut env = without(var);
        env.push((var, value.into()));
        env
    };
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "KAFKA_BOOTSTRAP_SERVERS",
            without("KAFKA_BOOTSTRAP_SERVERS"),
        ),
        (
            "KAFKA_BOOTSTRAP_SERVERS",
            with("KAFKA_BOOTSTRAP_SERVERS", "a:1,,b:2"),
        ),
        ("KAFKA_CONSUMER_GROUP", without("KAFKA_CONSUMER_GROUP")),
        ("KAFKA_TOPIC", without("KAFKA_TOPIC")),
        ("KAFKA_TOPIC", with("KAFKA_TOPIC", "gpu jobs")),
        ("RPA_POD_ID", without("RPA_POD_ID")),
        ("RPA_DRAIN_FILE", without("RPA_DRAIN_FILE")),
        ("WORK_MS_PER_JOB", with("WORK_MS_PER_JOB", "fast")),
        ("WORK_MS_PER_JOB", with("WORK_MS_PER_JOB", "-5")),
        (
            "GPU_UTILIZATION_FILE",
            with("GPU_UTILIZATION_FILE", "/nonexistent/dir/util"),
        ),
    ];
    for (var, env) in cases {
        let mut worker = Worker::spawn(&env);
        let status = worker
            .exit_within(Duration::from_secs(10), &format!("exit on bad {var}"))
            .await;
        let stderr = worker.stderr();
        assert_eq!(status.code(), Some(2), "{var}: {stderr}");
        assert!(stderr.contains(var), "{var} not named: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(worker.stdout().is_empty());
    }
}

#[tokio::test]
async fn a_drain_file_present_at_start_exits_0_without_joining() {
    let scratch = tempfile::tempdir().unwrap();
    let drain = scratch.path().join("drain");
    std::fs::write(&drain, "").unwrap();
    let mut worker = Worker::spawn(&good_env(&drain));
    let status = worker
        .exit_within(Duration::from_secs(10), "exit with the drain file present")
        .await;
    assert_eq!(status.code(), Some(0), "{}", worker.stderr());
    assert!(
        worker.stderr().contains("not joining"),
        "{}",
        worker.stderr()
    );
    assert_eq!(worker.utilization().as_deref(), Some("0"));
}
