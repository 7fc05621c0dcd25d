//! The KEDA external scaler (`externalscaler.ExternalScaler` over tonic). It answers from the
//! latest published [`Snapshot`] and never blocks on Kafka, Prometheus or RunPod. It also
//! serves the standard `grpc.health.v1` service and, when configured, TLS or mutual TLS.

mod metadata;
pub mod parity;

pub use metadata::{Scope, Source, Trigger, DEFAULT_METRIC_NAME};
pub use parity::{Parity, ParityReading, ParitySpec};

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::proto::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use crate::proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use crate::snapshot::{Snapshot, SnapshotReceiver};
use crate::telemetry::{Metrics, RequestCounter};

/// Why a scaler request cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum ScalerError {
    /// The trigger's metadata is wrong.
    #[error("scalerMetadata.{key}: {problem}; {fix}")]
    InvalidMetadata {
        /// The offending key.
        key: &'static str,
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: String,
    },
    /// A parity trigger's Kafka or Prometheus read failed (KEDA applies its fallback).
    #[error("source unavailable: {0}")]
    SourceUnavailable(String),
    /// No tick has completed yet.
    #[error("no plan yet: the autoscaler has not completed its first tick; retry shortly")]
    NotReady,
    /// TLS material could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// The server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl From<ScalerError> for Status {
    fn from(e: ScalerError) -> Status {
        match e {
            ScalerError::InvalidMetadata { .. } => Status::invalid_argument(e.to_string()),
            ScalerError::NotReady | ScalerError::SourceUnavailable(_) => {
                Status::unavailable(e.to_string())
            }
            ScalerError::Tls(_) | ScalerError::Transport(_) => Status::internal(e.to_string()),
        }
    }
}

/// PEM material for the server's TLS.
#[derive(Clone)]
pub struct TlsMaterial {
    /// Certificate chain.
    pub cert_pem: Vec<u8>,
    /// Private key.
    pub key_pem: Vec<u8>,
    /// Client CA: when set, clients must present a certificate signed by it.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("key_pem", &"[redacted]")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish()
    }
}

