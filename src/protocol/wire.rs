//! The y-websocket wire protocol (SPEC.md section 3).
//!
//! A frame holds one or more messages, each `varUint(type)` and a payload. Decoding keeps
//! the raw bytes of every message as a zero-copy slice of the frame, so the relay can hand
//! a client's update or awareness message to every other connection without re-encoding
//! it. Messages the server originates are encoded with `yrs::sync` types, one per frame.

use bytes::Bytes;

use crate::doc::guard;
use yrs::encoding::read::{Cursor, Read};
use yrs::sync::protocol::{MSG_AUTH, MSG_AWARENESS, MSG_QUERY_AWARENESS, MSG_SYNC};
use yrs::sync::protocol::{MSG_SYNC_STEP_1, MSG_SYNC_STEP_2, MSG_SYNC_UPDATE};
use yrs::sync::{AwarenessUpdate, Message, SyncMessage};
use yrs::updates::encoder::Encode;
use yrs::StateVector;

/// Why a frame was refused; each maps to a WebSocket close code (`ws::close::Close::for_wire`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Truncated or otherwise undecodable bytes (an invalid payload).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message type or sync sub-type this protocol does not define (unsupported).
    #[error("unsupported message type {0}")]
    Unsupported(u32),
    /// An awareness message past the guard's bounds (an invalid payload; counted as an
    /// awareness refusal).
    #[error("awareness refused: {0}")]
    AwarenessRefused(guard::GuardError),
}

/// One decoded message of an incoming frame.
#[derive(Debug)]
pub enum Inbound {
    /// The peer's state vector: answer with the diff (step 2).
    SyncStep1(StateVector),
    /// A Yjs v1 update sent as sync step 2.
    SyncStep2 { update: Bytes },
    /// A Yjs v1 update; `message` is the whole encoded message, ready to relay as is.
    Update { update: Bytes, message: Bytes },
    /// An awareness update; `message` is the whole encoded message, ready to relay as is.
    Awareness {
        update: AwarenessUpdate,
        message: Bytes,
    },
    /// A client's auth message: the server does not act on it.
    Auth,
    /// Asks for every awareness state.
    QueryAwareness,
}

/// The most awareness clients one incoming message may name. A client announces its own
/// state (one entry); a session holds at most `limits.max_awareness_clients_per_session`
/// (1,000 by default). A message naming more is refused whole.
pub const MAX_AWARENESS_ENTRIES: usize = 4096;

/// Decodes every message of a frame. Any undecodable message rejects the whole frame, so
/// that nothing from a corrupt frame is applied.
pub fn decode_frame(frame: &Bytes) -> Result<Vec<Inbound>, WireError> {
    let mut cursor = Cursor::new(frame);
    let mut out = Vec::with_capacity(1);
    if frame.is_empty() {
        return Err(WireError::Malformed("empty frame".into()));
    }
    while cursor.has_content() {
        let start = cursor.next;
        out.push(decode_message(frame, &mut cursor, start)?);
    }
    Ok(out)
}

fn malformed(e: impl std::fmt::Display) -> WireError {
    WireError::Malformed(e.to_string())
}

/// Reads a length-prefixed byte array and returns it as a slice of `frame`.
fn read_slice(frame: &Bytes, cursor: &mut Cursor<'_>) -> Result<Bytes, WireError> {
    let len = cursor.read_var::<u32>().map_err(malformed)? as usize;
    let start = cursor.next;
    let end = start
        .checked_add(len)
        .filter(|end| *end <= frame.len())
        .ok_or_else(|| malformed("length prefix runs past the end of the frame"))?;
    cursor.next = end;
    Ok(frame.slice(start..end))
}

