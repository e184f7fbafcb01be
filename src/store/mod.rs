//! Durable state behind one seam: the [`Store`] trait.
//!
//! A store keeps, per session, the whiteboard's update log and snapshots and the chat log.
//! Sessions call it; it never calls back into a session, holds no live document and knows
//! nothing of sockets. Implementations: [`MemoryStore`] (state for the life of the process,
//! the seam the relay was built against); [`SledStore`] fills the same trait, and a
//! Redis-backed one can later, without touching the WebSocket handlers.
//!
//! # On disk (the sled store)
//!
//! One sled database per data directory, holding six trees. Every key starts with the
//! session id and a `\0` byte. Session ids match `[A-Za-z0-9_-]{1,128}` (checked on every
//! call), so `session \0` is a prefix no other session shares, and a prefix scan visits one
//! session's records in key order. Numbers in keys are big-endian `u64`, so key order is
//! numeric order and a range scan is a range of sequence numbers.
//!
//! | tree        | key                         | value |
//! |-------------|-----------------------------|-------|
//! | `updates`   | `session \0 seq` (u64 BE)   | `0x01`, then one accepted Yjs v1 update; or `0x02`, then a run of updates appended together ([`Store::append_updates`]), each after its u32 BE length, under the seq of the last (the others' seqs are the ones before it) |
//! | `snapshots` | `session \0 version` (u64 BE) | a bincode-2 `SnapshotHeader` (`format_version: u16 = 1`, session, version, `created_at_ms`, `update_count`, `state_len`, `state_vector`), then the whole document as a Yjs v1 update (`state_len` bytes) |
//! | `chat`      | `session \0 seq` (u64 BE)   | `0x01`, then the [`ChatMessage`] as JSON (the object clients receive, so fields can be added with serde defaults) |
//! | `meta`      | `session \0 name` (ASCII)   | `0x01`, then a u64 BE |
//! | `chat_edits` | `session \0 at_ms seq` (two u64 BE) | `0x01`, then a [`ChatEdit`] as JSON: the latest edit or deletion of message `seq` (one entry per message; see `sled/chat_edits.rs`) |
//! | `moderation` | `session \0 user id` (UTF-8) | `0x01`, then a [`ModerationRecord`] as JSON |
//!
//! The `meta` names:
//!
//! | name                    | meaning |
//! |-------------------------|---------|
//! | `last_log_seq`          | the largest seq of the `updates` entries a snapshot deleted; with the newest entry left, it says where the session's next seq starts, so seqs are never reused |
//! | `last_snapshot_version` | the highest snapshot version written; never reused, even once pruned |
//! | `last_chat_seq`         | the highest chat seq stored; survives trimming and restarts |
//! | `chat_seq_reserved`     | chat seqs up to this one may have been shown to clients (reserved in blocks of [`CHAT_SEQ_BLOCK`]) |
//! | `last_activity_ms`      | time of the session's last write, in ms since the Unix epoch |
//!
//! The first byte (or, for snapshots, the first bincode field) of every value is its format
//! version, 1 today: a later layout writes version 2 and keeps reading version 1.
//!
//! Beside the database, every snapshot version is also a plain file,
//! `versions/<session>/<N>.yjs` (the Yjs v1 state, written to a temporary name, fsynced,
//! renamed): what `easel store recover` rebuilds a damaged database from, and what a load
//! falls back on when the database lost a version it had.
//!
//! In the code: `sled/keys.rs` builds the keys, `sled/records.rs` the values,
//! `sled/versions.rs` the files.
//!
//! Files: `memory.rs` ([`MemoryStore`]) and `sled/` ([`SledStore`]) implement the seam;
//! [`repair`] is `easel store check` / `recover`, [`compact`] is `easel store compact`;
//! `chat_edits.rs` holds the SPEC 4.1 records (edit log, moderation). This module must not touch sessions,
//! documents or sockets.

mod chat_edits;
pub mod compact;
mod memory;
pub mod redis;
pub mod repair;
mod sled;

use std::path::PathBuf;
use std::sync::LockResult;

