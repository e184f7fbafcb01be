//! The registry of live sessions.
//!
//! A session is loaded from the [`Store`] on first use (once, however many open it at the
//! same time: [`Registry::open_shared`]) and shared as an `Arc<Session>`;
//! each connection holds a [`SessionHandle`], and when the last handle is gone the session
//! is snapshotted and, `sessions.idle_unload_s` later, dropped from memory (the classic leak
//! of Yjs servers is docs kept after their last client left). The registry owns the map
//! and the reaper; what a session does lives in [`whiteboard`] and [`tutor`], and every
//! fan-out goes through [`peers::Peers::broadcast`]. Must not touch sockets or HTTP: the
//! `ws` and `http` layers call in.

pub mod bus;
pub mod lane;
pub mod peers;
pub mod prepare;
pub mod tutor;
pub mod whiteboard;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::{Config, Durability};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::sync;
use tutor::TutorRoom;
use whiteboard::{ConnId, Whiteboard, WhiteboardOptions};

/// `[A-Za-z0-9_-]{1,128}`.
pub fn valid_session_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub struct Session {
    pub id: Arc<str>,
    pub whiteboard: Whiteboard,
    pub tutor: TutorRoom,
    handles: AtomicUsize,
    /// When the last handle went away (for the reaper).
    idle_since: Mutex<Option<Instant>>,
}

impl Session {
    fn idle_since(&self) -> MutexGuard<'_, Option<Instant>> {
        sync::lock(&self.idle_since)
    }

    /// Applies what another node published about this session (cluster mode).
    pub fn hear(&self, node: &str, event: bus::Event) {
        match event {
            bus::Event::Awareness(update) => self.whiteboard.apply_remote_awareness(node, &update),
            bus::Event::AwarenessQuery => self.whiteboard.publish_local_awareness(),
            event => self.tutor.hear(node, event),
        }
    }

    /// A node died (cluster mode): its clients' presence and awareness go.
    pub fn node_gone(&self, node: &str) {
        self.tutor.node_gone(node);
        self.whiteboard.drop_node_awareness(node);
    }

    /// Whether a connection or a request holds the session now.
    pub fn in_use(&self) -> bool {
        self.handles.load(Ordering::Acquire) > 0
    }
}

/// Keeps a session loaded while a connection (or a request) uses it.
pub struct SessionHandle {
    session: Arc<Session>,
}

impl std::ops::Deref for SessionHandle {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}

/// Another hold on the same session (e.g. for a chat change on the tutor room's lane, so
/// the session stays loaded until the change is made, whoever stops waiting for it).
impl Clone for SessionHandle {
    fn clone(&self) -> Self {
        Registry::handle(&self.session)
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        if self.session.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last client left: housekeeping snapshots it within a second, off the
            // async threads (encoding a large document must not stall a socket).
            *self.session.idle_since() = Some(Instant::now());
        }
    }
}

/// The registry's map: loaded sessions, and the loads under way.
#[derive(Default)]
struct Sessions {
    live: HashMap<Arc<str>, Arc<Session>>,
    /// One load per session at a time (single flight): whoever finds a session here
    /// awaits the loader's signal instead of loading (and decoding) it again.
    loading: HashMap<Arc<str>, tokio::sync::watch::Receiver<bool>>,
}

/// The loader's hold on a load under way: once it is over, however it ends (loaded, a
/// store error, a panic), the entry goes and the waiters are woken to look again.
struct Flight<'a> {
    registry: &'a Registry,
    id: Arc<str>,
    done: tokio::sync::watch::Sender<bool>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.registry.map().loading.remove(&self.id);
        let _ = self.done.send(true);
    }
}

pub struct Registry {
    sessions: Mutex<Sessions>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    config: Arc<Config>,
    next_conn: AtomicU64,
    /// Cluster mode: the other nodes, told of every session loaded and unloaded here.
    bus: Option<Arc<dyn bus::Bus>>,
}