fn decode_message(
    frame: &Bytes,
    cursor: &mut Cursor<'_>,
    start: usize,
) -> Result<Inbound, WireError> {
    let kind = cursor.read_var::<u32>().map_err(malformed)?;
    match kind {
        k if k == MSG_SYNC as u32 => {
            let sub = cursor.read_var::<u32>().map_err(malformed)?;
            let data = read_slice(frame, cursor)?;
            match sub {
                s if s == MSG_SYNC_STEP_1 as u32 => guard::decode_state_vector(&data)
                    .map(Inbound::SyncStep1)
                    .map_err(malformed),
                s if s == MSG_SYNC_STEP_2 as u32 => Ok(Inbound::SyncStep2 { update: data }),
                s if s == MSG_SYNC_UPDATE as u32 => Ok(Inbound::Update {
                    update: data,
                    message: frame.slice(start..cursor.next),
                }),
                other => Err(WireError::Unsupported(other)),
            }
        }
        k if k == MSG_AWARENESS as u32 => {
            let data = read_slice(frame, cursor)?;
            // Sizes and depth of the states, and client ids per connection and session, are
            // the whiteboard's to bound (its limits are configured); here the structure is
            // checked before yrs decodes it, and one message may name at most
            // MAX_AWARENESS_ENTRIES clients, so no message builds a map far larger than a
            // session may hold.
            let update =
                guard::decode_awareness(&data, MAX_AWARENESS_ENTRIES, usize::MAX, usize::MAX)
                    .map_err(|e| match e {
                        guard::GuardError::Malformed(_) => malformed(e),
                        refused => WireError::AwarenessRefused(refused),
                    })?;
            Ok(Inbound::Awareness {
                update,
                message: frame.slice(start..cursor.next),
            })
        }
        k if k == MSG_AUTH as u32 => {
            let permission = cursor.read_var::<u32>().map_err(malformed)?;
            if permission == 0 {
                cursor.read_string().map_err(malformed)?;
            }
            Ok(Inbound::Auth)
        }
        k if k == MSG_QUERY_AWARENESS as u32 => Ok(Inbound::QueryAwareness),
        other => Err(WireError::Unsupported(other)),
    }
}

fn encode(message: &Message) -> Bytes {
    Bytes::from(message.encode_v1())
}

/// Sync step 1 carrying the server's state vector.
pub fn sync_step1(sv: StateVector) -> Bytes {
    encode(&Message::Sync(SyncMessage::SyncStep1(sv)))
}

/// Sync step 2: the update a peer is missing.
pub fn sync_step2(update: Vec<u8>) -> Bytes {
    encode(&Message::Sync(SyncMessage::SyncStep2(update)))
}

/// Sync step 2 whose update `encode` writes straight into the frame's own buffer: the
/// state of a large board is written once, not encoded and then copied behind a header.
/// The header (message type, sync type, the update's length) is only known afterwards, so
/// room for its longest form is left in front and the header is written right-aligned
/// into it; the frame is a zero-copy slice that starts at the header.
pub fn sync_step2_with(encode: impl FnOnce(&mut yrs::updates::encoder::EncoderV1)) -> Bytes {
    use yrs::encoding::write::Write;
    use yrs::updates::encoder::Encoder;
    // Two one-byte varints (the type constants are < 128) and a length of at most 10.
    const ROOM: usize = 2 + 10;
    let mut encoder = yrs::updates::encoder::EncoderV1::new();
    encoder.write_all(&[0; ROOM]);
    encode(&mut encoder);
    let mut buf = encoder.to_vec();
    let mut header = Vec::with_capacity(ROOM);
    header.write_var(MSG_SYNC);
    header.write_var(MSG_SYNC_STEP_2);
    header.write_var((buf.len() - ROOM) as u64);
    let start = ROOM - header.len();
    buf[start..ROOM].copy_from_slice(&header);
    Bytes::from(buf).slice(start..)
}

/// A sync update message.
pub fn update(update: Vec<u8>) -> Bytes {
    encode(&Message::Sync(SyncMessage::Update(update)))
}

/// An awareness message.
pub fn awareness(update: AwarenessUpdate) -> Bytes {
    encode(&Message::Awareness(update))
}

