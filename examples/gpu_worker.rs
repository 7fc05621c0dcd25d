//! A stand-in for the platform's GPU worker, shaped like the real one: it is what the
//! reconciler starts on each pod in `worker` mode (local demo, tests). It joins the consumer
//! group on the topic, takes one message at a time, "works" on it for `WORK_MS_PER_JOB`,
//! commits that message's offset (so the group's lag really falls), and reports GPU
//! utilization the way an emulated pod's `nvidia-smi` reads it: `90` while busy, `0` once idle.
//!
//! Environment (exported by the bootstrap; see `JoinPlan::Worker` in `src/join/pod.rs`):
//!
//! | variable | required | meaning |
//! |---|---|---|
//! | `KAFKA_BOOTSTRAP_SERVERS` | yes | `host:port[,host:port…]` |
//! | `KAFKA_CONSUMER_GROUP` | yes | the group whose lag the autoscaler reads |
//! | `KAFKA_TOPIC` | yes | the topic of GPU jobs |
//! | `RPA_POD_ID` | yes | this pod's id (client id, log lines) |
//! | `RPA_DRAIN_FILE` | yes | when this file exists: stop taking work, finish, commit, leave, exit 0 |
//! | `WORK_MS_PER_JOB` | no (200) | simulated work per message, in milliseconds |
//! | `GPU_UTILIZATION_FILE` | no (`$HOME/.gpu_utilization`) | where utilization (integer %) is written |
//! | `STEPS_PER_JOB` | no (1) | a job is this many steps of `WORK_MS_PER_JOB` each |
//! | `CHECKPOINT_EVERY` | no (0: never) | checkpoint the job every this many steps, and on drain |
//! | `RPA_AGENT` | no (`runpod-autoscaler`) | the binary whose `agent checkpoint`/`agent resume` store checkpoints |
//! | `CHECKPOINT_STORE_ARGS` | no | extra arguments for those commands (e.g. `--config /etc/rpa.toml`); the reconciler instead passes the store in the environment the agent reads (`RUNPOD_AUTOSCALER__CHECKPOINT__BUCKET`, `…__PREFIX`, `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`) |
//! | `RPA_JOBS_FILE` | no (`$HOME/.runpod-autoscaler/jobs`) | the job in hand, one id per line, for the reconciler |
//!
//! With checkpoints on, a job (id `<topic>-<partition>-<offset>`) first resumes from its latest
//! checkpoint, if any (`progress` in its directory holds the steps done); every
//! `CHECKPOINT_EVERY` steps it checkpoints its directory; a drain during a job checkpoints it and
//! leaves it uncommitted, so Kafka delivers it again and the next worker resumes it. A preempted
//! pod's job is redelivered the same way, redoing at most `CHECKPOINT_EVERY` steps.
//!
//! A missing or invalid setting exits 2 with a message naming the variable. SIGTERM and SIGINT
//! drain like the drain file. One line per job goes to stdout; lifecycle and client events go to
//! stderr.
//!
//! `cargo run --example gpu_worker` (with the environment above).

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::{Instant, MissedTickBehavior};

/// Exit status for a missing or invalid setting (as a CLI usage error).
const EXIT_SETTINGS: u8 = 2;
/// Exit status for a failure after start (the job in hand could not be committed, or the
/// worker could not run at all).
const EXIT_FAILURE: u8 = 1;

