//! The long-running service: samplers feed the signal board, the tick loop runs
//! observe → decide → publish, and the gRPC and HTTP servers answer from the published snapshot.
//! One root [`CancellationToken`] stops everything; [`run`] returns once all tasks finished.

mod board;
mod http;

pub use board::SignalBoard;
pub use http::router;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::clock::Clock;
use crate::config::{Config, LatencySourceConfig, QueueSourceConfig};
use crate::decide::{decide, ClusterView, Plan, Policy, Step};
use crate::model::SignalKind;
use crate::reconcile::Reconciler;
use crate::scaler::{self, ScalerService, TlsMaterial};
use crate::signals::{KafkaLagSource, PrometheusSource, SignalError, SignalSource, StaticSource};
use crate::snapshot::{self, Snapshot, SnapshotSender};
use crate::telemetry::Metrics;

/// Why the service stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The gRPC server failed.
    #[error(transparent)]
    Scaler(#[from] scaler::ScalerError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// Everything [`run`] needs, assembled by `main` (or a test).
pub struct ServiceParts {
    /// Bound gRPC listener.
    pub grpc: TcpListener,
    /// Bound HTTP listener.
    pub http: TcpListener,
    /// gRPC TLS material.
    pub tls: Option<TlsMaterial>,
    /// Signal sources (one per signal kind).
    pub sources: Vec<Arc<dyn SignalSource>>,
    /// Poll interval of sources that do not set their own.
    pub poll_interval: Duration,
    /// Tick interval.
    pub tick_interval: Duration,
    /// GPU workers of the local baseline.
    pub baseline_gpus: u32,
    /// The planner policy.
    pub policy: Policy,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// Metrics registry (shared with the reconciler).
    pub metrics: Arc<Metrics>,
    /// The reconciler, in active mode; `None`: advisory (plans published, never executed).
    pub reconciler: Option<Reconciler>,
}

/// The signal sources a configuration describes. Clients are created here (no network I/O
/// yet); fails only when a client rejects its configuration.
pub fn sources_from_config(config: &Config) -> Result<Vec<Arc<dyn SignalSource>>, SignalError> {
    let mut sources: Vec<Arc<dyn SignalSource>> = Vec::new();
    let default_interval = config.signals.poll_interval;
    match &config.signals.queue {
        QueueSourceConfig::Static { value } => {
            sources.push(Arc::new(StaticSource::new(SignalKind::QueueLag, *value)));
        }
        QueueSourceConfig::Kafka(k) => {
            // The wall clock times `excludePersistentLag`'s window in production.
            let source = KafkaLagSource::new(k.settings(), Arc::new(crate::clock::SystemClock))?
                .with_poll_interval(k.poll_interval.unwrap_or(default_interval));
            sources.push(Arc::new(source));
        }
    }
    match &config.signals.latency {
        Some(LatencySourceConfig::Static { value }) => {
            sources.push(Arc::new(StaticSource::new(SignalKind::LatencyP95, *value)));
        }
        Some(LatencySourceConfig::Prometheus(p)) => {
            let source = PrometheusSource::new(SignalKind::LatencyP95, p.settings())?
                .with_poll_interval(p.poll_interval.unwrap_or(default_interval));
            sources.push(Arc::new(source));
        }
        None => {}
    }
    Ok(sources)
}

/// Handles of a running service, for tests and `main`.
pub struct Running {
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where HTTP listens.
    pub http_addr: SocketAddr,
    /// Published snapshots.
    pub snapshots: snapshot::SnapshotReceiver,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    tracker: TaskTracker,
    errors: watch::Receiver<Option<String>>,
}

impl Running {
    /// Waits for every task to finish (after the shutdown token fires). Returns the first
    /// server error, if any.
    pub async fn wait(self) -> Result<(), String> {
        self.tracker.wait().await;
        match self.errors.borrow().clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Starts samplers, the tick loop and both servers. They stop when `shutdown` fires; the tick
/// in progress finishes first and open KEDA streams end with status OK.
pub fn start(parts: ServiceParts, shutdown: CancellationToken) -> Result<Running, ServiceError> {
    let grpc_addr = parts.grpc.local_addr()?;
    let http_addr = parts.http.local_addr()?;
    let metrics = Arc::clone(&parts.metrics);
    let (tx, rx) = snapshot::channel();
    let (err_tx, err_rx) = watch::channel(None::<String>);
    let err_tx = Arc::new(err_tx);
    let tracker = TaskTracker::new();

    let interval_of = |kind: SignalKind| {
        parts
            .sources
            .iter()
            .find(|s| s.kind() == kind)
            .map(|s| s.poll_interval().unwrap_or(parts.poll_interval))
    };
    let queue_interval = interval_of(SignalKind::QueueLag).unwrap_or(parts.poll_interval);
    let latency_interval = interval_of(SignalKind::LatencyP95);
    let slowest = queue_interval.max(latency_interval.unwrap_or_default());
    // Keep enough history for the stabilization window plus one sample before it.
    let retention = parts.policy.scale_down_stabilization + slowest * 2;
    let board = Arc::new(SignalBoard::new(
        queue_interval,
        latency_interval,
        retention,
    ));
    let (first_round_tx, first_round_rx) = watch::channel(0usize);
    let first_round_tx = Arc::new(first_round_tx);
    // A sample that raises the lag wakes the tick loop at once.
    let wake = Arc::new(Notify::new());
    for source in &parts.sources {
        let sampler = Sampler {
            source: Arc::clone(source),
            board: Arc::clone(&board),
            clock: Arc::clone(&parts.clock),
            interval: source.poll_interval().unwrap_or(parts.poll_interval),
            metrics: Arc::clone(&metrics),
            first_round: Arc::clone(&first_round_tx),
            wake: Arc::clone(&wake),
        };
        tracker.spawn(sampler.run(shutdown.clone()));
    }

    let ticker = Ticker {
        board: Arc::clone(&board),
        policy: parts.policy,
        baseline_gpus: parts.baseline_gpus,
        clock: Arc::clone(&parts.clock),
        metrics: Arc::clone(&metrics),
        snapshots: tx,
        reconciler: parts.reconciler,
        wake,
    };
    let sources = parts.sources.len();
    let (tick_interval, poll_interval) = (parts.tick_interval, slowest);
    let tick_shutdown = shutdown.clone();
    tracker.spawn(async move {
        // Let every source report once (bounded) so the first plan sees real signals.
        let mut first = first_round_rx;
        let _ = tokio::time::timeout(poll_interval * 2, first.wait_for(|n| *n >= sources)).await;
        ticker.run(tick_interval, tick_shutdown).await;
    });

    let scaler_service = ScalerService::new(rx.clone(), shutdown.clone(), Arc::clone(&metrics));
    let (grpc, tls) = (parts.grpc, parts.tls);
    let grpc_err = Arc::clone(&err_tx);
    let grpc_shutdown = shutdown.clone();
    tracker.spawn(async move {
        if let Err(e) = scaler::serve(grpc, scaler_service, tls).await {
            warn!(error = %e, "gRPC server stopped");
            grpc_err.send_replace(Some(e.to_string()));
            grpc_shutdown.cancel();
        }
    });

    let app = router(rx.clone(), Arc::clone(&metrics));
    let http = parts.http;
    let http_shutdown = shutdown.clone();
    tracker.spawn(async move {
        // TCP_NODELAY on every accepted connection, as on the gRPC side: small answers must
        // not wait for the client's delayed ACK.
        let http = http.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                debug!(error = %e, "could not set TCP_NODELAY on an HTTP connection");
            }
        });
        let result = axum::serve(http, app)
            .with_graceful_shutdown(http_shutdown.clone().cancelled_owned())
            .await;
        if let Err(e) = result {
            warn!(error = %e, "HTTP server stopped");
            err_tx.send_replace(Some(format!("HTTP server: {e}")));
            http_shutdown.cancel();
        }
    });
    tracker.close();

    Ok(Running {
        grpc_addr,
        http_addr,
        snapshots: rx,
        metrics,
        tracker,
        errors: err_rx,
    })
}

