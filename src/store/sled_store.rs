//! [`SledStore`]: the [`Store`](super::Store) seam on an embedded sled 0.34 database, the
//! durable store behind `easel serve` and the offline `easel snapshot` / `easel sessions`.
//!
//! # Layout
//!
//! One sled database per data directory, holding four trees. Every key starts with the
//! session id and a `\0` byte. Session ids match `[A-Za-z0-9_-]{1,128}` (checked on every
//! call), so `session \0` is a prefix no other session shares, and a prefix scan visits one
//! session's records in key order. Numbers in keys are big-endian `u64`, so key order is
//! numeric order and a range scan is a range of sequence numbers.
//!
//! | tree        | key                         | value |
//! |-------------|-----------------------------|-------|
//! | `updates`   | `session \0 seq` (u64 BE)   | `0x01`, then one accepted Yjs v1 update |
//! | `snapshots` | `session \0 version` (u64 BE) | a bincode-2 [`SnapshotHeader`] (`format_version: u16 = 1`, session, version, `created_at_ms`, `update_count`, `state_len`, `state_vector`), then the whole document as a Yjs v1 update (`state_len` bytes) |
//! | `chat`      | `session \0 seq` (u64 BE)   | `0x01`, then the [`ChatMessage`] as JSON (the object clients receive, so fields can be added with serde defaults) |
//! | `meta`      | `session \0 name` (ASCII)   | `0x01`, then a u64 BE |
//! | `chat_edits` | `session \0 at_ms seq` (two u64 BE) | `0x01`, then a [`ChatEdit`](super::ChatEdit) as JSON: the latest edit or deletion of message `seq` (one entry per message; see [`chat_edits`]) |
//! | `moderation` | `session \0 user id` (UTF-8) | `0x01`, then a [`ModerationRecord`](super::ModerationRecord) as JSON |
//!
//! The `meta` names:
//!
//! | name                    | meaning |
//! |-------------------------|---------|
//! | `last_log_seq`          | the largest seq of the `updates` entries a snapshot deleted; with the newest entry left, it says where the session's next seq starts, so seqs are never reused |
//! | `last_snapshot_version` | the highest snapshot version written; never reused, even once pruned |
//! | `last_chat_seq`         | the highest chat seq stored; survives trimming and restarts |
//! | `chat_seq_reserved`     | chat seqs up to this one may have been shown to clients (reserved in blocks, see below) |
//! | `last_activity_ms`      | time of the session's last write, in ms since the Unix epoch |
//!
//! The first byte (or, for snapshots, the first bincode field) of every value is its format
//! version, 1 today: a later layout writes version 2 and keeps reading version 1.
//!
//! Beside the database, every snapshot version is also a plain file,
//! `versions/<session>/<N>.yjs` (the Yjs v1 state, written to a temporary name, fsynced,
//! renamed): what `easel store recover` rebuilds a damaged database from, and what a load
//! falls back on when the database lost a version it had.
//!
//! # Invariants and crash safety
//!
//! - No sled transaction or batch is used: either takes sled's global write lock, which
//!   every insert of every session then waits behind. Multi-record writes go in an order
//!   whose every prefix is safe to leave after a crash instead.
//! - [`Store::write_snapshot`] writes the version file, inserts the snapshot, raises
//!   `last_snapshot_version` and `last_log_seq`, **flushes** (a version number an answer
//!   shows is on disk before it is shown, SPEC 5.1), then deletes the log entries the
//!   snapshot includes and prunes to the newest `keep_snapshots` versions (records and
//!   files), in that order. After a crash midway, some entries the newest snapshot includes
//!   may remain: loading replays them, which changes nothing (a Yjs update applies once).
//!   The next version is above the counter, the newest record and the newest file.
//! - Chat seqs are never handed out twice: with `durability = "sync"` every message is
//!   flushed before it is shown; with `"batch"`, before a message whose seq passes the session's
//!   reservation is stored, `chat_seq_reserved` is raised by a block of
//!   [`CHAT_SEQ_BLOCK`] and flushed (one fsync per block, not per message). After a crash,
//!   [`Store::last_chat_seq`] answers the reservation, so the first seq after a restart is
//!   above every seq a client may have seen (a gap, never a reuse). Within one process the
//!   reservation is known to be this process's own and the real last seq is answered (no
//!   gap when a session is unloaded and loaded again), and [`Store::close`] lowers the
//!   reservations to the real last seqs, so a clean restart leaves no gap either.
//! - A session's seqs are given by the session itself (one writer) and only grow: the next
//!   one after a load is past both `last_log_seq` and the newest entry, so a key is never
//!   reused. An append is two blind inserts (the entry, `last_activity_ms`), no read.
//! - A snapshot deletes only the entries its state includes (seq up to the `log_through`
//!   it is given); entries appended while it was encoded stay, so it needs no lock on the
//!   relay path.
//! - A chat message is written before `last_chat_seq` is raised, and
//!   [`Store::last_chat_seq`] answers the larger of the counter and the newest stored seq,
//!   so a crash between the two loses nothing.
//! - Chat is trimmed by seq window: after storing seq `n`, every message with
//!   `seq <= n - history_limit` is deleted. Seqs are contiguous (SPEC 4), so this keeps the
//!   newest `history_limit` messages, at the cost of only the messages it deletes.
//! - Durability is sled's group commit: everything written is flushed every
//!   `flush_interval_ms` (0: only on [`Store::flush`]).
//! - sled's page cache is `persist.cache_mb` (sled's own default is 1 GiB, which a server
//!   opening many sessions grows into).
//!
//! # When the disk fails (SPEC 5.4)
//!
//! sled handles a failed write badly: an inline write that fails sets a sticky error that
//! every later write returns (even once space is back), and a failed blob write (values
//! over ~128 KiB) leaves its I/O buffer claimed, so every later flush, and dropping the
//! database, waits forever. So the store:
//!
//! - refuses writes itself, before sled sees them, while the disk is nearly full (less
//!   than [`SPACE_MARGIN`] free, checked by the monitor thread and before every large
//!   value), and from the first failed write on, with the reason ([`Store::check`],
//!   `/readyz`);
//! - remembers the keys of writes that failed, and of writes a failed [`Store::flush`] did
//!   not make durable, and deletes them when it writes again, so nothing a client was told
//!   failed is replayed by a later load;
//! - runs a monitor thread that flushes every `flush_interval_ms` and, while writes are
//!   refused, probes the directory (a small file written and fsynced) and, once that
//!   works, closes and reopens the database (sled's sticky error lives in the open
//!   handle) and resumes writing: no restart needed;
//! - reports a flush that has not returned for [`FLUSH_STALL`] as a stalled database: that
//!   one does need a restart (see above), and `/readyz` says so.
//!
//! # Damaged records
//!
//! A value that does not decode is logged with `tracing::warn`, counted in the
//! `store_decode_errors` metric and skipped: loading uses the newest snapshot whose header
//! *and* Yjs state decode (the database's, or a newer `versions/` file's), then every log
//! entry that decodes. A failure of sled itself (an I/O error while reading) is returned as
//! [`StoreError::Io`]. Nothing read from disk is unwrapped. Damage sled refuses to open is
//! for `easel store recover` ([`super::repair`]).
//!
//! # Locking
//!
//! sled locks its directory while open. A second open (another `easel serve`, or a tool
//! run beside one) fails with a [`StoreError::Io`] whose message starts with `locked:`;
//! [`is_locked_error`] recognises it.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sled::{IVec, Tree};

use super::{SessionInfo, SnapshotInfo, Store, StoreError, StoredWhiteboard};
use crate::metrics::Metrics;
use crate::protocol::tutor::ChatMessage;

mod chat_edits;
pub(super) use chat_edits::{CHAT_EDITS_TREE, MODERATION_TREE};

pub(super) const UPDATES_TREE: &str = "updates";
pub(super) const SNAPSHOTS_TREE: &str = "snapshots";
pub(super) const CHAT_TREE: &str = "chat";
pub(super) const META_TREE: &str = "meta";

const LAST_LOG_SEQ: &str = "last_log_seq";
pub(super) const LAST_SNAPSHOT_VERSION: &str = "last_snapshot_version";
pub(super) const LAST_CHAT_SEQ: &str = "last_chat_seq";
pub(super) const CHAT_SEQ_RESERVED: &str = "chat_seq_reserved";
const LAST_ACTIVITY_MS: &str = "last_activity_ms";

/// Chat seqs reserved (and flushed) at a time: one fsync per this many messages of a
/// session, and at most this many seqs skipped after a crash.
pub const CHAT_SEQ_BLOCK: u64 = 32;

/// Format version byte of `updates`, `chat` and `meta` values.
const RECORD_FORMAT_V1: u8 = 1;
/// Format version of the snapshot header.
const SNAPSHOT_FORMAT_V1: u16 = 1;
/// The largest snapshot header decoded: bounds what a damaged length prefix can allocate.
const MAX_SNAPSHOT_HEADER_BYTES: usize = 64 << 20;

/// Writes are refused while the data directory's file system has less free than this:
/// sled must never meet a full disk itself (see the module documentation).
pub const SPACE_MARGIN: u64 = 1 << 20;
/// A flush that has not returned for this long means sled is stuck (a restart is needed).
pub const FLUSH_STALL: Duration = Duration::from_secs(5);
/// Values at least this large are checked against the free space before sled sees them
/// (sled writes them as blob files, whose failure wedges it).
const LARGE_VALUE: usize = 64 << 10;

