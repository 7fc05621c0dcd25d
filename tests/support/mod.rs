//! Real components for integration tests: a tansu broker and a Prometheus server started on free
//! 127.0.0.1 ports and killed by PID on drop, a tiny latency exporter for Prometheus to scrape,
//! and Kafka helpers (create a topic, produce, commit). The binaries come from
//! `RPA_TANSU_BIN` / `RPA_PROMETHEUS_BIN`, which `scripts/test.sh` installs and exports.
#![allow(dead_code)]

#[cfg(feature = "emulator")]
pub mod active;
#[cfg(feature = "emulator")]
pub mod fleet;
pub mod s3;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How long a component gets to become ready. Generous for a loaded 2-core CI machine; the
/// usual figures are 0.1 s (tansu) and 0.2 s (Prometheus).
pub const READY_DEADLINE: Duration = Duration::from_secs(20);

/// The binary named by `var`; panics (fails the test) with the fix when it is missing.
fn binary(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) if PathBuf::from(&p).is_file() => PathBuf::from(p),
        _ => panic!(
            "{var} is not set or does not name a file: run scripts/test.sh, which installs the \
             real components and exports {var}"
        ),
    }
}

/// The built example `name` (`target/<profile>/examples/<name>`), found from this test binary's
/// own location (`target/<profile>/deps/<test>-<hash>`). Fails the test with the fix when it is
/// missing or older than its source: integration tests cannot make cargo build an example, and
/// `scripts/test.sh` builds it (`cargo build --all-targets`).
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's own path");
    let Some(profile_dir) = exe.parent().and_then(std::path::Path::parent) else {
        panic!(
            "cannot find the target directory from the test binary {}",
            exe.display()
        );
    };
    let bin = profile_dir.join("examples").join(name);
    let fix = format!("build it with `cargo build --example {name}` (or run scripts/test.sh)");
    assert!(
        bin.is_file(),
        "example binary {} not found: {fix}",
        bin.display()
    );
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(format!("{name}.rs"));
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(built), Some(edited)) = (modified(&bin), modified(&source)) {
        assert!(
            built >= edited,
            "example binary {} is older than {}: {fix}",
            bin.display(),
            source.display()
        );
    }
    bin
}

/// `TCP_NODELAY` of every connection this process accepted on `server` (the server side of each
/// TCP connection to that address, found among the process's open descriptors). Tests run
/// servers in-process, so the sockets they accepted are here to read back.
pub fn accepted_nodelay(server: SocketAddr) -> Vec<bool> {
    use std::os::fd::BorrowedFd;
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor is open (listed just now) and only borrowed for these calls;
        // a race with its closing makes the calls fail, which skips it.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let local = sock.local_addr().ok().and_then(|a| a.as_socket());
        let connected = sock.peer_addr().is_ok();
        if local == Some(server) && connected {
            if let Ok(nodelay) = sock.tcp_nodelay() {
                out.push(nodelay);
            }
        }
    }
    out
}

/// A free loopback port (bound then released; the component binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it returns `Some`, failing after `deadline` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    // Re-check often enough to be quick, rarely enough not to load the components.
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        every.tick().await;
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
    }
}

async fn wait_for_port(addr: SocketAddr, what: &str) {
    eventually(what, READY_DEADLINE, || async move {
        tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
    })
    .await;
}

/// A child process killed (by its PID) and reaped on drop.
pub struct Guard {
    child: Option<Child>,
    /// Scratch directory of the process.
    pub dir: tempfile::TempDir,
}

impl Guard {
    /// Kills the process now (e.g. to test an outage).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tansu broker with in-memory storage, optionally reachable only through TLS.
pub struct Tansu {
    /// `127.0.0.1:port` clients bootstrap from (the TLS proxy when behind one).
    pub addr: SocketAddr,
    /// The process.
    pub guard: Guard,
    /// CA file clients must trust when the broker is behind TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// The TLS front, when there is one.
    tls: Option<TlsProxy>,
}

impl Tansu {
    /// Starts a broker on a free port and waits until it accepts connections.
    pub async fn start() -> Tansu {
        let port = free_port();
        Self::spawn(port, port).await
    }

