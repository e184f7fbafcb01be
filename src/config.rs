//! Settings: defaults, then an optional TOML file, then `EASEL_*` environment variables,
//! then command-line flags (applied by `main`).
//!
//! This module owns the shape of the configuration and its validation; it reads files and
//! the environment but never starts anything. Every key has a default (SPEC.md's), an
//! unknown key or a bad value is an error that names it, and the result is an immutable
//! [`Config`] that the rest of the server shares behind an `Arc`.
//!
//! Over 600 lines on purpose (a third of it tests): every key's type, its default and its
//! bounds in [`Config::validate`] are read together, as one table of the configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Shortest HMAC secret accepted: HS256's key should be at least as long as its output
/// (RFC 7518 3.2), and a short one ("dev", "secret") is guessed offline from one token.
/// Here rather than in `auth`, which re-exports it: `validate` checks it, and `auth`
/// already depends on this module.
pub const MIN_SECRET_BYTES: usize = 32;

/// Why a configuration could not be built. Each variant names the offending key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: &'static str, message: String },
    #[error("config key {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP and WebSocket server listens on.
    pub listen: SocketAddr,
    /// Directory of the embedded store.
    pub data_dir: PathBuf,
    /// Upper bound on a graceful shutdown, in seconds.
    pub shutdown_timeout_s: u64,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub http: HttpConfig,
    pub whiteboard: WhiteboardConfig,
    pub limits: LimitsConfig,
    pub tutor: TutorConfig,
    pub persist: PersistConfig,
    pub sessions: SessionsConfig,
    pub cluster: ClusterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./snapshots"),
            shutdown_timeout_s: 10,
            log: LogConfig::default(),
            auth: AuthConfig::default(),
            http: HttpConfig::default(),
            whiteboard: WhiteboardConfig::default(),
            limits: LimitsConfig::default(),
            tutor: TutorConfig::default(),
            persist: PersistConfig::default(),
            sessions: SessionsConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing_subscriber::EnvFilter` directive string.
    pub filter: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            format: LogFormat::Pretty,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HMAC secret (HS256/384/512). Mutually exclusive with `jwt_public_key_file`.
    pub jwt_secret: Option<String>,
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key (RSA, EC P-256 or Ed25519).
    pub jwt_public_key_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`, in seconds (default 30).
    pub leeway_s: Option<u64>,
}

