//! Reading Redis replies (`redis::Value`) without trusting their shape: a reply that is
//! not what a script or command returns is [`StoreError::Corrupt`] with what was
//! expected, never a panic. Owns: reply decoding. Must not touch: connections.

use redis::Value;

use crate::store::StoreError;

pub(super) fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("unexpected Redis reply: {what}"))
}

/// An array reply's items (RESP2 arrays, RESP3 sets); `Nil` is empty.
pub(super) fn items<'a>(value: &'a Value, what: &str) -> Result<&'a [Value], StoreError> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(&[]),
        _ => Err(corrupt(what)),
    }
}

/// A number reply (an integer, or a string holding one); `Nil` and `false` are 0.
pub(super) fn number(value: &Value, what: &str) -> Result<i64, StoreError> {
    match value {
        Value::Int(n) => Ok(*n),
        Value::Nil => Ok(0),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt(what)),
        Value::SimpleString(s) => s.parse().ok().ok_or_else(|| corrupt(what)),
        _ => Err(corrupt(what)),
    }
}

/// A non-negative number reply.
pub(super) fn unsigned(value: &Value, what: &str) -> Result<u64, StoreError> {
    u64::try_from(number(value, what)?).map_err(|_| corrupt(what))
}

/// A string reply's bytes; `None` for `Nil` (and for Lua's `false`).
pub(super) fn bytes(value: &Value, what: &str) -> Result<Option<Vec<u8>>, StoreError> {
    match value {
        Value::Nil => Ok(None),
        Value::BulkString(b) => Ok(Some(b.clone())),
        Value::SimpleString(s) => Ok(Some(s.clone().into_bytes())),
        Value::Okay => Ok(Some(b"OK".to_vec())),
        Value::Int(n) => Ok(Some(n.to_string().into_bytes())),
        _ => Err(corrupt(what)),
    }
}

/// A string reply as UTF-8 text.
pub(super) fn text(value: &Value, what: &str) -> Result<Option<String>, StoreError> {
    bytes(value, what)?
        .map(|b| String::from_utf8(b).map_err(|_| corrupt(what)))
        .transpose()
}

/// Pairs of a flat `[k1, v1, k2, v2, ...]` reply (HGETALL, stream entry fields) or of a
/// RESP3 map.
pub(super) fn pairs<'a>(
    value: &'a Value,
    what: &str,
) -> Result<Vec<(&'a Value, &'a Value)>, StoreError> {
    match value {
        Value::Map(map) => Ok(map.iter().map(|(k, v)| (k, v)).collect()),
        other => {
            let flat = items(other, what)?;
            if flat.len() % 2 != 0 {
                return Err(corrupt(what));
            }
            Ok(flat.chunks_exact(2).map(|kv| (&kv[0], &kv[1])).collect())
        }
    }
}

/// The seq of a stream entry id `0-<seq>`.
pub(super) fn seq_of_id(id: &str) -> Option<u64> {
    id.strip_prefix("0-")?.parse().ok()
}

/// One stream entry `[id, [field, value, ...]]`: the id and its fields.
pub(super) struct Entry<'a> {
    pub(super) id: String,
    fields: Vec<(&'a Value, &'a Value)>,
}

impl<'a> Entry<'a> {
    pub(super) fn parse(value: &'a Value, what: &str) -> Result<Self, StoreError> {
        let parts = items(value, what)?;
        let [id, fields] = parts else {
            return Err(corrupt(what));
        };
        let id = text(id, what)?.ok_or_else(|| corrupt(what))?;
        Ok(Self {
            id,
            fields: pairs(fields, what)?,
        })
    }

    /// The value of field `name` (`None`: absent).
    pub(super) fn field(&self, name: &str) -> Option<&'a Value> {
        self.fields.iter().find_map(|(k, v)| match k {
            Value::BulkString(b) if b == name.as_bytes() => Some(*v),
            Value::SimpleString(s) if s == name => Some(*v),
            _ => None,
        })
    }

    pub(super) fn field_bytes(&self, name: &str, what: &str) -> Result<Vec<u8>, StoreError> {
        match self.field(name) {
            Some(v) => Ok(bytes(v, what)?.unwrap_or_default()),
            None => Err(corrupt(what)),
        }
    }

    pub(super) fn field_text(&self, name: &str, what: &str) -> Result<String, StoreError> {
        String::from_utf8(self.field_bytes(name, what)?).map_err(|_| corrupt(what))
    }
}
