//! A whiteboard's snapshots: when one is due, writing it (rebuilt from the store while
//! clients are connected, so the live document is not locked), and compacting the log
//! behind it. Must not relay anything.

use super::*;

/// When the last snapshot was taken, and how long it took.
pub(super) struct LastSnapshot {
    pub(super) at: Instant,
    pub(super) took: std::time::Duration,
}

/// The update-count trigger waits this many times the last snapshot's duration after it:
/// a busy board spends at most a tenth of the time being snapshotted. Measured (BENCHMARKS.md,
/// issue 13, fifth round): 5 writers at 1,680 updates/s each on a 2.5 MB board made the log
/// as large as the snapshot every second, and a snapshot (rebuilt from the store, ~0.5 s
/// on the saturated machine) every second took 15 % of the server's CPU and quadrupled the
/// relay's p99.
const SNAPSHOT_DUTY: u32 = 10;

/// The most the duty rule waits. A snapshot's duration grows with the log it folds in, and
/// the log with the wait: without a bound, a sustained fast writer would push the waits (and
/// a restart's replay) out to the interval trigger.
const SNAPSHOT_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

impl Board {
    /// Appends held-back updates to the log again (without counting them as a change: a
    /// snapshot does this, and must not make itself due again).
    pub(super) fn relog_held_back(&self, held: &[Vec<u8>]) -> Result<(), StoreError> {
        let _in_order = sync::lock(&self.log_order);
        for update in held {
            let next = self.log_seq.load(Ordering::Acquire) + 1;
            let seq = self.store.append_update(&self.session, next, update)?;
            if !self.options.shared_log {
                self.log_seq.store(seq, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Whether the log since the last snapshot is long enough to fold into a new one:
    /// `snapshot_every_updates` entries, and as many bytes as the last snapshot, and
    /// `SNAPSHOT_DUTY` (10) times the last snapshot's duration since it (at most
    /// `SNAPSHOT_WAIT_MAX`, 5 s). A snapshot builds the whole document: taking one every N
    /// updates of a 20 MB board would spend the server's CPU on it. The size rule keeps that
    /// cost proportional to the bytes logged (one build per snapshot-size of log), and a
    /// restart's replay at most the snapshot's load again; the duty rule bounds it in time
    /// when updates come fast (a restart then replays at most `SNAPSHOT_WAIT_MAX` of updates
    /// more).
    pub fn snapshot_wanted(&self) -> bool {
        let logged = self.updates_since_snapshot.load(Ordering::Acquire)
            >= self.options.snapshot_every_updates
            && self.log_bytes_since_snapshot.load(Ordering::Acquire)
                >= self.snapshot_bytes.load(Ordering::Acquire);
        logged && {
            let last = sync::lock(&self.last_snapshot);
            let wait = last.took.saturating_mul(SNAPSHOT_DUTY);
            last.at.elapsed() >= wait.min(SNAPSHOT_WAIT_MAX)
        }
    }

    /// The session's stored state (newest snapshot, then the log) folded into one Yjs v1
    /// update, with its state vector; `None` if that state lacks anything `stored_sv` has.
    ///
    /// This is how a snapshot is made without locking the live document: encoding a
    /// document holds its read lock, which every update waits behind (75 ms for a 7 MB
    /// board under load, measured), while a fresh document built from the store is this
    /// thread's alone. It costs about three encodes of CPU instead of one, off the relay
    /// path. Built by integrating, it is garbage-collected like the live document (merging
    /// the updates without a document would keep every erased stroke's content).
    pub(super) fn compact_stored(&self, stored_sv: &StateVector) -> Option<(Vec<u8>, Vec<u8>)> {
        let rebuilt = match self.load_stored() {
            Ok((rebuilt, _)) => rebuilt,
            Err(e) => {
                tracing::warn!(session = %self.session, error = %e, "snapshot: store not readable; encoding the live document");
                return None;
            }
        };
        let txn = rebuilt.doc.transact();
        let sv = txn.state_vector();
        let complete = rebuilt.skipped == 0
            && stored_sv
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
        sync::lock(&self.last_snapshot).at.elapsed()
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Writes a snapshot now, changed or not (an operator's or a tutor's request).
    pub fn snapshot_now(&self) -> Result<u64, StoreError> {
        self.dirty.store(true, Ordering::Release);
        Ok(self.snapshot_if_dirty()?.unwrap_or_default())
    }

    /// Writes a snapshot if anything changed since the last one. It encodes a whole
    /// document: call it on a blocking thread. While clients are connected the state is
    /// rebuilt from the store, so the live document is not locked (see
    /// `Board::compact_stored`); with none (last client gone, unload, shutdown) there is no
    /// relay to stall, and encoding the live document costs a third as much.
    pub fn snapshot_if_dirty(&self) -> Result<Option<u64>, StoreError> {
        let one_at_a_time = sync::lock(&self.snapshotting);
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(None);
        }
        let started = Instant::now();
        let (stored_sv, held, log_through, count, bytes) = {
            // Read under the log's lock, which every append takes: every log entry up to
            // `log_through` is counted in `stored_sv` (the live document may hold more:
            // updates applied, not yet appended), except the held-back ones, copied here
            // under their lock (which holding back logs under): the snapshot logs them
            // again below, even if they are let in meanwhile, so its deletions take none
            // of them along.
            let held_back = self.held_back();
            let _in_order = sync::lock(&self.log_order);
            (
                sync::lock(&self.stored_sv).clone(),
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
        let compacted = in_use.then(|| self.compact_stored(&stored_sv)).flatten();
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
        let took = started.elapsed();
        *sync::lock(&self.last_snapshot) = LastSnapshot {
            at: Instant::now(),
            took,
        };
        self.metrics.snapshot_duration.observe(took.as_secs_f64());
        // Not under the lock: a rebuild on the sequencer may be waiting for it.
        drop(one_at_a_time);
        // With a client connected, a whole document was rebuilt from the store beside the
        // live one (whether used or not): its memory goes back to the system.
        if in_use {
            crate::session::return_freed_memory();
        }
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
