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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use base64::Engine as _;
use serde_json::Value;
use yrs::branch::BranchPtr;
use yrs::types::text::{Diff, YChange};
use yrs::types::xml::XmlIn;
use yrs::types::{AsPrelim, Attrs, Delta};
use yrs::updates::decoder::Decode;
use yrs::{
    Any, Array, ArrayRef, Doc, GetString, In, Map, MapRef, Number, OffsetKind, Out, ReadTxn, Text,
    TextRef, Transact, TransactionMut, Update, WriteTxn, Xml, XmlElementRef, XmlFragment,
    XmlFragmentRef,
};

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

/// What a root type is, as read from its content (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    /// No content: could be anything, and needs nothing.
    Empty,
    Map,
    Array,
    Text,
    XmlFragment,
}

impl fmt::Display for RootKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RootKind::Empty => "empty",
            RootKind::Map => "a map",
            RootKind::Array => "an array",
            RootKind::Text => "a text",
            RootKind::XmlFragment => "an XML fragment",
        })
    }
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

/// The document's content as JSON, for `easel snapshot inspect`: an object with one key per
/// root type (maps become objects, arrays arrays, texts their plain string, XML its string
/// form), nested shared types converted recursively. Roots without content are left out (Yjs
/// cannot tell them from absent ones). Binary values become base64 strings (standard alphabet,
/// padded); integral numbers print as integers; subdocuments and values of unknown type as
/// `null`; text formatting and embeds are not shown.
///
/// Must not be called while a write transaction is open on `doc`.
pub fn doc_to_json(doc: &Doc) -> Value {
    let txn = doc.transact();
    let roots: serde_json::Map<String, Value> = txn
        .root_refs()
        .filter_map(|(name, root)| Some((name.to_string(), root_to_json(&root, &txn)?)))
        .collect();
    Value::Object(roots)
}

// ---------------------------------------------------------------------------------------------
// Reading the snapshot and the roots

fn decode_snapshot(state: &[u8]) -> Result<Doc, RestoreError> {
    let bad = |e: &dyn fmt::Display| RestoreError::BadSnapshot(e.to_string());
    // Every caller's bytes passed the guard already; checked again here because this is
    // where yrs decodes them, and a nesting bomb overflows the stack inside its decoder.
    crate::doc::guard::NestingIndex::default()
        .check(state, crate::doc::guard::SAFE_NESTING)
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

fn branch_of(root: &Out) -> Option<BranchPtr> {
    root.try_branch().map(BranchPtr::from)
}

/// The kind of a root: declared, if some code on this replica typed it, else read from its
/// content (a relay's roots are untyped, see the module documentation).
fn root_kind<T: ReadTxn>(root: &Out, txn: &T) -> Result<RootKind, &'static str> {
    match root {
        Out::YMap(_) => Ok(RootKind::Map),
        Out::YArray(_) => Ok(RootKind::Array),
        Out::YText(_) => Ok(RootKind::Text),
        Out::YXmlFragment(_) => Ok(RootKind::XmlFragment),
        Out::UndefinedRef(branch) => kind_from_content(*branch, txn),
        Out::YXmlElement(_) => Err("an XML element as a root type"),
        Out::YXmlText(_) => Err("an XML text as a root type"),
        _ => Err("a root type of an unknown kind"),
    }
}

fn kind_from_content<T: ReadTxn>(branch: BranchPtr, txn: &T) -> Result<RootKind, &'static str> {
    match (has_entries(branch, txn), has_sequence(branch)) {
        (false, false) => Ok(RootKind::Empty),
        (true, false) => Ok(RootKind::Map),
        (false, true) => Ok(sequence_kind(branch, txn)),
        (true, true) => Err("a root with both keys and a sequence (an XML element or XML text)"),
    }
}

fn has_entries<T: ReadTxn>(branch: BranchPtr, txn: &T) -> bool {
    MapRef::from(branch).len(txn) > 0
}

fn has_sequence(branch: BranchPtr) -> bool {
    // The count of visible sequence items (map entries and formatting marks are not counted).
    branch.len() > 0
}

/// Text, array or XML fragment, for a branch with sequence content.
fn sequence_kind<T: ReadTxn>(branch: BranchPtr, txn: &T) -> RootKind {
    // A text diff shows string content (and primitive embeds) as `Out::Any` chunks; an array's
    // primitive items never show up in it, and shared types show in both.
    let chunks = TextRef::from(branch).diff(txn, YChange::identity);
    if chunks
        .iter()
        .any(|chunk| matches!(chunk.insert, Out::Any(_)))
    {
        return RootKind::Text;
    }
    let all_xml = ArrayRef::from(branch)
        .iter(txn)
        .all(|item| matches!(item, Out::YXmlElement(_) | Out::YXmlText(_)));
    if all_xml {
        RootKind::XmlFragment
    } else {
        RootKind::Array
    }
}

// ---------------------------------------------------------------------------------------------
// Planning the edits

/// One change to the live document, planned before any is applied.
enum Edit {
    RemoveKey {
        map: MapRef,
        key: String,
    },
    SetKey {
        map: MapRef,
        key: String,
        value: In,
    },
    SpliceArray {
        array: ArrayRef,
        at: u32,
        remove: u32,
        insert: Vec<In>,
    },
    SpliceText {
        text: TextRef,
        delta: Vec<Delta<In>>,
    },
    SpliceXml {
        fragment: XmlFragmentRef,
        at: u32,
        remove: u32,
        insert: Vec<XmlIn>,
    },
}

impl Edit {
    fn apply(self, txn: &mut TransactionMut) {
        match self {
            Edit::RemoveKey { map, key } => {
                map.remove(txn, &key);
            }
            Edit::SetKey { map, key, value } => {
                map.insert(txn, key, value);
            }
            Edit::SpliceArray {
                array,
                at,
                remove,
                insert,
            } => {
                array.remove_range(txn, at, remove);
                for (index, value) in (at..).zip(insert) {
                    array.insert(txn, index, value);
                }
            }
            Edit::SpliceText { text, delta } => text.apply_delta(txn, delta),
            Edit::SpliceXml {
                fragment,
                at,
                remove,
                insert,
            } => {
                fragment.remove_range(txn, at, remove);
                for (index, node) in (at..).zip(insert) {
                    fragment.insert(txn, index, node);
                }
            }
        }
    }
}

