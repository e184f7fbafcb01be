//! The sled side of SPEC 4.1: the chat edit log and moderation records, as an `impl`
//! block of [`SledStore`] whose methods the `Store` impl calls in one line each.
//!
//! - `chat_edits`: key `session \0 at_ms seq` ([`edit_key`]), value `0x01` + a
//!   [`ChatEdit`] as JSON. One entry per message (its latest change): an amend inserts the
//!   new entry, then overwrites the message, then removes the previous entry, so a crash
//!   midway leaves at worst an extra entry, which a resume answers with the message's
//!   current state (harmless: clients apply edits idempotently). Trimming a message
//!   removes its entry (`scan.rs`), so the log holds at most one entry (about 100 bytes)
//!   per message kept; one an amend's crash left over is skipped by readers.
//! - `moderation`: key `session \0 user id` ([`named_key`]), value `0x01` + a
//!   [`ModerationRecord`] as JSON; a record with nothing set is deleted.
//!
//! Every write goes through the write gate's [`Shared::overwrite_entry`](super::Shared)
//! (trees [`TreeId::Chat`], [`TreeId::ChatEdits`], [`TreeId::Moderation`]): an amend is
//! acknowledged to every client, so until it is flushed it is carried over a reopen after
//! a disk failure (a deleted text must not come back), and one reported as failed is
//! undone to what the key held (never a deleted key: that would lose the original message).
//!
//! The overwritten message's old bytes stay in sled's log segments until sled rewrites
//! them; `easel store compact` ([`crate::store::compact`]) rebuilds the database so that
//! a deleted message's text is gone from disk.
//!
//! Must not touch: the chat seq reservations and counters (an amend never changes a seq).

use super::keys::{
    check_session_id, edit_key, named_key, numbered_key, session_end, session_prefix,
    CHAT_EDITS_TREE, CHAT_TREE, LAST_ACTIVITY_MS, MODERATION_TREE,
};
use super::records::{
    decode_chat, decode_chat_edit, decode_moderation, encode_chat, encode_chat_edit,
    encode_moderation,
};
use super::{now_ms, storage_error, SledStore, TreeId};
use crate::protocol::tutor::ChatMessage;
use crate::store::{ChatEdit, ModerationRecord, StoreError};

impl SledStore {
    /// Up to `limit` records of `entries` decoded; a damaged one is reported and skipped,
    /// a failure of sled itself while reading is returned.
    fn decode_all<T>(
        &self,
        tree: &str,
        entries: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
        limit: usize,
        decode: fn(&[u8]) -> Result<T, String>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for entry in entries {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry.map_err(storage_error)?;
            match decode(&value) {
                Ok(record) => out.push(record),
                Err(e) => self.shared.report_damaged(tree, &key, &e),
            }
        }
        Ok(out)
    }

    pub(super) fn sled_chat_get(
        &self,
        session: &str,
        seq: u64,
    ) -> Result<Option<ChatMessage>, StoreError> {
        check_session_id(session)?;
        let t = self.shared.trees()?;
        let key = numbered_key(session, seq);
        let Some(value) = t.chat.get(&key).map_err(storage_error)? else {
            return Ok(None);
        };
        match decode_chat(&value) {
            Ok(message) => Ok(Some(message)),
            Err(e) => {
                self.shared.report_damaged(CHAT_TREE, &key, &e);
                Ok(None)
            }
        }
    }

    pub(super) fn sled_chat_amend(
        &self,
        session: &str,
        message: &ChatMessage,
        edit: &ChatEdit,
        previous_at_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        s.writable()?;
        let t = s.trees()?;
        let new_key = edit_key(session, edit.at_ms, edit.seq);
        s.overwrite_entry(
            &t,
            TreeId::ChatEdits,
            new_key.clone(),
            Some(encode_chat_edit(edit)?),
        )?;
        s.overwrite_entry(
            &t,
            TreeId::Chat,
            numbered_key(session, message.seq),
            Some(encode_chat(message)?),
        )?;
        if let Some(at) = previous_at_ms {
            let old_key = edit_key(session, at, edit.seq);
            if old_key != new_key {
                s.overwrite_entry(&t, TreeId::ChatEdits, old_key, None)?;
            }
        }
        s.write_counter(&t, session, LAST_ACTIVITY_MS, now_ms())
    }

    pub(super) fn sled_chat_edits_after(
        &self,
        session: &str,
        after: (u64, u64),
        limit: usize,
    ) -> Result<Vec<ChatEdit>, StoreError> {
        check_session_id(session)?;
        let t = self.shared.trees()?;
        let (at, seq) = after;
        // Exclusive of `after`: start at the next key.
        let start = match seq.checked_add(1) {
            Some(next) => edit_key(session, at, next),
            None => match at.checked_add(1) {
                Some(next_at) => edit_key(session, next_at, 0),
                None => return Ok(Vec::new()),
            },
        };
        let entries = t.chat_edits.range(start..session_end(session));
        self.decode_all(CHAT_EDITS_TREE, entries, limit, decode_chat_edit)
    }

    pub(super) fn sled_moderation(
        &self,
        session: &str,
    ) -> Result<Vec<ModerationRecord>, StoreError> {
        check_session_id(session)?;
        let t = self.shared.trees()?;
        let entries = t.moderation.scan_prefix(session_prefix(session));
        self.decode_all(MODERATION_TREE, entries, usize::MAX, decode_moderation)
    }

