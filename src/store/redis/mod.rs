//! [`RedisStore`]: the [`Store`] seam on Redis, for cluster mode (SPEC 9), plus what the
//! node runtime (`src/cluster/`) needs beyond the trait: the stream reader, ephemeral
//! events, presence across nodes, node heartbeats. Every Redis command easel sends is in
//! this module; nothing else calls redis-rs.
//!
//! # Why synchronous connections
//!
//! The `Store` trait is synchronous and only ever called off the async workers (the
//! `easel-lane` pool and tokio's blocking pool), and the stream reader is a dedicated
//! thread blocked in `XREAD`. redis-rs's sync `Connection` with read/write timeouts fits
//! that without a second runtime, and a small pool (`conn.rs`) keeps one round trip per
//! call. Redis Cluster goes through redis-rs's sync `ClusterConnection`, which routes each
//! command (and each script, by its first key) to the slot's node.
//!
//! # Key layout
//!
//! Every key of a session carries the hash tag `{<session>}` (one slot in a Redis
//! Cluster, so a script over a session's keys is atomic); prefix `easel:`. Session ids
//! match `[A-Za-z0-9_-]{1,128}` (checked on every call, as sled does).
//!
//! | key | type | content |
//! |---|---|---|
//! | `easel:{s}:wb` | stream | accepted whiteboard updates: id `0-<seq>`, fields `n` node id, `u` the Yjs v1 update |
//! | `easel:{s}:wb:seq` | string | the last whiteboard seq handed out (never reused, survives trims) |
//! | `easel:{s}:v` | hash | version N → the bincode snapshot header (the same `SnapshotHeader` as sled's, so listing reads no state) |
//! | `easel:{s}:vs` | hash | version N → the Yjs v1 state of version N |
//! | `easel:{s}:meta` | hash | `last_version` (never reused), `snap_through` (the wb seq the newest version includes), `last_activity_ms` |
//! | `easel:{s}:lease` | string | the compaction lease: the holder's node id, `SET NX PX 30000` |
//! | `easel:{s}:chat` | stream | chat: id `0-<seq>`, fields `n` node id, `m` the [`ChatMessage`] JSON as appended (its `seq` is read from the id) |
//! | `easel:{s}:chat:seq` | string | the last chat seq (survives trimming) |
//! | `easel:{s}:chat:amended` | hash | seq → the edited or deleted [`ChatMessage`] JSON (SPEC 4.1), read instead of the stream's |
//! | `easel:{s}:edits` | zset (all scores 0, lex order) | the edit log: member `<at_ms, 20 digits>:<seq, 20 digits>:<ChatEdit JSON>`, so lex order is `(at_ms, seq)` order |
//! | `easel:{s}:edits:seq` | hash | seq → its one `edits` member (the log holds one entry per message) |
//! | `easel:{s}:moderation` | hash | user id → [`ModerationRecord`] JSON |
//! | `easel:{s}:ev` | stream | ephemeral events between nodes, `XADD MAXLEN ~ 10000`: fields `n` node, `k` kind, `d` data (opaque here) |
//! | `easel:{s}:presence` | hash | `<node id>\n<user id>` → that user's connection count on that node |
//! | `easel:{s}:presence:info` | hash | user id → `UserInfo` JSON, while the user has a connection anywhere |
//! | `easel:sessions` | set | every session with anything stored (added once per session per process, not per write: in a Redis Cluster it is in another slot) |
//! | `easel:bell` | stream | one Redis server only: `s` the session of each append (rung inside `wb_append`/`chat_append`) and of each event batch; readers block on it alone (`streams.rs`) |
//! | `easel:node:<node id>` | string | heartbeat: ms timestamp, `SET PX <ttl>` |
//!
//! # Scripts (`scripts.rs` holds their text; each touches one session's keys)
//!
//! - `wb_append(node, update, now, seen)`: `n = INCR wb:seq` (raised to `seen + 1` if not
//!   above it); `XADD wb 0-n n node u update; HSET meta last_activity_ms now` (and, on one
//!   Redis server, `XADD easel:bell s session`); returns n. The seq and the append are one
//!   step, so seqs are gapless and in one order whichever node appends. `seen` is the
//!   highest seq the appending node has seen: only a Redis that lost acknowledged writes
//!   (a crash under `appendfsync everysec`) has a counter below it, and then the seqs it
//!   lost are skipped, not handed out again (SPEC 5.1).
//! - `load(after, count)`: one page of a whiteboard's scan (a load is a whole scan).
//!   The first (`after` empty): atomically the newest version (`meta.last_version`, its
//!   state in `vs`), `snap_through`, `wb:seq`, and `XRANGE wb (0-snap_through + COUNT
//!   count`. A later page passes the last seq it read as `after` and gets `XRANGE wb
//!   (0-after + COUNT count`, with no state, unless a snapshot written since has trimmed
//!   past `after` (then as a first page).
//! - `snapshot_write(node, N, header, state, log_through, keep, now)`: only while the
//!   lease is ours and N is `last_version + 1`; clamps `log_through` to `wb:seq` and
//!   refuses one below `snap_through` (those entries are trimmed: a state without them
//!   would lose them); `HSET v N header; HSET vs N state; HSET meta last_version N
//!   snap_through log_through; XTRIM wb MINID 0-(log_through+1)` (entries appended
//!   meanwhile stay); drops the versions beyond `keep`.
//! - `lease_release(node)` / `lease_takeover(holder, node, ttl)`: compare-and-delete /
//!   compare-and-set of the lease.
//! - `chat_append(node, json, limit, now, seen)`: `n = INCR chat:seq` (above `seen`, as
//!   for `wb_append`); `XADD chat 0-n n node m json`; then every message with seq ≤ n − limit goes (`XTRIM MINID`), with its
//!   `chat:amended` entry and edit-log entry (and the doorbell rings, as for `wb_append`);
//!   returns n.
//! - `raise_seqs(wb seen, chat seen)`: `SET` each counter that is below what a node has
//!   seen to it. The watch runs it for every held session when Redis's `run_id` changes
//!   (a restart, a failover) and on every sweep, so that after a loss even a node that
//!   loaded the session afresh appends past the seqs the others saw.
//! - `chat_read(after|before, seq, limit)`: `XRANGE`/`XREVRANGE` with the amended form of
//!   each message swapped in.
//! - `chat_amend(seq, json, member, now)`: for a message still stored, `HSET chat:amended`
//!   and replace its `edits` member.
//! - `presence_change(node, user, count, info)`: `HSET presence node\nuser count` (HDEL
//!   at 0: an absolute count, so a retried write changes nothing), keeps `presence:info`
//!   while the user is anywhere; returns the user's total after and the whole presence.
//! - `presence_drop_node(node)`: deletes every field of that node; returns the users whose
//!   total went to 0 and the whole presence after.
//! - `presence_read()`: the whole presence and the infos, in one read.
//!
//! # Failures
//!
//! Every connection, I/O or timeout failure is [`StoreError::Unreachable`] (`conn.rs`:
//! pool, timeouts, backoff; the store recovers by itself when Redis is back). A reply that
//! does not decode is [`StoreError::Corrupt`]; a stored record that does not decode is
//! logged and skipped, as in sled.
//!
//! # Files
//!
//! `keys.rs` key names; `conn.rs` connections; `scripts.rs` the Lua; `values.rs` reply
//! decoding; `whiteboard.rs` updates, versions, the lease, sessions; `chat.rs` chat,
//! edits, moderation; `presence.rs` presence and heartbeats; `streams.rs` the stream
//! reader and events; `transfer.rs` `easel cluster import | export` (sled ↔ Redis).
//!
//! Must not touch: sessions, documents, sockets, or the node's behaviour (`src/cluster/`).

