//! What a root type is, read from its content: a relay never types its roots (it only
//! applies clients' updates, so `root_refs()` shows most as undefined branches), yet a
//! restore and the JSON view must know a map from a text. Map entries make a map, string
//! content a text, XML nodes an XML fragment, other sequence content an array; a root with
//! no content is empty (Yjs cannot tell an empty root from an absent one).
//!
//! Owns: [`RootKind`] and reading it. Must not touch: any document's content (read only).

use std::fmt;

use yrs::branch::BranchPtr;
use yrs::types::text::YChange;
use yrs::{Array, ArrayRef, Map, MapRef, Out, ReadTxn, Text, TextRef};

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

pub(crate) fn branch_of(root: &Out) -> Option<BranchPtr> {
    root.try_branch().map(BranchPtr::from)
}

/// The kind of a root: declared, if some code on this replica typed it, else read from its
/// content (a relay's roots are untyped, see the module documentation).
pub(crate) fn root_kind<T: ReadTxn>(root: &Out, txn: &T) -> Result<RootKind, &'static str> {
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

pub(crate) fn has_entries<T: ReadTxn>(branch: BranchPtr, txn: &T) -> bool {
    MapRef::from(branch).len(txn) > 0
}

pub(crate) fn has_sequence(branch: BranchPtr) -> bool {
    // The count of visible sequence items (map entries and formatting marks are not counted).
    branch.len() > 0
}

/// Whether a branch holds string content (or primitive embeds): what only a text holds.
/// A branch typed as an array can hold it too, if a client wrote it there (the guard
/// refuses that now; a board stored before may have it), and yrs's array iterator never
/// ends on it, so such a branch must be read as a text.
pub(crate) fn holds_text<T: ReadTxn>(branch: BranchPtr, txn: &T) -> bool {
    // A text diff shows string content (and primitive embeds) as `Out::Any` chunks; an array's
    // primitive items never show up in it, and shared types show in both.
    TextRef::from(branch)
        .diff(txn, YChange::identity)
        .iter()
        .any(|chunk| matches!(chunk.insert, Out::Any(_)))
}

/// Text, array or XML fragment, for a branch with sequence content.
fn sequence_kind<T: ReadTxn>(branch: BranchPtr, txn: &T) -> RootKind {
    if holds_text(branch, txn) {
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