/// Default simulated work per message: long enough to see a backlog drain over a few seconds
/// in the demo, short enough that a drain finishes promptly.
const DEFAULT_WORK_MS: u64 = 200;
/// Upper bound on `WORK_MS_PER_JOB` (one hour): anything longer is a typo, and it keeps the
/// derived `max.poll.interval.ms` inside librdkafka's range.
const MAX_WORK_MS: u64 = 3_600_000;
/// How often the drain file is looked for: a tenth of a second makes a drain start "at once"
/// for a human or the reconciler, at the cost of one `stat` per tick.
const DRAIN_CHECK_EVERY: Duration = Duration::from_millis(100);
/// No message for this long after the last job means idle: utilization goes back to 0.
const IDLE_AFTER: Duration = Duration::from_secs(1);
/// Utilization reported while a job is in hand, and when idle.
const BUSY_UTILIZATION: &str = "90";
const IDLE_UTILIZATION: &str = "0";
/// How long leaving the group may take before the worker exits anyway (the broker then
/// expires the membership after the session timeout).
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);
/// Session timeout and heartbeat: a preempted or crashed pod's partitions move to the other
/// workers within 6 s (the broker's usual minimum), which matters for short-lived burst pods;
/// heartbeats at 0.5 s also make joins and rebalances quick.
const SESSION_TIMEOUT_MS: &str = "6000";
const HEARTBEAT_INTERVAL_MS: &str = "500";
/// librdkafka's default `max.poll.interval.ms` (5 min); raised for long jobs so that working on
/// one message never gets the worker thrown out of the group.
const DEFAULT_MAX_POLL_INTERVAL_MS: u64 = 300_000;

/// What the worker runs with, read from the environment.
#[derive(Debug, Clone)]
struct Settings {
    bootstrap_servers: String,
    group: String,
    topic: String,
    pod_id: String,
    drain_file: PathBuf,
    work: Duration,
    utilization_file: PathBuf,
    steps: u64,
    checkpoint_every: u64,
    agent: PathBuf,
    store_args: Vec<String>,
    jobs_file: PathBuf,
    work_root: PathBuf,
}

/// A missing or invalid setting: which variable, what is wrong, what to set.
#[derive(Debug)]
struct SettingError {
    var: &'static str,
    problem: String,
    fix: &'static str,
}

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}; set {} to {}",
            self.var, self.problem, self.var, self.fix
        )
    }
}

impl std::error::Error for SettingError {}

