//! Per-session lanes on a small thread pool: a session's serial work (the whiteboard's
//! updates and restores through its sequencer, the tutor room's posts, edits and
//! moderation) runs off the async workers, in the order it was queued.
//!
//! A pool of `easel-lane` threads (one per core, at least two) started on first use and
//! shared by every session, like tokio's blocking pool; one lane per session and kind of
//! work, with a bounded queue ([`QUEUE_JOBS`]); a lane run by at most one thread at a time
//! so its jobs keep one order, a turn of `JOBS_PER_TURN` jobs before another lane gets
//! the thread. A job is any closure; its result goes back to the awaiting submitter through
//! a oneshot.
//!
//! Must not touch sockets or hold a lock across a job: a job is plain blocking work (the
//! store, an fsync) and queues what it relays into outboxes.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::sync;

/// Jobs a lane's queue holds; past it a submitter awaits space (a WebSocket reader then
/// reads no further frame, so TCP pushes back on a fast client). Each queued job belongs
/// to a submitter that awaits its outcome (a WebSocket reader has at most one in flight),
/// so the queue holds no bytes a reader does not already hold; what the bound caps is the
/// wait: at ~25 µs per whiteboard update (apply plus the sled insert, measured on this
/// machine), 64 queued updates are about 1.6 ms of work, under scenario b's p99 target of
/// 3 ms, while a burst of up to 64 writers at once never waits for space.
pub const QUEUE_JOBS: usize = 64;

/// Jobs a lane runs before it lets another session's lane have the thread.
const JOBS_PER_TURN: usize = 32;

/// The name of the pool's threads.
pub const THREAD_NAME: &str = "easel-lane";

/// Why a job did not run to its end.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LaneError {
    #[error("no lane thread could start: {0}")]
    NoThreads(String),
    #[error("the job stopped before it finished")]
    Stopped,
}

type Task = Box<dyn FnOnce() + Send + 'static>;

/// Whether the calling thread is one of the pool's: work meant for a lane asserts it (in
/// debug builds, so the integration tests' server checks every chat change it makes).
pub fn on_lane_thread() -> bool {
    std::thread::current().name() == Some(THREAD_NAME)
}

#[derive(Default)]
struct LaneState {
    jobs: VecDeque<(Task, OwnedSemaphorePermit)>,
    /// On the pool's ready list or running.
    scheduled: bool,
}

/// One session's queue. Ends with its owner once what it holds has run.
pub struct Lane {
    state: Arc<Mutex<LaneState>>,
    /// Places in the queue ([`QUEUE_JOBS`]).
    room: Arc<Semaphore>,
}

impl Default for Lane {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            room: Arc::new(Semaphore::new(QUEUE_JOBS)),
        }
    }
}

impl Lane {
    /// A handle that tells whether jobs wait in this lane's queue, for a job that would
    /// rather leave something for the next one (a batch) when one follows.
    pub fn backlog(&self) -> Backlog {
        Backlog(self.state.clone())
    }

    /// Queues `job` (awaiting a place while the queue is full) and resolves to its result.
    /// The returned future owns what it needs; dropping it before the job is queued
    /// queues nothing, dropping it after lets the job run all the same.
    pub fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> impl Future<Output = Result<T, LaneError>> + Send + 'static {
        self.run_replying(move |reply| reply.send(job()))
    }

    /// Like [`Lane::run`], but the job hands its result to [`Reply::send`] itself and may
    /// go on after: what it does then delays the jobs behind it, not its submitter.
    pub fn run_replying<T: Send + 'static>(
        &self,
        job: impl FnOnce(Reply<T>) + Send + 'static,
    ) -> impl Future<Output = Result<T, LaneError>> + Send + 'static {
        let (state, room) = (self.state.clone(), self.room.clone());
        async move {
            let place = room.acquire_owned().await.map_err(|_| LaneError::Stopped)?;
            let pool = pool()?;
            let reply = enqueue(&state, pool, place, job);
            reply.await.map_err(|_| LaneError::Stopped)
        }
    }

    /// Like [`Lane::run_replying`], but only if the queue has a place now: the job is then
    /// queued before this returns, and the future only awaits its result. Otherwise the job
    /// comes back, for the caller to queue with [`Lane::run_replying`] (and await a place).
    pub fn try_run_replying<T: Send + 'static, J: FnOnce(Reply<T>) + Send + 'static>(
        &self,
        job: J,
    ) -> Result<impl Future<Output = Result<T, LaneError>> + Send + 'static, J> {
        let (Ok(place), Ok(pool)) = (self.room.clone().try_acquire_owned(), pool()) else {
            return Err(job);
        };
        let reply = enqueue(&self.state, pool, place, job);
        Ok(async move { reply.await.map_err(|_| LaneError::Stopped) })
    }
}