impl Registry {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>, config: Arc<Config>) -> Self {
        Self {
            sessions: Mutex::new(Sessions::default()),
            store,
            metrics,
            config,
            next_conn: AtomicU64::new(1),
            bus: None,
        }
    }

    /// A registry of one node of a cluster (SPEC 9), whose store is shared with the others.
    pub fn with_bus(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        config: Arc<Config>,
        bus: Arc<dyn bus::Bus>,
    ) -> Self {
        Self {
            bus: Some(bus),
            ..Self::new(store, metrics, config)
        }
    }

    fn map(&self) -> MutexGuard<'_, Sessions> {
        sync::lock(&self.sessions)
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub fn loaded(&self) -> usize {
        self.map().live.len()
    }

    /// The session, loaded from the store if it is not in memory: what the server's
    /// connections and requests call. The store read and the decode run on the blocking
    /// pool, once however many open the session at the same time: the first one loads, the
    /// others await it (a join storm on an unloaded 20 MB board decodes it once).
    pub async fn open_shared(self: &Arc<Self>, id: &str) -> Result<SessionHandle, StoreError> {
        /// What the map says, decided under its lock and acted on outside it.
        enum Next {
            Open(SessionHandle),
            Await(tokio::sync::watch::Receiver<bool>),
            Load(Arc<str>, tokio::sync::watch::Sender<bool>),
        }
        loop {
            let next = {
                let mut map = self.map();
                if let Some(s) = map.live.get(id) {
                    // Taken under the map's lock, so the reaper cannot unload it in between.
                    Next::Open(Self::handle(s))
                } else if let Some(loaded) = map.loading.get(id) {
                    Next::Await(loaded.clone())
                } else {
                    let (done, loaded) = tokio::sync::watch::channel(false);
                    let id: Arc<str> = Arc::from(id);
                    map.loading.insert(id.clone(), loaded);
                    Next::Load(id, done)
                }
            };
            match next {
                Next::Open(handle) => return Ok(handle),
                Next::Await(mut loaded) => {
                    // Over however it ended: look again (after a failed load, this one
                    // tries itself).
                    let _ = loaded.wait_for(|done| *done).await;
                }
                Next::Load(id, done) => {
                    // The load completes (and registers the session) even if this caller
                    // goes away meanwhile; its handle is then dropped, and the session
                    // unloaded like any other unused one.
                    let registry = self.clone();
                    return tokio::task::spawn_blocking(move || {
                        let flight = Flight {
                            registry: &registry,
                            id,
                            done,
                        };
                        registry.load_and_register(&flight.id)
                    })
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("session load failed: {e}")))?;
                }
            }
        }
    }

    /// The session, loaded from the store on this thread if it is not in memory: for
    /// callers without a runtime (the CLI) and tests. Should another caller load the same
    /// session meanwhile, the first one in wins.
    pub fn open(&self, id: &str) -> Result<SessionHandle, StoreError> {
        if let Some(s) = self.map().live.get(id) {
            // Taken under the map's lock, so the reaper cannot unload it in between.
            return Ok(Self::handle(s));
        }
        self.load_and_register(id)
    }

    /// Loads without holding the map's lock, so other sessions are not held up, then
    /// registers the session (unless another caller did first: then that one is used).
    fn load_and_register(&self, id: &str) -> Result<SessionHandle, StoreError> {
        let loaded = Arc::new(self.load(id)?);
        // Attached to the other nodes before anyone can use it: a user joining or a chat
        // posted before would not be published, or would move the chat cursor past other
        // nodes' messages.
        if let Some(bus) = &self.bus {
            bus.hold(&loaded);
        }
        let (handle, ours) = {
            let mut map = self.map();
            let live = map.live.entry(loaded.id.clone()).or_insert(loaded.clone());
            let ours = Arc::ptr_eq(live, &loaded);
            let handle = Self::handle(live);
            self.metrics.sessions_loaded.set(map.live.len() as i64);
            (handle, ours)
        };
        if let (Some(bus), false) = (&self.bus, ours) {
            // Another caller's replica won: it is the one to feed (holding ours may have
            // taken its place; holding it again is a no-op when it had not).
            bus.release(&loaded);
            bus.hold(&handle.session);
        }
        Ok(handle)
    }

    fn handle(session: &Arc<Session>) -> SessionHandle {
        session.handles.fetch_add(1, Ordering::AcqRel);
        *session.idle_since() = None;
        SessionHandle {
            session: session.clone(),
        }
    }

    fn sync_durability(&self) -> bool {
        self.config.persist.durability == Durability::Sync
    }

    fn load(&self, id: &str) -> Result<Session, StoreError> {
        let id: Arc<str> = Arc::from(id);
        Ok(Session {
            whiteboard: Whiteboard::load(
                id.clone(),
                self.store.clone(),
                self.metrics.clone(),
                WhiteboardOptions {
                    echo_updates: self.config.whiteboard.echo_updates,
                    awareness_tick: Duration::from_millis(self.config.whiteboard.awareness_tick_ms),
                    flush_before_relay: self.sync_durability(),
                    snapshot_every_updates: self.config.persist.snapshot_every_updates.max(1),
                    limits: self.config.limits,
                    shared_log: self.bus.is_some(),
                },
            )?,
            tutor: TutorRoom::load(
                id.clone(),
                self.store.clone(),
                self.metrics.clone(),
                self.config.tutor.history_limit,
                self.sync_durability(),
                Duration::from_secs(self.config.tutor.remove_ban_s),
            )?,
            id,
            handles: AtomicUsize::new(0),
            idle_since: Mutex::new(None),
        })
    }

    /// Drops sessions idle for longer than `idle`. Returns how many were unloaded. A
    /// changed session whose snapshot cannot be written stays loaded.
    ///
    /// Decided under the map's lock, done outside it: a snapshot of a large board takes
    /// seconds, and every `open` waits on that lock. A session stays in the map while its
    /// snapshot is written (an `open` meanwhile takes it as it is: never loaded twice), and
    /// is removed only if, under the lock again, it is still unused and has nothing the
    /// snapshot missed (else a later round saves and unloads it).
    pub fn unload_idle(&self, idle: Duration) -> usize {
        if self.store.check().is_err() {
            return 0;
        }
        let unused = |s: &Session| {
            s.handles.load(Ordering::Acquire) == 0
                && s.idle_since().is_some_and(|t| t.elapsed() >= idle)
                // A job whose submitter went away still runs: not before it has.
                && s.whiteboard.sequencer_idle()
        };
        let candidates: Vec<Arc<Session>> = self
            .map()
            .live
            .values()
            .filter(|s| unused(s))
            .cloned()
            .collect();
        let mut unloaded = 0;
        for s in candidates {
            if let Err(e) = s.whiteboard.snapshot_if_dirty() {
                tracing::error!(session = %s.id, error = %e, "snapshot before unload failed; kept loaded");
                continue;
            }
            let removed = {
                let mut map = self.map();
                // A handle is only taken under this lock, so `unused` cannot change
                // before the removal; and whatever changed the board since the snapshot
                // left it dirty.
                let same = map.live.get(&s.id).is_some_and(|m| Arc::ptr_eq(m, &s));
                let removed = (same && unused(&s) && !s.whiteboard.is_dirty())
                    .then(|| map.live.remove(&s.id))
                    .flatten();
                self.metrics.sessions_loaded.set(map.live.len() as i64);
                removed
            };
            // Dropped here, outside the lock: freeing a large document takes a while.
            if removed.is_some() {
                if let Some(bus) = &self.bus {
                    bus.release(&s);
                }
                unloaded += 1;
            }
        }
        unloaded
    }

    /// Every loaded session (a copy of the list: the registry's lock is not held after).
    pub fn live_sessions(&self) -> Vec<Arc<Session>> {
        self.sessions_where(|_| true)
    }

    /// The loaded sessions `wanted` says yes to; it is asked under the registry's lock, so
    /// it must only read a few counters.
    pub fn sessions_where(&self, wanted: impl Fn(&Session) -> bool) -> Vec<Arc<Session>> {
        self.map()
            .live
            .values()
            .filter(|s| wanted(s))
            .cloned()
            .collect()
    }

    /// Snapshots every changed session (shutdown). Returns the sessions it could not
    /// save, with the reason (each is logged too).
    pub fn snapshot_all(&self) -> Vec<(Arc<str>, String)> {
        let sessions = self.live_sessions();
        let mut failed = Vec::new();
        let mut saved = Vec::new();
        for s in sessions {
            // Updates still queued (their connections closed without awaiting them) are
            // stored and counted before the snapshot, not after the final flush.
            s.whiteboard.settle();
            match s.whiteboard.snapshot_if_dirty() {
                Ok(Some(version)) => saved.push(format!("{} v{version}", s.id)),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(session = %s.id, error = %e, "snapshot failed: this session's latest changes may not be saved");
                    failed.push((s.id.clone(), e.to_string()));
                }
            }
        }
        // What the operator needs to hear at shutdown: which sessions were saved, as what.
        if saved.is_empty() {
            tracing::info!("final save: no session had unsaved changes");
        } else {
            tracing::info!(snapshots = %saved.join(", "), "final save: wrote {} snapshot(s)", saved.len());
        }
        failed
    }

    /// Snapshots changed sessions whose last snapshot is older than
    /// `persist.snapshot_interval_s`, whose last client left, or whose log has grown enough
    /// ([`Board::snapshot_wanted`](crate::session::whiteboard::Board::snapshot_wanted)). Returns how many it wrote.
    pub fn snapshot_due(&self) -> usize {
        if self.store.check().is_err() {
            // The store refuses writes (and says why in /readyz): trying every session
            // every second would only fill the log. They stay dirty for later.
            return 0;
        }
        let interval = Duration::from_secs(self.config.persist.snapshot_interval_s);
        let sessions = self.live_sessions();
        let mut written = 0;
        for s in sessions {
            let age = s.whiteboard.snapshot_age();
            let unused = s.handles.load(Ordering::Acquire) == 0;
            let due = age >= interval || unused || s.whiteboard.snapshot_wanted();
            if s.whiteboard.is_dirty() && due {
                match s.whiteboard.snapshot_if_dirty() {
                    Ok(Some(_)) => written += 1,
                    Ok(None) => {}
                    Err(e) => tracing::error!(session = %s.id, error = %e, "snapshot failed"),
                }
            }
        }
        written
    }

    /// Runs the housekeeping until `shutdown` fires: due snapshots, then idle unloads, once
    /// a second, on a thread of its own; and, with permessage-deflate on, the join answers
    /// of large boards at rest prepared ahead ([`prepare`]), on another.
    ///
    /// The housekeeping thread runs at a lower CPU priority (nice 10): a snapshot builds and encodes a
    /// whole document, seconds of CPU for a large board, and on a saturated machine it must
    /// take what the relay leaves rather than compete with it (measured: at the relay's
    /// saturation point, a snapshot at equal priority pushed fan-out p99 past 50 ms).
    pub async fn run_housekeeping(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let idle = Duration::from_secs(self.config.sessions.idle_unload_s);
        type Done = tokio::sync::oneshot::Sender<(usize, usize)>;
        let (ticks, ticked) = std::sync::mpsc::sync_channel::<Done>(1);
        let registry = self.clone();
        let worker = std::thread::Builder::new()
            .name("easel-housekeeping".into())
            .spawn(move || {
                lower_this_threads_priority();
                // Ends when the async side below drops `ticks`.
                while let Ok(done) = ticked.recv() {
                    let written = registry.snapshot_due();
                    let unloaded = registry.unload_idle(idle);
                    if unloaded > 0 {
                        return_freed_memory();
                    }
                    let _ = done.send((written, unloaded));
                }
            });
        if let Err(e) = worker {
            tracing::error!(error = %e, "cannot start the housekeeping thread: no snapshots until shutdown, no unloads");
            return;
        }
        // Passes of the preparer: a tick is skipped while it is still busy with the last.
        let passes = self
            .config
            .limits
            .permessage_deflate
            .then(|| self.clone().start_preparer())
            .flatten();
        let mut pass_every = tokio::time::interval(prepare::PASS_EVERY);
        pass_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = pass_every.tick(), if passes.is_some() => {
                    if let Some(passes) = &passes {
                        let _ = passes.try_send(());
                    }
                }
                _ = interval.tick() => {
                    let (done, result) = tokio::sync::oneshot::channel();
                    if ticks.send(done).is_err() {
                        return;
                    }
                    if let Ok((snapshots, unloaded)) = result.await {
                        if snapshots + unloaded > 0 {
                            tracing::debug!(snapshots, unloaded, "housekeeping");
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Starts the thread that prepares join answers ahead ([`prepare::Preparer`]), one pass
    /// per message on the returned channel; it ends when the channel is dropped. `None` if
    /// the thread could not start (logged: joins then compress when asked, as without it).
    fn start_preparer(self: Arc<Self>) -> Option<std::sync::mpsc::SyncSender<()>> {
        let (passes, passed) = std::sync::mpsc::sync_channel::<()>(1);
        let handle = tokio::runtime::Handle::current();
        let started = std::thread::Builder::new()
            .name("easel-prepare".into())
            .spawn(move || {
                // At normal priority, unlike the housekeeping: a join storm that comes while
                // an answer is being prepared waits for it, and at nice 10 on a machine the
                // storm keeps busy that took more than twice as long (scenario f: p50 2.2 ×
                // the trivial server's in such a run). The duty rule bounds its CPU instead.
                let mut preparer = prepare::Preparer::default();
                while passed.recv().is_ok() {
                    if let Some((session, answer, took)) =
                        preparer.pass(&self, &handle, Instant::now())
                    {
                        tracing::debug!(%session, ?answer, ?took, "join answer prepared ahead");
                    }
                }
            });
        match started {
            Ok(_) => Some(passes),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the thread preparing join answers: joins compress when asked");
                None
            }
        }
    }
}

/// Hands the memory the allocator holds free back to the system, once a whole document was
/// freed: after an unload, and after a snapshot rebuilt one beside the live one.
///
/// glibc keeps freed memory for reuse and returns only what lies at the top of a heap; a
/// busy board's rebuilds free hundreds of MB of small blocks between live ones, so without
/// this the process kept its highest peak for good: a board erased as it is drawn on (e's
/// writers, 960 updates/s each) held 647 MB of RSS after 60 s, 245 MB with it
/// (BENCHMARKS.md, issue 13, fourteenth round). `malloc_trim` gives back every free page,
/// not only the top (glibc ≥ 2.8); it took 1–52 ms there, off the relay. Not after every
/// snapshot: one that encodes the live document frees little but its state, which a large
/// board's is mapped on its own and returned when freed anyway.
pub(crate) fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    {
        let started = Instant::now();
        // SAFETY: glibc's own call, on its own state; no pointer is passed.
        let released = unsafe { libc::malloc_trim(0) } != 0;
        tracing::debug!(
            released,
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "freed memory returned to the system"
        );
    }
}

/// Lowers the calling thread's CPU priority to nice 10 (Linux: `setpriority` on a thread id
/// affects that thread only). Failure only costs the priority, so it is logged, not fatal.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: two plain syscalls about the calling thread; no memory is shared.
        let failed = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 10) != 0
        };
        if failed {
            tracing::debug!(error = %std::io::Error::last_os_error(), "housekeeping keeps normal priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        assert!(valid_session_id("abc-DEF_123"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id("a/b"));
        assert!(!valid_session_id("ä"));
        assert!(valid_session_id(&"a".repeat(128)));
        assert!(!valid_session_id(&"a".repeat(129)));
    }

    #[test]
    fn hostile_updates_are_refused_and_leave_the_document_working() {
        let store: Arc<dyn Store> = Arc::new(crate::store::MemoryStore::default());
        let reg = Registry::new(store, Arc::new(Metrics::new()), Arc::new(Config::default()));
        let h = reg.open("s").unwrap();
        let valid = |key: &str| {
            use yrs::{Map, Transact};
            let doc = yrs::Doc::new();
            let map = doc.get_or_insert_map("m");
            let mut txn = doc.transact_mut();
            map.insert(&mut txn, key, "some longer value to mutate");
            txn.encode_update_v1()
        };
        let base = valid("k");
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5_000 {
            let mut bytes = base.clone();
            for _ in 0..1 + next() % 3 {
                let i = (next() as usize) % bytes.len();
                bytes[i] = next() as u8;
            }
            // Applied, or refused with an error: never a panic out of here.
            let _ = h.whiteboard.apply_update(None, &bytes, None);
        }
        assert!(h
            .whiteboard
            .apply_update(None, &valid("after"), None)
            .unwrap());
    }

    /// A store (a [`MemoryStore`](crate::store::MemoryStore) unless a test gives another)
    /// whose `write_snapshot` can wait for a go signal (so a test can apply an update after
    /// a snapshot's state was built and before it is written), and whose stored whiteboards
    /// can be made to read back empty (as if damaged).
    #[derive(Default)]
    struct GatedStore {
        inner: InnerStore,
        gate: Option<(
            std::sync::mpsc::SyncSender<()>,
            Mutex<std::sync::mpsc::Receiver<()>>,
        )>,
        reads_empty: std::sync::atomic::AtomicBool,
        /// A gate each update append waits at (like `gate`).
        append_gate: Option<(
            std::sync::mpsc::SyncSender<()>,
            Mutex<std::sync::mpsc::Receiver<()>>,
        )>,
        /// The length of each run of updates appended as one (`append_updates`).
        runs: Mutex<Vec<usize>>,
        /// Every update append fails while set (as a full disk makes sled's).
        appends_fail: std::sync::atomic::AtomicBool,
        /// Whiteboard loads so far, and a gate each load waits at (like `gate`).
        loads: AtomicUsize,
        load_gate: Option<(
            std::sync::mpsc::SyncSender<()>,
            Mutex<std::sync::mpsc::Receiver<()>>,
        )>,
        /// A gate the next scan of a whiteboard waits at once it handed over the snapshot
        /// (like `gate`; only while `scan_gate_armed`, which that scan clears).
        scan_gate: Option<(
            std::sync::mpsc::SyncSender<()>,
            Mutex<std::sync::mpsc::Receiver<()>>,
        )>,
        scan_gate_armed: std::sync::atomic::AtomicBool,
    }

    /// The store a [`GatedStore`] passes calls on to.
    struct InnerStore(Box<dyn Store>);

    impl Default for InnerStore {
        fn default() -> Self {
            Self(Box::new(crate::store::MemoryStore::default()))
        }
    }

    impl std::ops::Deref for InnerStore {
        type Target = dyn Store;
        fn deref(&self) -> &Self::Target {
            &*self.0
        }
    }

    impl Store for GatedStore {
        fn load_whiteboard(&self, s: &str) -> Result<crate::store::StoredWhiteboard, StoreError> {
            self.loads.fetch_add(1, Ordering::AcqRel);
            if let Some((entered, go)) = &self.load_gate {
                let _ = entered.send(());
                let _ = go.lock().unwrap().recv();
            }
            if self.reads_empty.load(Ordering::Acquire) {
                return Ok(Default::default());
            }
            self.inner.load_whiteboard(s)
        }
        fn scan_whiteboard(
            &self,
            s: &str,
            each: &mut dyn FnMut(crate::store::StoredRecord<'_>),
        ) -> Result<u64, StoreError> {
            let Some((entered, go)) = self
                .scan_gate
                .as_ref()
                .filter(|_| self.scan_gate_armed.swap(false, Ordering::AcqRel))
            else {
                // What the other gates and `reads_empty` act on, as the default scan.
                return Ok(self.load_whiteboard(s)?.hand_over(each));
            };
            self.inner.scan_whiteboard(s, &mut |record| {
                let snapshot = matches!(record, crate::store::StoredRecord::Snapshot { .. });
                each(record);
                if snapshot {
                    let _ = entered.send(());
                    let _ = go.lock().unwrap().recv_timeout(Duration::from_secs(10));
                }
            })
        }
        fn append_update(&self, s: &str, seq: u64, update: &[u8]) -> Result<u64, StoreError> {
            self.append_updates(s, seq, &[update])
        }
        fn append_updates(
            &self,
            s: &str,
            first_seq: u64,
            updates: &[&[u8]],
        ) -> Result<u64, StoreError> {
            if let Some((entered, go)) = &self.append_gate {
                let _ = entered.send(());
                let _ = go.lock().unwrap().recv();
            }
            if self.appends_fail.load(Ordering::Acquire) {
                return Err(StoreError::Unavailable("the test's disk is full".into()));
            }
            self.runs.lock().unwrap().push(updates.len());
            self.inner.append_updates(s, first_seq, updates)
        }
        fn write_snapshot(
            &self,
            s: &str,
            state: &[u8],
            sv: &[u8],
            count: u64,
            log_through: u64,
        ) -> Result<u64, StoreError> {
            if let Some((entered, go)) = &self.gate {
                let _ = entered.send(());
                let _ = go.lock().unwrap().recv();
            }
            self.inner.write_snapshot(s, state, sv, count, log_through)
        }
        fn list_snapshots(&self, s: &str) -> Result<Vec<crate::store::SnapshotInfo>, StoreError> {
            self.inner.list_snapshots(s)
        }
        fn get_snapshot(&self, s: &str, v: u64) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get_snapshot(s, v)
        }
        fn list_sessions(&self) -> Result<Vec<crate::store::SessionInfo>, StoreError> {
            self.inner.list_sessions()
        }
        fn append_chat(
            &self,
            s: &str,
            m: &crate::protocol::tutor::ChatMessage,
            limit: usize,
        ) -> Result<u64, StoreError> {
            self.inner.append_chat(s, m, limit)
        }
        fn chat_after(
            &self,
            s: &str,
            after: u64,
            limit: usize,
        ) -> Result<Vec<crate::protocol::tutor::ChatMessage>, StoreError> {
            self.inner.chat_after(s, after, limit)
        }
        fn chat_before(
            &self,
            s: &str,
            before: u64,
            limit: usize,
        ) -> Result<Vec<crate::protocol::tutor::ChatMessage>, StoreError> {
            self.inner.chat_before(s, before, limit)
        }
        fn last_chat_seq(&self, s: &str) -> Result<u64, StoreError> {
            self.inner.last_chat_seq(s)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush()
        }
        fn check(&self) -> Result<(), StoreError> {
            self.inner.check()
        }
    }

    /// A registry on `store` with the default configuration.
    fn registry_on(store: Arc<GatedStore>) -> Registry {
        Registry::new(store, Arc::new(Metrics::new()), Arc::new(Config::default()))
    }

    /// Connects a peer to the session's whiteboard: with a client connected, a snapshot is
    /// built from the store (the path these tests are about), not from the live document.
    fn connect_peer(h: &SessionHandle) -> crate::ws::outbox::OutboxReceiver {
        let (outbox, received) = crate::ws::outbox::outbox(1 << 20);
        h.whiteboard.join(1, outbox);
        received
    }

    /// The update that sets `key` to itself in `writer`'s map "m".
    fn set_key(writer: &yrs::Doc, key: &str) -> Vec<u8> {
        use yrs::{Map, Transact};
        let map = writer.get_or_insert_map("m");
        let mut txn = writer.transact_mut();
        map.insert(&mut txn, key, key);
        txn.encode_update_v1()
    }

    /// An update whose submitter went away (a cancelled HTTP request, a closed connection)
    /// while it waited on the sequencer: the session stays loaded until it has run, so it
    /// is never appended from an unloaded board (whose log seq a reloaded board would hand
    /// out again, overwriting one of the two entries).
    #[test]
    fn a_session_does_not_unload_under_a_queued_update() {
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (go, go_rx) = std::sync::mpsc::sync_channel(1);
        let store = Arc::new(GatedStore {
            append_gate: Some((entered_tx, Mutex::new(go_rx))),
            ..Default::default()
        });
        let reg = registry_on(store.clone());
        let h = reg.open("s").unwrap();
        let writer = yrs::Doc::new();
        let outcome = h
            .whiteboard
            .submit_update(None, set_key(&writer, "k").into(), None);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let submitter = std::thread::spawn(move || runtime.block_on(outcome));
        // The update is in the store's append; its submitter's handle goes.
        entered.recv().unwrap();
        drop(h);
        assert_eq!(
            reg.unload_idle(Duration::ZERO),
            0,
            "unloaded under a queued update"
        );
        go.send(()).unwrap();
        assert!(submitter.join().unwrap().unwrap());
        // Once it has run (and been snapshotted), the session unloads.
        // (Its place in the queue is given back just after its outcome.)
        let deadline = Instant::now() + Duration::from_secs(5);
        while reg.unload_idle(Duration::ZERO) == 0 {
            assert!(Instant::now() < deadline, "never unloaded");
            std::thread::yield_now();
        }
    }

    /// Queues each of `updates` from connection `conn` as its reader does (several in
    /// flight), behind a held sequencer, then lets them run; their outcomes in order.
    fn queued_by_a_reader(
        wb: &Whiteboard,
        conn: ConnId,
        refused: &Arc<std::sync::atomic::AtomicBool>,
        updates: Vec<Vec<u8>>,
    ) -> Vec<Result<bool, whiteboard::ApplyError>> {
        let release = wb.hold_sequencer();
        let outcomes: Vec<_> = updates
            .into_iter()
            .map(|u| match wb.queue_update(conn, refused, u.into(), None) {
                whiteboard::Submitted::Queued(o) | whiteboard::Submitted::Waiting(o) => o,
            })
            .collect();
        drop(release);
        outcomes.into_iter().map(block_on).collect()
    }

    /// Runs an outcome to its end on this thread.
    fn block_on<T>(outcome: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(outcome)
    }

    /// A session open on a fresh [`GatedStore`], with a peer connected (see
    /// [`connect_peer`]) whose greeting is read already.
    fn open_with_peer() -> (
        Arc<GatedStore>,
        Registry,
        SessionHandle,
        crate::ws::outbox::OutboxReceiver,
    ) {
        open_with_peer_on(GatedStore::default())
    }

    /// [`open_with_peer`] on `store`.
    fn open_with_peer_on(
        store: GatedStore,
    ) -> (
        Arc<GatedStore>,
        Registry,
        SessionHandle,
        crate::ws::outbox::OutboxReceiver,
    ) {
        let store = Arc::new(store);
        let reg = registry_on(store.clone());
        let h = reg.open("s").unwrap();
        let mut peer = connect_peer(&h);
        assert_eq!(
            std::iter::from_fn(|| peer.try_recv()).count(),
            1,
            "the greeting"
        );
        (store, reg, h, peer)
    }

    /// The messages `peer` receives until `expected` are in or 5 s pass (a reader is
    /// answered before its batch's relays go out), then any more already queued.
    fn relays_reaching(peer: &mut crate::ws::outbox::OutboxReceiver, expected: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut n = 0;
        while n < expected && Instant::now() < deadline {
            match peer.try_recv() {
                Some(_) => n += 1,
                None => std::thread::yield_now(),
            }
        }
        n + std::iter::from_fn(|| peer.try_recv()).count()
    }

    /// Queues one update per key (each setting it in map "m") as connection 2's reader does,
    /// checks that each changed the document, and returns the store's appends, their lengths.
    fn stored_runs(
        store: &GatedStore,
        h: &SessionHandle,
        keys: impl Iterator<Item = String>,
    ) -> Vec<usize> {
        let writer = yrs::Doc::new();
        let updates = keys.map(|key| set_key(&writer, &key)).collect();
        let outcomes = queued_by_a_reader(&h.whiteboard, 2, &Arc::default(), updates);
        assert!(
            outcomes.iter().all(|o| matches!(o, Ok(true))),
            "{outcomes:?}"
        );
        store.runs.lock().unwrap().clone()
    }

    /// A reader's updates queued together are appended to the log together (one store
    /// write for the batch, not one per update), each answered once that write is done;
    /// an unload right after the last answer finds them stored.
    #[test]
    fn a_readers_queued_updates_are_stored_in_one_append_before_they_are_answered() {
        let (store, reg, h, mut peer) = open_with_peer();
        let runs = stored_runs(&store, &h, (0..16).map(|i| format!("k{i}")));
        assert_eq!(
            runs.iter().sum::<usize>(),
            16,
            "every update appended once: {runs:?}"
        );
        // One run of 16 (more only if the 1 ms hold ran out between two jobs).
        assert!(
            runs.len() <= 4,
            "appended in batches, not one by one: {runs:?}"
        );
        assert_eq!(relays_reaching(&mut peer, 16), 16, "every update");
        drop(h);
        let deadline = Instant::now() + Duration::from_secs(5);
        while reg.unload_idle(Duration::ZERO) == 0 {
            assert!(Instant::now() < deadline, "never unloaded");
            std::thread::yield_now();
        }
        let stored = store.inner.load_whiteboard("s").unwrap();
        let replica = yrs::Doc::new();
        for update in &stored.updates {
            use yrs::updates::decoder::Decode;
            use yrs::Transact;
            replica
                .transact_mut()
                .apply_update(yrs::Update::decode_v1(update).unwrap())
                .unwrap();
        }
        use yrs::{Map, Transact};
        let m = replica.get_or_insert_map("m");
        assert_eq!(m.len(&replica.transact()), 16);
    }

    /// A run of a reader's queued updates longer than a batch is stored in several appends
    /// of at most `RELAY_BATCH` (16) each: the first updates of a long run do not wait for
    /// its end, and one store entry stays small.
    #[test]
    fn a_long_run_of_a_readers_updates_is_stored_in_batches_of_at_most_sixteen() {
        let (store, _reg, h, _peer) = open_with_peer();
        let n = 2 * whiteboard::RELAY_BATCH + 1;
        let runs = stored_runs(&store, &h, (0..n).map(|i| format!("k{i}")));
        assert_eq!(runs.iter().sum::<usize>(), n, "{runs:?}");
        assert!(
            runs.iter().all(|&run| run <= whiteboard::RELAY_BATCH),
            "no append of more than a batch: {runs:?}"
        );
    }

    /// A batch also ends once the updates it holds for the log reach `HELD_LOG_BYTES`
    /// (64 KiB): queued updates of ~40 KiB are appended two at most, and counted in the
    /// appends' metrics.
    #[test]
    fn a_batch_of_large_updates_ends_at_sixty_four_kib() {
        let (store, reg, h, _peer) = open_with_peer();
        let large = "x".repeat(40 * 1024);
        let runs = stored_runs(&store, &h, (0..8).map(|i| format!("{i}{large}")));
        assert_eq!(runs.iter().sum::<usize>(), 8, "{runs:?}");
        assert!(
            runs.iter().all(|&run| run <= 2),
            "64 KiB ends a batch: {runs:?}"
        );
        assert_eq!(reg.metrics.log_appends.get(), runs.len() as u64);
        assert_eq!(reg.metrics.log_appended_updates.get(), 8);
    }

    /// [`open_with_peer`], then key "kept" set by `writer` (the doc returned), stored and
    /// relayed to the peer.
    fn open_with_a_kept_key() -> (
        Arc<GatedStore>,
        Registry,
        SessionHandle,
        crate::ws::outbox::OutboxReceiver,
        yrs::Doc,
    ) {
        let (store, reg, h, mut peer) = open_with_peer();
        let writer = yrs::Doc::new();
        assert!(h
            .whiteboard
            .apply_update(None, &set_key(&writer, "kept"), None)
            .unwrap());
        assert_eq!(std::iter::from_fn(|| peer.try_recv()).count(), 1);
        (store, reg, h, peer, writer)
    }

    /// When the append of a batch fails, every update in it is refused (SPEC.md 7.1: the
    /// live document stays as it was, nothing is relayed): the document is rebuilt from the
    /// store, each reader is answered with the error and marked refused (what it queued
    /// after is not applied), and the session goes on once the store takes writes again.
    #[test]
    fn a_failed_batch_append_refuses_every_update_in_it_and_relays_none() {
        let (store, reg, h, mut peer, writer) = open_with_a_kept_key();
        let wb = &h.whiteboard;
        assert_eq!(relays_timed(&reg, 1), 1, "the kept key's relay");
        store.appends_fail.store(true, Ordering::Release);
        let (a, b) = (Arc::default(), Arc::default());
        // Made in the order queued: none waits for another (held back).
        let (a1, b1, a2) = (
            set_key(&writer, "a1"),
            set_key(&writer, "b1"),
            set_key(&writer, "a2"),
        );
        let release = wb.hold_sequencer();
        let queue = |conn, refused: &Arc<std::sync::atomic::AtomicBool>, u: &Vec<u8>| match wb
            .queue_update(conn, refused, u.clone().into(), None)
        {
            whiteboard::Submitted::Queued(o) | whiteboard::Submitted::Waiting(o) => o,
        };
        let outcomes = vec![queue(2, &a, &a1), queue(3, &b, &b1), queue(2, &a, &a2)];
        drop(release);
        for outcome in outcomes.into_iter().map(block_on) {
            assert!(
                matches!(outcome, Err(whiteboard::ApplyError::Store(_))),
                "{outcome:?}"
            );
        }
        assert!(
            a.load(Ordering::Acquire) && b.load(Ordering::Acquire),
            "both marked refused"
        );
        assert_eq!(
            std::iter::from_fn(|| peer.try_recv()).count(),
            0,
            "nothing relayed"
        );
        assert_eq!(keys_of(wb), ["kept"], "the document is as before the batch");
        assert_eq!(
            relays_timed(&reg, 1),
            1,
            "no relay latency for a refused batch"
        );
        store.appends_fail.store(false, Ordering::Release);
        let later = yrs::Doc::new();
        let outcomes = queued_by_a_reader(wb, 4, &Arc::default(), vec![set_key(&later, "c")]);
        assert!(matches!(outcomes[..], [Ok(true)]), "{outcomes:?}");
        assert_eq!(keys_of(wb), ["c", "kept"]);
        assert_eq!(relays_reaching(&mut peer, 1), 1);
        assert_eq!(relays_timed(&reg, 2), 2);
    }

    /// `easel_relay_latency_seconds_count`: relays timed so far, once it reaches `expected`
    /// or 5 s pass (a relay is timed just after it is handed to the connections).
    fn relays_timed(reg: &Registry, expected: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let count = reg
                .metrics
                .render()
                .lines()
                .find_map(|l| l.strip_prefix("easel_relay_latency_seconds_count "))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            if count >= expected || Instant::now() >= deadline {
                return count;
            }
            std::thread::yield_now();
        }
    }

    /// The keys of map "m" in the whiteboard's document, sorted.
    fn keys_of(wb: &Whiteboard) -> Vec<String> {
        use yrs::updates::decoder::Decode;
        use yrs::{Map, Transact};
        let replica = yrs::Doc::new();
        replica
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(&wb.encode_state()).unwrap())
            .unwrap();
        let m = replica.get_or_insert_map("m");
        let txn = replica.transact();
        let mut keys: Vec<String> = m.keys(&txn).map(String::from).collect();
        keys.sort();
        keys
    }

    /// A rebuild reads the stored log as it applies it (sled hands it over entry by
    /// entry), and a snapshot deletes the log entries it folds in: written meanwhile, it
    /// would delete entries the rebuild has not read yet, from behind the older snapshot the
    /// rebuild started from. The snapshot waits for the rebuild instead, which loses nothing.
    #[test]
    fn a_snapshot_waits_for_a_rebuild_reading_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let sled = crate::store::SledStore::open(dir.path(), 10, 3, None).unwrap();
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (go, go_rx) = std::sync::mpsc::sync_channel(1);
        // With a client connected, a snapshot is built from the store too.
        let (store, _reg, h, _peer) = open_with_peer_on(GatedStore {
            inner: InnerStore(Box::new(sled)),
            scan_gate: Some((entered_tx, Mutex::new(go_rx))),
            ..Default::default()
        });
        let writer = yrs::Doc::new();
        let wb = &h.whiteboard;
        assert!(wb.apply_update(None, &set_key(&writer, "a"), None).unwrap());
        wb.snapshot_now().unwrap();
        for key in ["b", "c"] {
            assert!(wb.apply_update(None, &set_key(&writer, key), None).unwrap());
        }
        // An append fails: the update is undone by rebuilding the document from the store,
        // whose scan stops once it has handed over the snapshot (which holds only "a").
        store.appends_fail.store(true, Ordering::Release);
        store.scan_gate_armed.store(true, Ordering::Release);
        let lost = set_key(&writer, "lost");
        let refused = std::thread::spawn({
            let h = h.clone();
            move || h.whiteboard.apply_update(None, &lost, None)
        });
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the rebuild's scan reaches the gate");
        let snapshot = std::thread::spawn({
            let h = h.clone();
            move || h.whiteboard.snapshot_now()
        });
        // Time enough for a snapshot that does not wait to fold "b" and "c" in and delete
        // their log entries; one that waits is still waiting when it runs out.
        let deadline = Instant::now() + Duration::from_millis(500);
        while !snapshot.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let snapshot_went_first = snapshot.is_finished();
        go.send(()).unwrap();
        let refused = refused.join().unwrap();
        assert!(
            matches!(refused, Err(whiteboard::ApplyError::Store(_))),
            "{refused:?}"
        );
        snapshot.join().unwrap().unwrap();
        assert_eq!(keys_of(wb), ["a", "b", "c"], "the rebuild lost nothing");
        assert!(
            !snapshot_went_first,
            "the snapshot was written while the rebuild read the log"
        );
    }

    /// The HTTP/CLI path: its outcome is given once what the batch holds is stored (by the
    /// sequencer, for every job, not by the job itself); a failed append is an error, the
    /// update is undone and not relayed.
    #[test]
    fn an_update_submitted_over_http_is_refused_when_its_append_fails() {
        let (store, _reg, h, mut peer, writer) = open_with_a_kept_key();
        let wb = &h.whiteboard;
        let before = wb.encode_state();
        store.appends_fail.store(true, Ordering::Release);
        let refused = wb.apply_update(None, &set_key(&writer, "lost"), None);
        assert!(
            matches!(refused, Err(whiteboard::ApplyError::Store(_))),
            "{refused:?}"
        );
        assert_eq!(
            std::iter::from_fn(|| peer.try_recv()).count(),
            0,
            "not relayed"
        );
        assert_eq!(wb.encode_state(), before, "undone");
    }

    /// Shutdown: a connection stops awaiting its update's outcome when it closes with 1012,
    /// the update stays queued; the final save waits for it, so it is in the final
    /// snapshot rather than appended after it (and after the final flush).
    #[test]
    fn the_final_save_waits_for_queued_updates() {
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (go, go_rx) = std::sync::mpsc::sync_channel(1);
        let store = Arc::new(GatedStore {
            append_gate: Some((entered_tx, Mutex::new(go_rx))),
            ..Default::default()
        });
        let reg = Arc::new(registry_on(store.clone()));
        let h = reg.open("s").unwrap();
        let writer = yrs::Doc::new();
        let outcome = h
            .whiteboard
            .submit_update(None, set_key(&writer, "k").into(), None);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let submitter = std::thread::spawn(move || runtime.block_on(outcome));
        entered.recv().unwrap();
        let saver = {
            let reg = reg.clone();
            std::thread::spawn(move || reg.snapshot_all())
        };
        // Either the save went ahead without the update (the bug), or it waits behind it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !saver.is_finished() && h.whiteboard.sequencer_queued() < 2 {
            assert!(
                Instant::now() < deadline,
                "the save neither waited nor finished"
            );
            std::thread::yield_now();
        }
        go.send(()).unwrap();
        assert!(submitter.join().unwrap().unwrap());
        assert!(saver.join().unwrap().is_empty());
        assert!(!h.whiteboard.is_dirty(), "updated after the final save");
        assert_eq!(store.inner.list_snapshots("s").unwrap().len(), 1);
    }

    #[test]
    fn an_update_logged_while_a_snapshot_is_written_is_kept() {
        use yrs::types::ToJson;
        use yrs::updates::decoder::Decode;
        use yrs::Transact;
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (go, go_rx) = std::sync::mpsc::sync_channel(1);
        let store = Arc::new(GatedStore {
            gate: Some((entered_tx, Mutex::new(go_rx))),
            ..Default::default()
        });
        let reg = registry_on(store.clone());
        let h = reg.open("s").unwrap();
        let _peer = connect_peer(&h);
        let writer = yrs::Doc::new();
        let write = |key: &str| set_key(&writer, key);
        assert!(h
            .whiteboard
            .apply_update(None, &write("before"), None)
            .unwrap());
        std::thread::scope(|scope| {
            let snapshot = scope.spawn(|| h.whiteboard.snapshot_if_dirty());
            // The state is encoded (without "during"); the snapshot is not yet written.
            entered.recv().unwrap();
            assert!(h
                .whiteboard
                .apply_update(None, &write("during"), None)
                .unwrap());
            go.send(()).unwrap();
            assert_eq!(snapshot.join().unwrap().unwrap(), Some(1));
        });
        let stored = store.load_whiteboard("s").unwrap();
        assert_eq!(stored.snapshot_version, 1);
        assert_eq!(
            stored.updates.len(),
            2,
            "the snapshot, then the update logged during it"
        );
        let reloaded = yrs::Doc::new();
        {
            let mut txn = reloaded.transact_mut();
            for update in &stored.updates {
                txn.apply_update(yrs::Update::decode_v1(update).unwrap())
                    .unwrap();
            }
        }
        let json = |doc: &yrs::Doc| {
            let map = doc.get_or_insert_map("m");
            let txn = doc.transact();
            map.to_json(&txn)
        };
        assert_eq!(json(&reloaded), json(&writer));
        // The update logged meanwhile keeps the board dirty: the next snapshot folds it in.
        assert!(h.whiteboard.is_dirty());
    }

    #[test]
    fn a_snapshot_never_drops_what_the_store_failed_to_give_back() {
        use yrs::updates::decoder::Decode;
        use yrs::{ReadTxn, Transact};
        let store = Arc::new(GatedStore::default());
        let reg = registry_on(store.clone());
        let h = reg.open("s").unwrap();
        let _peer = connect_peer(&h);
        let writer = yrs::Doc::new();
        for key in ["a", "b"] {
            h.whiteboard
                .apply_update(None, &set_key(&writer, key), None)
                .unwrap();
        }
        // The log reads back as nothing: built from the store, the snapshot would be empty.
        store.reads_empty.store(true, Ordering::Release);
        assert_eq!(h.whiteboard.snapshot_if_dirty().unwrap(), Some(1));
        let state = store.get_snapshot("s", 1).unwrap().unwrap();
        let snapshot = yrs::Doc::new();
        snapshot
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(&state).unwrap())
            .unwrap();
        assert_eq!(
            snapshot.transact().state_vector(),
            writer.transact().state_vector()
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_first_opens_load_the_session_once() {
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(8);
        let (go, go_rx) = std::sync::mpsc::sync_channel(8);
        let store = Arc::new(GatedStore {
            load_gate: Some((entered_tx, Mutex::new(go_rx))),
            ..Default::default()
        });
        let reg = Arc::new(registry_on(store.clone()));
        let opens: Vec<_> = (0..8)
            .map(|_| {
                let reg = reg.clone();
                tokio::spawn(async move { reg.open_shared("s").await })
            })
            .collect();
        // Waiting off this thread lets every open run up to its first await: one is
        // loading (held at the gate), the others found its load under way.
        tokio::task::spawn_blocking(move || entered.recv())
            .await
            .unwrap()
            .unwrap();
        go.send(()).unwrap();
        let mut handles = Vec::new();
        for open in opens {
            handles.push(open.await.unwrap().unwrap());
        }
        assert_eq!(store.loads.load(Ordering::Acquire), 1, "loaded once");
        assert!(handles
            .iter()
            .all(|h| Arc::ptr_eq(&h.session, &handles[0].session)));
        assert_eq!(reg.loaded(), 1);
    }

    #[test]
    fn an_unload_snapshots_outside_the_registry_lock() {
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (go, go_rx) = std::sync::mpsc::sync_channel(1);
        let store = Arc::new(GatedStore {
            gate: Some((entered_tx, Mutex::new(go_rx))),
            ..Default::default()
        });
        let reg = registry_on(store.clone());
        let writer = yrs::Doc::new();
        let h = reg.open("s").unwrap();
        assert!(h
            .whiteboard
            .apply_update(None, &set_key(&writer, "a"), None)
            .unwrap());
        drop(h);
        std::thread::scope(|scope| {
            let unload = scope.spawn(|| reg.unload_idle(Duration::ZERO));
            // The unload is writing the snapshot: an open meanwhile is not held up, and
            // takes the session still loaded (not a second copy).
            entered.recv().unwrap();
            let (opened_tx, opened) = std::sync::mpsc::channel();
            let reg = &reg;
            let opener = scope.spawn(move || {
                let h = reg.open("s");
                let _ = opened_tx.send(());
                h
            });
            let in_time = opened.recv_timeout(Duration::from_secs(5));
            go.send(()).unwrap();
            assert!(in_time.is_ok(), "open waited for the snapshot");
            let h = opener.join().unwrap().unwrap();
            // In use again: the snapshot is written, the session stays.
            assert_eq!(unload.join().unwrap(), 0);
            assert_eq!(reg.loaded(), 1);
            assert_eq!(store.loads.load(Ordering::Acquire), 1);
            assert!(!h.whiteboard.is_dirty());
        });
        assert_eq!(reg.unload_idle(Duration::ZERO), 1);
        assert_eq!(reg.loaded(), 0);
    }

    #[test]
    fn unloads_only_idle_sessions_and_keeps_their_state() {
        let store: Arc<dyn Store> = Arc::new(crate::store::MemoryStore::default());
        let reg = Registry::new(store, Arc::new(Metrics::new()), Arc::new(Config::default()));
        let h = reg.open("s").unwrap();
        let doc = yrs::Doc::new();
        let update = {
            use yrs::{Map, Transact};
            let map = doc.get_or_insert_map("m");
            let mut txn = doc.transact_mut();
            map.insert(&mut txn, "k", "v");
            txn.encode_update_v1()
        };
        assert!(h.whiteboard.apply_update(None, &update, None).unwrap());
        assert_eq!(reg.unload_idle(Duration::ZERO), 0);
        drop(h);
        assert_eq!(reg.unload_idle(Duration::ZERO), 1);
        assert_eq!(reg.loaded(), 0);
        let h = reg.open("s").unwrap();
        assert!(!h.whiteboard.apply_update(None, &update, None).unwrap());
    }
}
