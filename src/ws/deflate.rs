//! permessage-deflate (RFC 7692): the negotiation, the inflater of client messages, and the
//! compressed forms of outgoing messages, shared between connections.
//!
//! The server always answers an offer it accepts with `server_no_context_takeover` and
//! `client_no_context_takeover`:
//! - without server context takeover every message is compressed on its own, so one
//!   message's compressed form is the same bytes for every receiver with the same window
//!   size: [`compressed`] compresses a message once (the 20 MB board a join storm sends to
//!   150 clients is deflated once, not 150 times) and keeps it beside the `Bytes` the
//!   fan-out already shares;
//! - without client context takeover no connection keeps an inflater (and its 32 KiB
//!   window) between messages: an idle connection pays nothing for the extension.
//!
//! Inflating is bounded by the message size limit: a small message that inflates past it
//! (a zip bomb) fails with [`DeflateError::TooBig`] once the limit is reached, having
//! allocated at most the limit. Owns no socket and no framing (that is `ws::socket`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const NAME: &str = "permessage-deflate";

/// The 4 bytes a sync flush ends with, removed from each compressed message and added back
/// before inflating (RFC 7692 7.2.1, 7.2.2).
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// A message is compressed once however many receive it, so the level's cost is paid per
/// message, not per receiver; but a join storm waits for its board's. Measured on a 20.0 MB
/// board of strokes (release build, one thread; zlib-rs): level 6 (zlib's default) gave
/// 0.334 of the size in 647 ms, level 4 0.336 in 379 ms, level 3 0.343 in 271 ms, level 2
/// 0.354 in 186 ms, level 1 0.425 in 100 ms. Level 2 was tried in scenario f (150 joiners)
/// and dropped: the storm was no faster and the joiners spent 10.8 CPU-seconds inflating
/// instead of 8.8. Level 4 costs 0.6 % more bytes than 6 for 40 % less time.
const LEVEL: u32 = 4;

/// The level of a form made ahead of its first send ([`prepare`]): nobody waits for it, and
/// the receivers inflate a level 6 stream faster than a level 4 one (measured in scenario
/// f against `trivial-join`: its 150 joiners spent 4.9–5.0 CPU-seconds inflating its level
/// 6 answer, 5.9–6.1 its level 4 one).
const AHEAD_LEVEL: u32 = 6;

/// Pieces of at least this size are compressed on threads of their own.
const PIECE_MIN: usize = 2 << 20;

/// Messages at least this large are compressed on the blocking pool, not on an async worker
/// (256 KiB takes a few milliseconds in a release build).
const BLOCKING_FROM: usize = 256 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeflateError {
    /// The message inflates past the size limit (close 1009).
    #[error("the message inflates to more than {0} bytes")]
    TooBig(usize),
    /// Not a raw deflate stream (close 1007).
    #[error("invalid compressed data")]
    Invalid,
}

/// What was agreed for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The LZ77 window the server compresses with (`server_max_window_bits`, 9 to 15).
    pub server_window_bits: u8,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the response.
    pub fn response(&self, offered_server_bits: bool) -> String {
        let mut r = format!("{NAME}; server_no_context_takeover; client_no_context_takeover");
        if offered_server_bits {
            r.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_window_bits
            ));
        }
        r
    }
}

/// The first acceptable permessage-deflate offer among `Sec-WebSocket-Extensions` header
/// values, and whether it named `server_max_window_bits` (the answer must then name it
/// too). An offer with an unknown, repeated or malformed parameter is declined (RFC 7692
/// 5), as is one asking for an 8-bit server window, which zlib cannot produce for raw
/// deflate; `None`: no compression.
pub fn negotiate<'a>(headers: impl Iterator<Item = &'a str>) -> Option<(Agreed, bool)> {
    headers
        .flat_map(|h| h.split(','))
        .find_map(|offer| accept_offer(offer.trim()))
}

fn accept_offer(offer: &str) -> Option<(Agreed, bool)> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut agreed = Agreed {
        server_window_bits: 15,
    };
    let mut seen = [false; 4];
    let mut server_bits_named = false;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let i = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            "server_max_window_bits" => {
                agreed.server_window_bits = window_bits(value?).filter(|b| *b >= 9)?;
                server_bits_named = true;
                2
            }
            "client_max_window_bits" => {
                // A hint of what the client will use; our inflater takes any window.
                if let Some(v) = value {
                    window_bits(v)?;
                }
                3
            }
            _ => return None,
        };
        if std::mem::replace(&mut seen[i], true) {
            return None;
        }
    }
    Some((agreed, server_bits_named))
}