impl AuthConfig {
    pub fn leeway(&self) -> u64 {
        self.leeway_s.unwrap_or(30)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// When non-empty, WebSocket upgrades and CORS requests must come from one of these.
    pub allowed_origins: Vec<String>,
}

/// The default awareness tick, in milliseconds: the longest a change waits before it is
/// relayed; a burst within it goes out as one message (SPEC 3 "coalesce bursts"; issue #13
/// allows up to 16 ms, one display frame). 4 ms: measured with the load generator, 16 ms
/// put cursors ~11 ms late at p50 in scenario b, while 4 ms kept p50 at ~1.3 ms and still
/// halved the server's CPU in a cursor-heavy session (1,500 moves/s to 100 clients).
pub const AWARENESS_TICK_MS: u64 = 4;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WhiteboardConfig {
    /// Echo updates back to their sender (the y-websocket 4 client's sync status needs it).
    pub echo_updates: bool,
    /// Send a no-op awareness message to a connection that was sent nothing for this long.
    pub keepalive_s: u64,
    /// Awareness changes within this many milliseconds of a session's last relay go out
    /// together at the tick's end (at most 16; 0 relays every change at once).
    pub awareness_tick_ms: u64,
}

impl Default for WhiteboardConfig {
    fn default() -> Self {
        Self {
            echo_updates: false,
            keepalive_s: 15,
            awareness_tick_ms: AWARENESS_TICK_MS,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_frame_bytes: usize,
    pub max_send_queue_bytes: usize,
    pub max_connections_per_user: usize,
    pub max_connections: usize,
    /// Connections the kernel completes and holds until they are accepted (the listen
    /// backlog; Linux caps it at `net.core.somaxconn`). See `server::bind`.
    pub listen_backlog: u32,
    pub whiteboard_rate: f64,
    pub whiteboard_burst: u32,
    pub tutor_rate: f64,
    pub tutor_burst: u32,
    pub ping_interval_s: u64,
    pub idle_timeout_s: u64,
    /// Deepest nesting of JSON-like values (`Any`) and of shared types in a document.
    pub max_nesting: usize,
    /// Largest whole document, encoded as a Yjs v1 update.
    pub max_doc_bytes: usize,
    /// Bytes of updates a session may hold waiting for missing blocks.
    pub max_pending_bytes: usize,
    /// Awareness client ids one connection may speak for.
    pub max_awareness_clients_per_connection: usize,
    /// Awareness client ids one session may hold.
    pub max_awareness_clients_per_session: usize,
    /// Largest awareness state of one client (its JSON text).
    pub max_awareness_state_bytes: usize,
    /// Whiteboard and tutor connections of one user across every session.
    pub max_connections_per_user_total: usize,
    /// Sessions one user may bring into memory per minute.
    pub max_new_sessions_per_user_per_minute: u32,
    /// Long polls held at once for one user, and in all.
    pub max_long_polls_per_user: usize,
    pub max_long_polls: usize,
    /// Time allowed for a request's headers and body to arrive.
    pub http_timeout_s: u64,
    /// Whether WebSocket clients may negotiate permessage-deflate (RFC 7692).
    pub permessage_deflate: bool,
    /// With permessage-deflate, messages at least this large are sent compressed; smaller
    /// ones (most updates, cursors) stay raw, where compressing costs more than it saves.
    pub deflate_threshold_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 8 * 1024 * 1024,
            max_send_queue_bytes: 16 * 1024 * 1024,
            max_connections_per_user: 8,
            max_connections: 20_000,
            listen_backlog: 1024,
            whiteboard_rate: 300.0,
            whiteboard_burst: 1000,
            tutor_rate: 20.0,
            tutor_burst: 50,
            ping_interval_s: 30,
            idle_timeout_s: 60,
            max_nesting: 64,
            max_doc_bytes: 64 * 1024 * 1024,
            max_pending_bytes: 8 * 1024 * 1024,
            max_awareness_clients_per_connection: 16,
            max_awareness_clients_per_session: 1000,
            max_awareness_state_bytes: 64 * 1024,
            max_connections_per_user_total: 64,
            max_new_sessions_per_user_per_minute: 120,
            max_long_polls_per_user: 16,
            max_long_polls: 2000,
            http_timeout_s: 30,
            permessage_deflate: true,
            // The `ws` package's default threshold: smaller messages rarely shrink enough
            // to pay for a deflate stream's setup.
            deflate_threshold_bytes: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TutorConfig {
    pub max_text_chars: usize,
    pub history_on_connect: usize,
    pub history_limit: usize,
    pub bad_message_limit: u32,
    pub bad_message_window_s: u64,
    /// Longest `client_id` of a chat message, in bytes.
    pub max_client_id_bytes: usize,
    /// Longest `event.name`, in bytes.
    pub max_event_name_bytes: usize,
    /// Largest `event.data`, as JSON text.
    pub max_event_data_bytes: usize,
    /// A history page (on connect, on `after_seq`, on request) holds at most this many
    /// messages and this many bytes of JSON.
    pub history_page_messages: usize,
    pub history_page_bytes: usize,
    /// How long a user removed from a session (SPEC 4.1) is refused there, in seconds.
    pub remove_ban_s: u64,
}

impl Default for TutorConfig {
    fn default() -> Self {
        Self {
            max_text_chars: 8000,
            history_on_connect: 50,
            history_limit: 10_000,
            bad_message_limit: 10,
            bad_message_window_s: 60,
            max_client_id_bytes: 128,
            max_event_name_bytes: 128,
            max_event_data_bytes: 64 * 1024,
            history_page_messages: 200,
            history_page_bytes: 1024 * 1024,
            remove_ban_s: 600,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Flush the log every `flush_interval_ms` (group commit).
    Batch,
    /// Flush before relaying.
    Sync,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PersistConfig {
    pub flush_interval_ms: u64,
    pub durability: Durability,
    pub snapshot_interval_s: u64,
    pub snapshot_every_updates: u64,
    pub keep_snapshots: usize,
    /// sled's page cache, in MiB (sled's own default is 1 GiB).
    pub cache_mb: u64,
}

impl Default for PersistConfig {
    fn default() -> Self {
        Self {
            flush_interval_ms: 100,
            durability: Durability::Batch,
            snapshot_interval_s: 30,
            snapshot_every_updates: 500,
            keep_snapshots: 20,
            cache_mb: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    pub idle_unload_s: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self { idle_unload_s: 60 }
    }
}

/// Cluster mode (SPEC 9): several nodes sharing their state through Redis instead of each
/// owning a sled directory. Off unless `redis_url` or `redis_cluster_nodes` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// One Redis server, `redis://host:port[/db]` (env `EASEL_REDIS_URL`, flag `--redis`).
    pub redis_url: Option<String>,
    /// The seed nodes of a Redis Cluster, instead of `redis_url`.
    pub redis_cluster_nodes: Vec<String>,
    /// This node's name in logs, metrics and Redis (env `EASEL_NODE_ID`); default: the
    /// host name and the process id.
    pub node_id: Option<String>,
    /// A client certificate (PEM, the chain) and its private key (PEM) for a Redis that
    /// asks for one (`tls-auth-clients yes`): `rediss://` only, both or neither (env
    /// `EASEL_REDIS_TLS_CERT`, `EASEL_REDIS_TLS_KEY`).
    pub redis_tls_cert: Option<PathBuf>,
    pub redis_tls_key: Option<PathBuf>,
}

impl ClusterConfig {
    /// Whether the node runs in cluster mode (on Redis, no sled).
    pub fn enabled(&self) -> bool {
        self.redis_url.is_some() || !self.redis_cluster_nodes.is_empty()
    }

    /// The configured node id, or `<host name>-<pid>`.
    pub fn node_id(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .collect();
        let host = if host.is_empty() {
            "easel".into()
        } else {
            host
        };
        format!("{host}-{}", std::process::id())
    }
}

/// Where environment variables come from; a function so tests need not touch the process env.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Defaults, overlaid with the TOML file at `path` if one is given.
    pub fn from_file(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text; the error message names the unknown key or bad value.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().to_owned())
    }

    /// Applies the `EASEL_*` variables on top of what the file said.
    pub fn apply_env(&mut self, env: EnvLookup<'_>) -> Result<(), ConfigError> {
        if let Some(v) = env("EASEL_LISTEN") {
            self.listen = v.parse().map_err(|e| ConfigError::Env {
                name: "EASEL_LISTEN",
                message: format!("{v:?} is not a socket address: {e}"),
            })?;
        }
        if let Some(v) = env("EASEL_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("EASEL_JWT_SECRET") {
            self.auth.jwt_secret = Some(v);
        }
        if let Some(v) = env("EASEL_JWT_SECRET_FILE") {
            self.auth.jwt_secret_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env("EASEL_JWT_PUBLIC_KEY_FILE") {
            self.auth.jwt_public_key_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env("EASEL_LOG") {
            self.log.filter = v;
        }
        if let Some(v) = env("EASEL_REDIS_URL").filter(|v| !v.is_empty()) {
            self.cluster.redis_url = Some(v);
        }
        if let Some(v) = env("EASEL_NODE_ID").filter(|v| !v.is_empty()) {
            self.cluster.node_id = Some(v);
        }
        if let Some(v) = env("EASEL_REDIS_TLS_CERT").filter(|v| !v.is_empty()) {
            self.cluster.redis_tls_cert = Some(PathBuf::from(v));
        }
        if let Some(v) = env("EASEL_REDIS_TLS_KEY").filter(|v| !v.is_empty()) {
            self.cluster.redis_tls_key = Some(PathBuf::from(v));
        }
        if let Some(v) = env("EASEL_PERMESSAGE_DEFLATE") {
            self.limits.permessage_deflate = match v.as_str() {
                "1" | "true" => true,
                "0" | "false" => false,
                _ => {
                    return Err(ConfigError::Env {
                        name: "EASEL_PERMESSAGE_DEFLATE",
                        message: format!("{v:?} is neither 1/true nor 0/false"),
                    })
                }
            };
        }
        if let Some(v) = env("EASEL_LOG_FORMAT") {
            self.log.format = match v.as_str() {
                "pretty" => LogFormat::Pretty,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::Env {
                        name: "EASEL_LOG_FORMAT",
                        message: format!("{v:?} is neither \"pretty\" nor \"json\""),
                    })
                }
            };
        }
        Ok(())
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn positive(key: &'static str, ok: bool) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    key,
                    message: "must be greater than zero".into(),
                })
            }
        }
        // Upper bounds: durations are added to clock readings and rates turn into
        // durations; past these, that arithmetic would overflow and panic at run time.
        fn at_most(key: &'static str, value: f64, max: f64, what: &str) -> Result<(), ConfigError> {
            if value <= max {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    key,
                    message: format!("{value} is more than {max} {what}"),
                })
            }
        }
        const DAY_S: f64 = 86_400.0;
        const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
        let (day, ms_day, size) = (
            (DAY_S, "seconds (a day)"),
            (DAY_S * 1000.0, "milliseconds (a day)"),
            (4.0 * GIB, "bytes (4 GiB)"),
        );
        let (t, l, p) = (&self.tutor, &self.limits, &self.persist);
        for (key, value, (max, what)) in [
            ("shutdown_timeout_s", self.shutdown_timeout_s as f64, day),
            (
                "whiteboard.keepalive_s",
                self.whiteboard.keepalive_s as f64,
                day,
            ),
            ("limits.ping_interval_s", l.ping_interval_s as f64, day),
            ("limits.idle_timeout_s", l.idle_timeout_s as f64, day),
            ("limits.http_timeout_s", l.http_timeout_s as f64, day),
            (
                "tutor.bad_message_window_s",
                t.bad_message_window_s as f64,
                day,
            ),
            (
                "tutor.remove_ban_s",
                t.remove_ban_s as f64,
                (DAY_S * 365.0, "seconds (a year)"),
            ),
            (
                "persist.snapshot_interval_s",
                p.snapshot_interval_s as f64,
                day,
            ),
            (
                "sessions.idle_unload_s",
                self.sessions.idle_unload_s as f64,
                day,
            ),
            (
                "persist.flush_interval_ms",
                p.flush_interval_ms as f64,
                ms_day,
            ),
            ("limits.max_frame_bytes", l.max_frame_bytes as f64, size),
            (
                "limits.deflate_threshold_bytes",
                l.deflate_threshold_bytes as f64,
                size,
            ),
            (
                "limits.max_send_queue_bytes",
                l.max_send_queue_bytes as f64,
                size,
            ),
            ("limits.max_doc_bytes", l.max_doc_bytes as f64, size),
            ("limits.max_pending_bytes", l.max_pending_bytes as f64, size),
            (
                "limits.max_awareness_state_bytes",
                l.max_awareness_state_bytes as f64,
                size,
            ),
            (
                "tutor.max_client_id_bytes",
                t.max_client_id_bytes as f64,
                size,
            ),
            (
                "tutor.max_event_name_bytes",
                t.max_event_name_bytes as f64,
                size,
            ),
            (
                "tutor.max_event_data_bytes",
                t.max_event_data_bytes as f64,
                size,
            ),
            (
                "tutor.history_page_bytes",
                t.history_page_bytes as f64,
                size,
            ),
        ] {
            at_most(key, value, max, what)?;
        }
        for (key, rate) in [
            ("limits.whiteboard_rate", l.whiteboard_rate),
            ("limits.tutor_rate", l.tutor_rate),
        ] {
            // A token a day at the slowest; a rate is per second.
            if !(rate.is_finite() && rate >= 1.0 / DAY_S) {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("{rate} is not a rate of at least one per day (1.2e-5)"),
                });
            }
        }
        let l = &self.limits;
        positive("limits.max_frame_bytes", l.max_frame_bytes > 0)?;
        positive("limits.max_send_queue_bytes", l.max_send_queue_bytes > 0)?;
        positive(
            "limits.max_connections_per_user",
            l.max_connections_per_user > 0,
        )?;
        positive("limits.max_connections", l.max_connections > 0)?;
        positive("limits.listen_backlog", l.listen_backlog > 0)?;
        positive("limits.whiteboard_rate", l.whiteboard_rate > 0.0)?;
        positive("limits.whiteboard_burst", l.whiteboard_burst > 0)?;
        positive("limits.tutor_rate", l.tutor_rate > 0.0)?;
        positive("limits.tutor_burst", l.tutor_burst > 0)?;
        positive("limits.ping_interval_s", l.ping_interval_s > 0)?;
        positive("limits.idle_timeout_s", l.idle_timeout_s > 0)?;
        positive("limits.max_nesting", l.max_nesting > 0)?;
        if l.max_nesting > crate::doc::guard::SAFE_NESTING {
            return Err(ConfigError::Invalid {
                key: "limits.max_nesting",
                message: format!(
                    "{} is deeper than the {} levels a decoder's stack is safe for",
                    l.max_nesting,
                    crate::doc::guard::SAFE_NESTING
                ),
            });
        }
        positive("limits.max_doc_bytes", l.max_doc_bytes > 0)?;
        positive("limits.max_pending_bytes", l.max_pending_bytes > 0)?;
        positive(
            "limits.max_awareness_clients_per_connection",
            l.max_awareness_clients_per_connection > 0,
        )?;
        positive(
            "limits.max_awareness_clients_per_session",
            l.max_awareness_clients_per_session > 0,
        )?;
        positive(
            "limits.max_awareness_state_bytes",
            l.max_awareness_state_bytes > 0,
        )?;
        positive(
            "limits.max_connections_per_user_total",
            l.max_connections_per_user_total > 0,
        )?;
        positive(
            "limits.max_new_sessions_per_user_per_minute",
            l.max_new_sessions_per_user_per_minute > 0,
        )?;
        positive(
            "limits.max_long_polls_per_user",
            l.max_long_polls_per_user > 0,
        )?;
        positive("limits.max_long_polls", l.max_long_polls > 0)?;
        positive("limits.http_timeout_s", l.http_timeout_s > 0)?;
        positive(
            "tutor.history_page_messages",
            self.tutor.history_page_messages > 0,
        )?;
        positive(
            "tutor.history_page_bytes",
            self.tutor.history_page_bytes > 0,
        )?;
        positive("persist.cache_mb", self.persist.cache_mb > 0)?;
        positive("whiteboard.keepalive_s", self.whiteboard.keepalive_s > 0)?;
        // One display frame: longer would make cursors visibly lag (SPEC.md 3).
        at_most(
            "whiteboard.awareness_tick_ms",
            self.whiteboard.awareness_tick_ms as f64,
            16.0,
            "milliseconds (one display frame)",
        )?;
        positive("tutor.max_text_chars", self.tutor.max_text_chars > 0)?;
        positive("tutor.history_limit", self.tutor.history_limit > 0)?;
        positive("tutor.bad_message_limit", self.tutor.bad_message_limit > 0)?;
        positive(
            "persist.flush_interval_ms",
            self.persist.flush_interval_ms > 0,
        )?;
        positive("persist.keep_snapshots", self.persist.keep_snapshots > 0)?;
        for origin in &self.http.allowed_origins {
            let scheme_ok = origin.starts_with("http://") || origin.starts_with("https://");
            if !scheme_ok || origin.ends_with('/') || origin.chars().any(char::is_whitespace) {
                return Err(ConfigError::Invalid {
                    key: "http.allowed_origins",
                    message: format!(
                        "{origin:?} is not an origin like \"https://app.example.com\""
                    ),
                });
            }
        }
        self.validate_cluster()?;
        let a = &self.auth;
        let keys = [
            a.jwt_secret.is_some(),
            a.jwt_secret_file.is_some(),
            a.jwt_public_key_file.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() > 1 {
            return Err(ConfigError::Invalid {
                key: "auth",
                message: "set only one of jwt_secret, jwt_secret_file, jwt_public_key_file".into(),
            });
        }
        if matches!(&a.jwt_secret, Some(s) if s.is_empty()) {
            return Err(ConfigError::Invalid {
                key: "auth.jwt_secret",
                message: "must not be empty".into(),
            });
        }
        // SPEC 7.1: a short HMAC secret is brute-forced offline from a single token.
        if let Some(s) = &a.jwt_secret {
            if s.len() < MIN_SECRET_BYTES {
                return Err(ConfigError::Invalid {
                    key: "auth.jwt_secret",
                    message: format!(
                        "the secret (from the config file or EASEL_JWT_SECRET) is {} bytes long; HMAC secrets must be at least {} bytes (e.g. `openssl rand -base64 48`)",
                        s.len(),
                        MIN_SECRET_BYTES
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Config {
    /// `[cluster]`: Redis URLs with their scheme, one way to reach Redis, a usable node id.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        let redis_url = |key: &'static str, url: &str| {
            if url.starts_with("redis://") || url.starts_with("rediss://") {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    key,
                    message: format!(
                        "{url:?} is not a Redis URL: it must start with redis:// or rediss:// \
                         (e.g. redis://127.0.0.1:6379)"
                    ),
                })
            }
        };
        if let Some(url) = &c.redis_url {
            redis_url("cluster.redis_url", url)?;
            if !c.redis_cluster_nodes.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "cluster",
                    message: "set redis_url (one Redis) or redis_cluster_nodes (a Redis Cluster), not both".into(),
                });
            }
        }
        for url in &c.redis_cluster_nodes {
            redis_url("cluster.redis_cluster_nodes", url)?;
        }
        match (&c.redis_tls_cert, &c.redis_tls_key) {
            (None, None) => {}
            (Some(_), Some(_)) => {
                let plain = c
                    .redis_url
                    .iter()
                    .chain(&c.redis_cluster_nodes)
                    .any(|url| !url.starts_with("rediss://"));
                if plain || !self.cluster.enabled() {
                    return Err(ConfigError::Invalid {
                        key: "cluster.redis_tls_cert",
                        message: "a client certificate is for rediss:// only: name Redis with rediss:// URLs".into(),
                    });
                }
            }
            _ => return Err(ConfigError::Invalid {
                key: "cluster.redis_tls_cert",
                message:
                    "set redis_tls_cert and redis_tls_key together (the certificate and its key)"
                        .into(),
            }),
        }
        if let Some(id) = &c.node_id {
            let ok = (1..=128).contains(&id.len()) && id.chars().all(|ch| ch.is_ascii_graphic());
            if !ok {
                return Err(ConfigError::Invalid {
                    key: "cluster.node_id",
                    message: format!("{id:?}: 1 to 128 printable ASCII characters, no spaces"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_keys_env_and_validation() {
        let mut c = Config::from_toml(
            "[cluster]\nredis_url = \"redis://127.0.0.1:6379\"\nnode_id = \"a\"\n",
        )
        .unwrap();
        assert!(c.cluster.enabled());
        assert_eq!(c.cluster.node_id(), "a");
        c.validate().unwrap();
        c.apply_env(&|k| match k {
            "EASEL_REDIS_URL" => Some("http://x".into()),
            "EASEL_NODE_ID" => Some("b".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.cluster.node_id(), "b");
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("cluster.redis_url") && err.contains("redis://"),
            "{err}"
        );

        let both = Config::from_toml(
            "[cluster]\nredis_url = \"redis://a\"\nredis_cluster_nodes = [\"redis://b\"]\n",
        )
        .unwrap();
        assert!(both.validate().is_err());
        let off = Config::default();
        assert!(!off.cluster.enabled());
        assert!(off
            .cluster
            .node_id()
            .ends_with(&format!("-{}", std::process::id())));
    }

    #[test]
    fn a_redis_client_certificate_needs_its_key_and_rediss() {
        let tls = "[cluster]\nredis_url = \"rediss://127.0.0.1:6380\"\n";
        let mut c = Config::from_toml(tls).unwrap();
        c.apply_env(&|k| match k {
            "EASEL_REDIS_TLS_CERT" => Some("/etc/easel/node.crt".into()),
            _ => None,
        })
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("together"), "{err}");
        c.apply_env(&|k| match k {
            "EASEL_REDIS_TLS_KEY" => Some("/etc/easel/node.key".into()),
            _ => None,
        })
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.cluster.redis_tls_key.as_deref(),
            Some(Path::new("/etc/easel/node.key"))
        );

        let plain = "[cluster]\nredis_url = \"redis://127.0.0.1:6379\"\nredis_tls_cert = \"a.crt\"\nredis_tls_key = \"a.key\"\n";
        let err = Config::from_toml(plain)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("rediss://"), "{err}");
        let off = "[cluster]\nredis_tls_cert = \"a.crt\"\nredis_tls_key = \"a.key\"\n";
        assert!(Config::from_toml(off).unwrap().validate().is_err());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[limits]\nmax_frame_byte = 3\n").unwrap_err();
        assert!(err.contains("max_frame_byte"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = Config::from_toml("[persist]\ndurability = \"sometimes\"\n").unwrap_err();
        assert!(
            err.contains("durability") || err.contains("sometimes"),
            "{err}"
        );
    }

    #[test]
    fn env_overrides_file() {
        let mut c = Config::from_toml("listen = \"127.0.0.1:1\"\n").unwrap();
        c.apply_env(&|k| (k == "EASEL_LISTEN").then(|| "127.0.0.1:2".to_string()))
            .unwrap();
        assert_eq!(c.listen.port(), 2);
        let err = c
            .apply_env(&|k| (k == "EASEL_LOG_FORMAT").then(|| "xml".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("EASEL_LOG_FORMAT"));
    }

    #[test]
    fn short_secret_is_rejected_with_its_key() {
        let c = Config::from_toml("[auth]\njwt_secret = \"dev\"\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("auth.jwt_secret") && err.contains("32"),
            "{err}"
        );
        let c =
            Config::from_toml(&format!("[auth]\njwt_secret = \"{}\"\n", "k".repeat(32))).unwrap();
        assert!(c.validate().is_ok());
    }

    #[test]
    fn values_whose_arithmetic_would_overflow_are_rejected_with_their_key() {
        for (toml, key) in [
            (
                "[limits]\nwhiteboard_rate = 1e-20\n",
                "limits.whiteboard_rate",
            ),
            (
                "[limits]\nping_interval_s = 9223372036854775807\n",
                "limits.ping_interval_s",
            ),
            (
                "[whiteboard]\nkeepalive_s = 99999999999\n",
                "whiteboard.keepalive_s",
            ),
            (
                "[whiteboard]\nawareness_tick_ms = 17\n",
                "whiteboard.awareness_tick_ms",
            ),
            (
                "[tutor]\nmax_client_id_bytes = 9223372036854775807\n",
                "tutor.max_client_id_bytes",
            ),
        ] {
            let c = Config::from_toml(toml).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
        Config::default().validate().unwrap();
    }

    #[test]
    fn zero_is_rejected_with_its_key() {
        for key in ["max_connections", "listen_backlog"] {
            let c = Config::from_toml(&format!("[limits]\n{key} = 0\n")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("limits.{key}")), "{err}");
        }
    }
}