/// What cannot be copied into the live document (see [`Content::ensure_copyable`]).
type NotCopyable = &'static str;

fn plan_root<T: ReadTxn>(
    txn: &mut TransactionMut,
    target_txn: &T,
    root: &RootPair,
    offset_kind: OffsetKind,
) -> Result<Vec<Edit>, NotCopyable> {
    let name = root.name.as_str();
    let target = root.target;
    // Typing the live root is no content change: it only tells this replica how to read it.
    match root.kind {
        RootKind::Empty => Ok(Vec::new()),
        RootKind::Map => {
            let live = txn.get_or_insert_map(name);
            plan_map(live, txn, target.map(MapRef::from), target_txn)
        }
        RootKind::Array => {
            let live = txn.get_or_insert_array(name);
            plan_array(live, txn, target.map(ArrayRef::from), target_txn)
        }
        RootKind::Text => {
            let live = txn.get_or_insert_text(name);
            let target = target.map(TextRef::from);
            let planned = plan_text(live, txn, target, target_txn, offset_kind)?;
            Ok(planned.into_iter().collect())
        }
        RootKind::XmlFragment => {
            let live = txn.get_or_insert_xml_fragment(name);
            plan_xml(live, txn, target.map(XmlFragmentRef::from), target_txn)
        }
    }
}

/// Key by key: remove what the snapshot lacks, set what differs, leave the rest alone.
fn plan_map<L: ReadTxn, T: ReadTxn>(
    live: MapRef,
    live_txn: &L,
    target: Option<MapRef>,
    target_txn: &T,
) -> Result<Vec<Edit>, NotCopyable> {
    let wanted: BTreeMap<String, Out> = target
        .map(|map| {
            map.iter(target_txn)
                .map(|(key, value)| (key.to_string(), value))
                .collect()
        })
        .unwrap_or_default();
    let present: BTreeSet<String> = live.keys(live_txn).map(str::to_string).collect();

    let mut edits: Vec<Edit> = present
        .iter()
        .filter(|key| !wanted.contains_key(*key))
        .map(|key| Edit::RemoveKey {
            map: live.clone(),
            key: key.clone(),
        })
        .collect();
    for (key, value) in &wanted {
        let wanted_content = Content::of(value, target_txn);
        let current_content = live.get(live_txn, key).map(|v| Content::of(&v, live_txn));
        if current_content.as_ref() != Some(&wanted_content) {
            edits.push(Edit::SetKey {
                map: live.clone(),
                key: key.clone(),
                value: copy_of(value, &wanted_content, target_txn)?,
            });
        }
    }
    Ok(edits)
}

fn plan_array<L: ReadTxn, T: ReadTxn>(
    live: ArrayRef,
    live_txn: &L,
    target: Option<ArrayRef>,
    target_txn: &T,
) -> Result<Vec<Edit>, NotCopyable> {
    let current = Content::of_all(live.iter(live_txn), live_txn);
    let wanted_values: Vec<Out> = target
        .map(|array| array.iter(target_txn).collect())
        .unwrap_or_default();
    let wanted = Content::of_all(wanted_values.iter().cloned(), target_txn);

    let mut edits = Vec::new();
    // Right to left, so that each splice's indices are still those of the unchanged array.
    for splice in splices(&current, &wanted, |a, b| a == b).into_iter().rev() {
        let insert = splice
            .insert
            .clone()
            .map(|i| copy_of(&wanted_values[i], &wanted[i], target_txn))
            .collect::<Result<_, _>>()?;
        edits.push(Edit::SpliceArray {
            array: live.clone(),
            at: splice.at as u32,
            remove: splice.remove as u32,
            insert,
        });
    }
    Ok(edits)
}

/// One Quill-style delta: retain what is unchanged, delete and insert the rest.
fn plan_text<L: ReadTxn, T: ReadTxn>(
    live: TextRef,
    live_txn: &L,
    target: Option<TextRef>,
    target_txn: &T,
    offset_kind: OffsetKind,
) -> Result<Option<Edit>, NotCopyable> {
    let current_chunks = live.diff(live_txn, YChange::identity);
    let wanted_chunks = target
        .map(|text| text.diff(target_txn, YChange::identity))
        .unwrap_or_default();
    let current = text_units(&current_chunks, live_txn);
    let wanted = text_units(&wanted_chunks, target_txn);
    let splices = splices(&current, &wanted, TextUnit::same_as);
    if splices.is_empty() {
        return Ok(None);
    }

    // Lengths in the live document's own unit for text offsets (bytes or UTF-16).
    let length = |units: &[TextUnit]| units.iter().map(|u| u.len(offset_kind)).sum::<u32>();
    let mut delta = Vec::new();
    let mut done = 0;
    for splice in splices {
        let keep = length(&current[done..splice.at]);
        let remove = length(&current[splice.at..splice.at + splice.remove]);
        if keep > 0 {
            delta.push(Delta::Retain(keep, None));
        }
        if remove > 0 {
            delta.push(Delta::Deleted(remove));
        }
        delta.extend(insertions(&wanted[splice.insert], target_txn)?);
        done = splice.at + splice.remove;
    }
    Ok(Some(Edit::SpliceText { text: live, delta }))
}

fn plan_xml<L: ReadTxn, T: ReadTxn>(
    live: XmlFragmentRef,
    live_txn: &L,
    target: Option<XmlFragmentRef>,
    target_txn: &T,
) -> Result<Vec<Edit>, NotCopyable> {
    let current = Content::of_all(xml_children(&live, live_txn), live_txn);
    let wanted_nodes: Vec<Out> = target
        .map(|fragment| xml_children(&fragment, target_txn))
        .unwrap_or_default();
    let wanted = Content::of_all(wanted_nodes.iter().cloned(), target_txn);

    let mut edits = Vec::new();
    // Right to left, as for arrays.
    for splice in splices(&current, &wanted, |a, b| a == b).into_iter().rev() {
        let insert = splice
            .insert
            .clone()
            .map(|i| copy_xml_node(&wanted_nodes[i], &wanted[i], target_txn))
            .collect::<Result<_, _>>()?;
        edits.push(Edit::SpliceXml {
            fragment: live.clone(),
            at: splice.at as u32,
            remove: splice.remove as u32,
            insert,
        });
    }
    Ok(edits)
}

