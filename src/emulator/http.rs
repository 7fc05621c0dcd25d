//! The emulator's HTTP surface (axum): REST v2, `/graphql`, `/admin`. Every API request passes
//! auth (401), then the drawn fault (429 / 500), then the slow-response delay; every answer
//! carries `RateLimit` and `RateLimit-Policy` headers; errors are `application/problem+json`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::graphql::Outcome;
use super::world::{CreateRequest, Problem, RequestFault, World};
use super::Faults;

type Shared = Arc<Mutex<World>>;

/// The example quota of RunPod's docs: 60 requests per minute.
const RATE_POLICY: &str = "\"default\";q=60;w=60";

fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// The full router: API (behind [`guard`]) and admin endpoints.
pub(super) fn router(world: Shared) -> Router {
    let api = Router::new()
        .route("/v2/pods", get(list_pods).post(create_pod))
        .route("/v2/pods/{id}", get(get_pod).delete(delete_pod))
        .route("/v2/pods/{id}/action", post(pod_action))
        .route("/v2/catalog/gpus", get(catalog))
        .route("/v2/billing/pods", get(billing))
        .route("/v2/account/ssh-keys", get(get_keys).put(put_keys))
        .route("/graphql", post(graphql))
        .layer(middleware::from_fn_with_state(world.clone(), guard));
    let admin = Router::new()
        .route("/admin/pods", get(admin_pods))
        .route("/admin/pods/{id}/preempt", post(admin_preempt))
        .route("/admin/pods/{id}/ssh", post(admin_ssh))
        .route(
            "/admin/pods/{id}/utilization",
            axum::routing::put(admin_utilization),
        )
        .route("/admin/faults", get(get_faults).put(put_faults))
        .route("/admin/host-key", get(host_key));
    api.merge(admin)
        .fallback(|| async { problem(Problem::new(404, "Not Found", "no such endpoint")) })
        .with_state(world)
}

/// An RFC 9457 problem answer.
fn problem(p: Problem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({"title": p.title, "status": p.status, "detail": p.detail});
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn ok_json(status: StatusCode, v: Value) -> Response {
    (status, Json(v)).into_response()
}

fn bad_json(e: impl std::fmt::Display) -> Response {
    problem(Problem::new(422, "Unprocessable Entity", e.to_string()))
}

/// Auth, injected faults, slowness, and rate-limit headers around every API call.
async fn guard(State(world): State<Shared>, req: Request, next: Next) -> Response {
    let key = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    let (authorized, fault, slow) = {
        let mut w = lock(&world);
        let authorized = w.authorized(&key);
        let fault = if authorized { w.draw_fault() } else { None };
        w.advance();
        (authorized, fault, w.faults.slow_response)
    };
    if !slow.is_zero() {
        tokio::time::sleep(slow).await;
    }
    let mut resp = if !authorized {
        problem(Problem::new(
            401,
            "Unauthorized",
            "missing or invalid API key: send Authorization: Bearer <key>",
        ))
    } else {
        match fault {
            Some(RequestFault::RateLimited(secs)) => {
                let mut r = problem(Problem::new(
                    429,
                    "Too Many Requests",
                    format!("rate limit exceeded; retry after {secs} s"),
                ));
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    r.headers_mut().insert(header::RETRY_AFTER, v);
                }
                if let Ok(v) = HeaderValue::from_str(&format!("\"default\";r=0;t={secs}")) {
                    r.headers_mut().insert("ratelimit", v);
                }
                r
            }
            Some(RequestFault::ServerError) => problem(Problem::new(
                500,
                "Internal Server Error",
                "injected server error",
            )),
            None => next.run(req).await,
        }
    };
    let h = resp.headers_mut();
    if !h.contains_key("ratelimit") {
        h.insert(
            "ratelimit",
            HeaderValue::from_static("\"default\";r=59;t=60"),
        );
    }
    h.insert("ratelimit-policy", HeaderValue::from_static(RATE_POLICY));
    resp
}

async fn list_pods(State(w): State<Shared>) -> Response {
    ok_json(StatusCode::OK, lock(&w).list_json())
}

async fn get_pod(State(w): State<Shared>, Path(id): Path<String>) -> Response {
    match lock(&w).pod_json(&id) {
        Ok(v) => ok_json(StatusCode::OK, v),
        Err(p) => problem(p),
    }
}