/// The folder of the plain snapshot files, inside the data directory.
pub const VERSIONS_DIR: &str = "versions";

/// The start of the message of a [`StoreError::Io`] saying the directory is locked.
const LOCKED_PREFIX: &str = "locked:";

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct SledSettings {
    /// Flush every this many ms (0: only on [`Store::flush`]).
    pub flush_interval_ms: u64,
    /// Versions kept per session (at least 1).
    pub keep_snapshots: usize,
    /// sled's page cache, in MiB.
    pub cache_mb: u64,
    /// `persist.durability = "sync"`: every chat message is flushed before it is shown,
    /// so no seq needs reserving ahead (and a crash leaves no gap).
    pub sync_durability: bool,
}

impl SledSettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            flush_interval_ms: config.persist.flush_interval_ms,
            keep_snapshots: config.persist.keep_snapshots,
            cache_mb: config.persist.cache_mb,
            sync_durability: config.persist.durability == crate::config::Durability::Sync,
        }
    }
}

/// The open database and its trees. Swapped whole when the store reopens after a failure.
struct Trees {
    db: sled::Db,
    updates: Tree,
    snapshots: Tree,
    chat: Tree,
    meta: Tree,
    /// SPEC 4.1 (see [`chat_edits`]).
    chat_edits: Tree,
    moderation: Tree,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TreeId {
    Updates,
    Chat,
}

impl Trees {
    fn tree(&self, id: TreeId) -> &Tree {
        match id {
            TreeId::Updates => &self.updates,
            TreeId::Chat => &self.chat,
        }
    }
}

/// Whether the store can write, and what to undo when it can again.
#[derive(Default)]
struct Health {
    /// Why writes are refused (`None`: they are not).
    failure: Option<String>,
    /// sled itself returned a write error: its handle must be reopened before writing.
    sled_failed: bool,
    /// sled cannot be closed (a stuck flush); only a restart helps.
    wedged: bool,
    /// Keys of log and chat entries inserted since the last successful flush.
    unflushed: Vec<(TreeId, Vec<u8>)>,
    /// Keys of entries whose write was reported as failed: deleted before writing resumes.
    poisoned: Vec<(TreeId, Vec<u8>)>,
}

/// At most this many unflushed keys are remembered (only a failed explicit flush uses
/// them, in sync durability, where there are a handful).
const MAX_UNFLUSHED: usize = 100_000;

struct Shared {
    dir: PathBuf,
    settings: SledSettings,
    trees: RwLock<Option<Arc<Trees>>>,
    health: Mutex<Health>,
    /// When the flush in progress started (`None`: none is).
    flushing_since: Mutex<Option<Instant>>,
    /// Chat seq reservations made by this process: session → highest reserved seq.
    chat_reserved: Mutex<HashMap<String, u64>>,
    metrics: Option<Arc<Metrics>>,
}

/// The store on a sled database. See the module documentation for the layout.
pub struct SledStore {
    shared: Arc<Shared>,
}

/// Whether `e` came from [`SledStore::open`] finding the data directory held by another
/// process (its message then starts with `locked:` and says what to do instead).
pub fn is_locked_error(e: &StoreError) -> bool {
    matches!(e, StoreError::Io(message) if message.starts_with(LOCKED_PREFIX))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes what an interrupted sled start or snapshot leaves behind: `snap.*.generating`
/// (sled picks the newest `snap.*` file, and a 0-byte one written on a full disk makes
/// every later open fail with "Read corrupted data"; the complete snapshot or the log it
/// was made from is still there), and this store's own probe and temporary files.
pub fn remove_stale_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = (name.starts_with("snap.") && name.ends_with(".generating"))
            || name.starts_with(".easel-probe");
        if stale {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::warn!(file = %entry.path().display(), "removed a stale file an interrupted write left")
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a stale file")
                }
            }
        }
    }
}

/// Opens sled in `dir`, turning a panic inside sled (it has some on damaged files) into
/// an error.
fn open_sled(dir: &Path, settings: &SledSettings) -> Result<Trees, StoreError> {
    remove_stale_files(dir);
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(settings.cache_mb.max(1).saturating_mul(1 << 20))
        .flush_every_ms((settings.flush_interval_ms > 0).then_some(settings.flush_interval_ms));
    let opened = quiet_catch_unwind(|| {
        let db = config.open().map_err(|e| open_error(dir, &e))?;
        let open_tree = |name: &str| db.open_tree(name).map_err(storage_error);
        Ok(Trees {
            updates: open_tree(UPDATES_TREE)?,
            snapshots: open_tree(SNAPSHOTS_TREE)?,
            chat: open_tree(CHAT_TREE)?,
            meta: open_tree(META_TREE)?,
            chat_edits: open_tree(chat_edits::CHAT_EDITS_TREE)?,
            moderation: open_tree(chat_edits::MODERATION_TREE)?,
            db,
        })
    });
    match opened {
        Ok(result) => result,
        Err(message) => Err(StoreError::Corrupt(format!(
            "sled panicked opening {}: {message}",
            dir.display()
        ))),
    }
}

/// Runs `f`, catching a panic as its message, without the default hook printing it
/// (sled panics on some damaged files; the caller reports it properly).
pub(crate) fn quiet_catch_unwind<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Mutex<()> = Mutex::new(());
    let _serial = lock(&HOOK);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into())
    })
}

/// Free bytes for an unprivileged writer on the file system of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `path` is a valid C string; `stat` is a plain out-parameter.
    unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stat) != 0 {
            return None;
        }
        Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
    }
}

impl SledStore {
    /// Opens (creating if needed) the database in `dir` with sled's page cache at 64 MiB.
    /// Writes are flushed to disk every `flush_interval_ms` (0: only on [`Store::flush`]);
    /// each session keeps its newest `keep_snapshots` versions (at least 1). `metrics`
    /// counts records that do not decode.
    pub fn open(
        dir: &Path,
        flush_interval_ms: u64,
        keep_snapshots: usize,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, StoreError> {
        Self::open_with(
            dir,
            SledSettings {
                flush_interval_ms,
                keep_snapshots,
                cache_mb: 64,
                sync_durability: false,
            },
            metrics,
        )
    }

    /// [`SledStore::open`] with every setting, and the monitor thread (flushes, disk
    /// probes, reopening after a failure) running while the store lives.
    pub fn open_with(
        dir: &Path,
        settings: SledSettings,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, StoreError> {
        if super::compact::interrupted(dir) {
            return Err(StoreError::Corrupt(format!(
                "{} holds an interrupted `easel store compact`; run `easel store compact --data-dir {}` again to finish it",
                dir.display(),
                dir.display()
            )));
        }
        let trees = open_sled(dir, &settings)?;
        if let Some(metrics) = &metrics {
            metrics.store_writable.set(1);
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            settings: SledSettings {
                keep_snapshots: settings.keep_snapshots.max(1),
                ..settings
            },
            trees: RwLock::new(Some(Arc::new(trees))),
            health: Mutex::new(Health::default()),
            flushing_since: Mutex::new(None),
            chat_reserved: Mutex::new(HashMap::new()),
            metrics,
        });
        // Not ready from the first request on a full disk, not one monitor tick later.
        if let Some(free) = free_bytes(dir).filter(|&free| free < SPACE_MARGIN) {
            shared.fail(
                format!("disk full: {free} bytes free in {}", dir.display()),
                false,
            );
        }
        let weak = Arc::downgrade(&shared);
        let spawned = std::thread::Builder::new()
            .name("easel-store-monitor".into())
            .spawn(move || monitor(weak));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the store monitor: no recovery from write failures without a restart");
        }
        Ok(Self { shared })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

/// Flushes periodically and, while writes are refused, probes and reopens; ends when the
/// store is dropped.
fn monitor(shared: Weak<Shared>) {
    let period = {
        let Some(s) = shared.upgrade() else { return };
        Duration::from_millis(s.settings.flush_interval_ms.clamp(50, 1000))
    };
    loop {
        std::thread::sleep(period);
        let Some(s) = shared.upgrade() else { return };
        s.monitor_tick();
    }
}

impl Shared {
    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        self.trees
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Io("the store is reopening after a write failure".into()))
    }

    fn versions_dir(&self, session: &str) -> PathBuf {
        self.dir.join(VERSIONS_DIR).join(session)
    }

    /// Refuses a write while the store cannot write.
    fn writable(&self) -> Result<(), StoreError> {
        match &lock(&self.health).failure {
            None => Ok(()),
            Some(reason) => Err(StoreError::Io(format!("the store cannot write: {reason}"))),
        }
    }

    /// Marks the store as unable to write (the first reason is kept).
    fn fail(&self, reason: String, sled_failed: bool) {
        let mut health = lock(&self.health);
        if health.failure.is_none() {
            tracing::error!(reason = %reason, "the store cannot write; writes are refused until it can");
            health.failure = Some(reason);
            if let Some(metrics) = &self.metrics {
                metrics.store_writable.set(0);
                metrics.store_write_failures.inc();
            }
        }
        health.sled_failed |= sled_failed;
    }

