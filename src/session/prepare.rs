//! Join answers prepared ahead: a large board that has come to rest gets the answer every
//! fresh joiner needs (its full sync step 2) encoded and compressed before anyone asks.
//!
//! Without it the first joiner of a join storm starts the work and every other joiner waits
//! for it: for a 20 MB board about 30 ms of encoding and 0.4 s of CPU compressing, on a
//! machine the joiners' own traffic already keeps busy (BENCHMARKS.md, scenario f). A
//! board is prepared once it is at least [`PREPARE_FROM`] large, has clients, and has not
//! changed for [`AT_REST`]; the answer is kept until its next change. Work done ahead may
//! be wasted (the board changes, nobody joins), so it is bounded: one board at a time, on
//! a background thread, and after a preparation that took `t` the next waits `DUTY × t` (a
//! tenth of that thread's time at most, like snapshots' `SNAPSHOT_DUTY`). That thread keeps
//! the normal priority: joiners that come while an answer is being prepared wait for it.
//!
//! Owns only its bookkeeping of which boards are at rest; the answer itself lives in the
//! board's step 2 cache (`whiteboard::step2`). Must not change a document.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Registry, Session};
use crate::session::whiteboard::Preparation;

/// Boards smaller than this are not prepared: their answer compresses in under ~20 ms
/// when a joiner asks. Also the least answer compressed ahead.
pub const PREPARE_FROM: u64 = 1 << 20;

/// How long a board must go unchanged to count as at rest: short, so that the answer is
/// ready within about half a second of the last change (a board loaded, or drawn, and then
/// the class told to open it). What bounds the work wasted on a board that changes again is
/// the duty rule, not this.
pub const AT_REST: Duration = Duration::from_millis(100);

/// How often boards are looked at (a pass only reads a few counters of the large boards).
pub const PASS_EVERY: Duration = Duration::from_millis(50);

/// After a preparation that took `t`, none for `DUTY × t`.
const DUTY: u32 = 10;

/// The window the answer is compressed for: 15 bits, what a client gets unless its offer
/// names `server_max_window_bits` (browsers' and Node's `ws` offers do not). A joiner that
/// asked for a smaller window gets its form compressed at its send, as before.
const WINDOW_BITS: u8 = 15;

/// A board's change count, and when it was first seen at it.
struct AtRest {
    count: u64,
    since: Instant,
}

/// What the preparing thread remembers between passes.
#[derive(Default)]
pub struct Preparer {
    boards: HashMap<Arc<str>, AtRest>,
    /// No preparation before this (the duty rule).
    not_before: Option<Instant>,
}

impl Preparer {
    /// One pass over the live sessions at `now`: notes which boards changed, and prepares
    /// the answer of at most one board that came to rest. Blocks while it prepares (`handle`
    /// is the runtime's: a joiner compressing the same answer meanwhile is awaited). Returns
    /// the session prepared, what [`Preparation::Answer`] said, and how long it took.
    pub fn pass(
        &mut self,
        registry: &Registry,
        handle: &tokio::runtime::Handle,
        now: Instant,
    ) -> Option<(Arc<str>, Preparation, Duration)> {
        let sessions = registry.sessions_where(|s| {
            s.handles.load(Ordering::Acquire) > 0 && s.whiteboard.size_bound() >= PREPARE_FROM
        });
        let chosen = self.note(&sessions, now);
        if self.not_before.is_some_and(|t| now < t) {
            return None;
        }
        let session = chosen?;
        let started = Instant::now();
        let outcome =
            session
                .whiteboard
                .prepare_join_answer(handle, WINDOW_BITS, prepare_from(registry));
        let took = started.elapsed();
        match outcome {
            Preparation::Answer { .. } => {
                registry.metrics.join_answers_prepared.inc();
                self.not_before = Some(Instant::now() + took.saturating_mul(DUTY));
                Some((session.id.clone(), outcome, took))
            }
            Preparation::Already | Preparation::Busy => None,
        }
    }

    /// Updates what is known of each board (large and in use: the others are forgotten) and
    /// returns one at rest whose answer is not prepared.
    fn note(&mut self, sessions: &[Arc<Session>], now: Instant) -> Option<Arc<Session>> {
        let mut chosen = None;
        let mut seen = HashMap::with_capacity(self.boards.len());
        for s in sessions {
            let count = s.whiteboard.change_count();
            let rest = match self.boards.remove(&s.id) {
                Some(rest) if rest.count == count => rest,
                _ => AtRest { count, since: now },
            };
            // The board knows whether its answer is prepared (and forgets it when it
            // changes): asked only of a board at rest, the one lock a pass takes per board.
            if chosen.is_none()
                && now.duration_since(rest.since) >= AT_REST
                && !s.whiteboard.join_answer_prepared()
            {
                chosen = Some(s.clone());
            }
            seen.insert(s.id.clone(), rest);
        }
        // Boards unloaded, left, or grown small are forgotten.
        self.boards = seen;
        chosen
    }
}

