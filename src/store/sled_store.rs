//! [`SledStore`]: the [`Store`](super::Store) seam on an embedded sled 0.34 database, the
//! durable store behind `easel serve` and the offline `easel snapshot` / `easel sessions`.
//!
//! # Layout
//!
//! One sled database per data directory, holding four trees. Every key starts with the
//! session id and a `\0` byte. Session ids match `[A-Za-z0-9_-]{1,128}` (checked on every
//! call), so `session \0` is a prefix no other session shares, and a prefix scan visits one
//! session's records in key order. Numbers in keys are big-endian `u64`, so key order is
//! numeric order and a range scan is a range of sequence numbers.
//!
//! | tree        | key                         | value |
//! |-------------|-----------------------------|-------|
//! | `updates`   | `session \0 seq` (u64 BE)   | `0x01`, then one accepted Yjs v1 update |
//! | `snapshots` | `session \0 version` (u64 BE) | a bincode-2 [`SnapshotHeader`] (`format_version: u16 = 1`, session, version, `created_at_ms`, `update_count`, `state_len`, `state_vector`), then the whole document as a Yjs v1 update (`state_len` bytes) |
//! | `chat`      | `session \0 seq` (u64 BE)   | `0x01`, then the [`ChatMessage`] as JSON (the object clients receive, so fields can be added with serde defaults) |
//! | `meta`      | `session \0 name` (ASCII)   | `0x01`, then a u64 BE |
//!
//! The `meta` names:
//!
//! | name                    | meaning |
//! |-------------------------|---------|
//! | `last_log_seq`          | the largest seq of the `updates` entries a snapshot deleted; with the newest entry left, it says where the session's next seq starts, so seqs are never reused |
//! | `last_snapshot_version` | the highest snapshot version written; never reused, even once pruned |
//! | `last_chat_seq`         | the highest chat seq stored; survives trimming and restarts |
//! | `last_activity_ms`      | time of the session's last write, in ms since the Unix epoch |
//!
//! The first byte (or, for snapshots, the first bincode field) of every value is its format
//! version, 1 today: a later layout writes version 2 and keeps reading version 1.
//!
//! # Invariants and crash safety
//!
//! - No sled transaction or batch is used: either takes sled's global write lock, which
//!   every insert of every session then waits behind. Multi-record writes go in an order
//!   whose every prefix is safe to leave after a crash instead.
//! - [`Store::write_snapshot`] inserts the snapshot, raises `last_snapshot_version` and
//!   `last_log_seq`, deletes the log entries the snapshot includes and prunes to the newest
//!   `keep_snapshots` versions, in that order. After a crash midway, some entries the
//!   newest snapshot includes may remain: loading replays them, which changes nothing (a
//!   Yjs update applies once).
//! - A session's seqs are given by the session itself (one writer) and only grow: the next
//!   one after a load is past both `last_log_seq` and the newest entry, so a key is never
//!   reused. An append is two blind inserts (the entry, `last_activity_ms`), no read.
//! - A snapshot deletes only the entries its state includes (seq up to the `log_through`
//!   it is given); entries appended while it was encoded stay, so it needs no lock on the
//!   relay path.
//! - A chat message is written before `last_chat_seq` is raised, and
//!   [`Store::last_chat_seq`] answers the larger of the counter and the newest stored seq,
//!   so a crash between the two loses nothing.
//! - Chat is trimmed by seq window: after storing seq `n`, every message with
//!   `seq <= n - history_limit` is deleted. Seqs are contiguous (SPEC 4), so this keeps the
//!   newest `history_limit` messages, at the cost of only the messages it deletes.
//! - Durability is sled's group commit: everything written is flushed every
//!   `flush_interval_ms` (0: only on [`Store::flush`]).
//!
//! # Damaged records
//!
//! A value that does not decode is logged with `tracing::warn`, counted in the
//! `store_decode_errors` metric and skipped: loading uses the newest snapshot whose header
//! *and* Yjs state decode, then every log entry that decodes. A failure of sled itself
//! (an I/O error while reading) is returned as [`StoreError::Io`]. Nothing read from disk
//! is unwrapped.
//!
//! # Locking
//!
//! sled locks its directory while open. A second open (another `easel serve`, or a tool
//! run beside one) fails with a [`StoreError::Io`] whose message starts with `locked:`;
//! [`is_locked_error`] recognises it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sled::{IVec, Tree};

use super::{SessionInfo, SnapshotInfo, Store, StoreError, StoredWhiteboard};
use crate::metrics::Metrics;
use crate::protocol::tutor::ChatMessage;

const UPDATES_TREE: &str = "updates";
const SNAPSHOTS_TREE: &str = "snapshots";
const CHAT_TREE: &str = "chat";
const META_TREE: &str = "meta";

const LAST_LOG_SEQ: &str = "last_log_seq";
const LAST_SNAPSHOT_VERSION: &str = "last_snapshot_version";
const LAST_CHAT_SEQ: &str = "last_chat_seq";
const LAST_ACTIVITY_MS: &str = "last_activity_ms";