    /// The result of a sled write: a failure stops further writes until recovery.
    fn written<T>(&self, result: sled::Result<T>) -> Result<T, StoreError> {
        result.map_err(|e| {
            self.fail(format!("write failed: {e}"), true);
            storage_error(e)
        })
    }

    /// Refuses a large write when the disk cannot take it (sled must not meet ENOSPC).
    fn ensure_space(&self, bytes: usize) -> Result<(), StoreError> {
        if bytes < LARGE_VALUE {
            return Ok(());
        }
        match free_bytes(&self.dir) {
            Some(free) if free < bytes as u64 + SPACE_MARGIN => {
                let reason = format!("disk full: {free} bytes free in {}", self.dir.display());
                self.fail(reason.clone(), false);
                Err(StoreError::Io(reason))
            }
            _ => Ok(()),
        }
    }

    /// Inserts a log or chat entry, remembering its key until it is flushed (or, should
    /// the insert fail, for deletion once writing resumes).
    fn insert_entry(
        &self,
        trees: &Trees,
        tree: TreeId,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.ensure_space(value.len())?;
        match trees.tree(tree).insert(&key, value) {
            Ok(_) => {
                let mut health = lock(&self.health);
                if health.unflushed.len() < MAX_UNFLUSHED {
                    health.unflushed.push((tree, key));
                }
                Ok(())
            }
            Err(e) => {
                lock(&self.health).poisoned.push((tree, key));
                self.written(Err(e))
            }
        }
    }