fn xml_children<X: XmlFragment, T: ReadTxn>(node: &X, txn: &T) -> Vec<Out> {
    node.children(txn).map(Out::from).collect()
}

// ---------------------------------------------------------------------------------------------
// Sequence diff

/// Beyond this many inserted plus deleted items, the diff stops looking for a shortest edit
/// and replaces the whole differing middle: the work grows with (length × distance) and runs
/// while the live document is locked.
const MAX_EDIT_DISTANCE: usize = 512;

/// At index `at` of the live sequence, `remove` items are replaced by the target's items
/// `insert`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Splice {
    at: usize,
    remove: usize,
    insert: Range<usize>,
}

/// The splices, in increasing order of `at` (indices into the unchanged `live`), that turn
/// `live` into `target`; none when they are equal. The common prefix and suffix are set aside
/// first, then the middle is diffed with Myers' algorithm, so items that did not change are
/// kept even between changes.
fn splices<A, B>(live: &[A], target: &[B], same: impl Fn(&A, &B) -> bool) -> Vec<Splice> {
    let prefix = live
        .iter()
        .zip(target)
        .take_while(|(a, b)| same(a, b))
        .count();
    // The suffix may not eat into the prefix.
    let room = live.len().min(target.len()) - prefix;
    let suffix = live
        .iter()
        .rev()
        .zip(target.iter().rev())
        .take(room)
        .take_while(|(a, b)| same(a, b))
        .count();
    let live_middle = &live[prefix..live.len() - suffix];
    let target_middle = &target[prefix..target.len() - suffix];
    if live_middle.is_empty() && target_middle.is_empty() {
        return Vec::new();
    }
    let middle = match shortest_edit(live_middle, target_middle, &same) {
        Some(steps) => splices_of(&steps),
        None => vec![Splice {
            at: 0,
            remove: live_middle.len(),
            insert: 0..target_middle.len(),
        }],
    };
    middle
        .into_iter()
        .map(|s| Splice {
            at: s.at + prefix,
            remove: s.remove,
            insert: s.insert.start + prefix..s.insert.end + prefix,
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Keep,
    Delete,
    Insert,
}

/// Myers' shortest edit script ("An O(ND) Difference Algorithm", 1986), or `None` when it is
/// longer than [`MAX_EDIT_DISTANCE`].
fn shortest_edit<A, B>(a: &[A], b: &[B], same: &impl Fn(&A, &B) -> bool) -> Option<Vec<Step>> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let max_d = (a.len() + b.len()).min(MAX_EDIT_DISTANCE) as isize;
    // furthest[k]: the furthest x reached on diagonal k = x - y, for the current d.
    let offset = max_d + 1;
    let at = |k: isize| (k + offset) as usize;
    let mut furthest = vec![0isize; at(offset) + 1];
    // trace[d]: `furthest` over diagonals -d..=d before round d, for the backtrack.
    let mut trace: Vec<Vec<isize>> = Vec::new();
    for d in 0..=max_d {
        trace.push(furthest[at(-d)..=at(d)].to_vec());
        for k in (-d..=d).step_by(2) {
            let down = k == -d || (k != d && furthest[at(k - 1)] < furthest[at(k + 1)]);
            let mut x = if down {
                furthest[at(k + 1)]
            } else {
                furthest[at(k - 1)] + 1
            };
            let mut y = x - k;
            while x < n && y < m && same(&a[x as usize], &b[y as usize]) {
                x += 1;
                y += 1;
            }
            furthest[at(k)] = x;
            if x >= n && y >= m {
                return Some(backtrack(&trace, n, m));
            }
        }
    }
    None
}

/// Walks the trace back from the end: each round d added one insert (a step down) or one
/// delete (a step right) followed by a run of kept items (a diagonal "snake").
fn backtrack(trace: &[Vec<isize>], n: isize, m: isize) -> Vec<Step> {
    let mut steps = Vec::new();
    let (mut x, mut y) = (n, m);
    for (d, furthest) in trace.iter().enumerate().skip(1).rev() {
        let d = d as isize;
        let reached = |k: isize| furthest[(k + d) as usize];
        let k = x - y;
        let down = k == -d || (k != d && reached(k - 1) < reached(k + 1));
        let prev_k = if down { k + 1 } else { k - 1 };
        let prev_x = reached(prev_k);
        let prev_y = prev_x - prev_k;
        let (step_x, step_y) = if down {
            (prev_x, prev_y + 1)
        } else {
            (prev_x + 1, prev_y)
        };
        while x > step_x && y > step_y {
            steps.push(Step::Keep);
            x -= 1;
            y -= 1;
        }
        steps.push(if down { Step::Insert } else { Step::Delete });
        (x, y) = (prev_x, prev_y);
    }
    // Round 0 is a run of kept items from the start.
    steps.extend((0..x).map(|_| Step::Keep));
    steps.reverse();
    steps
}

/// Groups an edit script into splices: a run of deletes and inserts between kept items.
fn splices_of(steps: &[Step]) -> Vec<Splice> {
    let mut splices = Vec::new();
    let mut open: Option<Splice> = None;
    let (mut x, mut y) = (0, 0);
    for step in steps {
        let new_splice = || Splice {
            at: x,
            remove: 0,
            insert: y..y,
        };
        match step {
            Step::Keep => {
                splices.extend(open.take());
                x += 1;
                y += 1;
            }
            Step::Delete => {
                open.get_or_insert_with(new_splice).remove += 1;
                x += 1;
            }
            Step::Insert => {
                open.get_or_insert_with(new_splice).insert.end += 1;
                y += 1;
            }
        }
    }
    splices.extend(open);
    splices
}

// ---------------------------------------------------------------------------------------------
// Texts as characters with formatting

/// One visible unit of a text (a character or an embed) with the formatting around it.
struct TextUnit<'a> {
    content: UnitContent<'a>,
    attrs: Option<&'a Attrs>,
}

enum UnitContent<'a> {
    Char(char),
    Embed { value: &'a Out, content: Content },
}

