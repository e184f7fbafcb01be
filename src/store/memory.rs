//! [`MemoryStore`]: the [`Store`](super::Store) seam held in process memory. State outlives
//! a session's unload from the registry but not the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::{Store, StoreError, StoredWhiteboard};
use crate::protocol::tutor::ChatMessage;

#[derive(Default)]
struct SessionData {
    snapshot: Option<Vec<u8>>,
    snapshot_version: u64,
    log: Vec<Vec<u8>>,
    chat: BTreeMap<u64, ChatMessage>,
    last_seq: u64,
}

#[derive(Default)]
pub struct MemoryStore {
    sessions: Mutex<HashMap<String, SessionData>>,
}

impl MemoryStore {
    fn with<T>(&self, session: &str, f: impl FnOnce(&mut SessionData) -> T) -> T {
        // A panic elsewhere cannot leave this map half-written: every closure is infallible.
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        f(map.entry(session.to_owned()).or_default())
    }
}

impl Store for MemoryStore {
    fn load_whiteboard(&self, session: &str) -> Result<StoredWhiteboard, StoreError> {
        Ok(self.with(session, |s| StoredWhiteboard {
            updates: s.snapshot.iter().chain(s.log.iter()).cloned().collect(),
        }))
    }

    fn append_update(&self, session: &str, update: &[u8]) -> Result<(), StoreError> {
        self.with(session, |s| s.log.push(update.to_vec()));
        Ok(())
    }

    fn write_snapshot(&self, session: &str, state: &[u8], _count: u64) -> Result<u64, StoreError> {
        Ok(self.with(session, |s| {
            s.snapshot = Some(state.to_vec());
            s.log.clear();
            s.snapshot_version += 1;
            s.snapshot_version
        }))
    }

    fn append_chat(
        &self,
        session: &str,
        message: &ChatMessage,
        history_limit: usize,
    ) -> Result<(), StoreError> {
        self.with(session, |s| {
            s.chat.insert(message.seq, message.clone());
            s.last_seq = s.last_seq.max(message.seq);
            while s.chat.len() > history_limit {
                s.chat.pop_first();
            }
        });
        Ok(())
    }

    fn chat_after(
        &self,
        session: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        Ok(self.with(session, |s| {
            s.chat
                .range(after.saturating_add(1)..)
                .take(limit)
                .map(|(_, m)| m.clone())
                .collect()
        }))
    }

    fn chat_before(
        &self,
        session: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        Ok(self.with(session, |s| {
            let mut v: Vec<_> = s
                .chat
                .range(..before)
                .rev()
                .take(limit)
                .map(|(_, m)| m.clone())
                .collect();
            v.reverse();
            v
        }))
    }

    fn last_chat_seq(&self, session: &str) -> Result<u64, StoreError> {
        Ok(self.with(session, |s| s.last_seq))
    }
}
