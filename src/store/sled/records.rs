//! Value encoding of the sled layout (the tables in [`crate::store`]): every record's bytes.
//!
//! The first byte of every `updates`, `chat`, `meta`, `chat_edits` and `moderation` value
//! is its format version (1, or 2 for an `updates` value holding a run of updates: see
//! [`encode_updates`]), then the body: a Yjs v1 update, a [`ChatMessage`] as
//! JSON (the object clients receive, so fields can be added with serde defaults), a u64
//! BE, a [`ChatEdit`] or a [`ModerationRecord`] as JSON. A `snapshots` value
//! is a bincode-2 [`SnapshotHeader`] whose first field is its format version, then the
//! whole document as a Yjs v1 update. A later layout writes version 2 and keeps reading
//! version 1. Decoders return the reason as a `String`: the caller logs, counts and skips
//! a damaged record (nothing read from disk is unwrapped).
//!
//! Owns: encoding and decoding values, checking a Yjs state decodes. Must not touch: keys
//! (see [`super::keys`]), the database, or the file system.

use serde::{Deserialize, Serialize};

use super::keys::key_number;
use crate::protocol::tutor::ChatMessage;
use crate::store::{ChatEdit, ModerationRecord, StoreError};

/// Format version byte of every value but a snapshot's.
const RECORD_FORMAT_V1: u8 = 1;
/// Format of an `updates` value holding a run of updates ([`encode_updates`]).
const RECORD_FORMAT_UPDATES: u8 = 2;
/// Format version of the snapshot header.
pub(crate) const SNAPSHOT_FORMAT_V1: u16 = 1;
/// The largest snapshot header decoded: bounds what a damaged length prefix can allocate.
const MAX_SNAPSHOT_HEADER_BYTES: usize = 64 << 20;

/// What precedes the Yjs state in a `snapshots` value (bincode 2, standard config).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SnapshotHeader {
    /// First, so a reader can tell the layout before decoding the rest.
    pub(crate) format_version: u16,
    pub(crate) session: String,
    pub(crate) version: u64,
    pub(crate) created_at_ms: u64,
    /// Updates folded into this snapshot since the previous one.
    pub(crate) update_count: u64,
    /// Length of the Yjs v1 state that follows the header.
    pub(crate) state_len: u64,
    /// The document's state vector, v1-encoded.
    pub(crate) state_vector: Vec<u8>,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_SNAPSHOT_HEADER_BYTES>()
}

pub(crate) fn encode_snapshot(
    header: &SnapshotHeader,
    state: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let mut record = bincode::serde::encode_to_vec(header, bincode_config())
        .map_err(|e| StoreError::io_while("cannot encode a snapshot header", e))?;
    record.extend_from_slice(state);
    Ok(record)
}

/// A `snapshots` value split into header and state, checked against the key it was
/// stored under (`session`, `version`).
pub(crate) fn decode_snapshot<'a>(
    session: &str,
    version: u64,
    value: &'a [u8],
) -> Result<(SnapshotHeader, &'a [u8]), String> {
    let (format_version, _): (u16, usize) =
        bincode::serde::decode_from_slice(value, bincode_config())
            .map_err(|e| format!("snapshot header: {e}"))?;
    if format_version != SNAPSHOT_FORMAT_V1 {
        return Err(format!("unknown snapshot format version {format_version}"));
    }
    let (header, header_len): (SnapshotHeader, usize) =
        bincode::serde::decode_from_slice(value, bincode_config())
            .map_err(|e| format!("snapshot header: {e}"))?;
    let state = value.get(header_len..).unwrap_or_default();
    if header.session != session || header.version != version {
        return Err(format!(
            "header names {}/{}, stored under {session}/{version}",
            header.session, header.version
        ));
    }
    if header.state_len != state.len() as u64 {
        return Err(format!(
            "state is {} bytes, header says {}",
            state.len(),
            header.state_len
        ));
    }
    Ok((header, state))
}

/// A snapshot header stored apart from its state (the Redis store keeps the two in
/// separate hashes, so listing versions reads no state), checked against the session and
/// version it was stored under. `state_len` is not checked: the state is elsewhere.
pub(crate) fn decode_snapshot_header(
    session: &str,
    version: u64,
    value: &[u8],
) -> Result<SnapshotHeader, String> {
    let (format_version, _): (u16, usize) =
        bincode::serde::decode_from_slice(value, bincode_config())
            .map_err(|e| format!("snapshot header: {e}"))?;
    if format_version != SNAPSHOT_FORMAT_V1 {
        return Err(format!("unknown snapshot format version {format_version}"));
    }
    let (header, _): (SnapshotHeader, usize) =
        bincode::serde::decode_from_slice(value, bincode_config())
            .map_err(|e| format!("snapshot header: {e}"))?;
    if header.session != session || header.version != version {
        return Err(format!(
            "header names {}/{}, stored under {session}/{version}",
            header.session, header.version
        ));
    }
    Ok(header)
}

/// [`decode_snapshot`] for an entry found by a scan (its version read from the key).
pub(crate) fn decode_snapshot_entry<'a>(
    session: &str,
    key: &[u8],
    value: &'a [u8],
) -> Result<(SnapshotHeader, &'a [u8]), String> {
    let version = key_number(key).ok_or("key is not `session \\0 version`")?;
    decode_snapshot(session, version, value)
}