/// Format version byte of `updates`, `chat` and `meta` values.
const RECORD_FORMAT_V1: u8 = 1;
/// Format version of the snapshot header.
const SNAPSHOT_FORMAT_V1: u16 = 1;
/// The largest snapshot header decoded: bounds what a damaged length prefix can allocate.
const MAX_SNAPSHOT_HEADER_BYTES: usize = 64 << 20;

/// The start of the message of a [`StoreError::Io`] saying the directory is locked.
const LOCKED_PREFIX: &str = "locked:";

/// The store on a sled database. See the module documentation for the layout.
pub struct SledStore {
    db: sled::Db,
    updates: Tree,
    snapshots: Tree,
    chat: Tree,
    meta: Tree,
    keep_snapshots: usize,
    metrics: Option<Arc<Metrics>>,
}

/// Whether `e` came from [`SledStore::open`] finding the data directory held by another
/// process (its message then starts with `locked:` and says what to do instead).
pub fn is_locked_error(e: &StoreError) -> bool {
    matches!(e, StoreError::Io(message) if message.starts_with(LOCKED_PREFIX))
}

impl SledStore {
    /// Opens (creating if needed) the database in `dir`. Writes are flushed to disk every
    /// `flush_interval_ms` (0: only on [`Store::flush`]); each session keeps its newest
    /// `keep_snapshots` versions (at least 1). `metrics` counts records that do not decode.
    pub fn open(
        dir: &Path,
        flush_interval_ms: u64,
        keep_snapshots: usize,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms((flush_interval_ms > 0).then_some(flush_interval_ms))
            .open()
            .map_err(|e| open_error(dir, &e))?;
        let open_tree = |name: &str| db.open_tree(name).map_err(storage_error);
        Ok(Self {
            updates: open_tree(UPDATES_TREE)?,
            snapshots: open_tree(SNAPSHOTS_TREE)?,
            chat: open_tree(CHAT_TREE)?,
            meta: open_tree(META_TREE)?,
            db,
            keep_snapshots: keep_snapshots.max(1),
            metrics,
        })
    }

    /// Logs and counts a stored record that does not decode (the caller then skips it).
    fn report_damaged(&self, tree: &str, key: &[u8], error: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.store_decode_errors.inc();
        }
        tracing::warn!(tree, key = %describe_key(key), error, "stored record does not decode; skipped");
    }

    /// A `meta` counter of the session; `None` if absent or damaged (damage is reported).
    fn read_counter(&self, session: &str, name: &str) -> Result<Option<u64>, StoreError> {
        let key = named_key(session, name);
        let value = self.meta.get(&key).map_err(storage_error)?;
        Ok(self.decode_counter_or_report(&key, value.as_deref()))
    }

    fn decode_counter_or_report(&self, key: &[u8], value: Option<&[u8]>) -> Option<u64> {
        match decode_counter(value?) {
            Ok(n) => Some(n),
            Err(e) => {
                self.report_damaged(META_TREE, key, &e);
                None
            }
        }
    }

    /// Atomically replaces a `meta` counter by `next(current)` (compare-and-swap, retried
    /// on a concurrent change). Returns the value written.
    fn update_counter(
        &self,
        session: &str,
        name: &str,
        next: impl Fn(Option<u64>) -> Result<u64, StoreError>,
    ) -> Result<u64, StoreError> {
        let key = named_key(session, name);
        loop {
            let current = self.meta.get(&key).map_err(storage_error)?;
            let new = next(self.decode_counter_or_report(&key, current.as_deref()))?;
            let swapped = self
                .meta
                .compare_and_swap(&key, current, Some(&encode_counter(new)[..]))
                .map_err(storage_error)?;
            if swapped.is_ok() {
                return Ok(new);
            }
        }
    }

    /// Sets a `meta` counter of the session (a blind insert, no read).
    fn write_counter(&self, session: &str, name: &str, n: u64) -> Result<(), StoreError> {
        self.meta
            .insert(named_key(session, name), &encode_counter(n)[..])
            .map(|_| ())
            .map_err(storage_error)
    }

    /// Records that the session was written to now.
    fn touch(&self, session: &str) -> Result<(), StoreError> {
        self.write_counter(session, LAST_ACTIVITY_MS, now_ms())
    }

    /// The number in the session's last key of `tree` (`None`: the session has none there).
    fn last_number(&self, tree: &Tree, session: &str) -> Result<Option<u64>, StoreError> {
        match tree.scan_prefix(session_prefix(session)).next_back() {
            None => Ok(None),
            Some(entry) => {
                let (key, _) = entry.map_err(storage_error)?;
                Ok(key_number(&key))
            }
        }
    }

    /// The newest snapshot of the session whose header and Yjs state both decode, as
    /// (version, state). Newer ones that do not are reported and passed over.
    fn newest_loadable_snapshot(
        &self,
        session: &str,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        for entry in self.snapshots.scan_prefix(session_prefix(session)).rev() {
            let (key, value) = entry.map_err(storage_error)?;
            let loaded =
                decode_snapshot_entry(session, &key, &value).and_then(|(header, state)| {
                    check_yjs_update(state)?;
                    Ok((header.version, state.to_vec()))
                });
            match loaded {
                Ok(snapshot) => return Ok(Some(snapshot)),
                Err(e) => self.report_damaged(SNAPSHOTS_TREE, &key, &e),
            }
        }
        Ok(None)
    }

    /// The session's log entries that decode, oldest first.
    fn log_entries(&self, session: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut updates = Vec::new();
        for entry in self.updates.scan_prefix(session_prefix(session)) {
            let (key, value) = entry.map_err(storage_error)?;
            match decode_update(&value) {
                Ok(update) => updates.push(update.to_vec()),
                Err(e) => self.report_damaged(UPDATES_TREE, &key, &e),
            }
        }
        Ok(updates)
    }

    /// Every key the session has in `tree`.
    fn session_keys(&self, tree: &Tree, session: &str) -> Result<Vec<IVec>, StoreError> {
        tree.scan_prefix(session_prefix(session))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(storage_error)
    }

    /// Decodes chat entries in the order `entries` gives them, skipping (and reporting)
    /// damaged ones, until `limit` messages.
    fn decode_chat_entries(
        &self,
        entries: impl Iterator<Item = sled::Result<(IVec, IVec)>>,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let mut messages = Vec::new();
        for entry in entries {
            if messages.len() >= limit {
                break;
            }
            let (key, value) = entry.map_err(storage_error)?;
            match decode_chat(&value) {
                Ok(message) => messages.push(message),
                Err(e) => self.report_damaged(CHAT_TREE, &key, &e),
            }
        }
        Ok(messages)
    }

    /// Deletes the session's chat messages with `seq <= newest_seq - history_limit`.
    fn trim_chat(
        &self,
        session: &str,
        newest_seq: u64,
        history_limit: usize,
    ) -> Result<(), StoreError> {
        let limit = u64::try_from(history_limit).unwrap_or(u64::MAX);
        let Some(oldest_dropped) = newest_seq.checked_sub(limit) else {
            return Ok(());
        };
        // One remove at a time, not a `Batch`: a batch takes sled's global write lock,
        // which would hold up every whiteboard append. A crash midway leaves a few old
        // messages for the next trim.
        let dropped = session_prefix(session)..=numbered_key(session, oldest_dropped);
        for key in self.chat.range(dropped).keys() {
            self.chat
                .remove(key.map_err(storage_error)?)
                .map_err(storage_error)?;
        }
        Ok(())
    }
}

