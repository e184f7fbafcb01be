//! The HTTP server: shared state, the router, the WebSocket upgrade handlers, and
//! graceful shutdown.
//!
//! An upgrade is refused here, before any WebSocket exists, when the session id, origin,
//! token, scope or connection caps say so (SPEC.md sections 2 and 7). An accepted one is
//! handed to `socket::run` with its endpoint's frame handler. Shutdown: stop accepting,
//! close every socket with 1012, wait for their tasks, snapshot, flush, and return, all
//! within `shutdown_timeout_s` even when the disk fails or hangs; what could not be saved
//! is logged and returned as [`ServerError::Unsaved`] (a non-zero exit). `/readyz` answers
//! 503 with the store's reason while it cannot write.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::auth::{bearer_from_subprotocols, Claims, Verifier};
use crate::config::Config;
use crate::http_api::{self, ApiError};
use crate::limits::{CapError, ConnectionCaps, ConnectionPermit, Strikes, TokenBucket};
use crate::metrics::{Endpoint, Metrics};
use crate::outbox::{outbox, Outbox};
use crate::protocol::tutor::UserInfo;
use crate::protocol::wire;
use crate::session::{valid_session_id, Registry, SessionHandle};
use crate::socket::{self, tutor::TutorHandler, whiteboard::WhiteboardHandler, Connection, Timing};
use crate::store::Store;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Shutdown finished, but some state could not be saved (logged in detail).
    #[error("not everything could be saved at shutdown: {0}")]
    Unsaved(String),
}

/// Read buffer of a WebSocket: small, since it is allocated per connection and most
/// frames (cursor moves, strokes) are well under it; larger frames grow it as needed.
const WS_READ_BUFFER: usize = 4 * 1024;
/// Frames the writer batches are gathered up to this size before a send (measured in
/// BENCHMARKS.md: one `sendto` per frame was half of the server's CPU under load).
const WS_WRITE_BUFFER: usize = 64 * 1024;
/// Most frames the writer sends before one flush.
const WRITE_BATCH: usize = 64;

/// State shared by every handler.
pub struct AppState {
    pub config: Arc<Config>,
    pub verifier: Arc<Verifier>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub caps: Arc<ConnectionCaps>,
    pub store: Arc<dyn Store>,
    pub shutdown: watch::Receiver<bool>,
    pub started: Instant,
}

impl AppState {
    pub fn store_ready(&self) -> bool {
        self.store.check().is_ok()
    }

    /// The token of a request: `Authorization: Bearer`, then the `bearer.<jwt>`
    /// subprotocol, then `?token=`.
    fn token<'a>(
        headers: &'a HeaderMap,
        query: &'a HashMap<String, String>,
        ws: Option<&'a WebSocketUpgrade>,
    ) -> Option<&'a str> {
        let from_header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        from_header
            .or_else(|| {
                ws.and_then(|ws| {
                    bearer_from_subprotocols(
                        ws.requested_protocols().filter_map(|p| p.to_str().ok()),
                    )
                })
            })
            .or_else(|| query.get("token").map(String::as_str))
    }

    /// Checks the session id, the token and its scope.
    pub fn authorize(
        &self,
        session: &str,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
        ws: Option<&WebSocketUpgrade>,
    ) -> Result<Claims, ApiError> {
        if !valid_session_id(session) {
            return Err(ApiError::BadRequest(
                "session id must match [A-Za-z0-9_-]{1,128}".into(),
            ));
        }
        let Some(token) = Self::token(headers, query, ws) else {
            self.metrics.auth_failure("missing");
            tracing::info!(%session, reason = "missing", "request refused");
            return Err(ApiError::Unauthorized("a token is required".into()));
        };
        let claims = self.verifier.verify(token).map_err(|e| {
            self.metrics.auth_failure(e.reason());
            tracing::info!(%session, reason = e.reason(), "request refused");
            ApiError::Unauthorized(e.to_string())
        })?;
        if !claims.sid.covers(session) {
            self.metrics.auth_failure("wrong_session");
            tracing::info!(%session, user = %claims.sub, reason = "wrong_session", "request refused");
            return Err(ApiError::Forbidden(
                "the token does not cover this session".into(),
            ));
        }
        Ok(claims)
    }

    fn check_origin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let allowed = &self.config.http.allowed_origins;
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
                tracing::info!(origin = o, "upgrade refused: origin not allowed");
                Err(ApiError::Forbidden(format!("origin {o} is not allowed")))
            }
        }
    }

    fn acquire(
        &self,
        claims: &Claims,
        session: &str,
        e: Endpoint,
    ) -> Result<ConnectionPermit, ApiError> {
        self.caps.acquire(&claims.sub, session, e).map_err(|err| {
            self.metrics.auth_failure(match err {
                CapError::PerUser => "per_user_cap",
                CapError::Total => "server_cap",
            });
            tracing::info!(%session, user = %claims.sub, reason = %err, "upgrade refused");
            match err {
                CapError::PerUser => ApiError::TooManyConnections(err.to_string()),
                CapError::Total => ApiError::Unavailable(err.to_string()),
            }
        })
    }

    /// Opens a session off the async threads (loading may read the disk).
    pub async fn open_session(&self, session: &str) -> Result<SessionHandle, ApiError> {
        let registry = self.registry.clone();
        let id = session.to_owned();
        tokio::task::spawn_blocking(move || registry.open(&id))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| {
                tracing::error!(%session, error = %e, "session could not be loaded");
                ApiError::Unavailable("the session could not be loaded".into())
            })
    }

    fn timing(&self, keepalive: bool) -> Timing {
        let l = &self.config.limits;
        Timing {
            ping_interval: Duration::from_secs(l.ping_interval_s),
            idle_timeout: Duration::from_secs(l.idle_timeout_s),
            keepalive: keepalive.then(|| {
                (
                    Duration::from_secs(self.config.whiteboard.keepalive_s),
                    wire::KEEPALIVE,
                )
            }),
            batch: WRITE_BATCH,
        }
    }
}