impl Settings {
    /// Reads the settings through `get` (the process environment in `main`).
    fn read(get: impl Fn(&str) -> Option<OsString>) -> Result<Settings, SettingError> {
        let bootstrap_servers = required(
            &get,
            "KAFKA_BOOTSTRAP_SERVERS",
            "the brokers, e.g. 127.0.0.1:9092 or b1:9092,b2:9092",
        )?;
        if bootstrap_servers
            .split(',')
            .any(|s| s.trim().is_empty() || s.trim().contains(char::is_whitespace))
        {
            return Err(SettingError {
                var: "KAFKA_BOOTSTRAP_SERVERS",
                problem: format!("is not a broker list ({bootstrap_servers:?})"),
                fix: "comma-separated host:port entries, e.g. b1:9092,b2:9092",
            });
        }
        let group = required(
            &get,
            "KAFKA_CONSUMER_GROUP",
            "the consumer group the autoscaler reads lag for, e.g. gpu-workers",
        )?;
        let topic = required(&get, "KAFKA_TOPIC", "the topic of GPU jobs, e.g. gpu-jobs")?;
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if topic.len() > 249 || topic == "." || topic == ".." || !topic.chars().all(legal) {
            return Err(SettingError {
                var: "KAFKA_TOPIC",
                problem: format!("is not a valid Kafka topic name ({topic:?})"),
                fix: "a name of at most 249 characters from [a-zA-Z0-9._-]",
            });
        }
        let pod_id = required(
            &get,
            "RPA_POD_ID",
            "this pod's id (the bootstrap exports it)",
        )?;
        let drain_file = PathBuf::from(required(
            &get,
            "RPA_DRAIN_FILE",
            "the path whose existence means drain (the bootstrap exports it)",
        )?);
        let work = match optional(&get, "WORK_MS_PER_JOB", "a whole number of milliseconds")? {
            None => Duration::from_millis(DEFAULT_WORK_MS),
            Some(v) => match v.trim().parse::<u64>() {
                Ok(ms) if ms <= MAX_WORK_MS => Duration::from_millis(ms),
                _ => {
                    return Err(SettingError {
                        var: "WORK_MS_PER_JOB",
                        problem: format!("is not a number of milliseconds up to 3600000 ({v:?})"),
                        fix: "a whole number of milliseconds, e.g. 200",
                    })
                }
            },
        };
        let utilization_file = match optional(&get, "GPU_UTILIZATION_FILE", "a file path")? {
            Some(p) => PathBuf::from(p),
            None => match optional(&get, "HOME", "the home directory")? {
                Some(home) => Path::new(&home).join(".gpu_utilization"),
                None => {
                    return Err(SettingError {
                        var: "GPU_UTILIZATION_FILE",
                        problem: "is not set and neither is HOME".into(),
                        fix: "the file nvidia-smi reads utilization from, e.g. \
                              $HOME/.gpu_utilization",
                    })
                }
            },
        };
        let number = |var: &'static str, default: u64| -> Result<u64, SettingError> {
            match optional(&get, var, "a whole number")? {
                None => Ok(default),
                Some(v) => v.trim().parse::<u64>().map_err(|_| SettingError {
                    var,
                    problem: format!("is not a whole number ({v:?})"),
                    fix: "a whole number, e.g. 10",
                }),
            }
        };
        let steps = number("STEPS_PER_JOB", 1)?.max(1);
        let checkpoint_every = number("CHECKPOINT_EVERY", 0)?;
        let agent = PathBuf::from(
            optional(&get, "RPA_AGENT", "the runpod-autoscaler binary")?
                .unwrap_or_else(|| "runpod-autoscaler".into()),
        );
        let store_args = optional(&get, "CHECKPOINT_STORE_ARGS", "arguments")?
            .map(|a| a.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let state = match optional(&get, "HOME", "the home directory")? {
            Some(home) => Path::new(&home).join(".runpod-autoscaler"),
            None => std::env::temp_dir().join("gpu-worker"),
        };
        let jobs_file = optional(&get, "RPA_JOBS_FILE", "a file path")?
            .map(PathBuf::from)
            .unwrap_or_else(|| state.join("jobs"));
        Ok(Settings {
            bootstrap_servers,
            group,
            topic,
            pod_id,
            drain_file,
            work,
            utilization_file,
            steps,
            checkpoint_every,
            agent,
            store_args,
            jobs_file,
            work_root: state.join("work"),
        })
    }
}

/// A variable that must be set, non-empty and valid UTF-8.
fn required(
    get: &impl Fn(&str) -> Option<OsString>,
    var: &'static str,
    fix: &'static str,
) -> Result<String, SettingError> {
    optional(get, var, fix)?.ok_or_else(|| SettingError {
        var,
        problem: "is not set".into(),
        fix,
    })
}

/// A variable that may be unset (or empty, which counts as unset); when set it must be UTF-8.
fn optional(
    get: &impl Fn(&str) -> Option<OsString>,
    var: &'static str,
    fix: &'static str,
) -> Result<Option<String>, SettingError> {
    match get(var) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v.into_string().map(Some).map_err(|_| SettingError {
            var,
            problem: "is not valid UTF-8".into(),
            fix,
        }),
    }
}

/// One line to stderr with a timestamp (lifecycle and client events).
fn event(pod: &str, what: fmt::Arguments<'_>) {
    eprintln!(
        "{} gpu_worker pod={pod} {what}",
        humantime::format_rfc3339_millis(SystemTime::now())
    );
}

/// Writes `value` to the utilization file atomically (a reader never sees it half-written).
fn write_utilization(path: &Path, value: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, value)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Client events to stderr: librdkafka warnings and errors, and every (re)assignment.
struct WorkerContext {
    pod: String,
}

impl ClientContext for WorkerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        event(
            &self.pod,
            format_args!("kafka level={level:?} facility={fac} {message}"),
        );
    }

    fn error(&self, error: KafkaError, reason: &str) {
        event(&self.pod, format_args!("kafka error: {error}: {reason}"));
    }
}

