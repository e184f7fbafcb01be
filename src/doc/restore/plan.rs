//! Planning a restore, root by root: the edits that make a live root's content equal to the
//! snapshot's, all read-only, so an error leaves the live document unchanged. Maps key by
//! key, arrays and XML fragments item by item around a [`super::diff`], texts as one
//! Quill-style delta over [`super::text`] units.
//!
//! Owns: [`Edit`] and the per-kind planners. Must not touch: the snapshot document (read
//! only) or anything applied before every edit is planned.

use std::collections::{BTreeMap, BTreeSet};

use yrs::types::text::YChange;
use yrs::types::xml::XmlIn;
use yrs::types::Delta;
use yrs::{
    Array, ArrayRef, In, Map, MapRef, OffsetKind, Out, ReadTxn, Text, TextRef, TransactionMut,
    WriteTxn, XmlFragment, XmlFragmentRef,
};

use super::copy::{copy_of, copy_xml_node, xml_children, Content, NotCopyable};
use super::diff::splices;
use super::text::{insertions, text_units, TextUnit};
use super::RootPair;
use crate::doc::roots::RootKind;

/// One change to the live document, planned before any is applied.
pub(super) enum Edit {
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
    pub(super) fn apply(self, txn: &mut TransactionMut) {
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

pub(super) fn plan_root<T: ReadTxn>(
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
