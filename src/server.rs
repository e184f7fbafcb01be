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
//!
//! Hostile clients (SPEC.md 7.1): connections are served by our own accept loop
//! ([`serve_http`]) so that request headers have a deadline (`limits.http_timeout_s`, which
//! axum's `serve` cannot set); the open-file limit is raised to its hard limit at start;
//! a user's connections are capped across sessions and the sessions a user brings into
//! memory are metered ([`RequestLimits`]); request spans log the path, never the query
//! string (it may hold `?token=`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::response::Response;
use axum::routing::{get, patch, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::auth::{bearer_from_subprotocols, Claims, Verifier};
use crate::config::Config;
use crate::http_api::{self, ApiError, ApiPath};
use crate::http_moderation;
use crate::limits::{
    CapError, ConnectionCaps, ConnectionPermit, LongPollCaps, LongPollPermit, NewSessionRate,
    Strikes, TokenBucket,
};
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
    pub requests: RequestLimits,
    pub store: Arc<dyn Store>,
    pub shutdown: watch::Receiver<bool>,
    pub started: Instant,
    /// Refused tokens, logged once and then summarised (a stale tab retries forever).
    pub refusals: crate::refusal_log::RefusalLog,
}

/// The per-user limits of SPEC.md 7.1 that are not connection counts: long polls held
/// and sessions brought into memory.
pub struct RequestLimits {
    long_polls: Arc<LongPollCaps>,
    new_sessions: NewSessionRate,
    /// Sessions this server has opened, as weak references to their id (the `Arc<str>`
    /// the registry's entry and its session share): one that still upgrades is loaded.
    /// Every open goes through [`AppState::open_session`], so this sees every load
    /// without a lookup into the registry's map.
    opened: Mutex<OpenedSessions>,
}

struct OpenedSessions {
    ids: HashMap<String, Weak<str>>,
    /// Size at which dead entries are next swept out (amortised: doubles with the map).
    sweep_at: usize,
}

/// Entries kept before the first sweep of [`OpenedSessions`].
const OPENED_SWEEP_MIN: usize = 1024;

impl RequestLimits {
    pub fn new(limits: &crate::config::LimitsConfig) -> Self {
        Self {
            long_polls: Arc::new(LongPollCaps::new(
                limits.max_long_polls,
                limits.max_long_polls_per_user,
            )),
            new_sessions: NewSessionRate::new(limits.max_new_sessions_per_user_per_minute),
            opened: Mutex::new(OpenedSessions {
                ids: HashMap::new(),
                sweep_at: OPENED_SWEEP_MIN,
            }),
        }
    }

    /// Long polls held now (for `/api/v2/status`).
    pub fn long_polls_held(&self) -> usize {
        self.long_polls.held()
    }

    fn opened(&self) -> std::sync::MutexGuard<'_, OpenedSessions> {
        self.opened.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `session` is in memory now (its session value still lives).
    fn is_loaded(&self, session: &str) -> bool {
        self.opened()
            .ids
            .get(session)
            .is_some_and(|w| w.strong_count() > 0)
    }

    fn remember(&self, handle: &SessionHandle) {
        let mut opened = self.opened();
        opened
            .ids
            .insert(handle.id.to_string(), Arc::downgrade(&handle.id));
        if opened.ids.len() >= opened.sweep_at {
            opened.ids.retain(|_, w| w.strong_count() > 0);
            opened.sweep_at = (opened.ids.len() * 2).max(OPENED_SWEEP_MIN);
        }
    }
}

