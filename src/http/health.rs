//! Liveness, readiness, metrics and status: `/healthz`, `/readyz`, `/metrics`,
//! `/api/v2/status`. Must not open sessions or touch the store beyond asking whether it
//! can write.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::ApiError;
use crate::app::AppState;

pub async fn healthz() -> &'static str {
    "ok"
}

/// `/readyz`: 200 while the store takes writes, else 503 with the store's reason (SPEC 5.4).
pub async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    match app.store_unready() {
        None => Json(json!({ "status": "ready" })).into_response(),
        Some(reason) => {
            ApiError::Unavailable(format!("storage unavailable: {reason}")).into_response()
        }
    }
}

pub async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

pub async fn status(State(app): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": app.started.elapsed().as_secs(),
        "connections": app.caps.open(),
        "connections_by_endpoint": {
            "whiteboard": app.metrics.whiteboard.connections.get(),
            "tutor": app.metrics.tutor.connections.get(),
        },
        "sessions": app.registry.loaded(),
        "long_polls": app.requests.long_polls_held(),
    }))
}
