//! [`SledStore`]: the [`Store`] seam on an embedded sled 0.34 database, the
//! durable store behind `easel serve` and the offline `easel snapshot` / `easel sessions`.
//!
//! # Layout
//!
//! The on-disk layout (trees, keys, values, `meta` names, `versions/` files) is described in
//! [`crate::store`]; `keys.rs` and `records.rs` encode it.
//!
//! # Invariants and crash safety
//!
//! - No sled transaction or batch is used: either takes sled's global write lock, which
//!   every insert of every session then waits behind. Multi-record writes go in an order
//!   whose every prefix is safe to leave after a crash instead.
//! - [`Store::write_snapshot`] writes the version file, inserts the snapshot, raises
//!   `last_snapshot_version` and `last_log_seq`, **flushes** (a version number an answer
//!   shows is on disk before it is shown, SPEC 5.1), then deletes the log entries the
//!   snapshot includes and prunes to the newest `keep_snapshots` versions (records and
//!   files), in that order. After a crash midway, some entries the newest snapshot includes
//!   may remain: loading replays them, which changes nothing (a Yjs update applies once).
//!   The next version is above the counter, the newest record and the newest file.
//! - Chat seqs are never handed out twice: with `durability = "sync"` every message is
//!   flushed before it is shown; with `"batch"`, before a message whose seq passes the session's
//!   reservation is stored, `chat_seq_reserved` is raised by a block of
//!   [`CHAT_SEQ_BLOCK`] and flushed (one fsync per block, not per message). After a crash,
//!   [`Store::last_chat_seq`] answers the reservation, so the first seq after a restart is
//!   above every seq a client may have seen (a gap, never a reuse). Within one process the
//!   reservation is known to be this process's own and the real last seq is answered (no
//!   gap when a session is unloaded and loaded again), and [`Store::close`] lowers the
//!   reservations to the real last seqs, so a clean restart leaves no gap either.
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
//! - sled's page cache is `persist.cache_mb` (sled's own default is 1 GiB, which a server
//!   opening many sessions grows into).
//!
//! # When the disk fails (SPEC 5.4)
//!
//! sled handles a failed write badly (a sticky error, or a flush that never returns), so
//! the store refuses writes itself while the disk is nearly full or after a failed write,
//! and its monitor thread probes the directory and reopens sled once it can write again:
//! see `health.rs`.
//!
//! # Damaged records
//!
//! A value that does not decode is logged, counted and skipped (see `scan.rs`); a failure
//! of sled itself while reading is returned as [`StoreError::Io`]. Nothing read from disk
//! is unwrapped. Damage sled refuses to open is for `easel store recover`
//! ([`super::repair`]).
//!
//! # Locking
//!
//! sled locks its directory while open. A second open (another `easel serve`, or a tool
//! run beside one) fails with [`StoreError::Locked`].
//!
//! # Files
//!
//! - this file: [`SledStore`], its settings and the [`Store`] impl (what each call writes,
//!   in which order);
//! - `keys.rs` and `records.rs`: the layout of [`crate::store`], key and value encoding;
//! - `versions.rs`: the `versions/` files; `counters.rs`: the `meta` counters;
//!   `scan.rs`: reading records back and reporting damage;
//! - `health.rs`: the write gate, the monitor thread, recovery from a failed disk;
//! - `open.rs`: opening sled, and the locked-directory error;
//! - `chat_edits.rs`: the SPEC 4.1 edit log and moderation records;
//! - `tests.rs`: the store's tests through the seam.

mod chat_edits;
mod counters;
mod health;
pub(super) mod keys;
mod open;
pub(super) mod records;
mod scan;
#[cfg(test)]
mod tests;
mod versions;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sled::{IVec, Tree};

use self::health::{free_bytes, monitor, Health, LARGE_VALUE, SPACE_MARGIN};
use self::keys::{
    check_session_id, key_number, numbered_key, session_end, session_keys, session_prefix,
    split_key, CHAT_SEQ_RESERVED, CHAT_TREE, LAST_ACTIVITY_MS, LAST_CHAT_SEQ, LAST_LOG_SEQ,
    LAST_SNAPSHOT_VERSION, META_TREE, SNAPSHOTS_TREE, UPDATES_TREE,
};
use self::open::open_sled;
use self::records::{
    decode_snapshot, decode_snapshot_entry, encode_chat, encode_snapshot, encode_updates,
    SnapshotHeader, SNAPSHOT_FORMAT_V1,
};
use super::{
    unpoisoned, ChatEdit, ModerationRecord, SessionInfo, SnapshotInfo, Store, StoreError,
    StoredRecord, StoredWhiteboard,
};
use crate::metrics::Metrics;
use crate::protocol::tutor::ChatMessage;