    /// Flushes sled; a failure (or a stall, seen by [`Shared::check`]) stops writes.
    fn flush_trees(&self, trees: &Trees, explicit: bool) -> Result<(), StoreError> {
        *lock(&self.flushing_since) = Some(Instant::now());
        let result = trees.db.flush();
        *lock(&self.flushing_since) = None;
        let mut health = lock(&self.health);
        match result {
            Ok(_) => {
                health.unflushed.clear();
                Ok(())
            }
            Err(e) => {
                if explicit {
                    // In sync durability these writes are reported as failed: they must
                    // not come back on a later load.
                    let unflushed = std::mem::take(&mut health.unflushed);
                    health.poisoned.extend(unflushed);
                }
                drop(health);
                self.written(Err(e))
            }
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        if let Some(since) = *lock(&self.flushing_since) {
            if since.elapsed() >= FLUSH_STALL {
                return Err(StoreError::Io(format!(
                    "a flush has not returned for {} s (sled is stuck after a failed write); restart easel",
                    since.elapsed().as_secs()
                )));
            }
        }
        let health = lock(&self.health);
        if let Some(reason) = &health.failure {
            return Err(StoreError::Io(if health.wedged {
                format!("{reason}; restart easel")
            } else {
                reason.clone()
            }));
        }
        drop(health);
        let trees = self.trees()?;
        trees
            .meta
            .get(b"\0readiness-probe")
            .map(|_| ())
            .map_err(storage_error)
    }

    fn monitor_tick(&self) {
        let (failed, wedged) = {
            let h = lock(&self.health);
            (h.failure.is_some(), h.wedged)
        };
        if wedged {
            return;
        }
        if !failed {
            if let Some(free) = free_bytes(&self.dir) {
                if free < SPACE_MARGIN {
                    self.fail(
                        format!("disk full: {free} bytes free in {}", self.dir.display()),
                        false,
                    );
                    return;
                }
            }
            if let Ok(trees) = self.trees() {
                if let Err(e) = self.flush_trees(&trees, false) {
                    tracing::error!(error = %e, "periodic flush failed");
                }
            }
            return;
        }
        if let Err(e) = self.probe_directory() {
            tracing::debug!(error = %e, "the data directory still cannot be written");
            return;
        }
        if let Err(e) = self.resume() {
            tracing::warn!(error = %e, "the store could not resume writing yet");
        }
    }

    /// Writes, fsyncs and removes a small file: whether the directory takes writes again.
    fn probe_directory(&self) -> std::io::Result<()> {
        if free_bytes(&self.dir).is_some_and(|free| free < 2 * SPACE_MARGIN) {
            return Err(std::io::Error::other("too little free space"));
        }
        let path = self
            .dir
            .join(format!(".easel-probe-{}", std::process::id()));
        let result = (|| {
            let mut file = std::fs::File::create(&path)?;
            file.write_all(&[0u8; 64 << 10])?;
            file.sync_all()
        })();
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Reopens sled if it failed, deletes the entries reported as failed, flushes, and lets
    /// writes through again.
    fn resume(&self) -> Result<(), StoreError> {
        let sled_failed = lock(&self.health).sled_failed;
        if sled_failed {
            self.reopen()?;
        }
        let trees = self.trees()?;
        let poisoned = std::mem::take(&mut lock(&self.health).poisoned);
        // sled keeps the first I/O error of its background flusher in the open handle and
        // returns it from every later call, even after the space is back: a sled error
        // here means the next attempt must reopen it.
        let sled_error = |e: sled::Error, poisoned: Vec<_>| {
            let mut health = lock(&self.health);
            health.poisoned.extend(poisoned);
            health.sled_failed = true;
            storage_error(e)
        };
        for (tree, key) in &poisoned {
            if let Err(e) = trees.tree(*tree).remove(key) {
                return Err(sled_error(e, poisoned.clone()));
            }
        }
        if let Err(e) = trees.db.flush() {
            return Err(sled_error(e, poisoned));
        }
        let mut health = lock(&self.health);
        health.failure = None;
        health.sled_failed = false;
        health.unflushed.clear();
        if let Some(metrics) = &self.metrics {
            metrics.store_writable.set(1);
        }
        tracing::info!(
            discarded = poisoned.len(),
            "the store writes again (entries whose write had failed were discarded)"
        );
        Ok(())
    }

    /// Closes sled and opens it again: its error state lives in the open handle.
    fn reopen(&self) -> Result<(), StoreError> {
        let old = self.trees.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(old) = old {
            // Other threads finish what they were doing with it (they see errors now).
            let deadline = Instant::now() + Duration::from_secs(2);
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            // Dropping a stuck sled waits forever: drop it on a thread of its own.
            let (done, dropped) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("easel-store-close".into())
                .spawn(move || {
                    drop(old);
                    let _ = done.send(());
                });
            let closed = spawned.is_ok() && dropped.recv_timeout(Duration::from_secs(3)).is_ok();
            if !closed {
                let mut health = lock(&self.health);
                health.wedged = true;
                health.failure =
                    Some("sled did not close after a failed write (its files stay locked)".into());
                return Err(StoreError::Io("sled did not close".into()));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match open_sled(&self.dir, &self.settings) {
                Ok(trees) => {
                    *self.trees.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(trees));
                    return Ok(());
                }
                Err(e) if is_locked_error(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Logs and counts a stored record that does not decode (the caller then skips it).
    fn report_damaged(&self, tree: &str, key: &[u8], error: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.store_decode_errors.inc();
        }
        tracing::warn!(tree, key = %describe_key(key), error, "stored record does not decode; skipped");
    }

    /// Logs and counts a part of the database sled cannot read (the caller goes on with
    /// what it has: one damaged page never hides the rest).
    fn report_unreadable(&self, tree: &str, session: &str, error: &sled::Error) {
        if let Some(metrics) = &self.metrics {
            metrics.store_decode_errors.inc();
        }
        tracing::warn!(tree, session, error = %error, "part of the database does not read; skipped");
    }

    /// A `meta` counter of the session; `None` if absent or damaged (damage is reported).
    fn read_counter(
        &self,
        t: &Trees,
        session: &str,
        name: &str,
    ) -> Result<Option<u64>, StoreError> {
        let key = named_key(session, name);
        let value = t.meta.get(&key).map_err(storage_error)?;
        Ok(self.decode_counter_or_report(&key, value.as_deref()))
    }

    fn decode_counter_or_report(&self, key: &[u8], value: Option<&[u8]>) -> Option<u64> {
        match decode_counter(value?) {
            Ok(n) => Some(n),
            Err(e) => {
                self.report_damaged(META_TREE, key, &e);
                None
            }
        }
    }

    /// Atomically replaces a `meta` counter by `next(current)` (compare-and-swap, retried
    /// on a concurrent change). Returns the value written.
    fn update_counter(
        &self,
        t: &Trees,
        session: &str,
        name: &str,
        next: impl Fn(Option<u64>) -> Result<u64, StoreError>,
    ) -> Result<u64, StoreError> {
        let key = named_key(session, name);
        loop {
            let current = t.meta.get(&key).map_err(storage_error)?;
            let new = next(self.decode_counter_or_report(&key, current.as_deref()))?;
            let swapped = self.written(t.meta.compare_and_swap(
                &key,
                current,
                Some(&encode_counter(new)[..]),
            ))?;
            if swapped.is_ok() {
                return Ok(new);
            }
        }
    }

    /// Sets a `meta` counter of the session (a blind insert, no read).
    fn write_counter(
        &self,
        t: &Trees,
        session: &str,
        name: &str,
        n: u64,
    ) -> Result<(), StoreError> {
        self.written(
            t.meta
                .insert(named_key(session, name), &encode_counter(n)[..]),
        )
        .map(|_| ())
    }

    /// The number in the session's last key of `tree` (`None`: the session has none there).
    fn last_number(&self, tree: &Tree, session: &str) -> Result<Option<u64>, StoreError> {
        match tree.scan_prefix(session_prefix(session)).next_back() {
            None => Ok(None),
            Some(entry) => {
                let (key, _) = entry.map_err(storage_error)?;
                Ok(key_number(&key))
            }
        }
    }

    /// The version numbers of the session's `versions/` files, ascending.
    fn version_files(&self, session: &str) -> Vec<u64> {
        version_files_in(&self.versions_dir(session))
    }

    /// The state in a version file, if it reads and decodes.
    fn read_version_file(&self, session: &str, version: u64) -> Result<Vec<u8>, String> {
        let path = self.versions_dir(session).join(format!("{version}.yjs"));
        let state = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        check_yjs_update(&state)?;
        Ok(state)
    }

    /// Writes `versions/<session>/<version>.yjs`: temporary name, fsync, rename, fsync of
    /// the folder, so a crash leaves the old file or the whole new one.
    fn write_version_file(
        &self,
        session: &str,
        version: u64,
        state: &[u8],
    ) -> Result<(), StoreError> {
        let folder = self.versions_dir(session);
        let io = |what: &str, e: std::io::Error| {
            let reason = format!("{what} {}: {e}", folder.display());
            self.fail(reason.clone(), false);
            StoreError::Io(reason)
        };
        std::fs::create_dir_all(&folder).map_err(|e| io("cannot create", e))?;
        let temporary = folder.join(format!(".{version}.yjs.tmp"));
        let written = (|| {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(state)?;
            file.sync_all()?;
            std::fs::rename(&temporary, folder.join(format!("{version}.yjs")))?;
            std::fs::File::open(&folder)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(io("cannot write a version file in", e));
        }
        Ok(())
    }

    /// The newest snapshot of the session whose header and Yjs state both decode, as
    /// (version, state): the database's, or a newer version file's (the database lost a
    /// version it had, or a crash came between the file and the record). Newer records
    /// that do not decode are reported and passed over.
    fn newest_loadable_snapshot(
        &self,
        t: &Trees,
        session: &str,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let mut found = None;
        for entry in t.snapshots.scan_prefix(session_prefix(session)).rev() {
            let (key, value) = match entry {
                Ok(kv) => kv,
                Err(e) => {
                    // A page sled cannot read: the version files still can be.
                    self.report_unreadable(SNAPSHOTS_TREE, session, &e);
                    break;
                }
            };
            let loaded =
                decode_snapshot_entry(session, &key, &value).and_then(|(header, state)| {
                    check_yjs_update(state)?;
                    Ok((header.version, state.to_vec()))
                });
            match loaded {
                Ok(snapshot) => {
                    found = Some(snapshot);
                    break;
                }
                Err(e) => self.report_damaged(SNAPSHOTS_TREE, &key, &e),
            }
        }
        let in_db = found.as_ref().map_or(0, |(v, _)| *v);
        let counted = self
            .read_counter(t, session, LAST_SNAPSHOT_VERSION)?
            .unwrap_or(0);
        for version in self.version_files(session).into_iter().rev() {
            if version <= in_db {
                break;
            }
            match self.read_version_file(session, version) {
                Ok(state) => {
                    // The database lost this version (sled drops everything after a
                    // damaged spot of its log as if it were a torn write), or, rarely, a
                    // crash came between the file and the record. Either way the file is
                    // the version's exact state.
                    let why = if version <= counted {
                        "damaged in the database; loaded from its versions/ file"
                    } else {
                        "missing from the database (damage, or an interrupted snapshot); loaded from its versions/ file"
                    };
                    self.report_damaged(SNAPSHOTS_TREE, &numbered_key(session, version), why);
                    return Ok(Some((version, state)));
                }
                Err(e) => self.report_damaged(VERSIONS_DIR, &numbered_key(session, version), &e),
            }
        }
        Ok(found)
    }

    /// The session's log entries that decode, oldest first.
    fn log_entries(&self, t: &Trees, session: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut updates = Vec::new();
        for entry in t.updates.scan_prefix(session_prefix(session)) {
            let (key, value) = match entry {
                Ok(kv) => kv,
                Err(e) => {
                    self.report_unreadable(UPDATES_TREE, session, &e);
                    break;
                }
            };
            match decode_update(&value) {
                Ok(update) => updates.push(update.to_vec()),
                Err(e) => self.report_damaged(UPDATES_TREE, &key, &e),
            }
        }
        Ok(updates)
    }

    /// Decodes chat entries in the order `entries` gives them, skipping (and reporting)
    /// damaged ones, until `limit` messages.
    fn decode_chat_entries(
        &self,
        entries: impl Iterator<Item = sled::Result<(IVec, IVec)>>,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let mut messages = Vec::new();
        for entry in entries {
            if messages.len() >= limit {
                break;
            }
            let (key, value) = match entry {
                Ok(kv) => kv,
                Err(e) => {
                    self.report_unreadable(CHAT_TREE, "", &e);
                    break;
                }
            };
            match decode_chat(&value) {
                Ok(message) => messages.push(message),
                Err(e) => self.report_damaged(CHAT_TREE, &key, &e),
            }
        }
        Ok(messages)
    }

    /// Deletes the session's chat messages with `seq <= newest_seq - history_limit`.
    fn trim_chat(
        &self,
        t: &Trees,
        session: &str,
        newest_seq: u64,
        history_limit: usize,
    ) -> Result<(), StoreError> {
        let limit = u64::try_from(history_limit).unwrap_or(u64::MAX);
        let Some(oldest_dropped) = newest_seq.checked_sub(limit) else {
            return Ok(());
        };
        // One remove at a time, not a `Batch`: a batch takes sled's global write lock,
        // which would hold up every whiteboard append. A crash midway leaves a few old
        // messages for the next trim.
        let dropped = session_prefix(session)..=numbered_key(session, oldest_dropped);
        for key in t.chat.range(dropped).keys() {
            self.written(t.chat.remove(key.map_err(storage_error)?))?;
        }
        Ok(())
    }

    /// The highest chat seq stored or counted (without reservations).
    fn stored_chat_seq(&self, t: &Trees, session: &str) -> Result<u64, StoreError> {
        let counted = self.read_counter(t, session, LAST_CHAT_SEQ)?;
        let stored = match self.last_number(&t.chat, session) {
            Ok(stored) => stored,
            Err(StoreError::Corrupt(e)) => {
                tracing::warn!(session, error = %e, "chat does not read; seqs continue from the counters");
                if let Some(metrics) = &self.metrics {
                    metrics.store_decode_errors.inc();
                }
                None
            }
            Err(e) => return Err(e),
        };
        Ok(counted.max(stored).unwrap_or(0))
    }
}

/// The version numbers of the `<N>.yjs` files in `folder`, ascending.
pub(super) fn version_files_in(folder: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut versions: Vec<u64> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            name.to_str()?.strip_suffix(".yjs")?.parse().ok()
        })
        .collect();
    versions.sort_unstable();
    versions
}

impl Store for SledStore {
    fn load_whiteboard(&self, session: &str) -> Result<StoredWhiteboard, StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        let t = s.trees()?;
        let mut stored = StoredWhiteboard::default();
        if let Some((version, state)) = s.newest_loadable_snapshot(&t, session)? {
            stored.snapshot_version = version;
            stored.updates.push(state);
        }
        stored.updates.extend(s.log_entries(&t, session)?);
        let counted = s.read_counter(&t, session, LAST_LOG_SEQ)?;
        let logged = s.last_number(&t.updates, session)?;
        stored.last_log_seq = counted.max(logged).unwrap_or(0);
        Ok(stored)
    }

    fn append_update(&self, session: &str, seq: u64, update: &[u8]) -> Result<(), StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        s.writable()?;
        let t = s.trees()?;
        s.insert_entry(
            &t,
            TreeId::Updates,
            numbered_key(session, seq),
            encode_update(update),
        )?;
        s.write_counter(&t, session, LAST_ACTIVITY_MS, now_ms())
    }

    fn write_snapshot(
        &self,
        session: &str,
        state: &[u8],
        state_vector: &[u8],
        update_count: u64,
        log_through: u64,
    ) -> Result<u64, StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        s.writable()?;
        s.ensure_space(state.len().saturating_mul(2).max(LARGE_VALUE))?;
        let t = s.trees()?;
        // No sled transaction here: one takes sled's global write lock, which every insert
        // of every session waits behind (and it waits for the flusher) — a 100 ms stall of
        // the whole relay for a snapshot. Instead the writes go in an order whose every
        // prefix a crash may leave behind safely: the file, the record, the counters, a
        // flush, then the deletions. Log entries a crash leaves under a newer snapshot are
        // replayed on load and change nothing (a Yjs update applies once). The session's
        // whiteboard is the only writer of its snapshots, one at a time.
        let covered_log: Vec<IVec> = t
            .updates
            .range(session_prefix(session)..=numbered_key(session, log_through))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(storage_error)?;
        let stored_versions: Vec<u64> = session_keys(&t.snapshots, session)?
            .iter()
            .filter_map(|key| key_number(key))
            .collect();
        let counted_version = s.read_counter(&t, session, LAST_SNAPSHOT_VERSION)?;
        let last_version = counted_version
            .max(stored_versions.last().copied())
            .max(s.version_files(session).last().copied())
            .unwrap_or(0);
        let version = last_version.checked_add(1).ok_or_else(|| {
            StoreError::Corrupt(format!("snapshot version of {session} overflows"))
        })?;
        let created_at_ms = now_ms();
        let header = SnapshotHeader {
            format_version: SNAPSHOT_FORMAT_V1,
            session: session.to_owned(),
            version,
            created_at_ms,
            update_count,
            state_len: state.len() as u64,
            state_vector: state_vector.to_vec(),
        };
        s.write_version_file(session, version, state)?;
        s.written(t.snapshots.insert(
            numbered_key(session, version),
            encode_snapshot(&header, state)?,
        ))?;

        s.write_counter(&t, session, LAST_SNAPSHOT_VERSION, version)?;
        s.write_counter(&t, session, LAST_ACTIVITY_MS, created_at_ms)?;
        // The deleted entries' seqs stay used: the counter keeps the largest of them, and
        // is written before they go.
        if let Some(last_covered) = covered_log.last().and_then(|key| key_number(key)) {
            let counted_seq = s.read_counter(&t, session, LAST_LOG_SEQ)?;
            if counted_seq.is_none_or(|n| n < last_covered) {
                s.write_counter(&t, session, LAST_LOG_SEQ, last_covered)?;
            }
        }
        // The version number is returned to a client: it must be on disk first.
        s.flush_trees(&t, false)?;
        for key in covered_log {
            s.written(t.updates.remove(key))?;
        }
        for old in versions_to_prune(&stored_versions, version, s.settings.keep_snapshots) {
            s.written(t.snapshots.remove(numbered_key(session, old)))?;
        }
        let files = s.version_files(session);
        let keep_from = files.len().saturating_sub(s.settings.keep_snapshots);
        for old in &files[..keep_from] {
            let path = s.versions_dir(session).join(format!("{old}.yjs"));
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove a pruned version file");
            }
        }
        Ok(version)
    }