impl Store for SledStore {
    fn load_whiteboard(&self, session: &str) -> Result<StoredWhiteboard, StoreError> {
        check_session_id(session)?;
        let mut stored = StoredWhiteboard::default();
        if let Some((version, state)) = self.newest_loadable_snapshot(session)? {
            stored.snapshot_version = version;
            stored.updates.push(state);
        }
        stored.updates.extend(self.log_entries(session)?);
        let counted = self.read_counter(session, LAST_LOG_SEQ)?;
        let logged = self.last_number(&self.updates, session)?;
        stored.last_log_seq = counted.max(logged).unwrap_or(0);
        Ok(stored)
    }

    fn append_update(&self, session: &str, seq: u64, update: &[u8]) -> Result<(), StoreError> {
        check_session_id(session)?;
        self.updates
            .insert(numbered_key(session, seq), encode_update(update))
            .map_err(storage_error)?;
        self.touch(session)
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
        // No sled transaction here: one takes sled's global write lock, which every insert
        // of every session waits behind (and it waits for the flusher) — a 100 ms stall of
        // the whole relay for a snapshot. Instead the writes go in an order whose every
        // prefix a crash may leave behind safely: the record, then the counters, then the
        // deletions. Log entries a crash leaves under a newer snapshot are replayed on load
        // and change nothing (a Yjs update applies once). The session's whiteboard is the
        // only writer of its snapshots, one at a time.
        let covered_log: Vec<IVec> = self
            .updates
            .range(session_prefix(session)..=numbered_key(session, log_through))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(storage_error)?;
        let stored_versions: Vec<u64> = self
            .session_keys(&self.snapshots, session)?
            .iter()
            .filter_map(|key| key_number(key))
            .collect();
        let counted_version = self.read_counter(session, LAST_SNAPSHOT_VERSION)?;
        let last_version = counted_version
            .max(stored_versions.last().copied())
            .unwrap_or(0);
        let version = last_version.checked_add(1).ok_or_else(|| {
            StoreError::Corrupt(format!("snapshot version of {session} overflows"))
        })?;
        let created_at_ms = now_ms();
        let header = SnapshotHeader {
            format_version: SNAPSHOT_FORMAT_V1,
            session: session.to_owned(),
            version,
            created_at_ms,
            update_count,
            state_len: state.len() as u64,
            state_vector: state_vector.to_vec(),
        };
        self.snapshots
            .insert(
                numbered_key(session, version),
                encode_snapshot(&header, state)?,
            )
            .map_err(storage_error)?;
        self.write_counter(session, LAST_SNAPSHOT_VERSION, version)?;
        self.write_counter(session, LAST_ACTIVITY_MS, created_at_ms)?;
        // The deleted entries' seqs stay used: the counter keeps the largest of them, and
        // is written before they go.
        if let Some(last_covered) = covered_log.last().and_then(|key| key_number(key)) {
            let counted_seq = self.read_counter(session, LAST_LOG_SEQ)?;
            if counted_seq.is_none_or(|n| n < last_covered) {
                self.write_counter(session, LAST_LOG_SEQ, last_covered)?;
            }
        }
        for key in covered_log {
            self.updates.remove(key).map_err(storage_error)?;
        }
        for old in versions_to_prune(&stored_versions, version, self.keep_snapshots) {
            self.snapshots
                .remove(numbered_key(session, old))
                .map_err(storage_error)?;
        }
        Ok(version)
    }

