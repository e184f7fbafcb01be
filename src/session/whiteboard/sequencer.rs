//! A whiteboard's sequencer: the one place the session's document is changed, off the
//! async workers.
//!
//! Every update, whoever sends it (a WebSocket client, the HTTP API, a restore, later
//! another node), is queued to its session's lane and handled on a sequencer thread, in
//! arrival order: guard → apply → append to the store (and fsync in sync durability) →
//! fan-out; updates queued behind one another are appended, answered and relayed together
//! once the last of them is applied (at most 16, the first held at most 1 ms: see
//! [`Board::end_batch`]). The async workers only queue a job and await its outcome; they
//! never wait on sled, an fsync or the document's lock for an update.
//!
//! Threads: the sessions' shared lane pool ([`crate::session::lane`], one thread per core,
//! at least two, started on first use; the tutor room's changes run on it too); a session's
//! lane runs on at most one of them at a time, so its updates keep one order. A thread per
//! session was built first and measured: 1,000 sessions loaded and unloaded cost 60 MiB
//! more peak RSS and kept 22 MiB (tests/it/persistence/memory.rs failed its 32 MiB bound),
//! where the pool costs two stacks. A slow store write holds one pool thread; the other
//! sessions go on on the others (sled's flush is one for the whole database anyway, so more
//! threads waiting on it would not make it faster). A lane is a session's queue and nothing
//! else: it ends with the session ([`super::Whiteboard`] dropped at unload) once what it
//! holds has run.
//!
//! The queue is bounded ([`QUEUE_JOBS`] per session): when it is full, a submitter awaits
//! space (a WebSocket reader then reads no further frame, so TCP pushes back on a fast
//! writer). Must not touch sockets; the job's outcome goes back through a oneshot.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use super::Board;
use crate::session::lane::{Lane, Reply};
use crate::store::StoreError;

pub use crate::session::lane::QUEUE_JOBS;

/// The session's side, owned by its [`Whiteboard`](super::Whiteboard).
pub(super) struct Sequencer {
    board: Arc<Board>,
    lane: Lane,
    /// Jobs submitted whose outcome is not in yet (see [`Pending`]).
    pending: Arc<AtomicUsize>,
}

/// Counts a job from its submission until its outcome is computed, and stops counting it
/// *before* the outcome is sent: whoever has seen an outcome then also sees the session
/// idle (an unload right after a write must not find the job still counted). Dropped
/// unrun (the submitter gave up before the job was queued), it stops counting too.
struct Pending(Arc<AtomicUsize>);

impl Pending {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Sequencer {
    pub(super) fn new(board: Arc<Board>) -> Self {
        Self {
            board,
            lane: Lane::default(),
            pending: Arc::default(),
        }
    }

    /// Whether no job is queued or running.
    pub(super) fn is_idle(&self) -> bool {
        self.queued() == 0
    }

    /// Jobs queued or running.
    pub(super) fn queued(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Queues `job` (awaiting a place while the queue is full) to run on the board on a
    /// lane thread, and resolves to what it returns. Its outcome is the job's own return
    /// value (one channel per job, the lane's), given once what the batch holds for the log
    /// (the job's updates and those before it) is stored, or the store's error if that
    /// append failed (the updates are then undone); it stops counting as pending before the
    /// outcome is sent, and what the job relays is queued for its connections first
    /// (unless jobs queued behind it take it on, see [`Board::end_batch`]). A job that
    /// panics resolves to [`stopped`].
    pub(super) fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Board) -> T + Send + 'static,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static {
        let ran = self
            .lane
            .run_replying(self.wrap(job, Order::<fn(&StoreError) -> T>::RelayFirst));
        async move { ran.await.map_err(|_| stopped()).and_then(|stored| stored) }
    }