/// Everything an upgrade needs once it passed every check.
struct Admitted {
    claims: Claims,
    permit: ConnectionPermit,
    session: SessionHandle,
    ws: WebSocketUpgrade,
}

async fn admit(
    app: &AppState,
    endpoint: Endpoint,
    session: &str,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Admitted, ApiError> {
    let claims = app.authorize(session, headers, query, ws.as_ref().ok())?;
    app.check_origin(headers)?;
    let ws = ws.map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let permit = app.acquire(&claims, session, endpoint)?;
    let session = app.open_session(session).await?;
    let max = app.config.limits.max_frame_bytes;
    let ws = ws
        .protocols(["easel"])
        .read_buffer_size(WS_READ_BUFFER)
        // The writer feeds a batch of frames, then flushes once: one send per batch.
        .write_buffer_size(WS_WRITE_BUFFER)
        // Frames up to twice the limit are read whole and refused with 1009 and a clean
        // close; beyond that the socket is dropped mid-frame.
        .max_message_size(max.saturating_mul(2))
        .max_frame_size(max.saturating_mul(2));
    Ok(Admitted {
        claims,
        permit,
        session,
        ws,
    })
}

pub fn user_info(claims: &Claims) -> UserInfo {
    UserInfo {
        id: claims.sub.clone(),
        name: claims.display_name().to_owned(),
        role: claims.role.as_str().to_owned(),
    }
}

async fn whiteboard_ws(
    State(app): State<Arc<AppState>>,
    Path(session): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let a = admit(&app, Endpoint::Whiteboard, &session, &headers, &query, ws).await?;
    Ok(a.ws.on_upgrade(move |socket| run_whiteboard(app, socket, a.claims, a.permit, a.session)))
}

async fn run_whiteboard(
    app: Arc<AppState>,
    socket: WebSocket,
    claims: Claims,
    permit: ConnectionPermit,
    session: SessionHandle,
) {
    let limits = &app.config.limits;
    let (conn, tx) = connection(&app, Endpoint::Whiteboard, &session, &claims, permit);
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
    socket::run(socket, conn, handler).await;
}

/// A connection's record and the sending side of its outbox: a fresh id, logged as connected.
fn connection(
    app: &AppState,
    endpoint: Endpoint,
    session: &SessionHandle,
    claims: &Claims,
    permit: ConnectionPermit,
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
        outbox: rx,
        timing: app.timing(endpoint == Endpoint::Whiteboard),
        metrics: app.metrics.endpoint(endpoint).clone(),
        shutdown: app.shutdown.clone(),
        max_frame_bytes: app.config.limits.max_frame_bytes,
    };
    (conn, tx)
}

async fn tutor_ws(
    State(app): State<Arc<AppState>>,
    Path(session): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let after_seq = match query.get("after_seq") {
        None => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::BadRequest("after_seq must be a whole number".into()))?,
        ),
    };
    let a = admit(&app, Endpoint::Tutor, &session, &headers, &query, ws).await?;
    Ok(a.ws
        .on_upgrade(move |socket| run_tutor(app, socket, a.claims, a.permit, a.session, after_seq)))
}

async fn run_tutor(
    app: Arc<AppState>,
    socket: WebSocket,
    claims: Claims,
    permit: ConnectionPermit,
    session: SessionHandle,
    after_seq: Option<u64>,
) {
    let cfg = &app.config;
    let (conn, tx) = connection(&app, Endpoint::Tutor, &session, &claims, permit);
    let user = user_info(&claims);
    if let Err(e) = session.tutor.join(
        conn.id,
        user.clone(),
        tx.clone(),
        after_seq,
        cfg.tutor.history_on_connect,
    ) {
        tracing::error!(session = %session.id, error = %e, "tutor join failed: history unreadable");
        return;
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
    };
    socket::run(socket, conn, handler).await;
}

/// Cross-origin access to the HTTP API: only from `http.allowed_origins`; with none set,
/// no cross-origin browser access at all (the demo page is served from the same origin).
fn cors(allowed: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = allowed
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
}