    fn list_snapshots(&self, session: &str) -> Result<Vec<SnapshotInfo>, StoreError> {
        check_session_id(session)?;
        let mut versions = Vec::new();
        for entry in self.snapshots.scan_prefix(session_prefix(session)) {
            let (key, value) = entry.map_err(storage_error)?;
            match decode_snapshot_entry(session, &key, &value) {
                Ok((header, state)) => versions.push(SnapshotInfo {
                    version: header.version,
                    created_at_ms: header.created_at_ms,
                    bytes: state.len() as u64,
                    updates: header.update_count,
                }),
                Err(e) => self.report_damaged(SNAPSHOTS_TREE, &key, &e),
            }
        }
        Ok(versions)
    }

    fn get_snapshot(&self, session: &str, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        check_session_id(session)?;
        let key = numbered_key(session, version);
        let Some(value) = self.snapshots.get(&key).map_err(storage_error)? else {
            return Ok(None);
        };
        match decode_snapshot(session, version, &value) {
            Ok((_, state)) => Ok(Some(state.to_vec())),
            Err(e) => {
                self.report_damaged(SNAPSHOTS_TREE, &key, &e);
                Err(StoreError::Corrupt(format!(
                    "snapshot {version} of {session}: {e}"
                )))
            }
        }
    }

    fn list_sessions(&self) -> Result<Vec<SessionInfo>, StoreError> {
        let mut sessions: BTreeMap<String, SessionInfo> = BTreeMap::new();
        let trees = [
            (UPDATES_TREE, &self.updates),
            (SNAPSHOTS_TREE, &self.snapshots),
            (CHAT_TREE, &self.chat),
            (META_TREE, &self.meta),
        ];
        for (tree_name, tree) in trees {
            for entry in tree.iter() {
                let (key, value) = entry.map_err(storage_error)?;
                let Some((session, rest)) = split_key(&key) else {
                    self.report_damaged(tree_name, &key, "key is not `session \\0 ...`");
                    continue;
                };
                let info = sessions
                    .entry(session.to_owned())
                    .or_insert_with(|| SessionInfo {
                        id: session.to_owned(),
                        bytes: 0,
                        last_activity_ms: 0,
                        snapshots: 0,
                    });
                info.bytes += (key.len() + value.len()) as u64;
                if tree_name == SNAPSHOTS_TREE {
                    info.snapshots += 1;
                }
                if tree_name == META_TREE && rest == LAST_ACTIVITY_MS.as_bytes() {
                    if let Some(ms) = self.decode_counter_or_report(&key, Some(&value)) {
                        info.last_activity_ms = ms;
                    }
                }
            }
        }
        Ok(sessions.into_values().collect())
    }

    fn append_chat(
        &self,
        session: &str,
        message: &ChatMessage,
        history_limit: usize,
    ) -> Result<(), StoreError> {
        check_session_id(session)?;
        self.chat
            .insert(numbered_key(session, message.seq), encode_chat(message)?)
            .map_err(storage_error)?;
        let newest_seq = self.update_counter(session, LAST_CHAT_SEQ, |last| {
            Ok(last.unwrap_or(0).max(message.seq))
        })?;
        self.touch(session)?;
        self.trim_chat(session, newest_seq, history_limit)
    }

    fn chat_after(
        &self,
        session: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        check_session_id(session)?;
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let entries = self
            .chat
            .range(numbered_key(session, first)..session_end(session));
        self.decode_chat_entries(entries, limit)
    }

    fn chat_before(
        &self,
        session: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        check_session_id(session)?;
        let entries = self
            .chat
            .range(session_prefix(session)..numbered_key(session, before))
            .rev();
        let mut newest_first = self.decode_chat_entries(entries, limit)?;
        newest_first.reverse();
        Ok(newest_first)
    }

    fn last_chat_seq(&self, session: &str) -> Result<u64, StoreError> {
        check_session_id(session)?;
        let counted = self.read_counter(session, LAST_CHAT_SEQ)?;
        let stored = self.last_number(&self.chat, session)?;
        Ok(counted.max(stored).unwrap_or(0))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(storage_error)
    }

    fn check(&self) -> Result<(), StoreError> {
        self.meta
            .get(b"\0readiness-probe")
            .map(|_| ())
            .map_err(storage_error)
    }
}

// ---- keys ----

fn check_session_id(session: &str) -> Result<(), StoreError> {
    let valid = (1..=128).contains(&session.len())
        && session
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(StoreError::Io(
            "invalid session id: must match [A-Za-z0-9_-]{1,128}".into(),
        ))
    }
}

/// `session \0`: the prefix of every key of one session.
fn session_prefix(session: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(session.len() + 1 + 8);
    key.extend_from_slice(session.as_bytes());
    key.push(0);
    key
}

