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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;
use yrs::{Doc, ReadTxn, StateVector, Transact};

use super::Board;
use crate::protocol::wire;
use crate::sync;
use crate::ws::deflate;

/// The step 2 for an empty state vector at one document state (the change count).
pub(super) struct FullStep2 {
    version: u64,
    /// Tells this entry from a newer one for the same version (after a roll-back cleared
    /// the cache), so a finished encode only stores what it was started for.
    flight: u64,
    state: Step2State,
    /// Prepared ahead (see [`Board::prepare_join_answer`]): its compressed form, kept
    /// while this entry is the current one; `Some(None)` if it was too small to compress.
    ahead: Option<Option<deflate::Prepared>>,
}

enum Step2State {
    Ready(Bytes),
    /// Being encoded; `None` until the encode is done (a dropped sender: it failed).
    Encoding(watch::Receiver<Option<Bytes>>),
}

/// The shared cache: a handle to it goes with the encode onto the blocking pool.
pub(super) type FullStep2Cache = Arc<Mutex<Option<FullStep2>>>;

/// What the cache has for the current document state.
enum Lookup {
    /// With the entry's version and flight.
    Ready(Bytes, u64, u64),
    Encoding(watch::Receiver<Option<Bytes>>),
    /// Nothing: this caller encodes, and others wait for it.
    Start(Flight),
}

/// An encode of the full step 2 that the cache says is under way: whoever holds it must
/// [`run`](Flight::run) it (or drop it, which fails the waiters' wait).
struct Flight {
    doc: Doc,
    version: u64,
    flight: u64,
    done: watch::Sender<Option<Bytes>>,
    cache: FullStep2Cache,
}

impl Flight {
    /// Encodes, stores the bytes in the cache (if it still waits for this encode) and
    /// hands them to the waiters.
    fn run(self) -> Bytes {
        let bytes = encode(&self.doc, &StateVector::default());
        let mut cache = sync::lock(&self.cache);
        if let Some(entry) = cache.as_mut() {
            if entry.version == self.version && entry.flight == self.flight {
                entry.state = Step2State::Ready(bytes.clone());
            }
        }
        drop(cache);
        // Waiters hold receivers; none left is fine.
        let _ = self.done.send(Some(bytes.clone()));
        bytes
    }
}

/// What [`Board::prepare_join_answer`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Preparation {
    /// The answer for this state was prepared already.
    Already,
    /// A joiner's encode is under way: the answer is not kept (try again later).
    Busy,
    /// The answer is encoded and kept, compressed too if at least the size asked: its size,
    /// and the compressed size (`None`: not compressed, or compressing did not make it
    /// smaller).
    Answer {
        bytes: usize,
        compressed: Option<usize>,
    },
}

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
        let (doc, lookup) = self.full_step2_lookup();
        let rx = match lookup {
            Lookup::Ready(bytes, ..) => watch::channel(Some(bytes)).1,
            Lookup::Encoding(rx) => rx,
            Lookup::Start(flight) => {
                let rx = flight.done.subscribe();
                tokio::task::spawn_blocking(move || flight.run());
                rx
            }
        };
        (doc, rx)
    }

    fn full_step2_lookup(&self) -> (Doc, Lookup) {
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
                Step2State::Ready(bytes) => {
                    return (doc, Lookup::Ready(bytes.clone(), version, entry.flight))
                }
                Step2State::Encoding(rx) => return (doc, Lookup::Encoding(rx.clone())),
            },
            Some(entry) => entry.flight + 1,
            None => 0,
        };
        let (done, rx) = watch::channel(None);
        *cache = Some(FullStep2 {
            version,
            flight,
            state: Step2State::Encoding(rx),
            ahead: None,
        });
        drop(cache);
        let flight = Flight {
            doc: doc.clone(),
            version,
            flight,
            done,
            cache: self.full_step2.clone(),
        };
        (doc, Lookup::Start(flight))
    }

    /// Prepares the answer every fresh joiner gets (the full step 2) ahead of them, on the
    /// calling thread: encodes it unless the cache has it, and if it is at least
    /// `compress_from` bytes, compresses it for a `window_bits` window and keeps that form
    /// while the document stays as it is. A join storm on a board at rest then starts
    /// sending at once instead of waiting for the encode and the compression (about 0.45 s
    /// of CPU for a 20 MB board); the first joiner's send compresses otherwise.
    ///
    /// Blocks: for a background thread, which passes the runtime's `handle` (a joiner
    /// compressing the same bytes meanwhile is awaited, not repeated). Does nothing if the
    /// answer for this state was prepared already, or a joiner's encode is under way.
    pub fn prepare_join_answer(
        &self,
        handle: &tokio::runtime::Handle,
        window_bits: u8,
        compress_from: usize,
    ) -> Preparation {
        if self.join_answer_prepared() {
            return Preparation::Already;
        }
        let (version, flight, bytes) = match self.full_step2_lookup() {
            (_, Lookup::Encoding(_)) => return Preparation::Busy,
            (_, Lookup::Ready(bytes, version, flight)) => (version, flight, bytes),
            (_, Lookup::Start(f)) => (f.version, f.flight, f.run()),
        };
        let len = bytes.len();
        let form =
            (len >= compress_from).then(|| handle.block_on(deflate::prepare(&bytes, window_bits)));
        let compressed = form.as_ref().and_then(deflate::Prepared::compressed_len);
        if let Some(entry) = sync::lock(&self.full_step2).as_mut() {
            if entry.version == version && entry.flight == flight {
                entry.ahead = Some(form);
            }
        }
        Preparation::Answer {
            bytes: len,
            compressed,
        }
    }

    /// Whether the join answer of the document as it is now was prepared ahead
    /// ([`Board::prepare_join_answer`]).
    pub fn join_answer_prepared(&self) -> bool {
        sync::lock(&self.full_step2)
            .as_ref()
            .is_some_and(|e| e.version == *self.changes.borrow() && e.ahead.is_some())
    }

    /// The document's change count: it moves with every change (see `changes`).
    pub fn change_count(&self) -> u64 {
        *self.changes.borrow()
    }

    /// At least the document's encoded size: the last snapshot's plus every byte logged
    /// since (erasing makes the document smaller than that, never larger).
    pub fn size_bound(&self) -> u64 {
        self.snapshot_bytes.load(Ordering::Acquire)
            + self.log_bytes_since_snapshot.load(Ordering::Acquire)
    }

    /// Forgets the cached step 2 (the document was rebuilt: it may hold something the
    /// live document no longer does). An encode under way stores nothing either.
    pub(super) fn forget_full_step2(&self) {
        if let Some(entry) = sync::lock(&self.full_step2).as_mut() {
            // A version no change count reaches before the next lookup replaces it.
            entry.version = u64::MAX;
            entry.state = Step2State::Ready(Bytes::new());
            entry.ahead = None;
        }
    }
}
