//! One simulated whiteboard client: a WebSocket, a `yrs` document and awareness, speaking
//! y-websocket through `yrs::sync`. It syncs, then (as told by the run's phase) writes
//! strokes and moves its cursor at the step's rates, and measures the fan-out latency of
//! every timed update and cursor it receives.
//!
//! The join storm's joiners are the exception: they speak through the raw client of
//! `raw` (permessage-deflate, wire bytes counted), and share with this one only what a
//! joiner sends first ([`greeting`]) and how its step 2 is recorded ([`record_step2`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as Ws;
use yrs::sync::{Awareness, Message, MessageReader, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::updates::encoder::Encode;
use yrs::{Doc, Map, ReadTxn, StateVector, Transact, Update};

use crate::target::Kind;
use easel_bench::workload::{self, AWARENESS_MARK, STROKES, UPDATE_MARK};

static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();

/// Microseconds since the process's epoch: the send time carried by every timed message
/// (sender and receivers live in this process, so one monotonic clock serves both).
pub fn now_us() -> u64 {
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}

/// The [`now_us`] value of an instant.
pub fn us_of(t: Instant) -> u64 {
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    t.into_std().saturating_duration_since(epoch).as_micros() as u64
}

/// One measured step: writers write at `rate` per second and cursors move at `aw_rate`
/// from `start` to `end`; latencies of messages sent in `[measure_from, end)` count.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub rate: f64,
    pub aw_rate: f64,
    pub start: Instant,
    pub end: Instant,
}

#[derive(Debug, Clone, Copy)]
pub enum Phase {
    Setup,
    Run(Step),
    /// Apply what was deferred now (between steps), then acknowledge.
    Settle,
    Finish,
}

/// Run-wide counters, polled by the orchestrator.
#[derive(Default)]
pub struct Counters {
    pub synced: AtomicUsize,
    pub failed: AtomicUsize,
    pub finished: AtomicUsize,
    pub seeded: AtomicBool,
    pub sent_upd: AtomicU64,
    pub sent_aw: AtomicU64,
    pub expected_upd: AtomicU64,
    pub received_upd: AtomicU64,
    pub expected_aw: AtomicU64,
    /// Cursor states received, or superseded by a later state of the same sender that
    /// was: the server coalesces a tick's awareness, relaying only each client's latest.
    pub received_aw: AtomicU64,
    /// Of `received_aw`, the states never seen because a later one came in their place.
    pub coalesced_aw: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub settle_acks: AtomicUsize,
    /// Clients that sent everything their schedules held for the current step (each
    /// reports once per step). Until all have, `expected_*` may still grow: a writer slowed
    /// by a busy CPU can send its last update after the step's end.
    pub senders_done: AtomicUsize,
    /// Join storm: the first sync step 2 a joiner received, or the one the server is known
    /// to send (the trivial server's answer); every joiner's is compared with it.
    pub reference_step2: OnceLock<Bytes>,
}

