//! Plain HTTP routes (SPEC.md section 6) and the error type every route answers with.
//!
//! Handlers are small: extract, call the registry or metrics, answer JSON. Errors are
//! [`ApiError`] values that turn themselves into `{"error","message"}` responses with the
//! status SPEC.md gives. No WebSocket handling here (see `server` and `socket`).
//!
//! Order of work in every session route (SPEC.md 7.1): the token, its scope and the role
//! are checked first; only then is `sv` decoded (through the guard) or a body read (within
//! `limits.http_timeout_s` and `limits.max_frame_bytes`), so an anonymous client costs a
//! header parse and nothing more. Long polls hold a place under the per-user and
//! server-wide long-poll caps for as long as they wait.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use yrs::StateVector;

use crate::auth::{Claims, Role};
use crate::protocol::tutor::ChatMessage;
use crate::server::AppState;
use crate::session::tutor::{check_text, ChatTextError};
use crate::session::whiteboard::{ApplyError, RestoreFailure};
use crate::store::{SnapshotInfo, StoreError};

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
            ApiError::Forbidden(_) | ApiError::Muted(_) => (StatusCode::FORBIDDEN, "forbidden"),
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
        if matches!(self, ApiError::Muted(_)) {
            body["reason"] = json!("muted");
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

/// `?token=` and anything else in the query string.
pub(crate) type QueryMap = HashMap<String, String>;

/// The body of an authorized request, read only now: within `limits.http_timeout_s` (a
/// client trickling its body holds a task and a socket) and at most
/// `limits.max_frame_bytes` (the `DefaultBodyLimit` of the router; `413` past it).
pub(crate) async fn read_body(app: &AppState, req: Request) -> Result<axum::body::Bytes, ApiError> {
    let timeout = std::time::Duration::from_secs(app.config.limits.http_timeout_s);
    match tokio::time::timeout(timeout, axum::body::Bytes::from_request(req, &())).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(rejection)) => {
            let too_large = rejection.status() == StatusCode::PAYLOAD_TOO_LARGE;
            app.metrics.limit_refused(if too_large {
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
            app.metrics.limit_refused("http_timeout");
            tracing::info!(reason = "http_timeout", "request body too slow");
            Err(ApiError::Timeout(format!(
                "the request body did not arrive within {} s",
                timeout.as_secs()
            )))
        }
    }
}

fn require_snapshot_role(claims: &Claims) -> Result<(), ApiError> {
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

pub(crate) fn storage(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "storage error");
    ApiError::Internal("storage error".into())
}

#[derive(Serialize)]
struct VersionJson {
    version: u64,
    created_at: String,
    bytes: u64,
    updates: u64,
}

impl From<SnapshotInfo> for VersionJson {
    fn from(i: SnapshotInfo) -> Self {
        Self {
            version: i.version,
            created_at: rfc3339_ms(i.created_at_ms),
            bytes: i.bytes,
            updates: i.updates,
        }
    }
}

/// Milliseconds since the epoch as RFC 3339, UTC.
pub fn rfc3339_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// `POST /api/v2/session/{id}/student-link` (tutor, admin): a student token for this
/// session, so a tutor can hand out a link without a command line. Valid 12 hours, never
/// longer than the tutor's own token; minted only where the server holds an HMAC secret
/// (with a public key, tokens come from the identity provider: `501`).
pub async fn student_link(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    const LINK_TTL_S: u64 = 12 * 3600;
    let claims = app.authorize(&session, &headers, &query, None)?;
    if !matches!(claims.role, Role::Tutor | Role::Admin) {
        return Err(ApiError::Forbidden(
            "only tutors and admins may hand out student links".into(),
        ));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let ttl = claims.exp.saturating_sub(now).min(LINK_TTL_S);
    if ttl == 0 {
        // Within the leeway past its `exp`: a link minted now would be dead on arrival.
        return Err(ApiError::Unauthorized(
            "your token has expired: get a new one first".into(),
        ));
    }
    // 64 random bits: two links never share a student's identity (presence, caps).
    let student = format!("student-{:016x}", rand::random::<u64>());
    let mut minted = crate::auth::claims_for(
        &student,
        vec![session.clone()],
        Role::Student,
        Some("Student".into()),
        std::time::Duration::from_secs(ttl),
    );
    // Whatever this server checks of its tokens, the minted one carries.
    minted.iss = app.config.auth.issuer.clone();
    minted.aud = app
        .config
        .auth
        .audience
        .clone()
        .map(crate::auth::Audience::One);
    let token = app.verifier.mint(&minted).map_err(|e| {
        ApiError::NotImplemented(format!(
            "this server cannot mint tokens ({e}); mint student tokens where yours come from"
        ))
    })?;
    tracing::info!(%session, user = %claims.sub, student, ttl_s = ttl, "student link minted");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": token,
            "path": format!("/?session={session}&token={token}"),
            "expires_in_s": ttl,
        })),
    ))
}