fn window_bits(v: &str) -> Option<u8> {
    // RFC 7692 7.1.2: 1*DIGIT without leading zeros, 8 to 15.
    if v.starts_with('0') || v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

/// Compresses one message on its own (no context kept), without the sync flush's tail.
///
/// A large message is cut into pieces compressed at once on scoped threads, each by a fresh
/// compressor ending in a sync flush: a sync flush ends on a byte boundary with an empty
/// stored block, so the pieces laid end to end are one valid deflate stream (as pigz does);
/// each piece only loses the window of the one before it. The extra threads come from one
/// process-wide budget ([`PieceThreads`]): many large messages compressed at once (several
/// boards joined together) take what is free and compress the rest on their own thread.
pub fn deflate(data: &[u8], window_bits: u8) -> Bytes {
    deflate_at(data, window_bits, LEVEL)
}

/// [`deflate`] at a given zlib level.
fn deflate_at(data: &[u8], window_bits: u8, level: u32) -> Bytes {
    let wanted = (data.len() / PIECE_MIN).saturating_sub(1);
    let helpers = piece_threads().take(wanted);
    let mut out = deflate_pieces(data, window_bits, level, helpers.count);
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    Bytes::from(out)
}

/// `data` in `1 + helpers` pieces, all but the first on scoped threads of their own.
fn deflate_pieces(data: &[u8], window_bits: u8, level: u32, helpers: usize) -> Vec<u8> {
    if helpers == 0 {
        return deflate_piece(data, window_bits, level);
    }
    let size = data.len().div_ceil(helpers + 1);
    std::thread::scope(|scope| {
        let rest: Vec<_> = data
            .chunks(size)
            .skip(1)
            .map(|piece| {
                (
                    piece,
                    scope.spawn(move || deflate_piece(piece, window_bits, level)),
                )
            })
            .collect();
        let mut out = deflate_piece(&data[..size], window_bits, level);
        for (piece, handle) in rest {
            // A thread that could not finish has its piece done here instead.
            let part = handle
                .join()
                .unwrap_or_else(|_| deflate_piece(piece, window_bits, level));
            out.extend_from_slice(&part);
        }
        out
    })
}

/// Compresses `data` with a fresh compressor, ending in a sync flush (its tail kept).
fn deflate_piece(data: &[u8], window_bits: u8, level: u32) -> Vec<u8> {
    let mut c = Compress::new_with_window_bits(Compression::new(level), false, window_bits);
    let mut out = Vec::with_capacity(data.len() / 4 + 64);
    loop {
        let consumed = usize::try_from(c.total_in()).unwrap_or(data.len());
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(1024));
        }
        // Compressing from memory into memory fails only on a stream error, which a fresh
        // stream fed whole slices cannot be in; stop rather than loop if it ever did.
        if c.compress_vec(
            &data[consumed.min(data.len())..],
            &mut out,
            FlushCompress::Sync,
        )
        .is_err()
        {
            break;
        }
        // The flush is complete once every byte was taken and the output did not fill.
        if c.total_in() as usize >= data.len() && out.capacity() - out.len() >= 64 {
            break;
        }
    }
    out
}

/// The threads compressing pieces besides the callers' own, process-wide: one fewer than
/// the cores.
struct PieceThreads {
    free: std::sync::atomic::AtomicUsize,
}

/// Threads taken from [`PieceThreads`], given back when dropped.
struct Helpers {
    count: usize,
}

fn piece_threads() -> &'static PieceThreads {
    static THREADS: OnceLock<PieceThreads> = OnceLock::new();
    THREADS.get_or_init(|| PieceThreads {
        free: std::sync::atomic::AtomicUsize::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()) - 1,
        ),
    })
}

