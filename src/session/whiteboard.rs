//! A session's whiteboard: one `yrs` document and its awareness, and the fan-out to every
//! connection of the session.
//!
//! This is the only place a session's document is changed. Every change, whoever sends it
//! (a WebSocket client, the HTTP API, later another node), goes through
//! [`Whiteboard::apply_update`]: decode, apply in one short transaction, append to the
//! store's log, then push the same encoded bytes to every peer's outbox. The peer list's
//! lock is held across apply and fan-out so that a peer that joins sees every update either
//! in its sync step 2 or in its queue, never neither. No lock here is held across an
//! `.await`; nothing here touches a socket.
//!
//! Snapshots stay off that path. The relay only counts what it logged; housekeeping asks
//! [`Whiteboard::snapshot_wanted`] and, while clients are connected, builds the state on
//! its own thread from the store (a fresh document: the live one is not locked). The store
//! deletes just the log entries that state includes (by seq), so updates logged meanwhile
//! are kept and nothing needs the peer lock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use axum::extract::ws::Message;
use bytes::Bytes;
use yrs::sync::{Awareness, AwarenessUpdate};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, ReadTxn, StateVector, Transact, Update};

use crate::config::LimitsConfig;
use crate::doc::guard::{self, CheckedUpdate, GuardError, NestingIndex};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol::wire;
use crate::store::{Store, StoreError};
use yrs::sync::awareness::AwarenessUpdateEntry;

/// Identifies one connection within the server.
pub type ConnId = u64;

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
    /// Flush the store before relaying (`persist.durability = "sync"`).
    pub flush_before_relay: bool,
    /// Snapshot after this many logged updates (`persist.snapshot_every_updates`), once
    /// the log has also grown to the last snapshot's size (see [`Whiteboard::log_update`]).
    pub snapshot_every_updates: u64,
    /// The bounds of SPEC.md 7.1 a whiteboard enforces (nesting, document size, pending
    /// bytes, awareness), as configured.
    pub limits: LimitsConfig,
}

pub struct Whiteboard {
    session: Arc<str>,
    /// The live document. Replaced (under the peer lock) only when an update that began to
    /// integrate must be undone: it is rebuilt from the store, which never held that update.
    doc: RwLock<Doc>,
    /// What the update guard knows of the document's nesting; changed under the peer lock.
    nesting: Mutex<NestingIndex>,
    /// Updates that depend on content the document does not have yet, oldest first: held
    /// here rather than left pending in yrs (see [`CheckedUpdate::waits`]). Changed under
    /// the peer lock.
    held_back: Mutex<Vec<HeldBack>>,
    /// The document's encoded size when last measured, with the log bytes counted then
    /// (see [`Whiteboard::fits`]).
    measured_size: Mutex<Option<(u64, u64)>>,
    /// Locked after `peers` when both are needed.
    awareness: Mutex<Awareness>,
    peers: Mutex<HashMap<ConnId, Outbox>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    options: WhiteboardOptions,
    /// The seq of the last log entry written; only grows, under the peer lock.
    log_seq: AtomicU64,
    /// Updates and bytes logged since the last snapshot.
    updates_since_snapshot: AtomicU64,
    log_bytes_since_snapshot: AtomicU64,
    /// Size of the last snapshot's state.
    snapshot_bytes: AtomicU64,
    /// One snapshot at a time: two racing could store an older state as the newer version.
    snapshotting: Mutex<()>,
    dirty: AtomicBool,
    last_snapshot: Mutex<Instant>,
    /// Counts changes, for long polls waiting on the document.
    changes: tokio::sync::watch::Sender<u64>,
    /// The sync step 2 for an empty state vector (a joiner with a fresh document), with the
    /// change count it was encoded at: a join storm encodes a large board once, not per joiner.
    full_step2: Mutex<Option<(u64, Bytes)>>,
}

impl Default for WhiteboardOptions {
    /// SPEC.md's defaults, as a session with no configuration gets them.
    fn default() -> Self {
        Self {
            echo_updates: false,
            flush_before_relay: false,
            snapshot_every_updates: 500,
            limits: LimitsConfig::default(),
        }
    }
}

/// The most updates a session holds back at once (besides `limits.max_pending_bytes`).
const MAX_HELD_BACK: usize = 256;

/// An update held back until the content it depends on arrives.
struct HeldBack {
    update: Vec<u8>,
    /// Clients of whom it waits for content.
    waits_on: Vec<u64>,
}