mod chat;
mod conn;
mod keys;
mod presence;
mod scripts;
mod streams;
pub mod transfer;
mod values;
mod whiteboard;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use self::conn::check_redis_url;
pub use self::presence::{PresenceChange, PresenceEntry};
pub use self::streams::{Cursor, Position, StreamEntry, StreamReader};

use self::conn::Pool;
use self::keys::session_key;
use self::scripts::Scripts;
use super::sled::keys::check_session_id;
use super::{
    unpoisoned, ChatEdit, ModerationRecord, SessionInfo, SnapshotInfo, Store, StoreError,
    StoredRecord, StoredWhiteboard,
};
use crate::metrics::Metrics;
use crate::protocol::tutor::ChatMessage;
use redis::Value;

/// Where Redis is: one server, or the seed nodes of a Redis Cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis://host:port[/db]`.
    Url(String),
    /// Seed nodes of a Redis Cluster (`cluster.redis_cluster_nodes`).
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// The Redis that `[cluster]` names; `None` when cluster mode is off.
    pub fn from_config(cluster: &crate::config::ClusterConfig) -> Option<Self> {
        if let Some(url) = &cluster.redis_url {
            return Some(RedisTarget::Url(url.clone()));
        }
        (!cluster.redis_cluster_nodes.is_empty())
            .then(|| RedisTarget::Cluster(cluster.redis_cluster_nodes.clone()))
    }
}

