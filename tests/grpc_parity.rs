//! KEDA-parity triggers through the gRPC API (tonic client) against a real tansu broker and a
//! real Prometheus: `scaler: kafka` and `scaler: prometheus` answer GetMetricSpec / GetMetrics /
//! IsActive as KEDA's own scalers would; the cache refreshes in the background, shares clients,
//! drops idle triggers; bad keys are INVALID_ARGUMENT; an outage is UNAVAILABLE, never 0;
//! `excludePersistentLag` waits for `persistentLagWindow` (our extension).

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;

use runpod_autoscaler::proto::external_scaler_client::ExternalScalerClient;
use runpod_autoscaler::proto::{GetMetricsRequest, ScaledObjectRef};
use runpod_autoscaler::scaler::{self, Parity, ScalerService};
use runpod_autoscaler::signals::prometheus::default_query;
use runpod_autoscaler::snapshot;
use runpod_autoscaler::telemetry::Metrics;
use support::{even_commits, eventually, Exporter, Prometheus, Tansu};

const TOPIC: &str = "jobs";

struct Scaler {
    client: ExternalScalerClient<Channel>,
    parity: Arc<Parity>,
    _shutdown: tokio_util::sync::DropGuard,
}

/// A scaler whose parity cache refreshes every 200 ms and forgets triggers after `idle_ttl`.
async fn scaler(idle_ttl: Duration) -> Scaler {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_tx, rx) = snapshot::channel();
    let shutdown = CancellationToken::new();
    let service = ScalerService::new(rx, shutdown.clone(), Arc::new(Metrics::new()))
        .with_parity_timing(Duration::from_millis(200), idle_ttl);
    let parity = Arc::clone(service.parity());
    tokio::spawn(async move {
        let _ = scaler::serve(listener, service, None).await;
        drop(_tx);
    });
    let client = ExternalScalerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Scaler {
        client,
        parity,
        _shutdown: shutdown.drop_guard(),
    }
}

fn object(pairs: &[(&str, String)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "workers".into(),
        namespace: "media".into(),
        scaler_metadata: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<HashMap<_, _>>(),
    }
}

async fn metric(c: &mut ExternalScalerClient<Channel>, o: &ScaledObjectRef) -> Result<f64, Code> {
    c.get_metrics(GetMetricsRequest {
        scaled_object_ref: Some(o.clone()),
        metric_name: String::new(),
    })
    .await
    .map(|r| r.into_inner().metric_values[0].metric_value_float)
    .map_err(|s| s.code())
}

async fn active(c: &mut ExternalScalerClient<Channel>, o: &ScaledObjectRef) -> bool {
    c.is_active(o.clone()).await.unwrap().into_inner().result
}