/// Whether `state` decodes as a Yjs v1 update (yrs may panic on hostile input).
pub(crate) fn check_yjs_update(state: &[u8]) -> Result<(), String> {
    use crate::doc::guard::{NestingIndex, SAFE_NESTING};
    use yrs::updates::decoder::Decode;
    // The guard first: a record written before it existed may hold a nesting bomb, which
    // overflows the stack inside yrs's decoder (no catch_unwind catches that). Checked as
    // the stored state it is: text a board held in an array before the guard refused that
    // decodes safely, and refusing it here would lose the whole snapshot.
    NestingIndex::default()
        .check_stored(state, SAFE_NESTING)
        .map_err(|e| format!("state refused by the update guard: {e}"))?;
    match std::panic::catch_unwind(|| yrs::Update::decode_v1(state)) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("state is not a Yjs v1 update: {e}")),
        Err(_) => Err("the Yjs decoder panicked on the state".into()),
    }
}

/// `format` then `body`: the shape of `updates`, `chat` and `meta` values.
fn versioned(format: u8, body: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(1 + body.len());
    record.push(format);
    record.extend_from_slice(body);
    record
}

/// The body of a `versioned` value of format 1.
fn v1_body<'a>(kind: &str, value: &'a [u8]) -> Result<&'a [u8], String> {
    match value.split_first() {
        Some((&RECORD_FORMAT_V1, body)) => Ok(body),
        Some((format, _)) => Err(format!("unknown {kind} format version {format}")),
        None => Err(format!("empty {kind} record")),
    }
}

pub(crate) fn encode_update(update: &[u8]) -> Vec<u8> {
    versioned(RECORD_FORMAT_V1, update)
}

/// Several updates in one `updates` value, in their log order: format 2, then for each a
/// u32 BE length and the update. Stored under the seq of the last one (see
/// [`crate::store::Store::append_updates`]); the others' seqs are implied. One update stays
/// format 1, which every earlier version reads.
pub(crate) fn encode_updates(updates: &[&[u8]]) -> Vec<u8> {
    if let [one] = updates {
        return encode_update(one);
    }
    let len = updates.iter().map(|u| 4 + u.len()).sum::<usize>();
    let mut record = Vec::with_capacity(1 + len);
    record.push(RECORD_FORMAT_UPDATES);
    for update in updates {
        // An update is far below 4 GiB (`limits.max_message_bytes`): the cast holds.
        record.extend_from_slice(&(update.len() as u32).to_be_bytes());
        record.extend_from_slice(update);
    }
    record
}

/// The update(s) of an `updates` value: one for format 1, the run for format 2. A length
/// that runs past the value's end, or a run of none, is damage.
pub(crate) fn decode_updates(value: &[u8]) -> Result<Vec<&[u8]>, String> {
    let Some((&RECORD_FORMAT_UPDATES, mut body)) = value.split_first() else {
        return decode_update(value).map(|update| vec![update]);
    };
    let mut updates = Vec::new();
    while !body.is_empty() {
        let (len, rest) = body
            .split_first_chunk::<4>()
            .ok_or("update run: a length is cut short")?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > rest.len() {
            return Err(format!(
                "update run: an update of {len} bytes where {} remain",
                rest.len()
            ));
        }
        let (update, rest) = rest.split_at(len);
        updates.push(update);
        body = rest;
    }
    if updates.is_empty() {
        return Err("update run: no update".into());
    }
    Ok(updates)
}

pub(crate) fn decode_update(value: &[u8]) -> Result<&[u8], String> {
    v1_body("update", value)
}

/// `0x01` then `value` as JSON.
fn encode_json<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(value)
        .map_err(|e| StoreError::io_while(format!("cannot encode a {what}"), e))?;
    Ok(versioned(RECORD_FORMAT_V1, &json))
}

fn decode_json<T: serde::de::DeserializeOwned>(what: &str, value: &[u8]) -> Result<T, String> {
    serde_json::from_slice(v1_body(what, value)?).map_err(|e| format!("{what}: {e}"))
}

pub(crate) fn encode_chat(message: &ChatMessage) -> Result<Vec<u8>, StoreError> {
    encode_json("chat message", message)
}

pub(crate) fn decode_chat(value: &[u8]) -> Result<ChatMessage, String> {
    decode_json("chat message", value)
}

pub(crate) fn encode_chat_edit(edit: &ChatEdit) -> Result<Vec<u8>, StoreError> {
    encode_json("chat edit", edit)
}

pub(crate) fn decode_chat_edit(value: &[u8]) -> Result<ChatEdit, String> {
    decode_json("chat edit", value)
}

pub(crate) fn encode_moderation(record: &ModerationRecord) -> Result<Vec<u8>, StoreError> {
    encode_json("moderation record", record)
}

pub(crate) fn decode_moderation(value: &[u8]) -> Result<ModerationRecord, String> {
    decode_json("moderation record", value)
}

pub(crate) fn encode_counter(n: u64) -> [u8; 9] {
    let mut record = [0; 9];
    record[0] = RECORD_FORMAT_V1;
    record[1..].copy_from_slice(&n.to_be_bytes());
    record
}

pub(crate) fn decode_counter(value: &[u8]) -> Result<u64, String> {
    let body = v1_body("counter", value)?;
    let bytes: [u8; 8] = body
        .try_into()
        .map_err(|_| format!("counter is {} bytes, not 8", body.len()))?;
    Ok(u64::from_be_bytes(bytes))
}