fn text_units<'a, T: ReadTxn>(chunks: &'a [Diff<YChange>], txn: &T) -> Vec<TextUnit<'a>> {
    let mut units = Vec::new();
    for chunk in chunks {
        let attrs = plain_if_empty(chunk.attributes.as_deref());
        match &chunk.insert {
            Out::Any(Any::String(s)) => units.extend(s.chars().map(|c| TextUnit {
                content: UnitContent::Char(c),
                attrs,
            })),
            embed => units.push(TextUnit {
                content: UnitContent::Embed {
                    value: embed,
                    content: Content::of(embed, txn),
                },
                attrs,
            }),
        }
    }
    units
}

/// No attributes and an empty set of attributes both mean plain text.
fn plain_if_empty(attrs: Option<&Attrs>) -> Option<&Attrs> {
    attrs.filter(|attrs| !attrs.is_empty())
}

impl TextUnit<'_> {
    /// Its length in text offsets: what yrs counts for `offset_kind`; an embed counts one.
    fn len(&self, offset_kind: OffsetKind) -> u32 {
        match (&self.content, offset_kind) {
            (UnitContent::Char(c), OffsetKind::Bytes) => c.len_utf8() as u32,
            (UnitContent::Char(c), OffsetKind::Utf16) => c.len_utf16() as u32,
            (UnitContent::Embed { .. }, _) => 1,
        }
    }

    fn same_as(&self, other: &TextUnit) -> bool {
        let same_content = match (&self.content, &other.content) {
            (UnitContent::Char(a), UnitContent::Char(b)) => a == b,
            (UnitContent::Embed { content: a, .. }, UnitContent::Embed { content: b, .. }) => {
                a == b
            }
            _ => false,
        };
        same_content && self.attrs == other.attrs
    }
}

/// The delta inserts that write `units`: runs of characters with the same formatting become
/// one string chunk; embeds are copied one by one.
fn insertions<T: ReadTxn>(units: &[TextUnit], txn: &T) -> Result<Vec<Delta<In>>, NotCopyable> {
    fn flush(run: &mut String, attrs: Option<&Attrs>, deltas: &mut Vec<Delta<In>>) {
        if !run.is_empty() {
            let chunk = In::Any(Any::from(std::mem::take(run)));
            deltas.push(Delta::Inserted(chunk, attrs.cloned().map(Box::new)));
        }
    }
    let mut deltas = Vec::new();
    let mut run = String::new();
    let mut run_attrs: Option<&Attrs> = None;
    for unit in units {
        if unit.attrs != run_attrs {
            flush(&mut run, run_attrs, &mut deltas);
            run_attrs = unit.attrs;
        }
        match &unit.content {
            UnitContent::Char(c) => run.push(*c),
            UnitContent::Embed { value, content } => {
                flush(&mut run, run_attrs, &mut deltas);
                let embed = copy_of(value, content, txn)?;
                deltas.push(Delta::Inserted(embed, unit.attrs.cloned().map(Box::new)));
            }
        }
    }
    flush(&mut run, run_attrs, &mut deltas);
    Ok(deltas)
}

// ---------------------------------------------------------------------------------------------
// Comparing and copying values across documents

/// A value's content, detached from its document, so that values of two documents can be
/// compared: shared types are equal when their kind and content are, never by identity.
#[derive(Debug, PartialEq)]
enum Content {
    /// `Any`'s own equality: `1` (an integer) equals `1.0` (a float), as in JavaScript.
    Primitive(Any),
    Map(BTreeMap<String, Content>),
    Array(Vec<Content>),
    /// Chunks as a text diff gives them: strings and embeds, each with its formatting.
    Text(Vec<(Content, Option<Attrs>)>),
    XmlElement {
        tag: Option<String>,
        /// XML attributes are strings in Yjs (and copied as such), so compared as strings.
        attributes: BTreeMap<String, String>,
        children: Vec<Content>,
    },
    XmlText {
        attributes: BTreeMap<String, String>,
        text: Vec<(Content, Option<Attrs>)>,
    },
    XmlFragment(Vec<Content>),
    Subdocument(String),
    /// A branch of a type yrs does not know here (a weak link, an XML hook).
    Unknown,
}

impl Content {
    fn of<T: ReadTxn>(value: &Out, txn: &T) -> Content {
        match value {
            Out::Any(any) => Content::Primitive(any.clone()),
            Out::YMap(map) => Content::Map(
                map.iter(txn)
                    .map(|(key, item)| (key.to_string(), Content::of(&item, txn)))
                    .collect(),
            ),
            Out::YArray(array) => Content::Array(Content::of_all(array.iter(txn), txn)),
            Out::YText(text) => Content::Text(Content::of_text(text, txn)),
            Out::YXmlElement(element) => Content::XmlElement {
                tag: element.try_tag().map(|tag| tag.to_string()),
                attributes: attribute_strings(element, txn),
                children: Content::of_all(xml_children(element, txn), txn),
            },
            Out::YXmlText(text) => Content::XmlText {
                attributes: attribute_strings(text, txn),
                text: Content::of_text(text, txn),
            },
            Out::YXmlFragment(fragment) => {
                Content::XmlFragment(Content::of_all(xml_children(fragment, txn), txn))
            }
            Out::YDoc(doc) => Content::Subdocument(doc.guid().to_string()),
            _ => Content::Unknown,
        }
    }

    fn of_all<T: ReadTxn>(values: impl IntoIterator<Item = Out>, txn: &T) -> Vec<Content> {
        values.into_iter().map(|v| Content::of(&v, txn)).collect()
    }

    fn of_text<X: Text, T: ReadTxn>(text: &X, txn: &T) -> Vec<(Content, Option<Attrs>)> {
        text.diff(txn, YChange::identity)
            .into_iter()
            .map(|chunk| {
                let attrs = plain_if_empty(chunk.attributes.as_deref()).cloned();
                (Content::of(&chunk.insert, txn), attrs)
            })
            .collect()
    }

    /// yrs deep-copies every shared type but a subdocument (it would be one document linked
    /// twice) and a branch of a type it does not know.
    fn ensure_copyable(&self) -> Result<(), NotCopyable> {
        match self {
            Content::Primitive(_) => Ok(()),
            Content::Map(entries) => entries.values().try_for_each(Content::ensure_copyable),
            Content::Array(items)
            | Content::XmlFragment(items)
            | Content::XmlElement {
                children: items, ..
            } => items.iter().try_for_each(Content::ensure_copyable),
            Content::Text(chunks) | Content::XmlText { text: chunks, .. } => chunks
                .iter()
                .try_for_each(|(chunk, _)| chunk.ensure_copyable()),
            Content::Subdocument(_) => Err("a subdocument"),
            Content::Unknown => Err("a shared type of an unknown kind (a weak link or XML hook)"),
        }
    }
}

