//! WebSocket upgrades: the two endpoints' handlers, refused here, before any WebSocket
//! exists, when the session id, origin, token, scope or connection caps say so (SPEC.md
//! sections 2 and 7); an accepted one gets its connection record, outbox and frame handler
//! and is handed to [`super::run`].
//!
//! Owns admission and the per-connection settings (buffers, timing). Must not touch the
//! reader/writer loop (`ws`), the protocols themselves (`ws::whiteboard`, `ws::tutor`) or
//! session state beyond joining.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use futures_util::future::Either;

use super::outbox::{outbox, Outbox};
use super::socket::{HandshakeError, Settings, Upgrade};
use super::tutor::TutorHandler;
use super::whiteboard::WhiteboardHandler;
use super::{Connection, DrainGuard, SocketReader, SocketWriter, Timing};
use crate::app::{user_info, AppState};
use crate::auth::Claims;
use crate::config::LimitsConfig;
use crate::http::{ApiError, ApiPath};
use crate::limits::{CapError, ConnectionPermit, Strikes, TokenBucket};
use crate::metrics::Endpoint;
use crate::protocol::wire;
use crate::session::SessionHandle;

/// Read buffer of a WebSocket: allocated (and zero-filled) per connection when it opens,
/// so an idle connection pays for all of it; most frames (cursor moves, strokes) are well
/// under it, larger ones grow it as needed (read at most this much per `read` call).
/// Measured (loadgen scenario d, 2,000 idle connections): 4 KiB cost 14.0 KiB per idle
/// connection, 1 KiB 10.8 KiB.
const WS_READ_BUFFER: usize = 1024;
/// Frames the writer batches are gathered up to this size before a send (measured in
/// BENCHMARKS.md: one `sendto` per frame was half of the server's CPU under load).
const WS_WRITE_BUFFER: usize = 64 * 1024;
/// Most frames the writer sends before one flush.
const WRITE_BATCH: usize = 64;

fn check_origin(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let allowed = &app.config.http.allowed_origins;
    if allowed.is_empty() {
        return Ok(());
    }
    // Browsers always send Origin; a request without one is not a browser's, and the
    // check exists to stop other sites' pages from riding a user's browser.
    match headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or(""))
    {
        None => Ok(()),
        Some(o) if allowed.iter().any(|a| a == o) => Ok(()),
        Some(o) => {
            app.metrics.auth_failure("origin");
            tracing::info!(
                origin = o,
                reason = "origin",
                "upgrade refused: origin not allowed"
            );
            Err(ApiError::Forbidden(format!("origin {o} is not allowed")))
        }
    }
}

fn acquire(
    app: &AppState,
    claims: &Claims,
    session: &str,
    e: Endpoint,
) -> Result<ConnectionPermit, ApiError> {
    app.caps.acquire(&claims.sub, session, e).map_err(|err| {
        app.metrics.auth_failure(err.reason());
        tracing::info!(%session, user = %claims.sub, reason = err.reason(), "upgrade refused");
        match err {
            CapError::PerUser | CapError::PerUserTotal => {
                ApiError::TooManyConnections(err.to_string())
            }
            CapError::Total => ApiError::Unavailable(err.to_string()),
        }
    })
}

fn timing(app: &AppState, keepalive: bool) -> Timing {
    connection_timing(
        &app.config.limits,
        keepalive.then(|| {
            (
                Duration::from_secs(app.config.whiteboard.keepalive_s),
                wire::KEEPALIVE,
            )
        }),
    )
}