/// The least answer compressed ahead: [`PREPARE_FROM`], or the deflate threshold if higher
/// (a smaller answer is never sent compressed).
fn prepare_from(registry: &Registry) -> usize {
    (PREPARE_FROM as usize).max(registry.config.limits.deflate_threshold_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use yrs::{Text, Transact};

    /// An update inserting `chars` characters of text at the end of `doc`'s "t".
    fn typed(doc: &yrs::Doc, chars: usize) -> Vec<u8> {
        let text = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        let at = text.len(&txn);
        let s: String = (0..chars)
            .map(|i| (b'a' + (i % 23) as u8) as char)
            .collect();
        text.insert(&mut txn, at, &s);
        txn.encode_update_v1()
    }

    #[test]
    fn a_large_board_in_use_is_prepared_once_at_rest_and_again_after_a_change() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let handle = runtime.handle();
        let store: Arc<dyn crate::store::Store> = Arc::new(crate::store::MemoryStore::default());
        let registry = Registry::new(store, Arc::new(Metrics::new()), Arc::new(Config::default()));
        let (big_doc, small_doc) = (yrs::Doc::new(), yrs::Doc::new());
        let big = registry.open("big").expect("open");
        let small = registry.open("small").expect("open");
        let idle = registry.open("idle").expect("open");
        big.whiteboard
            .apply_update(None, &typed(&big_doc, 1_200_000), None)
            .expect("applied");
        small
            .whiteboard
            .apply_update(None, &typed(&small_doc, 1_000), None)
            .expect("applied");
        idle.whiteboard
            .apply_update(None, &typed(&yrs::Doc::new(), 1_200_000), None)
            .expect("applied");
        // Large, but nobody on it: nothing to prepare for.
        drop(idle);

        let mut preparer = Preparer::default();
        let t0 = Instant::now();
        assert!(preparer.pass(&registry, handle, t0).is_none(), "first seen");
        assert!(preparer.pass(&registry, handle, t0 + AT_REST / 2).is_none());
        let (id, answer, _) = preparer
            .pass(&registry, handle, t0 + AT_REST)
            .expect("prepared once at rest");
        assert_eq!(&*id, "big");
        let Preparation::Answer {
            bytes,
            compressed: Some(compressed),
        } = answer
        else {
            panic!("not compressed: {answer:?}");
        };
        assert!(
            bytes > 1_200_000 && compressed < bytes / 4,
            "{bytes} → {compressed}"
        );
        assert_eq!(registry.metrics.join_answers_prepared.get(), 1);
        assert_eq!(
            preparer.boards.keys().map(|k| &**k).collect::<Vec<_>>(),
            ["big"],
            "only the large board in use is followed"
        );

        // Unchanged: not prepared again, even once the duty rule allows it.
        let allowed = preparer.not_before.expect("the duty rule's wait") + AT_REST;
        assert!(preparer.pass(&registry, handle, allowed).is_none());

        // Changed: at rest again AT_REST after the change was seen.
        big.whiteboard
            .apply_update(None, &typed(&big_doc, 10), None)
            .expect("applied");
        assert!(preparer.pass(&registry, handle, allowed).is_none());
        let asked = Instant::now();
        let (_, answer, took) = preparer
            .pass(&registry, handle, allowed + AT_REST)
            .expect("prepared again");
        assert!(matches!(answer, Preparation::Answer { bytes: b, .. } if b > bytes));
        assert_eq!(registry.metrics.join_answers_prepared.get(), 2);

        // The duty rule: the next waits ten times what this one took ...
        let not_before = preparer.not_before.expect("the duty rule's wait");
        assert!(not_before >= asked + took * DUTY);
        big.whiteboard
            .apply_update(None, &typed(&big_doc, 10), None)
            .expect("applied");
        let seen = not_before - AT_REST * 2;
        assert!(preparer.pass(&registry, handle, seen).is_none());
        // ... even for a board at rest by then,
        assert!(preparer.pass(&registry, handle, seen + AT_REST).is_none());
        // and not longer.
        assert!(preparer.pass(&registry, handle, not_before).is_some());
    }
}
