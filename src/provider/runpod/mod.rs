//! The RunPod implementation of [`CloudProvider`]: REST v2 for pods, actions, the GPU catalog
//! and billing; GraphQL for spot pods (`podRentInterruptable` with `bidPerGpu`) and for spot
//! prices and stock (`gpuTypes`). The same code talks to RunPod and to the project's emulator:
//! only the base URLs differ.
//!
//! Every request carries `Authorization: Bearer <key>` and runs in a `tracing` span with method,
//! path, status and latency (never the key). Rate limits wait at least `Retry-After`; transient
//! failures back off exponentially with jitter, bounded by [`RetryPolicy`]; auth failures are
//! never retried. This module is the only user of `reqwest`.

mod retry;
mod wire;

pub use retry::{parse_wait, RetryPolicy, SharedSleeper, Sleeper, TokioSleeper};

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use crate::clock::{Clock, SystemClock};
use crate::model::Secret;
use crate::model::{GpuTypeId, PodId, Timestamp, Usd};
use crate::provider::{
    CloudProvider, LaunchSpec, Offering, OwnerMarker, Pod, ProviderError, Stock,
};
use wire::*;

/// RunPod's REST base URL (paths start with `/v2`).
pub const DEFAULT_API_URL: &str = "https://api.runpod.io";
/// RunPod's GraphQL endpoint.
pub const DEFAULT_GRAPHQL_URL: &str = "https://api.runpod.io/graphql";
/// The text RunPod uses when a GPU type has no capacity.
pub const CAPACITY_MESSAGE: &str = "no longer any instances available";
/// The text RunPod uses when a stopped pod cannot resume on its host.
pub const HOST_FULL_MESSAGE: &str = "not enough free GPUs on the host machine";

/// A minute: room for a create, its ambiguous-create lookup window (~8 s) and a few
/// retries, while a reconciler tick never waits on one call for longer.
pub const DEFAULT_CALL_DEADLINE: Duration = Duration::from_secs(60);

/// Everything the client needs; built in `main` from the configuration and environment.
#[derive(Debug, Clone)]
pub struct RunPodSettings {
    /// REST base URL, without `/v2` (e.g. `https://api.runpod.io` or the emulator's address).
    pub api_url: String,
    /// GraphQL endpoint URL.
    pub graphql_url: String,
    /// The API key.
    pub api_key: Secret,
    /// How our pods are marked.
    pub owner: OwnerMarker,
    /// Per-request timeout (connect + answer).
    pub request_timeout: Duration,
    /// Retry timing.
    pub retry: RetryPolicy,
    /// One overall deadline per public call: retries, waits and nested calls included.
    pub call_deadline: Duration,
}

impl RunPodSettings {
    /// Settings for RunPod itself (or, with other URLs, the emulator) with default tuning.
    pub fn new(api_url: impl Into<String>, graphql_url: impl Into<String>, key: Secret) -> Self {
        RunPodSettings {
            api_url: api_url.into().trim_end_matches('/').to_owned(),
            graphql_url: graphql_url.into(),
            api_key: key,
            owner: OwnerMarker::default(),
            // RunPod answers list/create within a few seconds; 30 s leaves room for a slow
            // create without letting one call hold a tick forever.
            request_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            call_deadline: DEFAULT_CALL_DEADLINE,
        }
    }
}

impl RunPodSettings {
    /// Settings from the `[runpod]` configuration (environment already applied). A missing
    /// key becomes an empty one, which RunPod rejects with a clear `Auth` error.
    pub fn from_config(c: &crate::config::RunPodConfig) -> Self {
        let mut s = RunPodSettings::new(
            c.api_url.clone(),
            c.graphql_url.clone(),
            c.api_key.clone().unwrap_or_default(),
        );
        s.owner = OwnerMarker {
            name_prefix: c.name_prefix.clone(),
            owner: c.owner.clone(),
        };
        s.request_timeout = c.request_timeout;
        s.call_deadline = c.call_deadline;
        s
    }
}

/// Billing totals for pods, from `GET /v2/billing/pods`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodBilling {
    /// One amount per pod (summed over the returned buckets).
    #[serde(default)]
    pub per_pod: BTreeMap<String, f64>,
    /// Total over all returned records.
    pub total_usd: f64,
}