fn attribute_strings<X: Xml, T: ReadTxn>(node: &X, txn: &T) -> BTreeMap<String, String> {
    node.attributes(txn)
        .map(|(key, value)| (key.to_string(), value.to_string(txn)))
        .collect()
}

/// A deep copy of the snapshot's `value` (whose content is `content`), to insert in the live
/// document: primitives as they are, shared types as new ones with the same content.
fn copy_of<T: ReadTxn>(value: &Out, content: &Content, txn: &T) -> Result<In, NotCopyable> {
    content.ensure_copyable()?;
    Ok(value.as_prelim(txn))
}

fn copy_xml_node<T: ReadTxn>(node: &Out, content: &Content, txn: &T) -> Result<XmlIn, NotCopyable> {
    content.ensure_copyable()?;
    match node {
        Out::YXmlElement(element) => Ok(XmlIn::from(element.as_prelim(txn))),
        Out::YXmlText(text) => Ok(XmlIn::from(text.as_prelim(txn))),
        Out::YXmlFragment(fragment) => Ok(XmlIn::from(fragment.as_prelim(txn))),
        _ => Err("a value that is not an XML node inside an XML fragment"),
    }
}

// ---------------------------------------------------------------------------------------------
// JSON

/// `None` for a root without content (it is left out).
fn root_to_json<T: ReadTxn>(root: &Out, txn: &T) -> Option<Value> {
    let branch = branch_of(root)?;
    if !has_entries(branch, txn) && !has_sequence(branch) {
        return None;
    }
    let typed = match root_kind(root, txn) {
        Ok(RootKind::Map) => Out::YMap(MapRef::from(branch)),
        Ok(RootKind::Array) => Out::YArray(ArrayRef::from(branch)),
        Ok(RootKind::Text) => Out::YText(TextRef::from(branch)),
        Ok(RootKind::XmlFragment) => Out::YXmlFragment(XmlFragmentRef::from(branch)),
        // A typed XML element or text converts as itself; an unreadable branch becomes null.
        Ok(RootKind::Empty) | Err(_) => root.clone(),
    };
    Some(out_to_json(&typed, txn))
}

fn out_to_json<T: ReadTxn>(value: &Out, txn: &T) -> Value {
    match value {
        Out::Any(any) => any_to_json(any),
        Out::YMap(map) => Value::Object(
            map.iter(txn)
                .map(|(key, item)| (key.to_string(), out_to_json(&item, txn)))
                .collect(),
        ),
        Out::YArray(array) => Value::Array(
            array
                .iter(txn)
                .map(|item| out_to_json(&item, txn))
                .collect(),
        ),
        Out::YText(text) => Value::String(text.get_string(txn)),
        Out::YXmlElement(element) => Value::String(xml_element_string(element, txn)),
        Out::YXmlFragment(fragment) => Value::String(fragment.get_string(txn)),
        Out::YXmlText(text) => Value::String(text.get_string(txn)),
        _ => Value::Null,
    }
}

fn xml_element_string<T: ReadTxn>(element: &XmlElementRef, txn: &T) -> String {
    // `get_string` panics on an element without a tag, which only a corrupt document has.
    if element.try_tag().is_some() {
        element.get_string(txn)
    } else {
        String::new()
    }
}

fn any_to_json(any: &Any) -> Value {
    match any {
        Any::Null | Any::Undefined => Value::Null,
        Any::Bool(b) => Value::Bool(*b),
        Any::Number(n) => number_to_json(*n),
        Any::String(s) => Value::String(s.to_string()),
        Any::Buffer(bytes) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        Any::Array(items) => Value::Array(items.iter().map(any_to_json).collect()),
        Any::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(key, item)| (key.clone(), any_to_json(item)))
                .collect(),
        ),
    }
}

