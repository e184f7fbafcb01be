//! Restores end to end: a browser-like replica edits, the relay's copy is restored, and
//! every replica must show the snapshot's content with unchanged items keeping identity.

use super::*;
use crate::doc::json::doc_to_json;
use serde_json::json;
use std::sync::{Arc, Mutex};
use yrs::types::text::YChange;
use yrs::types::Attrs;
use yrs::{
    Any, Array, Doc, GetString, In, Map, MapRef, OffsetKind, Out, ReadTxn, Text, TextRef, Transact,
    TransactionMut, WriteTxn, XmlFragment,
};
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