/// The `ExternalScaler` implementation.
#[derive(Clone)]
pub struct ScalerService {
    snapshots: SnapshotReceiver,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    parity: Arc<Parity>,
    /// `grpc_requests{method, code="Ok"}` per method, resolved once.
    ok_counters: Arc<[(&'static str, RequestCounter)]>,
}

/// The RPCs, as counted.
const METHODS: [&str; 4] = ["IsActive", "StreamIsActive", "GetMetricSpec", "GetMetrics"];

impl ScalerService {
    /// A service answering from `snapshots` (and, for parity triggers, from a cache refreshed
    /// every [`parity::DEFAULT_REFRESH_INTERVAL`]); open streams end when `shutdown` fires.
    pub fn new(
        snapshots: SnapshotReceiver,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Self {
        let parity = Arc::new(Parity::new(
            parity::DEFAULT_REFRESH_INTERVAL,
            parity::DEFAULT_IDLE_TTL,
            shutdown.clone(),
        ));
        let ok_counters = METHODS
            .iter()
            .map(|m| (*m, metrics.grpc_counter(m, "Ok")))
            .collect();
        ScalerService {
            snapshots,
            shutdown,
            metrics,
            parity,
            ok_counters,
        }
    }

    /// Replaces the parity cache timing (tests use short intervals).
    pub fn with_parity_timing(mut self, refresh_interval: Duration, idle_ttl: Duration) -> Self {
        self.parity = Arc::new(Parity::new(
            refresh_interval,
            idle_ttl,
            self.shutdown.clone(),
        ));
        self
    }

    /// The parity cache (for tests and introspection).
    pub fn parity(&self) -> &Arc<Parity> {
        &self.parity
    }

    /// The value and activation of `trigger`: from the snapshot, or the parity cache.
    async fn reading(&self, trigger: &Trigger) -> Result<ParityReading, ScalerError> {
        match &trigger.source {
            Source::GpuDemand(scope) => {
                let snapshot = self.current().ok_or(ScalerError::NotReady)?;
                let value = value_of(&snapshot, *scope);
                Ok(ParityReading {
                    value,
                    active: value > trigger.activation_threshold,
                })
            }
            Source::Parity(spec) => self.parity.read(spec).await,
        }
    }

    fn current(&self) -> Option<Arc<Snapshot>> {
        self.snapshots.borrow().clone()
    }

    /// Counts the request and converts errors. Successes go to counters resolved once (no
    /// label lookup or allocation on the hot path); failures through the labelled family.
    fn answer<T>(
        &self,
        method: &'static str,
        result: Result<T, ScalerError>,
    ) -> Result<Response<T>, Status> {
        let result = result.map(Response::new).map_err(Status::from);
        match &result {
            Ok(_) => match self.ok_counters.iter().find(|(m, _)| *m == method) {
                Some((_, counter)) => {
                    counter.inc();
                }
                None => self.metrics.grpc_request(method, "Ok"),
            },
            Err(status) => self
                .metrics
                .grpc_request(method, &format!("{:?}", status.code())),
        }
        result
    }
}

/// The `gpu-demand` value of a snapshot (the `scope`d part): finite and non-negative.
fn value_of(snapshot: &Snapshot, scope: Scope) -> f64 {
    let v = scope.share(
        snapshot.gpu_demand(),
        f64::from(snapshot.plan.baseline_gpus),
    );
    if v.is_finite() && v > 0.0 {
        v
    } else {
        0.0
    }
}

/// The `scaler` metadata value of a parity trigger (a metric label).
fn scaler_name(spec: &ParitySpec) -> &'static str {
    match spec {
        ParitySpec::Kafka { .. } => "kafka",
        ParitySpec::Prometheus { .. } => "prometheus",
    }
}

/// Integer form KEDA falls back to when the float is 0: the ceiling, saturated.
fn ceil_i64(v: f64) -> i64 {
    // `as` saturates for out-of-range floats, which is the intent for huge values.
    v.ceil() as i64
}

fn metadata_of(r: &ScaledObjectRef) -> Result<Trigger, ScalerError> {
    Trigger::parse(&r.scaler_metadata)
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for ScalerService {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let result = match metadata_of(request.get_ref()) {
            Ok(trigger) => self
                .reading(&trigger)
                .await
                .map(|r| IsActiveResponse { result: r.active }),
            Err(e) => Err(e),
        };
        self.answer("IsActive", result)
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let trigger = match metadata_of(request.get_ref()) {
            Ok(t) => t,
            Err(e) => return self.answer("StreamIsActive", Err(e)),
        };
        // One message in flight is plenty: only transitions are sent.
        let (tx, rx) = mpsc::channel(2);
        let scope = match &trigger.source {
            Source::Parity(spec) => {
                let stream = self.parity_stream((**spec).clone());
                return self.answer("StreamIsActive", Ok(stream));
            }
            Source::GpuDemand(scope) => *scope,
        };
        let mut snapshots = self.snapshots.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            // No snapshot yet is "unknown", not "inactive": nothing is sent until a tick ran.
            let active_now = |s: &Option<Arc<Snapshot>>| {
                s.as_ref()
                    .map(|s| value_of(s, scope) > trigger.activation_threshold)
            };
            let mut edges = ActivationEdges::default();
            let mut state = active_now(&snapshots.borrow_and_update());
            loop {
                if let Some(result) = edges.observe(state) {
                    if tx.send(Ok(IsActiveResponse { result })).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    // Ending the stream (dropping `tx`) closes it with status OK.
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    changed = snapshots.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        state = active_now(&snapshots.borrow_and_update());
                    }
                }
            }
        });
        let stream: ActiveStream = Box::pin(ReceiverStream::new(rx));
        self.answer("StreamIsActive", Ok(stream))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let result = metadata_of(request.get_ref());
        if let Ok(Trigger {
            source: Source::Parity(spec),
            ..
        }) = &result
        {
            // Start the first read now so the GetMetrics that follows finds it cached.
            self.parity.prefetch(spec).await;
        }
        let result = result.map(|t| GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: t.metric_name,
                target_size: ceil_i64(t.target),
                target_size_float: t.target,
            }],
        });
        self.answer("GetMetricSpec", result)
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = request.get_ref();
        let empty = ScaledObjectRef::default();
        let result = match metadata_of(req.scaled_object_ref.as_ref().unwrap_or(&empty)) {
            Ok(t) => self.reading(&t).await.map(|r| {
                let metric_name = if req.metric_name.is_empty() {
                    t.metric_name
                } else {
                    req.metric_name.clone()
                };
                GetMetricsResponse {
                    metric_values: vec![MetricValue {
                        metric_name,
                        metric_value: ceil_i64(r.value),
                        metric_value_float: r.value,
                    }],
                }
            }),
            Err(e) => Err(e),
        };
        self.answer("GetMetrics", result)
    }
}