/// Integral numbers print as integers (as `JSON.stringify` does); NaN and infinities as null.
fn number_to_json(n: Number) -> Value {
    const MAX_SAFE: f64 = Number::F64_MAX_SAFE_INTEGER;
    match n {
        Number::Int(i) => Value::from(i),
        Number::Float(f) if f.fract() == 0.0 && f.abs() <= MAX_SAFE => Value::from(f as i64),
        Number::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use serde_json::json;
    use std::sync::{Arc, Mutex};
    use yrs::{
        ArrayPrelim, Assoc, IndexedSequence, MapPrelim, Observable, Options, StateVector,
        XmlElementPrelim, XmlTextPrelim,
    };

    fn full_state(doc: &Doc) -> Vec<u8> {
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    fn apply(doc: &Doc, update: &[u8]) {
        let update = Update::decode_v1(update).unwrap();
        doc.transact_mut().apply_update(update).unwrap();
    }

    /// A fresh replica of `state`, its roots untyped, as on the relay.
    fn replica(state: &[u8]) -> Doc {
        let doc = Doc::new();
        apply(&doc, state);
        doc
    }

    fn attrs(pairs: &[(&str, Any)]) -> Attrs {
        pairs
            .iter()
            .map(|(k, v)| (Arc::from(*k), v.clone()))
            .collect()
    }

    /// A tutor's browser (a yrs doc that types its roots and counts text offsets in UTF-16, as
    /// Yjs does) and the relay's copy, which only ever applies the browser's updates.
    struct Session {
        browser: Doc,
        relay: Doc,
    }

    impl Session {
        fn new() -> Self {
            let browser = Doc::with_options(Options {
                offset_kind: OffsetKind::Utf16,
                ..Options::default()
            });
            Session {
                browser,
                relay: Doc::new(),
            }
        }

        /// An edit in the browser, synced to the relay.
        fn edit(&self, f: impl FnOnce(&mut TransactionMut)) {
            let update = {
                let mut txn = self.browser.transact_mut();
                f(&mut txn);
                txn.encode_update_v1()
            };
            apply(&self.relay, &update);
        }

        /// A snapshot version, as the relay stores it.
        fn version(&self) -> Vec<u8> {
            full_state(&self.relay)
        }

        /// Restores `version` on the relay, delivers the update to the browser and to a second
        /// replica that had the relay's pre-restore state, and checks that all three show the
        /// version's content.
        fn restore(&self, version: &[u8]) -> Vec<u8> {
            let bystander = replica(&full_state(&self.relay));
            let update = restore_into(&self.relay, version).expect("restore");
            apply(&self.browser, &update);
            apply(&bystander, &update);
            let expected = doc_to_json(&replica(version));
            assert_eq!(doc_to_json(&self.relay), expected, "relay");
            assert_eq!(doc_to_json(&self.browser), expected, "browser");
            assert_eq!(doc_to_json(&bystander), expected, "second replica");
            update
        }
    }

    fn get_map<T: ReadTxn>(map: &MapRef, txn: &T, key: &str) -> MapRef {
        match map.get(txn, key) {
            Some(Out::YMap(nested)) => nested,
            other => panic!("`{key}` is not a map: {other:?}"),
        }
    }

    #[test]
    fn maps_are_restored_key_by_key() {
        let session = Session::new();
        session.edit(|txn| {
            let board = txn.get_or_insert_map("board");
            board.insert(txn, "title", "Algebra");
            board.insert(txn, "zoom", 1.5);
            board.insert(txn, "stale", "removed later");
            board.insert(
                txn,
                "shape",
                MapPrelim::from([("kind", In::from("circle")), ("r", In::from(2))]),
            );
            board.insert(txn, "kept", MapPrelim::from([("a", 1)]));
        });
        let v1 = session.version();
        session.edit(|txn| {
            let board = txn.get_or_insert_map("board");
            board.insert(txn, "title", "Geometry");
            board.insert(txn, "added", true);
            board.remove(txn, "stale");
            get_map(&board, txn, "shape").insert(txn, "r", 5);
        });

        let board = session.browser.get_or_insert_map("board");
        let kept_before = get_map(&board, &session.browser.transact(), "kept");
        let changed_keys = Arc::new(Mutex::new(BTreeSet::new()));
        let seen = changed_keys.clone();
        board.observe("test", move |txn, event| {
            let keys = event.keys(txn).keys().map(|k| k.to_string());
            seen.lock().unwrap().extend(keys);
        });

        session.restore(&v1);

        let expected: BTreeSet<String> = ["added", "shape", "stale", "title"]
            .map(String::from)
            .into();
        assert_eq!(*changed_keys.lock().unwrap(), expected);
        let txn = session.browser.transact();
        assert_eq!(board.get(&txn, "title"), Some(Out::from("Algebra")));
        assert_eq!(
            get_map(&board, &txn, "kept"),
            kept_before,
            "an unchanged nested map keeps its identity"
        );
        assert_eq!(
            doc_to_json(&session.relay),
            json!({"board": {"title": "Algebra", "zoom": 1.5, "stale": "removed later",
                             "shape": {"kind": "circle", "r": 2}, "kept": {"a": 1}}})
        );
    }

    fn stroke(id: &str, color: &str) -> MapPrelim {
        MapPrelim::from([
            ("id", In::from(id)),
            ("color", In::from(color)),
            ("points", In::Array(ArrayPrelim::from_iter([1, 2, 3, 4]))),
        ])
    }

    #[test]
    fn arrays_are_restored_around_their_unchanged_items() {
        let session = Session::new();
        session.edit(|txn| {
            let strokes = txn.get_or_insert_array("strokes");
            for (id, color) in [("s1", "red"), ("s2", "blue"), ("s3", "green")] {
                strokes.push_back(txn, stroke(id, color));
            }
            let tags = txn.get_or_insert_array("tags");
            tags.insert_range(txn, 0, [1, 2, 3]);
        });
        let v1 = session.version();
        session.edit(|txn| {
            let strokes = txn.get_or_insert_array("strokes");
            strokes.push_back(txn, stroke("s4", "black"));
            strokes.remove(txn, 1);
            match strokes.get(txn, 1) {
                Some(Out::YMap(s3)) => s3.insert(txn, "color", "pink"),
                other => panic!("{other:?}"),
            };
            let tags = txn.get_or_insert_array("tags");
            tags.remove(txn, 1);
            tags.push_back(txn, 4);
        });

        let strokes = session.browser.get_or_insert_array("strokes");
        let first_before = strokes.get(&session.browser.transact(), 0);
        let update = session.restore(&v1);

        let txn = session.browser.transact();
        assert_eq!(
            strokes.get(&txn, 0),
            first_before,
            "the untouched first stroke is kept"
        );
        assert_eq!(
            doc_to_json(&session.browser)["strokes"],
            json!([
                {"id": "s1", "color": "red", "points": [1, 2, 3, 4]},
                {"id": "s2", "color": "blue", "points": [1, 2, 3, 4]},
                {"id": "s3", "color": "green", "points": [1, 2, 3, 4]},
            ])
        );
        assert_eq!(doc_to_json(&session.browser)["tags"], json!([1, 2, 3]));
        // Restoring again changes nothing more.
        drop(txn);
        let again = restore_into(&session.relay, &v1).unwrap();
        let before = session.browser.transact().state_vector();
        apply(&session.browser, &again);
        assert_eq!(session.browser.transact().state_vector(), before);
        assert!(update.len() > again.len());
    }

    #[test]
    fn text_is_restored_with_formatting_and_cursors_survive() {
        let session = Session::new();
        let bold = attrs(&[("bold", Any::Bool(true))]);
        session.edit(|txn| {
            let notes = txn.get_or_insert_text("notes");
            notes.insert(txn, 0, "Thé 😀 quick brown fox");
            notes.format(txn, 13, 5, bold.clone()); // "brown", in UTF-16 offsets
        });
        let v1 = session.version();
        session.edit(|txn| {
            let notes = txn.get_or_insert_text("notes");
            notes.remove_range(txn, 7, 5); // "quick"
            notes.insert(txn, 7, "slow");
            notes.format(txn, 12, 5, attrs(&[("bold", Any::Null)])); // "brown"
            notes.insert(txn, 0, "Note: ");
            notes.remove_range(txn, 0, 6); // typed, then deleted
            notes.insert_with_attributes(txn, 21, "!!", bold.clone());
        });
        assert_eq!(
            doc_to_json(&session.relay)["notes"],
            json!("Thé 😀 slow brown fox!!")
        );

        // A collaborator's cursor on the "f" of "fox": UTF-16 offset 18 before the restore.
        let notes = session.browser.get_or_insert_text("notes");
        let cursor = notes
            .sticky_index(&session.browser.transact(), 18, Assoc::After)
            .unwrap();
        session.restore(&v1);

        let txn = session.browser.transact();
        assert_eq!(notes.get_string(&txn), "Thé 😀 quick brown fox");
        assert_eq!(
            cursor.get_offset(&txn).unwrap().index,
            19,
            "the cursor survives"
        );
        let original = replica(&v1);
        let original_notes = original.get_or_insert_text("notes");
        let chunks = |text: &TextRef, txn: &yrs::Transaction| -> Vec<(String, Option<Attrs>)> {
            text.diff(txn, YChange::identity)
                .into_iter()
                .map(|d| (d.insert.to_string(txn), d.attributes.map(|a| *a)))
                .collect()
        };
        assert_eq!(
            chunks(&notes, &txn),
            chunks(&original_notes, &original.transact())
        );
        assert_eq!(
            chunks(&notes, &txn),
            vec![
                ("Thé 😀 quick ".to_string(), None),
                ("brown".to_string(), Some(bold)),
                (" fox".to_string(), None),
            ]
        );
    }

    #[test]
    fn scattered_changes_keep_the_items_between_them() {
        let session = Session::new();
        session.edit(|txn| {
            let strokes = txn.get_or_insert_array("strokes");
            for i in 1..=5 {
                strokes.push_back(txn, stroke(&format!("s{i}"), "red"));
            }
        });
        let v1 = session.version();
        session.edit(|txn| {
            let strokes = txn.get_or_insert_array("strokes");
            strokes.remove(txn, 1); // erase s2
            strokes.push_back(txn, stroke("s6", "blue"));
        });
        let strokes = session.browser.get_or_insert_array("strokes");
        let before: Vec<Out> = strokes.iter(&session.browser.transact()).collect();
        session.restore(&v1);

        let after: Vec<Out> = strokes.iter(&session.browser.transact()).collect();
        assert_eq!(after.len(), 5);
        assert_eq!(after[0], before[0], "s1 kept");
        assert_eq!(after[2..], before[1..4], "s3, s4, s5 kept, not re-created");
        assert_ne!(after[1], before[1], "s2 is a copy");
    }

    #[test]
    fn roots_present_in_only_one_version() {
        let session = Session::new();
        session.edit(|txn| {
            txn.get_or_insert_map("board").insert(txn, "a", 1);
        });
        let v1 = session.version();
        session.edit(|txn| {
            txn.get_or_insert_array("later")
                .insert_range(txn, 0, [1, 2]);
            txn.get_or_insert_text("notes").insert(txn, 0, "hi");
        });
        session.restore(&v1);
        assert_eq!(doc_to_json(&session.relay), json!({"board": {"a": 1}}));

        // A snapshot from elsewhere (an import) with a root this session never had.
        let elsewhere = Doc::new();
        elsewhere.get_or_insert_text("extra").insert(
            &mut elsewhere.transact_mut(),
            0,
            "from elsewhere",
        );
        let update = restore_into(&session.relay, &full_state(&elsewhere)).unwrap();
        apply(&session.browser, &update);
        assert_eq!(
            doc_to_json(&session.relay),
            json!({"extra": "from elsewhere"})
        );
        let extra = session.browser.get_or_insert_text("extra");
        assert_eq!(
            extra.get_string(&session.browser.transact()),
            "from elsewhere"
        );
        assert_eq!(doc_to_json(&session.browser), doc_to_json(&session.relay));
    }

    #[test]
    fn restoring_an_identical_state_changes_nothing() {
        let session = Session::new();
        session.edit(|txn| {
            txn.get_or_insert_map("board").insert(txn, "a", 1);
            txn.get_or_insert_array("strokes")
                .push_back(txn, stroke("s1", "red"));
            let notes = txn.get_or_insert_text("notes");
            notes.insert(txn, 0, "hello 😀");
            notes.format(txn, 0, 5, attrs(&[("bold", Any::Bool(true))]));
        });
        let current = session.version();
        let copy = replica(&current);
        let relay_before = session.relay.transact().state_vector();

        let update = session.restore(&current);

        apply(&copy, &update);
        assert_eq!(copy.transact().state_vector(), relay_before);
        assert_eq!(session.relay.transact().state_vector(), relay_before);
    }

    #[test]
    fn roots_that_arrived_in_updates_are_read_from_their_content() {
        let session = Session::new();
        session.edit(|txn| {
            txn.get_or_insert_map("board").insert(txn, "a", 1);
            txn.get_or_insert_array("strokes")
                .insert_range(txn, 0, ["x", "y"]);
            txn.get_or_insert_text("notes").insert(txn, 0, "xy");
        });
        let v1 = session.version();
        session.edit(|txn| {
            txn.get_or_insert_map("board").insert(txn, "a", 2);
            txn.get_or_insert_array("strokes").push_back(txn, "z");
            txn.get_or_insert_text("notes").push(txn, "z");
        });
        {
            let txn = session.relay.transact();
            let mut roots = txn.root_refs();
            assert!(roots.all(|(_, root)| matches!(root, Out::UndefinedRef(_))));
        }
        // Arrays of one-letter strings and texts look alike item by item; the kinds must hold.
        assert_eq!(
            doc_to_json(&session.relay),
            json!({"board": {"a": 2}, "strokes": ["x", "y", "z"], "notes": "xyz"})
        );
        session.restore(&v1);
        assert_eq!(
            doc_to_json(&session.relay),
            json!({"board": {"a": 1}, "strokes": ["x", "y"], "notes": "xy"})
        );
    }

    #[test]
    fn xml_fragments_are_restored_node_by_node() {
        let session = Session::new();
        session.edit(|txn| {
            let prose = txn.get_or_insert_xml_fragment("prose");
            let p = XmlElementPrelim::new("p", [XmlTextPrelim::new("first").into()]);
            prose.push_back(txn, p);
            prose.push_back(txn, XmlElementPrelim::empty("hr"));
        });
        let v1 = session.version();
        session.edit(|txn| {
            let prose = txn.get_or_insert_xml_fragment("prose");
            prose.insert(txn, 1, XmlTextPrelim::new("inserted"));
            prose.remove(txn, 2);
        });
        let prose = session.browser.get_or_insert_xml_fragment("prose");
        let first_before = prose.get(&session.browser.transact(), 0).map(Out::from);
        session.restore(&v1);

        assert_eq!(
            doc_to_json(&session.relay),
            json!({"prose": "<p>first</p><hr></hr>"})
        );
        let txn = session.browser.transact();
        assert_eq!(
            prose.get(&txn, 0).map(Out::from),
            first_before,
            "the unchanged paragraph is kept"
        );
    }

    #[test]
    fn errors_leave_the_live_document_unchanged() {
        let session = Session::new();
        session.edit(|txn| {
            let board = txn.get_or_insert_map("board");
            board.insert(txn, "a", 1);
        });
        let before = full_state(&session.relay);

        let garbage = restore_into(&session.relay, &[0xff, 0xff, 0xff]);
        assert!(
            matches!(garbage, Err(RestoreError::BadSnapshot(_))),
            "{garbage:?}"
        );

        let retyped = Doc::new();
        retyped
            .get_or_insert_text("board")
            .insert(&mut retyped.transact_mut(), 0, "text now");
        let changed = restore_into(&session.relay, &full_state(&retyped));
        assert!(
            matches!(changed, Err(RestoreError::RootKindChanged { ref root, live: RootKind::Map, snapshot: RootKind::Text }) if root == "board"),
            "{changed:?}"
        );

        // A subdocument cannot be copied; the other changes of the plan are not applied.
        let with_subdoc = Doc::new();
        {
            let board = with_subdoc.get_or_insert_map("board");
            let mut txn = with_subdoc.transact_mut();
            board.insert(&mut txn, "a", 2);
            board.insert(&mut txn, "sub", Doc::new());
        }
        let subdoc = restore_into(&session.relay, &full_state(&with_subdoc));
        assert!(
            matches!(subdoc, Err(RestoreError::Unsupported { .. })),
            "{subdoc:?}"
        );

        assert_eq!(full_state(&session.relay), before);
        assert_eq!(doc_to_json(&session.relay), json!({"board": {"a": 1}}));
    }

    #[test]
    fn json_of_a_document() {
        let doc = Doc::new();
        {
            let board = doc.get_or_insert_map("board");
            let empty = doc.get_or_insert_array("never-used");
            let notes = doc.get_or_insert_text("notes");
            let mut txn = doc.transact_mut();
            board.insert(&mut txn, "int", 3);
            board.insert(&mut txn, "float", 2.5);
            board.insert(&mut txn, "integral float", 4.0);
            board.insert(&mut txn, "null", Any::Null);
            board.insert(&mut txn, "bytes", Any::Buffer(Arc::from(&[1u8, 2, 3][..])));
            board.insert(
                &mut txn,
                "list",
                Any::from(vec![Any::from(1), Any::from("a")]),
            );
            let nested = board.insert(
                &mut txn,
                "nested",
                MapPrelim::from([("t", In::Text(Default::default()))]),
            );
            match nested.get(&txn, "t") {
                Some(Out::YText(t)) => t.insert(&mut txn, 0, "deep"),
                other => panic!("{other:?}"),
            }
            notes.insert_with_attributes(&mut txn, 0, "bold", attrs(&[("bold", Any::Bool(true))]));
            notes.insert_embed(&mut txn, 4, Any::from(7));
            let _ = empty;
        }
        assert_eq!(
            doc_to_json(&doc),
            json!({
                "board": {
                    "int": 3, "float": 2.5, "integral float": 4, "null": null,
                    "bytes": "AQID", "list": [1, "a"], "nested": {"t": "deep"}
                },
                "notes": "bold"
            })
        );
        // A relay's untyped copy reads the same.
        assert_eq!(doc_to_json(&replica(&full_state(&doc))), doc_to_json(&doc));
    }

    /// Applies `splices` (right to left, as the restore does) to `live`.
    fn spliced(live: &[u8], target: &[u8], splices: &[Splice]) -> Vec<u8> {
        let mut result = live.to_vec();
        for s in splices.iter().rev() {
            result.splice(
                s.at..s.at + s.remove,
                target[s.insert.clone()].iter().copied(),
            );
        }
        result
    }

    fn longest_common_subsequence(a: &[u8], b: &[u8]) -> usize {
        let mut row = vec![0; b.len() + 1];
        for x in a {
            let mut diagonal = 0;
            for (j, y) in b.iter().enumerate() {
                let above = row[j + 1];
                row[j + 1] = if x == y {
                    diagonal + 1
                } else {
                    row[j + 1].max(row[j])
                };
                diagonal = above;
            }
        }
        row[b.len()]
    }

    #[test]
    fn splices_are_a_shortest_edit() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let live: Vec<u8> = (0..rng.gen_range(0..12))
                .map(|_| rng.gen_range(b'a'..b'e'))
                .collect();
            let target: Vec<u8> = (0..rng.gen_range(0..12))
                .map(|_| rng.gen_range(b'a'..b'e'))
                .collect();
            let found = splices(&live, &target, |a, b| a == b);
            assert_eq!(
                spliced(&live, &target, &found),
                target,
                "{live:?} -> {target:?}"
            );
            let edits: usize = found.iter().map(|s| s.remove + s.insert.len()).sum();
            let lcs = longest_common_subsequence(&live, &target);
            assert_eq!(
                edits,
                live.len() + target.len() - 2 * lcs,
                "{live:?} -> {target:?}"
            );
            assert!(found.windows(2).all(|w| w[0].at + w[0].remove < w[1].at));
        }
        assert!(splices(b"same", b"same", |a, b| a == b).is_empty());
    }

    #[test]
    fn long_edits_replace_the_differing_middle() {
        // Over 600 `2`s to insert: beyond MAX_EDIT_DISTANCE. Both start and end with 0, 1.
        let live: Vec<u8> = (0..2000).map(|i| (i % 2) as u8).collect();
        let target: Vec<u8> = (0..2000).map(|i| (i % 3) as u8).collect();
        let found = splices(&live, &target, |a, b| a == b);
        assert_eq!(spliced(&live, &target, &found), target);
        assert_eq!(
            found,
            vec![Splice {
                at: 2,
                remove: 1996,
                insert: 2..1998
            }]
        );
    }
}