    /// For a WebSocket reader: queues `job` at once if the queue has a place (`Ok`: the
    /// future only awaits the outcome); if not, `Err` holds the future that queues it once a
    /// place is free, and must be awaited before anything else is queued. The outcome waits
    /// for the batch's updates to be stored, and is sent before its relays are queued
    /// ([`Order::ReplyFirst`]); if that append fails, it is `store_failed`'s.
    #[allow(clippy::type_complexity)]
    pub(super) fn try_run_reply_first<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Board) -> T + Send + 'static,
        store_failed: impl FnOnce(&StoreError) -> T + Send + 'static,
    ) -> Result<
        impl Future<Output = Result<T, StoreError>> + Send + 'static,
        impl Future<Output = Result<T, StoreError>> + Send + 'static,
    > {
        match self
            .lane
            .try_run_replying(self.wrap(job, Order::ReplyFirst(store_failed)))
        {
            Ok(queued) => Ok(async move { queued.await.map_err(|_| stopped()).and_then(|r| r) }),
            Err(job) => {
                let ran = self.lane.run_replying(job);
                Err(async move { ran.await.map_err(|_| stopped()).and_then(|r| r) })
            }
        }
    }

    /// The lane's job for `job`: run it on the board, end the batch if it is the last, then
    /// reply and relay in `order`.
    fn wrap<T: Send + 'static, F: FnOnce(&StoreError) -> T + Send + 'static>(
        &self,
        job: impl FnOnce(&Board) -> T + Send + 'static,
        order: Order<F>,
    ) -> impl FnOnce(Reply<Result<T, StoreError>>) + Send + 'static {
        let board = self.board.clone();
        let pending = Pending::new(&self.pending);
        let backlog = self.lane.backlog();
        move |reply| {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&board)));
            let Ok(outcome) = ran else {
                // What the batch holds still ends (an idle session must hold nothing
                // unstored); the job's submitter sees its reply dropped ([`stopped`]).
                finish(&board, backlog.is_empty(), pending);
                return;
            };
            // The job's updates, outcome and relays wait for the jobs queued behind it, up
            // to a bound: under load a batch of updates is then stored in one write, and
            // reaches each connection in one delivery, one wake-up of its writer and one
            // write, instead of one each per update.
            match order {
                Order::RelayFirst => {
                    // An outcome means stored: what the batch holds goes to the log now (a
                    // failed append undoes it), not at the batch's end.
                    let stored = board.store_held();
                    finish(&board, backlog.is_empty(), pending);
                    reply.send(stored.map(|()| outcome));
                }
                Order::ReplyFirst(store_failed) => {
                    board.hold_outcome(Box::new(move |failed| {
                        reply.send(Ok(match failed {
                            None => outcome,
                            Some(e) => store_failed(e),
                        }))
                    }));
                    finish(&board, backlog.is_empty(), pending);
                }
            }
        }
    }
}

/// The end of a job on the lane: the batch ends (stored) if it is the last, the job stops
/// counting as pending, then the batch's outcomes and relays go.
fn finish(board: &Board, last_job: bool, pending: Pending) {
    let released = board.end_batch(last_job);
    drop(pending);
    if let Some(released) = released {
        board.release(released);
    }
}

/// Whether a job's outcome goes to its submitter after its relays are queued (what the batch
/// holds is stored first), or waits for its batch's append and goes before them.
enum Order<F> {
    RelayFirst,
    /// For a WebSocket reader, which then reads its next frame while the relays wake the
    /// session's writers, instead of being woken after them and queued behind them on the
    /// async workers. The function answers if the batch's append fails.
    ReplyFirst(F),
}

pub(super) fn stopped() -> StoreError {
    StoreError::Unavailable("the session's sequencer stopped".into())
}

/// Runs a future to completion on the calling thread (for the blocking callers: the CLI,
/// unit tests, a restore on a blocking thread). Unlike tokio's `blocking_*`, it does not
/// refuse to run inside a runtime's context; it must still not be called on an async
/// worker, which it would block.
pub(super) fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}