impl Whiteboard {
    /// Rebuilds the session's document from the store.
    pub fn load(
        session: Arc<str>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        options: WhiteboardOptions,
    ) -> Result<Self, StoreError> {
        let stored = store.load_whiteboard(&session)?;
        let has_snapshot = stored.snapshot_version > 0 && !stored.updates.is_empty();
        let (snapshot, log) = stored.updates.split_at(usize::from(has_snapshot));
        let snapshot_bytes = snapshot.first().map_or(0, |s| s.len() as u64);
        let log_len = log.len() as u64;
        let log_bytes = log.iter().map(|u| u.len() as u64).sum();
        let rebuilt = doc_from_updates(&session, &stored.updates, &metrics, &options.limits);
        Ok(Self {
            session,
            awareness: Mutex::new(Awareness::new(rebuilt.doc.clone())),
            doc: RwLock::new(rebuilt.doc),
            nesting: Mutex::new(rebuilt.nesting),
            held_back: Mutex::new(rebuilt.held_back),
            measured_size: Mutex::new(None),
            peers: Mutex::new(HashMap::new()),
            store,
            metrics,
            options,
            log_seq: AtomicU64::new(stored.last_log_seq),
            // A log left after the snapshot (a crash, a kill) is folded into the next one.
            updates_since_snapshot: AtomicU64::new(log_len),
            log_bytes_since_snapshot: AtomicU64::new(log_bytes),
            snapshot_bytes: AtomicU64::new(snapshot_bytes),
            snapshotting: Mutex::new(()),
            dirty: AtomicBool::new(log_len > 0),
            last_snapshot: Mutex::new(Instant::now()),
            changes: tokio::sync::watch::Sender::new(0),
            full_step2: Mutex::new(None),
        })
    }

