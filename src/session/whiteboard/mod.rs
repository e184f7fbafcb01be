//! A session's whiteboard: one `yrs` document and its awareness, and the fan-out to every
//! connection of the session.
//!
//! This is the only place a session's document is changed. Every change, whoever sends it
//! (a WebSocket client, the HTTP API, a restore, later another node), is queued to the
//! session's sequencer (`sequencer.rs`: a lane per session on the small `easel-lane` thread
//! pool, off the async workers) through [`Whiteboard::submit_update`] (or the blocking
//! [`Whiteboard::apply_update`]), which guards, decodes, applies in one short transaction,
//! appends to the store's log, then pushes the same encoded bytes to every peer's outbox.
//! The sequencer is the document's only writer, so updates are applied, logged and relayed
//! in one order. Updates queued behind one another form a batch (`Board::end_batch`):
//! each is applied in turn, then the batch is appended as one store entry, then its
//! outcomes and relays go; if that append fails, the whole batch is undone and refused,
//! as one update whose append fails is. The peer lock is taken for the fan-out only, after
//! the apply: a peer that joins (under that lock) before the fan-out joined after the
//! apply, so its sync step 2 holds the update; one that joins after it gets it in its
//! queue; never neither. No lock here is held across an `.await`; nothing here touches a
//! socket.
//!
//! Snapshots stay off that path. The relay only counts what it logged; housekeeping asks
//! [`Board::snapshot_wanted`] and, while clients are connected, builds the state on
//! its own thread from the store (a fresh document: the live one is not locked). The store
//! deletes just the log entries that state includes (by seq), so updates logged meanwhile
//! are kept and nothing needs the peer lock.
//!
//! [`Whiteboard`] is the session's handle: the [`Board`] (state, joins, reads) and the
//! sequencer every change goes through.
//!
//! Split by concern: `sequencer.rs` (the thread and its queue), `held_back.rs` (updates waiting for missing content, and rebuilding
//! from the store), `awareness.rs` (cursors and presence and their bounds), `snapshot.rs`
//! (when and how a snapshot is written), `step2.rs` (sync step 2, encoded off the async
//! workers, once per document state for fresh joiners). Every file adds to the one
//! `impl Board`;
//! this one keeps the state, joining and leaving, and the update path. Must not touch
//! sockets or the store's internals.

mod awareness;
mod held_back;
mod sequencer;
mod snapshot;
mod step2;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use axum::extract::ws::Message;
use bytes::Bytes;
use yrs::sync::{Awareness, AwarenessUpdate};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, ReadTxn, StateVector, Transact, Update};

use super::bus::{Bus, Event};
use super::peers::Peers;
use crate::config::LimitsConfig;
use crate::doc::guard::{self, CheckedUpdate, GuardError, NestingIndex};
use crate::metrics::Metrics;
use crate::protocol::wire;
use crate::store::{Store, StoreError, StoredRecord};
use crate::sync;
use crate::ws::outbox::Outbox;
use sequencer::Sequencer;
use snapshot::LastSnapshot;
use yrs::sync::awareness::AwarenessUpdateEntry;

pub use sequencer::QUEUE_JOBS;
pub use step2::Preparation;

/// Identifies one connection within the server.
pub use super::peers::ConnId;
/// How long an awareness change may wait by default to be relayed with the rest of its tick.
pub use awareness::AWARENESS_TICK_MS;