/// What one client measured; the orchestrator takes the samples between steps.
#[derive(Default)]
pub struct ClientStats {
    pub connect_us: Option<u32>,
    pub synced_us: Option<u32>,
    /// (send time, latency) of every timed update received, in µs.
    pub upd: Vec<(u64, u32)>,
    /// (send time, latency) of every timed cursor received, in µs.
    pub aw: Vec<(u64, u32)>,
    pub out_of_order: u64,
    pub errors: Vec<String>,
    pub digest: Option<u64>,
    pub step2_len: usize,
    /// Join storm: whether this joiner's step 2 equals the run's reference, byte for byte.
    pub step2_same: Option<bool>,
    pub seeded_bytes: usize,
    /// Join storm: bytes read from the socket from the upgrade request's end until synced
    /// (the 101 response and every frame, as they came: compressed or not).
    pub wire_bytes: Option<u64>,
    /// Join storm: whether the server agreed to permessage-deflate.
    pub deflate: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMode {
    /// Apply every update to the client's document as it arrives (a real client).
    Live,
    /// Keep received updates and apply them after the run (measures the server, not the
    /// load generator's CRDT work, when both share two cores).
    Defer,
    /// As `Defer` for each session's writers and first client; every other client checks
    /// each update's marker (counts, order, latency) and drops it. A long saturation ramp
    /// builds a board of ~50 MB, which 100 documents in one process do not hold in 24 GiB;
    /// convergence is then checked among the clients that keep a document.
    Sample,
}

impl ClientSpec {
    /// Whether this client keeps a document of the session (and so a digest to compare).
    pub fn keeps_document(&self) -> bool {
        !self.hash_step2
            && (self.apply != ApplyMode::Sample || self.writer.is_some() || self.index == 0)
    }
}

#[derive(Clone)]
pub struct ClientSpec {
    pub url: String,
    pub kind: Kind,
    pub session: u32,
    pub index: u32,
    pub clients_in_session: u32,
    pub writer: Option<u32>,
    pub aware: Option<u32>,
    pub n_writers: u32,
    pub n_aware: u32,
    pub points: usize,
    /// A writer erases its stroke from this many updates before (0: never).
    pub keep_strokes: u32,
    pub apply: ApplyMode,
    /// Send an awareness state on connect, as the y-websocket client does.
    pub join_awareness: bool,
    /// A join storm's joiner: connects through `raw` (permessage-deflate, wire bytes
    /// counted) and compares its first sync step 2 with the run's reference instead of
    /// applying it (150 copies of a 20 MB document would not fit in memory; the reference
    /// is checked against the seeder's document at the end).
    pub hash_step2: bool,
    /// Join storm: offer permessage-deflate, as a browser does.
    pub offer_deflate: bool,
    /// Seed the session with a realistic document of this many bytes after syncing.
    pub seed_bytes: usize,
    pub seed_chunk: usize,
    pub connect_timeout: Duration,
    pub sync_timeout: Duration,
    /// Nothing runs past this instant.
    pub deadline: Instant,
}

pub type Shared = Arc<Mutex<ClientStats>>;

pub(crate) fn lock(s: &Shared) -> std::sync::MutexGuard<'_, ClientStats> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs one client to the end of the run (the `Finish` phase, an error, or the deadline).
pub async fn run(
    spec: ClientSpec,
    stats: Shared,
    counters: Arc<Counters>,
    phase: watch::Receiver<Phase>,
) {
    let result = if spec.hash_step2 {
        crate::raw::join(&spec, &stats, &counters, phase).await
    } else {
        run_inner(&spec, &stats, &counters, phase).await
    };
    if let Err(e) = result {
        lock(&stats).errors.push(format!(
            "session {} client {}: {e:#}",
            spec.session, spec.index
        ));
        counters.failed.fetch_add(1, Ordering::AcqRel);
    }
    counters.finished.fetch_add(1, Ordering::AcqRel);
}

/// tungstenite zero-fills its read buffer before every read: small for many small frames,
/// larger for the join storm's tutor, which writes the whole board.
fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(512 << 20))
        .max_frame_size(Some(512 << 20))
}

fn encode(m: &Message) -> Ws {
    Ws::Binary(Bytes::from(m.encode_v1()))
}

/// What a joining client sends first, as the y-websocket client does: sync step 1 of its
/// document (not to the baseline, which holds none), then its awareness state if the plan
/// says so. Encoded y-websocket messages, one per WebSocket message.
pub(crate) fn greeting(
    spec: &ClientSpec,
    doc: &Doc,
    awareness: &mut Awareness,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    if spec.kind != Kind::Baseline {
        let sv = doc.transact().state_vector();
        out.push(Message::Sync(SyncMessage::SyncStep1(sv)).encode_v1());
    }
    if spec.join_awareness {
        let name = format!("user-{}-{}", spec.session, spec.index);
        awareness.set_local_state_raw(format!(
            r##"{{"user":{{"name":"{name}","color":"#1e88e5"}}}}"##
        ));
        out.push(Message::Awareness(awareness.update()?).encode_v1());
    }
    Ok(out)
}

