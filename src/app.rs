//! What every handler shares: [`AppState`] (configuration, registry, verifier, metrics,
//! caps, store, the shutdown signal) and the checks every route and upgrade makes with it:
//! the token and its scope ([`AppState::authorize`]), the long-poll caps, and opening a
//! session under the per-user new-session rate.
//!
//! Both `http` (plain routes) and `ws::upgrade` (WebSocket upgrades) take their state from
//! here; this module imports neither of them back, only `http`'s error type, so there is
//! no import cycle. It must not touch sockets, routes or the accept loop (`server`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use crate::ws::socket::Upgrade as WebSocketUpgrade;
use axum::http::{header, HeaderMap};
use tokio::sync::{mpsc, watch};

use crate::auth::{bearer_from_subprotocols, Claims, Verifier};
use crate::config::Config;
use crate::http::ApiError;
use crate::limits::{ConnectionCaps, LongPollCaps, LongPollPermit, NewSessionRate};
use crate::metrics::Metrics;
use crate::protocol::tutor::UserInfo;
use crate::session::{valid_session_id, Registry, SessionHandle};
use crate::store::Store;
use crate::sync;

/// State shared by every handler.
pub struct AppState {
    pub config: Arc<Config>,
    pub verifier: Arc<Verifier>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub caps: Arc<ConnectionCaps>,
    pub requests: RequestLimits,
    pub store: Arc<dyn Store>,
    /// Cluster mode (SPEC 9): this node's runtime over the Redis store behind `store`
    /// (built from `easel serve`'s one `RedisStore`, `cli/serve.rs`); `None` on a single
    /// node on sled.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    pub shutdown: watch::Receiver<bool>,
    pub started: Instant,
    /// Refused tokens, logged once and then summarised (a stale tab retries forever).
    pub refusals: crate::refusal_log::RefusalLog,
    /// Every WebSocket connection holds a strong sender made from this for as long as it
    /// lives; shutdown drops the one strong sender it kept and waits until `recv()` says
    /// the last is gone (tokio's mini-redis does the same).
    pub drain: mpsc::WeakSender<()>,
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
        sync::lock(&self.opened)
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
        // In cluster mode the node's watch pings Redis every second: asking here would be a
        // network round trip on an async worker.
        if let Some(cluster) = &self.cluster {
            return (!cluster.is_healthy()).then(|| "Redis unreachable".to_owned());
        }
        self.store.check().err().map(|e| e.to_string())
    }

    /// The token of a request: `Authorization: Bearer`, then the `bearer.<jwt>`
    /// subprotocol, then `?token=`.
    pub(crate) fn token<'a>(
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
            .or_else(|| ws.and_then(|ws| bearer_from_subprotocols(ws.requested_protocols())))
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
        // Single flight, on the blocking pool (see `Registry::open_shared`).
        let handle = self.registry.open_shared(session).await.map_err(|e| {
            tracing::error!(%session, error = %e, "session could not be loaded");
            ApiError::Unavailable("the session could not be loaded".into())
        })?;
        self.requests.remember(&handle);
        // A user removed from the session (SPEC 4.1) is refused everything in it, on
        // both endpoints and over HTTP, until the ban ends.
        if let Some(until) = handle.tutor.banned_until(&claims.sub, claims.role) {
            tracing::info!(%session, user = %claims.sub, reason = "removed", "request refused");
            return Err(ApiError::Removed(format!(
                "you were removed from this session; try again after {until}"
            )));
        }
        Ok(handle)
    }

    /// `403` for a user removed from `session` whose ban still runs, for the session routes
    /// that read the store without opening the session (snapshot reads, student links):
    /// without it a removed user could still read the whiteboard, or a removed tutor mint
    /// a student token under a fresh id and come back. Reads the moderation records from
    /// the store, which has every record before the room does.
    pub async fn refuse_removed(&self, claims: &Claims, session: &str) -> Result<(), ApiError> {
        let store = self.store.clone();
        let (id, user) = (session.to_owned(), claims.sub.clone());
        let record = tokio::task::spawn_blocking(move || store.moderation(&id))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(crate::http::storage)?
            .into_iter()
            .find(|r| r.user == user);
        let now = crate::session::tutor::now_ms();
        match record
            .filter(|r| r.banned_for(now, claims.role == crate::auth::Role::Admin))
            .and_then(|r| r.banned_until_ms)
        {
            Some(until) => {
                tracing::info!(%session, user = %claims.sub, reason = "removed", "request refused");
                Err(ApiError::Removed(format!(
                    "you were removed from this session; try again after {}",
                    crate::http::rfc3339_ms(until)
                )))
            }
            None => Ok(()),
        }
    }
}

/// Who a token speaks for, as the tutor protocol names its users.
pub fn user_info(claims: &Claims) -> UserInfo {
    UserInfo {
        id: claims.sub.clone(),
        name: claims.display_name().to_owned(),
        role: claims.role.as_str().to_owned(),
    }
}