/// Polls one source into the board.
struct Sampler {
    source: Arc<dyn SignalSource>,
    board: Arc<SignalBoard>,
    clock: Arc<dyn Clock>,
    interval: Duration,
    metrics: Arc<Metrics>,
    /// Counts sources that reported once (the first tick waits for all, bounded).
    first_round: Arc<watch::Sender<usize>>,
    /// Notified when a sample raises the lag.
    wake: Arc<Notify>,
}

impl Sampler {
    /// Polls every `interval` until shutdown.
    async fn run(self, shutdown: CancellationToken) {
        let Sampler {
            source,
            board,
            clock,
            interval,
            metrics,
            first_round,
            wake,
        } = self;
        let kind = source.kind();
        let labels = vec![("signal", kind.as_str().to_owned())];
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let span = info_span!("sample", signal = kind.as_str());
            // Sources bound their own calls; this outer bound keeps a stuck one from stalling the
            // loop past one interval.
            let result = match tokio::time::timeout(interval, source.sample())
                .instrument(span)
                .await
            {
                Ok(r) => r,
                Err(_) => Err(crate::signals::SignalError::Timeout {
                    backend: kind.as_str(),
                    timeout_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
                }),
            };
            match &result {
                Ok(r) => {
                    debug!(
                        signal = kind.as_str(),
                        value = r.value,
                        max_workers = r.max_workers,
                        "sampled"
                    );
                    metrics.signal_value.get_or_create(&labels).set(r.value);
                }
                Err(e) => {
                    warn!(signal = kind.as_str(), error = %e, "sample failed; signal goes stale");
                    metrics.signal_failures.get_or_create(&labels).inc();
                }
            }
            if board.record(kind, &result, clock.now()) {
                wake.notify_one();
            }
            if first {
                first = false;
                first_round.send_modify(|n| *n += 1);
            }
        }
    }
}

