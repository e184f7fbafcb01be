//! Durable state behind one seam: the [`Store`] trait.
//!
//! A store keeps, per session, the whiteboard's update log and snapshots and the chat log.
//! Sessions call it; it never calls back into a session, holds no live document and knows
//! nothing of sockets. Implementations: [`MemoryStore`] (state for the life of the process,
//! the seam the relay was built against); a sled-backed store fills the same trait, and a
//! Redis-backed one can later, without touching the WebSocket handlers.

mod chat_edits;
pub mod compact;
mod memory;
pub mod repair;
mod sled_store;

pub use memory::MemoryStore;
pub use sled_store::{
    is_locked_error, remove_stale_files, SledSettings, SledStore, CHAT_SEQ_BLOCK, VERSIONS_DIR,
};

pub use chat_edits::{ChatEdit, ModerationRecord};

use crate::protocol::tutor::ChatMessage;

/// A store failure. Callers log it and refuse the operation; they never panic on it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O: {0}")]
    Io(String),
    #[error("damaged data: {0}")]
    Corrupt(String),
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

/// Durable per-session state. Methods are synchronous and may touch the disk: async
/// callers run them on a blocking thread, or accept a short in-memory write (`append_*`).
pub trait Store: Send + Sync + 'static {
    /// The stored whiteboard of a session (empty for a new one).
    fn load_whiteboard(&self, session: &str) -> Result<StoredWhiteboard, StoreError>;

    /// Appends an accepted update to the session's log as entry `seq`. The session owns
    /// its seqs (one writer, under its own lock): each append uses a seq larger than the
    /// last, starting after [`StoredWhiteboard::last_log_seq`]. This is one insert, with
    /// no read: it runs on the relay path of every update.
    fn append_update(&self, session: &str, seq: u64, update: &[u8]) -> Result<(), StoreError>;

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

    /// Appends a chat message (its `seq` already assigned by the caller), trimming the
    /// session's history to `history_limit` messages.
    fn append_chat(
        &self,
        session: &str,
        message: &ChatMessage,
        history_limit: usize,
    ) -> Result<(), StoreError>;

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
        Err(StoreError::Io("this store keeps no chat edits".into()))
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
        Err(StoreError::Io("this store keeps no moderation".into()))
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
