//! Plain HTTP routes (SPEC.md section 6): the error type every route answers with, the
//! extractors and helpers the route groups share, and one file per group ([`health`],
//! [`sessions`], [`snapshots`], [`whiteboard`], [`tutor`]).
//!
//! Handlers are small: extract, call the registry or metrics, answer JSON. Errors are
//! [`ApiError`] values that turn themselves into `{"error","message"}` responses with the
//! status SPEC.md gives. No WebSocket handling here (see `ws`); the paths are bound to the
//! handlers in `server::router`, beside the WebSocket ones.
//!
//! Order of work in every session route (SPEC.md 7.1): the token, its scope and the role
//! are checked first; only then is `sv` decoded (through the guard) or a body read (within
//! `limits.http_timeout_s` and `limits.max_frame_bytes`), so an anonymous client costs a
//! header parse and nothing more. Long polls hold a place under the per-user and
//! server-wide long-poll caps for as long as they wait.
//!
//! This file must not import `app` (which uses [`ApiError`]): its helpers take the pieces
//! of state they need, so the files of this folder and `app.rs` form no cycle.

pub mod health;
pub mod moderation;
pub mod sessions;
pub mod snapshots;
pub mod tutor;
pub mod whiteboard;

use std::collections::HashMap;
use std::future::Future;

use axum::extract::{FromRequest, Path, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::Claims;
use crate::config::LimitsConfig;
use crate::metrics::Metrics;
use crate::store::StoreError;

/// A refused request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// `403` `forbidden` with `"reason":"muted"` (SPEC 4.1).
    #[error("{0}")]
    Muted(String),
    /// `403` `forbidden` with `"reason":"removed"`: the user was removed from the session
    /// and the ban still runs (SPEC 4.1), so a page can say so rather than "no access".
    #[error("{0}")]
    Removed(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    NotImplemented(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    TooManyConnections(String),
    /// `429` with its own error code (`too_many_long_polls`, `too_many_new_sessions`).
    #[error("{1}")]
    TooManyRequests(&'static str, String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) | ApiError::Muted(_) | ApiError::Removed(_) => {
                (StatusCode::FORBIDDEN, "forbidden")
            }
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::TooManyConnections(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_connections")
            }
            ApiError::TooManyRequests(code, _) => (StatusCode::TOO_MANY_REQUESTS, code),
            ApiError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// `axum::extract::Path`, refusing a malformed path (a snapshot number that is not one, a
/// session id that is not UTF-8) with a JSON 400 like every other refusal, not axum's text.
pub struct ApiPath<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let mut body = json!({ "error": code, "message": self.to_string() });
        match self {
            ApiError::Muted(_) => body["reason"] = json!("muted"),
            ApiError::Removed(_) => body["reason"] = json!("removed"),
            _ => {}
        }
        (status, Json(body)).into_response()
    }
}

/// Any path no route serves: a JSON 404 like every other refusal.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

/// A known path asked with a method it does not serve: a JSON 405.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not served on {}", uri.path()))
}

/// `?token=` and anything else in the query string.
pub(crate) type QueryMap = HashMap<String, String>;

/// The body of an authorized request, read only now: within `limits.http_timeout_s` (a
/// client trickling its body holds a task and a socket) and at most
/// `limits.max_frame_bytes` (the `DefaultBodyLimit` of the router; `413` past it).
pub(crate) async fn read_body(
    req: Request,
    limits: &LimitsConfig,
    metrics: &Metrics,
) -> Result<axum::body::Bytes, ApiError> {
    let timeout = std::time::Duration::from_secs(limits.http_timeout_s);
    match tokio::time::timeout(timeout, axum::body::Bytes::from_request(req, &())).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(rejection)) => {
            let too_large = rejection.status() == StatusCode::PAYLOAD_TOO_LARGE;
            metrics.limit_refused(if too_large {
                "body_too_large"
            } else {
                "body_unreadable"
            });
            tracing::info!(reason = %rejection.body_text(), "request body refused");
            Err(if too_large {
                ApiError::TooLarge(rejection.body_text())
            } else {
                ApiError::BadRequest(rejection.body_text())
            })
        }
        Err(_) => {
            metrics.limit_refused("http_timeout");
            tracing::info!(reason = "http_timeout", "request body too slow");
            Err(ApiError::Timeout(format!(
                "the request body did not arrive within {} s",
                timeout.as_secs()
            )))
        }
    }
}

pub(crate) fn require_snapshot_role(claims: &Claims) -> Result<(), ApiError> {
    if claims.role.can_manage_snapshots() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "only tutors and admins may take or restore snapshots".into(),
        ))
    }
}

/// Runs store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
}

/// Awaits a chat change queued on a tutor room's lane, holding `handle` until it is made
/// even if the request goes first (as [`blocking`] did when the change ran there): the
/// session stays loaded, so no second room loads and hands out the same seq.
pub(crate) async fn on_lane<T: Send + 'static>(
    handle: crate::session::SessionHandle,
    change: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(async move {
        let out = change.await;
        drop(handle);
        out
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}

pub(crate) fn storage(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "storage error");
    match e {
        // SPEC 9: Redis down is a 503 (come back later), not the server failing.
        StoreError::Unreachable(_) => ApiError::Unavailable("store unreachable".into()),
        _ => ApiError::Internal("storage error".into()),
    }
}

/// Milliseconds since the epoch as RFC 3339, UTC.
pub fn rfc3339_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Longest a long poll is held (SPEC.md section 6).
const MAX_WAIT_S: u64 = 30;

/// The `wait` parameter: seconds to hold a long poll, at most [`MAX_WAIT_S`].
pub(crate) fn wait_param(query: &QueryMap) -> Result<Option<std::time::Duration>, ApiError> {
    match query.get("wait") {
        None => Ok(None),
        Some(v) => {
            let s: u64 = v.parse().map_err(|_| {
                ApiError::BadRequest("wait must be a whole number of seconds".into())
            })?;
            Ok((s > 0).then(|| std::time::Duration::from_secs(s.min(MAX_WAIT_S))))
        }
    }
}

pub(crate) fn number_param(query: &QueryMap, name: &str) -> Result<Option<u64>, ApiError> {
    query
        .get(name)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::BadRequest(format!("{name} must be a whole number")))
        })
        .transpose()
}
