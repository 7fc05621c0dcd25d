//! Prometheus metrics of the service, in one registry rendered at `/metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// A handle on one request counter (increments are one atomic add).
pub type RequestCounter = Counter;

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
    /// RunPod pods (and open claims) by state.
    pub pods_by_state: Family<Labels, Gauge>,
    /// Spend rate of everything that may bill, at real prices.
    pub usd_per_hour: Gauge<f64, AtomicU64>,
    /// Dollars spent since start (the spend rate integrated over ticks).
    pub spend_usd: Counter<f64, AtomicU64>,
    /// Pods launched, by market (`spot`, `on_demand`).
    pub launches: Family<Labels, Counter>,
    /// Pods terminated and confirmed gone, by reason.
    pub terminations: Family<Labels, Counter>,
    /// Reconciler failures, by kind.
    pub reconcile_failures: Family<Labels, Counter>,
    /// From the first SSH attempt to joined (bootstrapped, GPUs checked).
    pub join_seconds: Histogram,
    /// Health probe wall time.
    pub health_probe_seconds: Histogram,
    /// Open claims (intent persisted, pod not yet confirmed gone).
    pub claims_open: Gauge,
    /// Pods of ours that no claim explained, terminated.
    pub orphans_collected: Counter,
    /// Markets (GPU type, cloud, spot) set aside after a capacity error.
    pub unavailable_offers: Gauge,
    /// Jobs of drained pods terminated at the drain deadline without a verified checkpoint.
    pub checkpoint_missed: Counter,
    /// RunPod API calls (after the client's own retries), by operation and outcome.
    pub provider_requests: Family<Labels, Counter>,
    /// The spend-rate budget (`policy.max_usd_per_hour`).
    pub max_usd_per_hour: Gauge<f64, AtomicU64>,
    /// Whether each signal is stale (1) or fresh enough to scale down on (0).
    pub signal_stale: Family<Labels, Gauge>,
    /// The longest any RunPod pod of ours has gone without work (0 with no pods).
    pub max_idle_seconds: Gauge<f64, AtomicU64>,
}

/// The RunPod operations counted in `provider_requests` (each series exists from the start, so
/// the first failure shows in `rate()` and `increase()`).
pub const PROVIDER_OPS: [&str; 5] = ["list", "offerings", "create", "get", "terminate"];

/// How a provider call ended: `ok`; `refused` when the API answered but said no (not found,
/// conflict, no capacity); `error` when it failed (auth, rate limit, 5xx, timeout, bad request).
pub const PROVIDER_OUTCOMES: [&str; 3] = ["ok", "refused", "error"];

/// Markets counted in `launches`.
pub const MARKETS: [&str; 2] = ["spot", "on_demand"];

/// Pod states always present in `pods` (0 when none), so a dashboard shows an empty fleet.
pub const POD_STATES: [&str; 6] = [
    "PROVISIONING",
    "STARTING",
    "RUNNING",
    "EXITED",
    "ERROR",
    "TERMINATED",
];

/// Reasons counted in `terminations` (the reconciler's `RetireReason` labels and `vanished`).
pub const TERMINATION_REASONS: [&str; 7] = [
    "planned",
    "join_failed",
    "unhealthy",
    "lifetime",
    "duplicate",
    "orphan",
    "vanished",
];