/// Puts `job` in a lane's queue with its place and schedules the lane if it was idle;
/// returns where its result will come.
fn enqueue<T: Send + 'static>(
    state: &Arc<Mutex<LaneState>>,
    pool: &'static Pool,
    place: OwnedSemaphorePermit,
    job: impl FnOnce(Reply<T>) + Send + 'static,
) -> oneshot::Receiver<T> {
    let (tx, rx) = oneshot::channel();
    let task: Task = Box::new(move || {
        // A panic in one job must not take the thread down: the submitter sees its reply
        // dropped, the next job runs.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Reply(tx))));
    });
    let schedule = {
        let mut s = sync::lock(state);
        s.jobs.push_back((task, place));
        !std::mem::replace(&mut s.scheduled, true)
    };
    if schedule {
        pool.ready(state.clone());
    }
    rx
}

/// Where a job sends its result (see [`Lane::run_replying`]).
pub struct Reply<T>(oneshot::Sender<T>);

impl<T> Reply<T> {
    /// Hands `value` to the submitter (if it still waits).
    pub fn send(self, value: T) {
        let _ = self.0.send(value);
    }
}

/// Whether jobs wait in a lane's queue (see [`Lane::backlog`]).
pub struct Backlog(Arc<Mutex<LaneState>>);

impl Backlog {
    /// Whether a job is queued behind the one running (it will run: a queued job is never
    /// dropped unrun).
    pub fn is_empty(&self) -> bool {
        sync::lock(&self.0).jobs.is_empty()
    }
}

/// The threads and the lanes waiting for one.
struct Pool {
    ready: Mutex<VecDeque<Arc<Mutex<LaneState>>>>,
    wake: Condvar,
}

impl Pool {
    fn ready(&self, lane: Arc<Mutex<LaneState>>) {
        sync::lock(&self.ready).push_back(lane);
        self.wake.notify_one();
    }

    /// A pool thread: runs lanes, a turn at a time, for the life of the process.
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
                let next = sync::lock(&lane).jobs.pop_front();
                // The place is given back once the job has run.
                let Some((task, _place)) = next else { break };
                task();
            }
            let more = {
                let mut s = sync::lock(&lane);
                s.scheduled = !s.jobs.is_empty();
                s.scheduled
            };
            if more {
                self.ready(lane);
            }
        }
    }
}

/// The pool, its threads started on first use. `Err` only if not one thread could start.
fn pool() -> Result<&'static Pool, LaneError> {
    static POOL: OnceLock<Result<Pool, String>> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let mut started = 0;
        let mut error = String::new();
        for _ in 0..threads {
            let spawned = std::thread::Builder::new()
                .name(THREAD_NAME.into())
                .spawn(|| {
                    // Waits until `get_or_init` has put the pool in place.
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
            return Err(error);
        }
        Ok(Pool {
            ready: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
        })
    });
    pool.as_ref().map_err(|e| LaneError::NoThreads(e.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_the_pool() {
        let lane = Lane::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let job = |i: usize| {
            let seen = seen.clone();
            move |reply: Reply<Option<String>>| {
                sync::lock(&seen).push(i);
                reply.send(std::thread::current().name().map(str::to_owned));
            }
        };
        // Queued from one task in a known order (`try_run_replying` queues before it
        // returns; on a full queue, the oldest job is awaited first): they run in it.
        let mut queued = VecDeque::new();
        for i in 0..200 {
            let mut next = job(i);
            loop {
                match lane.try_run_replying(next) {
                    Ok(outcome) => break queued.push_back(outcome),
                    Err(back) => {
                        next = back;
                        let oldest = queued.pop_front().expect("a full queue holds a job");
                        assert_eq!(oldest.await.unwrap().as_deref(), Some(THREAD_NAME));
                    }
                }
            }
        }
        for outcome in queued {
            assert_eq!(outcome.await.unwrap().as_deref(), Some(THREAD_NAME));
        }
        assert_eq!(*sync::lock(&seen), (0..200).collect::<Vec<_>>());

        // Submitters on tasks of their own, more than the queue holds: each awaits a place
        // and gets its job's result (the order in which the runtime polls the tasks is
        // its own, so only that every job ran is checked).
        sync::lock(&seen).clear();
        let outcomes: Vec<_> = (0..200)
            .map(|i| tokio::spawn(lane.run_replying(job(i))))
            .collect();
        for o in outcomes {
            assert_eq!(o.await.unwrap().unwrap().as_deref(), Some(THREAD_NAME));
        }
        let mut ran = sync::lock(&seen).clone();
        ran.sort_unstable();
        assert_eq!(ran, (0..200).collect::<Vec<_>>());

        // A job that replies first and goes on: the reply arrives, and the job's rest runs
        // before the next job.
        let after = lane.run_replying({
            let seen = seen.clone();
            move |reply| {
                reply.send("replied");
                sync::lock(&seen).push(200);
            }
        });
        assert_eq!(after.await, Ok("replied"));
        let next = lane.run({
            let seen = seen.clone();
            move || sync::lock(&seen).last().copied()
        });
        assert_eq!(next.await, Ok(Some(200)));
        let panicked = lane.run(|| panic!("boom")).await;
        assert_eq!(panicked, Err(LaneError::Stopped));
        assert_eq!(lane.run(|| 7).await, Ok(7));
    }
}