/// A pod lifecycle action (`POST /v2/pods/{id}/action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodAction {
    /// Boot a stopped pod.
    Start,
    /// Stop, keeping the disk.
    Stop,
    /// Restart the container.
    Restart,
}

impl PodAction {
    fn as_str(self) -> &'static str {
        match self {
            PodAction::Start => "start",
            PodAction::Stop => "stop",
            PodAction::Restart => "restart",
        }
    }
}

/// The RunPod client. Cheap to clone (pooled connections are shared).
#[derive(Clone)]
pub struct RunPodClient {
    http: reqwest::Client,
    settings: Arc<RunPodSettings>,
    sleeper: SharedSleeper,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for RunPodClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunPodClient")
            .field("api_url", &self.settings.api_url)
            .field("graphql_url", &self.settings.graphql_url)
            .field("api_key", &self.settings.api_key)
            .finish()
    }
}

/// One HTTP answer: status, headers of interest, body.
struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    ratelimit: Option<String>,
    body: Vec<u8>,
}

const GQL_GPU_TYPES: &str = "query GpuTypes($input: GpuLowestPriceInput) { gpuTypes { id displayName memoryInGb securePrice communityPrice secureSpotPrice communitySpotPrice lowestPrice(input: $input) { minimumBidPrice uninterruptablePrice stockStatus } } }";
/// REST v2 pods do not say whether they are spot; GraphQL's `podType` does.
const GQL_POD_TYPES: &str = "query PodTypes { myself { pods { id podType } } }";
const GQL_RENT_SPOT: &str = "mutation RentSpot($input: PodRentInterruptableInput!) { podRentInterruptable(input: $input) { id } }";

impl RunPodClient {
    /// A client with the tokio timer for waits.
    pub fn new(settings: RunPodSettings) -> Result<Self, ProviderError> {
        Self::with_sleeper(settings, Arc::new(TokioSleeper))
    }