/// A connection's timing under `limits`, with the whiteboard's keep-alive or none. Public
/// for `examples/ws_echo.rs`, which runs the Autobahn testsuite against the same settings.
pub fn connection_timing(
    limits: &LimitsConfig,
    keepalive: Option<(Duration, &'static [u8])>,
) -> Timing {
    Timing {
        ping_interval: Duration::from_secs(limits.ping_interval_s),
        idle_timeout: Duration::from_secs(limits.idle_timeout_s),
        keepalive,
        batch: WRITE_BATCH,
    }
}

/// Everything a connection needs once its upgrade passed every check.
struct Admitted {
    claims: Claims,
    permit: ConnectionPermit,
    /// Shutdown waits until this is dropped (with the connection, or with an upgrade that
    /// never completes).
    drain: Option<DrainGuard>,
    session: SessionHandle,
}

async fn admit(
    app: &AppState,
    endpoint: Endpoint,
    session: &str,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    ws: Result<Upgrade, HandshakeError>,
) -> Result<(Admitted, Upgrade), ApiError> {
    let claims = app.authorize(session, headers, query, ws.as_ref().ok())?;
    check_origin(app, headers)?;
    // SPEC 9: no new connection while Redis does not answer (nothing could be appended).
    if app.cluster.as_ref().is_some_and(|c| !c.is_healthy()) {
        return Err(ApiError::Unavailable(
            "Redis unreachable: try again later".into(),
        ));
    }
    let ws = ws.map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let permit = acquire(app, &claims, session, endpoint)?;
    // Held from here, like the permit: shutdown also waits for an upgrade still loading
    // its session. `None` only once shutdown found no connection left to wait for: this
    // one is then closed with 1012 at once, like any connection still open at shutdown.
    let drain = app.drain.upgrade().map(DrainGuard::new);
    let session = app.open_session(&claims, session).await?;
    let admitted = Admitted {
        claims,
        permit,
        drain,
        session,
    };
    Ok((admitted, ws))
}

fn settings(app: &AppState) -> Settings {
    socket_settings(&app.config.limits)
}

/// The socket's settings under `limits`: a message over the size limit is skipped as it
/// arrives (never held) and closed with 1009. Public for `examples/ws_echo.rs`.
pub fn socket_settings(l: &LimitsConfig) -> Settings {
    Settings {
        max_message: l.max_frame_bytes,
        deflate_threshold: l.deflate_threshold_bytes,
        deflate: l.permessage_deflate,
        read_buffer: WS_READ_BUFFER,
        // The writer feeds a batch of frames, then flushes once: one send per batch.
        write_buffer: WS_WRITE_BUFFER,
    }
}

/// `GET /ws/v2/session/{session}/whiteboard`: the y-websocket endpoint (SPEC.md 3).
pub async fn whiteboard_ws(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: Result<Upgrade, HandshakeError>,
) -> Result<Response, ApiError> {
    let (a, ws) = admit(&app, Endpoint::Whiteboard, &session, &headers, &query, ws).await?;
    let settings = settings(&app);
    Ok(ws.accept("easel", settings, move |r, w| {
        run_whiteboard(app, (r, w), a)
    }))
}

/// Joins the session, then hands back the connection's future. Not an `async fn`: its
/// arguments would be kept in the connection's state beside the copies `ws::run` holds.
fn run_whiteboard(
    app: Arc<AppState>,
    socket: (SocketReader, SocketWriter),
    a: Admitted,
) -> impl Future<Output = ()> {
    let limits = &app.config.limits;
    let Admitted {
        claims,
        permit,
        drain,
        session,
    } = a;
    let (conn, tx) = connection(&app, Endpoint::Whiteboard, &session, &claims, permit, drain);
    session.whiteboard.join(conn.id, tx.clone());
    let handler = WhiteboardHandler::new(
        conn.id,
        session,
        tx,
        claims.role.can_write(),
        TokenBucket::new(limits.whiteboard_rate, limits.whiteboard_burst),
        Strikes::new(limits.whiteboard_burst, Duration::from_secs(60)),
        app.metrics.clone(),
        claims.sub,
    );
    super::run(socket, conn, handler)
}

/// A connection's record and the sending side of its outbox: a fresh id, logged as connected.
fn connection(
    app: &AppState,
    endpoint: Endpoint,
    session: &SessionHandle,
    claims: &Claims,
    permit: ConnectionPermit,
    drain: Option<DrainGuard>,
) -> (Connection, Outbox) {
    let id = app.registry.next_conn_id();
    let (tx, rx) = outbox(app.config.limits.max_send_queue_bytes);
    tracing::info!(conn = id, endpoint = endpoint.as_str(), session = %session.id, user = %claims.sub, role = claims.role.as_str(), "connected");
    let conn = Connection {
        id,
        endpoint,
        session: session.id.clone(),
        token_expires: app.verifier.expires_at(claims),
        user: claims.sub.clone(),
        permit,
        drain,
        outbox: rx,
        timing: timing(app, endpoint == Endpoint::Whiteboard),
        metrics: app.metrics.endpoint(endpoint).clone(),
        shutdown: app.shutdown.clone(),
        max_frame_bytes: app.config.limits.max_frame_bytes,
        removed: session.tutor.removals(),
        admin: claims.role == crate::auth::Role::Admin,
    };
    (conn, tx)
}

/// `GET /ws/v2/session/{session}`: the tutor chat endpoint (SPEC.md 4).
pub async fn tutor_ws(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: Result<Upgrade, HandshakeError>,
) -> Result<Response, ApiError> {
    // The token first: a client without one is told 401, whatever else it sent.
    let (a, ws) = admit(&app, Endpoint::Tutor, &session, &headers, &query, ws).await?;
    let after_seq = match query.get("after_seq") {
        None => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::BadRequest("after_seq must be a whole number".into()))?,
        ),
    };
    let settings = settings(&app);
    Ok(ws.accept("easel", settings, move |r, w| {
        run_tutor(app, (r, w), a, after_seq)
    }))
}

/// Joins the chat, then hands back the connection's future (see [`run_whiteboard`]).
fn run_tutor(
    app: Arc<AppState>,
    socket: (SocketReader, SocketWriter),
    a: Admitted,
    after_seq: Option<u64>,
) -> impl Future<Output = ()> {
    let cfg = &app.config;
    let Admitted {
        claims,
        permit,
        drain,
        session,
    } = a;
    let (conn, tx) = connection(&app, Endpoint::Tutor, &session, &claims, permit, drain);
    let user = user_info(&claims);
    if let Err(e) = session.tutor.join(
        conn.id,
        user.clone(),
        tx.clone(),
        after_seq,
        cfg.tutor.history_on_connect,
    ) {
        tracing::error!(session = %session.id, error = %e, "tutor join failed: history unreadable");
        return Either::Right(std::future::ready(()));
    }
    let handler = TutorHandler {
        conn: conn.id,
        session,
        outbox: tx,
        user,
        role: claims.role,
        bucket: TokenBucket::new(cfg.limits.tutor_rate, cfg.limits.tutor_burst),
        strikes: Strikes::new(
            cfg.tutor.bad_message_limit,
            Duration::from_secs(cfg.tutor.bad_message_window_s),
        ),
        config: cfg.tutor.clone(),
        metrics: app.metrics.clone(),
        finish: Default::default(),
    };
    Either::Left(super::run(socket, conn, handler))
}
