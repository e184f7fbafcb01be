//! [`MemoryStore`]: the [`Store`] seam held in process memory, for tests
//! and tools that need no disk. State outlives a session's unload but not the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{
    ChatEdit, ModerationRecord, SessionInfo, SnapshotInfo, Store, StoreError, StoredWhiteboard,
};
use crate::protocol::tutor::ChatMessage;

#[derive(Default)]
struct SessionData {
    snapshots: BTreeMap<u64, (SnapshotInfo, Vec<u8>)>,
    /// (seq, update), oldest first.
    log: Vec<(u64, Vec<u8>)>,
    last_log_seq: u64,
    chat: BTreeMap<u64, ChatMessage>,
    last_seq: u64,
    last_activity_ms: u64,
    /// The chat edit log, by `(at_ms, seq)`, and moderation by user (SPEC 4.1).
    edits: BTreeMap<(u64, u64), ChatEdit>,
    moderation: BTreeMap<String, ModerationRecord>,
}

pub struct MemoryStore {
    sessions: Mutex<HashMap<String, SessionData>>,
    keep_snapshots: usize,
}

impl MemoryStore {
    pub fn new(keep_snapshots: usize) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            keep_snapshots: keep_snapshots.max(1),
        }
    }

    fn with<T>(&self, session: &str, f: impl FnOnce(&mut SessionData) -> T) -> T {
        // Every closure below is infallible, so a poisoned lock still guards whole data.
        let mut map = super::unpoisoned(self.sessions.lock());
        let data = map.entry(session.to_owned()).or_default();
        data.last_activity_ms = now_ms();
        f(data)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(20)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store for MemoryStore {
    fn load_whiteboard(&self, session: &str) -> Result<StoredWhiteboard, StoreError> {
        Ok(self.with(session, |s| {
            let latest = s.snapshots.iter().next_back();
            StoredWhiteboard {
                snapshot_version: latest.map(|(v, _)| *v).unwrap_or(0),
                updates: latest
                    .map(|(_, (_, state))| state)
                    .into_iter()
                    .chain(s.log.iter().map(|(_, u)| u))
                    .cloned()
                    .collect(),
                last_log_seq: s.last_log_seq,
            }
        }))
    }

    fn append_update(&self, session: &str, seq: u64, update: &[u8]) -> Result<u64, StoreError> {
        self.with(session, |s| {
            s.log.push((seq, update.to_vec()));
            s.last_log_seq = s.last_log_seq.max(seq);
        });
        Ok(seq)
    }

    fn write_snapshot(
        &self,
        session: &str,
        state: &[u8],
        _state_vector: &[u8],
        update_count: u64,
        log_through: u64,
    ) -> Result<u64, StoreError> {
        let keep = self.keep_snapshots;
        Ok(self.with(session, |s| {
            let version = s.snapshots.keys().next_back().copied().unwrap_or(0) + 1;
            let info = SnapshotInfo {
                version,
                created_at_ms: now_ms(),
                bytes: state.len() as u64,
                updates: update_count,
            };
            s.snapshots.insert(version, (info, state.to_vec()));
            while s.snapshots.len() > keep {
                s.snapshots.pop_first();
            }
            s.log.retain(|(seq, _)| *seq > log_through);
            version
        }))
    }

    fn list_snapshots(&self, session: &str) -> Result<Vec<SnapshotInfo>, StoreError> {
        Ok(self.with(session, |s| {
            s.snapshots.values().map(|(i, _)| i.clone()).collect()
        }))
    }

    fn get_snapshot(&self, session: &str, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.with(session, |s| {
            s.snapshots.get(&version).map(|(_, st)| st.clone())
        }))
    }

    fn list_sessions(&self) -> Result<Vec<SessionInfo>, StoreError> {
        let map = super::unpoisoned(self.sessions.lock());
        let mut out: Vec<SessionInfo> = map
            .iter()
            .map(|(id, s)| SessionInfo {
                id: id.clone(),
                bytes: s.snapshots.values().map(|(i, _)| i.bytes).sum::<u64>()
                    + s.log.iter().map(|(_, u)| u.len() as u64).sum::<u64>(),
                last_activity_ms: s.last_activity_ms,
                snapshots: s.snapshots.len(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn append_chat(
        &self,
        session: &str,
        message: &ChatMessage,
        history_limit: usize,
    ) -> Result<u64, StoreError> {
        self.with(session, |s| {
            s.chat.insert(message.seq, message.clone());
            s.last_seq = s.last_seq.max(message.seq);
            while s.chat.len() > history_limit {
                // The trimmed message's edit-log entry goes with it (as in the sled store).
                if let Some((seq, _)) = s.chat.pop_first() {
                    s.edits.retain(|&(_, edited), _| edited != seq);
                }
            }
        });
        Ok(message.seq)
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

    fn chat_get(&self, session: &str, seq: u64) -> Result<Option<ChatMessage>, StoreError> {
        Ok(self.with(session, |s| s.chat.get(&seq).cloned()))
    }

    fn chat_amend(
        &self,
        session: &str,
        message: &ChatMessage,
        edit: &ChatEdit,
        previous_at_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        self.with(session, |s| {
            if let Some(at) = previous_at_ms {
                s.edits.remove(&(at, edit.seq));
            }
            s.edits.insert((edit.at_ms, edit.seq), edit.clone());
            s.chat.insert(message.seq, message.clone());
        });
        Ok(())
    }

    fn chat_edits_after(
        &self,
        session: &str,
        after: (u64, u64),
        limit: usize,
    ) -> Result<Vec<ChatEdit>, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        Ok(self.with(session, |s| {
            s.edits
                .range((Excluded(after), Unbounded))
                .take(limit)
                .map(|(_, e)| e.clone())
                .collect()
        }))
    }

    fn moderation(&self, session: &str) -> Result<Vec<ModerationRecord>, StoreError> {
        Ok(self.with(session, |s| s.moderation.values().cloned().collect()))
    }

    fn set_moderation(&self, session: &str, record: &ModerationRecord) -> Result<(), StoreError> {
        self.with(session, |s| {
            if record.is_cleared() {
                s.moderation.remove(&record.user);
            } else {
                s.moderation.insert(record.user.clone(), record.clone());
            }
        });
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
