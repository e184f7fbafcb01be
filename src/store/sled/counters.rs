//! The per-session `meta` counters (`last_log_seq`, `last_snapshot_version`,
//! `last_chat_seq`, `chat_seq_reserved`, `last_activity_ms`; see [`crate::store`]): reading
//! and blind writes, and the numbers read back from keys.
//!
//! Owns: counter access. Must not touch: what a counter means to the store (that is in the
//! `Store` impl of [`super`]).

use sled::Tree;

use super::keys::{key_number, named_key, session_prefix, LAST_CHAT_SEQ, META_TREE};
use super::records::{decode_counter, encode_counter};
use super::{storage_error, Shared, Trees};
use crate::store::StoreError;

impl Shared {
    /// A `meta` counter of the session; `None` if absent or damaged (damage is reported).
    pub(super) fn read_counter(
        &self,
        t: &Trees,
        session: &str,
        name: &str,
    ) -> Result<Option<u64>, StoreError> {
        let key = named_key(session, name);
        let value = t.meta.get(&key).map_err(storage_error)?;
        Ok(self.decode_counter_or_report(&key, value.as_deref()))
    }

    pub(super) fn decode_counter_or_report(&self, key: &[u8], value: Option<&[u8]>) -> Option<u64> {
        match decode_counter(value?) {
            Ok(n) => Some(n),
            Err(e) => {
                self.report_damaged(META_TREE, key, &e);
                None
            }
        }
    }

    /// Sets a `meta` counter of the session (a blind insert, no read).
    pub(super) fn write_counter(
        &self,
        t: &Trees,
        session: &str,
        name: &str,
        n: u64,
    ) -> Result<(), StoreError> {
        self.written(
            t.meta
                .insert(named_key(session, name), &encode_counter(n)[..]),
        )
        .map(|_| ())
    }

    /// The number in the session's last key of `tree` (`None`: the session has none there).
    pub(super) fn last_number(
        &self,
        tree: &Tree,
        session: &str,
    ) -> Result<Option<u64>, StoreError> {
        match tree.scan_prefix(session_prefix(session)).next_back() {
            None => Ok(None),
            Some(entry) => {
                let (key, _) = entry.map_err(storage_error)?;
                Ok(key_number(&key))
            }
        }
    }

    /// The highest chat seq stored or counted (without reservations).
    pub(super) fn stored_chat_seq(&self, t: &Trees, session: &str) -> Result<u64, StoreError> {
        let counted = self.read_counter(t, session, LAST_CHAT_SEQ)?;
        let stored = match self.last_number(&t.chat, session) {
            Ok(stored) => stored,
            Err(StoreError::Corrupt(e)) => {
                tracing::warn!(session, error = %e, "chat does not read; seqs continue from the counters");
                if let Some(metrics) = &self.metrics {
                    metrics.store_decode_errors.inc();
                }
                None
            }
            Err(e) => return Err(e),
        };
        Ok(counted.max(stored).unwrap_or(0))
    }
}
