//! Lag of a topic with many partitions (default 1,000; `RPA_BENCH_PARTITIONS`) on a real tansu
//! broker: `KafkaLagSource` (one OffsetFetch + one batched ListOffsets, concurrently) against a
//! naive reader that asks partition after partition (OffsetFetch + watermark query each), in
//! the same run. Prints wall time, broker requests (as librdkafka counts them: every request it
//! sends, with `debug=protocol`) and the ratio. Needs `RPA_TANSU_BIN`
//! (`scripts/test.sh` installs tansu; see the README's Benchmarks section).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use runpod_autoscaler::clock::SystemClock;
use runpod_autoscaler::signals::kafka::{
    KafkaClientContext, KafkaLagSettings, KafkaSecurity, LagOptions,
};
use runpod_autoscaler::signals::KafkaLagSource;

const TOPIC: &str = "wide";
const GROUP: &str = "bench";
/// Generous: the naive reader needs one round trip per request and 3,000 of them.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Lag read partition by partition: OffsetFetch for one partition, then the watermark query
/// (librdkafka sends ListOffsets for the log start and the log end). Returns (lag, requests
/// issued, requests librdkafka sent).
fn naive(servers: &str, partitions: i32) -> (i64, u32, u64) {
    let consumer: BaseConsumer<KafkaClientContext> = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", GROUP)
        .set("enable.auto.commit", "false")
        .set("debug", "protocol")
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Debug)
        .create_with_context(KafkaClientContext::default())
        .unwrap();
    let (mut lag, mut requests) = (0i64, 0u32);
    for p in 0..partitions {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(TOPIC, p);
        let committed = consumer.committed_offsets(tpl, TIMEOUT).unwrap();
        let (_, high) = consumer.fetch_watermarks(TOPIC, p, TIMEOUT).unwrap();
        requests += 3;
        serve_events(&consumer);
        lag += match committed.elements()[0].offset() {
            Offset::Offset(o) => high - o,
            _ => 1,
        };
    }
    serve_events(&consumer);
    (lag, requests, consumer.context().requests_sent())
}

/// `Type n, Type n` for printing.
fn by_type(m: &std::collections::BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Serves the client's queued log events so the request counter is current.
fn serve_events(consumer: &BaseConsumer<KafkaClientContext>) {
    // A few events per request; 100 zero-timeout polls cover one partition's three requests.
    for _ in 0..100 {
        let _ = consumer.poll(Duration::ZERO);
    }
}

#[tokio::main]
async fn main() {
    let partitions: i32 = std::env::var("RPA_BENCH_PARTITIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let tansu = support::Tansu::start().await;
    tansu.create_topic(TOPIC, partitions).await;
    // Two messages per partition; the group read one on every partition → lag = partitions.
    tansu.produce(TOPIC, partitions, usize::try_from(partitions).unwrap() * 2);
    let commits: Vec<(i32, i64)> = (0..partitions).map(|p| (p, 1)).collect();
    tansu.commit(GROUP, TOPIC, &commits);

    let source = KafkaLagSource::with_request_counting(
        KafkaLagSettings {
            bootstrap_servers: tansu.servers(),
            group: GROUP.into(),
            topics: vec![TOPIC.into()],
            options: LagOptions {
                allow_idle_consumers: true,
                ..LagOptions::default()
            },
            security: KafkaSecurity::default(),
            timeout: TIMEOUT,
        },
        Arc::new(SystemClock),
    )
    .unwrap();
    let started = Instant::now();
    let (cold, cold_requests) = source.poll_counted().await.unwrap();
    let cold_time = started.elapsed();
    let cold_by_type = source.requests_sent();
    let cold_sent: u64 = cold_by_type.values().sum();
    // Warm polls: the client and the topic metadata are reused, as in the service.
    let rounds = 5u32;
    let started = Instant::now();
    let mut warm_requests = 0;
    for _ in 0..rounds {
        let (r, c) = source.poll_counted().await.unwrap();
        assert_eq!(r.total_lag, cold.total_lag);
        warm_requests = c.total();
    }
    let warm_time = started.elapsed() / rounds;
    let all_by_type = source.requests_sent();
    let warm_by_type: Vec<String> = all_by_type
        .iter()
        .map(|(k, v)| (k, v - cold_by_type.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k} {}", v as f64 / f64::from(rounds)))
        .collect();
    let warm_sent = (all_by_type.values().sum::<u64>() - cold_sent) as f64 / f64::from(rounds);

    let servers = tansu.servers();
    let started = Instant::now();
    let (naive_lag, naive_requests, naive_sent) =
        tokio::task::spawn_blocking(move || naive(&servers, partitions))
            .await
            .unwrap();
    let naive_time = started.elapsed();
    assert_eq!(naive_lag, cold.total_lag, "both readers must agree");

    println!(
        "kafka lag of {partitions} partitions on tansu (lag {})",
        cold.total_lag
    );
    println!("  (requests: issued by our code / sent by librdkafka, all request types)");
    println!(
        "  batched, first poll : {:>9.2} ms, {} / {} requests (sent: {})",
        cold_time.as_secs_f64() * 1e3,
        cold_requests.total(),
        cold_sent,
        by_type(&cold_by_type)
    );
    println!(
        "  batched, warm poll  : {:>9.2} ms, {} / {:.1} requests (mean of {rounds}; sent: {})",
        warm_time.as_secs_f64() * 1e3,
        warm_requests,
        warm_sent,
        warm_by_type.join(", ")
    );
    println!(
        "  sequential          : {:>9.2} ms, {} / {} requests",
        naive_time.as_secs_f64() * 1e3,
        naive_requests,
        naive_sent
    );
    println!(
        "  ratio sequential / batched warm: {:.1}x wall time, {:.0}x requests sent",
        naive_time.as_secs_f64() / warm_time.as_secs_f64(),
        naive_sent as f64 / warm_sent.max(1.0)
    );
}