/// The tick loop's state.
struct Ticker {
    board: Arc<SignalBoard>,
    policy: Policy,
    baseline_gpus: u32,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    snapshots: SnapshotSender,
    reconciler: Option<Reconciler>,
    wake: Arc<Notify>,
}

/// Longest wait for in-flight reconcile steps (terminates, joins) at shutdown.
const SHUTDOWN_SETTLE: Duration = Duration::from_secs(15);

impl Ticker {
    async fn run(mut self, interval: Duration, shutdown: CancellationToken) {
        let mut previous: Option<Plan> = None;
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if let Some(r) = self.reconciler.as_mut() {
                        if tokio::time::timeout(SHUTDOWN_SETTLE, r.settle()).await.is_err() {
                            warn!("reconcile steps still running at shutdown; the next start resumes them");
                        }
                    }
                    info!("tick loop stopped");
                    return;
                }
                _ = tokio::time::sleep_until(next) => {}
                // Demand rose: act now rather than a tick interval later.
                _ = self.wake.notified() => debug!("woken by rising demand"),
            }
            // A tick, once started, runs to completion even if shutdown fires meanwhile.
            let (plan, requeue) = self.tick().instrument(info_span!("tick")).await;
            next = tokio::time::Instant::now() + interval.min(requeue);
            let changed = previous
                .as_ref()
                .is_none_or(|p| p.steps != plan.steps || p.holds != plan.holds);
            if changed {
                info!(
                    served_gpus = plan.served_gpus,
                    desired_gpus = plan.desired_gpus,
                    steps = plan.steps.len(),
                    "{}",
                    plan.to_string().trim_end()
                );
            }
            previous = Some(plan);
        }
    }

    async fn tick(&mut self) -> (Plan, Duration) {
        let started = Instant::now();
        let signals = self.board.signals();
        let (plan, fleet, errors, mode, requeue) = match self.reconciler.as_mut() {
            Some(r) => {
                let report = r.tick(&signals, &self.policy).await;
                for e in &report.errors {
                    warn!(error = %e, "reconcile");
                }
                (
                    report.plan,
                    report.fleet,
                    report.errors,
                    "active",
                    report.requeue_after,
                )
            }
            None => {
                // Advisory mode: nothing executes plans, so the view is the baseline alone.
                let view = ClusterView {
                    synced: true,
                    baseline_gpus: self.baseline_gpus,
                    pods: Vec::new(),
                };
                let plan = decide(&view, &signals, &self.policy, self.clock.now());
                (plan, Vec::new(), Vec::new(), "advisory", Duration::MAX)
            }
        };
        let now = self.clock.now();
        let status = self.board.status(now, self.policy.stale_after_intervals);
        self.record(&plan, &status);
        self.snapshots.send_replace(Some(Arc::new(Snapshot {
            at: now,
            plan: plan.clone(),
            signals: status,
            mode,
            fleet,
            errors,
        })));
        self.metrics.ticks.inc();
        self.metrics
            .tick_seconds
            .observe(started.elapsed().as_secs_f64());
        (plan, requeue)
    }

    fn record(&self, plan: &Plan, status: &[crate::snapshot::SignalStatus]) {
        let m = &self.metrics;
        m.desired_gpus.set(f64::from(plan.desired_gpus));
        m.demand_gpus.set(f64::from(plan.demand_gpus));
        m.served_gpus.set(f64::from(plan.served_gpus));
        m.baseline_gpus.set(f64::from(plan.baseline_gpus));
        m.runpod_pods.set(f64::from(plan.capacity_pods));
        for step in &plan.steps {
            let action = match step {
                Step::Launch { .. } => "launch",
                Step::Terminate { .. } => "terminate",
            };
            m.plan_steps
                .get_or_create(&vec![("action", action.to_owned())])
                .inc();
        }
        m.holds.clear();
        for hold in &plan.holds {
            m.holds
                .get_or_create(&vec![("kind", hold.kind().to_owned())])
                .inc();
        }
        m.max_usd_per_hour
            .set(self.policy.max_usd_per_hour.dollars());
        for s in status {
            let labels = vec![("signal", s.signal.as_str().to_owned())];
            m.signal_stale
                .get_or_create(&labels)
                .set(i64::from(!s.fresh));
            // Failed polls count from 0, so the first failure shows in rate() and increase().
            let _ = m.signal_failures.get_or_create(&labels);
            if let Some(age) = s.age {
                m.signal_age_seconds
                    .get_or_create(&vec![("signal", s.signal.as_str().to_owned())])
                    .set(age.as_secs_f64());
            }
        }
    }
}
