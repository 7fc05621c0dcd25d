//! Seeds a Kafka-compatible broker for `scripts/demo.sh`: creates a topic, produces messages
//! (one per batch, so tansu's watermarks are exact) and commits part of them for a consumer
//! group, as workers that consumed them would.
//!
//! `cargo run --example demo_seed -- BOOTSTRAP TOPIC PARTITIONS MESSAGES GROUP COMMITTED`

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [servers, topic, partitions, messages, group, committed] = args.as_slice() else {
        anyhow::bail!("usage: demo_seed BOOTSTRAP TOPIC PARTITIONS MESSAGES GROUP COMMITTED");
    };
    let partitions: i32 = partitions.parse()?;
    let messages: i64 = messages.parse()?;
    let committed: i64 = committed.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .create()?;
    let created = runtime.block_on(admin.create_topics(
        &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))?;
    for r in created {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }

    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("batch.num.messages", "1")
        .set("linger.ms", "0")
        .create()?;
    for i in 0..messages {
        let payload = format!("job-{i}");
        let partition = i32::try_from(i % i64::from(partitions))?;
        let mut record = BaseRecord::<(), _>::to(topic)
            .payload(&payload)
            .partition(partition);
        while let Err((_, r)) = producer.send(record) {
            producer.poll(Duration::from_millis(10));
            record = r;
        }
    }
    producer.flush(Duration::from_secs(30))?;

    // Commit `committed` messages spread evenly, as consumers of the group would.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let n = i64::from(partitions);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let offset = committed / n + i64::from(i64::from(p) < committed % n);
        tpl.add_partition_offset(topic, p, Offset::Offset(offset))?;
    }
    consumer.commit(&tpl, CommitMode::Sync)?;
    println!(
        "seeded {topic}: {partitions} partitions, {messages} messages, group {group} committed {committed}"
    );
    Ok(())
}
