//! Key encoding of the sled layout (the tables in [`crate::store`]): which tree holds what, the
//! `meta` names, and how a key is built from a session id and a number or a name.
//!
//! Every key starts with the session id and a `\0` byte. Session ids match
//! `[A-Za-z0-9_-]{1,128}` ([`check_session_id`], on every call), so `session \0` is a prefix
//! no other session shares, and a prefix scan visits one session's records in key order.
//! Numbers in keys are big-endian `u64`, so key order is numeric order and a range scan is
//! a range of sequence numbers.
//!
//! Owns: tree and `meta` names, building and splitting keys. Must not touch: values (see
//! [`super::records`]), the database itself, or any I/O.

use sled::{IVec, Tree};

use super::storage_error;
use crate::store::StoreError;

/// The trees (what each holds: the layout in [`crate::store`]).
pub(crate) const UPDATES_TREE: &str = "updates";
pub(crate) const SNAPSHOTS_TREE: &str = "snapshots";
pub(crate) const CHAT_TREE: &str = "chat";
pub(crate) const META_TREE: &str = "meta";
/// SPEC 4.1: the chat edit log and the moderation records.
pub(crate) const CHAT_EDITS_TREE: &str = "chat_edits";
pub(crate) const MODERATION_TREE: &str = "moderation";

/// The `meta` names (what each counts: the layout in [`crate::store`]).
pub(crate) const LAST_LOG_SEQ: &str = "last_log_seq";
pub(crate) const LAST_SNAPSHOT_VERSION: &str = "last_snapshot_version";
pub(crate) const LAST_CHAT_SEQ: &str = "last_chat_seq";
pub(crate) const CHAT_SEQ_RESERVED: &str = "chat_seq_reserved";
pub(crate) const LAST_ACTIVITY_MS: &str = "last_activity_ms";

/// Every key the session has in `tree`.
pub(crate) fn session_keys(tree: &Tree, session: &str) -> Result<Vec<IVec>, StoreError> {
    tree.scan_prefix(session_prefix(session))
        .keys()
        .collect::<Result<_, _>>()
        .map_err(storage_error)
}

/// [`StoreError::InvalidSession`] unless `session` matches `[A-Za-z0-9_-]{1,128}`: any
/// other byte (a `\0` above all) would break the key layout.
pub(crate) fn check_session_id(session: &str) -> Result<(), StoreError> {
    let valid = (1..=128).contains(&session.len())
        && session
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(StoreError::InvalidSession)
    }
}

/// `session \0`: the prefix of every key of one session.
pub(crate) fn session_prefix(session: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(session.len() + 1 + 8);
    key.extend_from_slice(session.as_bytes());
    key.push(0);
    key
}

/// `session \x01`: the first key after every key of `session` (an exclusive range end).
pub(crate) fn session_end(session: &str) -> Vec<u8> {
    let mut key = session_prefix(session);
    if let Some(last) = key.last_mut() {
        *last = 1;
    }
    key
}

/// `session \0 n` with `n` big-endian: the key of log entries, snapshots and chat.
pub(crate) fn numbered_key(session: &str, n: u64) -> Vec<u8> {
    let mut key = session_prefix(session);
    key.extend_from_slice(&n.to_be_bytes());
    key
}

/// `session \0 at_ms seq`, both big-endian: the key of a `chat_edits` entry, so the log
/// reads in time order (and by seq within one millisecond).
pub(crate) fn edit_key(session: &str, at_ms: u64, seq: u64) -> Vec<u8> {
    let mut key = numbered_key(session, at_ms);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `session \0 name`: the key of a `meta` value (and, with a user id as the name, of a
/// `moderation` record).
pub(crate) fn named_key(session: &str, name: &str) -> Vec<u8> {
    let mut key = session_prefix(session);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Splits `session \0 rest`; `None` for a key not in that form.
pub(crate) fn split_key(key: &[u8]) -> Option<(&str, &[u8])> {
    let nul = key.iter().position(|&b| b == 0)?;
    let session = std::str::from_utf8(&key[..nul]).ok()?;
    Some((session, &key[nul + 1..]))
}

/// The number of a `session \0 n` key; `None` for a key not in that form.
pub(crate) fn key_number(key: &[u8]) -> Option<u64> {
    let (_, number) = split_key(key)?;
    Some(u64::from_be_bytes(number.try_into().ok()?))
}

/// A key as a log line shows it: `session/n` or `session/name`.
pub(crate) fn describe_key(key: &[u8]) -> String {
    match (split_key(key), key_number(key)) {
        (Some((session, _)), Some(n)) => format!("{session}/{n}"),
        (Some((session, rest)), None) => {
            format!("{session}/{}", String::from_utf8_lossy(rest))
        }
        (None, _) => format!("{:?}", String::from_utf8_lossy(key)),
    }
}
