//! Durable state behind one seam: the [`Store`] trait.
//!
//! A store keeps, per session, the whiteboard's update log and snapshots and the chat log.
//! Sessions call it; it never calls back into a session, holds no live document and knows
//! nothing of sockets. Implementations: [`MemoryStore`] (state for the life of the process,
//! the seam the relay was built against); a sled-backed store fills the same trait, and a
//! Redis-backed one can later, without touching the WebSocket handlers.

mod memory;

pub use memory::MemoryStore;

use crate::protocol::tutor::ChatMessage;

/// A store failure. Callers log it and refuse the operation; they never panic on it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O: {0}")]
    Io(String),
    #[error("stored record does not decode: {0}")]
    Corrupt(String),
}

/// What a session needs to rebuild its document: updates to apply in order (the latest
/// snapshot first, then the log written after it).
#[derive(Debug, Default)]
pub struct StoredWhiteboard {
    pub updates: Vec<Vec<u8>>,
}

pub trait Store: Send + Sync + 'static {
    /// The stored whiteboard of a session (empty for a new one).
    fn load_whiteboard(&self, session: &str) -> Result<StoredWhiteboard, StoreError>;

    /// Appends an accepted update to the session's log.
    fn append_update(&self, session: &str, update: &[u8]) -> Result<(), StoreError>;

    /// Records the whole document as a snapshot replacing the log; returns its version.
    fn write_snapshot(
        &self,
        session: &str,
        state: &[u8],
        update_count: u64,
    ) -> Result<u64, StoreError>;

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

    /// The highest `seq` ever assigned in the session (0 for none).
    fn last_chat_seq(&self, session: &str) -> Result<u64, StoreError>;
}