/// Records that a client is synced, `started` being when it began connecting.
pub(crate) fn mark_synced(stats: &Shared, counters: &Counters, started: Instant) {
    lock(stats).synced_us = Some(started.elapsed().as_micros() as u32);
    counters.synced.fetch_add(1, Ordering::AcqRel);
}

/// Join storm: a joiner's first sync step 2 (the update inside it), compared byte for byte
/// with the run's reference: the first joiner's, unless the run knew it in advance (the
/// trivial server's answer).
pub(crate) fn record_step2(stats: &Shared, counters: &Counters, update: Bytes) {
    let reference = counters.reference_step2.get_or_init(|| update.clone());
    let mut s = lock(stats);
    s.step2_len = update.len();
    s.step2_same = Some(*reference == update);
}

struct Schedule {
    next: Instant,
    k: u64,
    first: Instant,
    every: f64,
    end: Instant,
}

impl Schedule {
    fn new(rng: &mut StdRng, start: Instant, end: Instant, rate: f64) -> Option<Self> {
        if rate <= 0.0 {
            return None;
        }
        let every = 1.0 / rate;
        let first = start + Duration::from_secs_f64(rng.gen_range(0.0..every));
        (first < end).then_some(Self {
            next: first,
            k: 0,
            first,
            every,
            end,
        })
    }

    /// Advances; `false` once the step is over. Late sends are not skipped (the offered
    /// rate stays honest), they go out back to back.
    fn advance(&mut self) -> bool {
        self.k += 1;
        self.next = self.first + Duration::from_secs_f64(self.every * self.k as f64);
        self.next < self.end
    }
}

/// The most frames one wake-up of a client handles before it looks at its phase and its
/// writer's timer again: enough to amortize the select, few enough that a writer's next
/// update is not held back behind a long backlog.
const DRAIN_FRAMES: usize = 64;