/// The certificate a node shows a Redis that asks for one (`tls-auth-clients yes`): its
/// chain and private key, PEM, read from `cluster.redis_tls_cert` / `redis_tls_key`.
#[derive(Clone)]
pub struct ClientIdentity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("ClientIdentity(..)")
    }
}

impl ClientIdentity {
    /// The identity `[cluster]` names (files read now: a missing one is a clear error at
    /// start, not a failed handshake later); `None` when it names none.
    pub fn from_config(cluster: &crate::config::ClusterConfig) -> Result<Option<Self>, StoreError> {
        let (Some(cert), Some(key)) = (&cluster.redis_tls_cert, &cluster.redis_tls_key) else {
            return Ok(None);
        };
        let read = |what: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                StoreError::Unreachable(format!(
                    "cannot read the Redis client {what} {}: {e}",
                    path.display()
                ))
            })
        };
        Ok(Some(Self {
            cert_pem: read("certificate", cert)?,
            key_pem: read("key", key)?,
        }))
    }

    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: self.cert_pem.clone(),
                client_key: self.key_pem.clone(),
            }),
            // The system's trust store, as without a client certificate (`SSL_CERT_FILE`).
            root_cert: None,
        }
    }
}

/// The `run_id` lines of an `INFO server` reply: one text, or a map of node → text.
fn collect_run_ids(info: &Value, ids: &mut Vec<String>) {
    if let Value::Map(nodes) = info {
        for (_, info) in nodes {
            collect_run_ids(info, ids);
        }
    } else if let Ok(Some(text)) = values::text(info, "INFO server") {
        ids.extend(
            text.lines()
                .filter_map(|line| line.strip_prefix("run_id:"))
                .map(|id| id.trim().to_owned()),
        );
    }
}

/// Sessions remembered as registered in `easel:sessions` before the memory is let go
/// (then each is registered once more: `SADD` is idempotent).
const REGISTERED_MAX: usize = 100_000;

/// The store on Redis. See the module documentation for the layout and the scripts.
pub struct RedisStore {
    pool: Arc<Pool>,
    scripts: Scripts,
    node_id: String,
    keep_snapshots: usize,
    cluster: bool,
    /// Sessions this process added to `easel:sessions`.
    registered: Mutex<HashSet<String>>,
    lease_takeovers: AtomicU64,
    /// Counts records that do not decode (`easel_store_decode_errors_total`), as sled does.
    metrics: Option<Arc<Metrics>>,
}

impl RedisStore {
    /// A store on `target` for node `node_id` (which names its appends, presence and
    /// leases), keeping `keep_snapshots` versions per session. Checks the URL and the node
    /// id; connects on first use (a Redis that is down now is [`StoreError::Unreachable`]
    /// per call until it is back, see [`RedisStore::ping`]).
    pub fn connect(
        target: RedisTarget,
        node_id: String,
        keep_snapshots: usize,
    ) -> Result<Self, StoreError> {
        Self::connect_as(target, None, node_id, keep_snapshots)
    }

