//! Sync step 2, the answer to a joiner's state vector, encoded off the async workers.
//!
//! Encoding a large board takes tens of milliseconds (about 30 ms for 20 MB), so it runs
//! on tokio's blocking pool and the joiner's reader awaits it. The answer for an empty
//! state vector (a joiner with a fresh document: every browser tab that opens the board)
//! is the same bytes for every joiner until the document changes, so it is encoded once per
//! document state: the first joiner starts the encode, joiners arriving meanwhile await
//! the same encode, later ones get the cached bytes. The cache's lock is only held to look
//! up or store an entry, never across the encode: neither other joiners nor the session's
//! writers wait on it.
//!
//! Must not touch the peer list or the store; the document is only read.

use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;
use yrs::{Doc, ReadTxn, StateVector, Transact};

use super::Board;
use crate::protocol::wire;
use crate::sync;

/// The step 2 for an empty state vector at one document state (the change count).
pub(super) struct FullStep2 {
    version: u64,
    /// Tells this entry from a newer one for the same version (after a roll-back cleared
    /// the cache), so a finished encode only stores what it was started for.
    flight: u64,
    state: Step2State,
}

enum Step2State {
    Ready(Bytes),
    /// Being encoded; `None` until the encode is done (a dropped sender: it failed).
    Encoding(watch::Receiver<Option<Bytes>>),
}

/// The shared cache: a handle to it goes with the encode onto the blocking pool.
pub(super) type FullStep2Cache = Arc<Mutex<Option<FullStep2>>>;

/// Encodes what a peer at `sv` lacks, as one sync step 2 frame written in one buffer.
fn encode(doc: &Doc, sv: &StateVector) -> Bytes {
    wire::sync_step2_with(|e| doc.transact().encode_state_as_update(sv, e))
}

/// Encodes on the blocking pool.
async fn encode_off_workers(doc: Doc, sv: StateVector) -> Bytes {
    let fallback = doc.clone();
    match tokio::task::spawn_blocking(move || encode(&doc, &sv)).await {
        Ok(bytes) => bytes,
        // Only a panic in yrs ends up here: answer with the full state (always correct
        // for a peer, if larger than needed) rather than leave the joiner unsynced.
        Err(_) => encode(&fallback, &StateVector::default()),
    }
}

impl Board {
    /// Sync step 2 for a peer whose state vector is `sv`. The returned future owns what
    /// it needs (it may outlive the borrow of `self`) and must run on a tokio runtime.
    ///
    /// Called after the peer joined: whatever the document gains after this call is
    /// relayed to the peer, and the bytes hold at least what the document held now.
    pub fn sync_step2(&self, sv: &StateVector) -> impl Future<Output = Bytes> + Send + 'static {
        let (doc, wait) = if sv.is_empty() {
            let (doc, flight) = self.full_step2_flight();
            (doc, Some(flight))
        } else {
            (self.doc(), None)
        };
        let sv = sv.clone();
        async move {
            match wait {
                None => encode_off_workers(doc, sv).await,
                Some(mut rx) => {
                    let ready = rx
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|bytes| bytes.clone());
                    // The flight's result; should it fail, this joiner encodes its own.
                    match ready {
                        Some(bytes) => bytes,
                        None => encode_off_workers(doc, sv).await,
                    }
                }
            }
        }
    }

    /// The cached full-state step 2 for the current document state, or the encode that
    /// will produce it (started here if none runs), with the document it is of.
    fn full_step2_flight(&self) -> (Doc, watch::Receiver<Option<Bytes>>) {
        // Read the count before encoding: the bytes then hold at least what that count
        // says, and any later change bumps the count and is relayed to the joiner.
        let version = *self.changes.borrow();
        // The document is taken after the count, never before: a roll-back replaces the
        // document before it bumps the count, so a handle taken earlier could be the
        // replaced one (holding the refused update) and be cached as the new count's
        // state, served to every joiner until the next change.
        let doc = self.doc();
        let mut cache = sync::lock(&self.full_step2);
        let flight = match cache.as_ref() {
            Some(entry) if entry.version == version => match &entry.state {
                Step2State::Ready(bytes) => return (doc, watch::channel(Some(bytes.clone())).1),
                Step2State::Encoding(rx) => return (doc, rx.clone()),
            },
            Some(entry) => entry.flight + 1,
            None => 0,
        };
        let (tx, rx) = watch::channel(None);
        *cache = Some(FullStep2 {
            version,
            flight,
            state: Step2State::Encoding(rx.clone()),
        });
        drop(cache);
        let (encoded, cache) = (doc.clone(), self.full_step2.clone());
        tokio::task::spawn_blocking(move || {
            let doc = encoded;
            let bytes = encode(&doc, &StateVector::default());
            let mut cache = sync::lock(&cache);
            if let Some(entry) = cache.as_mut() {
                if entry.version == version && entry.flight == flight {
                    entry.state = Step2State::Ready(bytes.clone());
                }
            }
            drop(cache);
            // Waiters hold receivers; none left is fine.
            let _ = tx.send(Some(bytes));
        });
        (doc, rx)
    }

    /// Forgets the cached step 2 (the document was rebuilt: it may hold something the
    /// live document no longer does). An encode under way stores nothing either.
    pub(super) fn forget_full_step2(&self) {
        if let Some(entry) = sync::lock(&self.full_step2).as_mut() {
            // A version no change count reaches before the next lookup replaces it.
            entry.version = u64::MAX;
            entry.state = Step2State::Ready(Bytes::new());
        }
    }
}