async fn run_inner(
    spec: &ClientSpec,
    stats: &Shared,
    counters: &Counters,
    mut phase: watch::Receiver<Phase>,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(((spec.session as u64) << 32) ^ spec.index as u64 ^ 0x5eed);
    let doc = Doc::new();
    let strokes = doc.get_or_insert_map(STROKES);
    let mut awareness = Awareness::new(doc.clone());
    let name = format!("user-{}-{}", spec.session, spec.index);

    let started = Instant::now();
    let connect = tokio_tungstenite::connect_async_with_config(
        spec.url.as_str(),
        Some(ws_config(if spec.seed_bytes > 0 {
            256 << 10
        } else {
            4 << 10
        })),
        true,
    );
    let (mut ws, _) = match timeout(spec.connect_timeout, connect).await {
        Ok(r) => r.context("connect")?,
        Err(_) => bail!("connect timed out after {:?}", spec.connect_timeout),
    };
    lock(stats).connect_us = Some(started.elapsed().as_micros() as u32);

    for m in greeting(spec, &doc, &mut awareness)? {
        ws.send(Ws::Binary(Bytes::from(m))).await?;
    }
    let baseline = spec.kind == Kind::Baseline;
    let mut synced = false;
    if baseline {
        // Nothing to sync with: the baseline holds no document.
        synced = true;
        mark_synced(stats, counters, started);
    }
    let sync_deadline = started + spec.sync_timeout;

    let mut next_writer = vec![0u32; spec.n_writers as usize];
    let mut next_aware = vec![0u32; spec.n_aware as usize];
    let mut deferred: Vec<Vec<u8>> = Vec::new();
    let keeps_document = spec.keeps_document();
    let mut upd_seq = 0u32;
    let mut aw_seq = 0u32;
    let mut writes: Option<Schedule> = None;
    let mut cursor: Option<Schedule> = None;
    let mut seeding_ack_pending = false;
    let aw_expect = if baseline {
        spec.clients_in_session.saturating_sub(1)
    } else {
        spec.clients_in_session
    } as u64;
    let upd_expect = spec.clients_in_session.saturating_sub(1) as u64;

    let run_deadline = sleep_until(spec.deadline);
    tokio::pin!(run_deadline);
    let sync_sleep = sleep_until(sync_deadline);
    tokio::pin!(sync_sleep);
    let mut step_sending = false;
    loop {
        if step_sending && writes.is_none() && cursor.is_none() {
            step_sending = false;
            counters.senders_done.fetch_add(1, Ordering::AcqRel);
        }
        let w_at = writes.as_ref().map(|s| s.next);
        let a_at = cursor.as_ref().map(|s| s.next);
        tokio::select! {
            biased;
            changed = phase.changed() => {
                if changed.is_err() { break; }
                let p = *phase.borrow_and_update();
                match p {
                    Phase::Setup => {}
                    Phase::Run(step) => {
                        writes = spec.writer.and_then(|_| Schedule::new(&mut rng, step.start, step.end, step.rate));
                        cursor = spec.aware.and_then(|_| Schedule::new(&mut rng, step.start, step.end, step.aw_rate));
                        step_sending = true;
                    }
                    Phase::Settle => {
                        apply_deferred(&doc, &mut deferred)?;
                        counters.settle_acks.fetch_add(1, Ordering::AcqRel);
                    }
                    Phase::Finish => break,
                }
            }
            _ = sleep_until(w_at.unwrap_or(spec.deadline)), if w_at.is_some() => {
                let w = spec.writer.unwrap_or(0);
                let t = now_us();
                let key = format!("w{w}.{upd_seq}");
                let value = workload::stroke(&mut rng, &key, &name, &workload::update_marker(w, upd_seq, t), spec.points);
                let update = {
                    let mut txn = doc.transact_mut();
                    strokes.insert(&mut txn, key.as_str(), value);
                    if spec.keep_strokes > 0 && upd_seq >= spec.keep_strokes {
                        strokes.remove(&mut txn, &format!("w{w}.{}", upd_seq - spec.keep_strokes));
                    }
                    txn.encode_update_v1()
                };
                upd_seq += 1;
                let frame = encode(&Message::Sync(SyncMessage::Update(update)));
                counters.bytes_sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
                ws.send(frame).await.context("sending an update")?;
                counters.sent_upd.fetch_add(1, Ordering::AcqRel);
                counters.expected_upd.fetch_add(upd_expect, Ordering::AcqRel);
                if !writes.as_mut().map(|s| s.advance()).unwrap_or(false) { writes = None; }
            }
            _ = sleep_until(a_at.unwrap_or(spec.deadline)), if a_at.is_some() => {
                let a = spec.aware.unwrap_or(0);
                let t = now_us();
                let (x, y) = (rng.gen_range(0..1600u32), rng.gen_range(0..900u32));
                awareness.set_local_state_raw(format!(
                    r##"{{"user":{{"name":"{name}","color":"#1e88e5"}},"cursor":{{"x":{x},"y":{y}}},"lg":"{}"}}"##,
                    workload::awareness_marker(a, aw_seq, t)
                ));
                aw_seq += 1;
                let u = awareness.update_with_clients([awareness.client_id()])?;
                ws.send(encode(&Message::Awareness(u))).await.context("sending awareness")?;
                counters.sent_aw.fetch_add(1, Ordering::AcqRel);
                counters.expected_aw.fetch_add(aw_expect, Ordering::AcqRel);
                if !cursor.as_mut().map(|s| s.advance()).unwrap_or(false) { cursor = None; }
            }
            frame = ws.next() => {
                // Every frame already read is handled before the select is built again: a
                // fan-out client receives thousands of frames a second, and building the
                // select's futures (the phase watch, the writer's timer) per frame cost the
                // load generator more CPU than the frames did. The next frame is taken at
                // the loop's top, so skipping one (`continue`) cannot lose the one after it.
                let mut first = Some(frame);
                for _ in 0..DRAIN_FRAMES {
                    let Some(frame) = first.take().or_else(|| ws.next().now_or_never()) else {
                        break;
                    };
                    let bytes = match frame {
                        Some(Ok(Ws::Binary(b))) => b,
                        Some(Ok(Ws::Close(c))) => bail!("closed by the server: {c:?}"),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => bail!("read: {e}"),
                        None => bail!("connection ended by the server"),
                    };
                    let received = now_us();
                    let mut decoder = DecoderV1::from(&bytes[..]);
                    let mut replies: Vec<Ws> = Vec::new();
                    for msg in MessageReader::new(&mut decoder) {
                        match msg.context("undecodable message")? {
                            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                                let diff = doc.transact().encode_state_as_update_v1(&sv);
                                replies.push(encode(&Message::Sync(SyncMessage::SyncStep2(diff))));
                            }
                            Message::Sync(SyncMessage::SyncStep2(u)) => {
                                if seeding_ack_pending {
                                    seeding_ack_pending = false;
                                    counters.seeded.store(true, Ordering::Release);
                                    continue;
                                }
                                apply(&doc, &u)?;
                                if !synced {
                                    synced = true;
                                    mark_synced(stats, counters, started);
                                    if spec.seed_bytes > 0 {
                                        let sent = seed(&mut ws, &doc, spec, counters).await?;
                                        lock(stats).seeded_bytes = sent;
                                        let sv = doc.transact().state_vector();
                                        ws.send(encode(&Message::Sync(SyncMessage::SyncStep1(sv)))).await?;
                                        seeding_ack_pending = true;
                                    }
                                }
                            }
                            Message::Sync(SyncMessage::Update(u)) => {
                                if let Some((w, seq, sent)) = workload::find_marker(&u, UPDATE_MARK) {
                                    counters.received_upd.fetch_add(1, Ordering::AcqRel);
                                    let mut s = lock(stats);
                                    s.upd.push((sent, received.saturating_sub(sent) as u32));
                                    if let Some(n) = next_writer.get_mut(w as usize) {
                                        if *n != seq { s.out_of_order += 1; }
                                        *n = seq + 1;
                                    }
                                }
                                match spec.apply {
                                    ApplyMode::Live => apply(&doc, &u)?,
                                    ApplyMode::Defer => deferred.push(u),
                                    ApplyMode::Sample if keeps_document => deferred.push(u),
                                    // Counted and checked above; not kept.
                                    ApplyMode::Sample => {}
                                }
                            }
                            Message::Awareness(u) => {
                                for entry in u.clients.values() {
                                    if let Some((a, seq, sent)) = workload::find_marker(entry.json.as_bytes(), AWARENESS_MARK) {
                                        let mut s = lock(stats);
                                        s.aw.push((sent, received.saturating_sub(sent) as u32));
                                        match next_aware.get_mut(a as usize) {
                                            // An older state after a newer one: a real reordering.
                                            Some(n) if seq < *n => s.out_of_order += 1,
                                            Some(n) => {
                                                // The states in between were superseded within a
                                                // tick: this one stands for them.
                                                let covered = u64::from(seq - *n) + 1;
                                                counters.received_aw.fetch_add(covered, Ordering::AcqRel);
                                                counters.coalesced_aw.fetch_add(covered - 1, Ordering::AcqRel);
                                                *n = seq + 1;
                                            }
                                            None => {
                                                counters.received_aw.fetch_add(1, Ordering::AcqRel);
                                            }
                                        }
                                    }
                                }
                                awareness.apply_update(u)?;
                            }
                            Message::Auth(reason) => bail!("auth message from the server: {reason:?}"),
                            Message::AwarenessQuery => {
                                replies.push(encode(&Message::Awareness(awareness.update()?)));
                            }
                            Message::Custom(tag, _) => bail!("unknown message type {tag}"),
                        }
                    }
                    for r in replies {
                        ws.send(r).await?;
                    }
                }
            }
            _ = &mut sync_sleep, if !synced => {
                bail!("not synced within {:?}", spec.sync_timeout);
            }
            _ = &mut run_deadline => {
                bail!("run deadline passed");
            }
        }
    }

    // Finish: apply what was deferred, record the document's digest, close.
    apply_deferred(&doc, &mut deferred)?;
    if keeps_document {
        lock(stats).digest = Some(workload::digest(&doc));
    }
    let _ = timeout(Duration::from_secs(2), async {
        ws.close(None).await.ok();
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    Ok(())
}

/// Where the update of a message starting with a sync step 2 starts, and its length: the
/// message is [0, 1, varUint(len), update, ...], so the update is taken without a copy.
pub(crate) fn step2_bounds(frame: &[u8]) -> Option<(usize, usize)> {
    if frame.len() < 3 || frame[0] != 0 || frame[1] != 1 {
        return None;
    }
    let (mut len, mut shift, mut i) = (0usize, 0u32, 2usize);
    loop {
        let b = *frame.get(i)?;
        len |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 35 {
            return None;
        }
    }
    (i + len <= frame.len()).then_some((i, len))
}

fn apply_deferred(doc: &Doc, deferred: &mut Vec<Vec<u8>>) -> anyhow::Result<()> {
    if deferred.is_empty() {
        return Ok(());
    }
    let mut txn = doc.transact_mut();
    for u in deferred.drain(..) {
        txn.apply_update(Update::decode_v1(&u)?)?;
    }
    Ok(())
}

fn apply(doc: &Doc, update: &[u8]) -> anyhow::Result<()> {
    let u = Update::decode_v1(update).map_err(|e| anyhow!("update does not decode: {e}"))?;
    doc.transact_mut()
        .apply_update(u)
        .map_err(|e| anyhow!("update rejected: {e}"))
}

/// The join storm's board: realistic strokes from [`workload::SeedBuilder`] with a fixed
/// seed, added in updates of about `chunk` bytes until the document's encoded state reaches
/// `bytes`. The tutor sends these updates to easel; the trivial server's answer is built
/// from the same sequence, so both boards are of the size asked for.
pub(crate) struct Board {
    builder: workload::SeedBuilder,
    map: yrs::MapRef,
    bytes: usize,
    chunk: usize,
}

impl Board {
    pub(crate) fn new(doc: &Doc, bytes: usize, chunk: usize) -> Self {
        Self {
            builder: workload::SeedBuilder::new(0xd0c),
            map: doc.get_or_insert_map(STROKES),
            bytes,
            chunk,
        }
    }

    /// The next update (already applied to `doc`), or `None` once the board is complete.
    pub(crate) fn next_update(&mut self, doc: &Doc) -> Option<Vec<u8>> {
        let size = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
            .len();
        if size >= self.bytes {
            return None;
        }
        let want = (self.bytes - size).clamp(16 << 10, self.chunk);
        Some(self.builder.chunk(doc, &self.map, want))
    }
}

/// Writes a realistic document of `spec.seed_bytes` into the session, in updates of about
/// `spec.seed_chunk` bytes. Returns the bytes sent.
async fn seed<S>(
    ws: &mut S,
    doc: &Doc,
    spec: &ClientSpec,
    counters: &Counters,
) -> anyhow::Result<usize>
where
    S: futures_util::Sink<Ws, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let mut board = Board::new(doc, spec.seed_bytes, spec.seed_chunk);
    let mut sent = 0usize;
    while let Some(update) = board.next_update(doc) {
        let frame = encode(&Message::Sync(SyncMessage::Update(update)));
        sent += frame.len();
        counters
            .bytes_sent
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        ws.send(frame).await.context("sending a seed update")?;
    }
    Ok(sent)
}