impl PieceThreads {
    /// Up to `wanted` threads, as many as are free.
    fn take(&'static self, wanted: usize) -> Helpers {
        use std::sync::atomic::Ordering;
        let mut free = self.free.load(Ordering::Acquire);
        loop {
            let count = wanted.min(free);
            if count == 0 {
                return Helpers { count: 0 };
            }
            match self.free.compare_exchange_weak(
                free,
                free - count,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Helpers { count },
                Err(now) => free = now,
            }
        }
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        if self.count > 0 {
            piece_threads()
                .free
                .fetch_add(self.count, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// Inflates one compressed message, frame by frame, into at most `max` bytes.
pub struct Inflater {
    d: Decompress,
    out: Vec<u8>,
    max: usize,
    /// The client ended the deflate stream (a BFINAL block): what follows is ignored.
    ended: bool,
}

impl Inflater {
    pub fn new(max: usize) -> Self {
        Self {
            d: Decompress::new(false),
            out: Vec::new(),
            max,
            ended: false,
        }
    }

    /// Inflates the payload of one frame of the message.
    pub fn push(&mut self, mut input: &[u8]) -> Result<(), DeflateError> {
        // One byte past the limit tells "exactly the limit" from "over it".
        let cap = self.max.saturating_add(1);
        while !self.ended {
            if self.out.len() == self.out.capacity() {
                if self.out.len() >= cap {
                    return Err(DeflateError::TooBig(self.max));
                }
                // Grows by doubling, never past the limit: a bomb costs at most `max`.
                let add = self.out.len().max(4096).min(cap - self.out.len());
                self.out.reserve_exact(add);
            }
            let (in_before, out_before) = (self.d.total_in(), self.out.len());
            let status = self
                .d
                .decompress_vec(input, &mut self.out, FlushDecompress::Sync)
                .map_err(|_| DeflateError::Invalid)?;
            let taken = usize::try_from(self.d.total_in() - in_before).unwrap_or(input.len());
            input = &input[taken.min(input.len())..];
            if self.out.len() > self.max {
                return Err(DeflateError::TooBig(self.max));
            }
            if status == Status::StreamEnd {
                self.ended = true;
            } else if input.is_empty() && self.out.len() < self.out.capacity() {
                return Ok(());
            } else if taken == 0
                && self.out.len() == out_before
                && self.out.len() < self.out.capacity()
            {
                // No progress with input left and room to write: not a deflate stream.
                return Err(DeflateError::Invalid);
            }
        }
        Ok(())
    }

    /// The whole message, once its last frame was pushed.
    /// What was inflated so far.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    pub fn finish(mut self) -> Result<Vec<u8>, DeflateError> {
        if !self.ended {
            self.push(&TAIL)?;
        }
        Ok(self.out)
    }
}

/// Compressed forms of recent outgoing messages, keyed by the shared `Bytes` they were
/// made from (its address and length: an entry holds a clone, so the address cannot be
/// reused for other bytes while the entry lives) and the window size.
struct Cache {
    entries: Mutex<VecDeque<Arc<Entry>>>,
    /// Forms someone keeps ([`Prepared`]): found like the recent ones, but neither aged nor
    /// pushed out while their holder keeps them.
    kept: Mutex<Vec<std::sync::Weak<Entry>>>,
}

struct Entry {
    raw: Bytes,
    bits: u8,
    made: Instant,
    /// `None` inside: compressing did not make it smaller; send it raw.
    form: tokio::sync::OnceCell<Option<Bytes>>,
}

impl Entry {
    fn is_of(&self, raw: &Bytes, bits: u8) -> bool {
        self.bits == bits && self.raw.as_ptr() == raw.as_ptr() && self.raw.len() == raw.len()
    }
}

/// Most messages remembered; a join storm needs one, a busy fan-out a few.
const CACHE_ENTRIES: usize = 32;
/// Most raw bytes the entries keep alive (a 20 MB board and then some).
const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// An entry older than this is dropped: by then every receiver had its turn.
const CACHE_AGE: Duration = Duration::from_secs(30);

/// The one process-wide cache: every connection of every session shares it, which is the
/// point (a message fanned out to many connections is compressed once).
fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Cache {
        entries: Mutex::new(VecDeque::new()),
        kept: Mutex::new(Vec::new()),
    })
}

impl Cache {
    fn slot(&self, raw: &Bytes, bits: u8) -> Arc<Entry> {
        let now = Instant::now();
        let recent =
            |entries: &VecDeque<Arc<Entry>>| entries.iter().find(|e| e.is_of(raw, bits)).cloned();
        {
            let mut entries = crate::sync::lock(&self.entries);
            entries.retain(|e| now.duration_since(e.made) < CACHE_AGE);
            if let Some(e) = recent(&entries) {
                return e;
            }
        }
        // Looked for only when the message is not a recent one: a fan-out takes this lock
        // once per message (its first receiver), not once per receiver.
        if let Some(kept) = self.kept(raw, bits) {
            return kept;
        }
        let mut entries = crate::sync::lock(&self.entries);
        // Another receiver may have made it meanwhile.
        if let Some(e) = recent(&entries) {
            return e;
        }
        let entry = Arc::new(Entry {
            raw: raw.clone(),
            bits,
            made: now,
            form: tokio::sync::OnceCell::new(),
        });
        if raw.len() <= CACHE_BYTES / 2 {
            let mut held: usize = entries.iter().map(|e| e.raw.len()).sum();
            while !entries.is_empty()
                && (entries.len() >= CACHE_ENTRIES || held + raw.len() > CACHE_BYTES)
            {
                if let Some(old) = entries.pop_front() {
                    held -= old.raw.len();
                }
            }
            entries.push_back(entry.clone());
        }
        entry
    }