    /// [`RedisStore::connect`], showing `identity` to a Redis that asks for a client
    /// certificate.
    pub fn connect_as(
        target: RedisTarget,
        identity: Option<ClientIdentity>,
        node_id: String,
        keep_snapshots: usize,
    ) -> Result<Self, StoreError> {
        check_node_id(&node_id)?;
        let cluster = matches!(target, RedisTarget::Cluster(_));
        Ok(Self {
            pool: Arc::new(Pool::new(&target, identity.as_ref())?),
            scripts: Scripts::new(),
            node_id,
            keep_snapshots: keep_snapshots.max(1),
            cluster,
            registered: Mutex::new(HashSet::new()),
            lease_takeovers: AtomicU64::new(0),
            metrics: None,
        })
    }

    /// Counts stored records that do not decode in `metrics` (as the sled store does).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Logs and counts a stored record that does not decode; the caller skips it.
    fn report_damaged(&self, session: &str, what: &str, error: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.store_decode_errors.inc();
        }
        tracing::error!(%session, what, error, "a record stored in Redis does not decode; skipped");
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Compaction leases this node took over from a node whose heartbeat was gone.
    pub fn lease_takeovers(&self) -> u64 {
        self.lease_takeovers.load(Ordering::Relaxed)
    }

    /// One round trip (`PING`): for `/readyz` and the round-trip metric.
    pub fn ping(&self) -> Result<Duration, StoreError> {
        let started = std::time::Instant::now();
        self.pool
            .run("PING", |con| redis::cmd("PING").query::<redis::Value>(con))?;
        Ok(started.elapsed())
    }

    /// The id of the Redis process this node talks to (`INFO server`'s `run_id`; on a Redis
    /// Cluster, where INFO goes to every node, their ids sorted and joined): it changes when
    /// Redis restarts or a replica takes over, which may have lost the last writes. `None`
    /// when INFO says none.
    pub fn run_id(&self) -> Result<Option<String>, StoreError> {
        let info: Value = self.pool.run("INFO server", |con| {
            redis::cmd("INFO").arg("server").query(con)
        })?;
        let mut ids = Vec::new();
        collect_run_ids(&info, &mut ids);
        ids.sort_unstable();
        Ok((!ids.is_empty()).then(|| ids.join(",")))
    }

    /// Forgets which sessions this process added to `easel:sessions`, for a Redis that may
    /// have lost that set's last members: each is added again on its next write.
    pub fn forget_registered(&self) {
        unpoisoned(self.registered.lock()).clear();
    }

    /// Raises the session's whiteboard and chat counters to the seqs this node has seen
    /// (`raise_seqs`), for a Redis that lost its last writes; true when one was behind.
    pub fn raise_seqs(
        &self,
        session: &str,
        wb_seen: u64,
        chat_seen: u64,
    ) -> Result<bool, StoreError> {
        check_session_id(session)?;
        let mut call = self.scripts.raise_seqs.prepare_invoke();
        call.key(session_key(session, keys::WB_SEQ))
            .key(session_key(session, keys::CHAT_SEQ))
            .arg(wb_seen)
            .arg(chat_seen);
        let reply = self
            .pool
            .run("raise seqs", |con| call.invoke::<Value>(con))?;
        Ok(values::number(&reply, "raise_seqs")? == 1)
    }

    /// Adds `session` to `easel:sessions`, once per process.
    fn register(&self, session: &str) -> Result<(), StoreError> {
        if unpoisoned(self.registered.lock()).contains(session) {
            return Ok(());
        }
        self.pool.run("SADD sessions", |con| {
            redis::cmd("SADD")
                .arg(keys::SESSIONS)
                .arg(session)
                .query::<redis::Value>(con)
        })?;
        let mut registered = unpoisoned(self.registered.lock());
        if registered.len() >= REGISTERED_MAX {
            registered.clear();
        }
        registered.insert(session.to_owned());
        Ok(())
    }
}