impl ScalerService {
    /// `StreamIsActive` for a parity trigger: the current state once known, then
    /// inactive→active transitions as the cache refreshes; a failed read sends nothing (the last
    /// state stands) and is counted; ends (OK) on shutdown.
    fn parity_stream(&self, spec: ParitySpec) -> ActiveStream {
        // One message in flight is plenty: only transitions are sent.
        let (tx, rx) = mpsc::channel(2);
        let parity = Arc::clone(&self.parity);
        let shutdown = self.shutdown.clone();
        let metrics = Arc::clone(&self.metrics);
        let every = parity.refresh_interval();
        let scaler = scaler_name(&spec);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            let mut edges = ActivationEdges::default();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = ticks.tick() => {}
                }
                let state = match parity.read(&spec).await {
                    Ok(r) => Some(r.active),
                    Err(e) => {
                        debug!(scaler, error = %e, "StreamIsActive read failed; last state stands");
                        metrics.stream_read_failure(scaler);
                        None
                    }
                };
                if let Some(result) = edges.observe(state) {
                    if tx.send(Ok(IsActiveResponse { result })).await.is_err() {
                        return;
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// What a `StreamIsActive` stream sends as activation states are observed: the first known
/// state, then only inactive→active transitions (KEDA ignores `false` pushes since 2.18 and
/// reads deactivation through `IsActive`). An unknown state (no plan yet, a failed read) sends
/// nothing and leaves the last known state in place: a failure is not "inactive".
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ActivationEdges {
    last: Option<bool>,
}

impl ActivationEdges {
    /// The message to send for a newly observed state, if any.
    pub fn observe(&mut self, state: Option<bool>) -> Option<bool> {
        let now = state?;
        let send = match self.last {
            None => true,
            Some(before) => now && !before,
        };
        self.last = Some(now);
        send.then_some(now)
    }
}

/// Connections accepted on `listener`, with `TCP_NODELAY` set on each. tonic sets it only on
/// listeners it binds itself; without it, Nagle's algorithm holds a response's last small
/// frame until the client's delayed ACK (~40 ms on Linux), a stall KEDA would see on a fraction
/// of its calls.
fn accepting(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves the scaler and `grpc.health.v1` on `listener` until `shutdown` fires. Health turns
/// SERVING once the first snapshot is published.
pub async fn serve(
    listener: TcpListener,
    service: ScalerService,
    tls: Option<TlsMaterial>,
) -> Result<(), ScalerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<ExternalScalerServer<ScalerService>>()
        .await;
    let shutdown = service.shutdown.clone();
    let mut snapshots = service.snapshots.clone();
    let watcher_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let ready = tokio::select! {
            _ = watcher_shutdown.cancelled() => false,
            ready = snapshots.wait_for(Option::is_some) => ready.is_ok(),
        };
        if ready {
            health
                .set_serving::<ExternalScalerServer<ScalerService>>()
                .await;
        }
    });

    let mut builder = Server::builder();
    if let Some(tls) = tls {
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(tls.cert_pem, tls.key_pem));
        if let Some(ca) = tls.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(config)
            .map_err(|e| ScalerError::Tls(e.to_string()))?;
    }
    builder
        .add_service(health_service)
        .add_service(ExternalScalerServer::new(service))
        .serve_with_incoming_shutdown(accepting(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ActivationEdges;

    #[test]
    fn edges_send_the_first_known_state_then_rising_edges_only() {
        // (observed states, messages sent)
        let cases: [(&[Option<bool>], &[bool]); 6] = [
            (&[Some(false), Some(true), Some(true)], &[false, true]),
            (&[Some(true), Some(false), Some(true)], &[true, true]),
            (&[Some(false), Some(false), Some(false)], &[false]),
            // Unknown (no plan yet, failed read) sends nothing and keeps the last state.
            (&[None, None, Some(true)], &[true]),
            (&[Some(true), None, Some(true)], &[true]),
            (
                &[Some(false), None, None, Some(true), None, Some(false)],
                &[false, true],
            ),
        ];
        for (states, want) in cases {
            let mut edges = ActivationEdges::default();
            let sent: Vec<bool> = states.iter().filter_map(|s| edges.observe(*s)).collect();
            assert_eq!(sent, want, "{states:?}");
        }
    }
}