pub(crate) use self::open::quiet_catch_unwind;
pub use self::open::remove_stale_files;
pub(crate) use self::versions::version_files_in;
pub use self::versions::VERSIONS_DIR;

/// Chat seqs reserved (and flushed) at a time: one fsync per this many messages of a
/// session, and at most this many seqs skipped after a crash.
pub const CHAT_SEQ_BLOCK: u64 = 32;

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct SledSettings {
    /// Flush every this many ms (0: only on [`Store::flush`]).
    pub flush_interval_ms: u64,
    /// Versions kept per session (at least 1).
    pub keep_snapshots: usize,
    /// sled's page cache, in MiB.
    pub cache_mb: u64,
    /// `persist.durability = "sync"`: every chat message is flushed before it is shown,
    /// so no seq needs reserving ahead (and a crash leaves no gap).
    pub sync_durability: bool,
}

impl SledSettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            flush_interval_ms: config.persist.flush_interval_ms,
            keep_snapshots: config.persist.keep_snapshots,
            cache_mb: config.persist.cache_mb,
            sync_durability: config.persist.durability == crate::config::Durability::Sync,
        }
    }
}

/// The open database and its trees. Swapped whole when the store reopens after a failure.
struct Trees {
    db: sled::Db,
    updates: Tree,
    snapshots: Tree,
    chat: Tree,
    meta: Tree,
    /// SPEC 4.1 (see `chat_edits.rs`).
    chat_edits: Tree,
    moderation: Tree,
}

/// The trees whose writes are acknowledged to clients one by one, so the write gate
/// (`health.rs`) tracks them: undone when reported failed, carried over a reopen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TreeId {
    Updates,
    Chat,
    ChatEdits,
    Moderation,
}

impl Trees {
    fn tree(&self, id: TreeId) -> &Tree {
        match id {
            TreeId::Updates => &self.updates,
            TreeId::Chat => &self.chat,
            TreeId::ChatEdits => &self.chat_edits,
            TreeId::Moderation => &self.moderation,
        }
    }
}

struct Shared {
    dir: PathBuf,
    settings: SledSettings,
    trees: RwLock<Option<Arc<Trees>>>,
    health: Mutex<Health>,
    /// When the flush in progress started (`None`: none is).
    flushing_since: Mutex<Option<Instant>>,
    /// Chat seq reservations made by this process: session → highest reserved seq.
    chat_reserved: Mutex<HashMap<String, u64>>,
    metrics: Option<Arc<Metrics>>,
}

/// The store on a sled database. See the module documentation for the layout.
pub struct SledStore {
    shared: Arc<Shared>,
}

