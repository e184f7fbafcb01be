//! Walking a y-websocket frame one message at a time, without decoding it whole.
//!
//! [`crate::protocol::wire::decode_frame`] turns a frame into a `Vec` of every message in
//! it; a frame packed with millions of one-byte messages (query awareness) would become a
//! Vec of millions before any rate limit had a say. This module only finds where each
//! message ends and what kind it is (no allocation), so the whiteboard handler can charge
//! the rate limit per message, skip the messages it drops without decoding them, and hand
//! the ones it keeps to `decode_frame` one message at a time. Must not decode payloads
//! or apply anything.

use crate::protocol::wire::WireError;

/// The kind of a message, from its first byte (lib0 `varUint(type)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Sync step 2 or update: never dropped (the client would diverge).
    Sync,
    /// Sync step 1: never dropped either, and answered from the document.
    SyncStep1,
    Awareness,
    Auth,
    QueryAwareness,
}

fn malformed(what: &str) -> WireError {
    WireError::Malformed(what.to_owned())
}

/// Reads a lib0 `varUint` at `*pos`, advancing it.
fn read_var_uint(frame: &[u8], pos: &mut usize) -> Result<u64, WireError> {
    let mut value: u64 = 0;
    let mut shift = 0u32;
    loop {
        let byte = *frame
            .get(*pos)
            .ok_or_else(|| malformed("varUint runs past the end of the frame"))?;
        *pos += 1;
        if shift >= 64 || (shift == 63 && byte & 0x7f > 1) {
            return Err(malformed("varUint too large"));
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
    }
}

/// Skips a length-prefixed byte array (`varUint8Array`, `varString`) at `*pos`.
fn skip_var_buf(frame: &[u8], pos: &mut usize) -> Result<(), WireError> {
    let len = read_var_uint(frame, pos)?;
    let end = usize::try_from(len)
        .ok()
        .and_then(|len| pos.checked_add(len))
        .filter(|end| *end <= frame.len())
        .ok_or_else(|| malformed("length prefix runs past the end of the frame"))?;
    *pos = end;
    Ok(())
}

/// The kind of the message starting at `start` and the offset just past it. Message types
/// the protocol does not define are refused here (close 1003); what is inside a message
/// (a state vector, an awareness update) is checked when it is decoded.
pub fn next_message(frame: &[u8], start: usize) -> Result<(Kind, usize), WireError> {
    let mut pos = start;
    let kind = read_var_uint(frame, &mut pos)?;
    let kind = match kind {
        0 => {
            let step = read_var_uint(frame, &mut pos)?;
            skip_var_buf(frame, &mut pos)?;
            if step == 0 {
                Kind::SyncStep1
            } else {
                Kind::Sync
            }
        }
        1 => {
            skip_var_buf(frame, &mut pos)?;
            Kind::Awareness
        }
        2 => {
            if read_var_uint(frame, &mut pos)? == 0 {
                skip_var_buf(frame, &mut pos)?;
            }
            Kind::Auth
        }
        3 => Kind::QueryAwareness,
        other => {
            return Err(WireError::Unsupported(
                u32::try_from(other).unwrap_or(u32::MAX),
            ))
        }
    };
    Ok((kind, pos))
}

/// Checks that a whole frame splits into messages of known types, and counts them, before
/// anything of it is applied: a frame cut short or holding an unknown type is refused whole.
pub fn count_messages(frame: &[u8]) -> Result<usize, WireError> {
    if frame.is_empty() {
        return Err(malformed("empty frame"));
    }
    let (mut pos, mut n) = (0, 0);
    while pos < frame.len() {
        pos = next_message(frame, pos)?.1;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire;
    use bytes::Bytes;

    #[test]
    fn finds_the_same_messages_as_the_decoder() {
        let mut frame = wire::update(vec![0, 0]).to_vec();
        frame.extend_from_slice(&wire::sync_step1(yrs::StateVector::default()));
        frame.extend_from_slice(wire::KEEPALIVE);
        frame.extend_from_slice(&wire::permission_denied("x"));
        frame.push(3);
        assert_eq!(count_messages(&frame), Ok(5));
        assert_eq!(
            wire::decode_frame(&Bytes::from(frame.clone())).map(|v| v.len()),
            Ok(5)
        );
        let mut pos = 0;
        let mut kinds = Vec::new();
        while pos < frame.len() {
            let (kind, end) = next_message(&frame, pos).unwrap();
            // Each message decodes alone.
            assert_eq!(
                wire::decode_frame(&Bytes::from(frame[pos..end].to_vec())).map(|v| v.len()),
                Ok(1)
            );
            kinds.push(kind);
            pos = end;
        }
        assert_eq!(
            kinds,
            [
                Kind::Sync,
                Kind::SyncStep1,
                Kind::Awareness,
                Kind::Auth,
                Kind::QueryAwareness
            ]
        );
    }

    #[test]
    fn refuses_what_the_decoder_refuses() {
        assert!(count_messages(&[]).is_err());
        assert_eq!(count_messages(&[9, 0]), Err(WireError::Unsupported(9)));
        assert!(count_messages(&[0, 2, 5, 1]).is_err());
        assert!(count_messages(&[1, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(count_messages(&[0x80; 20]).is_err());
        let full = wire::update(vec![1, 2, 3, 4]);
        assert!(count_messages(&full[..full.len() - 1]).is_err());
    }

    #[test]
    fn a_packed_frame_is_counted_without_allocating_per_message() {
        let frame = vec![3u8; 1_000_000];
        assert_eq!(count_messages(&frame), Ok(1_000_000));
    }
}