pub use self::memory::MemoryStore;
pub use self::redis::{
    ClientIdentity, Cursor, PresenceChange, PresenceEntry, RedisStore, RedisTarget, StreamEntry,
    StreamReader,
};
pub use self::sled::{remove_stale_files, SledSettings, SledStore, CHAT_SEQ_BLOCK, VERSIONS_DIR};

pub use chat_edits::{ChatEdit, ModerationRecord};

use crate::protocol::tutor::ChatMessage;

/// The error a storage backend failed with underneath (sled's, the file system's, an
/// encoder's), kept whole as the [`StoreError::Io`] source.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A store failure. Callers log it and refuse the operation; they never panic on it.
///
/// Callers tell the cases apart by variant, never by text. The texts are the ones users
/// have always seen (`storage I/O: …`, `damaged data: …`); [`StoreError::Io`] shows its
/// source's text too, because most callers print only the top error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (a running `easel serve`, or a tool run beside one) holds the data
    /// directory.
    #[error(
        "storage I/O: locked: the data directory {} is in use by another process \
         (a running `easel serve`?); use --server URL --token JWT to go through it",
        .dir.display()
    )]
    Locked { dir: PathBuf },
    /// A session id outside `[A-Za-z0-9_-]{1,128}`: it would break the key layout.
    #[error("storage I/O: invalid session id: must match [A-Za-z0-9_-]{{1,128}}")]
    InvalidSession,
    /// The store refuses writes for now (a nearly full disk, a failed write it has not yet
    /// recovered from, a reopen in progress, a stuck flush); the reason.
    #[error("storage I/O: {0}")]
    Unavailable(String),
    /// The storage underneath failed: what the store was doing (empty when the source says
    /// it all) and the error it failed with.
    #[error("storage I/O: {}", io_message(.context, .source))]
    Io {
        context: String,
        #[source]
        source: BackendError,
    },
    #[error("damaged data: {0}")]
    Corrupt(String),
    /// A store shared over the network (Redis, in cluster mode) cannot be reached or did
    /// not answer in time: nothing was written. Unlike a failing disk this is expected to
    /// pass by itself, so writers are told to come back (close 1013), not that the server
    /// failed (1011).
    #[error("shared store unreachable: {0}")]
    Unreachable(String),
}

impl StoreError {
    /// [`StoreError::Io`] for `source`, with no context.
    pub fn io(source: impl Into<BackendError>) -> Self {
        Self::Io {
            context: String::new(),
            source: source.into(),
        }
    }

    /// [`StoreError::Io`] for `source`, saying what the store was doing.
    pub fn io_while(context: impl Into<String>, source: impl Into<BackendError>) -> Self {
        Self::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    /// Whether the file system was full (ENOSPC) underneath: an I/O error of the file
    /// system or of sled somewhere in the source chain, or a panic of sled's whose message
    /// names it (a panic carries nothing but its text).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => disk_full_in(source.as_ref()),
            StoreError::Corrupt(panicked) => panicked.contains("No space left"),
            _ => false,
        }
    }
}

