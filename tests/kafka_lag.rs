//! Consumer-group lag against a real tansu broker: 8 partitions, 1000 messages, a group that
//! committed 300 (lag 700); uncommitted partitions under both reset policies; the partition cap,
//! and the planner reading the whole lag above it; persistent-lag exclusion once a commit has
//! not moved for the window (manual clock); without topics, only the group's own topics are
//! read (other topics, a deleted one); a stopped broker (typed error, stale sample, planner
//! holds); TLS to a broker behind a TLS front, trusted and untrusted.

mod support;

use support::service::{loopback_parts, wait_for_snapshot};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use runpod_autoscaler::clock::{ManualClock, SystemClock};
use runpod_autoscaler::config::Config;
use runpod_autoscaler::decide::Hold;
use runpod_autoscaler::model::{Reading, SignalKind, Timestamp};
use runpod_autoscaler::service;
use runpod_autoscaler::signals::kafka::{
    KafkaLagSettings, KafkaSecurity, LagOptions, LagReport, OffsetResetPolicy, RequestCount,
};
use runpod_autoscaler::signals::{KafkaLagSource, SignalError, SignalSource};
use support::{even_commits, eventually, Tansu};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "jobs";
const PARTITIONS: i32 = 8;
const MESSAGES: usize = 1000;

fn settings(tansu: &Tansu, group: &str, options: LagOptions) -> KafkaLagSettings {
    KafkaLagSettings {
        bootstrap_servers: tansu.servers(),
        group: group.into(),
        topics: vec![TOPIC.into()],
        options,
        security: KafkaSecurity::default(),
        timeout: Duration::from_secs(5),
    }
}

/// A source on the system clock (tests of the persistent-lag window inject a manual one).
fn lag_source(settings: KafkaLagSettings) -> Result<KafkaLagSource, SignalError> {
    KafkaLagSource::new(settings, Arc::new(SystemClock))
}

fn options(f: impl FnOnce(&mut LagOptions)) -> LagOptions {
    let mut o = LagOptions {
        lag_threshold: 100,
        allow_idle_consumers: true,
        ..LagOptions::default()
    };
    f(&mut o);
    o
}

/// A broker with the topic, 1000 messages (125 per partition) and the `committed-300` group.
async fn loaded() -> Tansu {
    let tansu = Tansu::start().await;
    tansu.create_topic(TOPIC, PARTITIONS).await;
    tansu.produce(TOPIC, PARTITIONS, MESSAGES);
    tansu.commit("committed-300", TOPIC, &even_commits(PARTITIONS, 300));
    tansu
}

/// Polls until the source sees `want` as the metric (commits and log ends become visible
/// asynchronously), then returns that report.
async fn poll_until(source: &KafkaLagSource, what: &str, want: i64) -> LagReport {
    eventually(what, Duration::from_secs(20), || async {
        source.poll().await.ok().filter(|r| r.metric == want)
    })
    .await
}

#[tokio::test]
async fn lag_of_a_group_that_committed_300_of_1000_is_700() {
    let tansu = loaded().await;
    let source = lag_source(settings(&tansu, "committed-300", options(|_| {}))).unwrap();
    let report = poll_until(&source, "lag 700", 700).await;
    assert_eq!(report.partitions.len(), 8);
    assert_eq!(report.total_lag, 700);
    assert!(report.active);
    assert_eq!(source.sample().await.unwrap(), Reading::of(700.0));
    for p in &report.partitions {
        assert!((87..=88).contains(&p.lag), "{p:?}");
    }

    // The cap: 700 / 10 = 70 > 8 partitions → 8 × 10 = 80 (KEDA's rule).
    let capped = lag_source(settings(
        &tansu,
        "committed-300",
        options(|o| {
            o.lag_threshold = 10;
            o.allow_idle_consumers = false
        }),
    ))
    .unwrap();
    let report = capped.poll().await.unwrap();
    assert_eq!((report.metric, report.total_lag), (80, 700));

    // partitionLimitation: only partitions 0 and 1 (87 + 87; they hold the 38-offset commits).
    let limited = lag_source(settings(
        &tansu,
        "committed-300",
        options(|o| o.partition_limitation = vec![0, 1]),
    ))
    .unwrap();
    assert_eq!(limited.poll().await.unwrap().metric, 174);

    // Activation is strict: 700 > 699 but not > 700.
    for (threshold, active) in [(699, true), (700, false)] {
        let s = lag_source(settings(
            &tansu,
            "committed-300",
            options(|o| o.activation_lag_threshold = threshold),
        ))
        .unwrap();
        assert_eq!(s.poll().await.unwrap().active, active, "{threshold}");
    }
}

