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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn, Instrument};

use crate::model::Secret;
use crate::model::{GpuTypeId, PodId, Usd};
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
        })
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

    /// Sends with retries: 429 waits at least its Retry-After, transient failures back off.
    /// Returns the success answer, or the last error.
    async fn send(
        &self,
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
            self.sleeper.sleep(wait).await;
        }
    }

    async fn rest<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, ProviderError> {
        let url = format!("{}{}", self.settings.api_url, path);
        let answer = self.send(method, &url, path, body, "").await?;
        decode(&answer.body, path)
    }

    /// A GraphQL call; errors in the body (HTTP 200) are typed here.
    async fn graphql<D: DeserializeOwned, V: Serialize>(
        &self,
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
            self.send(Method::POST, &url, &path, Some(&body), gpu_type)
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
        let list: WirePodList = self.rest(Method::GET, "/v2/pods", None).await?;
        Ok(list.pods.into_iter().map(WirePod::into_pod).collect())
    }

    /// Our pod with this full name, if any (the idempotency lookup).
    async fn find_by_name(&self, name: &str) -> Result<Option<Pod>, ProviderError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .find(|p| p.name == name && p.state != crate::model::PodState::Terminated))
    }

    /// Starts, stops or restarts a pod; returns it as updated.
    pub async fn action(&self, id: &PodId, action: PodAction) -> Result<Pod, ProviderError> {
        let path = format!("/v2/pods/{}/action", encode(id.as_str()));
        let body = serde_json::json!({ "action": action.as_str() });
        let pod: WirePod = self.rest(Method::POST, &path, Some(&body)).await?;
        Ok(pod.into_pod())
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
        let resp: Resp = self.rest(Method::GET, &path, None).await?;
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
            .rest(Method::PUT, "/v2/account/ssh-keys", Some(&body))
            .await?;
        Ok(k.keys)
    }

    async fn create_once(
        &self,
        spec: &LaunchSpec,
        full_name: &str,
        env: &BTreeMap<String, String>,
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
                // The mutation returns only the id; read the full pod over REST.
                match self.get(&PodId(id.id.clone())).await? {
                    Some(p) => Ok(p),
                    None => Err(ProviderError::Transient {
                        detail: format!("spot pod {} vanished right after creation", id.id),
                    }),
                }
            }
        }
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
        let owner = &self.settings.owner;
        let full_name = format!("{}{}", owner.name_prefix, spec.name);
        let mut env = spec.env.clone();
        env.insert(OwnerMarker::ENV.to_owned(), owner.owner.clone());
        let policy = &self.settings.retry;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match self.create_once(spec, &full_name, &env).await {
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
                ProviderError::Transient { .. } => {
                    // Ambiguous: the pod may exist (RunPod has answered 500 to creates that
                    // did create a billing pod). Look it up by its unique name first.
                    match self.find_by_name(&full_name).await {
                        Ok(Some(p)) => {
                            warn!(pod = %p.id, name = %full_name, "create failed ambiguously but the pod exists; adopting it");
                            return Ok(p);
                        }
                        Ok(None) => {}
                        // Cannot tell whether it exists: never create blindly.
                        Err(lookup) => return Err(lookup),
                    }
                    policy.backoff(attempt)
                }
                _ => return Err(err),
            };
            if attempt >= policy.max_attempts {
                return Err(err);
            }
            warn!(name = %full_name, attempt, wait_ms = wait.as_millis() as u64, error = %err, "retrying create");
            self.sleeper.sleep(wait).await;
        }
    }

    async fn get(&self, id: &PodId) -> Result<Option<Pod>, ProviderError> {
        let path = format!("/v2/pods/{}", encode(id.as_str()));
        match self.rest::<WirePod>(Method::GET, &path, None).await {
            Ok(p) => Ok(Some(p.into_pod())),
            Err(ProviderError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(&self) -> Result<Vec<Pod>, ProviderError> {
        let owner = &self.settings.owner;
        Ok(self
            .list_all()
            .await?
            .into_iter()
            .filter(|p| owner.owns(&p.name, &p.env))
            .collect())
    }

    async fn terminate(&self, id: &PodId) -> Result<(), ProviderError> {
        let path = format!("/v2/pods/{}", encode(id.as_str()));
        let url = format!("{}{}", self.settings.api_url, path);
        match self.send(Method::DELETE, &url, &path, None, "").await {
            Ok(_) | Err(ProviderError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn offerings(&self) -> Result<Vec<Offering>, ProviderError> {
        let catalog: WireGpuList = self
            .rest(
                Method::GET,
                "/v2/catalog/gpus?include=AVAILABILITY&product=POD",
                None,
            )
            .await?;
        let spot: GqlGpuTypes = self
            .graphql(
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