impl SledStore {
    /// Opens (creating if needed) the database in `dir` with sled's page cache at 64 MiB.
    /// Writes are flushed to disk every `flush_interval_ms` (0: only on [`Store::flush`]);
    /// each session keeps its newest `keep_snapshots` versions (at least 1). `metrics`
    /// counts records that do not decode.
    pub fn open(
        dir: &Path,
        flush_interval_ms: u64,
        keep_snapshots: usize,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, StoreError> {
        Self::open_with(
            dir,
            SledSettings {
                flush_interval_ms,
                keep_snapshots,
                cache_mb: 64,
                sync_durability: false,
            },
            metrics,
        )
    }

    /// [`SledStore::open`] with every setting, and the monitor thread (flushes, disk
    /// probes, reopening after a failure) running while the store lives.
    pub fn open_with(
        dir: &Path,
        settings: SledSettings,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, StoreError> {
        if super::compact::interrupted(dir) {
            return Err(StoreError::Corrupt(format!(
                "{} holds an interrupted `easel store compact`; run `easel store compact --data-dir {}` again to finish it",
                dir.display(),
                dir.display()
            )));
        }
        let trees = open_sled(dir, &settings)?;
        if let Some(metrics) = &metrics {
            metrics.store_writable.set(1);
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            settings: SledSettings {
                keep_snapshots: settings.keep_snapshots.max(1),
                ..settings
            },
            trees: RwLock::new(Some(Arc::new(trees))),
            health: Mutex::new(Health::default()),
            flushing_since: Mutex::new(None),
            chat_reserved: Mutex::new(HashMap::new()),
            metrics,
        });
        // Not ready from the first request on a full disk, not one monitor tick later.
        if let Some(free) = free_bytes(dir).filter(|&free| free < SPACE_MARGIN) {
            shared.fail(
                format!("disk full: {free} bytes free in {}", dir.display()),
                false,
            );
        }
        let weak = Arc::downgrade(&shared);
        let spawned = std::thread::Builder::new()
            .name("easel-store-monitor".into())
            .spawn(move || monitor(weak));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the store monitor: no recovery from write failures without a restart");
        }
        Ok(Self { shared })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

impl Shared {
    /// The session's newest loadable snapshot, then its log, handed to `each`; returns the
    /// last log seq.
    fn scan(
        &self,
        session: &str,
        each: &mut dyn FnMut(StoredRecord<'_>),
    ) -> Result<u64, StoreError> {
        check_session_id(session)?;
        let t = self.trees()?;
        if let Some((version, state)) = self.newest_loadable_snapshot(&t, session)? {
            each(StoredRecord::Snapshot {
                version,
                state: &state,
            });
        }
        self.for_each_logged(&t, session, &mut |update| {
            each(StoredRecord::Update(update))
        })?;
        let counted = self.read_counter(&t, session, LAST_LOG_SEQ)?;
        let logged = self.last_number(&t.updates, session)?;
        Ok(counted.max(logged).unwrap_or(0))
    }

    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        unpoisoned(self.trees.read()).clone().ok_or_else(|| {
            StoreError::Unavailable("the store is reopening after a write failure".into())
        })
    }
}

impl Store for SledStore {
    fn load_whiteboard(&self, session: &str) -> Result<StoredWhiteboard, StoreError> {
        StoredWhiteboard::collect(|each| self.shared.scan(session, each))
    }

    /// Reads the log one entry (a run of up to 16 updates) at a time.
    fn scan_whiteboard(
        &self,
        session: &str,
        each: &mut dyn FnMut(StoredRecord<'_>),
    ) -> Result<u64, StoreError> {
        self.shared.scan(session, each)
    }

    fn append_update(&self, session: &str, seq: u64, update: &[u8]) -> Result<u64, StoreError> {
        self.append_updates(session, seq, &[update])
    }

    /// One entry for the run, under the last one's seq: one sled insert (and one
    /// last-activity write) instead of one each, and the run is durable together. A run of
    /// one is a format-1 entry, as every earlier version wrote.
    fn append_updates(
        &self,
        session: &str,
        first_seq: u64,
        updates: &[&[u8]],
    ) -> Result<u64, StoreError> {
        check_session_id(session)?;
        let Some(count) = (updates.len() as u64).checked_sub(1) else {
            return Ok(first_seq.saturating_sub(1));
        };
        let last = first_seq + count;
        let s = &self.shared;
        s.writable()?;
        let t = s.trees()?;
        s.insert_entry(
            &t,
            TreeId::Updates,
            numbered_key(session, last),
            encode_updates(updates),
        )?;
        if let Err(e) = s.write_counter(&t, session, LAST_ACTIVITY_MS, now_ms()) {
            s.report_failed(TreeId::Updates, &numbered_key(session, last));
            return Err(e);
        }
        Ok(last)
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
        let s = &self.shared;
        s.writable()?;
        s.ensure_space(state.len().saturating_mul(2).max(LARGE_VALUE))?;
        let t = s.trees()?;
        // No sled transaction here: one takes sled's global write lock, which every insert
        // of every session waits behind (and it waits for the flusher) — a 100 ms stall of
        // the whole relay for a snapshot. Instead the writes go in an order whose every
        // prefix a crash may leave behind safely: the file, the record, the counters, a
        // flush, then the deletions. Log entries a crash leaves under a newer snapshot are
        // replayed on load and change nothing (a Yjs update applies once). The session's
        // whiteboard is the only writer of its snapshots, one at a time.
        let covered_log: Vec<IVec> = t
            .updates
            .range(session_prefix(session)..=numbered_key(session, log_through))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(storage_error)?;
        let stored_versions: Vec<u64> = session_keys(&t.snapshots, session)?
            .iter()
            .filter_map(|key| key_number(key))
            .collect();
        let counted_version = s.read_counter(&t, session, LAST_SNAPSHOT_VERSION)?;
        let last_version = counted_version
            .max(stored_versions.last().copied())
            .max(s.version_files(session).last().copied())
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
        s.write_version_file(session, version, state)?;
        s.written(t.snapshots.insert(
            numbered_key(session, version),
            encode_snapshot(&header, state)?,
        ))?;

        s.write_counter(&t, session, LAST_SNAPSHOT_VERSION, version)?;
        s.write_counter(&t, session, LAST_ACTIVITY_MS, created_at_ms)?;
        // The deleted entries' seqs stay used: the counter keeps the largest of them, and
        // is written before they go.
        if let Some(last_covered) = covered_log.last().and_then(|key| key_number(key)) {
            let counted_seq = s.read_counter(&t, session, LAST_LOG_SEQ)?;
            if counted_seq.is_none_or(|n| n < last_covered) {
                s.write_counter(&t, session, LAST_LOG_SEQ, last_covered)?;
            }
        }
        // The version number is returned to a client: it must be on disk first.
        s.flush_trees(&t, false)?;
        for key in covered_log {
            s.written(t.updates.remove(key))?;
        }
        for old in versions_to_prune(&stored_versions, version, s.settings.keep_snapshots) {
            s.written(t.snapshots.remove(numbered_key(session, old)))?;
        }
        s.prune_version_files(session);
        Ok(version)
    }

    fn list_snapshots(&self, session: &str) -> Result<Vec<SnapshotInfo>, StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        let t = s.trees()?;
        let mut versions = Vec::new();
        for entry in t.snapshots.scan_prefix(session_prefix(session)) {
            let (key, value) = entry.map_err(storage_error)?;
            match decode_snapshot_entry(session, &key, &value) {
                Ok((header, state)) => versions.push(SnapshotInfo {
                    version: header.version,
                    created_at_ms: header.created_at_ms,
                    bytes: state.len() as u64,
                    updates: header.update_count,
                }),
                Err(e) => s.report_damaged(SNAPSHOTS_TREE, &key, &e),
            }
        }
        Ok(versions)
    }

    fn get_snapshot(&self, session: &str, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        let t = s.trees()?;
        let key = numbered_key(session, version);
        let Some(value) = t.snapshots.get(&key).map_err(storage_error)? else {
            return Ok(s.read_version_file(session, version).ok());
        };
        match decode_snapshot(session, version, &value) {
            Ok((_, state)) => Ok(Some(state.to_vec())),
            Err(e) => {
                s.report_damaged(SNAPSHOTS_TREE, &key, &e);
                match s.read_version_file(session, version) {
                    Ok(state) => Ok(Some(state)),
                    Err(_) => Err(StoreError::Corrupt(format!(
                        "snapshot {version} of {session}: {e}"
                    ))),
                }
            }
        }
    }

    fn list_sessions(&self) -> Result<Vec<SessionInfo>, StoreError> {
        let s = &self.shared;
        let t = s.trees()?;
        let mut sessions: BTreeMap<String, SessionInfo> = BTreeMap::new();
        let trees = [
            (UPDATES_TREE, &t.updates),
            (SNAPSHOTS_TREE, &t.snapshots),
            (CHAT_TREE, &t.chat),
            (META_TREE, &t.meta),
        ];
        for (tree_name, tree) in trees {
            for entry in tree.iter() {
                let (key, value) = entry.map_err(storage_error)?;
                let Some((session, rest)) = split_key(&key) else {
                    s.report_damaged(tree_name, &key, "key is not `session \\0 ...`");
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
                    if let Some(ms) = s.decode_counter_or_report(&key, Some(&value)) {
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
    ) -> Result<u64, StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        s.writable()?;
        let t = s.trees()?;
        // The seq is shown to clients once this returns: reserve past it, durably, first.
        // (A session's messages come one at a time, under its room's lock; the map's lock
        // is not held across the flush, so other sessions do not wait for it.)
        let known = unpoisoned(s.chat_reserved.lock()).get(session).copied();
        let known = match known {
            Some(r) => r,
            None => s.read_counter(&t, session, CHAT_SEQ_RESERVED)?.unwrap_or(0),
        };
        if message.seq > known && !s.settings.sync_durability {
            let block_end = message.seq.saturating_add(CHAT_SEQ_BLOCK - 1);
            s.write_counter(&t, session, CHAT_SEQ_RESERVED, block_end)?;
            s.flush_trees(&t, false)?;
            let mut reserved = unpoisoned(s.chat_reserved.lock());
            let entry = reserved.entry(session.to_owned()).or_insert(0);
            *entry = (*entry).max(block_end);
        }
        s.insert_entry(
            &t,
            TreeId::Chat,
            numbered_key(session, message.seq),
            encode_chat(message)?,
        )?;
        // A blind write, not a compare-and-swap keeping the larger: a session's seqs are
        // assigned by its one tutor room, one at a time on its lane, each above every seq
        // the store knew at load (`last_chat_seq`), so the counter never holds more than
        // `message.seq`. Were there a second writer, the max would not save it: the two
        // would already hand out the same seq.
        let counted = s
            .write_counter(&t, session, LAST_CHAT_SEQ, message.seq)
            .and_then(|()| s.write_counter(&t, session, LAST_ACTIVITY_MS, now_ms()))
            .and_then(|()| s.trim_chat(&t, session, message.seq, history_limit));
        if let Err(e) = counted {
            s.report_failed(TreeId::Chat, &numbered_key(session, message.seq));
            return Err(e);
        }
        Ok(message.seq)
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
        let t = self.shared.trees()?;
        let entries = t
            .chat
            .range(numbered_key(session, first)..session_end(session));
        self.shared.decode_chat_entries(entries, limit)
    }

    fn chat_before(
        &self,
        session: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        check_session_id(session)?;
        let t = self.shared.trees()?;
        let entries = t
            .chat
            .range(session_prefix(session)..numbered_key(session, before))
            .rev();
        let mut newest_first = self.shared.decode_chat_entries(entries, limit)?;
        newest_first.reverse();
        Ok(newest_first)
    }

    fn last_chat_seq(&self, session: &str) -> Result<u64, StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        let t = s.trees()?;
        let stored = s.stored_chat_seq(&t, session)?;
        if unpoisoned(s.chat_reserved.lock()).contains_key(session) {
            // Reserved by this process: every seq it handed out is stored (or failed).
            return Ok(stored);
        }
        // A reservation left by a process that did not close cleanly: some of those seqs
        // may have been shown before the messages reached the disk. Start above them.
        let reserved = s.read_counter(&t, session, CHAT_SEQ_RESERVED)?.unwrap_or(0);
        Ok(stored.max(reserved))
    }

    fn chat_get(&self, session: &str, seq: u64) -> Result<Option<ChatMessage>, StoreError> {
        self.sled_chat_get(session, seq)
    }

    fn chat_amend(
        &self,
        session: &str,
        message: &ChatMessage,
        edit: &ChatEdit,
        previous_at_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        self.sled_chat_amend(session, message, edit, previous_at_ms)
    }

    fn chat_edits_after(
        &self,
        session: &str,
        after: (u64, u64),
        limit: usize,
    ) -> Result<Vec<ChatEdit>, StoreError> {
        self.sled_chat_edits_after(session, after, limit)
    }

    fn moderation(&self, session: &str) -> Result<Vec<ModerationRecord>, StoreError> {
        self.sled_moderation(session)
    }

    fn set_moderation(&self, session: &str, record: &ModerationRecord) -> Result<(), StoreError> {
        self.sled_set_moderation(session, record)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let t = self.shared.trees()?;
        self.shared.flush_trees(&t, true)
    }

    fn check(&self) -> Result<(), StoreError> {
        self.shared.check()
    }

    fn close(&self) -> Result<(), StoreError> {
        let s = &self.shared;
        let t = s.trees()?;
        // Every seq this process reserved but did not use is free again: a clean restart
        // continues without a gap.
        let reserved: Vec<String> = unpoisoned(s.chat_reserved.lock()).keys().cloned().collect();
        if s.writable().is_ok() {
            for session in reserved {
                let last = s.stored_chat_seq(&t, &session)?;
                s.write_counter(&t, &session, CHAT_SEQ_RESERVED, last)?;
                // The reservation on disk is gone, so the one in memory goes too: a message
                // a straggling connection posts after this reserves (and flushes) anew.
                unpoisoned(s.chat_reserved.lock()).remove(&session);
            }
        }
        s.flush_trees(&t, true)
    }
}

/// Which of `stored` (ascending) and the new `version` fall outside the newest `keep`.
fn versions_to_prune(stored: &[u64], version: u64, keep: usize) -> Vec<u64> {
    let mut all: Vec<u64> = stored.iter().copied().filter(|&v| v != version).collect();
    all.push(version);
    all.sort_unstable();
    let excess = all.len().saturating_sub(keep);
    all.truncate(excess);
    all
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) fn storage_error(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
        e => StoreError::io(e),
    }
}
