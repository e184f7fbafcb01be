//! Restoring an older version of a live whiteboard, as new operations (SPEC 5.3).
//!
//! A Yjs document cannot be rolled back: its history only grows, and connected clients keep
//! every operation they have seen. So a restore is a *forward* edit: [`restore_into`] compares
//! the live document with the snapshot, value by value, and applies, in one transaction on the
//! live document, the changes that make the content equal to the snapshot's. The update of
//! that transaction is an ordinary Yjs update: the caller relays it to the connected clients,
//! who see the whiteboard change without a reload, and logs it like any other update.
//!
//! How each root type is brought back, keeping the edit small so that what did not change
//! keeps its identity (clients' references to nested types, cursors, undo stacks):
//! - **Map**: key by key. Keys missing from the snapshot are removed; keys whose value differs
//!   are set. Primitive values are compared by value; nested shared types (Y.Map, Y.Array,
//!   Y.Text, XML) are compared deeply and, when they differ, replaced by a fresh deep copy.
//! - **Array**: the items are compared deeply and diffed (common prefix and suffix set aside,
//!   then Myers' shortest edit script over the rest); only the items the diff marks are
//!   deleted, and the snapshot's items are inserted as copies. So erasing an early stroke and
//!   drawing new ones, then restoring, re-inserts that stroke and removes the new ones, and
//!   every other stroke stays the same Y.Map. Beyond 512 differing items the diff stops and
//!   replaces the differing middle instead (the work grows with length × distance, and it runs
//!   while the document is locked).
//! - **Text**: the same diff over characters *with their formatting* (and embeds), written as
//!   one Quill-style delta (retain, delete, insert with attributes), so collaborators' cursors
//!   outside the changed spans survive. Offsets are counted in the live document's unit
//!   (bytes or UTF-16, see `OffsetKind`).
//! - **XML fragment**: the same diff over its child nodes; changed nodes are replaced by copies.
//!
//! Root types are untyped on a relay: the server never calls `get_or_insert_map("board")`, it
//! only applies clients' updates, so `root_refs()` shows most roots as undefined branches. A
//! root's kind is therefore read from its content ([`RootKind`]): map entries make a map,
//! string content makes a text, XML nodes make an XML fragment, other sequence content makes
//! an array; a root with no content is empty, and Yjs cannot tell an empty root from an absent
//! one. The live document's roots are then typed with the transaction's own `get_or_insert_*`
//! (calling `Doc::get_or_insert_*` while the transaction is open would deadlock).
//!
//! Every change is planned (read-only) before any is applied, so an error leaves the live
//! document unchanged.
//!
//! Not supported: subdocuments and weak links inside the snapshot's changed values (an error);
//! XML elements or XML texts as *root* types (an error: relays see them as a branch with both
//! keys and a sequence); a root whose kind differs between the two documents (an error: a root
//! cannot change type). XML attributes are copied as strings, which is what they are in Yjs.
//! A primitive string embedded in a text (rather than typed) comes back as plain characters,
//! as with any Yjs delta. On an untyped root, a text that holds nothing but embedded shared
//! types reads as an array, and an array that holds nothing but XML nodes as an XML fragment.
//!
//! Files: this one pairs the roots of both documents and runs the restore; `plan.rs` plans
//! the edits per root kind, `diff.rs` is the sequence diff, `text.rs` turns texts into
//! characters with formatting, `copy.rs` compares and copies values across documents. The
//! kind of a root is read by [`crate::doc::roots`]. Nothing here knows about sessions: the
//! caller (`session::whiteboard`) holds the live document and relays the update.

mod copy;
mod diff;
mod plan;
#[cfg(test)]
mod tests;
mod text;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use yrs::branch::BranchPtr;
use yrs::updates::decoder::Decode;
use yrs::{Doc, Out, ReadTxn, Transact, Update};

use self::plan::plan_root;
pub use crate::doc::roots::RootKind;
use crate::doc::roots::{branch_of, root_kind};

/// Why a restore did not happen. The live document's content is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the snapshot is not a valid Yjs v1 document update: {0}")]
    BadSnapshot(String),
    #[error("root `{root}` is {live} in the live document but {snapshot} in the snapshot; a root type cannot change")]
    RootKindChanged {
        root: String,
        live: RootKind,
        snapshot: RootKind,
    },
    #[error("root `{root}` holds {what}, which restore does not support")]
    Unsupported { root: String, what: String },
}

