//! Updates held back until the content they depend on arrives (SPEC.md 7.1), and the
//! rebuild of a document from the store, which holds back the same way.
//!
//! Owns the held-back list's bounds (`limits.max_pending_bytes`, [`MAX_HELD_BACK`]) and
//! letting updates in once they can be applied. Must not relay by itself: let-in updates go
//! through `Board::integrate`, on the sequencer.

use std::borrow::Cow;

use super::*;

impl Board {
    /// Holds back an update that depends on content the document does not have yet
    /// (SPEC.md 7.1: bounded by `limits.max_pending_bytes` per session, and logged like any
    /// other so a restart has it). Runs on the sequencer.
    pub(super) fn hold_back(
        &self,
        update: &[u8],
        waits_on: Vec<u64>,
        log: bool,
    ) -> Result<(), ApplyError> {
        let limit = self.options.limits.max_pending_bytes;
        // The log keeps the order updates came in: what the batch holds goes first (and
        // is undone alone if that fails, before this lock is taken, which undoing takes).
        self.store_held()?;
        let mut held = self.held_back();
        // A client that reconnects sends what it has again: the same bytes are held once.
        if held.iter().any(|h| h.update == update) {
            return Ok(());
        }
        let bytes: usize = held.iter().map(|h| h.update.len()).sum::<usize>() + update.len();
        // Counted too: every update let in re-checks the ones waiting on its client, so a
        // flood of tiny held-back updates would cost quadratic time on the sequencer.
        if bytes > limit || held.len() >= MAX_HELD_BACK {
            self.metrics.guard_refusals.pending.inc();
            return Err(ApplyError::Guard(GuardError::TooLarge {
                what: "updates waiting for missing blocks",
                limit,
            }));
        }
        // Another node's update is in the shared log already.
        if log {
            self.append(&[update])?;
        }
        held.push(HeldBack {
            update: update.to_vec(),
            waits_on,
        });
        Ok(())
    }

    /// Lets in the held-back updates that an update by `clients` (just integrated) may have
    /// completed, and those they complete in turn. Only updates waiting on one of those
    /// clients (or on a client a let-in update carries) are checked again, so a full hold-back costs
    /// nothing to the updates that cannot help it. Runs on the sequencer.
    pub(super) fn retry_held_back(&self, mut clients: Vec<u64>) {
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
                        match self.integrate(None, &h.update, None, checked, None) {
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

    pub(super) fn held_back(&self) -> MutexGuard<'_, Vec<HeldBack>> {
        sync::lock(&self.held_back)
    }
}

/// A document rebuilt from stored updates, with what the guard learnt of it.
pub(super) struct Rebuilt {
    pub(super) doc: Doc,
    pub(super) nesting: NestingIndex,
    /// Stored updates that still wait for content the store does not have.
    pub(super) held_back: Vec<HeldBack>,
    /// Updates skipped because they did not decode, did not pass the guard or were rejected.
    pub(super) skipped: usize,
    /// The size of the snapshot it started from (0: none).
    pub(super) snapshot_bytes: u64,
    /// Log entries read after the (last) snapshot, and their bytes.
    pub(super) log_updates: u64,
    pub(super) log_bytes: u64,
}

/// Stored updates a rebuild applies in one transaction. yrs frees an erased value's content
/// when the transaction that erased it commits: one transaction over a whole log kept every
/// stroke ever erased in memory until its end (a snapshot of scenario e's board after
/// ~216,000 updates peaked at 208 MB in this rebuild, the live document being 48 MB; heaptrack).
/// It is also all a rebuild holds of the log at once.
const UPDATES_PER_TRANSACTION: usize = 256;

/// Builds a document from stored records handed to it in order (see
/// [`Board::doc_from_stored`]), holding at most [`UPDATES_PER_TRANSACTION`] of them.
pub(super) struct Rebuilder<'a> {
    session: &'a str,
    metrics: &'a Metrics,
    limits: &'a LimitsConfig,
    rebuilt: Rebuilt,
    /// Log entries read and not yet applied.
    unapplied: Vec<Vec<u8>>,
}

impl<'a> Rebuilder<'a> {
    pub(super) fn new(session: &'a str, metrics: &'a Metrics, limits: &'a LimitsConfig) -> Self {
        Self {
            session,
            metrics,
            limits,
            rebuilt: Rebuilt {
                doc: Doc::new(),
                nesting: NestingIndex::default(),
                held_back: Vec::new(),
                skipped: 0,
                snapshot_bytes: 0,
                log_updates: 0,
                log_bytes: 0,
            },
            unapplied: Vec::with_capacity(UPDATES_PER_TRANSACTION),
        }
    }

    /// Takes the next stored record; applies what it holds once it holds enough.
    pub(super) fn push(&mut self, record: StoredRecord<'_>) {
        match record {
            StoredRecord::Snapshot { state, .. } => {
                // A later snapshot (one written while a Redis scan read the log) includes
                // every entry before it: the counts are of the entries after the last one.
                self.rebuilt.snapshot_bytes = state.len() as u64;
                self.rebuilt.log_updates = 0;
                self.rebuilt.log_bytes = 0;
                // Applied from the store's buffer, not copied: it is the whole board.
                self.apply_unapplied();
                self.apply([(Cow::Borrowed(state), true)]);
            }
            StoredRecord::Update(update) => {
                self.rebuilt.log_updates += 1;
                self.rebuilt.log_bytes += update.len() as u64;
                self.unapplied.push(update.to_vec());
                if self.unapplied.len() >= UPDATES_PER_TRANSACTION {
                    self.apply_unapplied();
                }
            }
        }
    }