    fn list_snapshots(&self, session: &str) -> Result<Vec<SnapshotInfo>, StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        let t = s.trees()?;
        let mut versions = Vec::new();
        for entry in t.snapshots.scan_prefix(session_prefix(session)) {
            let (key, value) = entry.map_err(storage_error)?;
            match decode_snapshot_entry(session, &key, &value) {
                Ok((header, state)) => versions.push(SnapshotInfo {
                    version: header.version,
                    created_at_ms: header.created_at_ms,
                    bytes: state.len() as u64,
                    updates: header.update_count,
                }),
                Err(e) => s.report_damaged(SNAPSHOTS_TREE, &key, &e),
            }
        }
        Ok(versions)
    }

    fn get_snapshot(&self, session: &str, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        let t = s.trees()?;
        let key = numbered_key(session, version);
        let Some(value) = t.snapshots.get(&key).map_err(storage_error)? else {
            return Ok(s.read_version_file(session, version).ok());
        };
        match decode_snapshot(session, version, &value) {
            Ok((_, state)) => Ok(Some(state.to_vec())),
            Err(e) => {
                s.report_damaged(SNAPSHOTS_TREE, &key, &e);
                match s.read_version_file(session, version) {
                    Ok(state) => Ok(Some(state)),
                    Err(_) => Err(StoreError::Corrupt(format!(
                        "snapshot {version} of {session}: {e}"
                    ))),
                }
            }
        }
    }

    fn list_sessions(&self) -> Result<Vec<SessionInfo>, StoreError> {
        let s = &self.shared;
        let t = s.trees()?;
        let mut sessions: BTreeMap<String, SessionInfo> = BTreeMap::new();
        let trees = [
            (UPDATES_TREE, &t.updates),
            (SNAPSHOTS_TREE, &t.snapshots),
            (CHAT_TREE, &t.chat),
            (META_TREE, &t.meta),
        ];
        for (tree_name, tree) in trees {
            for entry in tree.iter() {
                let (key, value) = entry.map_err(storage_error)?;
                let Some((session, rest)) = split_key(&key) else {
                    s.report_damaged(tree_name, &key, "key is not `session \\0 ...`");
                    continue;
                };
                let info = sessions
                    .entry(session.to_owned())
                    .or_insert_with(|| SessionInfo {
                        id: session.to_owned(),
                        bytes: 0,
                        last_activity_ms: 0,
                        snapshots: 0,
                    });
                info.bytes += (key.len() + value.len()) as u64;
                if tree_name == SNAPSHOTS_TREE {
                    info.snapshots += 1;
                }
                if tree_name == META_TREE && rest == LAST_ACTIVITY_MS.as_bytes() {
                    if let Some(ms) = s.decode_counter_or_report(&key, Some(&value)) {
                        info.last_activity_ms = ms;
                    }
                }
            }
        }
        Ok(sessions.into_values().collect())
    }

    fn append_chat(
        &self,
        session: &str,
        message: &ChatMessage,
        history_limit: usize,
    ) -> Result<(), StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        s.writable()?;
        let t = s.trees()?;
        // The seq is shown to clients once this returns: reserve past it, durably, first.
        // (A session's messages come one at a time, under its room's lock; the map's lock
        // is not held across the flush, so other sessions do not wait for it.)
        let known = lock(&s.chat_reserved).get(session).copied();
        let known = match known {
            Some(r) => r,
            None => s.read_counter(&t, session, CHAT_SEQ_RESERVED)?.unwrap_or(0),
        };
        if message.seq > known && !s.settings.sync_durability {
            let block_end = message.seq.saturating_add(CHAT_SEQ_BLOCK - 1);
            s.write_counter(&t, session, CHAT_SEQ_RESERVED, block_end)?;
            s.flush_trees(&t, false)?;
            let mut reserved = lock(&s.chat_reserved);
            let entry = reserved.entry(session.to_owned()).or_insert(0);
            *entry = (*entry).max(block_end);
        }
        s.insert_entry(
            &t,
            TreeId::Chat,
            numbered_key(session, message.seq),
            encode_chat(message)?,
        )?;
        let newest_seq = s.update_counter(&t, session, LAST_CHAT_SEQ, |last| {
            Ok(last.unwrap_or(0).max(message.seq))
        })?;
        s.write_counter(&t, session, LAST_ACTIVITY_MS, now_ms())?;
        s.trim_chat(&t, session, newest_seq, history_limit)
    }

    fn chat_after(
        &self,
        session: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        check_session_id(session)?;
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let t = self.shared.trees()?;
        let entries = t
            .chat
            .range(numbered_key(session, first)..session_end(session));
        self.shared.decode_chat_entries(entries, limit)
    }

    fn chat_before(
        &self,
        session: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        check_session_id(session)?;
        let t = self.shared.trees()?;
        let entries = t
            .chat
            .range(session_prefix(session)..numbered_key(session, before))
            .rev();
        let mut newest_first = self.shared.decode_chat_entries(entries, limit)?;
        newest_first.reverse();
        Ok(newest_first)
    }

    fn last_chat_seq(&self, session: &str) -> Result<u64, StoreError> {
        check_session_id(session)?;
        let s = &self.shared;
        let t = s.trees()?;
        let stored = s.stored_chat_seq(&t, session)?;
        if lock(&s.chat_reserved).contains_key(session) {
            // Reserved by this process: every seq it handed out is stored (or failed).
            return Ok(stored);
        }
        // A reservation left by a process that did not close cleanly: some of those seqs
        // may have been shown before the messages reached the disk. Start above them.
        let reserved = s.read_counter(&t, session, CHAT_SEQ_RESERVED)?.unwrap_or(0);
        Ok(stored.max(reserved))
    }

    fn chat_get(&self, session: &str, seq: u64) -> Result<Option<ChatMessage>, StoreError> {
        self.sled_chat_get(session, seq)
    }

    fn chat_amend(
        &self,
        session: &str,
        message: &ChatMessage,
        edit: &super::ChatEdit,
        previous_at_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        self.sled_chat_amend(session, message, edit, previous_at_ms)
    }

    fn chat_edits_after(
        &self,
        session: &str,
        after: (u64, u64),
        limit: usize,
    ) -> Result<Vec<super::ChatEdit>, StoreError> {
        self.sled_chat_edits_after(session, after, limit)
    }

    fn moderation(&self, session: &str) -> Result<Vec<super::ModerationRecord>, StoreError> {
        self.sled_moderation(session)
    }

    fn set_moderation(
        &self,
        session: &str,
        record: &super::ModerationRecord,
    ) -> Result<(), StoreError> {
        self.sled_set_moderation(session, record)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let t = self.shared.trees()?;
        self.shared.flush_trees(&t, true)
    }

    fn check(&self) -> Result<(), StoreError> {
        self.shared.check()
    }

    fn close(&self) -> Result<(), StoreError> {
        let s = &self.shared;
        let t = s.trees()?;
        // Every seq this process reserved but did not use is free again: a clean restart
        // continues without a gap.
        let reserved: Vec<String> = lock(&s.chat_reserved).keys().cloned().collect();
        if s.writable().is_ok() {
            for session in reserved {
                let last = s.stored_chat_seq(&t, &session)?;
                s.write_counter(&t, &session, CHAT_SEQ_RESERVED, last)?;
                // The reservation on disk is gone, so the one in memory goes too: a message
                // a straggling connection posts after this reserves (and flushes) anew.
                lock(&s.chat_reserved).remove(&session);
            }
        }
        s.flush_trees(&t, true)
    }
}