/// Makes `live`'s content equal to that of `target_state` (a Yjs v1 full-state update, as
/// stored for a snapshot version) by applying new operations in one transaction, and returns
/// that transaction's update (v1), for the caller to relay to clients and to log. Values that
/// are already equal produce no operations; restoring an identical state returns an update
/// that changes nothing.
///
/// Must not be called while a transaction is open on `live` (yrs would block).
pub fn restore_into(live: &Doc, target_state: &[u8]) -> Result<Vec<u8>, RestoreError> {
    let target = decode_snapshot(target_state)?;
    let target_txn = target.transact();
    // Read before the write transaction: the doc's options sit behind the same store.
    let offset_kind = live.offset_kind();
    let mut txn = live.transact_mut();

    let roots = pair_roots(&txn, &target_txn)?;
    let mut edits = Vec::new();
    for root in &roots {
        let planned = plan_root(&mut txn, &target_txn, root, offset_kind)
            .map_err(|what| unsupported(&root.name, what))?;
        edits.extend(planned);
    }
    for edit in edits {
        edit.apply(&mut txn);
    }
    Ok(txn.encode_update_v1())
}

fn decode_snapshot(state: &[u8]) -> Result<Doc, RestoreError> {
    let bad = |e: &dyn fmt::Display| RestoreError::BadSnapshot(e.to_string());
    // Every caller's bytes passed the guard already; checked again here because this is
    // where yrs decodes them, and a nesting bomb overflows the stack inside its decoder.
    crate::doc::guard::NestingIndex::default()
        .check_stored(state, crate::doc::guard::SAFE_NESTING)
        .map_err(|e| bad(&e))?;
    let update = Update::decode_v1(state).map_err(|e| bad(&e))?;
    let doc = Doc::new();
    {
        let mut txn = doc.transact_mut();
        txn.apply_update(update).map_err(|e| bad(&e))?;
        // A full state is self-contained; a diff against some other state is not.
        if txn.store().pending_update().is_some() {
            return Err(bad(&"it refers to operations it does not contain"));
        }
    }
    Ok(doc)
}

/// A root name with its kind (agreed between both documents) and the snapshot's branch.
struct RootPair {
    name: String,
    kind: RootKind,
    target: Option<BranchPtr>,
}

/// Every root of either document, in name order, with the kind both agree on.
fn pair_roots<L: ReadTxn, T: ReadTxn>(
    live_txn: &L,
    target_txn: &T,
) -> Result<Vec<RootPair>, RestoreError> {
    let live_roots = root_map(live_txn);
    let target_roots = root_map(target_txn);
    let names: BTreeSet<&String> = live_roots.keys().chain(target_roots.keys()).collect();

    names
        .into_iter()
        .map(|name| {
            let target_root = target_roots.get(name);
            let live = live_roots
                .get(name)
                .map_or(Ok(RootKind::Empty), |root| root_kind(root, live_txn))
                .map_err(|what| unsupported(name, what))?;
            let target = target_root
                .map_or(Ok(RootKind::Empty), |root| root_kind(root, target_txn))
                .map_err(|what| unsupported(name, what))?;
            Ok(RootPair {
                name: name.clone(),
                kind: agreed_kind(name, live, target)?,
                target: target_root.and_then(branch_of),
            })
        })
        .collect()
}

fn unsupported(root: &str, what: &str) -> RestoreError {
    RestoreError::Unsupported {
        root: root.to_string(),
        what: what.to_string(),
    }
}

fn root_map<T: ReadTxn>(txn: &T) -> BTreeMap<String, Out> {
    txn.root_refs()
        .map(|(name, root)| (name.to_string(), root))
        .collect()
}

fn agreed_kind(name: &str, live: RootKind, target: RootKind) -> Result<RootKind, RestoreError> {
    match (live, target) {
        (RootKind::Empty, kind) | (kind, RootKind::Empty) => Ok(kind),
        (live, target) if live == target => Ok(live),
        (live, snapshot) => Err(RestoreError::RootKindChanged {
            root: name.to_string(),
            live,
            snapshot,
        }),
    }
}