pub fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(http_api::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(http_api::metrics))
        .route("/api/v2/status", get(http_api::status))
        .route("/api/v2/sessions", get(http_api::list_sessions))
        .route(
            "/api/v2/session/{session}/whiteboard",
            get(http_api::get_whiteboard).post(http_api::post_whiteboard),
        )
        .route(
            "/api/v2/session/{session}/tutor/messages",
            get(http_api::get_messages).post(http_api::post_message),
        )
        .route(
            "/api/v2/session/{session}/snapshots",
            get(http_api::list_snapshots).post(http_api::take_snapshot),
        )
        .route(
            "/api/v2/session/{session}/snapshots/{version}",
            get(http_api::get_snapshot),
        )
        .route(
            "/api/v2/session/{session}/snapshots/{version}/restore",
            post(http_api::restore_snapshot),
        )
        .route("/ws/v2/session/{session}/whiteboard", get(whiteboard_ws))
        .route("/ws/v2/session/{session}", get(tutor_ws))
        .merge(crate::demo::routes())
        // A posted update may be as large as a WebSocket frame may.
        .layer(DefaultBodyLimit::max(app.config.limits.max_frame_bytes))
        .layer(cors(&app.config.http.allowed_origins))
        .layer(TraceLayer::new_for_http())
        .with_state(app)
}

/// Runs the server on `listener` until `stop` resolves, then shuts down gracefully.
pub async fn serve(
    listener: TcpListener,
    config: Arc<Config>,
    verifier: Verifier,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let (shutdown_tx, shutdown) = watch::channel(false);
    let registry = Arc::new(Registry::new(
        store.clone(),
        metrics.clone(),
        config.clone(),
    ));
    let app = Arc::new(AppState {
        caps: Arc::new(ConnectionCaps::new(
            config.limits.max_connections,
            config.limits.max_connections_per_user,
        )),
        config: config.clone(),
        verifier: Arc::new(verifier),
        registry: registry.clone(),
        metrics,
        store,
        shutdown: shutdown.clone(),
        started: Instant::now(),
    });
    let housekeeping = tokio::spawn(registry.clone().run_housekeeping(shutdown.clone()));

    let listener = listener.tap_io(|tcp| {
        // Nagle's algorithm would hold small relayed frames back by up to 40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let mut stopping = shutdown.clone();
    let server = axum::serve(listener, router(app.clone()).into_make_service())
        .with_graceful_shutdown(async move {
            socket::stopping(&mut stopping).await;
        });
    let server = tokio::spawn(async move { server.await });

    stop.await;
    // Everything below fits in `shutdown_timeout_s`, even when the disk hangs or fails:
    // half of it to let sockets close, the rest to save (SPEC 5.2, 5.4).
    let started = Instant::now();
    let deadline = Duration::from_secs(config.shutdown_timeout_s.max(1));
    let remaining = || deadline.saturating_sub(started.elapsed());
    tracing::info!("shutting down: closing connections");
    let _ = shutdown_tx.send(true);
    let drained = tokio::time::timeout(deadline / 2, async {
        while app.caps.open() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = app.caps.open(),
            "connections still open at the shutdown deadline"
        );
    }
    // Housekeeping stops at its next tick; a snapshot it is writing finishes under the
    // session's own lock, which the final save below waits on anyway.
    let _ = tokio::time::timeout(remaining().min(Duration::from_secs(1)), housekeeping).await;
    // A thread of its own, not `spawn_blocking`: a save stuck in the disk must not keep
    // the runtime (and so the process) from ending.
    let (saved, save_result) = tokio::sync::oneshot::channel();
    let registry = registry.clone();
    let store = app.store.clone();
    let spawned = std::thread::Builder::new()
        .name("easel-final-save".into())
        .spawn(move || {
            let failed = registry.snapshot_all();
            let flushed = store.close();
            let _ = saved.send((failed, flushed));
        });
    let unsaved = match spawned {
        Err(e) => Some(format!("cannot start the final save: {e}")),
        Ok(_) => match tokio::time::timeout(remaining(), save_result).await {
            Ok(Ok((failed, flushed))) => {
                let mut problems: Vec<String> = failed
                    .iter()
                    .map(|(session, e)| format!("session {session}: {e}"))
                    .collect();
                if let Err(e) = flushed {
                    tracing::error!(error = %e, "final flush failed: changes of the last moments may not be on disk");
                    problems.push(format!("final flush: {e}"));
                }
                (!problems.is_empty()).then(|| problems.join("; "))
            }
            Ok(Err(_)) => Some("the final save stopped".into()),
            Err(_) => {
                tracing::error!("the final snapshots and flush did not finish within shutdown_timeout_s: what they held may not be on disk");
                Some("the final save did not finish within shutdown_timeout_s".into())
            }
        },
    };
    server.abort();
    if let Some(unsaved) = unsaved {
        tracing::error!(%unsaved, "shutdown complete, but not everything was saved");
        return Err(ServerError::Unsaved(unsaved));
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// `/readyz`: 200 while the store can write, else 503 with the reason (SPEC 5.4).
async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    use axum::response::IntoResponse;
    match app.store.check() {
        Ok(()) => (axum::http::StatusCode::OK, "ready").into_response(),
        Err(e) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("storage unavailable: {e}"),
        )
            .into_response(),
    }
}
