//! The whiteboard over plain HTTP: the document (or a diff against `sv`, optionally as a
//! long poll) and posted updates, applied exactly like a WebSocket client's. Must not
//! relay by itself: the session does.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use yrs::StateVector;

use super::{blocking, read_body, storage, wait_param, ApiError, ApiPath, QueryMap};
use crate::app::AppState;
use crate::session::whiteboard::ApplyError;

/// The `sv` parameter: a base64url state vector, decoded through the guard (its entry
/// count checked against its bytes: five bytes declaring 2^29 entries are a `400`, not a
/// gigabyte reserved). Absent or empty: the empty state vector, so the whole document.
fn state_vector_param(app: &AppState, query: &QueryMap) -> Result<StateVector, ApiError> {
    let b64 = match query.get("sv").map(|v| v.trim_end_matches('=')) {
        None | Some("") => return Ok(StateVector::default()),
        Some(b64) => b64,
    };
    let refused = |message: String| {
        app.metrics.limit_refused("state_vector");
        tracing::info!(reason = "state_vector", "sv refused");
        ApiError::BadRequest(message)
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|e| refused(format!("sv is not base64url: {e}")))?;
    crate::doc::guard::decode_state_vector(&bytes)
        .map_err(|e| refused(format!("sv is not a state vector: {e}")))
}

/// `GET /api/v2/session/{id}/whiteboard?sv=B64&wait=S`: the document as a Yjs v1 update, or
/// what is missing from the base64url state vector `sv`. With `wait`, a long poll: when the
/// document holds nothing beyond `sv`, the answer waits (on a change notification, no
/// thread or timer loop per request) until something changes or `wait` seconds pass.
pub async fn get_whiteboard(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Auth first: before it, `sv` is an anonymous string and is not even base64-decoded.
    let claims = app.authorize(&session, &headers, &query, None)?;
    let sv = state_vector_param(&app, &query)?;
    let wait = wait_param(&query)?;
    let _poll = wait.map(|_| app.long_poll(&claims, &session)).transpose()?;
    let handle = app.open_session(&claims, &session).await?;
    if let Some(wait) = wait {
        // Subscribed before looking, so a change in between is not missed.
        let mut changes = handle.whiteboard.subscribe();
        if !handle.whiteboard.is_ahead_of(&sv) {
            let _ = tokio::time::timeout(wait, changes.changed()).await;
        }
    }
    let update = blocking(move || handle.whiteboard.diff(&sv).map_err(super::storage)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], update).into_response())
}

/// `POST /api/v2/session/{id}/whiteboard`: a Yjs v1 update, applied, stored and relayed
/// exactly like one from a WebSocket client.
pub async fn post_whiteboard(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
    req: Request,
) -> Result<StatusCode, ApiError> {
    // Token, scope and role before a byte of the body is read.
    let claims = app.authorize(&session, &headers, &query, None)?;
    if !claims.role.can_write() {
        return Err(ApiError::Forbidden(
            "viewers may not change the whiteboard".into(),
        ));
    }
    let body = read_body(req, &app.config.limits, &app.metrics).await?;
    let handle = app.open_session(&claims, &session).await?;
    let metrics = &app.metrics;
    // Through the session's sequencer, as a WebSocket client's update goes: this task
    // only awaits the outcome (the handle keeps the session loaded meanwhile).
    match handle.whiteboard.submit_update(None, body, None).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(e @ ApplyError::Guard(crate::doc::guard::GuardError::TooLarge { .. })) => {
            metrics.updates_rejected.inc();
            Err(ApiError::TooLarge(e.to_string()))
        }
        Err(e @ (ApplyError::Decode(_) | ApplyError::Rejected(_) | ApplyError::Guard(_))) => {
            metrics.updates_rejected.inc();
            Err(ApiError::BadRequest(e.to_string()))
        }
        Err(ApplyError::Store(e)) => Err(storage(e)),
    }
}
