//! The whiteboard workload: strokes in a `Y.Map`, the send-time markers receivers read, a
//! realistic document builder, and the digest used to check convergence.
//!
//! Used by the load generator and by the criterion benches (`benches/hot_path.rs`), so it
//! depends on nothing but `yrs`, `rand` and the standard library, and knows nothing of easel.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use yrs::{Any, Doc, Map, MapRef, Out, ReadTxn, StateVector, Transact};

/// The root map every stroke lives in (`doc.getMap('strokes')` in JS).
pub const STROKES: &str = "strokes";

/// Marker of a timed update: `LG|writer|seq|send_us|`, inside the stroke's `m` field.
pub const UPDATE_MARK: &[u8] = b"LG|";
/// Marker of a timed awareness state: `LA|sender|seq|send_us|`, inside the cursor state.
pub const AWARENESS_MARK: &[u8] = b"LA|";

const COLORS: [&str; 6] = [
    "#1e88e5", "#e53935", "#43a047", "#fdd835", "#8e24aa", "#212121",
];
const TOOLS: [&str; 3] = ["pen", "highlighter", "pen"];

/// Encoded bytes of one point (x, y, pressure as float64 `Any` numbers).
pub const BYTES_PER_POINT: usize = 27;
/// Encoded bytes of a stroke update without points (map entry, fields, marker), measured.
pub const STROKE_OVERHEAD: usize = 130;

/// Points for a stroke whose update is about `payload` bytes.
pub fn points_for_payload(payload: usize) -> usize {
    (payload.saturating_sub(STROKE_OVERHEAD) / BYTES_PER_POINT).max(2)
}

/// A freehand stroke as a whiteboard stores it: one JSON-like value per map key.
pub fn stroke(rng: &mut StdRng, key: &str, author: &str, marker: &str, points: usize) -> Any {
    let mut pts = Vec::with_capacity(points * 3);
    let (mut x, mut y) = (rng.gen_range(0.0..1600.0f64), rng.gen_range(0.0..900.0f64));
    for _ in 0..points {
        x += rng.gen_range(-6.0..6.0f64);
        y += rng.gen_range(-6.0..6.0f64);
        pts.push(Any::from(round2(x)));
        pts.push(Any::from(round2(y)));
        pts.push(Any::from(round2(rng.gen_range(0.2..1.0f64))));
    }
    let mut m: HashMap<String, Any> = HashMap::with_capacity(8);
    m.insert("id".into(), Any::from(key));
    m.insert(
        "tool".into(),
        Any::from(TOOLS[rng.gen_range(0..TOOLS.len())]),
    );
    m.insert(
        "color".into(),
        Any::from(COLORS[rng.gen_range(0..COLORS.len())]),
    );
    m.insert(
        "width".into(),
        Any::from(round2(rng.gen_range(1.0..8.0f64))),
    );
    m.insert("author".into(), Any::from(author));
    m.insert("points".into(), Any::Array(Arc::from(pts)));
    m.insert("m".into(), Any::from(marker));
    Any::Map(Arc::new(m))
}

/// Two decimals, plus a little so the value is not an integer (stored as float64 like the
/// JS client stores pointer coordinates).
fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0 + 0.001
}

pub fn update_marker(writer: u32, seq: u32, send_us: u64) -> String {
    format!("LG|{writer}|{seq}|{send_us}|")
}

pub fn awareness_marker(sender: u32, seq: u32, send_us: u64) -> String {
    format!("LA|{sender}|{seq}|{send_us}|")
}

/// Finds `mark` in `bytes` and reads the three numbers after it: (who, seq, send_us).
pub fn find_marker(bytes: &[u8], mark: &[u8]) -> Option<(u32, u32, u64)> {
    if mark.is_empty() {
        return None;
    }
    let at = memchr::memmem::find(bytes, mark)?;
    let mut rest = &bytes[at + mark.len()..];
    let mut nums = [0u64; 3];
    for n in nums.iter_mut() {
        let end = rest.iter().position(|b| *b == b'|')?;
        if end == 0 || end > 20 {
            return None;
        }
        *n = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
        rest = &rest[end + 1..];
    }
    Some((nums[0] as u32, nums[1] as u32, nums[2]))
}

