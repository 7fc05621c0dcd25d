//! The HTTP side: `/metrics` (Prometheus text), `/healthz`, `/readyz` and `/debug/plan`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::snapshot::SnapshotReceiver;
use crate::telemetry::Metrics;

#[derive(Clone)]
struct AppState {
    snapshots: SnapshotReceiver,
    metrics: Arc<Metrics>,
}

/// The router for every HTTP endpoint.
pub fn router(snapshots: SnapshotReceiver, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/debug/plan", get(debug_plan))
        .with_state(AppState { snapshots, metrics })
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.snapshots.borrow().is_some() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no plan yet: first tick pending\n",
        )
            .into_response()
    }
}

async fn debug_plan(State(state): State<AppState>) -> Response {
    let snapshot = state.snapshots.borrow().clone();
    match snapshot {
        Some(s) => Json(json!({
            "at": s.at,
            "mode": s.mode,
            "gpu_demand": s.gpu_demand(),
            "plan": s.plan,
            "signals": s.signals,
            "fleet": s.fleet,
            "errors": s.errors,
            "text": s.plan.to_string(),
        }))
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "no plan yet: first tick pending"})),
        )
            .into_response(),
    }
}
