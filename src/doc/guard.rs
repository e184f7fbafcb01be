//! The update guard (SPEC.md 7.1): every byte string a client, a file or the store hands
//! to `yrs` passes through here first.
//!
//! Why it exists: `yrs`'s decoders recurse (nested `Any` values, JSON), reserve memory by
//! counts the input declares, and assert on some values. A stack overflow cannot be caught
//! (`catch_unwind` sees nothing, the process dies), so "decode and see" is not an option:
//! the bytes are walked here first, iteratively, with every declared length and count
//! checked against the bytes that remain and every nesting depth counted.
//!
//! This module reads bytes and nothing else: no document, no session, no I/O.

use yrs::encoding::read::{Cursor, Read};
use yrs::sync::AwarenessUpdate;
use yrs::updates::decoder::Decode;
use yrs::StateVector;

/// Why bytes were refused before `yrs` saw them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// Truncated, a length or count larger than the bytes that remain, or not the format.
    #[error("malformed: {0}")]
    Malformed(String),
    /// Values or shared types nested deeper than `limits.max_nesting`.
    #[error("nested deeper than {limit} levels")]
    TooDeep { limit: usize },
    /// Something larger than its limit (`what` names the limit).
    #[error("{what} over its limit of {limit} bytes")]
    TooLarge { what: &'static str, limit: usize },
}

fn malformed(e: impl std::fmt::Display) -> GuardError {
    GuardError::Malformed(e.to_string())
}

/// Reads a count that announces `count` entries of at least `min_entry_bytes` each, and
/// refuses it when the bytes that remain cannot hold them (the allocation bomb: a few bytes
/// declaring a billion entries).
fn read_count(cursor: &mut Cursor<'_>, min_entry_bytes: usize) -> Result<usize, GuardError> {
    let count = cursor.read_var::<u64>().map_err(malformed)?;
    let remaining = cursor.buf.len().saturating_sub(cursor.next);
    if count > (remaining / min_entry_bytes.max(1)) as u64 {
        return Err(GuardError::Malformed(format!(
            "declares {count} entries in {remaining} bytes"
        )));
    }
    Ok(count as usize)
}

/// A state vector (sync step 1, `?sv=`), decoded once its entry count is known to fit.
pub fn decode_state_vector(bytes: &[u8]) -> Result<StateVector, GuardError> {
    let mut cursor = Cursor::new(bytes);
    // An entry is a client id and a clock, one byte each at the least.
    read_count(&mut cursor, 2)?;
    let sv = std::panic::catch_unwind(|| StateVector::decode_v1(bytes))
        .map_err(|_| malformed("the state vector decoder refused the bytes"))?
        .map_err(malformed)?;
    Ok(sv)
}

/// An awareness update, decoded once its count fits and each state (JSON text) is at most
/// `max_state_bytes` long and nested at most `max_nesting` deep.
pub fn decode_awareness(
    bytes: &[u8],
    max_state_bytes: usize,
    max_nesting: usize,
) -> Result<AwarenessUpdate, GuardError> {
    let mut cursor = Cursor::new(bytes);
    // An entry is a client id, a clock and a string length, one byte each at the least.
    let count = read_count(&mut cursor, 3)?;
    for _ in 0..count {
        cursor.read_var::<u64>().map_err(malformed)?;
        cursor.read_var::<u32>().map_err(malformed)?;
        let json = read_bytes(&mut cursor)?;
        if json.len() > max_state_bytes {
            return Err(GuardError::TooLarge {
                what: "an awareness state",
                limit: max_state_bytes,
            });
        }
        check_json_depth(json, max_nesting)?;
    }
    if cursor.next != bytes.len() {
        return Err(malformed("bytes after the awareness update"));
    }
    std::panic::catch_unwind(|| AwarenessUpdate::decode_v1(bytes))
        .map_err(|_| malformed("the awareness decoder refused the bytes"))?
        .map_err(malformed)
}

/// A length-prefixed byte string, checked against what remains.
fn read_bytes<'a>(cursor: &mut Cursor<'a>) -> Result<&'a [u8], GuardError> {
    let len = cursor.read_var::<u64>().map_err(malformed)?;
    let start = cursor.next;
    let end = usize::try_from(len)
        .ok()
        .and_then(|len| start.checked_add(len))
        .filter(|end| *end <= cursor.buf.len())
        .ok_or_else(|| malformed("a length runs past the end of the bytes"))?;
    cursor.next = end;
    Ok(&cursor.buf[start..end])
}

/// Refuses JSON text whose arrays and objects nest deeper than `limit`. Counts brackets
/// outside string literals; it does not validate the JSON (the parser that runs later does).
pub fn check_json_depth(json: &[u8], limit: usize) -> Result<(), GuardError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Err(GuardError::TooDeep { limit });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::updates::encoder::Encode;

    #[test]
    fn a_state_vector_that_declares_more_than_it_holds_is_refused() {
        // "gICAgAI" of the tokenless flood: a count of 2^29 in five bytes.
        let bomb = [0x80, 0x80, 0x80, 0x80, 0x02];
        assert!(matches!(
            decode_state_vector(&bomb),
            Err(GuardError::Malformed(_))
        ));
        let mut sv = StateVector::default();
        sv.set_max(yrs::ClientID::new(7), 3);
        assert_eq!(decode_state_vector(&sv.encode_v1()).unwrap(), sv);
        assert!(decode_state_vector(&[]).is_err());
    }

    #[test]
    fn awareness_states_are_bounded_in_size_and_depth() {
        let entry = |json: &str| {
            let mut b = vec![1, 5, 1];
            b.push(json.len() as u8);
            b.extend_from_slice(json.as_bytes());
            b
        };
        assert!(decode_awareness(&entry("{\"a\":[1]}"), 1024, 64).is_ok());
        assert_eq!(
            decode_awareness(&entry("[[[[]]]]"), 1024, 3).unwrap_err(),
            GuardError::TooDeep { limit: 3 }
        );
        assert!(matches!(
            decode_awareness(&entry("{\"a\":1}"), 4, 64),
            Err(GuardError::TooLarge { .. })
        ));
        // A million declared clients in four bytes.
        assert!(decode_awareness(&[0xc0, 0x84, 0x3d, 0], 1024, 64).is_err());
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        assert!(check_json_depth(br#"{"a":"[[[[[[\"]]"}"#, 1).is_ok());
        assert!(check_json_depth(b"[[]]", 1).is_err());
    }
}