/// Every key the session has in `tree`.
fn session_keys(tree: &Tree, session: &str) -> Result<Vec<IVec>, StoreError> {
    tree.scan_prefix(session_prefix(session))
        .keys()
        .collect::<Result<_, _>>()
        .map_err(storage_error)
}

// ---- keys ----

pub(super) fn check_session_id(session: &str) -> Result<(), StoreError> {
    let valid = (1..=128).contains(&session.len())
        && session
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(StoreError::Io(
            "invalid session id: must match [A-Za-z0-9_-]{1,128}".into(),
        ))
    }
}

/// `session \0`: the prefix of every key of one session.
pub(super) fn session_prefix(session: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(session.len() + 1 + 8);
    key.extend_from_slice(session.as_bytes());
    key.push(0);
    key
}

/// `session \x01`: the first key after every key of `session` (an exclusive range end).
fn session_end(session: &str) -> Vec<u8> {
    let mut key = session_prefix(session);
    if let Some(last) = key.last_mut() {
        *last = 1;
    }
    key
}

/// `session \0 n` with `n` big-endian: the key of log entries, snapshots and chat.
pub(super) fn numbered_key(session: &str, n: u64) -> Vec<u8> {
    let mut key = session_prefix(session);
    key.extend_from_slice(&n.to_be_bytes());
    key
}

/// `session \0 name`: the key of a `meta` value.
pub(super) fn named_key(session: &str, name: &str) -> Vec<u8> {
    let mut key = session_prefix(session);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Splits `session \0 rest`; `None` for a key not in that form.
pub(super) fn split_key(key: &[u8]) -> Option<(&str, &[u8])> {
    let nul = key.iter().position(|&b| b == 0)?;
    let session = std::str::from_utf8(&key[..nul]).ok()?;
    Some((session, &key[nul + 1..]))
}

/// The number of a `session \0 n` key; `None` for a key not in that form.
pub(super) fn key_number(key: &[u8]) -> Option<u64> {
    let (_, number) = split_key(key)?;
    Some(u64::from_be_bytes(number.try_into().ok()?))
}

/// A key as a log line shows it: `session/n` or `session/name`.
pub(super) fn describe_key(key: &[u8]) -> String {
    match (split_key(key), key_number(key)) {
        (Some((session, _)), Some(n)) => format!("{session}/{n}"),
        (Some((session, rest)), None) => {
            format!("{session}/{}", String::from_utf8_lossy(rest))
        }
        (None, _) => format!("{:?}", String::from_utf8_lossy(key)),
    }
}

// ---- records ----

/// What precedes the Yjs state in a `snapshots` value (bincode 2, standard config).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SnapshotHeader {
    /// First, so a reader can tell the layout before decoding the rest.
    pub(super) format_version: u16,
    pub(super) session: String,
    pub(super) version: u64,
    pub(super) created_at_ms: u64,
    /// Updates folded into this snapshot since the previous one.
    pub(super) update_count: u64,
    /// Length of the Yjs v1 state that follows the header.
    pub(super) state_len: u64,
    /// The document's state vector, v1-encoded.
    pub(super) state_vector: Vec<u8>,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_SNAPSHOT_HEADER_BYTES>()
}

pub(super) fn encode_snapshot(
    header: &SnapshotHeader,
    state: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let mut record = bincode::serde::encode_to_vec(header, bincode_config())
        .map_err(|e| StoreError::Io(format!("cannot encode a snapshot header: {e}")))?;
    record.extend_from_slice(state);
    Ok(record)
}

/// A `snapshots` value split into header and state, checked against the key it was
/// stored under (`session`, `version`).
pub(super) fn decode_snapshot<'a>(
    session: &str,
    version: u64,
    value: &'a [u8],
) -> Result<(SnapshotHeader, &'a [u8]), String> {
    let (format_version, _): (u16, usize) =
        bincode::serde::decode_from_slice(value, bincode_config())
            .map_err(|e| format!("snapshot header: {e}"))?;
    if format_version != SNAPSHOT_FORMAT_V1 {
        return Err(format!("unknown snapshot format version {format_version}"));
    }
    let (header, header_len): (SnapshotHeader, usize) =
        bincode::serde::decode_from_slice(value, bincode_config())
            .map_err(|e| format!("snapshot header: {e}"))?;
    let state = value.get(header_len..).unwrap_or_default();
    if header.session != session || header.version != version {
        return Err(format!(
            "header names {}/{}, stored under {session}/{version}",
            header.session, header.version
        ));
    }
    if header.state_len != state.len() as u64 {
        return Err(format!(
            "state is {} bytes, header says {}",
            state.len(),
            header.state_len
        ));
    }
    Ok((header, state))
}

/// [`decode_snapshot`] for an entry found by a scan (its version read from the key).
pub(super) fn decode_snapshot_entry<'a>(
    session: &str,
    key: &[u8],
    value: &'a [u8],
) -> Result<(SnapshotHeader, &'a [u8]), String> {
    let version = key_number(key).ok_or("key is not `session \\0 version`")?;
    decode_snapshot(session, version, value)
}

/// Whether `state` decodes as a Yjs v1 update (yrs may panic on hostile input).
pub(super) fn check_yjs_update(state: &[u8]) -> Result<(), String> {
    use crate::doc::guard::{NestingIndex, SAFE_NESTING};
    use yrs::updates::decoder::Decode;
    // The guard first: a record written before it existed may hold a nesting bomb, which
    // overflows the stack inside yrs's decoder (no catch_unwind catches that).
    NestingIndex::default()
        .check(state, SAFE_NESTING)
        .map_err(|e| format!("state refused by the update guard: {e}"))?;
    match std::panic::catch_unwind(|| yrs::Update::decode_v1(state)) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("state is not a Yjs v1 update: {e}")),
        Err(_) => Err("the Yjs decoder panicked on the state".into()),
    }
}

/// `format` then `body`: the shape of `updates`, `chat` and `meta` values.
fn versioned(format: u8, body: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(1 + body.len());
    record.push(format);
    record.extend_from_slice(body);
    record
}

/// The body of a `versioned` value of format 1.
fn v1_body<'a>(kind: &str, value: &'a [u8]) -> Result<&'a [u8], String> {
    match value.split_first() {
        Some((&RECORD_FORMAT_V1, body)) => Ok(body),
        Some((format, _)) => Err(format!("unknown {kind} format version {format}")),
        None => Err(format!("empty {kind} record")),
    }
}

pub(super) fn encode_update(update: &[u8]) -> Vec<u8> {
    versioned(RECORD_FORMAT_V1, update)
}

pub(super) fn decode_update(value: &[u8]) -> Result<&[u8], String> {
    v1_body("update", value)
}

pub(super) fn encode_chat(message: &ChatMessage) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(message)
        .map_err(|e| StoreError::Io(format!("cannot encode a chat message: {e}")))?;
    Ok(versioned(RECORD_FORMAT_V1, &json))
}

pub(super) fn decode_chat(value: &[u8]) -> Result<ChatMessage, String> {
    serde_json::from_slice(v1_body("chat", value)?).map_err(|e| format!("chat message: {e}"))
}

pub(super) fn encode_counter(n: u64) -> [u8; 9] {
    let mut record = [0; 9];
    record[0] = RECORD_FORMAT_V1;
    record[1..].copy_from_slice(&n.to_be_bytes());
    record
}

