//! Our own y-websocket framing (so trailing bytes and unknown tags are visible) and the
//! messages and updates the tests build.

use std::collections::HashMap;

use yrs::sync::awareness::AwarenessUpdateEntry;
use yrs::sync::{AwarenessUpdate, Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, Map, StateVector, Transact};

pub fn write_var_uint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

pub fn write_var_buf(out: &mut Vec<u8>, buf: &[u8]) {
    write_var_uint(out, buf.len() as u64);
    out.extend_from_slice(buf);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn var_uint(&mut self) -> Result<u64, String> {
        let mut n: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or("unexpected end of frame (varUint)")?;
            self.pos += 1;
            n |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
            shift += 7;
            if shift > 63 {
                return Err("varUint too long".into());
            }
        }
    }
    fn var_buf(&mut self) -> Result<&'a [u8], String> {
        let len = self.var_uint()? as usize;
        if self.pos + len > self.buf.len() {
            return Err(format!("varUint8Array of {len} bytes past end of frame"));
        }
        let s = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Ok(s)
    }
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

/// Decodes every y-websocket message in a frame. Errors on anything malformed.
pub fn decode_frame(frame: &[u8]) -> Result<Vec<Message>, String> {
    let mut r = Reader { buf: frame, pos: 0 };
    let mut out = Vec::new();
    if frame.is_empty() {
        return Err("empty frame".into());
    }
    while !r.done() {
        let tag = r.var_uint()?;
        let msg = match tag {
            0 => {
                let sub = r.var_uint()?;
                let data = r.var_buf()?;
                match sub {
                    0 => Message::Sync(SyncMessage::SyncStep1(
                        StateVector::decode_v1(data)
                            .map_err(|e| format!("bad state vector: {e}"))?,
                    )),
                    1 => Message::Sync(SyncMessage::SyncStep2(data.to_vec())),
                    2 => Message::Sync(SyncMessage::Update(data.to_vec())),
                    s => return Err(format!("unknown sync sub-type {s}")),
                }
            }
            1 => {
                let data = r.var_buf()?;
                Message::Awareness(
                    AwarenessUpdate::decode_v1(data)
                        .map_err(|e| format!("bad awareness update: {e}"))?,
                )
            }
            2 => {
                let perm = r.var_uint()?;
                if perm == 0 {
                    let s = r.var_buf()?;
                    Message::Auth(Some(
                        String::from_utf8(s.to_vec())
                            .map_err(|_| "auth reason is not utf-8".to_string())?,
                    ))
                } else {
                    Message::Auth(None)
                }
            }
            3 => Message::AwarenessQuery,
            t => return Err(format!("unknown message type {t} from server")),
        };
        out.push(msg);
    }
    Ok(out)
}

pub fn encode_msg(m: &Message) -> Vec<u8> {
    m.encode_v1()
}

pub fn update_msg(update: &[u8]) -> Vec<u8> {
    encode_msg(&Message::Sync(SyncMessage::Update(update.to_vec())))
}

pub fn awareness_msg(update: &AwarenessUpdate) -> Vec<u8> {
    encode_msg(&Message::Awareness(update.clone()))
}

/// An awareness update for one client.
pub fn awareness_update(client_id: u64, clock: u32, json: &str) -> AwarenessUpdate {
    let mut clients = HashMap::new();
    clients.insert(
        ClientID::new(client_id),
        AwarenessUpdateEntry {
            clock,
            json: json.into(),
        },
    );
    AwarenessUpdate { clients }
}

pub fn awareness_entry(u: &AwarenessUpdate, client_id: u64) -> Option<&AwarenessUpdateEntry> {
    u.clients.get(&ClientID::new(client_id))
}

pub fn awareness_ids(u: &AwarenessUpdate) -> Vec<u64> {
    let mut v: Vec<u64> = u.clients.keys().map(|c| c.get()).collect();
    v.sort();
    v
}

/// An update that inserts `value` at `key` of root map `map`, from a fresh doc with client id `client`.
pub fn map_set_update(client: u64, map: &str, key: &str, value: &str) -> Vec<u8> {
    let doc = Doc::with_client_id(client);
    let m = doc.get_or_insert_map(map);
    let mut txn = doc.transact_mut();
    m.insert(&mut txn, key, value);
    txn.encode_update_v1()
}

/// An update setting key "k" of root map "m" to an `Any` array nested `depth` deep: two bytes
/// a level, so 7,000 levels are 14 KB (the same bytes as `deep_any_update` in guard.rs).
pub fn deep_any_update(depth: usize) -> Vec<u8> {
    // One client (1) with one struct at clock 0: an item of Any content (info 8) with a
    // parent sub (0x20), parent root "m", key "k", one value.
    let mut b = vec![1, 1, 1, 0, 0b0010_1000, 1, 1, b'm', 1, b'k', 1];
    // `depth` arrays of one element each (tag 117, length 1), then null (126).
    b.extend(std::iter::repeat_n([117u8, 1], depth).flatten());
    b.push(126);
    // Empty delete set.
    b.push(0);
    b
}

/// At most the first 64 bytes of a frame, for failure messages.
pub fn short(b: &[u8]) -> String {
    if b.len() <= 64 {
        format!("{b:?}")
    } else {
        format!("{:?}... ({} bytes)", &b[..64], b.len())
    }
}