    /// The entry for `raw` to keep: the kept one, or a recent one (a connection's send
    /// compressed it already, or is compressing it), or a new one, which is not added to the
    /// recent entries: a kept form goes as soon as its holder lets go of it (a board's answer,
    /// replaced by a change), not 30 s later with the recent ones. Registered as kept before
    /// it is compressed, so that a send meanwhile awaits this compression.
    fn keep(&self, raw: &Bytes, bits: u8) -> Arc<Entry> {
        let mut kept = crate::sync::lock(&self.kept);
        kept.retain(|e| e.strong_count() > 0);
        if let Some(e) = kept
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|e| e.is_of(raw, bits))
        {
            return e;
        }
        let recent = crate::sync::lock(&self.entries)
            .iter()
            .find(|e| e.is_of(raw, bits))
            .cloned();
        let entry = recent.unwrap_or_else(|| {
            Arc::new(Entry {
                raw: raw.clone(),
                bits,
                made: Instant::now(),
                form: tokio::sync::OnceCell::new(),
            })
        });
        kept.push(Arc::downgrade(&entry));
        entry
    }

    /// The kept entry for `raw`, if any; forgets the entries no one keeps any more.
    fn kept(&self, raw: &Bytes, bits: u8) -> Option<Arc<Entry>> {
        let mut kept = crate::sync::lock(&self.kept);
        kept.retain(|e| e.strong_count() > 0);
        kept.iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|e| e.is_of(raw, bits))
    }
}

/// The compressed form of `raw` for a `window_bits` window, made once for every connection
/// that sends the same `Bytes`; `None` when compressing does not make it smaller.
pub async fn compressed(raw: &Bytes, window_bits: u8) -> Option<Bytes> {
    let slot = cache().slot(raw, window_bits);
    slot.form
        .get_or_init(|| compress(raw.clone(), window_bits))
        .await
        .clone()
}

/// A compressed form made ahead of its first send and kept while this value lives: every
/// connection that sends the same `Bytes` gets it from [`compressed`] without waiting,
/// however long after (a board at rest keeps its join answer compressed; see
/// `session::whiteboard::step2`).
pub struct Prepared(Arc<Entry>);

impl Prepared {
    /// The compressed size, or `None` if compressing did not make the message smaller.
    pub fn compressed_len(&self) -> Option<usize> {
        self.0.form.get().and_then(|f| f.as_ref().map(Bytes::len))
    }
}

/// Compresses `raw` for a `window_bits` window on the calling thread (unless a connection's
/// send already is: then that one's result is awaited) and keeps the form while the
/// returned [`Prepared`] lives. Meant for a thread of background work, run in
/// `Handle::block_on`: the compressing itself does not yield.
pub async fn prepare(raw: &Bytes, window_bits: u8) -> Prepared {
    let entry = cache().keep(raw, window_bits);
    entry
        .form
        .get_or_init(|| async {
            compressions().inc();
            let out = deflate_at(raw, window_bits, AHEAD_LEVEL);
            (out.len() < raw.len()).then_some(out)
        })
        .await;
    Prepared(entry)
}

/// Messages compressed, process-wide (`easel_deflate_compressions_total`): against the
/// receivers of a fan-out, it shows each message compressed once.
pub fn compressions() -> &'static prometheus_client::metrics::counter::Counter {
    static COUNT: OnceLock<prometheus_client::metrics::counter::Counter> = OnceLock::new();
    COUNT.get_or_init(Default::default)
}

