//! Reading a Yjs document's content as JSON or strings, for assertions.

use serde_json::Value;
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, Map, Transact, Update};

use super::codec::short;

/// A snapshot of a doc's content for the given roots, as JSON.
pub fn doc_json(doc: &Doc, maps: &[&str], texts: &[&str]) -> Value {
    let mut o = serde_json::Map::new();
    for m in maps {
        let r = doc.get_or_insert_map(*m);
        let txn = doc.transact();
        let any = yrs::types::ToJson::to_json(&r, &txn);
        o.insert(m.to_string(), any_to_json(&any));
    }
    for t in texts {
        let r = doc.get_or_insert_text(*t);
        let txn = doc.transact();
        o.insert(t.to_string(), Value::String(r.get_string(&txn)));
    }
    Value::Object(o)
}

pub fn any_to_json(any: &yrs::Any) -> Value {
    serde_json::to_value(any).unwrap_or_else(|e| panic!("yrs Any to JSON {any:?}: {e}"))
}

/// Rewrites every number as an f64 so that 120 and 120.0 compare equal.
pub fn normalize_numbers(v: &Value) -> Value {
    match v {
        Value::Number(n) => {
            let f = n.as_f64().expect("finite number");
            serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or(Value::Null)
        }
        Value::Array(a) => Value::Array(a.iter().map(normalize_numbers).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), normalize_numbers(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Content of one root of a doc as JSON, by kind ("map", "array", "text").
pub fn root_json(doc: &Doc, name: &str, kind: &str) -> Value {
    match kind {
        "map" => {
            let r = doc.get_or_insert_map(name);
            let txn = doc.transact();
            any_to_json(&yrs::types::ToJson::to_json(&r, &txn))
        }
        "array" => {
            let r = doc.get_or_insert_array(name);
            let txn = doc.transact();
            any_to_json(&yrs::types::ToJson::to_json(&r, &txn))
        }
        "text" => {
            let r = doc.get_or_insert_text(name);
            let txn = doc.transact();
            Value::String(r.get_string(&txn))
        }
        other => panic!("unknown root kind {other:?}"),
    }
}

/// A Doc holding the content of a Yjs v1 update (panics if it does not decode or apply).
pub fn doc_from_update(update: &[u8]) -> Doc {
    let doc = Doc::new();
    let u = Update::decode_v1(update)
        .unwrap_or_else(|e| panic!("not a Yjs v1 update ({e}): {}", short(update)));
    doc.transact_mut()
        .apply_update(u)
        .unwrap_or_else(|e| panic!("update does not apply: {e}"));
    doc
}

/// `map.key` of a Doc as a string (None when absent).
pub fn doc_map_get(doc: &Doc, map: &str, key: &str) -> Option<String> {
    let m = doc.get_or_insert_map(map);
    let txn = doc.transact();
    m.get(&txn, key).map(|v| v.to_string(&txn))
}

/// Root text `name` of a Doc.
pub fn doc_text(doc: &Doc, name: &str) -> String {
    let t = doc.get_or_insert_text(name);
    let txn = doc.transact();
    t.get_string(&txn)
}