async fn delete_pod(State(w): State<Shared>, Path(id): Path<String>) -> Response {
    match lock(&w).terminate(&id) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(p) => problem(p),
    }
}

/// `CreatePodRequest`: unknown fields are a contract violation (422), as in the spec.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateBody {
    name: String,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    template_id: Option<String>,
    #[serde(default)]
    gpu: Option<CreateGpu>,
    #[serde(default)]
    cpu: Option<Value>,
    #[serde(default)]
    cloud: Option<String>,
    #[serde(default)]
    data_center_ids: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    start_ssh: bool,
    #[serde(default)]
    #[allow(dead_code)] // accepted as the spec allows; not emulated
    start_jupyter: bool,
    #[serde(default)]
    disk: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as the spec allows; not emulated
    args: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as the spec allows; not emulated
    registry: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as the spec allows; not emulated
    mounts: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as the spec allows; not emulated
    global_networking: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateGpu {
    id: String,
    #[serde(default = "one")]
    count: u32,
    #[serde(default)]
    #[allow(dead_code)] // accepted as the spec allows; not emulated
    allowed_cuda_versions: Option<Vec<String>>,
    #[serde(default)]
    #[allow(dead_code)] // accepted as the spec allows; not emulated
    min_cuda_version: Option<String>,
}

fn one() -> u32 {
    1
}

async fn create_pod(State(w): State<Shared>, body: Bytes) -> Response {
    let b: CreateBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad_json(e),
    };
    if b.name.trim().is_empty() {
        return bad_json("name must not be empty");
    }
    let image = match (b.image, &b.template_id) {
        (Some(i), _) if !i.is_empty() => i,
        (_, Some(t)) => format!("template:{t}"),
        _ => return bad_json("image is required unless templateId is set"),
    };
    let Some(gpu) = b.gpu else {
        let what = if b.cpu.is_some() {
            "CPU pods are not emulated; "
        } else {
            ""
        };
        return problem(Problem::new(
            400,
            "Bad Request",
            format!("{what}gpu is required"),
        ));
    };
    let cloud = b.cloud.unwrap_or_else(|| "SECURE".into());
    if cloud != "SECURE" && cloud != "COMMUNITY" {
        return bad_json(format!("cloud must be SECURE or COMMUNITY, not {cloud:?}"));
    }
    let req = CreateRequest {
        name: b.name,
        image,
        gpu_type: gpu.id,
        gpu_count: gpu.count,
        cloud,
        env: b.env,
        ports: b.ports,
        disk: b.disk.unwrap_or(20),
        volume_gb: 0,
        data_center_ids: b.data_center_ids,
        start_ssh: b.start_ssh,
        bid: None,
    };
    let mut world = lock(&w);
    match world.create(req) {
        Ok(id) => {
            if world.take_error_after_create() {
                return problem(Problem::new(
                    500,
                    "Internal Server Error",
                    "injected error after a successful create",
                ));
            }
            match world.pod_json_fresh(&id) {
                Ok(v) => ok_json(StatusCode::CREATED, v),
                Err(p) => problem(p),
            }
        }
        Err(p) => problem(p),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action: String,
}

async fn pod_action(State(w): State<Shared>, Path(id): Path<String>, body: Bytes) -> Response {
    let b: ActionBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad_json(e),
    };
    if !["start", "stop", "restart", "terminate"].contains(&b.action.as_str()) {
        return bad_json(format!(
            "action must be one of start, stop, restart, terminate; got {:?}",
            b.action
        ));
    }
    let mut world = lock(&w);
    if b.action == "terminate" {
        return match world.terminate(&id) {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(p) => problem(p),
        };
    }
    match world.action(&id, &b.action) {
        Ok(v) => ok_json(StatusCode::OK, v),
        Err(p) => problem(p),
    }
}

async fn catalog(State(w): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let include = q
        .get("include")
        .is_some_and(|v| v.split(',').any(|x| x == "AVAILABILITY"));
    if include && !q.contains_key("product") {
        return problem(Problem::new(
            400,
            "Bad Request",
            "include=AVAILABILITY requires product (e.g. product=POD)",
        ));
    }
    ok_json(StatusCode::OK, lock(&w).catalog_json(include))
}

async fn billing(State(w): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let bucket = q.get("bucketSize").map(String::as_str).unwrap_or("day");
    if !["hour", "day", "week", "month", "year"].contains(&bucket) {
        return bad_json(format!(
            "bucketSize {bucket:?} is not one of hour, day, week, month, year"
        ));
    }
    ok_json(
        StatusCode::OK,
        lock(&w).billing_json(q.get("podId").map(String::as_str), bucket),
    )
}

