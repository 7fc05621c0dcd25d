//! The KEDA external scaler over real gRPC on 127.0.0.1: every RPC, defaults and float targets,
//! bad metadata, readiness, health, TLS and mutual TLS, and StreamIsActive semantics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

mod support;

use runpod_autoscaler::decide::{Plan, PolicyKind};
use runpod_autoscaler::model::Timestamp;
use runpod_autoscaler::proto::external_scaler_client::ExternalScalerClient;
use runpod_autoscaler::proto::{GetMetricsRequest, IsActiveResponse, ScaledObjectRef};
use runpod_autoscaler::scaler::{self, ScalerService, TlsMaterial};
use runpod_autoscaler::snapshot::{self, Snapshot, SnapshotSender};
use runpod_autoscaler::telemetry::Metrics;

/// A snapshot whose served demand is `served_gpus`, with 2 baseline GPUs that stay whatever
/// the demand (so `desired_gpus` is never what KEDA is served, and no work means inactive).
fn snapshot_with(served_gpus: u32) -> Option<Arc<Snapshot>> {
    Some(Arc::new(Snapshot {
        at: Timestamp::from_secs(1),
        plan: Plan {
            at: Timestamp::from_secs(1),
            policy: PolicyKind::Target,
            demand_gpus: served_gpus,
            served_gpus,
            baseline_gpus: 2,
            desired_gpus: served_gpus.max(2),
            capacity_pods: 0,
            target_pods: 0,
            steps: vec![],
            holds: vec![],
        },
        signals: vec![],
        mode: "advisory",
        fleet: vec![],
        errors: vec![],
    }))
}

struct Server {
    addr: std::net::SocketAddr,
    snapshots: SnapshotSender,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), scaler::ScalerError>>,
}

async fn start(tls: Option<TlsMaterial>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = snapshot::channel();
    let shutdown = CancellationToken::new();
    let service = ScalerService::new(rx, shutdown.clone(), Arc::new(Metrics::new()));
    let handle = tokio::spawn(scaler::serve(listener, service, tls));
    Server {
        addr,
        snapshots: tx,
        shutdown,
        handle,
    }
}

async fn client(addr: std::net::SocketAddr) -> ExternalScalerClient<Channel> {
    ExternalScalerClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn object(pairs: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "workers".into(),
        namespace: "media".into(),
        scaler_metadata: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
    }
}

fn metrics_request(o: &ScaledObjectRef) -> GetMetricsRequest {
    GetMetricsRequest {
        scaled_object_ref: Some(o.clone()),
        metric_name: "gpu-demand".into(),
    }
}

#[tokio::test]
async fn defaults_and_every_rpc() {
    let server = start(None).await;
    let mut c = client(server.addr).await;
    let o = object(&[("scalerAddress", "runpod-autoscaler:9090")]);

    // Before the first tick: spec works (no data needed), values are UNAVAILABLE, not zero.
    let spec = c.get_metric_spec(o.clone()).await.unwrap().into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert_eq!(spec.metric_specs[0].metric_name, "gpu-demand");
    assert_eq!(spec.metric_specs[0].target_size, 1);
    assert_eq!(spec.metric_specs[0].target_size_float, 1.0);
    let err = c.get_metrics(metrics_request(&o)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        c.is_active(o.clone()).await.unwrap_err().code(),
        Code::Unavailable
    );

    server.snapshots.send_replace(snapshot_with(7));
    let m = c
        .get_metrics(metrics_request(&o))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.metric_values.len(), 1);
    assert_eq!(m.metric_values[0].metric_name, "gpu-demand");
    assert_eq!(m.metric_values[0].metric_value, 7);
    assert_eq!(m.metric_values[0].metric_value_float, 7.0);
    assert!(c.is_active(o.clone()).await.unwrap().into_inner().result);

    server.snapshots.send_replace(snapshot_with(0));
    let m = c
        .get_metrics(metrics_request(&o))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.metric_values[0].metric_value, 0);
    assert_eq!(m.metric_values[0].metric_value_float, 0.0);
    assert!(!c.is_active(o).await.unwrap().into_inner().result);

    server.shutdown.cancel();
    server.handle.await.unwrap().unwrap();
}

/// Every connection the server accepted on `addr` has `TCP_NODELAY` (no Nagle stalls waiting
/// for the client's delayed ACK); there is at least one.
fn assert_nodelay(addr: std::net::SocketAddr) {
    let accepted = support::accepted_nodelay(addr);
    assert!(
        !accepted.is_empty(),
        "no accepted connection found on {addr}"
    );
    assert!(
        accepted.iter().all(|on| *on),
        "TCP_NODELAY off on accepted connections: {accepted:?}"
    );
}

#[tokio::test]
async fn accepted_connections_have_tcp_nodelay() {
    let server = start(None).await;
    server.snapshots.send_replace(snapshot_with(3));
    let mut c = client(server.addr).await;
    c.get_metrics(metrics_request(&object(&[]))).await.unwrap();
    assert_nodelay(server.addr);
    server.shutdown.cancel();
}