impl ConsumerContext for WorkerContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let list = |tpl: &TopicPartitionList| {
            tpl.elements()
                .iter()
                .map(|e| format!("{}/{}", e.topic(), e.partition()))
                .collect::<Vec<_>>()
                .join(",")
        };
        match rebalance {
            Rebalance::Assign(tpl) => event(
                &self.pod,
                format_args!("assigned partitions=[{}]", list(tpl)),
            ),
            Rebalance::Revoke(tpl) => event(
                &self.pod,
                format_args!("revoked partitions=[{}]", list(tpl)),
            ),
            Rebalance::Error(e) => event(&self.pod, format_args!("rebalance error: {e}")),
        }
    }
}

type Kafka = StreamConsumer<WorkerContext>;

/// Why the worker stops taking work.
#[derive(Debug, Clone, Copy)]
enum Stop {
    DrainFile,
    Signal(&'static str),
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::DrainFile => f.write_str("drain file"),
            Stop::Signal(name) => f.write_str(name),
        }
    }
}

/// The stop requests the worker listens to: the drain file, SIGTERM and SIGINT.
struct StopRequests {
    drain_file: PathBuf,
    drain_check: tokio::time::Interval,
    sigterm: Signal,
    sigint: Signal,
}

impl StopRequests {
    fn new(drain_file: PathBuf) -> std::io::Result<StopRequests> {
        let mut drain_check = tokio::time::interval(DRAIN_CHECK_EVERY);
        drain_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(StopRequests {
            drain_file,
            drain_check,
            sigterm: signal(SignalKind::terminate())?,
            sigint: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves when a stop is requested (cancellation safe).
    async fn next(&mut self) -> Stop {
        loop {
            tokio::select! {
                _ = self.sigterm.recv() => return Stop::Signal("SIGTERM"),
                _ = self.sigint.recv() => return Stop::Signal("SIGINT"),
                _ = self.drain_check.tick() => {
                    if self.drain_file.exists() {
                        return Stop::DrainFile;
                    }
                }
            }
        }
    }
}

/// What happened while waiting for work.
enum Wait {
    Stop(Stop),
    Idle,
    Message(Result<OwnedMessage, KafkaError>),
}

struct Worker {
    settings: Settings,
    consumer: Kafka,
    busy: bool,
}

impl Worker {
    fn log(&self, what: fmt::Arguments<'_>) {
        event(&self.settings.pod_id, what);
    }

    /// Reports utilization; a failed write is logged, never fatal (the file only informs the
    /// health check).
    fn set_busy(&mut self, busy: bool) {
        let value = if busy {
            BUSY_UTILIZATION
        } else {
            IDLE_UTILIZATION
        };
        if let Err(e) = write_utilization(&self.settings.utilization_file, value) {
            self.log(format_args!(
                "cannot write {} to {}: {e}",
                value,
                self.settings.utilization_file.display()
            ));
        }
        self.busy = busy;
    }

    /// Takes jobs until a stop is requested. Returns false when a job was in hand at that
    /// moment and its commit failed (it will be delivered again, to another worker).
    async fn run(&mut self, stops: &mut StopRequests) -> bool {
        let mut idle_at = Instant::now() + IDLE_AFTER;
        let (stop, committed) = loop {
            let busy = self.busy;
            // Biased: a stop already requested wins over a message already fetched.
            let wait = tokio::select! {
                biased;
                stop = stops.next() => Wait::Stop(stop),
                _ = tokio::time::sleep_until(idle_at), if busy => Wait::Idle,
                msg = self.consumer.recv() => Wait::Message(msg.map(|m| m.detach())),
            };
            match wait {
                Wait::Stop(stop) => break (stop, true),
                Wait::Idle => {
                    self.set_busy(false);
                    self.log(format_args!("idle"));
                }
                Wait::Message(Err(e)) => self.log(format_args!("consume error: {e}")),
                Wait::Message(Ok(msg)) => {
                    let (stop, committed) = self.work(&msg, stops).await;
                    idle_at = Instant::now() + IDLE_AFTER;
                    if let Some(stop) = stop {
                        break (stop, committed);
                    }
                }
            }
        };
        self.log(format_args!("draining ({stop}): no more jobs taken"));
        self.stop_fetching();
        committed
    }

    /// Works on one message, step by step (resuming from and writing checkpoints when they are
    /// on), commits its offset and logs the job. A stop requested meanwhile stops fetching at
    /// once; the job in hand is finished and committed, or, with checkpoints on, checkpointed
    /// and left uncommitted for the next worker. Returns that stop, if any, and whether the job
    /// ended as it should (committed, or checkpointed on drain).
    async fn work(&mut self, msg: &OwnedMessage, stops: &mut StopRequests) -> (Option<Stop>, bool) {
        if !self.busy {
            self.set_busy(true);
        }
        let started = Instant::now();
        let job = format!("{}-{}-{}", msg.topic(), msg.partition(), msg.offset());
        let dir = self.settings.work_root.join(&job);
        self.report_job(Some(&job));
        let checkpoints = self.settings.checkpoint_every > 0;
        let resumed_from = if checkpoints {
            self.resume(&job, &dir).await
        } else {
            0
        };
        let mut done = resumed_from;
        let mut stop = None;
        while done < self.settings.steps {
            let step = tokio::time::sleep(self.settings.work);
            tokio::pin!(step);
            loop {
                tokio::select! {
                    () = &mut step => break,
                    s = stops.next(), if stop.is_none() => {
                        self.log(format_args!(
                            "stop requested ({s}) during job {job}: fetching stopped"
                        ));
                        self.stop_fetching();
                        stop = Some(s);
                    }
                }
            }
            done += 1;
            let due = checkpoints && done % self.settings.checkpoint_every == 0;
            if done < self.settings.steps && (due || (checkpoints && stop.is_some())) {
                let saved = self.checkpoint(&job, &dir, done).await;
                if stop.is_some() {
                    // Drained mid-job: the checkpoint carries it to the next worker. A failed
                    // checkpoint leaves the job listed, so the reconciler keeps waiting for it.
                    if saved {
                        self.report_job(None);
                    }
                    self.log(format_args!(
                        "job {job} checkpointed at step {done}/{} on drain; left for the next worker",
                        self.settings.steps
                    ));
                    return (stop, saved);
                }
            }
        }
        let next = msg.offset() + 1;
        let mut tpl = TopicPartitionList::new();
        let committed = tpl
            .add_partition_offset(msg.topic(), msg.partition(), Offset::Offset(next))
            .and_then(|()| {
                // A synchronous commit blocks this thread for one broker round trip; the
                // runtime's other worker keeps the signal and timer tasks going.
                tokio::task::block_in_place(|| self.consumer.commit(&tpl, CommitMode::Sync))
            });
        self.report_job(None);
        let _ = std::fs::remove_dir_all(&dir);
        let took_ms = started.elapsed().as_millis();
        let bytes = msg.payload().map_or(0, <[u8]>::len);
        let steps = self.settings.steps;
        match &committed {
            Ok(()) => println!(
                "{} gpu_worker pod={} job topic={} partition={} offset={} bytes={} took_ms={} \
                 steps={steps} resumed_from={resumed_from} committed={}",
                humantime::format_rfc3339_millis(SystemTime::now()),
                self.settings.pod_id,
                msg.topic(),
                msg.partition(),
                msg.offset(),
                bytes,
                took_ms,
                next
            ),
            Err(e) => println!(
                "{} gpu_worker pod={} job topic={} partition={} offset={} bytes={} took_ms={} \
                 commit_failed=\"{e}\" (the job will be delivered again)",
                humantime::format_rfc3339_millis(SystemTime::now()),
                self.settings.pod_id,
                msg.topic(),
                msg.partition(),
                msg.offset(),
                bytes,
                took_ms
            ),
        }
        (stop, committed.is_ok())
    }

    /// Writes the job in hand (or none) where the reconciler reads it.
    fn report_job(&self, job: Option<&str>) {
        let file = &self.settings.jobs_file;
        let written = file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(file, job.map(|j| format!("{j}\n")).unwrap_or_default()));
        if let Err(e) = written {
            self.log(format_args!("cannot write {}: {e}", file.display()));
        }
    }

    /// Runs the agent with `args` (plus the store arguments); returns its exit code. Its
    /// messages are logged when it fails with anything but "nothing to resume" (exit 3).
    async fn agent(&self, args: &[&str]) -> Option<i32> {
        let mut cmd = tokio::process::Command::new(&self.settings.agent);
        cmd.args(args)
            .args(&self.settings.store_args)
            .env("RPA_POD_ID", &self.settings.pod_id)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        match cmd.output().await {
            Ok(out) => {
                let code = out.status.code();
                if !matches!(code, Some(0 | 3)) {
                    for line in String::from_utf8_lossy(&out.stderr).lines() {
                        self.log(format_args!("agent: {line}"));
                    }
                }
                code
            }
            Err(e) => {
                self.log(format_args!(
                    "cannot run {} (RPA_AGENT): {e}",
                    self.settings.agent.display()
                ));
                None
            }
        }
    }

    /// Restores the job's directory from its latest checkpoint; returns the steps it had done.
    async fn resume(&self, job: &str, dir: &Path) -> u64 {
        let _ = std::fs::remove_dir_all(dir);
        if let Err(e) = std::fs::create_dir_all(dir) {
            self.log(format_args!("cannot create {}: {e}", dir.display()));
            return 0;
        }
        let dir_arg = dir.to_string_lossy();
        match self
            .agent(&["agent", "resume", "--job", job, "--dir", &dir_arg])
            .await
        {
            Some(0) => {
                let steps = std::fs::read_to_string(dir.join("progress"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                self.log(format_args!(
                    "job {job} resumed from its checkpoint at step {steps}"
                ));
                steps
            }
            // Nothing to resume: a fresh job.
            Some(3) => 0,
            other => {
                self.log(format_args!(
                    "resuming job {job} failed (agent exit {other:?}); starting it over"
                ));
                0
            }
        }
    }

    /// Checkpoints the job's directory after `done` steps; true when stored.
    async fn checkpoint(&self, job: &str, dir: &Path, done: u64) -> bool {
        if let Err(e) = std::fs::write(dir.join("progress"), done.to_string()) {
            self.log(format_args!("cannot write the progress of job {job}: {e}"));
            return false;
        }
        let dir_arg = dir.to_string_lossy();
        let step = format!("step={done}");
        let code = self
            .agent(&[
                "agent",
                "checkpoint",
                "--job",
                job,
                "--dir",
                &dir_arg,
                "--meta",
                &step,
            ])
            .await;
        if code == Some(0) {
            self.log(format_args!("job {job} checkpointed at step {done}"));
            true
        } else {
            self.log(format_args!(
                "checkpointing job {job} at step {done} failed (agent exit {code:?})"
            ));
            false
        }
    }

    /// Pauses every assigned partition so that librdkafka fetches nothing more.
    fn stop_fetching(&self) {
        let paused = self
            .consumer
            .assignment()
            .and_then(|tpl| self.consumer.pause(&tpl));
        if let Err(e) = paused {
            self.log(format_args!("cannot pause fetching: {e}"));
        }
    }
}

/// Creates the consumer (does not contact the broker yet).
fn consumer(settings: &Settings) -> Result<Kafka, KafkaError> {
    let work_ms = u64::try_from(settings.work.as_millis()).unwrap_or(MAX_WORK_MS);
    let max_poll_interval_ms = DEFAULT_MAX_POLL_INTERVAL_MS.max(2 * work_ms + 60_000);
    ClientConfig::new()
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set("group.id", &settings.group)
        .set("client.id", format!("gpu-worker-{}", settings.pod_id))
        // Offsets are committed by hand, one processed message at a time.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A job queued before any worker joined is still work to do.
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", SESSION_TIMEOUT_MS)
        .set("heartbeat.interval.ms", HEARTBEAT_INTERVAL_MS)
        .set("max.poll.interval.ms", max_poll_interval_ms.to_string())
        .set_log_level(RDKafkaLogLevel::Warning)
        .create_with_context(WorkerContext {
            pod: settings.pod_id.clone(),
        })
}

/// Leaves the group (librdkafka's consumer close, run when the consumer is dropped), bounded by
/// [`CLOSE_DEADLINE`].
async fn leave_group(consumer: Kafka, pod: &str) {
    let started = Instant::now();
    let close = tokio::task::spawn_blocking(move || drop(consumer));
    match tokio::time::timeout(CLOSE_DEADLINE, close).await {
        Ok(Ok(())) => event(
            pod,
            format_args!("left the group in {} ms", started.elapsed().as_millis()),
        ),
        Ok(Err(e)) => event(pod, format_args!("leaving the group failed: {e}")),
        Err(_) => event(
            pod,
            format_args!(
                "leaving the group took over {CLOSE_DEADLINE:?}; exiting, the broker expires the \
                 membership"
            ),
        ),
    }
}

/// Everything after the settings: returns the exit status.
async fn run(settings: Settings) -> u8 {
    let pod = settings.pod_id.clone();
    // Listen for signals first: a SIGTERM from now on drains instead of killing.
    let mut stops = match StopRequests::new(settings.drain_file.clone()) {
        Ok(s) => s,
        Err(e) => {
            event(&pod, format_args!("cannot listen for signals: {e}"));
            return EXIT_FAILURE;
        }
    };
    if let Err(e) = write_utilization(&settings.utilization_file, IDLE_UTILIZATION) {
        eprintln!(
            "gpu_worker: GPU_UTILIZATION_FILE {} cannot be written ({e}); set \
             GPU_UTILIZATION_FILE to a writable path",
            settings.utilization_file.display()
        );
        return EXIT_SETTINGS;
    }
    if settings.drain_file.exists() {
        event(
            &pod,
            format_args!(
                "drain file {} exists: not joining",
                settings.drain_file.display()
            ),
        );
        return 0;
    }
    let consumer = match consumer(&settings) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "gpu_worker: the Kafka client rejected the settings ({e}); check \
                 KAFKA_BOOTSTRAP_SERVERS and KAFKA_CONSUMER_GROUP"
            );
            return EXIT_SETTINGS;
        }
    };
    if let Err(e) = consumer.subscribe(&[settings.topic.as_str()]) {
        eprintln!(
            "gpu_worker: cannot subscribe to KAFKA_TOPIC {}: {e}",
            settings.topic
        );
        return EXIT_SETTINGS;
    }
    event(
        &pod,
        format_args!(
            "started brokers={} group={} topic={} work_ms={} utilization_file={} drain_file={}",
            settings.bootstrap_servers,
            settings.group,
            settings.topic,
            settings.work.as_millis(),
            settings.utilization_file.display(),
            settings.drain_file.display()
        ),
    );
    let mut worker = Worker {
        settings,
        consumer,
        busy: false,
    };
    let committed = worker.run(&mut stops).await;
    worker.set_busy(false);
    let Worker { consumer, .. } = worker;
    leave_group(consumer, &pod).await;
    if committed {
        event(&pod, format_args!("stopped"));
        0
    } else {
        event(
            &pod,
            format_args!(
                "stopped; the commit of the job in hand failed (it will be delivered again)"
            ),
        );
        EXIT_FAILURE
    }
}

fn main() -> ExitCode {
    let settings = match Settings::read(|var| std::env::var_os(var)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gpu_worker: {e}");
            return ExitCode::from(EXIT_SETTINGS);
        }
    };
    // Two workers: a synchronous commit blocks one (`block_in_place`) while the other serves
    // signals and timers.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gpu_worker: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let status = runtime.block_on(run(settings));
    // Nothing may hold the exit up (a close past its deadline is still on a blocking thread).
    runtime.shutdown_timeout(Duration::from_millis(100));
    ExitCode::from(status)
}