pub async fn list_snapshots(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    app.authorize(&session, &headers, &query, None)?;
    let store = app.store.clone();
    let versions = blocking(move || store.list_snapshots(&session).map_err(storage)).await?;
    let versions: Vec<VersionJson> = versions.into_iter().map(Into::into).collect();
    Ok(Json(json!({ "versions": versions })))
}

pub async fn take_snapshot(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let claims = app.authorize(&session, &headers, &query, None)?;
    require_snapshot_role(&claims)?;
    let handle = app.open_session(&claims, &session).await?;
    let version = blocking(move || handle.whiteboard.snapshot_now().map_err(storage)).await?;
    tracing::info!(%session, user = %claims.sub, version, "snapshot taken");
    Ok((StatusCode::CREATED, Json(json!({ "version": version }))))
}

pub async fn get_snapshot(
    State(app): State<Arc<AppState>>,
    ApiPath((session, version)): ApiPath<(String, u64)>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    app.authorize(&session, &headers, &query, None)?;
    let store = app.store.clone();
    let state = blocking(move || store.get_snapshot(&session, version).map_err(storage))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no snapshot version {version}")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], state).into_response())
}

pub async fn restore_snapshot(
    State(app): State<Arc<AppState>>,
    ApiPath((session, version)): ApiPath<(String, u64)>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let claims = app.authorize(&session, &headers, &query, None)?;
    require_snapshot_role(&claims)?;
    let handle = app.open_session(&claims, &session).await?;
    let new_version = blocking(move || {
        handle.whiteboard.restore(version).map_err(|e| match e {
            RestoreFailure::NoSuchVersion(v) => {
                ApiError::NotFound(format!("no snapshot version {v}"))
            }
            RestoreFailure::Store(e) => storage(e),
            other => ApiError::Internal(other.to_string()),
        })
    })
    .await?;
    tracing::info!(%session, user = %claims.sub, version, new_version, "snapshot restored");
    Ok(Json(json!({ "version": new_version })))
}

/// Every stored session (an `admin` token covering `*`): what `easel sessions --server` shows.
pub async fn list_sessions(
    State(app): State<Arc<AppState>>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let claims = app.authorize("_all", &headers, &query, None)?;
    if claims.role != Role::Admin || !claims.sid.covers("*") {
        return Err(ApiError::Forbidden(
            "listing sessions needs an admin token for sid \"*\"".into(),
        ));
    }
    let store = app.store.clone();
    let sessions = blocking(move || store.list_sessions().map_err(storage)).await?;
    Ok(Json(json!({ "sessions": sessions })))
}

/// Longest a long poll is held (SPEC.md section 6).
const MAX_WAIT_S: u64 = 30;

/// The `wait` parameter: seconds to hold a long poll, at most [`MAX_WAIT_S`].
fn wait_param(query: &QueryMap) -> Result<Option<std::time::Duration>, ApiError> {
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

fn number_param(query: &QueryMap, name: &str) -> Result<Option<u64>, ApiError> {
    query
        .get(name)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::BadRequest(format!("{name} must be a whole number")))
        })
        .transpose()
}

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
    let update = blocking(move || Ok(handle.whiteboard.diff(&sv))).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], update).into_response())
}

