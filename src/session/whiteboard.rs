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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::extract::ws::Message;
use bytes::Bytes;
use yrs::sync::{Awareness, AwarenessUpdate};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, ReadTxn, StateVector, Transact, Update};

use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol::wire;
use crate::store::{Store, StoreError};

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
    #[error(transparent)]
    Restore(#[from] super::restore::RestoreError),
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
}

pub struct Whiteboard {
    session: Arc<str>,
    doc: Doc,
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
        let (doc, _) = doc_from_updates(&session, &stored.updates, &metrics);
        Ok(Self {
            session,
            awareness: Mutex::new(Awareness::new(doc.clone())),
            doc,
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
        let sv = self.doc.transact().state_vector();
        outbox.send(Message::Binary(wire::sync_step1(sv)));
        if let Some(states) = self.awareness_states() {
            outbox.send(Message::Binary(states));
        }
        peers.insert(conn, outbox);
    }

    /// Unregisters a connection and removes the awareness clients it announced, relaying
    /// the removal to the others.
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
            for id in awareness_clients {
                awareness.remove_state(*id);
            }
            awareness.update_with_clients(awareness_clients.iter().copied())
        };
        if let Ok(update) = removal {
            let frame = wire::awareness(update);
            for outbox in peers.values() {
                outbox.send(Message::Binary(frame.clone()));
            }
        }
    }

    /// Sync step 2 for a peer whose state vector is `sv`.
    pub fn sync_step2(&self, sv: &StateVector) -> Bytes {
        if !sv.is_empty() {
            return wire::sync_step2(self.doc.transact().encode_state_as_update_v1(sv));
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
        let bytes = wire::sync_step2(self.doc.transact().encode_state_as_update_v1(sv));
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
        let current = self.doc.transact().state_vector();
        current
            .iter()
            .any(|(client, clock)| *clock > sv.get(client))
    }

    /// What a peer at state vector `sv` is missing, as one Yjs v1 update.
    pub fn diff(&self, sv: &StateVector) -> Vec<u8> {
        self.doc.transact().encode_state_as_update_v1(sv)
    }

    /// The whole document as one Yjs v1 update.
    pub fn encode_state(&self) -> Vec<u8> {
        self.doc
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
        let decoded = std::panic::catch_unwind(|| Update::decode_v1(update))
            .map_err(|_| ApplyError::Decode("decoder panicked".into()))?
            .map_err(|e| ApplyError::Decode(e.to_string()))?;
        let peers = self.peers();
        let (frame, log) = {
            let mut txn = self.doc.transact_mut();
            let had_pending = txn.has_missing_updates();
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                txn.apply_update(decoded)
            }));
            match applied {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(ApplyError::Rejected(e.to_string())),
                Err(_) => return Err(ApplyError::Rejected("integration panicked".into())),
            }
            let changed = txn.before_state() != &txn.state_vector() || !txn.delete_set().is_empty();
            let has_pending = txn.has_missing_updates();
            let frame = if !changed {
                None
            } else if !had_pending && !has_pending {
                // Fully integrated: what the client sent is exactly what the others need.
                Some(message.unwrap_or_else(|| wire::update(update.to_vec())))
            } else {
                // Parts of this or an earlier update waited for missing blocks: relay what
                // was actually integrated, so no receiver waits for something it never gets.
                Some(wire::update(txn.encode_update_v1()))
            };
            (frame, changed || has_pending != had_pending)
        };
        if log {
            self.log_update(update)?;
        }
        let Some(frame) = frame else {
            return Ok(false);
        };
        self.metrics.updates_applied.inc();
        self.changes.send_modify(|n| *n += 1);
        for (id, outbox) in peers.iter() {
            if Some(*id) != origin || self.options.echo_updates {
                outbox.send(Message::Binary(frame.clone()));
            }
        }
        drop(peers);
        self.metrics
            .relay_latency
            .observe(started.elapsed().as_secs_f64());
        Ok(true)
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
        let (doc, skipped) = doc_from_updates(&self.session, &stored.updates, &self.metrics);
        let txn = doc.transact();
        let sv = txn.state_vector();
        let complete = skipped == 0
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
            let update = super::restore::restore_into(&self.doc, &state)?;
            self.log_update(&update)?;
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
    pub fn apply_awareness(
        &self,
        update: AwarenessUpdate,
        message: Bytes,
        announced: &mut HashSet<ClientID>,
    ) {
        let ids: Vec<ClientID> = update.clients.keys().copied().collect();
        let peers = self.peers();
        let applied = self.awareness().apply_update_summary(update);
        let summary = match applied {
            Ok(Some(summary)) => summary,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(session = %self.session, error = %e, "awareness update ignored");
                return;
            }
        };
        for id in ids {
            if summary.removed.contains(&id) {
                announced.remove(&id);
            } else {
                announced.insert(id);
            }
        }
        for outbox in peers.values() {
            outbox.send(Message::Binary(message.clone()));
        }
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
        let (live_sv, log_through, count, bytes) = {
            // An update is applied before it is logged, and none is applied while this
            // read transaction is open: every log entry up to `log_through` is stored and
            // counted in `live_sv`.
            let txn = self.doc.transact();
            (
                txn.state_vector(),
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
                let txn = self.doc.transact();
                (
                    txn.encode_state_as_update_v1(&StateVector::default()),
                    txn.state_vector().encode_v1(),
                )
            }
        };
        let encoded = started.elapsed();
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

/// A document from stored updates applied in order, and how many were skipped (each one
/// that does not decode or apply is logged and counted, and the rest still load).
fn doc_from_updates(session: &str, updates: &[Vec<u8>], metrics: &Metrics) -> (Doc, usize) {
    let doc = Doc::new();
    let mut skipped = 0;
    {
        let mut txn = doc.transact_mut();
        for bytes in updates {
            let applied = Update::decode_v1(bytes)
                .map_err(|e| ("does not decode", e.to_string()))
                .and_then(|u| {
                    txn.apply_update(u)
                        .map_err(|e| ("is rejected", e.to_string()))
                });
            if let Err((why, error)) = applied {
                skipped += 1;
                metrics.store_decode_errors.inc();
                tracing::warn!(%session, error, "stored update {why}; skipped");
            }
        }
    }
    (doc, skipped)
}
