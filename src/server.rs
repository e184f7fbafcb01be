//! The HTTP server: the router, our own accept loop (`serve_http`) and graceful
//! shutdown ([`serve`]).
//!
//! The router binds every path (SPEC.md 6 and the two WebSocket endpoints) to its handler
//! in one place: the handlers live in `http` (one file per route group) and `ws::upgrade`,
//! and the state they share in `app`. Assembling the router here rather than in
//! `http::routes()` keeps `http` free of `app` imports it would otherwise need only for the
//! router's state type, and shows the whole surface, HTTP and WebSocket, in one table.
//!
//! Shutdown: stop accepting, close every socket with 1012, wait until every connection's
//! drain guard is dropped (`ws::DrainGuard`), snapshot, flush, and return, all within
//! `shutdown_timeout_s` even when the disk fails or hangs; what could not be saved is
//! logged and returned as [`ServerError::Unsaved`] (a non-zero exit). `/readyz` answers
//! 503 with the store's reason while it cannot write.
//!
//! Hostile clients (SPEC.md 7.1): connections are served by our own accept loop
//! (`serve_http`) so that request headers have a deadline (`limits.http_timeout_s`, which
//! axum's `serve` cannot set); the open-file limit is raised to its hard limit at start;
//! request spans log the path, never the query string (it may hold `?token=`).
//!
//! Must not hold handler logic or admission checks: those are `http`'s, `ws`'s and `app`'s.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Method};
use axum::routing::{get, patch, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::app::{AppState, RequestLimits};
use crate::auth::Verifier;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::http::{self, health, moderation, sessions, snapshots, tutor, whiteboard};
use crate::limits::ConnectionCaps;
use crate::metrics::Metrics;
use crate::session::Registry;
use crate::store::{RedisStore, Store};
use crate::ws;

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

/// Listens on `addr` with a backlog of `backlog` connections (`limits.listen_backlog`,
/// default 1,024) and `SO_REUSEADDR`, as `TcpListener::bind` sets it, so that a restarted
/// server gets its port back while old sockets linger. Must be called within a tokio
/// runtime.
///
/// Why not `TcpListener::bind`: it asks for a backlog of 128 (read with `ss -ltn`). A class
/// that opens one link together is a burst of a few hundred handshakes; in scenario f's
/// storm of 150 joiners the kernel dropped the SYNs past 128 (`TcpExtListenOverflows`), each
/// dropped client retrying only after 1 s, then 3 s (BENCHMARKS.md, nineteenth round).
/// Linux caps the backlog at `net.core.somaxconn` (4096 by default since 5.4); Node's and
/// nginx's default is 511. Overflows are counted by the kernel (`nstat`), not here.
pub fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener, ServerError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    listen().map_err(|source| ServerError::Bind { addr, source })
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
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/api/v2/status", get(health::status))
        .route("/api/v2/sessions", get(sessions::list_sessions))
        .route(
            "/api/v2/session/{session}/whiteboard",
            get(whiteboard::get_whiteboard).post(whiteboard::post_whiteboard),
        )
        .route(
            "/api/v2/session/{session}/tutor/messages",
            get(tutor::get_messages).post(tutor::post_message),
        )
        .route(
            "/api/v2/session/{session}/tutor/messages/{seq}",
            patch(moderation::patch_message).delete(moderation::delete_message),
        )
        .route(
            "/api/v2/session/{session}/tutor/moderation",
            post(moderation::post_moderation),
        )
        .route(
            "/api/v2/session/{session}/snapshots",
            get(snapshots::list_snapshots).post(snapshots::take_snapshot),
        )
        .route(
            "/api/v2/session/{session}/snapshots/{version}",
            get(snapshots::get_snapshot),
        )
        .route(
            "/api/v2/session/{session}/snapshots/{version}/restore",
            post(snapshots::restore_snapshot),
        )
        .route(
            "/api/v2/session/{session}/student-link",
            post(sessions::student_link),
        )
        .route("/ws/v2/session/{session}/whiteboard", get(ws::upgrade::whiteboard_ws))
        .route("/ws/v2/session/{session}", get(ws::upgrade::tutor_ws))
        .merge(crate::demo::routes())
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
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
/// `cluster_store`: in cluster mode, the same store as `store`, with the Redis-only API
/// the node runtime uses (SPEC 9); `None` on a single node.
pub async fn serve(
    listener: TcpListener,
    config: Arc<Config>,
    verifier: Verifier,
    store: Arc<dyn Store>,
    cluster_store: Option<Arc<RedisStore>>,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let (shutdown_tx, shutdown) = watch::channel(false);
    // The one strong sender kept here; each connection holds a clone (`ws::DrainGuard`).
    let (drain_tx, mut drained_rx) = mpsc::channel::<()>(1);
    // Cluster mode: the node runtime (stream reader, publisher, watch) and a registry
    // whose sessions tell the other nodes what their connections do.
    let cluster = cluster_store.map(|redis| Cluster::start(redis, metrics.clone()));
    let registry = Arc::new(match &cluster {
        Some(cluster) => Registry::with_bus(
            store.clone(),
            metrics.clone(),
            config.clone(),
            cluster.clone(),
        ),
        None => Registry::new(store.clone(), metrics.clone(), config.clone()),
    });
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
        cluster: cluster.clone(),
        shutdown: shutdown.clone(),
        started: Instant::now(),
        refusals: crate::refusal_log::RefusalLog::new(crate::refusal_log::WINDOW),
        drain: drain_tx.downgrade(),
    });
    let housekeeping = tokio::spawn(registry.clone().run_housekeeping(shutdown.clone()));

    let mut stopping = shutdown.clone();
    let server = serve_http(listener, router(app.clone()), app.clone(), async move {
        ws::stopping(&mut stopping).await;
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
    // `recv()` returns `None` once the last connection dropped its guard: no polling.
    drop(drain_tx);
    let drained = tokio::time::timeout(deadline / 2, drained_rx.recv()).await;
    if drained.is_err() {
        tracing::warn!(
            open = app.caps.open(),
            "connections still open at the shutdown deadline"
        );
    }
    // Housekeeping stops at its next tick; a snapshot it is writing finishes under the
    // session's own lock, which the final save below waits on anyway.
    let _ = tokio::time::timeout(remaining().min(Duration::from_secs(1)), housekeeping).await;
    if let Some(cluster) = &cluster {
        // The other nodes hear that this node's users left (the presence the closed
        // connections published); a node leaving hands nothing else over (SPEC 9).
        let cluster = cluster.clone();
        let budget = remaining().min(Duration::from_secs(2));
        let _ = tokio::task::spawn_blocking(move || cluster.stop(budget)).await;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of handshakes larger than the 128 that `TcpListener::bind` asks for all
    /// complete while nothing accepts: the kernel holds them for `accept`, none waits for
    /// a SYN retransmitted a second later.
    #[tokio::test]
    async fn a_burst_past_128_handshakes_completes_before_any_accept() {
        let backlog = Config::default().limits.listen_backlog;
        let listener =
            bind(SocketAddr::from(([127, 0, 0, 1], 0)), backlog).expect("bind on loopback");
        let addr = listener.local_addr().expect("a bound address");
        // Linux caps the backlog at `net.core.somaxconn` (128 before 5.4): past it the
        // burst would measure the machine's setting, not ours.
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        let burst = 300.min(somaxconn);
        if burst < 300 {
            eprintln!("net.core.somaxconn is {somaxconn}: a burst of {burst} only");
        }
        let mut connects = tokio::task::JoinSet::new();
        for _ in 0..burst {
            connects.spawn(tokio::time::timeout(
                Duration::from_millis(900),
                tokio::net::TcpStream::connect(addr),
            ));
        }
        let mut streams = Vec::new();
        let mut late = 0;
        while let Some(joined) = connects.join_next().await {
            match joined.expect("a connect task") {
                Ok(Ok(stream)) => streams.push(stream),
                Ok(Err(e)) => panic!("connect failed: {e}"),
                Err(_) => late += 1,
            }
        }
        assert_eq!(late, 0, "handshakes not completed within 0.9 s");
        assert_eq!(streams.len(), burst);
        // Every one of them is there to accept.
        for _ in 0..burst {
            tokio::time::timeout(Duration::from_secs(5), listener.accept())
                .await
                .expect("a queued connection")
                .expect("accept");
        }
    }

    #[tokio::test]
    async fn an_address_in_use_is_a_bind_error_naming_it() {
        let first = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 16).expect("bind on loopback");
        let addr = first.local_addr().expect("a bound address");
        match bind(addr, 16) {
            Err(e @ ServerError::Bind { .. }) => {
                assert!(e.to_string().contains(&addr.to_string()), "{e}")
            }
            other => panic!("expected a bind error, got {other:?}"),
        }
    }
}