#[tokio::test]
async fn uncommitted_partitions_follow_the_reset_policy() {
    let tansu = loaded().await;
    // Partitions 0..4 committed at 100 of 125 (lag 25 each), 4..8 never committed.
    tansu.commit("half", TOPIC, &[(0, 100), (1, 100), (2, 100), (3, 100)]);
    let latest = lag_source(settings(&tansu, "half", options(|_| {}))).unwrap();
    // latest: each uncommitted partition counts 1.
    poll_until(&latest, "latest-policy lag 104", 104).await;

    // earliest: each uncommitted partition counts log-end − log-start = 125.
    let earliest = lag_source(settings(
        &tansu,
        "half",
        options(|o| o.offset_reset_policy = OffsetResetPolicy::Earliest),
    ))
    .unwrap();
    assert_eq!(earliest.poll().await.unwrap().metric, 100 + 4 * 125);

    // scaleToZeroOnInvalidOffset: uncommitted partitions count 0 under either policy.
    for policy in [OffsetResetPolicy::Latest, OffsetResetPolicy::Earliest] {
        let zero = lag_source(settings(
            &tansu,
            "half",
            options(|o| {
                o.offset_reset_policy = policy;
                o.scale_to_zero_on_invalid_offset = true
            }),
        ))
        .unwrap();
        assert_eq!(zero.poll().await.unwrap().metric, 100, "{policy:?}");
    }

    // A group that never committed anything: 8 under latest (and not 0).
    let none = lag_source(settings(&tansu, "never", options(|_| {}))).unwrap();
    assert_eq!(none.poll().await.unwrap().metric, 8);

    // limitToPartitionsWithLag with the cap: 8 partitions have lag → 8 × 10.
    let limited = lag_source(settings(
        &tansu,
        "half",
        options(|o| {
            o.lag_threshold = 10;
            o.limit_to_partitions_with_lag = true
        }),
    ))
    .unwrap();
    assert_eq!(limited.poll().await.unwrap().metric, 80);
}

#[tokio::test]
async fn persistent_lag_is_excluded_once_the_commit_has_not_moved_for_the_window() {
    let tansu = loaded().await;
    let clock = ManualClock::new(Timestamp::from_secs(1_000_000));
    let window = LagOptions::default().persistent_lag_window;
    assert_eq!(window, Duration::from_secs(120));
    let source = KafkaLagSource::new(
        settings(
            &tansu,
            "committed-300",
            options(|o| o.exclude_persistent_lag = true),
        ),
        Arc::new(clock.clone()),
    )
    .unwrap();
    // First sighting of the commits: all lag counts.
    let first = poll_until(&source, "lag 700", 700).await;
    assert!(first.active);
    // One second later nothing moved: a worker busy on one long job is not stuck yet.
    clock.advance(Duration::from_secs(1));
    assert_eq!(source.poll().await.unwrap().metric, 700);
    // Just under the window: still counted.
    clock.advance(window - Duration::from_secs(2));
    assert_eq!(source.poll().await.unwrap().metric, 700);
    // The whole window without a commit moving: scaling lag 0, still active.
    clock.advance(Duration::from_secs(1));
    let stuck = source.poll().await.unwrap();
    assert_eq!(stuck.metric, 0);
    assert_eq!(stuck.total_lag_with_persistent, 700);
    assert!(stuck.active);
    // Partition 0 moves on (38 → 100): it counts again, the others stay excluded.
    let mut commits = even_commits(PARTITIONS, 300);
    commits[0].1 = 100;
    tansu.commit("committed-300", TOPIC, &commits);
    let moved = eventually(
        "partition 0 commit visible",
        Duration::from_secs(20),
        || async { source.poll().await.ok().filter(|r| r.metric > 0) },
    )
    .await;
    assert_eq!(moved.metric, 25);
    assert_eq!(moved.partitions[0].lag, 25);
    // Its window restarted when it moved: excluded again only a whole window later.
    clock.advance(window - Duration::from_secs(1));
    assert_eq!(source.poll().await.unwrap().metric, 25);
    clock.advance(Duration::from_secs(1));
    assert_eq!(source.poll().await.unwrap().metric, 0);
}