impl AppState {
    /// Why the store cannot take writes now, if it cannot (SPEC 5.4: `/readyz` says so).
    pub fn store_unready(&self) -> Option<String> {
        self.store.check().err().map(|e| e.to_string())
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
            self.metrics.auth_failure("bad_session_id");
            tracing::info!(reason = "bad_session_id", "request refused");
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
            // A stale tab retries every few seconds: logged once, then a summary a minute.
            self.refusals.refused(token, session, e.reason());
            ApiError::Unauthorized(e.to_string())
        })?;
        if !claims.sid.covers(session) {
            self.metrics.auth_failure("wrong_session");
            self.refusals.refused(token, session, "wrong_session");
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
                self.metrics.auth_failure("origin");
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
        &self,
        claims: &Claims,
        session: &str,
        e: Endpoint,
    ) -> Result<ConnectionPermit, ApiError> {
        self.caps.acquire(&claims.sub, session, e).map_err(|err| {
            self.metrics.auth_failure(err.reason());
            tracing::info!(%session, user = %claims.sub, reason = err.reason(), "upgrade refused");
            match err {
                CapError::PerUser | CapError::PerUserTotal => {
                    ApiError::TooManyConnections(err.to_string())
                }
                CapError::Total => ApiError::Unavailable(err.to_string()),
            }
        })
    }

    /// A place for one more long poll of this user (SPEC.md 7.1), or `429`.
    pub fn long_poll(&self, claims: &Claims, session: &str) -> Result<LongPollPermit, ApiError> {
        self.requests
            .long_polls
            .acquire(&claims.sub)
            .map_err(|err| {
                self.metrics.limit_refused(err.reason());
                tracing::info!(%session, user = %claims.sub, reason = err.reason(), "long poll refused");
                ApiError::TooManyRequests("too_many_long_polls", err.to_string())
            })
    }

    /// Opens a session for the user of `claims`, off the async threads (loading may read
    /// the disk). A session not in memory costs the user one of their
    /// `limits.max_new_sessions_per_user_per_minute`; with none left, `429` and nothing
    /// is loaded.
    pub async fn open_session(
        &self,
        claims: &Claims,
        session: &str,
    ) -> Result<SessionHandle, ApiError> {
        if !self.requests.is_loaded(session) && !self.requests.new_sessions.try_take(&claims.sub) {
            self.metrics.limit_refused("new_sessions_per_user");
            tracing::info!(%session, user = %claims.sub, reason = "new_sessions_per_user", "request refused");
            return Err(ApiError::TooManyRequests(
                "too_many_new_sessions",
                "this user opened too many new sessions in the last minute".into(),
            ));
        }
        let registry = self.registry.clone();
        let id = session.to_owned();
        let handle = tokio::task::spawn_blocking(move || registry.open(&id))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| {
                tracing::error!(%session, error = %e, "session could not be loaded");
                ApiError::Unavailable("the session could not be loaded".into())
            })?;
        self.requests.remember(&handle);
        // A user removed from the session (SPEC 4.1) is refused everything in it, on
        // both endpoints and over HTTP, until the ban ends.
        if let Some(until) = handle.tutor.banned_until(&claims.sub) {
            tracing::info!(%session, user = %claims.sub, reason = "removed", "request refused");
            return Err(ApiError::Forbidden(format!(
                "you were removed from this session; try again after {until}"
            )));
        }
        Ok(handle)
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
    let session = app.open_session(&claims, session).await?;
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
    ApiPath(session): ApiPath<String>,
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
        removed: session.tutor.removals(),
    };
    (conn, tx)
}

async fn tutor_ws(
    State(app): State<Arc<AppState>>,
    ApiPath(session): ApiPath<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // The token first: a client without one is told 401, whatever else it sent.
    let a = admit(&app, Endpoint::Tutor, &session, &headers, &query, ws).await?;
    let after_seq = match query.get("after_seq") {
        None => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::BadRequest("after_seq must be a whole number".into()))?,
        ),
    };
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
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
}

