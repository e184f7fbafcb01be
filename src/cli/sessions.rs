//! `easel sessions`, and the admin client it and `easel snapshot` use: list, export,
//! inspect, restore and import, on a data directory or a running server.
//!
//! Each works on a data directory directly when no server holds it, on a cluster's Redis
//! (`[cluster]`, `--redis URL`: nodes may be serving meanwhile, Redis is shared), or
//! through a running server's HTTP API (`--server URL --token JWT`): sled locks its directory, so while a
//! server runs, the API is the only way in, and the error says so. Restores and imports on
//! a directory go through the same `Registry` and `Whiteboard` code as the server's, so an
//! offline restore records a new version exactly like a live one. Must not print: the
//! commands do.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use yrs::updates::decoder::Decode;
use yrs::{Doc, Transact, Update};

use easel::config::Config;
use easel::doc::json::doc_to_json;
use easel::http::rfc3339_ms;
use easel::metrics::Metrics;
use easel::session::whiteboard::RestoreFailure;
use easel::session::Registry;
use easel::store::{
    ClientIdentity, RedisStore, RedisTarget, SessionInfo, SledStore, Store, StoreError,
};

/// `easel sessions`: every stored session, one line each.
pub fn sessions(admin: Admin) -> anyhow::Result<()> {
    let sessions = admin.sessions()?;
    println!(
        "{:<32}  {:>10}  {:<24}  {:>9}",
        "session", "bytes", "last_activity", "snapshots"
    );
    for s in sessions {
        println!(
            "{:<32}  {:>10}  {:<24}  {:>9}",
            s.id,
            s.bytes,
            rfc3339_ms(s.last_activity_ms),
            s.snapshots
        );
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Restore(#[from] RestoreFailure),
    #[error("server: {0}")]
    Http(String),
    #[error("{0}")]
    Invalid(String),
}

/// Where the commands act.
pub enum Target {
    /// The store the configuration names, opened directly: the data directory, or in
    /// cluster mode (`[cluster]`) the Redis.
    Dir(Arc<Config>),
    /// A running server's HTTP API.
    Server { url: String, token: String },
}

/// One snapshot version as shown to an operator.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct VersionRow {
    pub version: u64,
    pub created_at: String,
    pub bytes: u64,
    pub updates: u64,
}

pub struct Admin {
    target: Target,
}

impl Admin {
    pub fn new(target: Target) -> Self {
        Self { target }
    }

    fn store(config: &Config) -> Result<Arc<dyn Store>, AdminError> {
        if let Some(target) = RedisTarget::from_config(&config.cluster) {
            let store = RedisStore::connect_as(
                target,
                ClientIdentity::from_config(&config.cluster)?,
                config.cluster.node_id(),
                config.persist.keep_snapshots,
            )?;
            store.ping()?;
            return Ok(Arc::new(store));
        }
        // sled would create an empty database: a mistyped path must not look like "no data".
        if !config.data_dir.is_dir() {
            return Err(AdminError::Invalid(format!(
                "the data directory {} does not exist",
                config.data_dir.display()
            )));
        }
        match SledStore::open_with(
            &config.data_dir,
            easel::store::SledSettings::from_config(config),
            None,
        ) {
            Ok(store) => Ok(Arc::new(store)),
            // A running server holds the directory: the way in is its HTTP API.
            Err(StoreError::Locked { .. }) => Err(AdminError::Invalid(format!(
                "{}; go through it with --server URL --token JWT (an admin token for every \
                 session: `easel token --data-dir {} --sub me --session '*' --role admin`)",
                locked_message(&config.data_dir),
                config.data_dir.display()
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// An error unless `session` has something stored: an unknown (or mistyped) session
    /// must not read as an empty one.
    fn require_session(
        config: &Config,
        store: &Arc<dyn Store>,
        session: &str,
    ) -> Result<(), AdminError> {
        if store.list_sessions()?.iter().any(|s| s.id == session) {
            Ok(())
        } else {
            Err(AdminError::Invalid(match &config.cluster.redis_url {
                Some(url) => format!("no session {session} in the Redis at {url}"),
                None if config.cluster.enabled() => {
                    format!("no session {session} in the Redis Cluster")
                }
                None => format!("no session {session} in {}", config.data_dir.display()),
            }))
        }
    }

    fn registry(config: &Arc<Config>) -> Result<(Registry, Arc<dyn Store>), AdminError> {
        let store = Self::store(config)?;
        let registry = Registry::new(store.clone(), Arc::new(Metrics::new()), config.clone());
        Ok((registry, store))
    }

    pub fn list(&self, session: &str) -> Result<Vec<VersionRow>, AdminError> {
        match &self.target {
            Target::Dir(config) => {
                let store = Self::store(config)?;
                Self::require_session(config, &store, session)?;
                Ok(store
                    .list_snapshots(session)?
                    .into_iter()
                    .map(|i| VersionRow {
                        version: i.version,
                        created_at: rfc3339_ms(i.created_at_ms),
                        bytes: i.bytes,
                        updates: i.updates,
                    })
                    .collect())
            }
            Target::Server { .. } => {
                #[derive(Deserialize)]
                struct Versions {
                    versions: Vec<VersionRow>,
                }
                let body = self.get(&format!("/api/v2/session/{session}/snapshots"))?;
                let v: Versions = serde_json::from_slice(&body)
                    .map_err(|e| AdminError::Http(format!("unexpected answer: {e}")))?;
                Ok(v.versions)
            }
        }
    }

    /// The whiteboard as a Yjs v1 update: version `version`, or the current state.
    pub fn export(&self, session: &str, version: Option<u64>) -> Result<Vec<u8>, AdminError> {
        match (&self.target, version) {
            (Target::Dir(config), Some(v)) => {
                let store = Self::store(config)?;
                Self::require_session(config, &store, session)?;
                store.get_snapshot(session, v)?.ok_or_else(|| {
                    AdminError::Invalid(format!("session {session} has no snapshot version {v}"))
                })
            }
            (Target::Dir(config), None) => {
                let (registry, store) = Self::registry(config)?;
                Self::require_session(config, &store, session)?;
                let handle = registry.open(session)?;
                Ok(handle.whiteboard.encode_state())
            }
            (Target::Server { .. }, Some(v)) => {
                self.get(&format!("/api/v2/session/{session}/snapshots/{v}"))
            }
            (Target::Server { .. }, None) => {
                self.get(&format!("/api/v2/session/{session}/whiteboard"))
            }
        }
    }

    /// Rolls the whiteboard back to `version`; returns the new version recorded.
    pub fn restore(&self, session: &str, version: u64) -> Result<u64, AdminError> {
        match &self.target {
            Target::Dir(config) => {
                let (registry, store) = Self::registry(config)?;
                Self::require_session(config, &store, session)?;
                let new_version = registry.open(session)?.whiteboard.restore(version)?;
                store.flush()?;
                Ok(new_version)
            }
            Target::Server { .. } => {
                let body = self.post(
                    &format!("/api/v2/session/{session}/snapshots/{version}/restore"),
                    &[],
                )?;
                #[derive(Deserialize)]
                struct Version {
                    version: u64,
                }
                let v: Version = serde_json::from_slice(&body)
                    .map_err(|e| AdminError::Http(format!("unexpected answer: {e}")))?;
                Ok(v.version)
            }
        }
    }

    /// Merges a Yjs v1 update into the session's whiteboard.
    pub fn import(&self, session: &str, update: &[u8]) -> Result<(), AdminError> {
        decode_checked(update, Purpose::Import)?;
        match &self.target {
            Target::Dir(config) => {
                let (registry, store) = Self::registry(config)?;
                let handle = registry.open(session)?;
                handle
                    .whiteboard
                    .apply_update(None, update, None)
                    .map_err(|e| AdminError::Invalid(e.to_string()))?;
                handle.whiteboard.snapshot_now()?;
                store.flush()?;
                Ok(())
            }
            Target::Server { .. } => {
                self.post(&format!("/api/v2/session/{session}/whiteboard"), update)?;
                Ok(())
            }
        }
    }

    pub fn sessions(&self) -> Result<Vec<SessionInfo>, AdminError> {
        match &self.target {
            Target::Dir(config) => Ok(Self::store(config)?.list_sessions()?),
            Target::Server { .. } => {
                #[derive(Deserialize)]
                struct Sessions {
                    sessions: Vec<SessionInfo>,
                }
                let body = self.get("/api/v2/sessions")?;
                let s: Sessions = serde_json::from_slice(&body)
                    .map_err(|e| AdminError::Http(format!("unexpected answer: {e}")))?;
                Ok(s.sessions)
            }
        }
    }

    fn server(&self) -> (&str, &str) {
        match &self.target {
            Target::Server { url, token } => (url.trim_end_matches('/'), token),
            Target::Dir(_) => ("", ""),
        }
    }

    fn get(&self, path: &str) -> Result<Vec<u8>, AdminError> {
        let (url, token) = self.server();
        let response = ureq::get(format!("{url}{path}"))
            .header("Authorization", format!("Bearer {token}"))
            .config()
            .http_status_as_error(false)
            .build()
            .call();
        read_response(response)
    }

    fn post(&self, path: &str, body: &[u8]) -> Result<Vec<u8>, AdminError> {
        let (url, token) = self.server();
        let response = ureq::post(format!("{url}{path}"))
            .header("Authorization", format!("Bearer {token}"))
            .config()
            .http_status_as_error(false)
            .build()
            .send(body);
        read_response(response)
    }
}

fn read_response(
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<Vec<u8>, AdminError> {
    let mut response = response.map_err(|e| AdminError::Http(e.to_string()))?;
    let status = response.status();
    let body = response
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .map_err(|e| AdminError::Http(e.to_string()))?;
    if status.is_success() {
        Ok(body)
    } else {
        // The server's JSON error carries a sentence for people: show that, not the JSON.
        #[derive(Deserialize)]
        struct ErrorBody {
            message: String,
        }
        let said = serde_json::from_slice::<ErrorBody>(&body)
            .map(|b| b.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(AdminError::Http(format!("{status}: {said}")))
    }
}

/// The content of a Yjs v1 update as JSON.
pub fn inspect(update: &[u8]) -> Result<serde_json::Value, AdminError> {
    let decoded = decode_checked(update, Purpose::Inspect)?;
    let doc = Doc::new();
    doc.transact_mut()
        .apply_update(decoded)
        .map_err(|e| AdminError::Invalid(format!("update does not apply: {e}")))?;
    Ok(doc_to_json(&doc))
}

/// What a file's update is read for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Merged into a session: checked as a client's update.
    Import,
    /// Shown (a file or a stored snapshot): checked as a stored record, so that text a
    /// board already holds in the wrong kind of type is shown rather than refused.
    Inspect,
}

/// A file's bytes as a Yjs v1 update, through the update guard first: a file is input like
/// a client's, and a nesting bomb would overflow the stack inside yrs's decoder. The
/// session a file is imported into applies its configured `limits.max_nesting` too.
fn decode_checked(update: &[u8], purpose: Purpose) -> Result<Update, AdminError> {
    let index = easel::doc::guard::NestingIndex::default();
    let limit = easel::doc::guard::SAFE_NESTING;
    match purpose {
        Purpose::Import => index.check(update, limit),
        Purpose::Inspect => index.check_stored(update, limit),
    }
    .map_err(|e| AdminError::Invalid(format!("not a usable Yjs v1 update: {e}")))?;
    Update::decode_v1(update).map_err(|e| AdminError::Invalid(format!("not a Yjs v1 update: {e}")))
}

/// Reads an update file for `inspect` or `import`.
pub fn read_update_file(path: &Path) -> Result<Vec<u8>, AdminError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            AdminError::Invalid(format!("no such file: {}", path.display()))
        }
        _ => AdminError::Invalid(format!("cannot read {}: {e}", path.display())),
    })
}

/// "the data directory DIR is in use by another process (pid N: its command line)": what
/// can be found of the process holding sled's lock, for the message that says so.
pub fn locked_message(dir: &Path) -> String {
    match lock_holder(dir) {
        Some(holder) => format!(
            "the data directory {} is in use by another process ({holder})",
            dir.display()
        ),
        None => format!(
            "the data directory {} is in use by another process (a running `easel serve`?)",
            dir.display()
        ),
    }
}

/// The process holding the `flock` sled takes on `DIR/db`, as "pid N: command line", from
/// /proc/locks (which names the lock's owner by device and inode) and /proc/N/cmdline.
/// None where /proc is missing (not Linux) or the holder cannot be told.
pub fn lock_holder(dir: &Path) -> Option<String> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.join("db")).ok()?;
        let inode = meta.ino();
        let locks = std::fs::read_to_string("/proc/locks").ok()?;
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF": the device is printed as
        // hex major:minor, the inode in decimal; the inode alone is a good enough match.
        let pid = locks.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let pos = fields.iter().position(|f| f.matches(':').count() == 2)?;
            let file_inode: u64 = fields[pos].rsplit(':').next()?.parse().ok()?;
            let pid: i64 = fields.get(pos.checked_sub(1)?)?.parse().ok()?;
            (file_inode == inode && pid > 0 && pid as u32 != std::process::id()).then_some(pid)
        })?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if cmdline.is_empty() {
            Some(format!("pid {pid}"))
        } else {
            Some(format!("pid {pid}: {}", cmdline.join(" ")))
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        None
    }
}