/// Auth: permission denied, with a reason.
pub fn permission_denied(reason: &str) -> Bytes {
    encode(&Message::Auth(Some(reason.to_owned())))
}

/// An awareness update naming zero clients: changes nothing, keeps an idle client's
/// 30-second liveness check satisfied.
pub const KEEPALIVE: &[u8] = &[1, 1, 0];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step2_written_in_place_is_the_same_frame() {
        use yrs::{Map, ReadTxn, Transact};
        for len in [0usize, 100, 200_000] {
            let doc = yrs::Doc::new();
            if len > 0 {
                let map = doc.get_or_insert_map("m");
                map.insert(&mut doc.transact_mut(), "k", "x".repeat(len));
            }
            let sv = yrs::StateVector::default();
            let plain = sync_step2(doc.transact().encode_state_as_update_v1(&sv));
            let in_place = sync_step2_with(|e| doc.transact().encode_state_as_update(&sv, e));
            assert_eq!(plain, in_place, "board of {len} bytes");
        }
    }
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, GetString, Text, Transact};

    #[test]
    fn reads_every_message_of_a_packed_frame() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, "hi");
        let u = txn.encode_update_v1();
        drop(txn);
        let mut frame = update(u.clone()).to_vec();
        frame.extend_from_slice(&sync_step1(StateVector::default()));
        frame.extend_from_slice(&[MSG_QUERY_AWARENESS]);
        let frame = Bytes::from(frame);
        let msgs = decode_frame(&frame).unwrap();
        assert_eq!(msgs.len(), 3);
        match &msgs[0] {
            Inbound::Update { update, message } => {
                assert_eq!(&update[..], &u[..]);
                assert_eq!(message[..], super::update(u.clone())[..]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(msgs[2], Inbound::QueryAwareness));
        let copy = Doc::new();
        let copied = copy.get_or_insert_text("t");
        let mut txn = copy.transact_mut();
        txn.apply_update(yrs::Update::decode_v1(&u).unwrap())
            .unwrap();
        assert_eq!(copied.get_string(&txn), "hi");
    }

    #[test]
    fn rejects_truncation_and_unknown_types() {
        let full = update(vec![1, 2, 3, 4]);
        let cut = full.slice(..full.len() - 1);
        assert!(matches!(decode_frame(&cut), Err(WireError::Malformed(_))));
        assert_eq!(
            decode_frame(&Bytes::from_static(&[9, 0])).unwrap_err(),
            WireError::Unsupported(9)
        );
        assert_eq!(
            decode_frame(&Bytes::from_static(&[0, 7, 0])).unwrap_err(),
            WireError::Unsupported(7)
        );
        assert!(decode_frame(&Bytes::new()).is_err());
        assert!(decode_frame(&Bytes::from_static(&[1, 5, 1])).is_err());
    }

    /// A small deterministic generator, so a failure reproduces.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn random_and_mutated_frames_never_panic_the_decoder() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, "hello world");
        let valid = update(txn.encode_update_v1()).to_vec();
        drop(txn);
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..20_000 {
            let frame: Vec<u8> = if round % 2 == 0 {
                let len = (xorshift(&mut seed) % 64) as usize;
                (0..len).map(|_| xorshift(&mut seed) as u8).collect()
            } else {
                let mut f = valid.clone();
                for _ in 0..1 + xorshift(&mut seed) % 4 {
                    let i = (xorshift(&mut seed) as usize) % f.len();
                    f[i] = xorshift(&mut seed) as u8;
                }
                f
            };
            // Decoding returns, never panics (updates inside are checked by the whiteboard).
            let _ = decode_frame(&Bytes::from(frame));
        }
    }

    #[test]
    fn keepalive_is_an_empty_awareness_update() {
        let msgs = decode_frame(&Bytes::from_static(KEEPALIVE)).unwrap();
        match &msgs[0] {
            Inbound::Awareness { update, .. } => assert!(update.clients.is_empty()),
            other => panic!("{other:?}"),
        }
    }
}