/// `session \x01`: the first key after every key of `session` (an exclusive range end).
fn session_end(session: &str) -> Vec<u8> {
    let mut key = session_prefix(session);
    if let Some(last) = key.last_mut() {
        *last = 1;
    }
    key
}

/// `session \0 n` with `n` big-endian: the key of log entries, snapshots and chat.
fn numbered_key(session: &str, n: u64) -> Vec<u8> {
    let mut key = session_prefix(session);
    key.extend_from_slice(&n.to_be_bytes());
    key
}

/// `session \0 name`: the key of a `meta` value.
fn named_key(session: &str, name: &str) -> Vec<u8> {
    let mut key = session_prefix(session);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Splits `session \0 rest`; `None` for a key not in that form.
fn split_key(key: &[u8]) -> Option<(&str, &[u8])> {
    let nul = key.iter().position(|&b| b == 0)?;
    let session = std::str::from_utf8(&key[..nul]).ok()?;
    Some((session, &key[nul + 1..]))
}

/// The number of a `session \0 n` key; `None` for a key not in that form.
fn key_number(key: &[u8]) -> Option<u64> {
    let (_, number) = split_key(key)?;
    Some(u64::from_be_bytes(number.try_into().ok()?))
}

/// A key as a log line shows it: `session/n` or `session/name`.
fn describe_key(key: &[u8]) -> String {
    match (split_key(key), key_number(key)) {
        (Some((session, _)), Some(n)) => format!("{session}/{n}"),
        (Some((session, rest)), None) => {
            format!("{session}/{}", String::from_utf8_lossy(rest))
        }
        (None, _) => format!("{:?}", String::from_utf8_lossy(key)),
    }
}

// ---- records ----

/// What precedes the Yjs state in a `snapshots` value (bincode 2, standard config).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotHeader {
    /// First, so a reader can tell the layout before decoding the rest.
    format_version: u16,
    session: String,
    version: u64,
    created_at_ms: u64,
    /// Updates folded into this snapshot since the previous one.
    update_count: u64,
    /// Length of the Yjs v1 state that follows the header.
    state_len: u64,
    /// The document's state vector, v1-encoded.
    state_vector: Vec<u8>,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_SNAPSHOT_HEADER_BYTES>()
}

fn encode_snapshot(header: &SnapshotHeader, state: &[u8]) -> Result<Vec<u8>, StoreError> {
    let mut record = bincode::serde::encode_to_vec(header, bincode_config())
        .map_err(|e| StoreError::Io(format!("cannot encode a snapshot header: {e}")))?;
    record.extend_from_slice(state);
    Ok(record)
}

/// A `snapshots` value split into header and state, checked against the key it was
/// stored under (`session`, `version`).
fn decode_snapshot<'a>(
    session: &str,
    version: u64,
    value: &'a [u8],
) -> Result<(SnapshotHeader, &'a [u8]), String> {
    let (format_version, _): (u16, usize) =
        bincode::serde::decode_from_slice(value, bincode_config())
            .map_err(|e| format!("snapshot header: {e}"))?;
    if format_version != SNAPSHOT_FORMAT_V1 {
        return Err(format!("unknown snapshot format version {format_version}"));
    }
    let (header, header_len): (SnapshotHeader, usize) =
        bincode::serde::decode_from_slice(value, bincode_config())
            .map_err(|e| format!("snapshot header: {e}"))?;
    let state = value.get(header_len..).unwrap_or_default();
    if header.session != session || header.version != version {
        return Err(format!(
            "header names {}/{}, stored under {session}/{version}",
            header.session, header.version
        ));
    }
    if header.state_len != state.len() as u64 {
        return Err(format!(
            "state is {} bytes, header says {}",
            state.len(),
            header.state_len
        ));
    }
    Ok((header, state))
}

/// [`decode_snapshot`] for an entry found by a scan (its version read from the key).
fn decode_snapshot_entry<'a>(
    session: &str,
    key: &[u8],
    value: &'a [u8],
) -> Result<(SnapshotHeader, &'a [u8]), String> {
    let version = key_number(key).ok_or("key is not `session \\0 version`")?;
    decode_snapshot(session, version, value)
}

/// Whether `state` decodes as a Yjs v1 update (yrs may panic on hostile input).
fn check_yjs_update(state: &[u8]) -> Result<(), String> {
    use yrs::updates::decoder::Decode;
    match std::panic::catch_unwind(|| yrs::Update::decode_v1(state)) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("state is not a Yjs v1 update: {e}")),
        Err(_) => Err("the Yjs decoder panicked on the state".into()),
    }
}

/// `format` then `body`: the shape of `updates`, `chat` and `meta` values.
fn versioned(format: u8, body: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(1 + body.len());
    record.push(format);
    record.extend_from_slice(body);
    record
}

/// The body of a `versioned` value of format 1.
fn v1_body<'a>(kind: &str, value: &'a [u8]) -> Result<&'a [u8], String> {
    match value.split_first() {
        Some((&RECORD_FORMAT_V1, body)) => Ok(body),
        Some((format, _)) => Err(format!("unknown {kind} format version {format}")),
        None => Err(format!("empty {kind} record")),
    }
}

