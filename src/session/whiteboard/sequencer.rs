//! A whiteboard's sequencer: the one place the session's document is changed, off the
//! async workers.
//!
//! Every update, whoever sends it (a WebSocket client, the HTTP API, a restore, later
//! another node), is queued to its session's lane and handled on a sequencer thread, in
//! arrival order: guard → apply → append to the store (and fsync in sync durability) →
//! fan-out. The async workers only queue a job and await its outcome; they never wait on
//! sled, an fsync or the document's lock for an update.
//!
//! Threads: a small pool (`easel-seq`, one per core, at least two) started on the first
//! update, shared by every session; a session's lane runs on at most one of them at a time,
//! so its updates keep one order. A thread per session was built first and measured: 1,000
//! sessions loaded and unloaded cost 60 MiB more peak RSS and kept 22 MiB
//! (tests/it/persistence/memory.rs failed its 32 MiB bound), where the pool costs two
//! stacks. A slow store write holds one pool thread; the other sessions go on on the
//! others (sled's flush is one for the whole database anyway, so more threads waiting on
//! it would not make it faster). A lane is a session's queue and nothing else: it ends
//! with the session ([`super::Whiteboard`] dropped at unload) once what it holds has run.
//!
//! The queue is bounded ([`QUEUE_JOBS`] per session): when it is full, a submitter awaits
//! space (a WebSocket reader then reads no further frame, so TCP pushes back on a fast
//! writer). Must not touch sockets; the job's outcome goes back through a oneshot.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::{ApplyError, Board, ConnId};
use crate::store::StoreError;
use crate::sync;

/// Jobs a session's queue holds. Each queued job belongs to a submitter that awaits its
/// outcome (a WebSocket reader has at most one in flight), so the queue holds no bytes a
/// reader does not already hold; what the bound caps is the wait: at ~25 µs per update
/// (apply plus the sled insert, measured on this machine), 64 queued updates are about
/// 1.6 ms of work, under scenario b's p99 target of 3 ms, while a burst of up to 64 writers
/// at once never waits for space.
pub const QUEUE_JOBS: usize = 64;

/// Jobs a lane runs before it lets another session's lane have the thread.
const JOBS_PER_TURN: usize = 32;

/// What the sequencer is asked to do.
pub(super) enum Job {
    Update {
        origin: Option<ConnId>,
        update: Bytes,
        message: Option<Bytes>,
        queued: Instant,
        reply: oneshot::Sender<Result<bool, ApplyError>>,
    },
    /// A restore's change set (SPEC.md 5.3): applied, logged and relayed like an update.
    Restore {
        version: u64,
        reply: oneshot::Sender<Result<(), super::RestoreFailure>>,
    },
    /// Does nothing but answer: once it has, every job queued before it has run.
    Barrier(oneshot::Sender<()>),
}

/// One session's queue on the pool.
struct Lane {
    board: Arc<Board>,
    /// The jobs, each with its place in the queue (given back once it has run), and
    /// whether the lane is on the pool's ready list or running.
    state: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    jobs: VecDeque<(Job, OwnedSemaphorePermit)>,
    scheduled: bool,
}

/// The session's side, owned by its [`Whiteboard`](super::Whiteboard).
pub(super) struct Sequencer {
    lane: Arc<Lane>,
    /// Places in the lane's queue ([`QUEUE_JOBS`]).
    room: Arc<Semaphore>,
}

impl Sequencer {
    pub(super) fn new(board: Arc<Board>) -> Self {
        Self {
            lane: Arc::new(Lane {
                board,
                state: Mutex::new(LaneState::default()),
            }),
            room: Arc::new(Semaphore::new(QUEUE_JOBS)),
        }
    }

    /// Whether no job is queued or running (a job gives its place back once it has run).
    pub(super) fn is_idle(&self) -> bool {
        self.room.available_permits() == QUEUE_JOBS
    }

    /// Jobs queued or running.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        QUEUE_JOBS - self.room.available_permits()
    }

    /// Queues `job`, awaiting a place while the queue is full.
    pub(super) fn submit(
        &self,
        job: Job,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (lane, room) = (self.lane.clone(), self.room.clone());
        async move {
            let place = room.acquire_owned().await.map_err(|_| stopped())?;
            let pool = pool()?;
            let schedule = {
                let mut state = sync::lock(&lane.state);
                state.jobs.push_back((job, place));
                !std::mem::replace(&mut state.scheduled, true)
            };
            if schedule {
                pool.ready(lane);
            }
            Ok(())
        }
    }
}

pub(super) fn stopped() -> StoreError {
    StoreError::Unavailable("the session's sequencer stopped".into())
}

/// The sequencer threads and the lanes waiting for one.
struct Pool {
    ready: Mutex<VecDeque<Arc<Lane>>>,
    wake: Condvar,
}

impl Pool {
    fn ready(&self, lane: Arc<Lane>) {
        sync::lock(&self.ready).push_back(lane);
        self.wake.notify_one();
    }

    /// A sequencer thread: runs lanes, a turn at a time, for the life of the process.
    fn run(&self) {
        loop {
            let lane = {
                let mut ready = sync::lock(&self.ready);
                loop {
                    match ready.pop_front() {
                        Some(lane) => break lane,
                        None => {
                            ready = self
                                .wake
                                .wait(ready)
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                        }
                    }
                }
            };
            for _ in 0..JOBS_PER_TURN {
                let next = sync::lock(&lane.state).jobs.pop_front();
                let Some((job, _place)) = next else { break };
                run_job(&lane.board, job);
            }
            let more = {
                let mut state = sync::lock(&lane.state);
                state.scheduled = !state.jobs.is_empty();
                state.scheduled
            };
            if more {
                self.ready(lane);
            }
        }
    }
}

/// The pool, its threads started on first use. `Err` only if not one thread could start.
fn pool() -> Result<&'static Pool, StoreError> {
    static POOL: OnceLock<Result<Pool, String>> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let mut started = 0;
        let mut error = String::new();
        for _ in 0..threads {
            let spawned = std::thread::Builder::new()
                .name("easel-seq".into())
                .spawn(|| {
                    // Waits until `get_or_init` below has put the pool in place.
                    if let Ok(pool) = POOL.wait() {
                        pool.run();
                    }
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => error = e.to_string(),
            }
        }
        if started == 0 {
            return Err(format!("cannot start a sequencer thread: {error}"));
        }
        Ok(Pool {
            ready: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
        })
    });
    pool.as_ref()
        .map_err(|e| StoreError::Unavailable(e.clone()))
}

/// Runs one job on the calling sequencer thread.
fn run_job(board: &Board, job: Job) {
    // A panic in one job must not take the thread down with it: the submitter sees its
    // reply dropped (an error), the next job runs.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job {
        Job::Update {
            origin,
            update,
            message,
            queued,
            reply,
        } => {
            let _ = reply.send(board.sequence_update(origin, &update, message, queued));
        }
        Job::Restore { version, reply } => {
            let _ = reply.send(board.sequence_restore(version));
        }
        Job::Barrier(reply) => {
            let _ = reply.send(());
        }
    }));
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