    /// The document, once every record was pushed.
    pub(super) fn finish(mut self) -> Rebuilt {
        self.apply_unapplied();
        self.rebuilt
    }

    /// Applies the log entries held, in one transaction.
    fn apply_unapplied(&mut self) {
        let mut unapplied = std::mem::take(&mut self.unapplied);
        self.apply(
            unapplied
                .drain(..)
                .map(|update| (Cow::Owned(update), false)),
        );
        self.unapplied = unapplied;
    }

    /// Applies `records` (each marked whether it is the snapshot) in one transaction.
    fn apply<'r>(&mut self, records: impl IntoIterator<Item = (Cow<'r, [u8]>, bool)>) {
        let Rebuilt {
            doc,
            nesting,
            held_back,
            skipped,
            ..
        } = &mut self.rebuilt;
        let (session, metrics, limits) = (self.session, self.metrics, self.limits);
        let mut skip = |why: &str, error: String| {
            *skipped += 1;
            metrics.store_decode_errors.inc();
            tracing::warn!(%session, error, "stored update {why}; skipped");
        };
        let mut txn = doc.transact_mut();
        for record in records {
            // This update, then whatever held-back ones it lets in, and so on.
            let mut next = vec![record];
            while let Some((update, is_snapshot)) = next.pop() {
                let checked = if is_snapshot {
                    nesting.check_stored(&update, limits.max_nesting)
                } else {
                    nesting.check(&update, limits.max_nesting)
                };
                let checked = match checked {
                    Ok(checked) => checked,
                    Err(e) => {
                        skip("is refused by the guard", e.to_string());
                        continue;
                    }
                };
                if checked.waits {
                    held_back.push(HeldBack {
                        update: update.into_owned(),
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
                        let (ready, waiting) = std::mem::take(held_back)
                            .into_iter()
                            .partition(|h| h.waits_on.iter().any(|c| clients.contains(c)));
                        *held_back = waiting;
                        next.extend(
                            ready
                                .into_iter()
                                .map(|h: HeldBack| (Cow::Owned(h.update), false))
                                .rev(),
                        );
                    }
                    Err((why, error)) => skip(why, error),
                }
            }
        }
    }
}

impl Board {
    /// The session's document rebuilt from the store (see [`Rebuilder`]), and the store's
    /// last log seq: the stored snapshot and log applied in order, as the live whiteboard
    /// applied them, read as they are applied. Each one passes the update guard first (a
    /// record stored before the guard existed can hold a nesting bomb), one that waits for
    /// absent content is held back and let in once that content is there, and each one that
    /// does not pass, decode or apply is logged, counted and skipped, and the rest still load.
    ///
    /// Log entries are checked as the client's update they were; only the snapshot is
    /// checked as a stored record ([`NestingIndex::check_stored`]). A held-back update the
    /// live whiteboard refuses once its content arrives is in the log already, and loading
    /// it here must refuse it too; a snapshot written before the guard refused misplaced
    /// text still loads, or the board would be lost.
    pub(super) fn doc_from_stored(
        session: &str,
        store: &dyn Store,
        metrics: &Metrics,
        limits: &LimitsConfig,
    ) -> Result<(Rebuilt, u64), StoreError> {
        let mut rebuilder = Rebuilder::new(session, metrics, limits);
        let last_log_seq = store.scan_whiteboard(session, &mut |r| rebuilder.push(r))?;
        Ok((rebuilder.finish(), last_log_seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::ws::outbox::outbox;
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

    /// A rebuild commits every `UPDATES_PER_TRANSACTION` updates: updates held back across
    /// such a commit are still let in by the one they wait for, and nothing is skipped.
    #[test]
    fn a_rebuild_over_several_transactions_lets_in_what_waited_across_them() {
        let parts: Vec<String> = (0..2 * UPDATES_PER_TRANSACTION + 88)
            .map(|i| format!("{}", i % 10))
            .collect();
        let typed = typed(&parts.iter().map(String::as_str).collect::<Vec<_>>());
        // The first update comes after the first commit; every one before it waits for it.
        let first_at = UPDATES_PER_TRANSACTION + 44;
        let mut stored: Vec<Vec<u8>> = typed[1..=first_at].to_vec();
        stored.push(typed[0].clone());
        stored.extend_from_slice(&typed[first_at + 1..]);
        assert_eq!(stored.len(), typed.len());

        let (metrics, limits) = (Metrics::new(), WhiteboardOptions::default().limits);
        let mut rebuilder = Rebuilder::new("s", &metrics, &limits);
        for update in &stored {
            rebuilder.push(StoredRecord::Update(update));
        }
        let rebuilt = rebuilder.finish();
        assert_eq!(rebuilt.skipped, 0);
        assert!(rebuilt.held_back.is_empty());
        let state = rebuilt
            .doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        assert_eq!(text_of(&state), parts.concat());
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
