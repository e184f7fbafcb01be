//! Reading a session's records back: the newest loadable snapshot, the log, chat ranges,
//! trimming chat, and reporting what does not decode.
//!
//! A value that does not decode is logged with `tracing::warn`, counted in the
//! `store_decode_errors` metric and skipped: loading uses the newest snapshot whose header
//! *and* Yjs state decode (the database's, or a newer `versions/` file's), then every log
//! entry that decodes. A page sled cannot read is reported and the scan ends there: one
//! damaged page never hides the rest.
//!
//! Owns: scans and damage reports. Must not touch: the write gate (see [`super::health`]).

use sled::IVec;

use super::keys::{
    describe_key, edit_key, numbered_key, session_prefix, CHAT_TREE, LAST_SNAPSHOT_VERSION,
    SNAPSHOTS_TREE, UPDATES_TREE,
};
use super::records::{check_yjs_update, decode_chat, decode_snapshot_entry, decode_updates};
use super::versions::VERSIONS_DIR;
use super::{storage_error, Shared, Trees};
use crate::protocol::tutor::ChatMessage;
use crate::store::StoreError;

impl Shared {
    /// Logs and counts a stored record that does not decode (the caller then skips it).
    pub(super) fn report_damaged(&self, tree: &str, key: &[u8], error: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.store_decode_errors.inc();
        }
        tracing::warn!(tree, key = %describe_key(key), error, "stored record does not decode; skipped");
    }

    /// Logs and counts a part of the database sled cannot read (the caller goes on with
    /// what it has: one damaged page never hides the rest).
    fn report_unreadable(&self, tree: &str, session: &str, error: &sled::Error) {
        if let Some(metrics) = &self.metrics {
            metrics.store_decode_errors.inc();
        }
        tracing::warn!(tree, session, error = %error, "part of the database does not read; skipped");
    }

    /// The newest snapshot of the session whose header and Yjs state both decode, as
    /// (version, state): the database's, or a newer version file's (the database lost a
    /// version it had, or a crash came between the file and the record). Newer records
    /// that do not decode are reported and passed over.
    pub(super) fn newest_loadable_snapshot(
        &self,
        t: &Trees,
        session: &str,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let mut found = None;
        for entry in t.snapshots.scan_prefix(session_prefix(session)).rev() {
            let (key, value) = match entry {
                Ok(kv) => kv,
                Err(e) => {
                    // A page sled cannot read: the version files still can be.
                    self.report_unreadable(SNAPSHOTS_TREE, session, &e);
                    break;
                }
            };
            let loaded =
                decode_snapshot_entry(session, &key, &value).and_then(|(header, state)| {
                    check_yjs_update(state)?;
                    Ok((header.version, state.to_vec()))
                });
            match loaded {
                Ok(snapshot) => {
                    found = Some(snapshot);
                    break;
                }
                Err(e) => self.report_damaged(SNAPSHOTS_TREE, &key, &e),
            }
        }
        let in_db = found.as_ref().map_or(0, |(v, _)| *v);
        let counted = self
            .read_counter(t, session, LAST_SNAPSHOT_VERSION)?
            .unwrap_or(0);
        for version in self.version_files(session).into_iter().rev() {
            if version <= in_db {
                break;
            }
            match self.read_version_file(session, version) {
                Ok(state) => {
                    // The database lost this version (sled drops everything after a
                    // damaged spot of its log as if it were a torn write), or, rarely, a
                    // crash came between the file and the record. Either way the file is
                    // the version's exact state.
                    let why = if version <= counted {
                        "damaged in the database; loaded from its versions/ file"
                    } else {
                        "missing from the database (damage, or an interrupted snapshot); loaded from its versions/ file"
                    };
                    self.report_damaged(SNAPSHOTS_TREE, &numbered_key(session, version), why);
                    return Ok(Some((version, state)));
                }
                Err(e) => self.report_damaged(VERSIONS_DIR, &numbered_key(session, version), &e),
            }
        }
        Ok(found)
    }

    /// The updates of the session's log entries that decode, oldest first, handed to
    /// `each` one entry at a time.
    pub(super) fn for_each_logged(
        &self,
        t: &Trees,
        session: &str,
        each: &mut dyn FnMut(&[u8]),
    ) -> Result<(), StoreError> {
        for entry in t.updates.scan_prefix(session_prefix(session)) {
            let (key, value) = match entry {
                Ok(kv) => kv,
                Err(e) => {
                    self.report_unreadable(UPDATES_TREE, session, &e);
                    break;
                }
            };
            match decode_updates(&value) {
                Ok(run) => run.into_iter().for_each(&mut *each),
                Err(e) => self.report_damaged(UPDATES_TREE, &key, &e),
            }
        }
        Ok(())
    }

    /// Decodes chat entries in the order `entries` gives them, skipping (and reporting)
    /// damaged ones, until `limit` messages.
    pub(super) fn decode_chat_entries(
        &self,
        entries: impl Iterator<Item = sled::Result<(IVec, IVec)>>,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let mut messages = Vec::new();
        for entry in entries {
            if messages.len() >= limit {
                break;
            }
            let (key, value) = match entry {
                Ok(kv) => kv,
                Err(e) => {
                    self.report_unreadable(CHAT_TREE, "", &e);
                    break;
                }
            };
            match decode_chat(&value) {
                Ok(message) => messages.push(message),
                Err(e) => self.report_damaged(CHAT_TREE, &key, &e),
            }
        }
        Ok(messages)
    }

    /// Deletes the session's chat messages with `seq <= newest_seq - history_limit`.
    pub(super) fn trim_chat(
        &self,
        t: &Trees,
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
        for key in t.chat.range(dropped).keys() {
            let key = key.map_err(storage_error)?;
            let old = self.written(t.chat.remove(&key))?;
            // The message's entry in the edit log goes with it: readers would skip it, but
            // it would stay for good, one per message ever changed.
            let changed_at = old
                .and_then(|value| decode_chat(&value).ok())
                .and_then(|m| Some((m.seq, m.deleted_at.or(m.edited_at)?)))
                .and_then(|(seq, at)| Some((seq, rfc3339_ms(&at)?)));
            if let Some((seq, at_ms)) = changed_at {
                self.written(t.chat_edits.remove(edit_key(session, at_ms, seq)))?;
            }
        }
        Ok(())
    }
}

/// An RFC 3339 time as this store's amends write it (`edited_at`, `deleted_at`: UTC,
/// milliseconds), as ms since the Unix epoch.
fn rfc3339_ms(at: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(at).ok()?;
    u64::try_from(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis()).ok()
}