pub fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(http_api::healthz))
        .route("/readyz", get(http_api::readyz))
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
            "/api/v2/session/{session}/tutor/messages/{seq}",
            patch(http_moderation::patch_message).delete(http_moderation::delete_message),
        )
        .route(
            "/api/v2/session/{session}/tutor/moderation",
            post(http_moderation::post_moderation),
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
        .route(
            "/api/v2/session/{session}/student-link",
            post(http_api::student_link),
        )
        .route("/ws/v2/session/{session}/whiteboard", get(whiteboard_ws))
        .route("/ws/v2/session/{session}", get(tutor_ws))
        .merge(crate::demo::routes())
        .fallback(http_api::not_found)
        .method_not_allowed_fallback(http_api::method_not_allowed)
        // A posted update may be as large as a WebSocket frame may.
        .layer(DefaultBodyLimit::max(app.config.limits.max_frame_bytes))
        .layer(cors(&app.config.http.allowed_origins))
        // The span names the path only: the query string may hold `?token=` (SPEC.md 7).
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &axum::extract::Request| {
                tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
            }),
        )
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
            config.limits.max_connections_per_user_total,
        )),
        requests: RequestLimits::new(&config.limits),
        config: config.clone(),
        verifier: Arc::new(verifier),
        registry: registry.clone(),
        metrics,
        store,
        shutdown: shutdown.clone(),
        started: Instant::now(),
        refusals: crate::refusal_log::RefusalLog::new(crate::refusal_log::WINDOW),
    });
    let housekeeping = tokio::spawn(registry.clone().run_housekeeping(shutdown.clone()));

    let mut stopping = shutdown.clone();
    let server = serve_http(listener, router(app.clone()), app.clone(), async move {
        socket::stopping(&mut stopping).await;
    });
    let server = tokio::spawn(server);

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
    app.refusals.flush();
    if let Some(unsaved) = unsaved {
        tracing::error!(%unsaved, "shutdown complete, but not everything was saved");
        return Err(ServerError::Unsaved(unsaved));
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// Raises this process's open-file soft limit to its hard limit (SPEC.md 7.1): every
/// WebSocket and long poll holds a descriptor, and a default soft limit of 1024 would let
/// a few hundred clients lock out `/healthz` and every new connection.
fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
            return;
        }
        if limit.rlim_cur >= limit.rlim_max {
            tracing::info!(open_files = limit.rlim_cur, "open-file limit");
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::info!(
                from = limit.rlim_cur,
                to = raised.rlim_cur,
                "open-file limit raised"
            );
        } else {
            tracing::warn!(
                soft = limit.rlim_cur,
                hard = limit.rlim_max,
                error = %std::io::Error::last_os_error(),
                "cannot raise the open-file limit"
            );
        }
    }
}

/// Errors of `accept` that concern one connection only (the next accept may succeed).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionRefused | K::ConnectionAborted | K::ConnectionReset
    )
}

/// Serves HTTP/1.1 and WebSocket upgrades on `listener` until `stop` resolves, then stops
/// accepting, lets every connection finish its current request (hyper's graceful
/// shutdown; upgraded sockets are closed by their own tasks) and returns once all are done.
///
/// Our own loop rather than `axum::serve`, which gives hyper no timer: without one, a
/// client that sends its headers one byte a minute (or none at all) holds its socket
/// forever. Here a request's headers must arrive within `limits.http_timeout_s` (bodies
/// are bounded by the handlers that read them), and a failing `accept` (out of file
/// descriptors) is retried rather than ending the server.
async fn serve_http(
    listener: TcpListener,
    router: Router,
    app: Arc<AppState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    raise_open_file_limit();
    let header_timeout = Duration::from_secs(app.config.limits.http_timeout_s);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a receiver; `closed()` resolves when the last is gone.
    let (done_tx, done_rx) = watch::channel(());
    let mut stop = pin!(stop);
    loop {
        let (tcp, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // EMFILE and friends: back off briefly, as hyper's examples do, so a
                    // full descriptor table does not spin this loop.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        // Nagle's algorithm would hold small relayed frames back by up to 40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        let mut stopping = stop_rx.clone();
        let done = done_rx.clone();
        let metrics = app.metrics.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let mut conn = pin!(builder
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades());
            let mut shutting_down = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            if e.is_timeout() {
                                metrics.limit_refused("http_timeout");
                                tracing::info!(reason = "http_timeout", "connection closed: request headers too slow");
                            } else {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        }
                        break;
                    }
                    _ = stopping.changed(), if !shutting_down => {
                        shutting_down = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(done);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_rx);
    done_tx.closed().await;
}
