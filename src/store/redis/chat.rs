//! Chat on Redis: appends with the seq assigned in the same script (`chat_append`),
//! history reads with amendments swapped in (`chat_read`), SPEC 4.1's edits and deletions
//! (`chat_amend`, the `edits` log) and moderation records.
//!
//! A deleted message's amended form (no text) is what every read returns; its original
//! entry stays in the `chat` stream until trimming takes it (streams cannot be edited in
//! place). Owns: the chat, chat:seq, chat:amended, edits, edits:seq and moderation keys.
//! Must not touch: whiteboard or presence keys.

use redis::Value;

use super::keys::{self, session_key};
use super::values;
use super::{now_ms, RedisStore};
use crate::protocol::tutor::ChatMessage;
use crate::store::{ChatEdit, ModerationRecord, StoreError};

/// Which way [`RedisStore::redis_chat_read`] reads from its seq.
#[derive(Debug, Clone, Copy)]
pub(super) enum Direction {
    /// Oldest first, seqs above.
    After,
    /// Newest first, seqs below.
    Before,
}

/// Width of each number in an edit-log member: `u64::MAX` has 20 digits.
const MEMBER_NUMBER: usize = 20;

/// The sort prefix of an edit-log member: `<at_ms>:<seq>:`, fixed width, so lex order is
/// `(at_ms, seq)` order.
pub(super) fn member_prefix(at_ms: u64, seq: u64) -> String {
    format!("{at_ms:0w$}:{seq:0w$}:", w = MEMBER_NUMBER)
}

/// A limit as Redis takes it (`COUNT`, a signed 64-bit number), at least 1 (the callers
/// return early on 0).
fn count(limit: usize) -> u64 {
    (limit as u64).clamp(1, i64::MAX as u64)
}

impl RedisStore {
    pub(super) fn redis_append_chat(
        &self,
        session: &str,
        message: &ChatMessage,
        history_limit: usize,
    ) -> Result<u64, StoreError> {
        self.register(session)?;
        let json = serde_json::to_vec(message)
            .map_err(|e| StoreError::io_while("cannot encode a chat message", e))?;
        let mut call = self.scripts.chat_append.prepare_invoke();
        call.key(session_key(session, keys::CHAT_SEQ))
            .key(session_key(session, keys::CHAT))
            .key(session_key(session, keys::CHAT_AMENDED))
            .key(session_key(session, keys::EDITS))
            .key(session_key(session, keys::EDITS_BY_SEQ))
            .key(session_key(session, keys::META))
            .arg(&self.node_id)
            .arg(json)
            .arg(count(history_limit))
            .arg(now_ms())
            // The room numbers a message one past the last seq it has seen.
            .arg(message.seq.saturating_sub(1));
        self.ring(&mut call, session);
        let seq = self
            .pool
            .run("chat append", |con| call.invoke::<Value>(con))?;
        values::unsigned(&seq, "chat_append seq")
    }

    pub(super) fn redis_chat_read(
        &self,
        session: &str,
        direction: Direction,
        from: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut call = self.scripts.chat_read.prepare_invoke();
        call.key(session_key(session, keys::CHAT))
            .key(session_key(session, keys::CHAT_AMENDED))
            .arg(match direction {
                Direction::After => "after",
                Direction::Before => "before",
            })
            .arg(from)
            .arg(count(limit));
        let reply = self
            .pool
            .run("chat read", |con| call.invoke::<Value>(con))?;
        let mut messages = Vec::new();
        for (id, json) in values::pairs(&reply, "chat_read")? {
            let id = values::text(id, "chat id")?.unwrap_or_default();
            let json = values::bytes(json, "chat message")?.unwrap_or_default();
            let decoded = values::seq_of_id(&id)
                .ok_or_else(|| format!("entry id {id:?} is not 0-<seq>"))
                .and_then(|seq| {
                    serde_json::from_slice::<ChatMessage>(&json)
                        .map(|message| ChatMessage { seq, ..message })
                        .map_err(|e| e.to_string())
                });
            match decoded {
                Ok(message) => messages.push(message),
                Err(e) => self.report_damaged(session, &format!("chat message {id}"), &e),
            }
        }
        Ok(messages)
    }

    pub(super) fn redis_last_chat_seq(&self, session: &str) -> Result<u64, StoreError> {
        let key = session_key(session, keys::CHAT_SEQ);
        let reply: Value = self
            .pool
            .run("GET chat:seq", |con| redis::cmd("GET").arg(&key).query(con))?;
        values::unsigned(&reply, "chat:seq")
    }