/// Kinds counted in `reconcile_failures`.
pub const RECONCILE_FAILURE_KINDS: [&str; 9] = [
    "list",
    "offerings",
    "claim_store",
    "capacity",
    "create_ambiguous",
    "create_refused",
    "drain_timeout",
    "join",
    "terminate",
];

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
            pods_by_state: Family::default(),
            usd_per_hour: Gauge::default(),
            spend_usd: Counter::default(),
            launches: Family::default(),
            terminations: Family::default(),
            reconcile_failures: Family::default(),
            // Joins take seconds (bootstrap over SSH) to minutes (image pulls happen before).
            join_seconds: Histogram::new([1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0]),
            // A probe is one SSH exec: tens of milliseconds, seconds when a pod is struggling.
            health_probe_seconds: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]),
            claims_open: Gauge::default(),
            orphans_collected: Counter::default(),
            unavailable_offers: Gauge::default(),
            checkpoint_missed: Counter::default(),
            provider_requests: Family::default(),
            max_usd_per_hour: Gauge::default(),
            signal_stale: Family::default(),
            max_idle_seconds: Gauge::default(),
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
        r.register(
            "pods",
            "RunPod pods and open claims, by state",
            m.pods_by_state.clone(),
        );
        r.register(
            "usd_per_hour",
            "Spend rate of every pod that may bill, at real prices",
            m.usd_per_hour.clone(),
        );
        r.register(
            "spend_usd",
            "Dollars spent on RunPod since start",
            m.spend_usd.clone(),
        );
        r.register("launches", "Pods launched, by market", m.launches.clone());
        r.register(
            "terminations",
            "Pods terminated and confirmed gone, by reason",
            m.terminations.clone(),
        );
        r.register(
            "reconcile_failures",
            "Reconciler failures, by kind",
            m.reconcile_failures.clone(),
        );
        r.register(
            "join_seconds",
            "From the first SSH attempt to joined",
            m.join_seconds.clone(),
        );
        r.register(
            "health_probe_seconds",
            "Health probe wall time",
            m.health_probe_seconds.clone(),
        );
        r.register("claims_open", "Open claims", m.claims_open.clone());
        r.register(
            "orphans_collected",
            "Pods of ours that no claim explained, terminated",
            m.orphans_collected.clone(),
        );
        r.register(
            "unavailable_offers",
            "Markets set aside after a capacity error",
            m.unavailable_offers.clone(),
        );
        r.register(
            "checkpoint_missed",
            "Jobs of drained pods terminated at the drain deadline without a verified checkpoint",
            m.checkpoint_missed.clone(),
        );
        r.register(
            "provider_requests",
            "RunPod API calls after the client's retries, by op and outcome (ok, refused: answered no, error: failed)",
            m.provider_requests.clone(),
        );
        r.register(
            "max_usd_per_hour",
            "The spend-rate budget (policy.max_usd_per_hour)",
            m.max_usd_per_hour.clone(),
        );
        r.register(
            "signal_stale",
            "1 while a signal is stale (older than stale_after_intervals polls, or never read), else 0",
            m.signal_stale.clone(),
        );
        r.register(
            "max_idle_seconds",
            "The longest any RunPod pod of ours has gone without work (0 with no pods)",
            m.max_idle_seconds.clone(),
        );
        for op in PROVIDER_OPS {
            for outcome in PROVIDER_OUTCOMES {
                let _ = m.provider_requests.get_or_create(&vec![
                    ("op", op.to_owned()),
                    ("outcome", outcome.to_owned()),
                ]);
            }
        }
        for market in MARKETS {
            let _ = m
                .launches
                .get_or_create(&vec![("market", market.to_owned())]);
        }
        for reason in TERMINATION_REASONS {
            let _ = m
                .terminations
                .get_or_create(&vec![("reason", reason.to_owned())]);
        }
        for kind in RECONCILE_FAILURE_KINDS {
            let _ = m
                .reconcile_failures
                .get_or_create(&vec![("kind", kind.to_owned())]);
        }
        m.set_pods_by_state(std::iter::empty());
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

    /// Counts one reconciler failure of `kind`.
    pub fn reconcile_failure(&self, kind: &str) {
        self.reconcile_failures
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc();
    }

    /// Counts one RunPod API call `op` that ended with `outcome` (one of [`PROVIDER_OUTCOMES`]).
    pub fn provider_request(&self, op: &str, outcome: &str) {
        self.provider_requests
            .get_or_create(&vec![
                ("op", op.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// Replaces the fleet by state with one pod per item of `states`; the known
    /// [`POD_STATES`] stay at 0 when no pod is in them.
    pub fn set_pods_by_state<'a>(&self, states: impl IntoIterator<Item = &'a str>) {
        self.pods_by_state.clear();
        for state in POD_STATES {
            let _ = self
                .pods_by_state
                .get_or_create(&vec![("state", state.to_owned())]);
        }
        for state in states {
            self.pods_by_state
                .get_or_create(&vec![("state", state.to_owned())])
                .inc();
        }
    }

    /// Counts one launch on `market`.
    pub fn reconcile_launch(&self, market: &str) {
        self.launches
            .get_or_create(&vec![("market", market.to_owned())])
            .inc();
    }

    /// Counts one confirmed termination for `reason`.
    pub fn reconcile_termination(&self, reason: &str) {
        self.terminations
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    /// The counter of gRPC requests with this method and code (a handle to keep).
    pub fn grpc_counter(&self, method: &str, code: &str) -> RequestCounter {
        self.grpc_requests
            .get_or_create(&vec![
                ("method", method.to_owned()),
                ("code", code.to_owned()),
            ])
            .clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn provider_calls_count_from_zero_by_op_and_outcome() {
        let m = Metrics::new();
        let before = m.render();
        for op in PROVIDER_OPS {
            for outcome in PROVIDER_OUTCOMES {
                let series = format!(
                    "runpod_autoscaler_provider_requests_total{{op=\"{op}\",outcome=\"{outcome}\"}}"
                );
                assert_eq!(sample(&before, &series), Some(0.0), "{series} in {before}");
            }
        }
        m.provider_request("list", "ok");
        m.provider_request("list", "ok");
        m.provider_request("create", "error");
        let after = m.render();
        let get = |op: &str, outcome: &str| {
            sample(
                &after,
                &format!("runpod_autoscaler_provider_requests_total{{op=\"{op}\",outcome=\"{outcome}\"}}"),
            )
        };
        assert_eq!(get("list", "ok"), Some(2.0));
        assert_eq!(get("create", "error"), Some(1.0));
        assert_eq!(get("create", "ok"), Some(0.0));
    }

    #[test]
    fn launches_by_market_exist_before_the_first_launch() {
        let m = Metrics::new();
        m.reconcile_launch("spot");
        let text = m.render();
        assert_eq!(
            sample(&text, "runpod_autoscaler_launches_total{market=\"spot\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "runpod_autoscaler_launches_total{market=\"on_demand\"}"
            ),
            Some(0.0)
        );
    }

    #[test]
    fn fleet_by_state_counts_pods_and_keeps_known_states_at_zero() {
        let m = Metrics::new();
        let pods = |text: &str, state: &str| {
            sample(
                text,
                &format!("runpod_autoscaler_pods{{state=\"{state}\"}}"),
            )
        };
        assert_eq!(pods(&m.render(), "RUNNING"), Some(0.0));
        m.set_pods_by_state(["RUNNING", "RUNNING", "STARTING", "WEIRD"]);
        let text = m.render();
        assert_eq!(pods(&text, "RUNNING"), Some(2.0));
        assert_eq!(pods(&text, "STARTING"), Some(1.0));
        assert_eq!(pods(&text, "WEIRD"), Some(1.0));
        assert_eq!(pods(&text, "EXITED"), Some(0.0));
        // The next tick replaces the fleet: a state nobody is in any more is gone or 0.
        m.set_pods_by_state(["EXITED"]);
        let text = m.render();
        assert_eq!(pods(&text, "WEIRD"), None);
        assert_eq!(pods(&text, "RUNNING"), Some(0.0));
        assert_eq!(pods(&text, "EXITED"), Some(1.0));
    }

    #[test]
    fn budget_staleness_and_idle_gauges_render() {
        let m = Metrics::new();
        m.max_usd_per_hour.set(4.0);
        m.max_idle_seconds.set(90.5);
        m.signal_stale
            .get_or_create(&vec![("signal", "queue_lag".to_owned())])
            .set(1);
        let text = m.render();
        assert_eq!(
            sample(&text, "runpod_autoscaler_max_usd_per_hour"),
            Some(4.0)
        );
        assert_eq!(
            sample(&text, "runpod_autoscaler_max_idle_seconds"),
            Some(90.5)
        );
        assert_eq!(
            sample(
                &text,
                "runpod_autoscaler_signal_stale{signal=\"queue_lag\"}"
            ),
            Some(1.0)
        );
    }
}