#[tokio::test]
async fn kafka_trigger_answers_like_kedas_kafka_scaler() {
    let mut tansu = Tansu::start().await;
    tansu.create_topic(TOPIC, 8).await;
    tansu.produce(TOPIC, 8, 1000);
    tansu.commit("workers", TOPIC, &even_commits(8, 300));
    let mut s = scaler(Duration::from_secs(600)).await;
    let servers = tansu.servers();
    let kafka = |extra: &[(&str, &str)]| {
        let mut pairs = vec![
            ("scalerAddress", "autoscaler:9090".to_owned()),
            ("scaler", "kafka".to_owned()),
            ("bootstrapServers", servers.clone()),
            ("consumerGroup", "workers".to_owned()),
            ("topic", TOPIC.to_owned()),
        ];
        pairs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        object(&pairs)
    };

    // Capped like KEDA: 700 / 10 = 70 > 8 partitions → 8 × 10 = 80; target = lagThreshold.
    let capped = kafka(&[("lagThreshold", "10")]);
    let spec = s
        .client
        .get_metric_spec(capped.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].metric_name, "kafka-jobs");
    assert_eq!(spec.metric_specs[0].target_size, 10);
    assert_eq!(spec.metric_specs[0].target_size_float, 10.0);
    let v = eventually("lag visible", Duration::from_secs(20), || {
        let (mut c, o) = (s.client.clone(), capped.clone());
        async move { metric(&mut c, &o).await.ok().filter(|v| *v > 8.0) }
    })
    .await;
    assert_eq!(v, 80.0);
    assert!(active(&mut s.client, &capped).await);
    // StreamIsActive (external-push) sends the current state on open.
    let mut stream = s
        .client
        .stream_is_active(capped.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().unwrap().result);
    drop(stream);

    // Uncapped: the real lag 700. Activation is strict (> activationLagThreshold).
    let uncapped = kafka(&[("lagThreshold", "100"), ("allowIdleConsumers", "true")]);
    assert_eq!(metric(&mut s.client, &uncapped).await, Ok(700.0));
    let at = kafka(&[
        ("activationLagThreshold", "700"),
        ("allowIdleConsumers", "true"),
    ]);
    assert!(!active(&mut s.client, &at).await);
    let below = kafka(&[
        ("activationLagThreshold", "699"),
        ("allowIdleConsumers", "true"),
    ]);
    assert!(active(&mut s.client, &below).await);

    // Four triggers, one Kafka client for the (brokers, group) pair.
    assert_eq!(s.parity.sizes(), (4, 1, 0));

    // The workers commit 200 more: the background refresh picks it up (lag 500).
    tansu.commit("workers", TOPIC, &even_commits(8, 500));
    eventually("refreshed lag 500", Duration::from_secs(20), || {
        let (mut c, o) = (s.client.clone(), uncapped.clone());
        async move { (metric(&mut c, &o).await == Ok(500.0)).then_some(()) }
    })
    .await;

    // Bad and missing keys are INVALID_ARGUMENT naming the key.
    for (o, key) in [
        (kafka(&[("lagThreshold", "ten")]), "lagThreshold"),
        (
            kafka(&[("offsetResetPolicy", "middle")]),
            "offsetResetPolicy",
        ),
        (
            object(&[("scaler", "kafka".into()), ("consumerGroup", "g".into())]),
            "bootstrapServers",
        ),
    ] {
        let err = s.client.get_metric_spec(o.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(key), "{}", err.message());
        let err = s.client.is_active(o).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    // The broker goes away: UNAVAILABLE once the refresh fails, never a fake 0.
    tansu.guard.stop();
    let code = eventually(
        "UNAVAILABLE after the outage",
        Duration::from_secs(30),
        || {
            let (mut c, o) = (s.client.clone(), uncapped.clone());
            async move { metric(&mut c, &o).await.err() }
        },
    )
    .await;
    assert_eq!(code, Code::Unavailable);
}