    /// The live document (a handle: cloning it is cheap).
    fn doc(&self) -> Doc {
        self.doc.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn nesting(&self) -> MutexGuard<'_, NestingIndex> {
        self.nesting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn awareness(&self) -> MutexGuard<'_, Awareness> {
        self.awareness.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn peers(&self) -> MutexGuard<'_, HashMap<ConnId, Outbox>> {
        // Nothing panics while holding this lock; recover the map if something ever did.
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection and queues its greeting: sync step 1 with the server's state
    /// vector, then every awareness state if there are any.
    pub fn join(&self, conn: ConnId, outbox: Outbox) {
        let mut peers = self.peers();
        let sv = self.doc().transact().state_vector();
        outbox.send(Message::Binary(wire::sync_step1(sv)));
        if let Some(states) = self.awareness_states() {
            outbox.send(Message::Binary(states));
        }
        peers.insert(conn, outbox);
    }

    /// Unregisters a connection and removes the awareness clients it announced, relaying
    /// the removal to the others with each client's own last clock (as y-protocols'
    /// `removeAwarenessStates` does): a bumped clock would hide the same client, when it
    /// reconnects with its old clock, until its state's clock passed the bumped one.
    pub fn leave(&self, conn: ConnId, awareness_clients: &HashSet<ClientID>) {
        let peers = {
            let mut peers = self.peers();
            peers.remove(&conn);
            if awareness_clients.is_empty() {
                return;
            }
            peers
        };
        let removal = {
            let mut awareness = self.awareness();
            let clients: HashMap<ClientID, AwarenessUpdateEntry> = awareness_clients
                .iter()
                .filter_map(|id| {
                    let (clock, _) = awareness.meta(*id)?;
                    let entry = AwarenessUpdateEntry {
                        clock,
                        json: Arc::from("null"),
                    };
                    Some((*id, entry))
                })
                .collect();
            if clients.is_empty() {
                return;
            }
            let removal = AwarenessUpdate { clients };
            // Same clock, null state: y-protocols and yrs both remove the state.
            if let Err(e) = awareness.apply_update(removal.clone()) {
                tracing::debug!(session = %self.session, error = %e, "awareness removal not applied");
            }
            removal
        };
        let frame = wire::awareness(removal);
        for outbox in peers.values() {
            outbox.send(Message::Binary(frame.clone()));
        }
    }

    /// Sync step 2 for a peer whose state vector is `sv`.
    pub fn sync_step2(&self, sv: &StateVector) -> Bytes {
        if !sv.is_empty() {
            return wire::sync_step2(self.doc().transact().encode_state_as_update_v1(sv));
        }
        // Read the count before encoding: the cached bytes then hold at least what that
        // count says, and any later change bumps the count and is relayed to the joiner.
        let version = *self.changes.borrow();
        let mut cache = self.full_step2.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, bytes)) = cache.as_ref() {
            if *cached == version {
                return bytes.clone();
            }
        }
        let bytes = wire::sync_step2(self.doc().transact().encode_state_as_update_v1(sv));
        *cache = Some((version, bytes.clone()));
        bytes
    }

    /// Follows the document's changes (for long polls).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether the document holds anything a peer at state vector `sv` lacks (deletions
    /// aside: they do not advance a state vector).
    pub fn is_ahead_of(&self, sv: &StateVector) -> bool {
        let current = self.doc().transact().state_vector();
        current
            .iter()
            .any(|(client, clock)| *clock > sv.get(client))
    }

    /// What a peer at state vector `sv` is missing, as one Yjs v1 update.
    pub fn diff(&self, sv: &StateVector) -> Vec<u8> {
        self.doc().transact().encode_state_as_update_v1(sv)
    }

    /// The whole document as one Yjs v1 update.
    pub fn encode_state(&self) -> Vec<u8> {
        self.doc()
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// An awareness message with every known state, or `None` when there are none.
    pub fn awareness_states(&self) -> Option<Bytes> {
        let update = self.awareness().update().ok()?;
        (!update.clients.is_empty()).then(|| wire::awareness(update))
    }

    /// Applies a Yjs v1 update from `origin` (`None`: not a connection of this node).
    ///
    /// `message`, when given, is the update already encoded as a sync-update message (the
    /// bytes the client sent): it is relayed as is. Returns whether the document changed.
    pub fn apply_update(
        &self,
        origin: Option<ConnId>,
        update: &[u8],
        message: Option<Bytes>,
    ) -> Result<bool, ApplyError> {
        let started = Instant::now();
        let peers = self.peers();
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
            self.hold_back(update, checked.waits_on)?;
            return Ok(false);
        }
        // Almost always nothing is held back: then the relay path pays nothing for it.
        let clients = (!self.held_back().is_empty()).then(|| checked.clients());
        let changed = self.integrate(&peers, origin, update, message, checked, true)?;
        if changed {
            if let Some(clients) = clients {
                self.retry_held_back(&peers, clients);
            }
            self.metrics
                .relay_latency
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(changed)
    }

    /// Integrates a checked update that waits for nothing, logs it (unless it was logged
    /// when it was held back) and relays it. Called with the peer lock held (`peers`).
    fn integrate(
        &self,
        peers: &HashMap<ConnId, Outbox>,
        origin: Option<ConnId>,
        update: &[u8],
        message: Option<Bytes>,
        checked: CheckedUpdate,
        log: bool,
    ) -> Result<bool, ApplyError> {
        let limits = self.options.limits;
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
                Ok(Ok(())) => Ok(txn.has_changes() || txn.before_state() != &txn.state_vector()),
                Ok(Err(e)) => Err(ApplyError::Rejected(e.to_string())),
                Err(_) => Err(ApplyError::Rejected("integration panicked".into())),
            }
        };
        let changed = match integrated {
            Ok(changed) => changed,
            Err(e) => return Err(self.roll_back(e)),
        };
        if !changed {
            return Ok(false);
        }
        if log {
            if let Err(e) = self.log_update(update) {
                return Err(self.roll_back(e.into()));
            }
        }
        self.nesting().commit(checked);
        self.metrics.updates_applied.inc();
        self.changes.send_modify(|n| *n += 1);
        // What the client sent is exactly what the others need.
        let frame = message.unwrap_or_else(|| wire::update(update.to_vec()));
        for (id, outbox) in peers.iter() {
            if Some(*id) != origin || self.options.echo_updates {
                outbox.send(Message::Binary(frame.clone()));
            }
        }
        Ok(true)
    }

    /// Holds back an update that depends on content the document does not have yet
    /// (SPEC.md 7.1: bounded by `limits.max_pending_bytes` per session, and logged like any
    /// other so a restart has it). Called with the peer lock held.
    fn hold_back(&self, update: &[u8], waits_on: Vec<u64>) -> Result<(), ApplyError> {
        let limit = self.options.limits.max_pending_bytes;
        let mut held = self.held_back();
        // A client that reconnects sends what it has again: the same bytes are held once.
        if held.iter().any(|h| h.update == update) {
            return Ok(());
        }
        let bytes: usize = held.iter().map(|h| h.update.len()).sum::<usize>() + update.len();
        // Counted too: every update let in re-checks the ones waiting on its client, so a
        // flood of tiny held-back updates would cost quadratic time under the peer lock.
        if bytes > limit || held.len() >= MAX_HELD_BACK {
            self.metrics.guard_refusals.pending.inc();
            return Err(ApplyError::Guard(GuardError::TooLarge {
                what: "updates waiting for missing blocks",
                limit,
            }));
        }
        self.log_update(update)?;
        held.push(HeldBack {
            update: update.to_vec(),
            waits_on,
        });
        Ok(())
    }

    /// Lets in the held-back updates that an update by `clients` (just integrated) may have
    /// completed, and those they complete in turn. Only updates waiting on one of those
    /// clients (or on a client a let-in update carries) are checked again, so a full hold-back costs
    /// nothing to the updates that cannot help it. Called with the peer lock held.
    fn retry_held_back(&self, peers: &HashMap<ConnId, Outbox>, mut clients: Vec<u64>) {
        while !clients.is_empty() {
            let ready: Vec<HeldBack> = {
                let mut held = self.held_back();
                let (ready, waiting) = std::mem::take(&mut *held)
                    .into_iter()
                    .partition(|h| h.waits_on.iter().any(|c| clients.contains(c)));
                *held = waiting;
                ready
            };
            clients.clear();
            for h in ready {
                let checked = self
                    .nesting()
                    .check(&h.update, self.options.limits.max_nesting);
                match checked {
                    Ok(checked) if checked.waits => self.held_back().push(HeldBack {
                        update: h.update,
                        waits_on: checked.waits_on,
                    }),
                    Ok(checked) => {
                        let carries = checked.clients();
                        match self.integrate(peers, None, &h.update, None, checked, false) {
                            Ok(_) => clients.extend(carries),
                            Err(e) => {
                                tracing::warn!(session = %self.session, error = %e, "a held-back update was refused once it could be applied");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(session = %self.session, error = %e, "a held-back update was refused once it could be applied");
                    }
                }
            }
        }
    }

    fn held_back(&self) -> MutexGuard<'_, Vec<HeldBack>> {
        self.held_back.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the document, grown by an update of `added` bytes, stays within
    /// `limits.max_doc_bytes`. The document's size is bounded from above by its last known
    /// size (the last snapshot's, or the last measurement's) plus the bytes logged since;
    /// only when that bound passes the limit is the document encoded to measure it, and the
    /// measurement becomes the new base. A board near the limit is measured once per
    /// limit-minus-size of logged bytes, not per update.
    fn fits(&self, doc: &Doc, added: usize) -> bool {
        let limit = self.options.limits.max_doc_bytes as u64;
        let logged = self.log_bytes_since_snapshot.load(Ordering::Acquire);
        let mut measured = self.measured_size.lock().unwrap_or_else(|e| e.into_inner());
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
    /// which holds every update that was accepted and never the refused one. Called with
    /// the peer lock held, so no update slips in between; nothing was relayed. Returns
    /// `why`, for the caller to hand on.
    fn roll_back(&self, why: ApplyError) -> ApplyError {
        self.metrics.updates_rolled_back.inc();
        match self.store.load_whiteboard(&self.session) {
            Ok(stored) => {
                let rebuilt = doc_from_updates(
                    &self.session,
                    &stored.updates,
                    &self.metrics,
                    &self.options.limits,
                );
                *self.doc.write().unwrap_or_else(|e| e.into_inner()) = rebuilt.doc;
                *self.nesting() = rebuilt.nesting;
                *self.held_back() = rebuilt.held_back;
                // A joiner may have been served the refused update meanwhile (step 2 does
                // not take the peer lock): the cached step 2 goes, and long polls wake.
                *self.full_step2.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.changes.send_modify(|n| *n += 1);
                tracing::warn!(session = %self.session, error = %why, "update refused after it began to integrate; document rebuilt from the store");
            }
            Err(e) => {
                tracing::error!(session = %self.session, error = %why, store_error = %e, "update refused after it began to integrate, and the store cannot be read to undo it");
            }
        }
        why
    }

    /// Whether `update` changes nothing at all (no struct, no deletion): what a read-only
    /// client sends in answer to sync step 1. Checked by the guard, never decoded by yrs.
    pub fn is_empty_update(&self, update: &[u8]) -> Result<bool, GuardError> {
        Ok(self
            .nesting()
            .check(update, self.options.limits.max_nesting)?
            .is_empty)
    }

    /// Appends to the store's log (flushing first in sync durability), before any relay.
    /// Every caller holds the peer lock, which keeps seqs in the order of the log.
    fn log_update(&self, update: &[u8]) -> Result<(), StoreError> {
        let seq = self.log_seq.load(Ordering::Acquire) + 1;
        self.store.append_update(&self.session, seq, update)?;
        self.log_seq.store(seq, Ordering::Release);
        if self.options.flush_before_relay {
            self.store.flush()?;
        }
        self.updates_since_snapshot.fetch_add(1, Ordering::AcqRel);
        self.log_bytes_since_snapshot
            .fetch_add(update.len() as u64, Ordering::AcqRel);
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Appends held-back updates to the log again (without counting them as a change: a
    /// snapshot does this, and must not make itself due again).
    fn relog_held_back(&self, held: &[Vec<u8>]) -> Result<(), StoreError> {
        let _peers = self.peers();
        for update in held {
            let seq = self.log_seq.load(Ordering::Acquire) + 1;
            self.store.append_update(&self.session, seq, update)?;
            self.log_seq.store(seq, Ordering::Release);
        }
        Ok(())
    }

    /// Whether the log since the last snapshot is long enough to fold into a new one:
    /// `snapshot_every_updates` entries, and as many bytes as the last snapshot. A snapshot
    /// builds the whole document: taking one every N updates of a 20 MB board would spend
    /// the server's CPU on it. The size rule keeps that cost proportional to the bytes
    /// logged (one build per snapshot-size of log), and a restart's replay at most the
    /// snapshot's load again.
    pub fn snapshot_wanted(&self) -> bool {
        self.updates_since_snapshot.load(Ordering::Acquire) >= self.options.snapshot_every_updates
            && self.log_bytes_since_snapshot.load(Ordering::Acquire)
                >= self.snapshot_bytes.load(Ordering::Acquire)
    }

    /// The session's stored state (newest snapshot, then the log) folded into one Yjs v1
    /// update, with its state vector; `None` if that state lacks anything `live_sv` has.
    ///
    /// This is how a snapshot is made without locking the live document: encoding a
    /// document holds its read lock, which every update waits behind (75 ms for a 7 MB
    /// board under load, measured), while a fresh document built from the store is this
    /// thread's alone. It costs about three encodes of CPU instead of one, off the relay
    /// path. Built by integrating, it is garbage-collected like the live document (merging
    /// the updates without a document would keep every erased stroke's content).
    fn compact_stored(&self, live_sv: &StateVector) -> Option<(Vec<u8>, Vec<u8>)> {
        let stored = match self.store.load_whiteboard(&self.session) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(session = %self.session, error = %e, "snapshot: store not readable; encoding the live document");
                return None;
            }
        };
        let rebuilt = doc_from_updates(
            &self.session,
            &stored.updates,
            &self.metrics,
            &self.options.limits,
        );
        let txn = rebuilt.doc.transact();
        let sv = txn.state_vector();
        let complete = rebuilt.skipped == 0
            && live_sv
                .iter()
                .all(|(client, clock)| sv.get(client) >= *clock);
        complete.then(|| {
            (
                txn.encode_state_as_update_v1(&StateVector::default()),
                sv.encode_v1(),
            )
        })
    }

    /// Time since the last snapshot was taken.
    pub fn snapshot_age(&self) -> std::time::Duration {
        self.last_snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Rolls the document back to snapshot `version` as new operations (SPEC.md 5.3):
    /// connected clients receive them like any update and show that version without a
    /// reload. The result is recorded as a new snapshot version, which is returned.
    pub fn restore(&self, version: u64) -> Result<u64, RestoreFailure> {
        let state = self
            .store
            .get_snapshot(&self.session, version)?
            .ok_or(RestoreFailure::NoSuchVersion(version))?;
        {
            let peers = self.peers();
            // A stored version passes the same guard as a client's update.
            NestingIndex::default().check(&state, self.options.limits.max_nesting)?;
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
                .check(&update, self.options.limits.max_nesting);
            if let Err(e) = self.log_update(&update) {
                self.roll_back(ApplyError::Rejected(e.to_string()));
                return Err(e.into());
            }
            if let Ok(checked) = checked {
                self.nesting().commit(checked);
            }
            let frame = Message::Binary(wire::update(update));
            for outbox in peers.values() {
                outbox.send(frame.clone());
            }
            self.changes.send_modify(|n| *n += 1);
        }
        self.dirty.store(true, Ordering::Release);
        let version = self.snapshot_if_dirty()?;
        Ok(version.unwrap_or_default())
    }

    /// Applies an awareness update from a connection and relays the message, unchanged, to
    /// every connection including the sender. Updates `announced` with the client ids the
    /// connection now speaks for.
    ///
    /// An update past the bounds of SPEC.md 7.1 (client ids per connection and per session,
    /// the size and depth of one state) is dropped whole and counted: the message is relayed
    /// as the client sent it, so it is either all applied or not at all. Returns whether it
    /// was applied.
    pub fn apply_awareness(
        &self,
        update: AwarenessUpdate,
        message: Bytes,
        announced: &mut HashSet<ClientID>,
    ) -> bool {
        let limits = self.options.limits;
        let peers = self.peers();
        let mut awareness = self.awareness();
        if let Err(why) = self.awareness_fits(&awareness, &update, announced) {
            drop(awareness);
            drop(peers);
            self.metrics.guard_refusals.awareness.inc();
            tracing::debug!(session = %self.session, why, limit_per_connection = limits.max_awareness_clients_per_connection, "awareness update refused");
            return false;
        }
        let summary = match awareness.apply_update_summary(update) {
            Ok(Some(summary)) => summary,
            Ok(None) => return true,
            Err(e) => {
                tracing::debug!(session = %self.session, error = %e, "awareness update ignored");
                return false;
            }
        };
        drop(awareness);
        // Only the entries that were applied make the connection speak for a client: an
        // entry at a clock the session already holds is ignored by the awareness, and
        // counting its id as announced would let this connection's close remove another
        // connection's live client (tests/hostile_doc.rs,
        // a_connection_cannot_remove_another_connections_awareness_client).
        for id in summary.added.iter().chain(&summary.updated) {
            announced.insert(*id);
        }
        for id in &summary.removed {
            announced.remove(id);
        }
        for outbox in peers.values() {
            outbox.send(Message::Binary(message.clone()));
        }
        true
    }

    /// Checks an awareness update against SPEC.md 7.1's bounds.
    fn awareness_fits(
        &self,
        awareness: &Awareness,
        update: &AwarenessUpdate,
        announced: &HashSet<ClientID>,
    ) -> Result<(), &'static str> {
        let limits = self.options.limits;
        for entry in update.clients.values() {
            if entry.json.len() > limits.max_awareness_state_bytes {
                return Err("a state over its size limit");
            }
            if guard::check_json_depth(entry.json.as_bytes(), limits.max_nesting).is_err() {
                return Err("a state nested too deep");
            }
        }
        // An entry the awareness would ignore (a clock it already holds) announces nothing:
        // y-websocket clients send back every state they apply, the greeting included, so a
        // joiner's echo names every client of the session; it is not a refusal
        // (tests/hostile_doc.rs, a_joiner_sending_back_the_states_it_was_greeted_with_is_not_refused).
        let new_ids = update
            .clients
            .iter()
            .filter(|(id, entry)| {
                !announced.contains(id)
                    && &*entry.json != "null"
                    && awareness
                        .meta(**id)
                        .is_none_or(|(clock, _)| entry.clock > clock)
            })
            .count();
        if new_ids == 0 {
            return Ok(());
        }
        if announced.len() + new_ids > limits.max_awareness_clients_per_connection {
            return Err("more client ids than one connection may announce");
        }
        let fresh = update
            .clients
            .keys()
            .filter(|id| awareness.meta(**id).is_none())
            .count();
        if fresh > 0 && awareness.iter().count() + fresh > limits.max_awareness_clients_per_session
        {
            return Err("more client ids than one session may hold");
        }
        Ok(())
    }

    /// Writes a snapshot now, changed or not (an operator's or a tutor's request).
    pub fn snapshot_now(&self) -> Result<u64, StoreError> {
        self.dirty.store(true, Ordering::Release);
        Ok(self.snapshot_if_dirty()?.unwrap_or_default())
    }

    /// Writes a snapshot if anything changed since the last one. It encodes a whole
    /// document: call it on a blocking thread. While clients are connected the state is
    /// rebuilt from the store, so the live document is not locked (see
    /// [`Self::compact_stored`]); with none (last client gone, unload, shutdown) there is no
    /// relay to stall, and encoding the live document costs a third as much.
    pub fn snapshot_if_dirty(&self) -> Result<Option<u64>, StoreError> {
        let _one_at_a_time = self.snapshotting.lock().unwrap_or_else(|e| e.into_inner());
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(None);
        }
        let started = Instant::now();
        let (live_sv, held, log_through, count, bytes) = {
            // An update is applied before it is logged, and none is applied while this
            // read transaction is open: every log entry up to `log_through` is stored and
            // counted in `live_sv`, except the held-back ones, copied here under their lock
            // (which holding back logs under): the snapshot logs them again below, even if
            // they are let in meanwhile, so its deletions take none of them along.
            let doc = self.doc();
            let txn = doc.transact();
            let held_back = self.held_back();
            (
                txn.state_vector(),
                held_back
                    .iter()
                    .map(|h| h.update.clone())
                    .collect::<Vec<_>>(),
                self.log_seq.load(Ordering::Acquire),
                self.updates_since_snapshot.load(Ordering::Acquire),
                self.log_bytes_since_snapshot.load(Ordering::Acquire),
            )
        };
        let in_use = !self.peers().is_empty();
        let compacted = in_use.then(|| self.compact_stored(&live_sv)).flatten();
        let (state, sv) = match compacted {
            Some(compacted) => compacted,
            None => {
                // No client to hold back, or the store could not give back what the live
                // document holds (a damaged record, an update between apply and log):
                // encode the live document, which holds updates back while it encodes.
                // Every entry up to `log_through` is in it.
                let doc = self.doc();
                let txn = doc.transact();
                (
                    txn.encode_state_as_update_v1(&StateVector::default()),
                    txn.state_vector().encode_v1(),
                )
            }
        };
        let encoded = started.elapsed();
        // Held-back updates are not in the state: log them again past `log_through`, so
        // the entries the snapshot replaces take none of them along.
        if let Err(e) = self.relog_held_back(&held) {
            self.dirty.store(true, Ordering::Release);
            return Err(e);
        }
        let written = self
            .store
            .write_snapshot(&self.session, &state, &sv, count, log_through);
        let version = match written {
            Ok(v) => v,
            Err(e) => {
                self.dirty.store(true, Ordering::Release);
                return Err(e);
            }
        };
        // Subtract, not reset: updates logged while this one was written count on.
        self.updates_since_snapshot
            .fetch_sub(count, Ordering::AcqRel);
        self.log_bytes_since_snapshot
            .fetch_sub(bytes, Ordering::AcqRel);
        self.snapshot_bytes
            .store(state.len() as u64, Ordering::Release);
        *self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.metrics
            .snapshot_duration
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            session = %self.session,
            version,
            bytes = state.len(),
            updates = count,
            encode_ms = encoded.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "snapshot written"
        );
        Ok(Some(version))
    }
}

