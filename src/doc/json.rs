//! The JSON view of a document (`easel snapshot inspect`, tests and fuzz targets):
//! [`doc_to_json`].
//!
//! Owns: converting a document's content to JSON. Must not touch: the document (read only).

use base64::Engine as _;
use serde_json::Value;
use yrs::{
    Any, Array, ArrayRef, Doc, GetString, Map, MapRef, Number, Out, ReadTxn, TextRef, Transact,
    XmlElementRef, XmlFragmentRef,
};

use super::roots::{branch_of, has_entries, has_sequence, holds_text, root_kind, RootKind};

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
        // An array holding string content (see `holds_text`) reads as the text it holds.
        Out::YArray(array) => match branch_of(value).filter(|b| holds_text(*b, txn)) {
            Some(branch) => Value::String(TextRef::from(branch).get_string(txn)),
            None => Value::Array(
                array
                    .iter(txn)
                    .map(|item| out_to_json(&item, txn))
                    .collect(),
            ),
        },
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
    use serde_json::json;
    use std::sync::Arc;
    use yrs::types::Attrs;
    use yrs::updates::decoder::Decode;
    use yrs::{In, MapPrelim, StateVector, Text, Update};

    fn full_state(doc: &Doc) -> Vec<u8> {
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// A fresh replica of `state`, its roots untyped, as on the relay.
    fn replica(state: &[u8]) -> Doc {
        let doc = Doc::new();
        let update = Update::decode_v1(state).unwrap();
        doc.transact_mut().apply_update(update).unwrap();
        doc
    }

    fn attrs(pairs: &[(&str, Any)]) -> Attrs {
        pairs
            .iter()
            .map(|(k, v)| (Arc::from(*k), v.clone()))
            .collect()
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

    #[test]
    fn an_array_holding_text_reads_as_that_text() {
        // The fuzz finding the guard now refuses from clients (a board stored before may
        // hold it): m.k an array holding the string "😀x". yrs's array iterator never ends
        // on it, so the conversion runs on a thread that must answer within the timeout.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/hostile/update.refuse.fuzz-string-in-nested-array.bin"
        );
        let doc = replica(&std::fs::read(path).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(doc_to_json(&doc)));
        let json = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("doc_to_json returns");
        assert_eq!(json, serde_json::json!({"m": {"k": "😀x"}}));
    }
}