pub(super) fn decode_counter(value: &[u8]) -> Result<u64, String> {
    let body = v1_body("counter", value)?;
    let bytes: [u8; 8] = body
        .try_into()
        .map_err(|_| format!("counter is {} bytes, not 8", body.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

// ---- helpers ----

/// Which of `stored` (ascending) and the new `version` fall outside the newest `keep`.
fn versions_to_prune(stored: &[u64], version: u64, keep: usize) -> Vec<u64> {
    let mut all: Vec<u64> = stored.iter().copied().filter(|&v| v != version).collect();
    all.push(version);
    all.sort_unstable();
    let excess = all.len().saturating_sub(keep);
    all.truncate(excess);
    all
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) fn storage_error(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
        e => StoreError::Io(e.to_string()),
    }
}

/// The error of a failed open: the `locked:` one when another process holds `dir`.
fn open_error(dir: &Path, e: &sled::Error) -> StoreError {
    if is_lock_failure(e) {
        StoreError::Io(format!(
            "{LOCKED_PREFIX} the data directory {} is in use by another process \
             (a running `easel serve`?); use --server URL --token JWT to go through it",
            dir.display()
        ))
    } else {
        StoreError::Io(format!(
            "cannot open the data directory {}: {e}",
            dir.display()
        ))
    }
}

/// sled 0.34 reports a held lock as an I/O error "could not acquire lock on ...: WouldBlock".
fn is_lock_failure(e: &sled::Error) -> bool {
    let sled::Error::Io(io) = e else {
        return false;
    };
    if io.kind() == std::io::ErrorKind::WouldBlock {
        return true;
    }
    let message = io.to_string();
    [
        "could not acquire lock",
        "WouldBlock",
        "Resource temporarily unavailable",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::tutor::UserInfo;
    use yrs::{GetString, ReadTxn, StateVector, Text, Transact};

    const SESSION: &str = "room-1";

    impl SledStore {
        fn t(&self) -> Arc<Trees> {
            self.shared.trees().unwrap()
        }
    }

    /// Opens `dir`, waiting out the lock of a store this test just dropped: sled's flusher
    /// thread lets go of the directory a moment after the last handle is gone.
    fn open(dir: &Path) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open(dir, 10, 3, None) {
                Ok(store) => return store,
                Err(e) if is_locked_error(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("open: {e}"),
            }
        }
    }

    /// A Yjs v1 update inserting `text` into a fresh document's text `t`.
    fn text_update(text: &str) -> Vec<u8> {
        let doc = yrs::Doc::new();
        let t = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        t.insert(&mut txn, 0, text);
        txn.encode_update_v1()
    }

    /// The text `t` of a document built from `updates` in order.
    fn text_of(updates: &[Vec<u8>]) -> String {
        use yrs::updates::decoder::Decode;
        let doc = yrs::Doc::new();
        let t = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        for update in updates {
            txn.apply_update(yrs::Update::decode_v1(update).unwrap())
                .unwrap();
        }
        t.get_string(&txn)
    }

    /// The whole document of `updates` as (state, state vector).
    fn merged_state(updates: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
        use yrs::updates::decoder::Decode;
        use yrs::updates::encoder::Encode;
        let doc = yrs::Doc::new();
        let mut txn = doc.transact_mut();
        for update in updates {
            txn.apply_update(yrs::Update::decode_v1(update).unwrap())
                .unwrap();
        }
        let state = txn.encode_state_as_update_v1(&StateVector::default());
        (state, txn.state_vector().encode_v1())
    }

    fn chat(seq: u64) -> ChatMessage {
        ChatMessage {
            seq,
            client_id: Some(format!("c{seq}")),
            from: UserInfo {
                id: "u1".into(),
                name: "Ada".into(),
                role: "tutor".into(),
            },
            text: format!("message {seq}"),
            ts: "2024-01-01T00:00:00Z".into(),
            ..Default::default()
        }
    }

    fn seqs(messages: &[ChatMessage]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    fn versions(store: &SledStore, session: &str) -> Vec<u64> {
        let list = store.list_snapshots(session).unwrap();
        list.iter().map(|s| s.version).collect()
    }

    #[test]
    fn log_and_snapshot_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = text_update("hello");
        let (state, sv) = merged_state(std::slice::from_ref(&first));
        let later = [text_update("A"), text_update("B")];
        {
            let store = open(dir.path());
            assert_eq!(store.load_whiteboard(SESSION).unwrap().updates.len(), 0);
            store.append_update(SESSION, 1, &first).unwrap();
            assert_eq!(store.write_snapshot(SESSION, &state, &sv, 1, 1).unwrap(), 1);
            for (seq, update) in (2..).zip(&later) {
                store.append_update(SESSION, seq, update).unwrap();
            }
            store.flush().unwrap();
        }
        let store = open(dir.path());
        let loaded = store.load_whiteboard(SESSION).unwrap();
        assert_eq!(loaded.snapshot_version, 1);
        assert_eq!(loaded.last_log_seq, 3);
        assert_eq!(
            loaded.updates,
            vec![state, later[0].clone(), later[1].clone()]
        );
        let text = text_of(&loaded.updates);
        assert!(text.contains("hello") && text.contains('A') && text.contains('B'));
        let info = store.list_snapshots(SESSION).unwrap();
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].updates, 1);
        assert_eq!(info[0].bytes, loaded.updates[0].len() as u64);
        assert!(info[0].created_at_ms > 0);
    }

    #[test]
    fn snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let updates = [text_update("a"), text_update("b"), text_update("c")];
        for (seq, update) in (1..).zip(&updates) {
            store.append_update(SESSION, seq, update).unwrap();
            store.append_update("other", seq, update).unwrap();
        }
        // An update appended while the snapshot of the first three was encoded.
        let late = text_update("d");
        store.append_update(SESSION, 4, &late).unwrap();
        let (state, sv) = merged_state(&updates);
        store.write_snapshot(SESSION, &state, &sv, 3, 3).unwrap();

        let loaded = store.load_whiteboard(SESSION).unwrap();
        assert_eq!(loaded.updates, vec![state.clone(), late.clone()]);
        assert_eq!(loaded.last_log_seq, 4);
        // Another session's log is untouched.
        assert_eq!(store.load_whiteboard("other").unwrap().updates.len(), 3);

        // Once the last entry is covered too, the seq counter still knows where it was.
        let (state, sv) = merged_state(&[updates.to_vec(), vec![late]].concat());
        store.write_snapshot(SESSION, &state, &sv, 1, 4).unwrap();
        assert!(session_keys(&store.t().updates, SESSION)
            .unwrap()
            .is_empty());
        let loaded = store.load_whiteboard(SESSION).unwrap();
        assert_eq!((loaded.updates.len(), loaded.last_log_seq), (1, 4));
        // Appends after the snapshot continue the log.
        store.append_update(SESSION, 5, &updates[0]).unwrap();
        assert_eq!(store.load_whiteboard(SESSION).unwrap().updates.len(), 2);
    }

    #[test]
    fn keeps_newest_snapshots_and_never_reuses_versions() {
        let dir = tempfile::tempdir().unwrap();
        let (state, sv) = merged_state(&[text_update("x")]);
        {
            let store = open(dir.path()); // keep_snapshots = 3
            for expected in 1..=5 {
                assert_eq!(
                    store.write_snapshot(SESSION, &state, &sv, 0, 0).unwrap(),
                    expected
                );
            }
            assert_eq!(versions(&store, SESSION), vec![3, 4, 5]);
            assert_eq!(store.get_snapshot(SESSION, 1).unwrap(), None);
            assert_eq!(store.get_snapshot(SESSION, 5).unwrap(), Some(state.clone()));
        }
        let store = open(dir.path());
        assert_eq!(store.write_snapshot(SESSION, &state, &sv, 0, 0).unwrap(), 6);
        // Even with every stored version gone, the counter in meta goes on.
        // Even with every stored version and file gone, the counter in meta goes on.
        for key in session_keys(&store.t().snapshots, SESSION).unwrap() {
            store.t().snapshots.remove(key).unwrap();
        }
        std::fs::remove_dir_all(store.shared.versions_dir(SESSION)).unwrap();
        assert_eq!(store.write_snapshot(SESSION, &state, &sv, 0, 0).unwrap(), 7);
        assert_eq!(versions(&store, SESSION), vec![7]);
    }

    #[test]
    fn damaged_newest_snapshot_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let store = SledStore::open(dir.path(), 10, 5, Some(metrics.clone())).unwrap();
        let (old_state, old_sv) = merged_state(&[text_update("old")]);
        let (new_state, new_sv) = merged_state(&[text_update("new")]);
        store
            .write_snapshot(SESSION, &old_state, &old_sv, 1, 0)
            .unwrap();
        store
            .write_snapshot(SESSION, &new_state, &new_sv, 1, 0)
            .unwrap();
        store
            .t()
            .snapshots
            .insert(numbered_key(SESSION, 2), &b"garbage, not a snapshot"[..])
            .unwrap();
        // A log entry that does not decode is skipped too.
        store
            .append_update(SESSION, 1, &text_update("log"))
            .unwrap();
        store
            .t()
            .updates
            .insert(numbered_key(SESSION, 999), &[9u8, 1, 2][..])
            .unwrap();

        // Version 2's file is intact: the load takes it (damage counted: the record, the
        // loss the file repairs, the log entry).
        let loaded = store.load_whiteboard(SESSION).unwrap();
        assert_eq!(loaded.snapshot_version, 2);
        assert_eq!(loaded.updates[0], new_state);
        assert_eq!(loaded.updates.len(), 2);
        assert_eq!(metrics.store_decode_errors.get(), 3);
        assert_eq!(store.get_snapshot(SESSION, 2).unwrap(), Some(new_state));

        // Without the file, the previous version is used.
        std::fs::remove_file(store.shared.versions_dir(SESSION).join("2.yjs")).unwrap();
        let before = metrics.store_decode_errors.get();
        let loaded = store.load_whiteboard(SESSION).unwrap();
        assert_eq!(loaded.snapshot_version, 1);
        assert_eq!(loaded.updates.len(), 2);
        assert_eq!(loaded.updates[0], old_state);
        assert_eq!(metrics.store_decode_errors.get(), before + 2);

        assert_eq!(versions(&store, SESSION), vec![1]);
        assert!(matches!(
            store.get_snapshot(SESSION, 2),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn chat_seqs_are_reserved_ahead_so_a_crash_never_reuses_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            for seq in 1..=5 {
                store.append_chat(SESSION, &chat(seq), 100).unwrap();
            }
            // Within one process, the real last seq (an unload and reload leaves no gap).
            assert_eq!(store.last_chat_seq(SESSION).unwrap(), 5);
            // Dropped without close(): as after a kill -9.
        }
        let store = open(dir.path());
        let after_crash = store.last_chat_seq(SESSION).unwrap();
        assert_eq!(after_crash, CHAT_SEQ_BLOCK);
        store
            .append_chat(SESSION, &chat(after_crash + 1), 100)
            .unwrap();
        store.close().unwrap();
        drop(store);
        // A clean close gives the unused reservation back: no gap after a clean restart.
        let store = open(dir.path());
        assert_eq!(store.last_chat_seq(SESSION).unwrap(), after_crash + 1);
        // A message posted after close() (a connection still draining) reserves anew on
        // disk, so a crash right after it still never hands its seq out again.
        store
            .append_chat(SESSION, &chat(after_crash + 2), 100)
            .unwrap();
        store.close().unwrap();
        store
            .append_chat(SESSION, &chat(after_crash + 3), 100)
            .unwrap();
        let t = store.shared.trees().unwrap();
        let reserved = store
            .shared
            .read_counter(&t, SESSION, CHAT_SEQ_RESERVED)
            .unwrap()
            .unwrap_or(0);
        assert!(reserved >= after_crash + 3, "reserved on disk: {reserved}");
    }

    #[test]
    fn snapshot_versions_are_files_too_and_pruned_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()); // keep_snapshots = 3
        let (state, sv) = merged_state(&[text_update("x")]);
        for _ in 0..5 {
            store.write_snapshot(SESSION, &state, &sv, 0, 0).unwrap();
        }
        let folder = dir.path().join(VERSIONS_DIR).join(SESSION);
        assert_eq!(version_files_in(&folder), vec![3, 4, 5]);
        assert_eq!(std::fs::read(folder.join("5.yjs")).unwrap(), state);
    }

    /// sled meeting a full disk itself (writes faster than the monitor looks): the store
    /// refuses writes, and once space is back reopens sled and writes again, in process.
    /// Needs root (a small tmpfs); skipped otherwise.
    #[test]
    fn a_sled_write_failure_is_recovered_by_reopening() {
        let parent = tempfile::tempdir().unwrap();
        let mount = parent.path().join("fs");
        std::fs::create_dir_all(&mount).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(&mount)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs (not root?)");
            return;
        }
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.0)
                    .status();
            }
        }
        let _unmount = Unmount(mount.clone());
        // The monitor looks once a second: the inserts below outrun it.
        let store = SledStore::open(&mount, 60_000, 3, None).unwrap();
        store
            .append_update(SESSION, 1, &text_update("kept"))
            .unwrap();
        store.flush().unwrap();
        let filler = mount.join("filler");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).unwrap();
            while f.write_all(&[0u8; 4096]).is_ok() {}
        }
        // Free a little, so sled's first buffer fits and a later one does not.
        let len = std::fs::metadata(&filler).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .unwrap()
            .set_len(len - (2 << 20))
            .unwrap();
        let update = vec![1u8; 2000];
        let mut failed_at = None;
        for seq in 2..20_000u64 {
            if store.append_update(SESSION, seq, &update).is_err() {
                failed_at = Some(seq);
                break;
            }
        }
        let failed_at = failed_at.expect("no write failed on a full disk");
        assert!(
            lock(&store.shared.health).sled_failed,
            "the guard refused first: sled never met the full disk"
        );
        assert!(store.check().is_err());
        assert!(store
            .append_update(SESSION, failed_at + 1, &update)
            .is_err());
        std::fs::remove_file(&filler).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while store.check().is_err() {
            assert!(
                Instant::now() < deadline,
                "the store did not resume: {:?}",
                store.check()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        store
            .append_update(SESSION, failed_at + 2, &text_update("after"))
            .unwrap();
        store.flush().unwrap();
        let loaded = store.load_whiteboard(SESSION).unwrap();
        let text = text_of(
            &loaded
                .updates
                .iter()
                .filter(|u| u.len() != 2000)
                .cloned()
                .collect::<Vec<_>>(),
        );
        assert!(text.contains("kept") && text.contains("after"), "{text}");
        // The entry whose write failed is not there to be replayed as accepted.
        assert!(store
            .t()
            .updates
            .get(numbered_key(SESSION, failed_at))
            .unwrap()
            .is_none());
    }

    #[test]
    fn stale_generating_snapshot_files_do_not_stop_an_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            store.append_update(SESSION, 1, &text_update("a")).unwrap();
            store.close().unwrap();
        }
        // What sled leaves when a start meets a full disk.
        std::fs::write(dir.path().join("snap.FFFFFFFFFFFFFFFF.generating"), b"").unwrap();
        let store = open(dir.path());
        assert_eq!(store.load_whiteboard(SESSION).unwrap().updates.len(), 1);
    }

    #[test]
    fn snapshot_whose_state_is_not_yjs_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (state, sv) = merged_state(&[text_update("good")]);
        store.write_snapshot(SESSION, &state, &sv, 1, 0).unwrap();
        store
            .write_snapshot(SESSION, &[0xff; 16], &sv, 1, 0)
            .unwrap();
        let loaded = store.load_whiteboard(SESSION).unwrap();
        assert_eq!(loaded.snapshot_version, 1);
        assert_eq!(loaded.updates, vec![state]);
    }

    #[test]
    fn chat_is_ordered_trimmed_and_keeps_its_last_seq() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            assert_eq!(store.last_chat_seq(SESSION).unwrap(), 0);
            for seq in 1..=300 {
                store.append_chat(SESSION, &chat(seq), 1000).unwrap();
            }
            // Big-endian keys keep numeric order across byte boundaries (255 -> 256).
            let all = store.chat_after(SESSION, 0, 1000).unwrap();
            assert_eq!(seqs(&all), (1..=300).collect::<Vec<_>>());
            assert_eq!(all[0], chat(1));

            store.append_chat(SESSION, &chat(301), 5).unwrap();
            assert_eq!(
                seqs(&store.chat_after(SESSION, 0, 100).unwrap()),
                vec![297, 298, 299, 300, 301]
            );
            assert_eq!(
                seqs(&store.chat_after(SESSION, 298, 2).unwrap()),
                vec![299, 300]
            );
            assert!(store.chat_after(SESSION, u64::MAX, 10).unwrap().is_empty());
            assert_eq!(
                seqs(&store.chat_before(SESSION, 301, 2).unwrap()),
                vec![299, 300]
            );
            assert_eq!(
                seqs(&store.chat_before(SESSION, u64::MAX, 3).unwrap()),
                vec![299, 300, 301]
            );
            assert!(store.chat_before(SESSION, 297, 10).unwrap().is_empty());
            assert!(store.chat_after("other", 0, 10).unwrap().is_empty());
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.last_chat_seq(SESSION).unwrap(), 301);
        store.append_chat(SESSION, &chat(302), 0).unwrap();
        assert!(store.chat_after(SESSION, 0, 10).unwrap().is_empty());
        assert_eq!(store.last_chat_seq(SESSION).unwrap(), 302);
        assert_eq!(store.last_chat_seq("other").unwrap(), 0);
    }

    #[test]
    fn second_open_of_a_held_directory_is_a_locked_error() {
        let dir = tempfile::tempdir().unwrap();
        let _held = open(dir.path());
        let Err(e) = SledStore::open(dir.path(), 10, 3, None) else {
            panic!("a second open of a held directory succeeded");
        };
        assert!(is_locked_error(&e), "{e}");
        let message = e.to_string();
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(message.contains("--server URL --token JWT"), "{message}");
        assert!(!is_locked_error(&StoreError::Io("disk full".into())));
    }

    #[test]
    fn lists_sessions_with_size_activity_and_snapshot_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert!(store.list_sessions().unwrap().is_empty());
        let (state, sv) = merged_state(&[text_update("x")]);
        store.append_update("b", 1, &text_update("y")).unwrap();
        store.write_snapshot("a", &state, &sv, 1, 0).unwrap();
        store.write_snapshot("a", &state, &sv, 1, 0).unwrap();
        store.append_chat("c", &chat(1), 10).unwrap();

        let sessions = store.list_sessions().unwrap();
        let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b", "c"]);
        assert_eq!(
            sessions.iter().map(|s| s.snapshots).collect::<Vec<_>>(),
            vec![2, 0, 0]
        );
        assert!(sessions[0].bytes > 2 * state.len() as u64);
        assert!(sessions
            .iter()
            .all(|s| s.bytes > 0 && s.last_activity_ms > 0));
    }

    #[test]
    fn rejects_session_ids_that_would_break_the_key_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for bad in ["", "a\0b", "a/b", &"x".repeat(129)] {
            assert!(store.append_update(bad, 1, b"").is_err(), "{bad:?}");
            assert!(store.load_whiteboard(bad).is_err(), "{bad:?}");
        }
        store.check().unwrap();
    }

    #[test]
    fn records_round_trip_and_reject_unknown_formats() {
        assert_eq!(decode_counter(&encode_counter(42)), Ok(42));
        assert!(decode_counter(&[2, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        assert!(decode_counter(&[1, 0]).is_err());
        assert_eq!(decode_update(&encode_update(b"abc")), Ok(&b"abc"[..]));
        assert!(decode_update(&[]).is_err());
        assert_eq!(decode_chat(&encode_chat(&chat(7)).unwrap()), Ok(chat(7)));
        assert_eq!(versions_to_prune(&[1, 2, 3], 4, 3), vec![1]);
        assert_eq!(versions_to_prune(&[], 1, 3), Vec::<u64>::new());
        assert_eq!(describe_key(&numbered_key("s", 3)), "s/3");
        assert_eq!(
            describe_key(&named_key("s", LAST_CHAT_SEQ)),
            "s/last_chat_seq"
        );
    }
}