/// Why an update was not applied. The document is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("update does not decode: {0}")]
    Decode(String),
    #[error("update rejected: {0}")]
    Rejected(String),
    /// Refused by the update guard (SPEC.md 7.1) before `yrs` saw it.
    #[error("update refused: {0}")]
    Guard(#[from] crate::doc::guard::GuardError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a restore did not happen. The document is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum RestoreFailure {
    #[error("no snapshot version {0}")]
    NoSuchVersion(u64),
    #[error("stored version refused: {0}")]
    Guard(#[from] GuardError),
    #[error(transparent)]
    Restore(#[from] crate::doc::restore::RestoreError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a whiteboard treats what it is sent.
#[derive(Debug, Clone, Copy)]
pub struct WhiteboardOptions {
    /// Send updates back to their sender too.
    pub echo_updates: bool,
    /// How long awareness changes after a relay wait to go out together (`awareness.rs`);
    /// zero relays each at once.
    pub awareness_tick: std::time::Duration,
    /// Flush the store before relaying (`persist.durability = "sync"`).
    pub flush_before_relay: bool,
    /// Snapshot after this many logged updates (`persist.snapshot_every_updates`), once
    /// the log has also grown to the last snapshot's size (see [`Board::snapshot_wanted`]).
    pub snapshot_every_updates: u64,
    /// The bounds of SPEC.md 7.1 a whiteboard enforces (nesting, document size, pending
    /// bytes, awareness), as configured.
    pub limits: LimitsConfig,
    /// The store is shared with other nodes (cluster mode): its log holds their updates
    /// too, so how far this document includes the log is what the stream reader has fed
    /// it ([`Whiteboard::apply_remote`]), not the seqs of this node's own appends.
    pub shared_log: bool,
}

/// A session's whiteboard as the rest of the server holds it: the [`Board`] (through
/// `Deref`: joins, reads, awareness, snapshots) and the sequencer that makes every change.
/// Dropping it (the session unloads) ends the sequencer's thread.
pub struct Whiteboard {
    board: Arc<Board>,
    sequencer: Sequencer,
}

impl Deref for Whiteboard {
    type Target = Board;

    fn deref(&self) -> &Board {
        &self.board
    }
}

/// A whiteboard's state: the document, its awareness, its peers and its log bookkeeping.
/// Its document is changed only on the session's sequencer thread.
pub struct Board {
    session: Arc<str>,
    /// The live document. Replaced (on the sequencer) only when an update that began to
    /// integrate must be undone: it is rebuilt from the store, which never held that update.
    doc: RwLock<Doc>,
    /// What the update guard knows of the document's nesting; changed on the sequencer.
    nesting: Mutex<NestingIndex>,
    /// Updates that depend on content the document does not have yet, oldest first: held
    /// here rather than left pending in yrs (see [`CheckedUpdate::waits`]). Changed on the
    /// sequencer.
    held_back: Mutex<Vec<HeldBack>>,
    /// The document's encoded size when last measured, with the log bytes counted then
    /// (see [`Whiteboard::fits`]).
    measured_size: Mutex<Option<(u64, u64)>>,
    /// The awareness states and their coalescing relay (`awareness.rs`); its lock is
    /// taken after `peers` when both are needed.
    awareness: Arc<awareness::AwarenessRelay>,
    /// Shared with the awareness relay, which fans out from its own timer.
    peers: Arc<Mutex<Peers<Outbox>>>,
    /// What the sequencer's jobs hold until their batch ends (see [`Board::end_batch`]):
    /// the updates for the log, the outcomes waiting for them, and the relays.
    held: Mutex<HeldBatch>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    options: WhiteboardOptions,
    /// The seq of the last log entry written; only grows, under `log_order`.
    log_seq: AtomicU64,
    /// The document's state vector as of the last append (and of the load, or a rebuild):
    /// what the store holds through `log_seq`, besides held-back updates. Set under
    /// `log_order`, for a snapshot to read with `log_seq` (the live document may hold
    /// updates applied and not yet appended: see [`HeldBatch::log`]).
    stored_sv: Mutex<StateVector>,
    /// Held while a seq is taken and its entry appended (the sequencer's updates, a
    /// snapshot's re-logged held-back updates), so seqs follow the log's order.
    log_order: Mutex<()>,
    /// Updates and bytes logged since the last snapshot.
    updates_since_snapshot: AtomicU64,
    log_bytes_since_snapshot: AtomicU64,
    /// Size of the last snapshot's state.
    snapshot_bytes: AtomicU64,
    /// One snapshot at a time: two racing could store an older state as the newer version.
    /// A rebuild takes it too, so that no snapshot deletes log entries it has yet to read.
    snapshotting: Mutex<()>,
    dirty: AtomicBool,
    last_snapshot: Mutex<LastSnapshot>,
    /// Counts changes, for long polls waiting on the document.
    changes: tokio::sync::watch::Sender<u64>,
    /// The sync step 2 for an empty state vector (a joiner with a fresh document), by the
    /// change count it was encoded at: a join storm encodes a large board once, not per
    /// joiner (see `step2.rs`).
    full_step2: step2::FullStep2Cache,
    /// The document's state vector, refreshed on the sequencer after every change: a
    /// joiner's sync step 1 and a long poll's check read it here rather than take the
    /// document's lock on an async worker, where they could wait behind the sequencer's
    /// write, itself waiting behind a large step 2 encode (yrs's lock favours writers).
    /// Older than the document at worst, which costs a client a larger step 2, never an
    /// update.
    state_vector: Mutex<StateVector>,
    /// The other nodes (cluster mode), set once right after the load.
    bus: std::sync::OnceLock<Arc<dyn Bus>>,
    /// Holds an update the store refused, which a rollback could not undo yet because the
    /// store could not be read either.
    stale: AtomicBool,
}

impl Default for WhiteboardOptions {
    /// SPEC.md's defaults, as a session with no configuration gets them.
    fn default() -> Self {
        Self {
            echo_updates: false,
            awareness_tick: std::time::Duration::from_millis(AWARENESS_TICK_MS),
            flush_before_relay: false,
            snapshot_every_updates: 500,
            limits: LimitsConfig::default(),
            shared_log: false,
        }
    }
}

/// An update's outcome: whether it changed the document.
pub type UpdateOutcome = std::pin::Pin<Box<dyn Future<Output = Result<bool, ApplyError>> + Send>>;

/// An update handed to the sequencer by [`Whiteboard::queue_update`].
pub enum Submitted {
    /// In the queue: the future only awaits the outcome.
    Queued(UpdateOutcome),
    /// The queue was full: the future queues the update once a place is free, then awaits
    /// its outcome.
    Waiting(UpdateOutcome),
}

/// A Yjs v1 update with no structs and no deletions: zero clients, an empty delete set.
const EMPTY_UPDATE: &[u8] = &[0, 0];

/// The most relays (and updates for the log) the sequencer holds for the jobs queued
/// behind the one that made them (see [`Board::end_batch`]), and the longest the first of
/// them waits: what the batch saves is one store write per batch instead of per update,
/// and one writer wake-up and one write per connection and update; what these bound is
/// the delay it adds (a job that flushes to disk, in sync durability, takes far longer
/// than the ~25 µs of an update, so the time bound is the one that holds there).
pub(in crate::session) const RELAY_BATCH: usize = 16;
const RELAY_HOLD: std::time::Duration = std::time::Duration::from_millis(1);
/// A batch whose updates for the log reach this many bytes ends with the job that made
/// them: one store entry stays well under sled's large-value threshold.
const HELD_LOG_BYTES: usize = 64 * 1024;

/// What the sequencer's jobs hold until their batch ends: the updates they applied, which
/// are appended to the log together (one store entry); the outcomes that wait for that
/// append (a WebSocket reader's: see [`HeldOutcome`]); and the relays, which go after it.
#[derive(Default)]
struct HeldBatch {
    /// Applied, not yet appended, in the order applied (the bytes the client sent, shared,
    /// not copied).
    log: Vec<Bytes>,
    log_bytes: usize,
    /// Each message with the connection it is not for.
    relays: Vec<(Message, Option<ConnId>)>,
    /// For each of `relays`, when the update it carries was queued on the sequencer, if a
    /// job submitted it (see [`Board::relay`]).
    queued: Vec<Option<Instant>>,
    outcomes: Vec<HeldOutcome>,
    /// How many of `relays` (and `queued`) and `outcomes` were held before the first of
    /// `log`: they are backed by entries already stored, and go even if appending `log` fails.
    relays_stored: usize,
    outcomes_stored: usize,
    /// When the first of them was held.
    since: Option<Instant>,
}

/// A job's outcome waiting for its batch's append: told the error if the append failed
/// (its update is then undone with the whole batch's, and it must say so).
pub(super) type HeldOutcome = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// What a batch hands on when it ends: the outcomes, then the relays.
pub(super) struct Released {
    outcomes: Vec<HeldOutcome>,
    relays: Vec<(Message, Option<ConnId>)>,
    queued: Vec<Option<Instant>>,
}

/// The most updates a session holds back at once (besides `limits.max_pending_bytes`).
const MAX_HELD_BACK: usize = 256;

/// An update held back until the content it depends on arrives (see `held_back.rs`).
struct HeldBack {
    update: Vec<u8>,
    /// Clients of whom it waits for content.
    waits_on: Vec<u64>,
}

impl Whiteboard {
    /// Rebuilds the session's document from the store. The sequencer's thread starts with
    /// the first update.
    pub fn load(
        session: Arc<str>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        options: WhiteboardOptions,
    ) -> Result<Self, StoreError> {
        let board = Arc::new(Board::load(session, store, metrics, options)?);
        Ok(Self {
            sequencer: Sequencer::new(board.clone()),
            board,
        })
    }

    /// Queues a Yjs v1 update from `origin` (`None`: not a connection of this node) to the
    /// sequencer, awaiting space while its queue is full, and resolves to its outcome:
    /// whether the document changed. `message`, when given, is the update already encoded
    /// as a sync-update message (the bytes the client sent): it is relayed as is.
    ///
    /// The future owns what it needs ('static): a connection's reader awaits it.
    pub fn submit_update(
        &self,
        origin: Option<ConnId>,
        update: Bytes,
        message: Option<Bytes>,
    ) -> impl Future<Output = Result<bool, ApplyError>> + Send + 'static {
        // The empty update (no structs, no deletions: what every client sends in answer
        // to the server's sync step 1 on a board it has nothing to add to) changes
        // nothing: answered here, it neither queues nor starts the sequencer's thread for
        // a session only read.
        let empty = update.as_ref() == EMPTY_UPDATE;
        let job = (!empty).then(|| {
            let queued = Instant::now();
            // Answered once stored and relayed (the HTTP API, the CLI): a connection's
            // reader uses `queue_update`, which answers first.
            self.sequencer
                .run(move |board| board.sequence_update(origin, &update, message, queued))
        });
        async move {
            match job {
                None => Ok(false),
                Some(job) => job.await.map_err(ApplyError::Store)?,
            }
        }
    }

    /// Queues an update from connection `origin` to the sequencer without waiting, when its
    /// queue has a place: the reader then reads on while the update is applied, with
    /// several of its updates in flight. Otherwise (a full queue) the outcome future queues
    /// it once a place is free, and the reader must await it before it queues anything
    /// else. `refused` is the connection's mark: once one of its updates is refused, the
    /// ones it queued after it are not applied (they fail too, and the first refusal
    /// closes the connection), as if the reader had waited for each outcome.
    pub fn queue_update(
        &self,
        origin: ConnId,
        refused: &Arc<AtomicBool>,
        update: Bytes,
        message: Option<Bytes>,
    ) -> Submitted {
        if update.as_ref() == EMPTY_UPDATE {
            return Submitted::Queued(Box::pin(std::future::ready(Ok(false))));
        }
        let queued = Instant::now();
        let refused = refused.clone();
        let marked = refused.clone();
        // The batch's append failed after the job ran: the update is undone, and counts as
        // refused like one the job refused itself.
        let store_failed = move |e: &StoreError| {
            marked.store(true, Ordering::Release);
            Err(ApplyError::Store(StoreError::again(e)))
        };
        let job = move |board: &Board| {
            if refused.load(Ordering::Acquire) {
                return Err(ApplyError::Rejected("sent after a refused update".into()));
            }
            let outcome = board.sequence_update(Some(origin), &update, message, queued);
            if outcome.is_err() {
                refused.store(true, Ordering::Release);
            }
            outcome
        };
        let outcome = |ran: Result<Result<bool, ApplyError>, StoreError>| {
            ran.map_err(ApplyError::Store).and_then(|outcome| outcome)
        };
        match self.sequencer.try_run_reply_first(job, store_failed) {
            Ok(queued) => Submitted::Queued(Box::pin(async move { outcome(queued.await) })),
            Err(waiting) => Submitted::Waiting(Box::pin(async move { outcome(waiting.await) })),
        }
    }

    /// Connects the whiteboard to the other nodes of a cluster: its awareness changes are
    /// published from now on, and it asks the others for theirs.
    pub fn attach_bus(&self, bus: Arc<dyn Bus>) {
        self.awareness.attach_bus(&self.session, bus.clone());
        let _ = self.bus.set(bus);
    }

    /// Applies what other nodes appended to the shared log, in log order, and relays what
    /// changed to this node's connections; `through` is the seq of the last entry read
    /// (this node's own entries are in the document already and come as no update). Waits
    /// for the sequencer: the stream reader calls it from its own thread. An update that
    /// does not apply is logged and skipped, as on a load: it is in the log, every node
    /// skips it alike.
    pub fn apply_remote(&self, through: u64, updates: Vec<Vec<u8>>) {
        let job = self.sequencer.run(move |board| {
            for update in &updates {
                board.sequence_remote(update);
            }
            board.log_seq.fetch_max(through, Ordering::AcqRel);
        });
        if let Err(e) = sequencer::block_on(job) {
            tracing::warn!(session = %self.session, error = %e, "updates from other nodes not applied");
        }
    }

    /// Brings the document up to what the store holds and relays what it lacked to this
    /// node's connections, for the stream reader when entries after its cursor were
    /// trimmed before it read them (another node's version covers them: the version is in
    /// the store, the entries are not in the stream any more). Waits for the sequencer.
    /// An error (the store unreadable) leaves the document as it was; the reader tries
    /// again on its next read.
    pub fn catch_up(&self, through: u64) -> Result<(), StoreError> {
        sequencer::block_on(self.sequencer.run(move |board| {
            let stored_through = board.catch_up()?;
            board
                .log_seq
                .fetch_max(through.max(stored_through), Ordering::AcqRel);
            Ok(())
        }))?
    }

    /// Rebuilds the document from the store if an update the store refused is still in it
    /// (see [`Board::is_stale`]); waits for the sequencer. For the stream reader, once the
    /// store answers again.
    pub fn refresh_if_stale(&self) -> Result<(), StoreError> {
        if !self.is_stale() {
            return Ok(());
        }
        sequencer::block_on(self.sequencer.run(|board| board.ensure_fresh()))?
    }

    /// Whether the sequencer has nothing queued or running. A job outlives its submitter
    /// (a dropped request, a closed connection): a session must not unload under it, or
    /// the job would append to the store from a board no longer loaded, with a log seq
    /// that the session, loaded again meanwhile, hands out too.
    pub fn sequencer_idle(&self) -> bool {
        self.sequencer.is_idle()
    }

    /// Waits (on the calling thread, a blocking one) until every job queued so far has
    /// run: the final save at shutdown, whose connections stopped awaiting their updates'
    /// outcomes but whose updates still go through (an update must not reach the store
    /// after the final snapshot and flush).
    pub fn settle(&self) {
        if self.sequencer.is_idle() {
            return;
        }
        // A job that does nothing: once it has run, every job queued before it has.
        let _ = sequencer::block_on(self.sequencer.run(|_| ()));
    }

    /// Jobs queued or running on the sequencer.
    #[cfg(test)]
    pub(crate) fn sequencer_queued(&self) -> usize {
        self.sequencer.queued()
    }

    /// Holds the sequencer (a job that waits) until the returned sender sends or is
    /// dropped: jobs queued meanwhile wait behind it, in order.
    #[cfg(test)]
    pub(crate) fn hold_sequencer(&self) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let hold = self.sequencer.run(move |_| {
            let _ = held.recv();
        });
        // Polled once, the job is queued; it then runs whether or not its outcome is awaited.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let _ = std::pin::pin!(hold).poll(&mut cx);
        release
    }

    /// [`Self::submit_update`], waiting on the calling thread: for blocking callers (the
    /// CLI, tests, a blocking task), never an async worker.
    pub fn apply_update(
        &self,
        origin: Option<ConnId>,
        update: &[u8],
        message: Option<Bytes>,
    ) -> Result<bool, ApplyError> {
        sequencer::block_on(self.submit_update(origin, Bytes::copy_from_slice(update), message))
    }

    /// Rolls the document back to snapshot `version` as new operations (SPEC.md 5.3):
    /// connected clients receive them like any update and show that version without a
    /// reload. The change set is made, logged and relayed on the sequencer; the result is
    /// then recorded as a new snapshot version (on the calling thread, which must be a
    /// blocking one), which is returned.
    pub fn restore(&self, version: u64) -> Result<u64, RestoreFailure> {
        sequencer::block_on(
            self.sequencer
                .run(move |board| board.sequence_restore(version)),
        )??;
        self.dirty.store(true, Ordering::Release);
        let version = self.snapshot_if_dirty()?;
        Ok(version.unwrap_or_default())
    }
}

impl Board {
    /// Rebuilds the session's document from the store.
    fn load(
        session: Arc<str>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        options: WhiteboardOptions,
    ) -> Result<Self, StoreError> {
        let (rebuilt, last_log_seq) =
            Self::doc_from_stored(&session, &*store, &metrics, &options.limits)?;
        let peers = Arc::new(Mutex::new(Peers::default()));
        let sv = rebuilt.doc.transact().state_vector();
        let stored_sv = Mutex::new(sv.clone());
        let state_vector = Mutex::new(sv);
        Ok(Self {
            awareness: Arc::new(awareness::AwarenessRelay::new(
                session.clone(),
                rebuilt.doc.clone(),
                peers.clone(),
                options.awareness_tick,
            )),
            session,
            doc: RwLock::new(rebuilt.doc),
            nesting: Mutex::new(rebuilt.nesting),
            held_back: Mutex::new(rebuilt.held_back),
            measured_size: Mutex::new(None),
            peers,
            held: Mutex::default(),
            store,
            metrics,
            options,
            log_seq: AtomicU64::new(last_log_seq),
            stored_sv,
            log_order: Mutex::new(()),
            // A log left after the snapshot (a crash, a kill) is folded into the next one.
            updates_since_snapshot: AtomicU64::new(rebuilt.log_updates),
            log_bytes_since_snapshot: AtomicU64::new(rebuilt.log_bytes),
            snapshot_bytes: AtomicU64::new(rebuilt.snapshot_bytes),
            snapshotting: Mutex::new(()),
            dirty: AtomicBool::new(rebuilt.log_updates > 0),
            last_snapshot: Mutex::new(LastSnapshot {
                at: Instant::now(),
                took: std::time::Duration::ZERO,
            }),
            changes: tokio::sync::watch::Sender::new(0),
            full_step2: Default::default(),
            state_vector,
            bus: Default::default(),
            stale: AtomicBool::new(false),
        })
    }

    /// The live document (a handle: cloning it is cheap).
    fn doc(&self) -> Doc {
        sync::read(&self.doc).clone()
    }

    fn nesting(&self) -> MutexGuard<'_, NestingIndex> {
        sync::lock(&self.nesting)
    }

    fn peers(&self) -> MutexGuard<'_, Peers<Outbox>> {
        // Nothing panics while holding this lock; recover the map if something ever did.
        sync::lock(&self.peers)
    }

    /// Registers a connection and queues its greeting: sync step 1 with the server's state
    /// vector, then every awareness state if there are any.
    pub fn join(&self, conn: ConnId, outbox: Outbox) {
        let mut peers = self.peers();
        let sv = sync::lock(&self.state_vector).clone();
        outbox.send(Message::Binary(wire::sync_step1(sv)));
        if let Some(states) = self.awareness_states() {
            outbox.send(Message::Binary(states));
        }
        peers.insert(conn, outbox);
    }

    /// Unregisters a connection and removes the awareness clients it announced; the
    /// removal is relayed to the others with each client's own last clock (`awareness.rs`).
    pub fn leave(&self, conn: ConnId, awareness_clients: &HashSet<ClientID>) {
        self.peers().remove(&conn);
        // A client that reconnected through another node (cluster mode: no sticky
        // sessions) is that node's now: its live state is not this closing socket's to
        // remove.
        let ours = self.awareness.not_remote(awareness_clients);
        if !ours.is_empty() {
            self.remove_awareness_clients(&ours);
        }
    }

    /// Follows the document's changes (for long polls).
    /// The last log seq this document includes (with a shared log: every entry up to it).
    pub fn log_through(&self) -> u64 {
        self.log_seq.load(Ordering::Acquire)
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether the document holds anything a peer at state vector `sv` lacks (deletions
    /// aside: they do not advance a state vector).
    pub fn is_ahead_of(&self, sv: &StateVector) -> bool {
        let current = sync::lock(&self.state_vector).clone();
        current
            .iter()
            .any(|(client, clock)| *clock > sv.get(client))
    }

    /// What a peer at state vector `sv` is missing, as one Yjs v1 update; refused while
    /// the document may hold an update the store did not take (see [`Board::is_stale`]):
    /// nothing is served that was not stored.
    pub fn diff(&self, sv: &StateVector) -> Result<Vec<u8>, StoreError> {
        self.refuse_if_stale()?;
        Ok(self.doc().transact().encode_state_as_update_v1(sv))
    }

    /// [`StoreError::Unreachable`] while the document is stale.
    pub fn refuse_if_stale(&self) -> Result<(), StoreError> {
        if self.is_stale() {
            return Err(StoreError::Unreachable(
                "the document holds an update the store did not take; it is rebuilt once the store answers".into(),
            ));
        }
        Ok(())
    }

    /// The whole document as one Yjs v1 update.
    pub fn encode_state(&self) -> Vec<u8> {
        self.doc()
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// Applies a Yjs v1 update from `origin` (`None`: not a connection of this node): guard,
    /// apply, append, fan-out. Runs on the sequencer only (see [`Whiteboard::submit_update`]);
    /// `queued` is when it was submitted, for the relay latency.
    fn sequence_update(
        &self,
        origin: Option<ConnId>,
        update: &Bytes,
        message: Option<Bytes>,
        queued: Instant,
    ) -> Result<bool, ApplyError> {
        self.ensure_fresh()?;
        // The guard walks the bytes before yrs decodes them (SPEC.md 7.1): lengths, counts,
        // value depth, and the depth of every shared type against what the document holds.
        let checked = self
            .nesting()
            .check(update, self.options.limits.max_nesting)
            .inspect_err(|e| self.metrics.guard_refusals.count(e))?;
        if checked.is_empty {
            return Ok(false);
        }
        if checked.waits {
            self.hold_back(update, checked.waits_on, true)?;
            return Ok(false);
        }
        // Almost always nothing is held back: then the relay path pays nothing for it.
        let clients = (!self.held_back().is_empty()).then(|| checked.clients());
        let changed = self.integrate(origin, update, message, checked, Some((update, queued)))?;
        if changed {
            if let Some(clients) = clients {
                // Stored first: held-back updates are let in stored already, and a failed
                // append must refuse this update, not the ones it lets in.
                self.store_held()?;
                self.retry_held_back(clients);
            }
        }
        Ok(changed)
    }

    /// Integrates a checked update that waits for nothing, holds it for the batch's append
    /// (`log`: the same bytes, shared, and when they were queued on the sequencer; `None`
    /// for one stored already: a held-back update, another node's) and relays it. Runs on
    /// the sequencer.
    fn integrate(
        &self,
        origin: Option<ConnId>,
        update: &[u8],
        message: Option<Bytes>,
        checked: CheckedUpdate,
        log: Option<(&Bytes, Instant)>,
    ) -> Result<bool, ApplyError> {
        let limits = self.options.limits;
        if log.is_none() {
            // Stored before: what the batch holds must not be undone with it (or after it).
            self.store_held()?;
        }
        let decoded = Update::decode_v1(update).map_err(|e| ApplyError::Decode(e.to_string()))?;
        let doc = self.doc();
        // Checked before integrating, so a refusal needs no undoing: the update's size
        // stands for what it could add.
        if !self.fits(&doc, update.len()) {
            self.metrics.guard_refusals.doc_size.inc();
            return Err(ApplyError::Guard(GuardError::TooLarge {
                what: "the document",
                limit: limits.max_doc_bytes,
            }));
        }
        let integrated = {
            let mut txn = doc.transact_mut();
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                txn.apply_update(decoded)
            }));
            match applied {
                // The guard holds back whatever depends on absent content, so nothing may
                // be left pending in yrs; if something is, the guard missed a dependency.
                Ok(Ok(())) if txn.has_missing_updates() => Err(ApplyError::Guard(
                    GuardError::Malformed("depends on content the server does not have".into()),
                )),
                // Whatever yrs integrated counts, including blocks that fill a range the
                // state vector already covered (a skip integrated earlier): judged by the
                // state vector alone such an update was taken for a no-op, kept in the live
                // document but neither logged nor relayed (a fuzz finding).
                // The state vector after it is taken from this transaction, not a second one.
                Ok(Ok(())) => {
                    let after = txn.state_vector();
                    Ok((txn.has_changes() || txn.before_state() != &after, after))
                }
                Ok(Err(e)) => Err(ApplyError::Rejected(e.to_string())),
                Err(_) => Err(ApplyError::Rejected("integration panicked".into())),
            }
        };
        let after = match integrated {
            Ok((true, after)) => after,
            Ok((false, _)) => return Ok(false),
            Err(e) => return Err(self.roll_back(e)),
        };
        *sync::lock(&self.state_vector) = after;
        self.nesting().commit(checked);
        self.metrics.updates_applied.inc();
        if let Some((update, _)) = log {
            self.hold_for_log(update.clone());
            // A shared log orders the nodes' updates as it takes them: appended at once.
            if self.options.shared_log {
                self.store_held()?;
            }
        } else {
            // Stored already (a held-back update, another node's): the stored state moves
            // with it, and nothing held may come before it (see `store_held`).
            *sync::lock(&self.stored_sv) = sync::lock(&self.state_vector).clone();
            self.changes.send_modify(|n| *n += 1);
        }
        // What the client sent is exactly what the others need.
        let frame = message.unwrap_or_else(|| wire::update(update.to_vec()));
        let except = if self.options.echo_updates {
            None
        } else {
            origin
        };
        self.relay(
            Message::Binary(frame),
            except,
            log.map(|(_, queued)| queued),
        );
        Ok(true)
    }

    /// Queues `message` for every connection but `except`, after what the sequencer
    /// queued before it (see [`Board::end_batch`]). On the sequencer, after the change
    /// it carries is in the document: a connection that joins before the relay goes out
    /// gets it both in its step 2 and as an update, which Yjs applies once.
    ///
    /// `queued`: when the update it carries was queued on the sequencer, for the relay
    /// latency, observed once the batch's relays are handed over ([`Board::release`]).
    fn relay(&self, message: Message, except: Option<ConnId>, queued: Option<Instant>) {
        let mut held = sync::lock(&self.held);
        held.since.get_or_insert_with(Instant::now);
        held.relays.push((message, except));
        held.queued.push(queued);
    }

    /// Holds an applied update for the batch's append (see [`Board::store_held`]).
    fn hold_for_log(&self, update: Bytes) {
        let mut held = sync::lock(&self.held);
        if held.log.is_empty() {
            held.relays_stored = held.relays.len();
            held.outcomes_stored = held.outcomes.len();
        }
        held.since.get_or_insert_with(Instant::now);
        held.log_bytes += update.len();
        held.log.push(update);
    }

    /// Holds a job's outcome until its batch's updates are stored (see [`HeldOutcome`]).
    pub(super) fn hold_outcome(&self, outcome: HeldOutcome) {
        let mut held = sync::lock(&self.held);
        held.since.get_or_insert_with(Instant::now);
        held.outcomes.push(outcome);
    }

    /// Ends the batch unless this is not the `last_job` (another is queued behind it, and
    /// will call this again), it holds fewer than [`RELAY_BATCH`] relays and updates and
    /// [`HELD_LOG_BYTES`] of them, and the first has waited less than [`RELAY_HOLD`].
    /// Ending it appends its updates to the log as one entry ([`Board::store_held`]) and
    /// returns its outcomes and relays for [`Board::release`]: the caller first stops
    /// counting its job as pending, so that whoever sees an outcome sees the sequencer
    /// idle, and an unload never finds applied updates not yet stored. On the sequencer,
    /// at the end of every job.
    pub(super) fn end_batch(&self, last_job: bool) -> Option<Released> {
        {
            let held = sync::lock(&self.held);
            let hold = !last_job
                && held.relays.len().max(held.log.len()) < RELAY_BATCH
                && held.log_bytes < HELD_LOG_BYTES
                && held.since.is_some_and(|t| t.elapsed() < RELAY_HOLD);
            if hold || held.since.is_none() {
                return None;
            }
        }
        // A failure has undone the batch's updates, answered its outcomes and dropped its
        // relays: what is left is backed by the store.
        let _ = self.store_held();
        let mut held = sync::lock(&self.held);
        held.since = None;
        Some(Released {
            outcomes: std::mem::take(&mut held.outcomes),
            relays: std::mem::take(&mut held.relays),
            queued: std::mem::take(&mut held.queued),
        })
    }

    /// Answers the outcomes of an ended batch, then hands its relays to the connections,
    /// each connection its share in one delivery.
    pub(super) fn release(&self, released: Released) {
        for outcome in released.outcomes {
            outcome(None);
        }
        let relays = released.relays;
        if relays.is_empty() {
            return;
        }
        self.metrics.relay_batches.inc();
        self.metrics
            .relay_batch_messages
            .inc_by(relays.len() as u64);
        // The peer lock for the fan-out only (see the module docs).
        self.peers().broadcast_all(&relays);
        for queued in released.queued.into_iter().flatten() {
            self.metrics
                .relay_latency
                .observe(queued.elapsed().as_secs_f64());
        }
    }

    /// Appends the updates the batch holds to the log, as one entry (the store's
    /// [`Store::append_updates`]), before any of their relays or outcomes goes. If that
    /// fails, the document is rebuilt from the store (it never held them: SPEC.md 7.1's
    /// "the live document stays as it was"), their relays are dropped and their outcomes
    /// answered with the error; what was held before them is backed by the store and stays.
    /// On the sequencer; also before anything is appended or applied outside a batch (a
    /// held-back update, a restore, another node's update), which keeps the log in order.
    fn store_held(&self) -> Result<(), StoreError> {
        let log = {
            let mut held = sync::lock(&self.held);
            held.log_bytes = 0;
            std::mem::take(&mut held.log)
        };
        if log.is_empty() {
            return Ok(());
        }
        let run: Vec<&[u8]> = log.iter().map(Bytes::as_ref).collect();
        let Err(e) = self.append(&run) else {
            self.changes.send_modify(|n| *n += 1);
            return Ok(());
        };
        let failed = {
            let mut held = sync::lock(&self.held);
            let keep = held.relays_stored;
            held.relays.truncate(keep);
            held.queued.truncate(keep);
            let keep = held.outcomes_stored;
            held.outcomes.split_off(keep)
        };
        self.undo(&e);
        for outcome in failed {
            outcome(Some(&e));
        }
        Err(e)
    }

    /// One update another node appended (on the sequencer): guarded, applied and relayed
    /// like a client's, but not logged again.
    fn sequence_remote(&self, update: &[u8]) {
        let refused = |e: &dyn std::fmt::Display| {
            tracing::warn!(session = %self.session, error = %e, "an update from another node was refused");
        };
        // Applied on top of a stale document all the same: the rebuild keeps it (it is in
        // the log) and drops only what the store never took.
        let _ = self.ensure_fresh();
        let checked = match self
            .nesting()
            .check(update, self.options.limits.max_nesting)
        {
            Ok(checked) => checked,
            Err(e) => return refused(&e),
        };
        if checked.is_empty {
            return;
        }
        if checked.waits {
            if let Err(e) = self.hold_back(update, checked.waits_on, false) {
                refused(&e);
            }
            return;
        }
        let clients = (!self.held_back().is_empty()).then(|| checked.clients());
        match self.integrate(None, update, None, checked, None) {
            Ok(true) => {
                if let Some(clients) = clients {
                    self.retry_held_back(clients);
                }
            }
            // The document had it already (it was rebuilt from the store since the entry
            // was appended): this node's connections may not, and a duplicate is harmless.
            Ok(false) => self.relay(Message::Binary(wire::update(update.to_vec())), None, None),
            Err(e) => refused(&e),
        }
    }

    /// Whether the document, grown by an update of `added` bytes, stays within
    /// `limits.max_doc_bytes`. The document's size is bounded from above by its last known
    /// size (the last snapshot's, or the last measurement's) plus the bytes logged since;
    /// only when that bound passes the limit is the document encoded to measure it, and the
    /// measurement becomes the new base. A board near the limit is measured once per
    /// limit-minus-size of logged bytes, not per update.
    fn fits(&self, doc: &Doc, added: usize) -> bool {
        let limit = self.options.limits.max_doc_bytes as u64;
        // With what the batch holds for the log (on the sequencer, as `store_held`, which
        // moves those bytes into the log's count).
        let logged = self.log_bytes_since_snapshot.load(Ordering::Acquire)
            + sync::lock(&self.held).log_bytes as u64;
        let mut measured = sync::lock(&self.measured_size);
        let bound = match *measured {
            // Logged bytes only shrink when a snapshot folds them in; then the snapshot's
            // size is the better base.
            Some((exact, logged_then)) if logged >= logged_then => exact + (logged - logged_then),
            _ => self.snapshot_bytes.load(Ordering::Acquire) + logged,
        };
        if bound + added as u64 <= limit {
            return true;
        }
        let exact = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
            .len() as u64;
        *measured = Some((exact, logged));
        exact + added as u64 <= limit
    }

    /// Undoes an update that began to integrate and is refused after all (SPEC.md 7.1: the
    /// live document stays exactly as it was): the document is rebuilt from the store,
    /// which holds every update that was accepted and never the refused one. Runs on the
    /// sequencer, the document's only writer, so no update slips in between; nothing was
    /// relayed. Returns `why`, for the caller to hand on.
    fn roll_back(&self, why: ApplyError) -> ApplyError {
        self.undo(&why);
        why
    }

    /// [`Board::roll_back`]'s work: the document rebuilt from the store, `why` logged.
    fn undo(&self, why: &dyn std::fmt::Display) {
        self.metrics.updates_rolled_back.inc();
        match self.rebuild() {
            Ok(()) => {
                tracing::warn!(session = %self.session, error = %why, "update refused after it began to integrate; document rebuilt from the store");
            }
            Err(e) => {
                // The store is unreachable too (Redis down, in cluster mode: the usual case
                // of a failed append). The document holds what was never stored; it is
                // rebuilt before it is changed again or joined (`Board::is_stale`).
                self.stale.store(true, Ordering::Release);
                tracing::error!(session = %self.session, error = %why, store_error = %e, "update refused after it began to integrate, and the store cannot be read to undo it yet");
            }
        }
    }

    /// Applies what the store holds and the document lacks, as one update from another
    /// node (guarded, applied, relayed, not logged again); returns the store's last log seq.
    fn catch_up(&self) -> Result<u64, StoreError> {
        let (rebuilt, last_log_seq) = self.load_stored()?;
        let have = self.doc().transact().state_vector();
        let missing = rebuilt.doc.transact().encode_state_as_update_v1(&have);
        self.sequence_remote(&missing);
        Ok(last_log_seq)
    }

    /// The document the store holds, and the store's last log seq.
    fn load_stored(&self) -> Result<(held_back::Rebuilt, u64), StoreError> {
        Self::doc_from_stored(
            &self.session,
            &*self.store,
            &self.metrics,
            &self.options.limits,
        )
    }

    /// Replaces the document with the one the store holds.
    fn rebuild(&self) -> Result<(), StoreError> {
        let (rebuilt, _) = {
            // The store's log is read as it is applied, for seconds on a long one; a
            // snapshot written meanwhile would delete entries not read yet from behind the
            // snapshot this started from. Rebuilds are rare (an update yrs refused midway, an
            // append that failed): they wait for a snapshot under way instead.
            let _no_snapshot_meanwhile = sync::lock(&self.snapshotting);
            self.load_stored()?
        };
        *sync::lock(&self.stored_sv) = rebuilt.doc.transact().state_vector();
        *sync::write(&self.doc) = rebuilt.doc;
        *self.nesting() = rebuilt.nesting;
        *self.held_back() = rebuilt.held_back;
        self.refresh_state_vector();
        // A joiner may have been served the refused update meanwhile (step 2 does not take
        // the peer lock): the cached step 2 goes, and long polls wake.
        self.forget_full_step2();
        self.changes.send_modify(|n| *n += 1);
        self.stale.store(false, Ordering::Release);
        Ok(())
    }

    /// Rebuilds a stale document (see [`Board::roll_back`]) before it is used again.
    fn ensure_fresh(&self) -> Result<(), StoreError> {
        if self.stale.load(Ordering::Acquire) {
            self.rebuild()?;
            tracing::info!(session = %self.session, "document rebuilt from the store after an update that could not be stored");
        }
        Ok(())
    }

    /// Whether the document may hold an update the store refused, not yet undone.
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// Takes the document's state vector into [`Board::state_vector`]. On the sequencer,
    /// after a change (its only writer: the read lock waits for no one).
    fn refresh_state_vector(&self) {
        let sv = self.doc().transact().state_vector();
        *sync::lock(&self.state_vector) = sv;
    }

    /// Whether `update` changes nothing at all (no struct, no deletion): what a read-only
    /// client sends in answer to sync step 1. Checked by the guard, never decoded by yrs.
    pub fn is_empty_update(&self, update: &[u8]) -> Result<bool, GuardError> {
        Ok(self
            .nesting()
            .check(update, self.options.limits.max_nesting)?
            .is_empty)
    }

    /// Appends `run` to the store's log as one entry (flushing after it in sync
    /// durability), before any relay. Runs on the sequencer, after what the batch held
    /// (`store_held`); `log_order` keeps seqs in the order of the log.
    fn append(&self, run: &[&[u8]]) -> Result<(), StoreError> {
        {
            let _in_order = sync::lock(&self.log_order);
            let next = self.log_seq.load(Ordering::Acquire) + 1;
            let seq = self.store.append_updates(&self.session, next, run)?;
            // A shared log's seqs interleave other nodes' entries this document may not
            // have yet: how far it goes is the stream reader's business (`apply_remote`).
            if !self.options.shared_log {
                self.log_seq.store(seq, Ordering::Release);
            }
            // Everything applied is stored now, but held-back updates (stored, not
            // applied) and an update being held back (stored, not applied either).
            *sync::lock(&self.stored_sv) = sync::lock(&self.state_vector).clone();
        }
        if self.options.flush_before_relay {
            self.store.flush()?;
        }
        self.metrics.log_appends.inc();
        self.metrics.log_appended_updates.inc_by(run.len() as u64);
        let bytes: usize = run.iter().map(|u| u.len()).sum();
        self.updates_since_snapshot
            .fetch_add(run.len() as u64, Ordering::AcqRel);
        self.log_bytes_since_snapshot
            .fetch_add(bytes as u64, Ordering::AcqRel);
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// A restore's change set (see [`Whiteboard::restore`]): made from stored version
    /// `version`, applied, logged and relayed. Runs on the sequencer.
    fn sequence_restore(&self, version: u64) -> Result<(), RestoreFailure> {
        self.ensure_fresh()?;
        self.store_held()?;
        let state = self
            .store
            .get_snapshot(&self.session, version)?
            .ok_or(RestoreFailure::NoSuchVersion(version))?;
        {
            // A stored version passes the same guard as a client's update (as a stored
            // record: what the store took is not refused now).
            NestingIndex::default().check_stored(&state, self.options.limits.max_nesting)?;
            let restored = crate::doc::restore::restore_into(&self.doc(), &state);
            let update = match restored {
                Ok(update) => update,
                Err(e) => {
                    self.roll_back(ApplyError::Rejected(e.to_string()));
                    return Err(e.into());
                }
            };
            let checked = self
                .nesting()
                .check_stored(&update, self.options.limits.max_nesting);
            if let Err(e) = self.append(&[&update]) {
                self.roll_back(ApplyError::Rejected(e.to_string()));
                return Err(e.into());
            }
            if let Ok(checked) = checked {
                self.nesting().commit(checked);
            }
            self.refresh_state_vector();
            // Counted before the fan-out, as on the update path: a joiner that registers
            // after the fan-out must not be served a step 2 cached before the restore.
            self.changes.send_modify(|n| *n += 1);
            self.relay(Message::Binary(wire::update(update)), None, None);
        }
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::ws::outbox::outbox;
    use std::time::Duration;
    use yrs::Text;

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            if Instant::now() > deadline {
                eprintln!("timed out waiting for {what}");
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    /// A whiteboard on a memory store with the default options.
    fn board() -> Whiteboard {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(20));
        Whiteboard::load(
            "s".into(),
            store,
            Arc::new(Metrics::new()),
            WhiteboardOptions::default(),
        )
        .unwrap()
    }

    /// The text "t" of a document made of `updates`.
    fn text_of<'a>(updates: impl IntoIterator<Item = &'a [u8]>) -> String {
        let replica = Doc::new();
        for update in updates {
            replica
                .transact_mut()
                .apply_update(Update::decode_v1(update).unwrap())
                .unwrap();
        }
        let t = replica.get_or_insert_text("t");
        let txn = replica.transact();
        yrs::GetString::get_string(&t, &txn)
    }

    /// Queues one update per origin (each typing one more "x" into "t") behind a held
    /// sequencer, in that order, then lets them run and waits until every one is in and
    /// relayed.
    fn queued_behind_a_hold(wb: &Whiteboard, origins: impl IntoIterator<Item = Option<ConnId>>) {
        let release = wb.hold_sequencer();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let doc = Doc::with_client_id(9);
        let text = doc.get_or_insert_text("t");
        let mut submitted = Vec::new();
        for origin in origins {
            let update = {
                let mut txn = doc.transact_mut();
                text.push(&mut txn, "x");
                txn.encode_update_v1()
            };
            let mut job = Box::pin(wb.submit_update(origin, update.into(), None));
            // Polled once: queued now, in this order.
            assert!(job.as_mut().poll(&mut cx).is_pending());
            submitted.push(job);
        }
        drop(release);
        for job in submitted {
            assert!(sequencer::block_on(job).unwrap());
        }
        wb.settle();
    }

    /// Updates queued behind one another (relayed as one batch by the last of them) reach
    /// every connection in their order, none its own sender.
    #[test]
    fn updates_queued_together_are_relayed_together_in_order() {
        let wb = board();
        let (a, mut a_rx) = outbox(1 << 20);
        let (b, mut b_rx) = outbox(1 << 20);
        wb.join(1, a);
        wb.join(2, b);
        let greeting = |rx: &mut crate::ws::outbox::OutboxReceiver| {
            std::iter::from_fn(|| rx.try_recv()).count()
        };
        assert_eq!((greeting(&mut a_rx), greeting(&mut b_rx)), (1, 1));
        // Holds the lane, so the three updates queue behind it.
        queued_behind_a_hold(&wb, [Some(1), Some(2), None]);
        let relayed = |rx: &mut crate::ws::outbox::OutboxReceiver| {
            std::iter::from_fn(|| rx.try_recv())
                .map(|m| match m {
                    Message::Binary(b) => b.to_vec(),
                    other => panic!("{other:?}"),
                })
                .collect::<Vec<_>>()
        };
        let (to_a, to_b) = (relayed(&mut a_rx), relayed(&mut b_rx));
        assert_eq!((to_a.len(), to_b.len()), (2, 2), "none back to its sender");
        // The API's update (third) reaches both, after the other's.
        assert_eq!(to_a[1], to_b[1]);
        let updates: Vec<Vec<u8>> = to_a
            .iter()
            .chain(&to_b)
            .map(|frame| match yrs::sync::Message::decode_v1(frame) {
                Ok(yrs::sync::Message::Sync(yrs::sync::SyncMessage::Update(bytes))) => bytes,
                other => panic!("not an update: {other:?}"),
            })
            .collect();
        assert_eq!(text_of(updates.iter().map(Vec::as_slice)), "xxx");
        // Counted as relayed in batches (one, unless the 1 ms hold ran out between jobs).
        assert_eq!(wb.metrics.relay_batch_messages.get(), 3);
        assert!((1..=3).contains(&wb.metrics.relay_batches.get()));
    }

    /// A run of queued updates longer than `RELAY_BATCH` is relayed in batches of at most
    /// that many: the first relays of a long run do not wait for its end.
    #[test]
    fn a_long_run_of_queued_updates_is_relayed_in_bounded_batches() {
        let wb = board();
        let (peer, mut rx) = outbox(1 << 20);
        wb.join(1, peer);
        let greeting = std::iter::from_fn(|| rx.try_recv()).count();
        let runs = 2 * RELAY_BATCH + 1;
        queued_behind_a_hold(&wb, std::iter::repeat_n(None, runs));
        assert_eq!(greeting, 1);
        assert_eq!(std::iter::from_fn(|| rx.try_recv()).count(), runs);
        assert_eq!(wb.metrics.relay_batch_messages.get(), runs as u64);
        // At most RELAY_BATCH each: three batches at least (more if the 1 ms hold ran out).
        assert!(wb.metrics.relay_batches.get() >= 3);
    }

    /// A board with one peer (connection 1, its greeting taken off its queue) and an
    /// update that types "x".
    fn joined_with_an_update() -> (Whiteboard, crate::ws::outbox::OutboxReceiver, Vec<u8>) {
        let wb = board();
        let (peer, mut rx) = outbox(1 << 20);
        wb.join(1, peer);
        assert_eq!(
            std::iter::from_fn(|| rx.try_recv()).count(),
            1,
            "the greeting"
        );
        let doc = Doc::with_client_id(9);
        let text = doc.get_or_insert_text("t");
        let update = {
            let mut txn = doc.transact_mut();
            text.push(&mut txn, "x");
            txn.encode_update_v1()
        };
        (wb, rx, update)
    }

    /// A batch with jobs queued behind it is held for more, but its first update waits at
    /// most `RELAY_HOLD` (1 ms): then it ends, stored and relayed, however many are queued.
    #[test]
    fn a_batch_holds_its_first_update_at_most_one_millisecond() {
        let (wb, mut rx, update) = joined_with_an_update();
        // What a job does on the sequencer, which then asks `end_batch`. The batch's clock
        // starts between `before` and `after`.
        let before = Instant::now();
        let applied = wb.sequence_update(Some(2), &Bytes::from(update), None, before);
        let after = Instant::now();
        assert!(matches!(applied, Ok(true)), "{applied:?}");
        // Not the last job, one update held, within the hold: the batch waits for more.
        if before.elapsed() < RELAY_HOLD {
            assert!(wb.end_batch(false).is_none(), "held for the next job");
            assert!(rx.try_recv().is_none(), "nothing relayed while held");
        }
        // Once the first update has waited RELAY_HOLD, the next job's end ends the batch.
        while after.elapsed() < RELAY_HOLD {
            std::thread::yield_now();
        }
        let released = wb.end_batch(false).expect("ended after RELAY_HOLD");
        wb.release(released);
        assert!(rx.try_recv().is_some(), "relayed");
        let stored = wb.store.load_whiteboard("s").unwrap();
        assert_eq!(text_of(stored.updates.iter().map(Vec::as_slice)), "x");
    }

    /// A job that panics (a bug) still ends the batch it closes: the reader's update queued
    /// before it is stored, answered and relayed, so an idle session holds nothing unstored.
    #[test]
    fn a_job_that_panics_still_ends_its_batch() {
        let (wb, mut rx, update) = joined_with_an_update();
        let release = wb.hold_sequencer();
        let outcome = match wb.queue_update(2, &Arc::default(), update.into(), None) {
            Submitted::Queued(o) | Submitted::Waiting(o) => o,
        };
        let mut panics = Box::pin(wb.sequencer.run(|_| panic!("a bug in a job")));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            panics.as_mut().poll(&mut cx).is_pending(),
            "queued behind the update"
        );
        drop(release);
        // Polled until ready or 5 s: without the batch ending, the answer would never come.
        let mut outcome = outcome;
        let deadline = Instant::now() + Duration::from_secs(5);
        let answer = loop {
            if let std::task::Poll::Ready(answer) = outcome.as_mut().poll(&mut cx) {
                break answer;
            }
            assert!(Instant::now() < deadline, "the update was never answered");
            std::thread::yield_now();
        };
        assert!(matches!(answer, Ok(true)), "{answer:?}");
        assert!(
            sequencer::block_on(panics).is_err(),
            "the job's own reply is dropped"
        );
        assert!(wait_until("the relay", || rx.try_recv().is_some()));
        let stored = wb.store.load_whiteboard("s").unwrap();
        assert_eq!(text_of(stored.updates.iter().map(Vec::as_slice)), "x");
    }

    /// A connection's updates queued behind one that is refused are not applied: the
    /// reader that keeps several in flight acts as if it had awaited each outcome.
    #[test]
    fn updates_queued_after_a_refused_one_are_not_applied() {
        let wb = board();
        let doc = Doc::with_client_id(9);
        let text = doc.get_or_insert_text("t");
        let typed = |at: u32| {
            let mut txn = doc.transact_mut();
            text.insert(&mut txn, at, "x");
            txn.encode_update_v1()
        };
        let (first, second) = (typed(0), typed(1));
        let refused = Arc::default();
        let queue = |update: Vec<u8>| match wb.queue_update(1, &refused, update.into(), None) {
            Submitted::Queued(outcome) | Submitted::Waiting(outcome) => outcome,
        };
        let outcomes = [queue(first), queue(vec![0xff, 0xff, 0xff]), queue(second)];
        let [first, garbage, second] = outcomes.map(sequencer::block_on);
        assert!(matches!(first, Ok(true)));
        assert!(garbage.is_err());
        assert!(matches!(second, Err(ApplyError::Rejected(_))), "{second:?}");
        assert_eq!(text_of([wb.encode_state().as_slice()]), "x");
    }

    /// The update-count trigger waits for the log to be as large as the last snapshot and
    /// for ten times the last snapshot's duration to pass since it, at most five seconds.
    #[test]
    fn a_snapshot_is_wanted_after_the_log_grew_and_ten_snapshot_durations_passed() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(20));
        let options = WhiteboardOptions {
            snapshot_every_updates: 1,
            ..WhiteboardOptions::default()
        };
        let wb = Whiteboard::load("s".into(), store, Arc::new(Metrics::new()), options).unwrap();
        let doc = Doc::with_client_id(9);
        let text = doc.get_or_insert_text("t");
        let type_some = |what: &str| {
            let update = {
                let mut txn = doc.transact_mut();
                text.push(&mut txn, what);
                txn.encode_update_v1()
            };
            assert!(wb.apply_update(None, &update, None).unwrap());
        };
        assert!(!wb.snapshot_wanted(), "nothing logged yet");
        type_some("x");
        assert!(wb.snapshot_wanted(), "no snapshot yet: nothing to wait for");
        assert!(wb.snapshot_if_dirty().unwrap().is_some());
        let snapshot = wb.snapshot_bytes.load(Ordering::Acquire) as usize;
        type_some("y");
        assert!(
            !wb.snapshot_wanted(),
            "the log is smaller than the snapshot"
        );
        type_some(&"z".repeat(snapshot));
        // As if the last snapshot had taken no time (it took some, and this runs at once).
        sync::lock(&wb.last_snapshot).took = std::time::Duration::ZERO;
        assert!(wb.snapshot_wanted());
        let last_snapshot = |took_ms: u64, ago_ms: u64| {
            *sync::lock(&wb.last_snapshot) = LastSnapshot {
                at: Instant::now() - std::time::Duration::from_millis(ago_ms),
                took: std::time::Duration::from_millis(took_ms),
            };
        };
        last_snapshot(100, 500);
        assert!(!wb.snapshot_wanted(), "took 0.1 s, 0.5 s ago");
        last_snapshot(100, 1100);
        assert!(wb.snapshot_wanted(), "took 0.1 s, 1.1 s ago");
        last_snapshot(2000, 4000);
        assert!(!wb.snapshot_wanted(), "took 2 s, 4 s ago");
        last_snapshot(2000, 5100);
        assert!(
            wb.snapshot_wanted(),
            "took 2 s, 5.1 s ago: never more than 5 s"
        );
    }

    /// A join (run on an async worker) must not take the document's lock: while a large
    /// step 2 encode holds the read lock on the blocking pool, the sequencer's write waits
    /// for it, and yrs's lock then makes every new reader wait too. `join` (and a long
    /// poll's `is_ahead_of`) used to be such a reader, parking a worker with the peer lock
    /// held for the length of the encode.
    #[test]
    fn join_and_long_poll_check_do_not_wait_behind_a_writer_queued_behind_an_encode() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(20));
        let options = WhiteboardOptions::default();
        let wb = Arc::new(
            Whiteboard::load("s".into(), store, Arc::new(Metrics::new()), options).unwrap(),
        );
        let typed = |text: &str| {
            let doc = Doc::with_client_id(5);
            let t = doc.get_or_insert_text("t");
            let mut txn = doc.transact_mut();
            t.insert(&mut txn, 0, text);
            txn.encode_update_v1()
        };
        assert!(wb.apply_update(None, &typed("x"), None).unwrap());
        let sv_after_first = wb.doc().transact().state_vector();

        let doc = wb.doc();
        // Stands for a step 2 encode holding the read lock on the blocking pool.
        let encode = doc.transact();
        let second = typed("xy");
        let writer = {
            let wb = wb.clone();
            std::thread::spawn(move || wb.apply_update(None, &second, None))
        };
        // The sequencer now waits for the write lock: a new reader is refused.
        assert!(wait_until("the sequencer to queue its write", || doc
            .try_transact()
            .is_err()));
        let joiner = {
            let wb = wb.clone();
            std::thread::spawn(move || {
                let (peer, mut rx) = outbox(1 << 20);
                wb.join(1, peer);
                let ahead = wb.is_ahead_of(&StateVector::default());
                (rx.try_recv().is_some(), ahead)
            })
        };
        let finished = wait_until("the join", || joiner.is_finished());
        drop(encode);
        let (greeted, ahead) = joiner.join().unwrap();
        assert!(writer.join().unwrap().unwrap());
        assert!(finished, "join waited for the document's lock");
        assert!(greeted && ahead);
        // The state vector the sequencer keeps follows the document.
        let sv = sync::lock(&wb.state_vector).clone();
        assert_eq!(sv, wb.doc().transact().state_vector());
        assert_ne!(sv, sv_after_first);
    }
}