    /// A client whose waits go through `sleeper` (tests).
    pub fn with_sleeper(
        settings: RunPodSettings,
        sleeper: SharedSleeper,
    ) -> Result<Self, ProviderError> {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            // A dead endpoint should fail fast; the answer itself may take longer.
            .connect_timeout(Duration::from_secs(5))
            // Keep a few warm connections for the tick loop's list/get bursts.
            .pool_max_idle_per_host(8)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| ProviderError::Transient {
                detail: format!("building the HTTP client: {e}"),
            })?;
        Ok(RunPodClient {
            http,
            settings: Arc::new(settings),
            sleeper,
            clock: Arc::new(SystemClock),
            shutdown: CancellationToken::new(),
        })
    }

    /// Measures call deadlines with `clock` (tests inject a `ManualClock`).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Ends every call promptly with [`ProviderError::Cancelled`] once `token` is cancelled.
    pub fn with_shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = token;
        self
    }

    /// The owner marker in use.
    pub fn owner(&self) -> &OwnerMarker {
        &self.settings.owner
    }

    /// One request, no retries; transport failures become `Transient`.
    async fn send_once(
        &self,
        method: Method,
        url: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, ProviderError> {
        let span = tracing::info_span!("runpod.request", method = %method, path = %path, status = tracing::field::Empty, latency_ms = tracing::field::Empty);
        async {
            let started = Instant::now();
            let mut req = self
                .http
                .request(method, url)
                .bearer_auth(self.settings.api_key.expose());
            if let Some(b) = body {
                req = req.json(b);
            }
            let result = req.send().await;
            let span = tracing::Span::current();
            let resp = match result {
                Ok(r) => r,
                Err(e) => {
                    span.record("latency_ms", started.elapsed().as_millis() as u64);
                    // reqwest errors carry the URL (never the key, which is a header).
                    let kind = if e.is_timeout() {
                        "timeout"
                    } else if e.is_connect() {
                        "connect"
                    } else {
                        "request"
                    };
                    let e = e.without_url();
                    warn!(error = %e, kind, "request failed");
                    return Err(ProviderError::Transient {
                        detail: format!("{kind} error on {path}: {e}"),
                    });
                }
            };
            let status = resp.status();
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let retry_after = header("retry-after");
            let ratelimit = header("ratelimit");
            let body = resp.bytes().await.map_err(|e| ProviderError::Transient {
                detail: format!("reading the answer to {path}: {}", e.without_url()),
            })?;
            span.record("status", status.as_u16());
            span.record("latency_ms", started.elapsed().as_millis() as u64);
            debug!("answered");
            Ok(Answer {
                status,
                retry_after,
                ratelimit,
                body: body.to_vec(),
            })
        }
        .instrument(span)
        .await
    }

    /// Maps a non-success answer to the typed error.
    fn classify(answer: &Answer, gpu_type: &str) -> ProviderError {
        let problem: Problem = serde_json::from_slice(&answer.body).unwrap_or_default();
        let detail = problem.describe();
        match answer.status.as_u16() {
            401 | 403 => ProviderError::Auth {
                status: answer.status.as_u16(),
            },
            404 => ProviderError::NotFound {
                what: if detail.is_empty() {
                    "resource".into()
                } else {
                    detail
                },
            },
            409 => ProviderError::Conflict { detail },
            429 => ProviderError::RateLimited {
                // Without any hint, wait one second: RunPod's quotas are per minute, so a
                // short pause plus the exponential backoff spreads retries enough.
                retry_after: parse_wait(answer.retry_after.as_deref(), answer.ratelimit.as_deref())
                    .unwrap_or(Duration::from_secs(1)),
            },
            400 if is_capacity_text(&detail) => ProviderError::CapacityExhausted {
                gpu_type: gpu_type.to_owned(),
                detail,
            },
            400 | 422 => ProviderError::InvalidRequest { detail },
            s => ProviderError::Transient {
                detail: format!("HTTP {s}: {detail}"),
            },
        }
    }

    /// Runs one public call `op`: a `runpod.call` span, ONE deadline for everything inside
    /// (retries, waits, nested requests) measured on the injected clock and enforced in real
    /// time too, and prompt cancellation by the shutdown token.
    async fn call<T, F>(
        &self,
        op: &'static str,
        body: impl FnOnce(Budget) -> F,
    ) -> Result<T, ProviderError>
    where
        F: Future<Output = Result<T, ProviderError>>,
    {
        let deadline = self.settings.call_deadline;
        let budget = Budget {
            deadline: self.clock.now().plus(deadline),
        };
        let span = tracing::info_span!("runpod.call", op);
        async move {
            if self.shutdown.is_cancelled() {
                return Err(ProviderError::Cancelled { op: op.into() });
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    warn!("cancelled by shutdown");
                    Err(ProviderError::Cancelled { op: op.into() })
                }
                r = tokio::time::timeout(deadline, body(budget)) => r.unwrap_or_else(|_| {
                    warn!(deadline_ms = deadline.as_millis() as u64, "call deadline passed");
                    Err(ProviderError::Timeout { op: op.into(), deadline })
                }),
            }
        }
        .instrument(span)
        .await
    }

    /// Waits `d` unless that would cross the call's deadline; false when not waited.
    async fn wait(&self, budget: &Budget, d: Duration) -> bool {
        if self.clock.now().plus(d) > budget.deadline {
            debug!(
                wait_ms = d.as_millis() as u64,
                "not waiting: it would cross the call deadline"
            );
            return false;
        }
        self.sleeper.sleep(d).await;
        true
    }

    /// Sends with retries: 429 waits at least its Retry-After, transient failures back off,
    /// within the call's budget. Returns the success answer, or the last error.
    async fn send(
        &self,
        budget: &Budget,
        method: Method,
        url: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        gpu_type: &str,
    ) -> Result<Answer, ProviderError> {
        let policy = &self.settings.retry;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match self.send_once(method.clone(), url, path, body).await {
                Ok(a) if a.status.is_success() => return Ok(a),
                Ok(a) => Self::classify(&a, gpu_type),
                Err(e) => e,
            };
            let wait = match &err {
                ProviderError::RateLimited { retry_after }
                    if *retry_after <= policy.max_retry_after =>
                {
                    (*retry_after).max(policy.backoff(attempt))
                }
                ProviderError::Transient { .. } => policy.backoff(attempt),
                _ => return Err(err),
            };
            if attempt >= policy.max_attempts {
                return Err(err);
            }
            warn!(path, attempt, wait_ms = wait.as_millis() as u64, error = %err, "retrying");
            if !self.wait(budget, wait).await {
                return Err(err);
            }
        }
    }

    async fn rest<T: DeserializeOwned>(
        &self,
        budget: &Budget,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, ProviderError> {
        let url = format!("{}{}", self.settings.api_url, path);
        let answer = self.send(budget, method, &url, path, body, "").await?;
        decode(&answer.body, path)
    }

    /// A GraphQL call; errors in the body (HTTP 200) are typed here. `retry` = false sends
    /// once (a create must not be repeated blindly).
    async fn graphql<D: DeserializeOwned, V: Serialize>(
        &self,
        budget: &Budget,
        op: &str,
        query: &str,
        variables: V,
        gpu_type: &str,
        retry: bool,
    ) -> Result<D, ProviderError> {
        let body = serde_json::to_value(GqlRequest { query, variables }).map_err(|e| {
            ProviderError::InvalidRequest {
                detail: format!("encoding {op}: {e}"),
            }
        })?;
        let url = self.settings.graphql_url.clone();
        let path = format!("/graphql ({op})");
        let answer = if retry {
            self.send(budget, Method::POST, &url, &path, Some(&body), gpu_type)
                .await?
        } else {
            let a = self
                .send_once(Method::POST, &url, &path, Some(&body))
                .await?;
            if !a.status.is_success() {
                return Err(Self::classify(&a, gpu_type));
            }
            a
        };
        let resp: GqlResponse<D> = decode(&answer.body, &path)?;
        if let Some(e) = resp.errors.first() {
            let detail = e.message.clone();
            let lower = detail.to_ascii_lowercase();
            return Err(if is_capacity_text(&detail) {
                ProviderError::CapacityExhausted {
                    gpu_type: gpu_type.to_owned(),
                    detail,
                }
            } else if lower.contains("not found") {
                ProviderError::NotFound { what: detail }
            } else if lower.contains("unauthorized") || lower.contains("api key") {
                ProviderError::Auth { status: 401 }
            } else {
                ProviderError::InvalidRequest { detail }
            });
        }
        resp.data.ok_or_else(|| ProviderError::Transient {
            detail: format!("{op}: answer without data"),
        })
    }

    /// All pods of the account (not only ours).
    pub async fn list_all(&self) -> Result<Vec<Pod>, ProviderError> {
        self.call("list_all", |b| async move { self.list_all_in(&b).await })
            .await
    }

    async fn list_all_in(&self, budget: &Budget) -> Result<Vec<Pod>, ProviderError> {
        let list: WirePodList = self.rest(budget, Method::GET, "/v2/pods", None).await?;
        Ok(list.pods.into_iter().map(WirePod::into_pod).collect())
    }

    async fn list_in(&self, budget: &Budget) -> Result<Vec<Pod>, ProviderError> {
        let owner = &self.settings.owner;
        Ok(self
            .list_all_in(budget)
            .await?
            .into_iter()
            .filter(|p| owner.owns(&p.name, &p.env))
            .collect())
    }

    async fn get_in(&self, budget: &Budget, id: &PodId) -> Result<Option<Pod>, ProviderError> {
        let path = format!("/v2/pods/{}", encode(id.as_str()));
        match self.rest::<WirePod>(budget, Method::GET, &path, None).await {
            Ok(p) => Ok(Some(p.into_pod())),
            Err(ProviderError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Our live pod with this full name, if any (one idempotency lookup).
    async fn find_by_name(
        &self,
        budget: &Budget,
        name: &str,
    ) -> Result<Option<Pod>, ProviderError> {
        Ok(self
            .list_in(budget)
            .await?
            .into_iter()
            .find(|p| p.name == name && p.state != crate::model::PodState::Terminated))
    }

    /// Resolves an ambiguous create: looks the name up again and again over the propagation
    /// window (RunPod lists a new pod only after a lag). A failed lookup is an error: the
    /// caller must not create blindly.
    async fn await_by_name(&self, budget: &Budget, name: &str) -> Result<Lookup, ProviderError> {
        let mut waits = PropagationWaits::default();
        loop {
            if let Some(p) = self.find_by_name(budget, name).await? {
                return Ok(Lookup::Found(Box::new(p)));
            }
            let Some(d) = waits.next() else {
                return Ok(Lookup::Absent);
            };
            if !self.wait(budget, d).await {
                return Ok(Lookup::OutOfTime);
            }
        }
    }

    /// Starts, stops or restarts a pod; returns it as updated.
    pub async fn action(&self, id: &PodId, action: PodAction) -> Result<Pod, ProviderError> {
        self.call("action", |b| async move {
            let path = format!("/v2/pods/{}/action", encode(id.as_str()));
            let body = serde_json::json!({ "action": action.as_str() });
            let pod: WirePod = self.rest(&b, Method::POST, &path, Some(&body)).await?;
            Ok(pod.into_pod())
        })
        .await
    }

    /// Billing per pod (all returned buckets summed), optionally for one pod.
    pub async fn billing(&self, pod: Option<&PodId>) -> Result<PodBilling, ProviderError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Record {
            #[serde(default)]
            pod_id: String,
            #[serde(default)]
            total_amount: f64,
        }
        #[derive(Deserialize)]
        struct Resp {
            #[serde(default)]
            records: Vec<Record>,
        }
        let path = match pod {
            Some(id) => format!("/v2/billing/pods?podId={}", encode(id.as_str())),
            None => "/v2/billing/pods".to_owned(),
        };
        let resp: Resp = self
            .call("billing", |b| async move {
                self.rest(&b, Method::GET, &path, None).await
            })
            .await?;
        let mut per_pod = BTreeMap::new();
        for r in &resp.records {
            *per_pod.entry(r.pod_id.clone()).or_insert(0.0) += r.total_amount;
        }
        Ok(PodBilling {
            total_usd: resp.records.iter().map(|r| r.total_amount).sum(),
            per_pod,
        })
    }

    /// Replaces the account's SSH public keys (injected as `PUBLIC_KEY` into new pods).
    pub async fn set_ssh_keys(&self, keys: &[String]) -> Result<Vec<String>, ProviderError> {
        #[derive(Deserialize)]
        struct Keys {
            #[serde(default)]
            keys: Vec<String>,
        }
        let body = serde_json::json!({ "keys": keys });
        let k: Keys = self
            .call("set_ssh_keys", |b| async move {
                self.rest(&b, Method::PUT, "/v2/account/ssh-keys", Some(&body))
                    .await
            })
            .await?;
        Ok(k.keys)
    }

    /// One create for a caller that resolves ambiguity itself: rate limits are waited out
    /// (nothing was created), anything else ends the call; a spot rent is read once.
    async fn create_in(&self, budget: &Budget, spec: &LaunchSpec) -> Result<Pod, ProviderError> {
        self.create_retrying(budget, spec, Resolver::Caller).await
    }

    /// A create that resolves ambiguity by looking the pod up by its unique name.
    async fn launch_in(&self, budget: &Budget, spec: &LaunchSpec) -> Result<Pod, ProviderError> {
        self.create_retrying(budget, spec, Resolver::Client).await
    }

    /// Creates `spec` under our owner's name prefix and marker, retrying what is safe to send
    /// again: a rate limit (rejected before anything was created) and, with
    /// [`Resolver::Client`], a transient failure after which the pod is not found by name.
    async fn create_retrying(
        &self,
        budget: &Budget,
        spec: &LaunchSpec,
        resolver: Resolver,
    ) -> Result<Pod, ProviderError> {
        let owner = &self.settings.owner;
        let full_name = format!("{}{}", owner.name_prefix, spec.name);
        let mut env = spec.env.clone();
        env.insert(OwnerMarker::ENV.to_owned(), owner.owner.clone());
        let policy = &self.settings.retry;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match self
                .create_once(budget, spec, &full_name, &env, resolver)
                .await
            {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            let wait = match &err {
                ProviderError::RateLimited { retry_after }
                    if *retry_after <= policy.max_retry_after =>
                {
                    // Rejected before anything was created: safe to send again.
                    (*retry_after).max(policy.backoff(attempt))
                }
                ProviderError::Transient { .. } if resolver == Resolver::Client => {
                    // Ambiguous: the pod may exist (RunPod has answered 500 to creates that
                    // did create a billing pod) and may not be listed yet. Look it up by its
                    // unique name over the propagation window before creating again.
                    match self.await_by_name(budget, &full_name).await? {
                        Lookup::Found(p) => {
                            warn!(pod = %p.id, name = %full_name, "create failed ambiguously but the pod exists; adopting it");
                            return Ok(*p);
                        }
                        // Not there after the whole window: it was not created.
                        Lookup::Absent => Duration::ZERO,
                        // The window does not fit the call's deadline: cannot tell.
                        Lookup::OutOfTime => return Err(err),
                    }
                }
                _ => return Err(err),
            };
            if attempt >= policy.max_attempts {
                return Err(err);
            }
            warn!(name = %full_name, attempt, wait_ms = wait.as_millis() as u64, error = %err, "retrying create");
            if !wait.is_zero() && !self.wait(budget, wait).await {
                return Err(err);
            }
        }
    }

    async fn create_once(
        &self,
        budget: &Budget,
        spec: &LaunchSpec,
        full_name: &str,
        env: &BTreeMap<String, String>,
        resolver: Resolver,
    ) -> Result<Pod, ProviderError> {
        let gpu = spec.gpu_type.as_str();
        match spec.spot_bid_per_gpu {
            None => {
                let body = serde_json::to_value(CreatePod {
                    name: full_name,
                    image: &spec.image,
                    gpu: CreateGpu {
                        id: gpu,
                        count: spec.gpu_count,
                    },
                    cloud: spec.cloud.as_str(),
                    data_center_ids: &spec.data_center_ids,
                    ports: vec!["22/tcp"],
                    env,
                    start_ssh: true,
                    disk: spec.disk_gb.max(1),
                })
                .map_err(|e| ProviderError::InvalidRequest {
                    detail: e.to_string(),
                })?;
                let url = format!("{}/v2/pods", self.settings.api_url);
                let answer = self
                    .send_once(Method::POST, &url, "/v2/pods", Some(&body))
                    .await?;
                if !answer.status.is_success() {
                    return Err(Self::classify(&answer, gpu));
                }
                let pod: WirePod = decode(&answer.body, "/v2/pods")?;
                Ok(pod.into_pod())
            }
            Some(bid) => {
                let input = SpotInput {
                    bid_per_gpu: bid.dollars(),
                    gpu_type_id: gpu,
                    gpu_count: spec.gpu_count,
                    cloud_type: spec.cloud.as_str(),
                    name: full_name,
                    image_name: &spec.image,
                    ports: "22/tcp",
                    env: env
                        .iter()
                        .map(|(k, v)| GqlEnv { key: k, value: v })
                        .collect(),
                    start_ssh: true,
                    support_public_ip: true,
                    container_disk_in_gb: spec.disk_gb.max(1),
                };
                let r: GqlRentResult = self
                    .graphql(
                        budget,
                        "podRentInterruptable",
                        GQL_RENT_SPOT,
                        serde_json::json!({ "input": input }),
                        gpu,
                        false,
                    )
                    .await?;
                let id = r
                    .pod_rent_interruptable
                    .ok_or_else(|| ProviderError::Transient {
                        detail: "podRentInterruptable returned no pod".into(),
                    })?;
                let id = PodId(id.id);
                // The mutation returns only the id. Rented means rented: whatever GET says
                // from now on, this call returns the id, so the caller records it and never
                // rents a second pod for the same name.
                let known = Pod {
                    id: id.clone(),
                    name: full_name.to_owned(),
                    state: crate::model::PodState::Provisioning,
                    gpu_type: Some(spec.gpu_type.clone()),
                    gpu_count: spec.gpu_count,
                    usd_per_hour: Usd(bid.dollars() * f64::from(spec.gpu_count)),
                    created_at: None,
                    ssh: None,
                    env: env.clone(),
                };
                Ok(self.read_new_pod(budget, known, resolver).await)
            }
        }
    }

    /// Reads a pod just rented. A 404 right after creation is RunPod's listing lag, not a
    /// vanished pod: poll over the propagation window; if it is still invisible (or GET
    /// fails), return what is known.
    async fn read_new_pod(&self, budget: &Budget, known: Pod, resolver: Resolver) -> Pod {
        let mut waits = PropagationWaits::default();
        if resolver == Resolver::Caller {
            // One look; the caller's own listings catch up with the pod.
            waits.waited = PROPAGATION_WINDOW;
        }
        loop {
            match self.get_in(budget, &known.id).await {
                Ok(Some(p)) => return p,
                Ok(None) => {}
                Err(e) => {
                    warn!(pod = %known.id, error = %e, "reading a pod just rented failed; returning what is known");
                    return known;
                }
            }
            let Some(d) = waits.next() else {
                warn!(pod = %known.id, "pod just rented is not visible yet; returning what is known");
                return known;
            };
            if !self.wait(budget, d).await {
                return known;
            }
        }
    }
}

/// Who resolves what a create leaves open: RunPod's listing lag for a new pod, and a failure
/// that may or may not have created one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolver {
    /// This client (`launch`): it waits over the propagation window for a new pod to be
    /// listed, and after an ambiguous failure looks the pod up by its unique name, creating
    /// again only when it is not there.
    Client,
    /// The caller (`create`): one look at a new pod, and an ambiguous failure is returned; the
    /// claim store resolves both from its own listings.
    Caller,
}

/// The deadline of one public call, on the client's clock.
struct Budget {
    deadline: Timestamp,
}

/// What a lookup over the propagation window found.
enum Lookup {
    /// The pod is there.
    Found(Box<Pod>),
    /// The whole window passed without it.
    Absent,
    /// The window did not fit the call's deadline.
    OutOfTime,
}

/// First wait of the propagation window: RunPod usually lists a new pod within a second.
const PROPAGATION_FIRST_WAIT: Duration = Duration::from_millis(250);
/// How long a new pod may stay invisible to GET and list: seen for several seconds after
/// creation; ~8 s of doubling waits covers it while leaving most of a call's minute.
const PROPAGATION_WINDOW: Duration = Duration::from_secs(8);

/// The waits of the propagation window: 0.25 s doubling, the last one trimmed so they add
/// up to exactly [`PROPAGATION_WINDOW`].
struct PropagationWaits {
    next: Duration,
    waited: Duration,
}

impl Default for PropagationWaits {
    fn default() -> Self {
        PropagationWaits {
            next: PROPAGATION_FIRST_WAIT,
            waited: Duration::ZERO,
        }
    }
}

impl Iterator for PropagationWaits {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let left = PROPAGATION_WINDOW.saturating_sub(self.waited);
        if left.is_zero() {
            return None;
        }
        let d = self.next.min(left);
        self.waited += d;
        self.next = self.next.saturating_mul(2);
        Some(d)
    }
}