    pub(super) fn redis_chat_get(
        &self,
        session: &str,
        seq: u64,
    ) -> Result<Option<ChatMessage>, StoreError> {
        let Some(before) = seq.checked_sub(1) else {
            return Ok(None);
        };
        let found = self.redis_chat_read(session, Direction::After, before, 1)?;
        Ok(found.into_iter().find(|m| m.seq == seq))
    }

    pub(super) fn redis_chat_amend(
        &self,
        session: &str,
        message: &ChatMessage,
        edit: &ChatEdit,
    ) -> Result<(), StoreError> {
        self.register(session)?;
        let json = serde_json::to_vec(message)
            .map_err(|e| StoreError::io_while("cannot encode a chat message", e))?;
        let edit_json = serde_json::to_string(edit)
            .map_err(|e| StoreError::io_while("cannot encode a chat edit", e))?;
        let member = format!("{}{edit_json}", member_prefix(edit.at_ms, edit.seq));
        let mut call = self.scripts.chat_amend.prepare_invoke();
        call.key(session_key(session, keys::CHAT))
            .key(session_key(session, keys::CHAT_AMENDED))
            .key(session_key(session, keys::EDITS))
            .key(session_key(session, keys::EDITS_BY_SEQ))
            .key(session_key(session, keys::META))
            .arg(message.seq)
            .arg(json)
            .arg(member)
            .arg(now_ms());
        let done = self
            .pool
            .run("chat amend", |con| call.invoke::<Value>(con))?;
        if values::number(&done, "chat_amend")? == 0 {
            tracing::info!(%session, seq = message.seq, "amend of a message no longer stored (trimmed); nothing written");
        }
        Ok(())
    }

    pub(super) fn redis_chat_edits_after(
        &self,
        session: &str,
        after: (u64, u64),
        limit: usize,
    ) -> Result<Vec<ChatEdit>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Exclusive of every member of `after`: past its prefix followed by the largest byte.
        let mut start = b"(".to_vec();
        start.extend_from_slice(member_prefix(after.0, after.1).as_bytes());
        start.push(0xff);
        let key = session_key(session, keys::EDITS);
        let reply: Value = self.pool.run("ZRANGEBYLEX edits", |con| {
            redis::cmd("ZRANGEBYLEX")
                .arg(&key)
                .arg(start.as_slice())
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(count(limit))
                .query(con)
        })?;
        let mut edits = Vec::new();
        for member in values::items(&reply, "edits")? {
            let member = values::bytes(member, "edit member")?.unwrap_or_default();
            let json = member.get(member_prefix(0, 0).len()..).unwrap_or_default();
            match serde_json::from_slice::<ChatEdit>(json) {
                Ok(edit) => edits.push(edit),
                Err(e) => self.report_damaged(session, "chat edit", &e.to_string()),
            }
        }
        Ok(edits)
    }

    pub(super) fn redis_moderation(
        &self,
        session: &str,
    ) -> Result<Vec<ModerationRecord>, StoreError> {
        let key = session_key(session, keys::MODERATION);
        let reply: Value = self.pool.run("HGETALL moderation", |con| {
            redis::cmd("HGETALL").arg(&key).query(con)
        })?;
        let mut records = Vec::new();
        for (user, json) in values::pairs(&reply, "moderation")? {
            let json = values::bytes(json, "moderation record")?.unwrap_or_default();
            match serde_json::from_slice::<ModerationRecord>(&json) {
                Ok(record) => records.push(record),
                Err(e) => {
                    let user = values::text(user, "user id")
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    tracing::error!(%session, %user, error = %e, "a stored moderation record does not decode; skipped")
                }
            }
        }
        records.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(records)
    }

    pub(super) fn redis_set_moderation(
        &self,
        session: &str,
        record: &ModerationRecord,
    ) -> Result<(), StoreError> {
        self.register(session)?;
        let key = session_key(session, keys::MODERATION);
        if record.is_cleared() {
            self.pool.run("HDEL moderation", |con| {
                redis::cmd("HDEL")
                    .arg(&key)
                    .arg(&record.user)
                    .query::<Value>(con)
            })?;
            return Ok(());
        }
        let json = serde_json::to_vec(record)
            .map_err(|e| StoreError::io_while("cannot encode a moderation record", e))?;
        self.pool.run("HSET moderation", |con| {
            redis::cmd("HSET")
                .arg(&key)
                .arg(&record.user)
                .arg(json)
                .query::<Value>(con)
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::values::corrupt;
    use super::*;

    #[test]
    fn edit_members_sort_by_time_then_seq() {
        let a = member_prefix(5, 10);
        let b = member_prefix(5, 9);
        let c = member_prefix(40, 1);
        assert!(b < a && a < c);
        assert_eq!(a.len(), 42);
        assert!(corrupt("x").to_string().contains("x"));
    }
}