    /// Starts a broker that clients reach only through TLS: tansu 0.6's own TLS listener does
    /// not handshake, so a TLS-terminating proxy fronts it and tansu advertises the proxy's
    /// port, which routes every client connection (bootstrap and per-broker) through TLS.
    /// `cert_pem`/`key_pem` are the server's; `ca_pem` is written for clients to trust.
    pub async fn start_behind_tls(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Tansu {
        let plain_port = free_port();
        let proxy = TlsProxy::start(([127, 0, 0, 1], plain_port).into(), cert_pem, key_pem).await;
        let mut tansu = Self::spawn(plain_port, proxy.addr.port()).await;
        let ca = tansu.guard.dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        tansu.addr = proxy.addr;
        tansu.tls_ca_file = Some(ca);
        tansu.tls = Some(proxy);
        tansu
    }

    async fn spawn(listen_port: u16, advertised_port: u16) -> Tansu {
        let bin = binary("RPA_TANSU_BIN");
        let listen = format!("tcp://127.0.0.1:{listen_port}");
        let advertised = format!("tcp://127.0.0.1:{advertised_port}");
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("tansu.log")).unwrap();
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &listen,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting tansu");
        let addr: SocketAddr = ([127, 0, 0, 1], listen_port).into();
        let guard = Guard {
            child: Some(child),
            dir,
        };
        wait_for_port(addr, "tansu to accept connections").await;
        Tansu {
            addr,
            guard,
            tls_ca_file: None,
            tls: None,
        }
    }

    /// The bootstrap-servers string.
    pub fn servers(&self) -> String {
        self.addr.to_string()
    }