/// A node id is a name in keys, logs and metrics: 1..=128 printable characters, no
/// whitespace (a `\n` would break the presence fields).
fn check_node_id(node: &str) -> Result<(), StoreError> {
    let ok = (1..=128).contains(&node.len()) && node.chars().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(StoreError::Unavailable(format!(
            "invalid node id {node:?}: 1 to 128 printable ASCII characters, no spaces"
        )))
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store for RedisStore {
    fn load_whiteboard(&self, session: &str) -> Result<StoredWhiteboard, StoreError> {
        check_session_id(session)?;
        StoredWhiteboard::collect(|each| self.redis_scan(session, each))
    }

    fn scan_whiteboard(
        &self,
        session: &str,
        each: &mut dyn FnMut(StoredRecord<'_>),
    ) -> Result<u64, StoreError> {
        check_session_id(session)?;
        self.redis_scan(session, each)
    }

    fn append_update(&self, session: &str, seq: u64, update: &[u8]) -> Result<u64, StoreError> {
        check_session_id(session)?;
        // `seq` is one past the last the session has seen: Redis's seq goes above that.
        self.redis_append_update(session, seq.saturating_sub(1), update)
    }

    fn write_snapshot(
        &self,
        session: &str,
        state: &[u8],
        state_vector: &[u8],
        update_count: u64,
        log_through: u64,
    ) -> Result<u64, StoreError> {
        check_session_id(session)?;
        self.redis_write_snapshot(session, state, state_vector, update_count, log_through)
    }

    fn list_snapshots(&self, session: &str) -> Result<Vec<SnapshotInfo>, StoreError> {
        check_session_id(session)?;
        self.redis_list_snapshots(session)
    }

    fn get_snapshot(&self, session: &str, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        check_session_id(session)?;
        self.redis_get_snapshot(session, version)
    }

    fn list_sessions(&self) -> Result<Vec<SessionInfo>, StoreError> {
        self.redis_list_sessions()
    }

    fn append_chat(
        &self,
        session: &str,
        message: &ChatMessage,
        history_limit: usize,
    ) -> Result<u64, StoreError> {
        check_session_id(session)?;
        self.redis_append_chat(session, message, history_limit)
    }

    fn chat_after(
        &self,
        session: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        check_session_id(session)?;
        self.redis_chat_read(session, chat::Direction::After, after, limit)
    }

    fn chat_before(
        &self,
        session: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        check_session_id(session)?;
        let mut newest_first =
            self.redis_chat_read(session, chat::Direction::Before, before, limit)?;
        newest_first.reverse();
        Ok(newest_first)
    }

    fn last_chat_seq(&self, session: &str) -> Result<u64, StoreError> {
        check_session_id(session)?;
        self.redis_last_chat_seq(session)
    }

    fn chat_get(&self, session: &str, seq: u64) -> Result<Option<ChatMessage>, StoreError> {
        check_session_id(session)?;
        self.redis_chat_get(session, seq)
    }

    fn chat_amend(
        &self,
        session: &str,
        message: &ChatMessage,
        edit: &ChatEdit,
        _previous_at_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        check_session_id(session)?;
        self.redis_chat_amend(session, message, edit)
    }

    fn chat_edits_after(
        &self,
        session: &str,
        after: (u64, u64),
        limit: usize,
    ) -> Result<Vec<ChatEdit>, StoreError> {
        check_session_id(session)?;
        self.redis_chat_edits_after(session, after, limit)
    }

    fn moderation(&self, session: &str) -> Result<Vec<ModerationRecord>, StoreError> {
        check_session_id(session)?;
        self.redis_moderation(session)
    }

    fn set_moderation(&self, session: &str, record: &ModerationRecord) -> Result<(), StoreError> {
        check_session_id(session)?;
        self.redis_set_moderation(session, record)
    }

    /// Nothing to do: an append is acknowledged by Redis, whose own `appendfsync` says
    /// when it is on disk.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn check(&self) -> Result<(), StoreError> {
        self.ping().map(|_| ())
    }
}