fn disk_full_in(error: &(dyn std::error::Error + 'static)) -> bool {
    let full = |io: &std::io::Error| {
        io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(libc::ENOSPC)
    };
    let mut next = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>().is_some_and(full) {
            return true;
        }
        if let Some(::sled::Error::Io(io)) = e.downcast_ref::<::sled::Error>() {
            if full(io) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

fn io_message(context: &str, source: &BackendError) -> String {
    if context.is_empty() {
        source.to_string()
    } else {
        format!("{context}: {source}")
    }
}

/// The guard of a lock whatever a panicking holder left poisoned: every store and doc
/// structure behind a lock is whole between statements (no invariant spans a panic
/// point), so the data is still good. The one helper for this in `store/` (`doc/` holds no lock).
pub(crate) fn unpoisoned<G>(result: LockResult<G>) -> G {
    result.unwrap_or_else(|e| e.into_inner())
}

/// One record of a stored whiteboard, as [`Store::scan_whiteboard`] reads it.
#[derive(Debug, Clone, Copy)]
pub enum StoredRecord<'a> {
    /// The newest snapshot that decodes (a Yjs v1 state, and its version), before any
    /// update. A scan that reads the log in pages ([`RedisStore`](crate::store::RedisStore))
    /// may hand over a second one after some updates: a snapshot written while it read,
    /// which includes everything handed over before it.
    Snapshot { version: u64, state: &'a [u8] },
    /// An update logged after it, as the client sent it.
    Update(&'a [u8]),
}

/// What a session needs to rebuild its document: updates to apply in order (the latest
/// snapshot that decodes first, then the log written after it).
#[derive(Debug, Default)]
pub struct StoredWhiteboard {
    pub updates: Vec<Vec<u8>>,
    /// Version of the snapshot the updates start from (0: none).
    pub snapshot_version: u64,
    /// The highest log seq the session ever used (0: none). The next append uses a larger
    /// one: seqs are never reused, even after a snapshot deleted the entries.
    pub last_log_seq: u64,
}

impl StoredWhiteboard {
    /// What `scan` hands over (a [`Store::scan_whiteboard`]), kept: how a store that
    /// streams its records builds its [`Store::load_whiteboard`].
    pub fn collect(
        scan: impl FnOnce(&mut dyn FnMut(StoredRecord<'_>)) -> Result<u64, StoreError>,
    ) -> Result<Self, StoreError> {
        let mut stored = Self::default();
        let last_log_seq = scan(&mut |record| stored.take(record))?;
        stored.last_log_seq = last_log_seq;
        Ok(stored)
    }

    /// Keeps the next record of a scan. A snapshot replaces whatever came before it (a
    /// second one, written while the scan read, includes it).
    fn take(&mut self, record: StoredRecord<'_>) {
        match record {
            StoredRecord::Snapshot { version, state } => {
                self.updates.clear();
                self.updates.push(state.to_vec());
                self.snapshot_version = version;
            }
            StoredRecord::Update(update) => self.updates.push(update.to_vec()),
        }
    }

    /// Hands the records to `each` in order, as [`Store::scan_whiteboard`] does; returns
    /// the last log seq.
    pub fn hand_over(&self, each: &mut dyn FnMut(StoredRecord<'_>)) -> u64 {
        if let Some(state) = self.snapshot() {
            each(StoredRecord::Snapshot {
                version: self.snapshot_version,
                state,
            });
        }
        for update in self.log() {
            each(StoredRecord::Update(update));
        }
        self.last_log_seq
    }

    /// The snapshot the updates start from, if there is one.
    pub fn snapshot(&self) -> Option<&[u8]> {
        self.updates
            .first()
            .filter(|_| self.snapshot_version > 0)
            .map(Vec::as_slice)
    }

    /// The log entries written after the snapshot (all of them without one).
    pub fn log(&self) -> &[Vec<u8>] {
        &self.updates[usize::from(self.snapshot().is_some())..]
    }
}

/// One stored snapshot version, as `easel snapshot list` and the HTTP API show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotInfo {
    pub version: u64,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Size of the Yjs v1 state.
    pub bytes: u64,
    /// Updates folded into this snapshot since the previous one.
    pub updates: u64,
}

/// A session in the store, as `easel sessions` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionInfo {
    pub id: String,
    /// Bytes stored for the session (snapshots, log and chat).
    pub bytes: u64,
    /// Milliseconds since the Unix epoch of the last write.
    pub last_activity_ms: u64,
    pub snapshots: usize,
}

impl StoreError {
    /// The same failure once more, for a second party to be told (the error holds a source
    /// that cannot be cloned): its kind where it has no source, its text otherwise.
    pub fn again(&self) -> StoreError {
        match self {
            StoreError::Locked { dir } => StoreError::Locked { dir: dir.clone() },
            StoreError::InvalidSession => StoreError::InvalidSession,
            StoreError::Unavailable(why) => StoreError::Unavailable(why.clone()),
            StoreError::Corrupt(why) => StoreError::Corrupt(why.clone()),
            other => StoreError::Unavailable(
                other
                    .to_string()
                    .trim_start_matches("storage I/O: ")
                    .to_string(),
            ),
        }
    }
}

/// Durable per-session state. Methods are synchronous and may touch the disk: async
/// callers run them on a blocking thread, or accept a short in-memory write (`append_*`).
pub trait Store: Send + Sync + 'static {
    /// The stored whiteboard of a session (empty for a new one).
    fn load_whiteboard(&self, session: &str) -> Result<StoredWhiteboard, StoreError>;

    /// The same records as [`Store::load_whiteboard`], in the same order, handed to `each`
    /// as they are read and kept by none; returns [`StoredWhiteboard::last_log_seq`]. A
    /// snapshot's rebuild reads the whole log since the last one, and read whole first that
    /// log was the largest single thing a busy board held in memory (90 MB of a 317 MB heap
    /// peak; BENCHMARKS.md, issue 13, fourteenth round). sled streams its entries, Redis
    /// reads pages of 256; the memory store, which holds everything anyway, keeps this
    /// default.
    fn scan_whiteboard(
        &self,
        session: &str,
        each: &mut dyn FnMut(StoredRecord<'_>),
    ) -> Result<u64, StoreError> {
        Ok(self.load_whiteboard(session)?.hand_over(each))
    }

    /// Appends an accepted update to the session's log and returns the seq it was stored
    /// under. A store that one process owns (sled, memory) stores it as entry `seq`: the
    /// session owns its seqs (one writer, under its own lock), each larger than the last,
    /// starting after [`StoredWhiteboard::last_log_seq`]. A store that several nodes share
    /// (Redis) assigns the seq itself, atomically with the append, and takes `seq` only as a
    /// floor (one past the last the session has seen: a Redis that lost writes must not
    /// hand out again a seq that was seen); the session goes on from the one returned.
    /// This is one write, with no read: it runs on the relay path of every update.
    fn append_update(&self, session: &str, seq: u64, update: &[u8]) -> Result<u64, StoreError>;

    /// Appends several accepted updates, in order, as seqs `first_seq`, `first_seq + 1`, …
    /// (the rules of [`Store::append_update`]), and returns the last seq stored. All or
    /// none: a store that writes them as one entry makes them durable together; this
    /// default writes them one by one, and a failure part way leaves the first ones stored,
    /// which is safe (a stored update the document no longer holds is applied again on the
    /// next load, and a Yjs update applies once). The sequencer hands a run of updates it
    /// applied together here (`session::whiteboard`): one write per run instead of per update.
    fn append_updates(
        &self,
        session: &str,
        first_seq: u64,
        updates: &[&[u8]],
    ) -> Result<u64, StoreError> {
        let mut last = first_seq.saturating_sub(1);
        for (seq, update) in (first_seq..).zip(updates) {
            last = self.append_update(session, seq, update)?;
        }
        Ok(last)
    }

    /// Records the whole document (`state`, a Yjs v1 update; `state_vector`, v1-encoded)
    /// as the next snapshot version, replacing the log entries it includes: those with a
    /// seq up to `log_through`. Entries appended meanwhile (a larger seq) stay, so the
    /// caller need not keep updates out while it encodes and writes. Keeps the newest
    /// `keep_snapshots` versions. Returns the new version number.
    fn write_snapshot(
        &self,
        session: &str,
        state: &[u8],
        state_vector: &[u8],
        update_count: u64,
        log_through: u64,
    ) -> Result<u64, StoreError>;

    /// The session's snapshot versions, oldest first. Records that do not decode are
    /// skipped (and logged and counted by the implementation).
    fn list_snapshots(&self, session: &str) -> Result<Vec<SnapshotInfo>, StoreError>;

    /// The Yjs v1 state of one snapshot version, `None` if there is no such version.
    fn get_snapshot(&self, session: &str, version: u64) -> Result<Option<Vec<u8>>, StoreError>;

    /// Every session with anything stored.
    fn list_sessions(&self) -> Result<Vec<SessionInfo>, StoreError>;

    /// Appends a chat message, trimming the session's history to `history_limit` messages,
    /// and returns the seq it was stored under: `message.seq`, assigned by the caller, in a
    /// store one process owns; the next seq of the session, assigned atomically with the
    /// append (gapless across nodes), in a store several nodes share (Redis), which takes
    /// `message.seq` only as a floor, as [`Store::append_update`] takes `seq`.
    fn append_chat(
        &self,
        session: &str,
        message: &ChatMessage,
        history_limit: usize,
    ) -> Result<u64, StoreError>;

    /// Up to `limit` messages with `seq > after`, oldest first.
    fn chat_after(
        &self,
        session: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError>;

    /// Up to `limit` messages with `seq < before`, the newest of them, oldest first.
    fn chat_before(
        &self,
        session: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError>;

    /// The highest `seq` ever assigned in the session (0 for none), surviving trimming.
    fn last_chat_seq(&self, session: &str) -> Result<u64, StoreError>;

    // ---- SPEC 4.1: edits, deletions and moderation (records in `chat_edits.rs`). A store
    // that keeps none of it keeps these defaults: nothing to read, every write refused.

    /// One stored message (`None`: never posted, or trimmed).
    fn chat_get(&self, session: &str, seq: u64) -> Result<Option<ChatMessage>, StoreError> {
        let _ = (session, seq);
        Ok(None)
    }

    /// Replaces stored message `message.seq` with its edited or deleted form (a deleted one
    /// keeps no text) and records `edit` in the session's edit log, ordered by
    /// `(at_ms, seq)`, removing the message's previous entry (at `previous_at_ms`): the log
    /// holds at most one entry per message, its latest change.
    fn chat_amend(
        &self,
        session: &str,
        message: &ChatMessage,
        edit: &ChatEdit,
        previous_at_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        let _ = (session, message, edit, previous_at_ms);
        Err(StoreError::Unavailable(
            "this store keeps no chat edits".into(),
        ))
    }

    /// Up to `limit` edit-log entries ordered after `after` = `(at_ms, seq)`, oldest first.
    fn chat_edits_after(
        &self,
        session: &str,
        after: (u64, u64),
        limit: usize,
    ) -> Result<Vec<ChatEdit>, StoreError> {
        let _ = (session, after, limit);
        Ok(Vec::new())
    }

    /// Every moderation record of the session (mutes and bans, expired ones included).
    fn moderation(&self, session: &str) -> Result<Vec<ModerationRecord>, StoreError> {
        let _ = session;
        Ok(Vec::new())
    }

    /// Stores a user's moderation record; one with nothing in force is deleted.
    fn set_moderation(&self, session: &str, record: &ModerationRecord) -> Result<(), StoreError> {
        let _ = (session, record);
        Err(StoreError::Unavailable(
            "this store keeps no moderation".into(),
        ))
    }

    /// Makes everything written so far durable (fsync).
    fn flush(&self) -> Result<(), StoreError>;

    /// Whether the storage is usable (for `/readyz`): `Err` with the reason while it
    /// cannot write.
    fn check(&self) -> Result<(), StoreError>;

    /// Makes everything durable before the process ends (shutdown): releases what the
    /// store reserved ahead (chat seqs) and flushes.
    fn close(&self) -> Result<(), StoreError> {
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts users and logs see are the ones the string-typed errors had; only the
    /// way callers tell them apart changed.
    #[test]
    fn typed_errors_keep_their_texts_and_sources() {
        let locked = StoreError::Locked {
            dir: PathBuf::from("/data"),
        };
        assert_eq!(
            locked.to_string(),
            "storage I/O: locked: the data directory /data is in use by another process \
             (a running `easel serve`?); use --server URL --token JWT to go through it"
        );
        assert_eq!(
            StoreError::InvalidSession.to_string(),
            "storage I/O: invalid session id: must match [A-Za-z0-9_-]{1,128}"
        );
        let full = || ::sled::Error::Io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        let open = StoreError::io_while("cannot open the data directory /data", full());
        assert_eq!(
            open.to_string(),
            format!(
                "storage I/O: cannot open the data directory /data: {}",
                full()
            )
        );
        assert!(open.is_disk_full());
        assert!(std::error::Error::source(&open).is_some());
        assert_eq!(
            StoreError::io(full()).to_string(),
            format!("storage I/O: {}", full())
        );
        let other = StoreError::io(std::io::Error::other("boom"));
        assert!(!other.is_disk_full());
        assert!(!locked.is_disk_full());
    }
}