#[tokio::test]
async fn scope_serves_the_baseline_share_or_the_burst() {
    let server = start(None).await;
    // 5 GPU workers of work, 2 of them on the baseline.
    server.snapshots.send_replace(snapshot_with(5));
    let mut c = client(server.addr).await;
    for (scope, want, active) in [
        ("total", 5, true),
        ("baseline", 2, true),
        ("burst", 3, true),
    ] {
        let o = object(&[("scope", scope)]);
        let m = c
            .get_metrics(metrics_request(&o))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(m.metric_values[0].metric_value, want, "{scope}");
        assert_eq!(
            c.is_active(o).await.unwrap().into_inner().result,
            active,
            "{scope}"
        );
    }
    // All within the baseline: nothing for the burst, which is then inactive.
    server.snapshots.send_replace(snapshot_with(1));
    let burst = object(&[("scope", "burst")]);
    let m = c
        .get_metrics(metrics_request(&burst))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.metric_values[0].metric_value, 0);
    assert!(!c.is_active(burst).await.unwrap().into_inner().result);
    let err = c
        .get_metrics(metrics_request(&object(&[("scope", "all")])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("scope"), "{}", err.message());
    server.shutdown.cancel();
}

#[tokio::test]
async fn float_targets_and_thresholds() {
    let server = start(None).await;
    let mut c = client(server.addr).await;
    let o = object(&[
        ("metricName", "burst-gpus"),
        ("targetSize", "0.5"),
        ("activationThreshold", "3.5"),
    ]);
    let spec = c.get_metric_spec(o.clone()).await.unwrap().into_inner();
    assert_eq!(spec.metric_specs[0].metric_name, "burst-gpus");
    assert_eq!(spec.metric_specs[0].target_size, 1, "int is the ceiling");
    assert_eq!(spec.metric_specs[0].target_size_float, 0.5);

    server.snapshots.send_replace(snapshot_with(3));
    assert!(
        !c.is_active(o.clone()).await.unwrap().into_inner().result,
        "3 > 3.5 is false"
    );
    server.snapshots.send_replace(snapshot_with(4));
    assert!(c.is_active(o.clone()).await.unwrap().into_inner().result);
    // KEDA strips its s{i}- prefix and sends the bare name; we echo what was asked.
    let m = c
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(o),
            metric_name: "burst-gpus".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.metric_values[0].metric_name, "burst-gpus");
    assert_eq!(m.metric_values[0].metric_value_float, 4.0);
    server.shutdown.cancel();
}

#[tokio::test]
async fn bad_metadata_is_invalid_argument_naming_the_key() {
    let server = start(None).await;
    server.snapshots.send_replace(snapshot_with(2));
    let mut c = client(server.addr).await;
    let cases = [
        (("targetSize", "abc"), "targetSize"),
        (("targetSize", "-2"), "targetSize"),
        (("targetSize", "0"), "targetSize"),
        (("activationThreshold", "-1"), "activationThreshold"),
        (("activationThreshold", "lots"), "activationThreshold"),
        (("scaler", "no-such-scaler"), "scaler"),
    ];
    for ((k, v), key) in cases {
        let o = object(&[(k, v)]);
        let errors = [
            c.get_metric_spec(o.clone()).await.unwrap_err(),
            c.get_metrics(metrics_request(&o)).await.unwrap_err(),
            c.is_active(o.clone()).await.unwrap_err(),
            c.stream_is_active(o.clone()).await.unwrap_err(),
        ];
        for e in errors {
            assert_eq!(e.code(), Code::InvalidArgument, "{k}={v}: {e:?}");
            assert!(e.message().contains(key), "{k}={v}: {}", e.message());
        }
    }
    // A request without scaledObjectRef reads as empty metadata: defaults, not a panic.
    let m = c
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: None,
            metric_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.metric_values[0].metric_name, "gpu-demand");
    server.shutdown.cancel();
}

/// Guard on every wait for a stream message: generous for a loaded 2-core machine, and a
/// broken server fails the test instead of hanging it.
const MESSAGE_DEADLINE: Duration = Duration::from_secs(10);

/// The next message of a `StreamIsActive` stream: `Some(result)`, or `None` when the stream
/// ended with status OK. Fails the test on an error status or after [`MESSAGE_DEADLINE`].
async fn next_state(stream: &mut tonic::Streaming<IsActiveResponse>) -> Option<bool> {
    tokio::time::timeout(MESSAGE_DEADLINE, stream.message())
        .await
        .expect("a StreamIsActive message within the deadline")
        .expect("the stream ends with status OK, not an error")
        .map(|m| m.result)
}