#[tokio::test]
async fn kafka_trigger_excludes_persistent_lag_only_after_the_window() {
    let tansu = Tansu::start().await;
    tansu.create_topic(TOPIC, 8).await;
    tansu.produce(TOPIC, 8, 1000);
    tansu.commit("slow-workers", TOPIC, &even_commits(8, 300));
    let mut s = scaler(Duration::from_secs(600)).await;
    let servers = tansu.servers();
    let kafka = |extra: &[(&str, &str)]| {
        let mut pairs = vec![
            ("scaler", "kafka".to_owned()),
            ("bootstrapServers", servers.clone()),
            ("consumerGroup", "slow-workers".to_owned()),
            ("topic", TOPIC.to_owned()),
            ("allowIdleConsumers", "true".to_owned()),
            ("excludePersistentLag", "true".to_owned()),
        ];
        pairs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        object(&pairs)
    };

    // Default window (2 minutes): commits that did not move between refreshes a moment apart
    // are a busy worker, not a stuck one; the lag keeps counting.
    let default_window = kafka(&[]);
    eventually("lag 700", Duration::from_secs(20), || {
        let (mut c, o) = (s.client.clone(), default_window.clone());
        async move { (metric(&mut c, &o).await == Ok(700.0)).then_some(()) }
    })
    .await;
    s.parity.refresh_all().await;
    s.parity.refresh_all().await;
    assert_eq!(metric(&mut s.client, &default_window).await, Ok(700.0));
    assert!(active(&mut s.client, &default_window).await);

    // A window shorter than the time between two reads: the unmoved commits are persistent
    // lag, 0 for scaling, still active.
    let short = kafka(&[("persistentLagWindow", "1ms")]);
    assert!(metric(&mut s.client, &short).await.is_ok());
    eventually("persistent lag excluded", Duration::from_secs(20), || {
        let (mut c, o, parity) = (s.client.clone(), short.clone(), Arc::clone(&s.parity));
        async move {
            parity.refresh_all().await;
            (metric(&mut c, &o).await == Ok(0.0)).then_some(())
        }
    })
    .await;
    assert!(active(&mut s.client, &short).await);

    // A window that is not a positive duration is INVALID_ARGUMENT naming the key.
    for bad in ["0s", "120", "soon"] {
        let err = s
            .client
            .get_metric_spec(kafka(&[("persistentLagWindow", bad)]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert!(
            err.message().contains("persistentLagWindow"),
            "{bad}: {}",
            err.message()
        );
    }
}

#[tokio::test]
async fn prometheus_trigger_answers_like_kedas_prometheus_scaler() {
    let exporter = Exporter::latency("job_latency_seconds").await;
    let prom = Prometheus::start(&[exporter.addr]).await;
    let mut s = scaler(Duration::from_millis(1500)).await;
    let trigger = |query: String, extra: &[(&str, &str)]| {
        let mut pairs = vec![
            ("scaler", "prometheus".to_owned()),
            ("serverAddress", prom.url()),
            ("query", query),
            ("threshold", "5".to_owned()),
        ];
        pairs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        object(&pairs)
    };
    let p95 = trigger(
        default_query("job_latency_seconds"),
        &[("activationThreshold", "19")],
    );
    let spec = s
        .client
        .get_metric_spec(p95.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].metric_name, "prometheus");
    assert_eq!(spec.metric_specs[0].target_size_float, 5.0);
    // rate() needs two scrapes; until then KEDA would see the NaN → 0 (ignoreNullValues=true).
    let v = eventually("p95 in Prometheus", Duration::from_secs(30), || {
        let (mut c, o) = (s.client.clone(), p95.clone());
        async move { metric(&mut c, &o).await.ok().filter(|v| *v > 0.0) }
    })
    .await;
    assert!((v - 19.5).abs() < 0.01, "{v}");
    assert!(active(&mut s.client, &p95).await);
    let high = trigger(
        default_query("job_latency_seconds"),
        &[("activationThreshold", "20")],
    );
    assert!(!active(&mut s.client, &high).await);

    // NaN (no traffic): 0 with ignoreNullValues (default true), UNAVAILABLE without.
    let idle = default_query("job_latency_seconds_idle");
    assert_eq!(
        metric(&mut s.client, &trigger(idle.clone(), &[])).await,
        Ok(0.0)
    );
    let strict = trigger(idle, &[("ignoreNullValues", "false")]);
    assert_eq!(metric(&mut s.client, &strict).await, Err(Code::Unavailable));
    // Several series: UNAVAILABLE with the reason.
    let many = trigger("rate(job_latency_seconds_bucket[1m])".into(), &[]);
    let err = s
        .client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(many),
            metric_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("exactly one"), "{}", err.message());
    // Missing threshold → INVALID_ARGUMENT naming it.
    let err = s
        .client
        .get_metric_spec(object(&[
            ("scaler", "prometheus".into()),
            ("serverAddress", prom.url()),
            ("query", "up".into()),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("threshold"), "{}", err.message());

    // One HTTP client for the server, whatever the number of triggers.
    let (_, kafka_clients, prom_clients) = s.parity.sizes();
    assert_eq!((kafka_clients, prom_clients), (0, 1));
    // Unused triggers (and then their client) are dropped after the idle lifetime.
    eventually("idle triggers dropped", Duration::from_secs(20), || {
        let parity = Arc::clone(&s.parity);
        async move { (parity.sizes() == (0, 0, 0)).then_some(()) }
    })
    .await;
}