    pub(super) fn sled_set_moderation(
        &self,
        session: &str,
        record: &ModerationRecord,
    ) -> Result<(), StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        s.writable()?;
        let t = s.trees()?;
        let value = if record.is_cleared() {
            None
        } else {
            Some(encode_moderation(record)?)
        };
        s.overwrite_entry(
            &t,
            TreeId::Moderation,
            named_key(session, &record.user),
            value,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::tutor::UserInfo;
    use crate::store::Store;

    fn message(seq: u64, text: &str) -> ChatMessage {
        ChatMessage {
            seq,
            from: UserInfo {
                id: "ada".into(),
                name: "Ada".into(),
                role: "student".into(),
            },
            text: text.into(),
            ts: "2026-01-01T00:00:00.000Z".into(),
            ..Default::default()
        }
    }

    fn edit(seq: u64, at_ms: u64) -> ChatEdit {
        ChatEdit {
            seq,
            at_ms,
            by: UserInfo::default(),
        }
    }

    #[test]
    fn amends_replace_the_message_and_keep_one_log_entry_per_message() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 0, 5, None).unwrap();
        for seq in 1..=3 {
            store
                .append_chat("s", &message(seq, &format!("m{seq}")), 100)
                .unwrap();
        }
        let edited = ChatMessage {
            text: "m2 fixed".into(),
            // As the room stamps them: `edited_at` is the log entry's time.
            edited_at: Some("1970-01-01T00:00:01.000Z".into()),
            ..message(2, "")
        };
        store
            .chat_amend("s", &edited, &edit(2, 1000), None)
            .unwrap();
        let edited_again = ChatMessage {
            text: "m2 fixed twice".into(),
            edited_at: Some("1970-01-01T00:00:03.000Z".into()),
            ..edited.clone()
        };
        store
            .chat_amend("s", &edited_again, &edit(2, 3000), Some(1000))
            .unwrap();
        let deleted = ChatMessage {
            seq: 1,
            deleted_at: Some("1970-01-01T00:00:02.000Z".into()),
            ..Default::default()
        };
        store
            .chat_amend("s", &deleted, &edit(1, 2000), None)
            .unwrap();
        // Another session's log is separate.
        store.append_chat("t", &message(1, "x"), 100).unwrap();
        store
            .chat_amend("t", &message(1, "y"), &edit(1, 500), None)
            .unwrap();

        let log = store.chat_edits_after("s", (0, 0), 10).unwrap();
        let keys: Vec<(u64, u64)> = log.iter().map(|e| (e.at_ms, e.seq)).collect();
        assert_eq!(keys, [(2000, 1), (3000, 2)]);
        assert_eq!(store.chat_edits_after("s", (2000, 1), 10).unwrap().len(), 1);
        assert_eq!(
            store.chat_get("s", 2).unwrap().unwrap().text,
            "m2 fixed twice"
        );
        let stub = store.chat_get("s", 1).unwrap().unwrap();
        assert!(stub.text.is_empty() && stub.deleted_at.is_some());
        assert!(store.chat_get("s", 9).unwrap().is_none());
        // Trimming a changed message takes its edit-log entry too (limit 2: seq 1 goes).
        store.append_chat("s", &message(3, "m3"), 2).unwrap();
        let log = store.chat_edits_after("s", (0, 0), 10).unwrap();
        let keys: Vec<(u64, u64)> = log.iter().map(|e| (e.at_ms, e.seq)).collect();
        assert_eq!(keys, [(3000, 2)], "the trimmed message's entry stayed");

        let record = ModerationRecord {
            user: "bob".into(),
            muted: true,
            muted_until_ms: None,
            banned_until_ms: Some(u64::MAX),
            ban_by_admin: true,
            ..Default::default()
        };
        store.set_moderation("s", &record).unwrap();
        drop(store);
        let store = super::super::tests::open_with(dir.path(), 0, 5);
        assert_eq!(store.moderation("s").unwrap(), [record]);
        assert!(store.moderation("t").unwrap().is_empty());
        let cleared = ModerationRecord {
            user: "bob".into(),
            ..Default::default()
        };
        store.set_moderation("s", &cleared).unwrap();
        assert!(store.moderation("s").unwrap().is_empty());
        // The log survived the reopen (seq 1's entry went with its trimmed message).
        assert_eq!(store.chat_edits_after("s", (0, 0), 10).unwrap().len(), 1);
    }

    /// An amend reported as failed (sync durability: its flush failed) is undone to what
    /// the keys held: the original message is back, not deleted with the failed write,
    /// and the failed change's edit-log entry is gone.
    #[test]
    fn a_failed_amend_is_undone_to_the_original_message() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 0, 5, None).unwrap();
        store.append_chat("s", &message(1, "keep me"), 100).unwrap();
        store.flush().unwrap();
        let deleted = ChatMessage {
            seq: 1,
            deleted_at: Some("1970-01-01T00:00:02.000Z".into()),
            ..Default::default()
        };
        store
            .chat_amend("s", &deleted, &edit(1, 2000), None)
            .unwrap();
        // What a failed explicit flush does, then a sled failure (reopen before resuming).
        {
            let mut health = crate::store::unpoisoned(store.shared.health.lock());
            let unflushed = std::mem::take(&mut health.unflushed);
            assert_eq!(unflushed.len(), 2, "the edit-log entry and the message");
            health.poisoned.extend(unflushed);
        }
        store.shared.fail("flush failed (test)".into(), true);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while store.check().is_err() {
            assert!(std::time::Instant::now() < deadline, "{:?}", store.check());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(store.chat_get("s", 1).unwrap().unwrap().text, "keep me");
        assert!(store.chat_edits_after("s", (0, 0), 10).unwrap().is_empty());
    }
}