/// `GET /api/v2/session/{id}/tutor/messages?after=N&limit=M&wait=S`: chat after `after`,
/// oldest first, with `last_seq`; with `wait`, held until a message after `after` exists.
pub async fn get_messages(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    // The token first: a client without one is told 401, whatever else it sent.
    let claims = app.authorize(&session, &headers, &query, None)?;
    let after = number_param(&query, "after")?.unwrap_or(0);
    let limit = number_param(&query, "limit")?.unwrap_or(50).clamp(1, 200) as usize;
    let wait = wait_param(&query)?;
    let _poll = wait.map(|_| app.long_poll(&claims, &session)).transpose()?;
    let handle = app.open_session(&claims, &session).await?;
    if let Some(wait) = wait {
        let mut seq = handle.tutor.subscribe();
        // An edit or deletion (SPEC 4.1) also ends the wait: it is in the answer's `changes`.
        let mut amends = handle.tutor.subscribe_amends();
        let _ = tokio::time::timeout(wait, async {
            tokio::select! {
                _ = seq.wait_for(|last| *last > after) => {}
                _ = amends.changed() => {}
            }
        })
        .await;
    }
    let (messages, last_seq, changes) = blocking(move || {
        let messages = handle.tutor.history_after(after, limit).map_err(storage)?;
        // SPEC 4.1: what changed in the messages up to `after` since it was posted.
        let changes = crate::http_moderation::changes_since(&handle, after)?;
        Ok((messages, handle.tutor.last_seq(), changes))
    })
    .await?;
    let mut body = json!({ "messages": messages, "last_seq": last_seq });
    if let Some(changes) = changes {
        body["changes"] = changes;
    }
    Ok(Json(body))
}

#[derive(serde::Deserialize)]
pub struct PostMessage {
    text: String,
    #[serde(default)]
    client_id: Option<String>,
}

/// `POST /api/v2/session/{id}/tutor/messages` `{"text":"…"}`: stored and relayed to the
/// WebSocket clients like a chat frame; `201` with the stored message.
pub async fn post_message(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
    req: Request,
) -> Result<(StatusCode, Json<ChatMessage>), ApiError> {
    // Token, scope and role before a byte of the body is read.
    let claims = app.authorize(&session, &headers, &query, None)?;
    if !claims.role.can_write() {
        return Err(ApiError::Forbidden("viewers may not chat".into()));
    }
    let body = read_body(&app, req).await?;
    let handle = app.open_session(&claims, &session).await?;
    if handle.tutor.is_muted(&claims.sub) {
        return Err(ApiError::Muted("you are muted in this session".into()));
    }
    let post: PostMessage = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"text\":\"…\"}}: {e}")))?;
    check_text(&post.text, app.config.tutor.max_text_chars).map_err(|e| match e {
        ChatTextError::Empty => ApiError::BadRequest(e.to_string()),
        ChatTextError::TooLong { .. } => ApiError::TooLarge(e.to_string()),
    })?;
    // The same bound as on the WebSocket (SPEC 7.1): a client_id is stored, relayed and
    // served in every history page.
    let max_client_id = app.config.tutor.max_client_id_bytes;
    if post
        .client_id
        .as_ref()
        .is_some_and(|c| c.len() > max_client_id)
    {
        return Err(ApiError::TooLarge(format!(
            "client_id is longer than {max_client_id} bytes"
        )));
    }
    let from = crate::server::user_info(&claims);
    let message = blocking(move || {
        handle
            .tutor
            .post_chat(from, post.text, post.client_id)
            .map_err(storage)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(message)))
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
    let body = read_body(&app, req).await?;
    let handle = app.open_session(&claims, &session).await?;
    let metrics = app.metrics.clone();
    blocking(
        move || match handle.whiteboard.apply_update(None, &body, None) {
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
        },
    )
    .await
}