    /// A client configuration for this broker (TLS when it is behind TLS).
    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.servers());
        if let Some(ca) = &self.tls_ca_file {
            c.set("security.protocol", "ssl")
                .set("ssl.ca.location", ca.to_string_lossy());
        }
        c
    }

    /// Creates `topic` with `partitions` partitions.
    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create().unwrap();
        let results = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap();
        for r in results {
            r.unwrap();
        }
    }

    /// Deletes `topic` (tansu drops it from metadata and answers UnknownTopicOrPartition for its
    /// partitions from then on).
    pub async fn delete_topic(&self, topic: &str) {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create().unwrap();
        let results = admin
            .delete_topics(
                &[topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap();
        for r in results {
            r.unwrap();
        }
    }

    /// Produces `count` messages round-robin over `partitions` partitions, one message per batch
    /// (tansu's latest offset is the last batch's base + 1, so watermarks are exact).
    pub fn produce(&self, topic: &str, partitions: i32, count: usize) {
        let producer: ThreadedProducer<DefaultProducerContext> = self
            .client_config()
            .set("batch.num.messages", "1")
            .set("linger.ms", "0")
            .create()
            .unwrap();
        for i in 0..count {
            let payload = format!("job-{i}");
            let partition = i32::try_from(i).unwrap() % partitions;
            let mut record = BaseRecord::<(), _>::to(topic)
                .payload(&payload)
                .partition(partition);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        // Queue full: let deliveries drain, then retry.
                        producer.poll(Duration::from_millis(10));
                        record = r;
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }

    /// Commits `offsets` (partition, next offset to read) for `group` on `topic`.
    pub fn commit(&self, group: &str, topic: &str, offsets: &[(i32, i64)]) {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
                .unwrap();
        }
        consumer.commit(&tpl, CommitMode::Sync).unwrap();
    }
}

/// Splits `total` committed messages over `partitions` partitions as evenly as possible.
pub fn even_commits(partitions: i32, total: i64) -> Vec<(i32, i64)> {
    let n = i64::from(partitions);
    (0..partitions)
        .map(|p| (p, total / n + i64::from(i64::from(p) < total % n)))
        .collect()
}

/// A Prometheus server scraping `targets` every second.
pub struct Prometheus {
    /// `127.0.0.1:port`.
    pub addr: SocketAddr,
    /// The process.
    pub guard: Guard,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` and waits for `/-/ready`.
    pub async fn start(targets: &[SocketAddr]) -> Prometheus {
        let bin = binary("RPA_PROMETHEUS_BIN");
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        // A 1 s scrape interval so rate()-based queries have a value within a few seconds.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - \
             job_name: exporter\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let guard = Guard {
            child: Some(child),
            dir,
        };
        eventually("prometheus /-/ready", READY_DEADLINE, || async move {
            let (status, _) = http_get(addr, "/-/ready").await?;
            (status == 200).then_some(())
        })
        .await;
        Prometheus { addr, guard }
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Minimal HTTP/1.1 GET; `None` when the connection fails.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.ok()?;
    let status = raw.get(9..12)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// What an exporter serves: called on every scrape.
pub type Body = Arc<dyn Fn() -> String + Send + Sync>;

/// A tiny Prometheus exporter serving `body()` at every path.
#[derive(Clone)]
pub struct Exporter {
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Exporter {
    /// Starts serving; stops with the test's runtime.
    pub async fn start(body: Body) -> Exporter {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let body = body();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = sock.read(&mut buf).await;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(response.as_bytes()).await;
                });
            }
        });
        Exporter { addr }
    }

    /// An exporter whose histogram `name` grows by 100 observations per second, all between
    /// 10 and 20 s (so its p95 is 19.5 s), plus `name_idle`, a histogram that never grows (its
    /// p95 is NaN: no traffic).
    pub async fn latency(name: &str) -> Exporter {
        let started = std::time::Instant::now();
        let name = name.to_owned();
        Exporter::start(Arc::new(move || {
            let count = u64::try_from(started.elapsed().as_millis() / 10).unwrap_or(u64::MAX);
            latency_histogram(&name, count) + &latency_histogram(&format!("{name}_idle"), 7)
        }))
        .await
    }
}

/// Prometheus text for a histogram `name` whose every observation so far is `count` jobs that
/// took between 10 and 20 seconds: with traffic, its p95 over 1 minute interpolates to ~19.5 s.
pub fn latency_histogram(name: &str, count: u64) -> String {
    let mut s = format!("# TYPE {name} histogram\n");
    for (le, c) in [
        ("1", 0),
        ("5", 0),
        ("10", 0),
        ("20", count),
        ("+Inf", count),
    ] {
        s.push_str(&format!("{name}_bucket{{le=\"{le}\"}} {c}\n"));
    }
    s.push_str(&format!(
        "{name}_sum {}\n{name}_count {count}\n",
        count * 15
    ));
    s
}

/// A TLS-terminating TCP proxy on a free 127.0.0.1 port, forwarding to `upstream` (tokio-rustls
/// with the ring provider). It runs on its own thread and runtime, so a test thread blocked in
/// a synchronous Kafka call (produce, commit) cannot starve it. Stops when dropped.
pub struct TlsProxy {
    /// Where clients connect with TLS.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TlsProxy {
    /// Starts the proxy with the server certificate chain and key (PEM).
    pub async fn start(upstream: SocketAddr, cert_pem: &str, key_pem: &str) -> TlsProxy {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let serve = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            return;
                        };
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            // A failed handshake (wrong CA, plaintext client) closes the
                            // connection.
                            let Ok(mut tls) = acceptor.accept(stream).await else {
                                return;
                            };
                            let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                                return;
                            };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
        });
        TlsProxy {
            addr,
            stop: Some(stop),
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The runs of a seeded suite: `RUNS` of `run(seed)` for seeds `base`, `base + 1`, …
/// (`<prefix>_RUNS` and `<prefix>_SEED` in the environment override `runs` and `base`), a few
/// at a time. Every failure is printed with the command line that reruns it alone; returns the
/// successes' values and the failing seeds.
pub async fn seeded_runs<T, F, Fut>(
    prefix: &str,
    runs: u64,
    base: u64,
    concurrency: usize,
    run: F,
) -> (Vec<T>, Vec<u64>)
where
    T: Send + 'static,
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<T, String>> + Send + 'static,
{
    use futures_util::StreamExt;
    let var = |name: &str| {
        std::env::var(format!("{prefix}_{name}"))
            .ok()
            .and_then(|v| v.parse().ok())
    };
    let runs: u64 = var("RUNS").unwrap_or(runs);
    let base: u64 = var("SEED").unwrap_or(base);
    let results: Vec<(u64, Result<T, String>)> = futures_util::stream::iter(0..runs)
        .map(|i| {
            let seed = base.wrapping_add(i);
            let fut = tokio::spawn(run(seed));
            async move {
                let r = fut
                    .await
                    .unwrap_or_else(|e| Err(format!("the run panicked: {e}")));
                (seed, r)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for (seed, r) in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) => {
                eprintln!("run failed: {prefix}_SEED={seed} {prefix}_RUNS=1: {e}");
                failed.push(seed);
            }
        }
    }
    failed.sort_unstable();
    (ok, failed)
}