async fn get_keys(State(w): State<Shared>) -> Response {
    ok_json(StatusCode::OK, lock(&w).ssh_keys_json())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysBody {
    keys: Vec<String>,
}

async fn put_keys(State(w): State<Shared>, body: Bytes) -> Response {
    let b: KeysBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad_json(e),
    };
    if let Some(bad) = b.keys.iter().find(|k| {
        let mut parts = k.split_whitespace();
        let (kind, data) = (parts.next().unwrap_or(""), parts.next());
        !(kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
            || data.is_none()
            || k.contains('\n')
    }) {
        return bad_json(format!("not an OpenSSH public key: {bad:?}"));
    }
    let mut world = lock(&w);
    world.set_ssh_keys(b.keys);
    ok_json(StatusCode::OK, world.ssh_keys_json())
}

/// `POST /graphql`: see [`super::graphql`].
async fn graphql(State(w): State<Shared>, body: Bytes) -> Response {
    match super::graphql::execute(&mut lock(&w), &body) {
        Outcome::Answer(v) => ok_json(StatusCode::OK, v),
        Outcome::Invalid(v) => (StatusCode::BAD_REQUEST, Json(v)).into_response(),
        Outcome::ServerErrorAfterCreate => problem(Problem::new(
            500,
            "Internal Server Error",
            "injected error after a successful create",
        )),
    }
}

async fn admin_pods(State(w): State<Shared>) -> Response {
    let mut world = lock(&w);
    world.advance();
    ok_json(StatusCode::OK, json!({"pods": world.admin_pods()}))
}

async fn admin_preempt(State(w): State<Shared>, Path(id): Path<String>) -> Response {
    let mut world = lock(&w);
    world.advance();
    if world.preempt(&id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        problem(Problem::new(
            409,
            "Conflict",
            format!("pod {id} is not RUNNING"),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SshBody {
    up: bool,
}

/// `POST /admin/pods/{id}/ssh` `{"up": bool}`: the pod's sshd stopped (connections refused,
/// its mapping still reported) or started again (on the same port when free).
async fn admin_ssh(State(w): State<Shared>, Path(id): Path<String>, body: Bytes) -> Response {
    let b: SshBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad_json(format!("body must be {{\"up\": true|false}}: {e}")),
    };
    let mut world = lock(&w);
    world.advance();
    match world.set_ssh(&id, b.up) {
        Ok(pod) => ok_json(StatusCode::OK, json!(pod)),
        Err(p) => problem(p),
    }
}

/// `PUT /admin/pods/{id}/utilization` `{"percent": N}` (an integer 0–100, else 422): what the
/// pod's `nvidia-smi` reports as every GPU's utilization from now on.
async fn admin_utilization(
    State(w): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    const USAGE: &str = "body must be {\"percent\": N} with N an integer from 0 to 100";
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_json(format!("{USAGE}: {e}")),
    };
    let Some(obj) = v.as_object() else {
        return bad_json(format!("{USAGE}, got {v}"));
    };
    if let Some(k) = obj.keys().find(|k| k.as_str() != "percent") {
        return bad_json(format!("{USAGE}; unknown field {k:?}"));
    }
    let Some(raw) = obj.get("percent") else {
        return bad_json(format!("{USAGE}; percent is missing"));
    };
    let Some(percent) = raw
        .as_u64()
        .and_then(|p| u8::try_from(p).ok())
        .filter(|p| *p <= 100)
    else {
        return bad_json(format!("{USAGE}, got percent = {raw}"));
    };
    let mut world = lock(&w);
    world.advance();
    match world.set_utilization(&id, percent) {
        Ok(pod) => ok_json(StatusCode::OK, json!(pod)),
        Err(p) => problem(p),
    }
}

async fn get_faults(State(w): State<Shared>) -> Response {
    ok_json(StatusCode::OK, json!(lock(&w).faults))
}

async fn put_faults(State(w): State<Shared>, body: Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => {
            lock(&w).faults = f.clone();
            ok_json(StatusCode::OK, json!(f))
        }
        Err(e) => bad_json(e),
    }
}

async fn host_key(State(w): State<Shared>) -> Response {
    ok_json(
        StatusCode::OK,
        json!({"hostKey": lock(&w).host_public_key()}),
    )
}