/// Compresses a message no other connection sends (a reply made for one client): not
/// cached, so it cannot push a shared message's entry out.
pub async fn compress(raw: Bytes, window_bits: u8) -> Option<Bytes> {
    compressions().inc();
    let len = raw.len();
    let out = if len >= BLOCKING_FROM {
        tokio::task::spawn_blocking(move || deflate(&raw, window_bits))
            .await
            .ok()?
    } else {
        deflate(&raw, window_bits)
    };
    (out.len() < len).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflate(data: &[u8], max: usize) -> Result<Vec<u8>, DeflateError> {
        let mut i = Inflater::new(max);
        i.push(data)?;
        i.finish()
    }

    #[test]
    fn round_trips_at_every_window_size() {
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 7) as u8)
            .collect();
        for bits in 9..=15 {
            let c = deflate(&data, bits);
            assert!(!c.ends_with(&TAIL));
            assert_eq!(inflate(&c, data.len()).unwrap(), data);
        }
    }

    #[test]
    fn a_message_compressed_in_pieces_inflates_whole() {
        let data: Vec<u8> = (0..(3 * PIECE_MIN as u32 + 12_345))
            .map(|i| (i % 251) as u8 ^ (i / 7) as u8 ^ (i / 65_536) as u8)
            .collect();
        assert!(data.len() / PIECE_MIN >= 2, "the data is cut into pieces");
        let c = deflate(&data, 15);
        assert!(c.len() < data.len() / 2);
        assert!(!c.ends_with(&TAIL));
        assert_eq!(inflate(&c, data.len()).unwrap(), data);
        // However many threads were free: one piece, or four laid end to end.
        for helpers in [0, 3] {
            let mut c = deflate_pieces(&data, 15, LEVEL, helpers);
            assert!(c.ends_with(&TAIL));
            c.truncate(c.len() - TAIL.len());
            assert_eq!(inflate(&c, data.len()).unwrap(), data, "{helpers} helpers");
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let c = deflate(&vec![0u8; 50_000_000], 15);
        assert!(c.len() < 1_000_000);
        assert_eq!(inflate(&c, 1_000_000), Err(DeflateError::TooBig(1_000_000)));
        // Exactly the limit is fine.
        let c = deflate(&vec![7u8; 4096], 15);
        assert_eq!(inflate(&c, 4096).unwrap().len(), 4096);
        assert_eq!(inflate(&c, 4095), Err(DeflateError::TooBig(4095)));
    }

    #[tokio::test]
    async fn a_prepared_form_is_kept_while_its_holder_keeps_it() {
        let raw = Bytes::from(
            (0..300_000u32)
                .map(|i| (i % 251) as u8 ^ (i / 9) as u8)
                .collect::<Vec<u8>>(),
        );
        let prepared = prepare(&raw, 15).await;
        assert!(
            !crate::sync::lock(&cache().entries)
                .iter()
                .any(|e| e.is_of(&raw, 15)),
            "kept apart from the recent entries: it goes when its holder lets go"
        );
        let form = compressed(&raw, 15).await.expect("compresses");
        assert_eq!(prepared.compressed_len(), Some(form.len()));
        assert_eq!(inflate(&form, raw.len()).unwrap(), raw.as_ref());
        // More recent messages than the cache remembers push out every recent entry ...
        let others: Vec<Bytes> = (0..=CACHE_ENTRIES)
            .map(|i| Bytes::from(vec![i as u8; 4096]))
            .collect();
        for other in &others {
            compressed(other, 15).await;
        }
        assert!(!crate::sync::lock(&cache().entries)
            .iter()
            .any(|e| e.is_of(&raw, 15)));
        // ... but not the kept one: the same bytes, not compressed again.
        let again = compressed(&raw, 15).await.expect("compresses");
        assert_eq!(again.as_ptr(), form.as_ptr());
        // Another window size is another form.
        assert!(compressed(&raw, 10)
            .await
            .is_some_and(|f| f.as_ptr() != form.as_ptr()));
        drop(prepared);
        assert!(cache().kept(&raw, 15).is_none(), "forgotten once dropped");
    }

    #[test]
    fn garbage_is_invalid() {
        assert_eq!(inflate(&[0xff; 64], 1000), Err(DeflateError::Invalid));
    }

    #[test]
    fn negotiation() {
        let n = |h: &str| negotiate(std::iter::once(h));
        let plain = Agreed {
            server_window_bits: 15,
        };
        assert_eq!(n("permessage-deflate"), Some((plain, false)));
        assert_eq!(
            n("permessage-deflate; client_max_window_bits"),
            Some((plain, false))
        );
        assert_eq!(
            n("permessage-deflate; server_max_window_bits=10; client_no_context_takeover"),
            Some((
                Agreed {
                    server_window_bits: 10
                },
                true
            ))
        );
        // 8 bits is declined; the next offer is taken.
        assert_eq!(
            n("permessage-deflate; server_max_window_bits=8, permessage-deflate"),
            Some((plain, false))
        );
        assert_eq!(n("permessage-deflate; server_max_window_bits"), None);
        assert_eq!(n("permessage-deflate; server_max_window_bits=016"), None);
        assert_eq!(n("permessage-deflate; client_max_window_bits=16"), None);
        assert_eq!(n("permessage-deflate; foo"), None);
        assert_eq!(
            n("permessage-deflate; server_no_context_takeover; server_no_context_takeover"),
            None
        );
        assert_eq!(n("x-webkit-deflate-frame"), None);
        assert_eq!(
            plain.response(false),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    }
}