fn is_capacity_text(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    lower.contains(&CAPACITY_MESSAGE.to_ascii_lowercase())
        || lower.contains(&HOST_FULL_MESSAGE.to_ascii_lowercase())
}

fn decode<T: DeserializeOwned>(body: &[u8], path: &str) -> Result<T, ProviderError> {
    serde_json::from_slice(body).map_err(|e| ProviderError::Transient {
        detail: format!("unreadable answer from {path}: {e}"),
    })
}

/// Percent-encodes a path segment (pod ids are alphanumeric; this guards odd input).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[async_trait]
impl CloudProvider for RunPodClient {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Pod, ProviderError> {
        self.call("launch", |b| async move { self.launch_in(&b, spec).await })
            .await
    }

    async fn create(&self, spec: &LaunchSpec) -> Result<Pod, ProviderError> {
        self.call("create", |b| async move { self.create_in(&b, spec).await })
            .await
    }

    async fn get(&self, id: &PodId) -> Result<Option<Pod>, ProviderError> {
        self.call("get", |b| async move { self.get_in(&b, id).await })
            .await
    }

    async fn list(&self) -> Result<Vec<Pod>, ProviderError> {
        self.call("list", |b| async move { self.list_in(&b).await })
            .await
    }

    async fn terminate(&self, id: &PodId) -> Result<(), ProviderError> {
        self.call("terminate", |b| async move {
            let path = format!("/v2/pods/{}", encode(id.as_str()));
            let url = format!("{}{}", self.settings.api_url, path);
            match self.send(&b, Method::DELETE, &url, &path, None, "").await {
                Ok(_) | Err(ProviderError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn offerings(&self) -> Result<Vec<Offering>, ProviderError> {
        self.call("offerings", |b| async move { self.offerings_in(&b).await })
            .await
    }

    async fn interruptible(&self) -> Result<BTreeSet<PodId>, ProviderError> {
        self.call("interruptible", |b| async move {
            let pods: GqlMyPods = self
                .graphql(
                    &b,
                    "podTypes",
                    GQL_POD_TYPES,
                    serde_json::json!({}),
                    "",
                    true,
                )
                .await?;
            Ok(pods.interruptible())
        })
        .await
    }
}

impl RunPodClient {
    async fn offerings_in(&self, budget: &Budget) -> Result<Vec<Offering>, ProviderError> {
        let catalog: WireGpuList = self
            .rest(
                budget,
                Method::GET,
                "/v2/catalog/gpus?include=AVAILABILITY&product=POD",
                None,
            )
            .await?;
        let spot: GqlGpuTypes = self
            .graphql(
                budget,
                "gpuTypes",
                GQL_GPU_TYPES,
                serde_json::json!({ "input": { "gpuCount": 1 } }),
                "",
                true,
            )
            .await?;
        let spot: BTreeMap<String, GqlGpuType> = spot
            .gpu_types
            .into_iter()
            .map(|g| (g.id.clone(), g))
            .collect();
        let usd = |v: Option<f64>| v.filter(|p| p.is_finite() && *p > 0.0).map(Usd);
        Ok(catalog
            .gpus
            .into_iter()
            .map(|g| {
                let s = spot.get(&g.id);
                let lowest = s.and_then(|s| s.lowest_price.as_ref());
                let price = g.price.as_ref();
                Offering {
                    display_name: g.name.clone().unwrap_or_else(|| g.id.clone()),
                    memory_gb: g.memory.unwrap_or(0),
                    secure_usd: usd(price.and_then(|p| p.secure))
                        .filter(|_| g.secure != Some(false)),
                    community_usd: usd(price.and_then(|p| p.community))
                        .filter(|_| g.community != Some(false)),
                    secure_spot_usd: usd(s.and_then(|s| s.secure_spot_price)),
                    community_spot_usd: usd(s.and_then(|s| s.community_spot_price)),
                    minimum_bid_usd: usd(lowest.and_then(|l| l.minimum_bid_price)),
                    // REST availability first; GraphQL stockStatus when REST has none.
                    stock: match (&g.availability, lowest) {
                        (Some(a), _) => Stock::parse(Some(a)),
                        (None, Some(l)) => Stock::parse(l.stock_status.as_deref()),
                        (None, None) => Stock::Unknown("unknown".into()),
                    },
                    gpu_type: GpuTypeId(g.id),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn propagation_waits_double_and_add_up_to_the_window() {
        let waits: Vec<Duration> = PropagationWaits::default().collect();
        assert_eq!(waits[0], Duration::from_millis(250));
        assert_eq!(waits[1], Duration::from_millis(500));
        assert_eq!(waits.iter().sum::<Duration>(), PROPAGATION_WINDOW);
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(4)));
    }

    #[test]
    fn the_call_deadline_comes_from_the_runpod_table() {
        let c: crate::config::RunPodConfig =
            crate::config::parse_toml("call_deadline = \"15s\"").unwrap();
        assert_eq!(
            RunPodSettings::from_config(&c).call_deadline,
            Duration::from_secs(15)
        );
        let default = RunPodSettings::from_config(&Default::default());
        assert_eq!(default.call_deadline, DEFAULT_CALL_DEADLINE);
    }
}