#[tokio::test]
async fn stream_sends_current_state_then_rising_edges_and_ends_ok() {
    let server = start(None).await;
    server.snapshots.send_replace(snapshot_with(0));
    let mut c = client(server.addr).await;
    let mut stream = c
        .stream_is_active(object(&[("activationThreshold", "1")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next_state(&mut stream).await,
        Some(false),
        "current state first"
    );

    // 2 is above the threshold 1: a rising edge is pushed.
    server.snapshots.send_replace(snapshot_with(2));
    assert_eq!(next_state(&mut stream).await, Some(true));

    // A second stream opened while active starts with `true`.
    let mut second = c
        .stream_is_active(object(&[("activationThreshold", "1")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_state(&mut second).await, Some(true));

    server.shutdown.cancel();
    // Graceful shutdown ends every stream with status OK: no more messages, no error.
    assert_eq!(next_state(&mut stream).await, None);
    assert_eq!(next_state(&mut second).await, None);
    server.handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn stream_sends_nothing_before_the_first_plan() {
    // No tick has run: the state is unknown, and "unknown" must not reach KEDA as "inactive".
    let server = start(None).await;
    let mut c = client(server.addr).await;
    let mut early = c.stream_is_active(object(&[])).await.unwrap().into_inner();
    // The first message is the state of the first plan (active), never a `false` before it.
    server.snapshots.send_replace(snapshot_with(5));
    assert_eq!(next_state(&mut early).await, Some(true));
    server.shutdown.cancel();
    assert_eq!(next_state(&mut early).await, None);
    server.handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_failed_parity_read_sends_nothing_and_is_counted() {
    // A Prometheus parity trigger whose server is down: every read fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = snapshot::channel();
    tx.send_replace(snapshot_with(3));
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let service = ScalerService::new(rx, shutdown.clone(), Arc::clone(&metrics))
        .with_parity_timing(Duration::from_millis(50), Duration::from_secs(60));
    let handle = tokio::spawn(scaler::serve(listener, service, None));
    let mut c = client(addr).await;
    let mut stream = c
        .stream_is_active(object(&[
            ("scaler", "prometheus"),
            ("serverAddress", &dead),
            ("query", "up"),
            ("threshold", "1"),
        ]))
        .await
        .unwrap()
        .into_inner();
    let failures = || {
        metrics
            .render()
            .lines()
            .find(|l| {
                l.starts_with("runpod_autoscaler_stream_read_failures_total{scaler=\"prometheus\"}")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    tokio::time::timeout(MESSAGE_DEADLINE, async {
        while failures() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("three failed reads counted");
    // Three failed reads, and not one `false` sent: ended now, the stream has no message.
    shutdown.cancel();
    assert_eq!(next_state(&mut stream).await, None);
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn health_turns_serving_after_the_first_snapshot() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let server = start(None).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let req = || HealthCheckRequest {
        service: "externalscaler.ExternalScaler".into(),
    };
    let status = health.check(req()).await.unwrap().into_inner().status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    let mut watch = health.watch(req()).await.unwrap().into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    server.snapshots.send_replace(snapshot_with(1));
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    server.shutdown.cancel();
}

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn new_pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "runpod-autoscaler test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |san: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_owned()]).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca_cert.pem(),
        server: leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth),
        client: leaf("keda-operator", ExtendedKeyUsagePurpose::ClientAuth),
    }
}

async fn tls_client(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<ExternalScalerClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(ExternalScalerClient::new(channel))
}

/// True when the TLS handshake or the first call fails.
async fn refused(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> bool {
    match tls_client(addr, ca_pem, identity).await {
        Err(_) => true,
        Ok(mut c) => c.is_active(object(&[])).await.is_err(),
    }
}

#[tokio::test]
async fn server_tls() {
    let pki = new_pki();
    let server = start(Some(TlsMaterial {
        cert_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: None,
    }))
    .await;
    server.snapshots.send_replace(snapshot_with(3));
    let mut c = tls_client(server.addr, &pki.ca_pem, None).await.unwrap();
    let m = c
        .get_metrics(metrics_request(&object(&[])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.metric_values[0].metric_value, 3);
    assert_nodelay(server.addr);

    // A plaintext client cannot talk to a TLS server.
    let mut plain = client(server.addr).await;
    assert!(plain.is_active(object(&[])).await.is_err());
    // A client that does not trust the server's CA is refused.
    let other_ca = new_pki().ca_pem;
    assert!(
        refused(server.addr, &other_ca, None).await,
        "client accepted a server certificate from an unknown CA"
    );
    server.shutdown.cancel();
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate() {
    let pki = new_pki();
    let server = start(Some(TlsMaterial {
        cert_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: Some(pki.ca_pem.clone().into_bytes()),
    }))
    .await;
    server.snapshots.send_replace(snapshot_with(5));

    let mut with_cert = tls_client(server.addr, &pki.ca_pem, Some(&pki.client))
        .await
        .unwrap();
    assert!(
        with_cert
            .is_active(object(&[]))
            .await
            .unwrap()
            .into_inner()
            .result
    );

    // Without a client certificate the handshake or the first call fails.
    assert!(
        refused(server.addr, &pki.ca_pem, None).await,
        "mTLS server accepted a client without a certificate"
    );

    // A certificate from another CA is refused too.
    let stranger = new_pki();
    assert!(
        refused(server.addr, &pki.ca_pem, Some(&stranger.client)).await,
        "mTLS server accepted a client certificate from an unknown CA"
    );
    server.shutdown.cancel();
}