#[tokio::test]
async fn unknown_topic_is_a_typed_error() {
    let tansu = Tansu::start().await;
    let mut s = settings(&tansu, "g", options(|_| {}));
    s.topics = vec!["no-such-topic".into()];
    let err = lag_source(s).unwrap().poll().await.unwrap_err();
    assert!(
        matches!(err, SignalError::NotFound { .. }),
        "{err:?} should be NotFound"
    );
    assert!(err.to_string().contains("no-such-topic"), "{err}");
}

#[tokio::test]
async fn a_stopped_broker_gives_a_typed_error_a_stale_sample_and_a_hold() {
    let mut tansu = loaded().await;
    let text = format!(
        r#"
[policy]
max_pods = 8
max_launches_per_tick = 8
max_usd_per_hour = 4.0
gpu_type = "NVIDIA RTX A5000"
pod_usd_per_hour = 0.26
lag_per_gpu = 100
stale_after_intervals = 3

[signals]
poll_interval = "5s"

[signals.queue]
source = "kafka"
bootstrap_servers = "{}"
consumer_group = "committed-300"
topics = ["{TOPIC}"]
lag_threshold = 100
allow_idle_consumers = true
timeout = "200ms"
poll_interval = "200ms"
"#,
        tansu.servers()
    );
    let config = Config::from_toml(&text).unwrap();
    let sources = service::sources_from_config(&config).unwrap();
    assert_eq!(sources[0].poll_interval(), Some(Duration::from_millis(200)));
    let shutdown = CancellationToken::new();
    let running = service::start(loopback_parts(&config, sources).await, shutdown.clone()).unwrap();
    let snapshots = running.snapshots.clone();
    // 700 lag at 100 per GPU → 7 GPUs of work, served to KEDA.
    wait_for_snapshot(&snapshots, "lag 700 read and planned", |s| {
        s.plan.demand_gpus == 7 && s.plan.served_gpus == 7
    })
    .await;

    tansu.guard.stop();
    wait_for_snapshot(&snapshots, "a stale-signal hold", |s| {
        s.plan.holds.iter().any(|h| {
            matches!(
                h,
                Hold::StaleSignal {
                    signal: SignalKind::QueueLag,
                    ..
                }
            )
        })
    })
    .await;
    let snap = snapshots.borrow().clone().unwrap();
    // Held: the stale 700 is not read as zero (KEDA is still served 7), and it adds nothing of
    // its own (advisory mode: no pods exist, so none are planned on a stale signal).
    assert_eq!((snap.plan.demand_gpus, snap.plan.served_gpus), (7, 7));
    assert_eq!(snap.plan.launches(), 0, "{}", snap.plan);
    let lag = snap
        .signals
        .iter()
        .find(|s| s.signal == SignalKind::QueueLag)
        .unwrap();
    assert!(!lag.fresh);
    assert_eq!(lag.poll_interval, Duration::from_millis(200));
    assert_eq!(lag.value, Some(700.0));
    assert!(lag.failures >= 1);
    let error = lag.last_error.clone().unwrap();
    assert!(
        error.contains("unreachable") || error.contains("did not answer"),
        "{error}"
    );
    let (_, metrics) = support::http_get(running.http_addr, "/metrics")
        .await
        .unwrap();
    assert!(metrics.contains("runpod_autoscaler_signal_failures_total{signal=\"queue_lag\"}"));

    // The source itself reports a typed error.
    let direct = lag_source(KafkaLagSettings {
        bootstrap_servers: tansu.servers(),
        group: "committed-300".into(),
        topics: vec![TOPIC.into()],
        options: LagOptions::default(),
        security: KafkaSecurity::default(),
        timeout: Duration::from_millis(800),
    })
    .unwrap();
    let err = direct.poll().await.unwrap_err();
    assert!(
        matches!(
            err,
            SignalError::Unreachable { .. } | SignalError::Timeout { .. }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());

    shutdown.cancel();
    running.wait().await.unwrap();
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (ca_pem, cert_pem, key_pem).
fn tls_material() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct subject names: OpenSSL takes a leaf whose issuer equals its subject (rcgen's
    // default name for both) for self-signed and rejects it.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kafka test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    // librdkafka verifies the broker's name ("127.0.0.1"): the IP must be in the SAN.
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "tansu broker");
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn lag_over_tls_with_a_trusted_ca_and_a_clear_error_without() {
    let (ca, cert, key) = tls_material();
    let tansu = Tansu::start_behind_tls(&cert, &key, &ca).await;
    tansu.create_topic(TOPIC, 4).await;
    tansu.produce(TOPIC, 4, 100);
    tansu.commit("tls-group", TOPIC, &even_commits(4, 40));

    let mut tls = settings(&tansu, "tls-group", options(|_| {}));
    tls.security = KafkaSecurity {
        protocol: Some("ssl".into()),
        ssl_ca_file: tansu.tls_ca_file.clone(),
        ..KafkaSecurity::default()
    };
    let source = lag_source(tls.clone()).unwrap();
    let report = poll_until(&source, "lag 60 over TLS", 60).await;
    assert_eq!(report.partitions.len(), 4);

    // A CA that did not sign the broker's certificate: the handshake fails, typed and retryable
    // (a poll error, so the sample goes stale), never a lag of zero.
    let (other_ca, _, _) = tls_material();
    let other_ca_file = tansu.guard.dir.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, other_ca).unwrap();
    let mut untrusted = tls.clone();
    untrusted.security.ssl_ca_file = Some(other_ca_file);
    untrusted.timeout = Duration::from_secs(2);
    let err = lag_source(untrusted).unwrap().poll().await.unwrap_err();
    assert!(
        matches!(
            err,
            SignalError::Unreachable { .. } | SignalError::Timeout { .. }
        ),
        "{err:?}"
    );

    // A plaintext client cannot read a TLS-only broker either.
    let mut plain = tls;
    plain.security = KafkaSecurity::default();
    plain.timeout = Duration::from_secs(2);
    assert!(lag_source(plain).unwrap().poll().await.is_err());
}

#[tokio::test]
async fn empty_topics_read_only_the_groups_own_topics() {
    let tansu = loaded().await;
    // Two topics the group never committed on, one with messages.
    tansu.create_topic("unrelated-b", 3).await;
    tansu.create_topic("unrelated-c", 2).await;
    tansu.produce("unrelated-b", 3, 30);
    let mut s = settings(&tansu, "committed-300", options(|_| {}));
    s.topics = Vec::new();
    let source = KafkaLagSource::with_request_counting(s, Arc::new(SystemClock)).unwrap();
    let metadata_requests = std::cell::Cell::new(0);
    let (src, metadata) = (&source, &metadata_requests);
    let report = eventually(
        "lag 700 on the group's topic",
        Duration::from_secs(20),
        || async move {
            let (r, count) = src.poll_counted().await.ok()?;
            metadata.set(metadata.get() + count.metadata);
            (r.metric == 700).then_some(r)
        },
    )
    .await;
    assert_eq!(report.partitions.len(), 8, "{report:?}");
    assert!(report.partitions.iter().all(|p| p.topic == TOPIC));
    // Metadata was read for the group's one topic only, once (then cached).
    assert_eq!(metadata_requests.get(), 1);
    // A warm poll: one OffsetFetch listing the group's commits, one ListOffsets for the 8
    // partitions of its topic, nothing about the other topics; librdkafka agrees.
    let sent_before = source.requests_sent();
    let (warm, count) = source.poll_counted().await.unwrap();
    assert_eq!(warm.total_lag, 700);
    assert_eq!(
        count,
        RequestCount {
            metadata: 0,
            offset_fetch: 1,
            list_offsets: 1,
            partitions: 8
        }
    );
    let sent: BTreeMap<String, u64> = source
        .requests_sent()
        .into_iter()
        .map(|(kind, n)| {
            (
                kind.clone(),
                n - sent_before.get(&kind).copied().unwrap_or(0),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        sent,
        BTreeMap::from([("ListOffsets".to_owned(), 1), ("OffsetFetch".to_owned(), 1)])
    );

    // An unrelated topic deleted after a poll: once the shared client has learned of the
    // deletion (here a trigger for that topic sharing the client asks for it, as parity
    // triggers of one group do), the next poll of the group's lag must still succeed.
    tansu.delete_topic("unrelated-b").await;
    let b_trigger = source.sharing_client(vec!["unrelated-b".into()], options(|_| {}));
    let gone = b_trigger.poll().await.unwrap_err();
    assert!(matches!(gone, SignalError::NotFound { .. }), "{gone:?}");
    assert!(gone.to_string().contains("unrelated-b"), "{gone}");
    let after = source
        .poll()
        .await
        .expect("an unrelated topic broke the poll");
    assert_eq!(after.total_lag, 700);
}

#[tokio::test]
async fn a_deleted_topic_the_group_committed_on_is_skipped() {
    let tansu = loaded().await;
    tansu.create_topic("retired", 2).await;
    tansu.produce("retired", 2, 20);
    tansu.commit("committed-300", "retired", &[(0, 5), (1, 5)]);
    let mut s = settings(&tansu, "committed-300", options(|_| {}));
    s.topics = Vec::new();
    let source = lag_source(s).unwrap();
    // Both topics of the group count: 700 + 2 × 5.
    let both = poll_until(&source, "lag of both topics", 710).await;
    assert_eq!(both.partitions.len(), 10);
    tansu.delete_topic("retired").await;
    // A fresh reader sees only the live topic (tansu, like Kafka, drops a deleted topic's
    // commits with it, so the group no longer lists it).
    let mut s = settings(&tansu, "committed-300", options(|_| {}));
    s.topics = Vec::new();
    let fresh = lag_source(s).unwrap();
    let report = poll_until(&fresh, "lag of the live topic", 700).await;
    assert!(
        report.partitions.iter().all(|p| p.topic == TOPIC),
        "{report:?}"
    );
    // The reader that had the deleted topic cached recovers within a poll or two.
    eventually(
        "the cached reader recovers",
        Duration::from_secs(20),
        || async { source.poll().await.ok().filter(|r| r.metric == 700) },
    )
    .await;
}

#[tokio::test]
async fn the_planner_reads_the_whole_backlog_above_kedas_cap() {
    let tansu = loaded().await;
    // 8 partitions, lag 700, lagThreshold 10: KEDA's cap is 8 × 10 = 80.
    let source = lag_source(settings(
        &tansu,
        "committed-300",
        options(|o| {
            o.lag_threshold = 10;
            o.allow_idle_consumers = false
        }),
    ))
    .unwrap();
    let report = poll_until(&source, "KEDA's capped metric 80", 80).await;
    assert_eq!(report.total_lag, 700);
    assert_eq!(
        source.sample().await.unwrap(),
        Reading {
            value: 700.0,
            max_workers: Some(8)
        }
    );
    // With idle consumers allowed, no partition cap for the planner either.
    let idle = lag_source(settings(
        &tansu,
        "committed-300",
        options(|o| {
            o.lag_threshold = 10;
            o.allow_idle_consumers = true
        }),
    ))
    .unwrap();
    assert_eq!(
        idle.sample().await.unwrap(),
        Reading {
            value: 700.0,
            max_workers: None
        }
    );
}
