//! The Prometheus source against a real Prometheus scraping an exporter the test serves: the
//! p95 is read; NaN and empty results both ways (`ignore_null_values`); a multi-series query is
//! a clear error; a bad query and auth headers; Prometheus stopped → typed error and stale.

mod support;

use support::service::{loopback_parts, wait_for_snapshot};

use std::collections::BTreeMap;
use std::time::Duration;

use runpod_autoscaler::config::Config;
use runpod_autoscaler::decide::Hold;
use runpod_autoscaler::model::Secret;
use runpod_autoscaler::model::SignalKind;
use runpod_autoscaler::service;
use runpod_autoscaler::signals::prometheus::{default_query, PrometheusAuth, PrometheusSettings};
use runpod_autoscaler::signals::{PrometheusSource, SignalError};
use support::{eventually, Exporter, Prometheus};
use tokio_util::sync::CancellationToken;

const METRIC: &str = "job_latency_seconds";

fn source(prom: &Prometheus, query: &str, ignore_null_values: bool) -> PrometheusSource {
    PrometheusSource::new(
        SignalKind::LatencyP95,
        PrometheusSettings {
            server_address: prom.url(),
            query: query.into(),
            ignore_null_values,
            timeout: Duration::from_secs(3),
            auth: PrometheusAuth::None,
            headers: BTreeMap::new(),
        },
    )
    .unwrap()
}

/// Prometheus scraping the latency exporter, once the p95 has a value.
async fn scraping() -> (Prometheus, Exporter) {
    let exporter = Exporter::latency(METRIC).await;
    let prom = Prometheus::start(&[exporter.addr]).await;
    let p95 = source(&prom, &default_query(METRIC), false);
    // rate() needs two scrapes: poll (bounded) until the query has a value.
    eventually(
        "a p95 value in Prometheus",
        Duration::from_secs(30),
        || async { p95.query().await.ok() },
    )
    .await;
    (prom, exporter)
}

#[tokio::test]
async fn p95_nan_empty_and_several_series() {
    let (prom, _exporter) = scraping().await;

    // Every observation lies in the (10, 20] bucket: the p95 interpolates to 19.5 s.
    let p95 = source(&prom, &default_query(METRIC), false)
        .query()
        .await
        .unwrap();
    assert!((p95 - 19.5).abs() < 0.01, "p95 {p95}");

    // No traffic: histogram_quantile over zero rates is NaN.
    let idle = default_query(&format!("{METRIC}_idle"));
    assert_eq!(source(&prom, &idle, true).query().await.unwrap(), 0.0);
    let err = source(&prom, &idle, false).query().await.unwrap_err();
    assert!(matches!(err, SignalError::NoValue { .. }), "{err:?}");
    assert!(err.to_string().contains("NaN"), "{err}");

    // No series at all.
    let empty = "no_such_metric_seconds";
    assert_eq!(source(&prom, empty, true).query().await.unwrap(), 0.0);
    let err = source(&prom, empty, false).query().await.unwrap_err();
    assert!(err.to_string().contains("no series"), "{err}");

    // Several series (one per bucket) are an error whatever ignore_null_values says.
    for ignore in [true, false] {
        let q = format!("rate({METRIC}_bucket[1m])");
        let err = source(&prom, &q, ignore).query().await.unwrap_err();
        assert!(
            matches!(err, SignalError::SeveralSeries { count: 5, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("exactly one"), "{err}");
    }

    // A syntax error is a bad request naming the query.
    let err = source(&prom, "sum(", true).query().await.unwrap_err();
    assert!(matches!(err, SignalError::InvalidRequest { .. }), "{err:?}");
    assert!(err.to_string().contains("bad query"), "{err}");

    // Credentials and custom headers are sent (Prometheus ignores them) and never printed.
    let with_auth = PrometheusSource::new(
        SignalKind::LatencyP95,
        PrometheusSettings {
            server_address: prom.url(),
            query: default_query(METRIC),
            ignore_null_values: false,
            timeout: Duration::from_secs(3),
            auth: PrometheusAuth::Bearer(Secret::new("s3cr3t-token")),
            headers: BTreeMap::from([("X-Scope-OrgID".to_owned(), "team-a".to_owned())]),
        },
    )
    .unwrap();
    assert!(with_auth.query().await.unwrap() > 0.0);
    assert!(!format!("{with_auth:?}").contains("s3cr3t"));
}

#[tokio::test]
async fn a_stopped_prometheus_goes_stale_and_the_planner_holds() {
    let (mut prom, _exporter) = scraping().await;
    let text = format!(
        r#"
[policy]
max_pods = 8
max_launches_per_tick = 8
max_usd_per_hour = 4.0
gpu_type = "NVIDIA RTX A5000"
pod_usd_per_hour = 0.26
slo_p95 = "60s"

[signals]
poll_interval = "200ms"

[signals.queue]
source = "static"
value = 300

[signals.latency]
source = "prometheus"
server_address = "{}"
metric = "{METRIC}"
ignore_null_values = false
timeout = "200ms"
"#,
        prom.url()
    );
    let config = Config::from_toml(&text).unwrap();
    let shutdown = CancellationToken::new();
    let running = service::start(
        loopback_parts(&config, service::sources_from_config(&config).unwrap()).await,
        shutdown.clone(),
    )
    .unwrap();
    let snapshots = running.snapshots.clone();
    wait_for_snapshot(&snapshots, "a fresh p95", |s| {
        s.signals.iter().any(|x| {
            x.signal == SignalKind::LatencyP95 && x.fresh && x.value.is_some_and(|v| v > 19.0)
        })
    })
    .await;

    prom.guard.stop();
    wait_for_snapshot(&snapshots, "a stale latency hold", |s| {
        s.plan.holds.iter().any(
            |h| matches!(h, Hold::StaleSignal { signal, .. } if *signal == SignalKind::LatencyP95),
        )
    })
    .await;
    let snap = snapshots.borrow().clone().unwrap();
    let p95 = snap
        .signals
        .iter()
        .find(|s| s.signal == SignalKind::LatencyP95)
        .unwrap();
    assert!(!p95.fresh);
    assert!(p95.value.is_some_and(|v| v > 19.0), "last good value kept");
    let error = p95.last_error.clone().unwrap();
    assert!(error.contains("prometheus unreachable"), "{error}");
    assert!(p95.failures >= 1);
    // The source itself reports the typed error.
    let err = source(&prom, &default_query(METRIC), true)
        .query()
        .await
        .unwrap_err();
    assert!(matches!(err, SignalError::Unreachable { .. }), "{err:?}");
    assert!(err.is_retryable());

    shutdown.cancel();
    running.wait().await.unwrap();
}