/// A document rebuilt from stored updates, with what the guard learnt of it.
struct Rebuilt {
    doc: Doc,
    nesting: NestingIndex,
    /// Stored updates that still wait for content the store does not have.
    held_back: Vec<HeldBack>,
    /// Updates skipped because they did not decode, did not pass the guard or were rejected.
    skipped: usize,
}

/// A document from stored updates applied in order, as the live whiteboard applied them:
/// each one passes the update guard first (a record stored before the guard existed can
/// hold a nesting bomb), one that waits for absent content is held back and let in once
/// that content is there, and each one that does not pass, decode or apply is logged,
/// counted and skipped, and the rest still load.
fn doc_from_updates(
    session: &str,
    updates: &[Vec<u8>],
    metrics: &Metrics,
    limits: &LimitsConfig,
) -> Rebuilt {
    let doc = Doc::new();
    let mut nesting = NestingIndex::default();
    let mut skipped = 0;
    let mut held_back: Vec<HeldBack> = Vec::new();
    let mut skip = |why: &str, error: String| {
        skipped += 1;
        metrics.store_decode_errors.inc();
        tracing::warn!(%session, error, "stored update {why}; skipped");
    };
    {
        let mut txn = doc.transact_mut();
        for bytes in updates {
            // This update, then whatever held-back ones it lets in, and so on.
            let mut next = vec![bytes.clone()];
            while let Some(update) = next.pop() {
                let checked = match nesting.check(&update, limits.max_nesting) {
                    Ok(checked) => checked,
                    Err(e) => {
                        skip("is refused by the guard", e.to_string());
                        continue;
                    }
                };
                if checked.waits {
                    held_back.push(HeldBack {
                        update,
                        waits_on: checked.waits_on,
                    });
                    continue;
                }
                let clients = checked.clients();
                let applied = Update::decode_v1(&update)
                    .map_err(|e| ("does not decode", e.to_string()))
                    .and_then(|u| {
                        // yrs panics on some input the guard lets through (an index out of
                        // bounds found by fuzzing): a stored one must not make the session
                        // unloadable.
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            txn.apply_update(u)
                        }))
                        .map_err(|_| ("made yrs panic", String::new()))?
                        .map_err(|e| ("is rejected", e.to_string()))
                    });
                match applied {
                    Ok(()) => {
                        nesting.commit(checked);
                        let (ready, waiting) = std::mem::take(&mut held_back)
                            .into_iter()
                            .partition(|h| h.waits_on.iter().any(|c| clients.contains(c)));
                        held_back = waiting;
                        next.extend(ready.into_iter().map(|h: HeldBack| h.update).rev());
                    }
                    Err((why, error)) => skip(why, error),
                }
            }
        }
    }
    Rebuilt {
        doc,
        nesting,
        held_back,
        skipped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::outbox;
    use crate::store::MemoryStore;
    use yrs::{GetString, Text};

    fn options() -> WhiteboardOptions {
        WhiteboardOptions {
            snapshot_every_updates: u64::MAX,
            ..Default::default()
        }
    }

    /// Three updates of one client typing into text "t", in order.
    fn typed(parts: &[&str]) -> Vec<Vec<u8>> {
        let doc = Doc::with_client_id(77);
        let text = doc.get_or_insert_text("t");
        parts
            .iter()
            .map(|part| {
                let mut txn = doc.transact_mut();
                let len = text.len(&txn);
                text.insert(&mut txn, len, part);
                txn.encode_update_v1()
            })
            .collect()
    }

    fn text_of(state: &[u8]) -> String {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        doc.transact_mut()
            .apply_update(Update::decode_v1(state).unwrap())
            .unwrap();
        let txn = doc.transact();
        text.get_string(&txn)
    }

    #[test]
    fn an_update_with_a_gap_is_held_back_relayed_once_let_in_and_survives_a_snapshot() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(20));
        let metrics = Arc::new(Metrics::new());
        let u = typed(&["a", "b", "c"]);
        let mut options = options();
        options.limits.max_pending_bytes = u[1].len() + u[2].len();
        let wb = Whiteboard::load("s".into(), store.clone(), metrics.clone(), options).unwrap();
        let (peer, mut rx) = outbox(1 << 20);
        wb.join(1, peer);
        while rx.try_recv().is_some() {}

        // The second and third wait for the first: held back, nothing relayed, nothing shown.
        // The same bytes sent again (a reconnecting client) are held once: within a bound
        // that has room for exactly these two.
        assert!(!wb.apply_update(None, &u[2], None).unwrap());
        assert!(!wb.apply_update(None, &u[2], None).unwrap());
        assert!(!wb.apply_update(None, &u[1], None).unwrap());
        assert!(rx.try_recv().is_none());
        assert_eq!(text_of(&wb.encode_state()), "");

        // A snapshot while they wait, then a reload from the store: still held back.
        wb.snapshot_now().unwrap();
        let reloaded = Whiteboard::load("s".into(), store.clone(), metrics, options).unwrap();
        assert_eq!(text_of(&reloaded.encode_state()), "");
        let (peer, mut rx2) = outbox(1 << 20);
        reloaded.join(2, peer);
        while rx2.try_recv().is_some() {}

        // The first arrives: all three are in, and each was relayed.
        assert!(reloaded.apply_update(None, &u[0], None).unwrap());
        assert_eq!(text_of(&reloaded.encode_state()), "abc");
        let relayed = std::iter::from_fn(|| rx2.try_recv()).count();
        assert_eq!(relayed, 3, "the update and the two it let in");
        // And the live whiteboard that held them does the same.
        assert!(wb.apply_update(None, &u[0], None).unwrap());
        assert_eq!(text_of(&wb.encode_state()), "abc");
        assert_eq!(std::iter::from_fn(|| rx.try_recv()).count(), 3);
    }
}