fn encode_update(update: &[u8]) -> Vec<u8> {
    versioned(RECORD_FORMAT_V1, update)
}

fn decode_update(value: &[u8]) -> Result<&[u8], String> {
    v1_body("update", value)
}

fn encode_chat(message: &ChatMessage) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(message)
        .map_err(|e| StoreError::Io(format!("cannot encode a chat message: {e}")))?;
    Ok(versioned(RECORD_FORMAT_V1, &json))
}

fn decode_chat(value: &[u8]) -> Result<ChatMessage, String> {
    serde_json::from_slice(v1_body("chat", value)?).map_err(|e| format!("chat message: {e}"))
}

fn encode_counter(n: u64) -> [u8; 9] {
    let mut record = [0; 9];
    record[0] = RECORD_FORMAT_V1;
    record[1..].copy_from_slice(&n.to_be_bytes());
    record
}

fn decode_counter(value: &[u8]) -> Result<u64, String> {
    let body = v1_body("counter", value)?;
    let bytes: [u8; 8] = body
        .try_into()
        .map_err(|_| format!("counter is {} bytes, not 8", body.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

// ---- helpers ----

/// Which of `stored` (ascending) and the new `version` fall outside the newest `keep`.
fn versions_to_prune(stored: &[u64], version: u64, keep: usize) -> Vec<u64> {
    let mut all: Vec<u64> = stored.iter().copied().filter(|&v| v != version).collect();
    all.push(version);
    all.sort_unstable();
    let excess = all.len().saturating_sub(keep);
    all.truncate(excess);
    all
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn storage_error(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
        e => StoreError::Io(e.to_string()),
    }
}

/// The error of a failed open: the `locked:` one when another process holds `dir`.
fn open_error(dir: &Path, e: &sled::Error) -> StoreError {
    if is_lock_failure(e) {
        StoreError::Io(format!(
            "{LOCKED_PREFIX} the data directory {} is in use by another process \
             (a running `easel serve`?); use --server URL --token JWT to go through it",
            dir.display()
        ))
    } else {
        StoreError::Io(format!(
            "cannot open the data directory {}: {e}",
            dir.display()
        ))
    }
}

/// sled 0.34 reports a held lock as an I/O error "could not acquire lock on ...: WouldBlock".
fn is_lock_failure(e: &sled::Error) -> bool {
    let sled::Error::Io(io) = e else {
        return false;
    };
    if io.kind() == std::io::ErrorKind::WouldBlock {
        return true;
    }
    let message = io.to_string();
    [
        "could not acquire lock",
        "WouldBlock",
        "Resource temporarily unavailable",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::tutor::UserInfo;
    use yrs::{GetString, ReadTxn, StateVector, Text, Transact};

    const SESSION: &str = "room-1";

    /// Opens `dir`, waiting out the lock of a store this test just dropped: sled's flusher
    /// thread lets go of the directory a moment after the last handle is gone.
    fn open(dir: &Path) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open(dir, 10, 3, None) {
                Ok(store) => return store,
                Err(e) if is_locked_error(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("open: {e}"),
            }
        }
    }

    /// A Yjs v1 update inserting `text` into a fresh document's text `t`.
    fn text_update(text: &str) -> Vec<u8> {
        let doc = yrs::Doc::new();
        let t = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        t.insert(&mut txn, 0, text);
        txn.encode_update_v1()
    }

    /// The text `t` of a document built from `updates` in order.
    fn text_of(updates: &[Vec<u8>]) -> String {
        use yrs::updates::decoder::Decode;
        let doc = yrs::Doc::new();
        let t = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        for update in updates {
            txn.apply_update(yrs::Update::decode_v1(update).unwrap())
                .unwrap();
        }
        t.get_string(&txn)
    }

    /// The whole document of `updates` as (state, state vector).
    fn merged_state(updates: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
        use yrs::updates::decoder::Decode;
        use yrs::updates::encoder::Encode;
        let doc = yrs::Doc::new();
        let mut txn = doc.transact_mut();
        for update in updates {
            txn.apply_update(yrs::Update::decode_v1(update).unwrap())
                .unwrap();
        }
        let state = txn.encode_state_as_update_v1(&StateVector::default());
        (state, txn.state_vector().encode_v1())
    }

    fn chat(seq: u64) -> ChatMessage {
        ChatMessage {
            seq,
            client_id: Some(format!("c{seq}")),
            from: UserInfo {
                id: "u1".into(),
                name: "Ada".into(),
                role: "tutor".into(),
            },
            text: format!("message {seq}"),
            ts: "2024-01-01T00:00:00Z".into(),
        }
    }

    fn seqs(messages: &[ChatMessage]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    fn versions(store: &SledStore, session: &str) -> Vec<u64> {
        let list = store.list_snapshots(session).unwrap();
        list.iter().map(|s| s.version).collect()
    }

    #[test]
    fn log_and_snapshot_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = text_update("hello");
        let (state, sv) = merged_state(std::slice::from_ref(&first));
        let later = [text_update("A"), text_update("B")];
        {
            let store = open(dir.path());
            assert_eq!(store.load_whiteboard(SESSION).unwrap().updates.len(), 0);
            store.append_update(SESSION, 1, &first).unwrap();
            assert_eq!(store.write_snapshot(SESSION, &state, &sv, 1, 1).unwrap(), 1);
            for (seq, update) in (2..).zip(&later) {
                store.append_update(SESSION, seq, update).unwrap();
            }
            store.flush().unwrap();
        }
        let store = open(dir.path());
        let loaded = store.load_whiteboard(SESSION).unwrap();
        assert_eq!(loaded.snapshot_version, 1);
        assert_eq!(loaded.last_log_seq, 3);
        assert_eq!(
            loaded.updates,
            vec![state, later[0].clone(), later[1].clone()]
        );
        let text = text_of(&loaded.updates);
        assert!(text.contains("hello") && text.contains('A') && text.contains('B'));
        let info = store.list_snapshots(SESSION).unwrap();
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].updates, 1);
        assert_eq!(info[0].bytes, loaded.updates[0].len() as u64);
        assert!(info[0].created_at_ms > 0);
    }

    #[test]
    fn snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let updates = [text_update("a"), text_update("b"), text_update("c")];
        for (seq, update) in (1..).zip(&updates) {
            store.append_update(SESSION, seq, update).unwrap();
            store.append_update("other", seq, update).unwrap();
        }
        // An update appended while the snapshot of the first three was encoded.
        let late = text_update("d");
        store.append_update(SESSION, 4, &late).unwrap();
        let (state, sv) = merged_state(&updates);
        store.write_snapshot(SESSION, &state, &sv, 3, 3).unwrap();

        let loaded = store.load_whiteboard(SESSION).unwrap();
        assert_eq!(loaded.updates, vec![state.clone(), late.clone()]);
        assert_eq!(loaded.last_log_seq, 4);
        // Another session's log is untouched.
        assert_eq!(store.load_whiteboard("other").unwrap().updates.len(), 3);

        // Once the last entry is covered too, the seq counter still knows where it was.
        let (state, sv) = merged_state(&[updates.to_vec(), vec![late]].concat());
        store.write_snapshot(SESSION, &state, &sv, 1, 4).unwrap();
        assert!(store
            .session_keys(&store.updates, SESSION)
            .unwrap()
            .is_empty());
        let loaded = store.load_whiteboard(SESSION).unwrap();
        assert_eq!((loaded.updates.len(), loaded.last_log_seq), (1, 4));
        // Appends after the snapshot continue the log.
        store.append_update(SESSION, 5, &updates[0]).unwrap();
        assert_eq!(store.load_whiteboard(SESSION).unwrap().updates.len(), 2);
    }

    #[test]
    fn keeps_newest_snapshots_and_never_reuses_versions() {
        let dir = tempfile::tempdir().unwrap();
        let (state, sv) = merged_state(&[text_update("x")]);
        {
            let store = open(dir.path()); // keep_snapshots = 3
            for expected in 1..=5 {
                assert_eq!(
                    store.write_snapshot(SESSION, &state, &sv, 0, 0).unwrap(),
                    expected
                );
            }
            assert_eq!(versions(&store, SESSION), vec![3, 4, 5]);
            assert_eq!(store.get_snapshot(SESSION, 1).unwrap(), None);
            assert_eq!(store.get_snapshot(SESSION, 5).unwrap(), Some(state.clone()));
        }
        let store = open(dir.path());
        assert_eq!(store.write_snapshot(SESSION, &state, &sv, 0, 0).unwrap(), 6);
        // Even with every stored version gone, the counter in meta goes on.
        for key in store.session_keys(&store.snapshots, SESSION).unwrap() {
            store.snapshots.remove(key).unwrap();
        }
        assert_eq!(store.write_snapshot(SESSION, &state, &sv, 0, 0).unwrap(), 7);
        assert_eq!(versions(&store, SESSION), vec![7]);
    }

    #[test]
    fn damaged_newest_snapshot_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let store = SledStore::open(dir.path(), 10, 5, Some(metrics.clone())).unwrap();
        let (old_state, old_sv) = merged_state(&[text_update("old")]);
        let (new_state, new_sv) = merged_state(&[text_update("new")]);
        store
            .write_snapshot(SESSION, &old_state, &old_sv, 1, 0)
            .unwrap();
        store
            .write_snapshot(SESSION, &new_state, &new_sv, 1, 0)
            .unwrap();
        store
            .snapshots
            .insert(numbered_key(SESSION, 2), &b"garbage, not a snapshot"[..])
            .unwrap();
        // A log entry that does not decode is skipped too.
        store
            .append_update(SESSION, 1, &text_update("log"))
            .unwrap();
        store
            .updates
            .insert(numbered_key(SESSION, 999), &[9u8, 1, 2][..])
            .unwrap();

        let loaded = store.load_whiteboard(SESSION).unwrap();
        assert_eq!(loaded.snapshot_version, 1);
        assert_eq!(loaded.updates.len(), 2);
        assert_eq!(loaded.updates[0], old_state);
        assert_eq!(metrics.store_decode_errors.get(), 2);

        assert_eq!(versions(&store, SESSION), vec![1]);
        assert!(matches!(
            store.get_snapshot(SESSION, 2),
            Err(StoreError::Corrupt(_))
        ));
        assert!(metrics.store_decode_errors.get() >= 4);
    }

    #[test]
    fn snapshot_whose_state_is_not_yjs_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (state, sv) = merged_state(&[text_update("good")]);
        store.write_snapshot(SESSION, &state, &sv, 1, 0).unwrap();
        store
            .write_snapshot(SESSION, &[0xff; 16], &sv, 1, 0)
            .unwrap();
        let loaded = store.load_whiteboard(SESSION).unwrap();
        assert_eq!(loaded.snapshot_version, 1);
        assert_eq!(loaded.updates, vec![state]);
    }

    #[test]
    fn chat_is_ordered_trimmed_and_keeps_its_last_seq() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            assert_eq!(store.last_chat_seq(SESSION).unwrap(), 0);
            for seq in 1..=300 {
                store.append_chat(SESSION, &chat(seq), 1000).unwrap();
            }
            // Big-endian keys keep numeric order across byte boundaries (255 -> 256).
            let all = store.chat_after(SESSION, 0, 1000).unwrap();
            assert_eq!(seqs(&all), (1..=300).collect::<Vec<_>>());
            assert_eq!(all[0], chat(1));

            store.append_chat(SESSION, &chat(301), 5).unwrap();
            assert_eq!(
                seqs(&store.chat_after(SESSION, 0, 100).unwrap()),
                vec![297, 298, 299, 300, 301]
            );
            assert_eq!(
                seqs(&store.chat_after(SESSION, 298, 2).unwrap()),
                vec![299, 300]
            );
            assert!(store.chat_after(SESSION, u64::MAX, 10).unwrap().is_empty());
            assert_eq!(
                seqs(&store.chat_before(SESSION, 301, 2).unwrap()),
                vec![299, 300]
            );
            assert_eq!(
                seqs(&store.chat_before(SESSION, u64::MAX, 3).unwrap()),
                vec![299, 300, 301]
            );
            assert!(store.chat_before(SESSION, 297, 10).unwrap().is_empty());
            assert!(store.chat_after("other", 0, 10).unwrap().is_empty());
            store.flush().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.last_chat_seq(SESSION).unwrap(), 301);
        store.append_chat(SESSION, &chat(302), 0).unwrap();
        assert!(store.chat_after(SESSION, 0, 10).unwrap().is_empty());
        assert_eq!(store.last_chat_seq(SESSION).unwrap(), 302);
        assert_eq!(store.last_chat_seq("other").unwrap(), 0);
    }

    #[test]
    fn second_open_of_a_held_directory_is_a_locked_error() {
        let dir = tempfile::tempdir().unwrap();
        let _held = open(dir.path());
        let Err(e) = SledStore::open(dir.path(), 10, 3, None) else {
            panic!("a second open of a held directory succeeded");
        };
        assert!(is_locked_error(&e), "{e}");
        let message = e.to_string();
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(message.contains("--server URL --token JWT"), "{message}");
        assert!(!is_locked_error(&StoreError::Io("disk full".into())));
    }

    #[test]
    fn lists_sessions_with_size_activity_and_snapshot_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert!(store.list_sessions().unwrap().is_empty());
        let (state, sv) = merged_state(&[text_update("x")]);
        store.append_update("b", 1, &text_update("y")).unwrap();
        store.write_snapshot("a", &state, &sv, 1, 0).unwrap();
        store.write_snapshot("a", &state, &sv, 1, 0).unwrap();
        store.append_chat("c", &chat(1), 10).unwrap();

        let sessions = store.list_sessions().unwrap();
        let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b", "c"]);
        assert_eq!(
            sessions.iter().map(|s| s.snapshots).collect::<Vec<_>>(),
            vec![2, 0, 0]
        );
        assert!(sessions[0].bytes > 2 * state.len() as u64);
        assert!(sessions
            .iter()
            .all(|s| s.bytes > 0 && s.last_activity_ms > 0));
    }

    #[test]
    fn rejects_session_ids_that_would_break_the_key_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for bad in ["", "a\0b", "a/b", &"x".repeat(129)] {
            assert!(store.append_update(bad, 1, b"").is_err(), "{bad:?}");
            assert!(store.load_whiteboard(bad).is_err(), "{bad:?}");
        }
        store.check().unwrap();
    }

    #[test]
    fn records_round_trip_and_reject_unknown_formats() {
        assert_eq!(decode_counter(&encode_counter(42)), Ok(42));
        assert!(decode_counter(&[2, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        assert!(decode_counter(&[1, 0]).is_err());
        assert_eq!(decode_update(&encode_update(b"abc")), Ok(&b"abc"[..]));
        assert!(decode_update(&[]).is_err());
        assert_eq!(decode_chat(&encode_chat(&chat(7)).unwrap()), Ok(chat(7)));
        assert_eq!(versions_to_prune(&[1, 2, 3], 4, 3), vec![1]);
        assert_eq!(versions_to_prune(&[], 1, 3), Vec::<u64>::new());
        assert_eq!(describe_key(&numbered_key("s", 3)), "s/3");
        assert_eq!(
            describe_key(&named_key("s", LAST_CHAT_SEQ)),
            "s/last_chat_seq"
        );
    }
}
