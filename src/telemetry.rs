//! Prometheus metrics of the service, in one registry rendered at `/metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    /// GPU workers that will exist once the latest plan is applied.
    pub desired_gpus: Gauge<f64, AtomicU64>,
    /// GPU workers demand asks for before limits.
    pub demand_gpus: Gauge<f64, AtomicU64>,
    /// The `gpu-demand` value served to KEDA.
    pub served_gpus: Gauge<f64, AtomicU64>,
    /// GPU workers of the local baseline.
    pub baseline_gpus: Gauge<f64, AtomicU64>,
    /// RunPod pods counted as capacity.
    pub runpod_pods: Gauge<f64, AtomicU64>,
    /// Ticks completed.
    pub ticks: Counter,
    /// Tick wall time.
    pub tick_seconds: Histogram,
    /// Plan steps decided, by action.
    pub plan_steps: Family<Labels, Counter>,
    /// Holds in the latest plan, by kind.
    pub holds: Family<Labels, Gauge>,
    /// Newest value per signal.
    pub signal_value: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Age of the newest value per signal.
    pub signal_age_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Failed polls per signal.
    pub signal_failures: Family<Labels, Counter>,
    /// gRPC requests by method and status code.
    pub grpc_requests: Family<Labels, Counter>,
    /// Failed reads behind open `StreamIsActive` streams (nothing is sent for them).
    pub stream_read_failures: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered under the `runpod_autoscaler` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("runpod_autoscaler");
        let m = Metrics {
            desired_gpus: Gauge::default(),
            demand_gpus: Gauge::default(),
            served_gpus: Gauge::default(),
            baseline_gpus: Gauge::default(),
            runpod_pods: Gauge::default(),
            ticks: Counter::default(),
            // Ticks take microseconds without I/O and up to seconds with a slow provider.
            tick_seconds: Histogram::new([0.0005, 0.005, 0.05, 0.25, 1.0, 5.0]),
            plan_steps: Family::default(),
            holds: Family::default(),
            signal_value: Family::default(),
            signal_age_seconds: Family::default(),
            signal_failures: Family::default(),
            grpc_requests: Family::default(),
            stream_read_failures: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "desired_gpus",
            "GPU workers once the latest plan is applied (what this tick leaves)",
            m.desired_gpus.clone(),
        );
        r.register(
            "demand_gpus",
            "GPU workers demand asks for before limits",
            m.demand_gpus.clone(),
        );
        r.register(
            "served_gpus",
            "GPU workers the work needs within what can ever be had (the gpu-demand metric served to KEDA)",
            m.served_gpus.clone(),
        );
        r.register(
            "baseline_gpus",
            "GPU workers of the local baseline",
            m.baseline_gpus.clone(),
        );
        r.register(
            "runpod_pods",
            "RunPod pods counted as capacity",
            m.runpod_pods.clone(),
        );
        r.register("ticks", "Ticks completed", m.ticks.clone());
        r.register("tick_seconds", "Tick wall time", m.tick_seconds.clone());
        r.register(
            "plan_steps",
            "Plan steps decided, by action",
            m.plan_steps.clone(),
        );
        r.register(
            "holds",
            "Holds in the latest plan, by kind",
            m.holds.clone(),
        );
        r.register(
            "signal_value",
            "Newest value per signal",
            m.signal_value.clone(),
        );
        r.register(
            "signal_age_seconds",
            "Age of the newest value per signal",
            m.signal_age_seconds.clone(),
        );
        r.register(
            "signal_failures",
            "Failed polls per signal",
            m.signal_failures.clone(),
        );
        r.register(
            "grpc_requests",
            "gRPC requests by method and status code",
            m.grpc_requests.clone(),
        );
        r.register(
            "stream_read_failures",
            "Failed reads behind open StreamIsActive streams (the last state stands), by scaler",
            m.stream_read_failures.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts one failed read behind a `StreamIsActive` stream of `scaler`.
    pub fn stream_read_failure(&self, scaler: &str) {
        self.stream_read_failures
            .get_or_create(&vec![("scaler", scaler.to_owned())])
            .inc();
    }

    /// Counts one gRPC request.
    pub fn grpc_request(&self, method: &'static str, code: &str) {
        self.grpc_requests
            .get_or_create(&vec![
                ("method", method.to_owned()),
                ("code", code.to_owned()),
            ])
            .inc();
    }
}