#[cfg(test)]
mod held_back_cap {
    use super::*;
    use crate::store::MemoryStore;
    use yrs::Text;

    /// More than `MAX_HELD_BACK` updates waiting at once are refused (whatever their bytes),
    /// counted as `easel_guard_refusals_total{reason="pending"}`, and the ones held stay.
    #[test]
    fn at_most_max_held_back_updates_wait_at_once() {
        let doc = Doc::with_client_id(78);
        let text = doc.get_or_insert_text("t");
        let updates: Vec<Vec<u8>> = (0..MAX_HELD_BACK + 2)
            .map(|_| {
                let mut txn = doc.transact_mut();
                let len = text.len(&txn);
                text.insert(&mut txn, len, "x");
                txn.encode_update_v1()
            })
            .collect();
        let metrics = Arc::new(Metrics::new());
        let wb = Whiteboard::load(
            "s".into(),
            Arc::new(MemoryStore::new(20)),
            metrics.clone(),
            WhiteboardOptions::default(),
        )
        .unwrap();
        // Every update but the first waits for it.
        for u in &updates[1..=MAX_HELD_BACK] {
            assert!(!wb.apply_update(None, u, None).unwrap());
        }
        let refused = wb.apply_update(None, &updates[MAX_HELD_BACK + 1], None);
        assert!(
            matches!(refused, Err(ApplyError::Guard(GuardError::TooLarge { .. }))),
            "{refused:?}"
        );
        assert_eq!(metrics.guard_refusals.pending.get(), 1);
        // The first lets in every one that was held.
        assert!(wb.apply_update(None, &updates[0], None).unwrap());
        let state = wb.encode_state();
        let check = Doc::new();
        let t = check.get_or_insert_text("t");
        check
            .transact_mut()
            .apply_update(Update::decode_v1(&state).unwrap())
            .unwrap();
        assert_eq!(t.len(&check.transact()) as usize, MAX_HELD_BACK + 1);
    }
}
