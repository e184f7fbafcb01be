//! The records SPEC 4.1 adds behind the [`Store`](super::Store) seam: the chat edit log
//! and per-user moderation. Plain data, encoded as JSON by the stores that keep them on
//! disk; what they mean (who may edit, when a mute ends) is the tutor room's business.

use serde::{Deserialize, Serialize};

use crate::protocol::tutor::UserInfo;

/// The latest change to one chat message: an edit or a deletion (which one is read off
/// the stored message: a deleted message has `deleted_at`). The log is ordered by
/// `(at_ms, seq)`, so "every change since time T" is one range read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatEdit {
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Who made the change.
    pub by: UserInfo,
}

/// A user's moderation in one session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModerationRecord {
    pub user: String,
    /// Muted (until `muted_until_ms` when set, else until unmuted).
    pub muted: bool,
    pub muted_until_ms: Option<u64>,
    /// Removed: new connections are refused until then (ms since the Unix epoch).
    pub banned_until_ms: Option<u64>,
    /// Whether an admin set the mute, and the ban. A tutor's mute or removal never holds
    /// against a user who comes as an admin: a tutor may not moderate an admin (SPEC 4.1),
    /// yet cannot be refused a user id that is not present, whose role nobody knows until
    /// it connects. Records written before these fields read as set by a tutor.
    pub mute_by_admin: bool,
    pub ban_by_admin: bool,
}

impl ModerationRecord {
    /// Whether the user is muted at `now_ms`.
    pub fn muted_at(&self, now_ms: u64) -> bool {
        self.muted && self.muted_until_ms.is_none_or(|until| until > now_ms)
    }

    /// Whether the user is banned at `now_ms`.
    pub fn banned_at(&self, now_ms: u64) -> bool {
        self.banned_until_ms.is_some_and(|until| until > now_ms)
    }

    /// Whether the user, coming as an admin (`admin`) or not, is muted at `now_ms`.
    pub fn muted_for(&self, now_ms: u64, admin: bool) -> bool {
        self.muted_at(now_ms) && (!admin || self.mute_by_admin)
    }

    /// Whether the user, coming as an admin (`admin`) or not, is banned at `now_ms`.
    pub fn banned_for(&self, now_ms: u64, admin: bool) -> bool {
        self.banned_at(now_ms) && (!admin || self.ban_by_admin)
    }

    /// Whether nothing is set at all: a store deletes such a record rather than keep it.
    pub fn is_cleared(&self) -> bool {
        !self.muted && self.banned_until_ms.is_none()
    }

    /// Whether nothing is in force at `now_ms` (the record can go).
    pub fn is_spent(&self, now_ms: u64) -> bool {
        !self.muted_at(now_ms) && !self.banned_at(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::tutor::ChatMessage;
    use crate::store::{MemoryStore, Store};

    /// The memory store keeps the same records, in the same order, as the sled store (whose
    /// test is in `sled_store/chat_edits.rs`).
    #[test]
    fn the_memory_store_keeps_edits_and_moderation() {
        let store = MemoryStore::default();
        for seq in 1..=2 {
            let m = ChatMessage {
                seq,
                text: format!("m{seq}"),
                ..Default::default()
            };
            store.append_chat("s", &m, 100).unwrap();
        }
        let edit = |seq, at_ms| ChatEdit {
            seq,
            at_ms,
            by: UserInfo::default(),
        };
        let edited = ChatMessage {
            seq: 2,
            text: "m2!".into(),
            ..Default::default()
        };
        store.chat_amend("s", &edited, &edit(2, 10), None).unwrap();
        store
            .chat_amend("s", &edited, &edit(2, 30), Some(10))
            .unwrap();
        store.chat_amend("s", &edited, &edit(1, 20), None).unwrap();
        let log: Vec<(u64, u64)> = store
            .chat_edits_after("s", (0, 0), 10)
            .unwrap()
            .iter()
            .map(|e| (e.at_ms, e.seq))
            .collect();
        assert_eq!(log, [(20, 1), (30, 2)]);
        assert_eq!(store.chat_edits_after("s", (20, 1), 10).unwrap().len(), 1);
        assert_eq!(store.chat_get("s", 2).unwrap().unwrap().text, "m2!");
        // Trimming a changed message takes its log entry too (limit 2: seq 1 goes).
        let m3 = ChatMessage {
            seq: 3,
            ..Default::default()
        };
        store.append_chat("s", &m3, 2).unwrap();
        assert_eq!(store.chat_edits_after("s", (0, 0), 10).unwrap().len(), 1);

        let record = ModerationRecord {
            user: "bob".into(),
            muted: true,
            ..Default::default()
        };
        store.set_moderation("s", &record).unwrap();
        assert_eq!(store.moderation("s").unwrap(), [record]);
        store
            .set_moderation(
                "s",
                &ModerationRecord {
                    user: "bob".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(store.moderation("s").unwrap().is_empty());
    }
}