/// A document's logical content as one number: its state vector and every stroke's key and
/// marker. Two replicas with the same digest hold the same strokes (stroke values are
/// immutable and carry a unique marker).
pub fn digest(doc: &Doc) -> u64 {
    let txn = doc.transact();
    let mut h = DefaultHasher::new();
    let sv = txn.state_vector();
    let mut clients: Vec<(u64, u32)> = sv.iter().map(|(c, k)| (c.get(), *k)).collect();
    clients.sort_unstable();
    clients.hash(&mut h);
    if let Some(map) = txn.get_map(STROKES) {
        let mut entries: Vec<(String, String)> = map
            .iter(&txn)
            .map(|(k, v)| {
                let mark = match v {
                    Out::Any(Any::Map(m)) => match m.get("m") {
                        Some(Any::String(s)) => s.to_string(),
                        _ => format!("{}", m.len()),
                    },
                    other => format!("{other:?}"),
                };
                (k.to_string(), mark)
            })
            .collect();
        entries.sort_unstable();
        entries.hash(&mut h);
    }
    h.finish()
}

/// Builds a realistic whiteboard: strokes of 20 to 300 points from 6 authors, with about
/// 8% erased later and 5% moved (rewritten), until the encoded state passes `target_bytes`.
/// Calls `chunk` with every update of about `chunk_bytes` (one transaction each).
pub struct SeedBuilder {
    rng: StdRng,
    next: u32,
    live: Vec<String>,
}

impl SeedBuilder {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            next: 0,
            live: Vec::new(),
        }
    }

    /// Adds one transaction's worth (about `chunk_bytes` of update) to `map`; returns the
    /// update.
    pub fn chunk(&mut self, doc: &Doc, map: &MapRef, chunk_bytes: usize) -> Vec<u8> {
        let mut txn = doc.transact_mut();
        let mut approx = 0usize;
        while approx < chunk_bytes {
            let roll: f64 = self.rng.gen();
            if roll < 0.08 && self.live.len() > 10 {
                let i = self.rng.gen_range(0..self.live.len());
                let key = self.live.swap_remove(i);
                map.remove(&mut txn, &key);
                approx += 8;
            } else if roll < 0.13 && !self.live.is_empty() {
                let i = self.rng.gen_range(0..self.live.len());
                let key = self.live[i].clone();
                let n = self.points();
                let v = stroke(
                    &mut self.rng,
                    &key,
                    "mover",
                    &format!("SEEDMOVE|{}|", self.next),
                    n,
                );
                self.next += 1;
                map.insert(&mut txn, key.as_str(), v);
                approx += STROKE_OVERHEAD + n * BYTES_PER_POINT;
            } else {
                let key = format!("seed-{}", self.next);
                let author = format!("author-{}", self.next % 6);
                let n = self.points();
                let v = stroke(
                    &mut self.rng,
                    &key,
                    &author,
                    &format!("SEED|{}|", self.next),
                    n,
                );
                self.next += 1;
                map.insert(&mut txn, key.as_str(), v);
                self.live.push(key);
                approx += STROKE_OVERHEAD + n * BYTES_PER_POINT;
            }
        }
        txn.encode_update_v1()
    }

    fn points(&mut self) -> usize {
        // Mostly short strokes, some long ones: a skewed distribution between 20 and 300.
        let u: f64 = self.rng.gen();
        20 + (u * u * 280.0) as usize
    }
}

/// A document of at least `target_bytes` (encoded v1 state), built by [`SeedBuilder`].
pub fn build_document(target_bytes: usize, seed: u64) -> Doc {
    let doc = Doc::new();
    let map = doc.get_or_insert_map(STROKES);
    let mut b = SeedBuilder::new(seed);
    let mut total = 0;
    while total < target_bytes {
        total += b.chunk(&doc, &map, 1 << 20).len();
    }
    // Deletions and rewrites make the real state smaller than the sum of the updates.
    loop {
        let size = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
            .len();
        if size >= target_bytes {
            break;
        }
        let missing = target_bytes - size;
        b.chunk(&doc, &map, missing.clamp(64 << 10, 1 << 20));
    }
    doc
}

#[cfg(test)]
mod tests {
    #[test]
    fn marker_round_trip() {
        let m = super::update_marker(3, 77, 123456);
        let bytes = [b"xLx\x10".as_slice(), m.as_bytes(), b"zz"].concat();
        assert_eq!(
            super::find_marker(&bytes, super::UPDATE_MARK),
            Some((3, 77, 123456))
        );
        assert_eq!(super::find_marker(b"LG|1|2|", super::UPDATE_MARK), None);
        assert_eq!(super::find_marker(b"L", super::UPDATE_MARK), None);
    }
}
