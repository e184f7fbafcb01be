//! Whether the store can write, and getting it writing again after a failure (SPEC 5.4).
//!
//! sled handles a failed write badly: an inline write that fails sets a sticky error that
//! every later write returns (even once space is back), and a failed blob write (values
//! over ~128 KiB) leaves its I/O buffer claimed, so every later flush, and dropping the
//! database, waits forever. So this module:
//!
//! - refuses writes, before sled sees them, while the disk is nearly full (less than
//!   [`SPACE_MARGIN`] free, checked by the monitor thread and before every large value),
//!   and from the first failed write on, with the reason ([`Shared::check`], `/readyz`);
//! - remembers the keys of writes that failed, and of writes a failed explicit flush did
//!   not make durable, and undoes them when it writes again (an appended entry is deleted,
//!   an overwritten or removed record gets back what it held), so nothing a client was
//!   told failed is replayed by a later load;
//! - runs the monitor thread that flushes every `flush_interval_ms` and, while writes are
//!   refused, probes the directory (a small file written and fsynced) and, once that
//!   works, closes and reopens the database (sled's sticky error lives in the open handle);
//! - reports a flush that has not returned for [`FLUSH_STALL`] as a stalled database:
//!   that one needs a restart, and `/readyz` says so.
//!
//! Owns: [`Health`], the write gate (`writable`, `written`, `ensure_space`, `insert_entry`,
//! `overwrite_entry`, `flush_trees`), the monitor, probing and reopening. Must not touch: what records mean
//! (keys, values, counters), which is the store's.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use sled::IVec;

use super::open::open_sled;
use super::{storage_error, Shared, TreeId, Trees};
use crate::store::{unpoisoned, StoreError};

/// Writes are refused while the data directory's file system has less free than this:
/// sled must never meet a full disk itself (see the module documentation).
pub const SPACE_MARGIN: u64 = 1 << 20;
/// A flush that has not returned for this long means sled is stuck (a restart is needed).
pub const FLUSH_STALL: Duration = Duration::from_secs(5);
/// Values at least this large are checked against the free space before sled sees them
/// (sled writes them as blob files, whose failure wedges it).
pub(super) const LARGE_VALUE: usize = 64 << 10;

/// An acknowledged write the gate tracks until it is flushed: its key, and what the key
/// held before (`None`: nothing), which is put back should the write be reported as failed.
#[derive(Clone)]
pub(super) struct Tracked {
    pub(super) tree: TreeId,
    pub(super) key: Vec<u8>,
    pub(super) before: Option<IVec>,
}

/// Whether the store can write, and what to undo when it can again.
#[derive(Default)]
pub(super) struct Health {
    /// Why writes are refused (`None`: they are not).
    pub(super) failure: Option<String>,
    /// sled itself returned a write error: its handle must be reopened before writing.
    pub(super) sled_failed: bool,
    /// sled cannot be closed (a stuck flush); only a restart helps.
    pub(super) wedged: bool,
    /// Entries and records of a [`TreeId`] tree written since the last successful flush.
    pub(super) unflushed: Vec<Tracked>,
    /// Writes reported as failed: undone before writing resumes.
    pub(super) poisoned: Vec<Tracked>,
    /// Acknowledged writes read back from a failed handle (`None`: the key was removed),
    /// still to be applied to the reopened one (see [`Shared::carry_unflushed`]).
    pub(super) carried: Vec<(TreeId, Vec<u8>, Option<IVec>)>,
    /// Tests that make sled itself meet a full disk: the monitor's free-space check would
    /// refuse writes first whenever its tick falls in the last MiB of the filling.
    #[cfg(test)]
    pub(super) no_space_check: bool,
}

/// At most this many unflushed keys are remembered (a failed explicit flush in sync
/// durability, where there are a handful, and a reopen, which carries the last
/// `flush_interval_ms` of batch durability over).
const MAX_UNFLUSHED: usize = 100_000;

/// Free bytes for an unprivileged writer on the file system of `dir`.
pub(super) fn free_bytes(dir: &Path) -> Option<u64> {
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

/// Flushes periodically and, while writes are refused, probes and reopens; ends when the
/// store is dropped.
pub(super) fn monitor(shared: Weak<Shared>) {
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
    /// Refuses a write while the store cannot write.
    pub(super) fn writable(&self) -> Result<(), StoreError> {
        match &unpoisoned(self.health.lock()).failure {
            None => Ok(()),
            Some(reason) => Err(StoreError::Unavailable(format!(
                "the store cannot write: {reason}"
            ))),
        }
    }

    /// Marks the store as unable to write (the first reason is kept).
    pub(super) fn fail(&self, reason: String, sled_failed: bool) {
        let mut health = unpoisoned(self.health.lock());
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
    pub(super) fn written<T>(&self, result: sled::Result<T>) -> Result<T, StoreError> {
        result.map_err(|e| {
            self.fail(format!("write failed: {e}"), true);
            storage_error(e)
        })
    }

    /// Refuses a large write when the disk cannot take it (sled must not meet ENOSPC).
    pub(super) fn ensure_space(&self, bytes: usize) -> Result<(), StoreError> {
        if bytes < LARGE_VALUE {
            return Ok(());
        }
        match free_bytes(&self.dir) {
            Some(free) if free < bytes as u64 + SPACE_MARGIN => {
                let reason = format!("disk full: {free} bytes free in {}", self.dir.display());
                self.fail(reason.clone(), false);
                Err(StoreError::Unavailable(reason))
            }
            _ => Ok(()),
        }
    }

    /// Inserts a new log or chat entry (a key nothing held), remembering its key until it
    /// is flushed (or, should the insert fail, for deletion once writing resumes).
    pub(super) fn insert_entry(
        &self,
        trees: &Trees,
        tree: TreeId,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.ensure_space(value.len())?;
        let result = trees.tree(tree).insert(&key, value);
        self.track(
            result,
            Tracked {
                tree,
                key,
                before: None,
            },
        )
    }

    /// Writes (`Some`) or removes (`None`) a record that may exist already: a chat message
    /// edited or deleted, an edit-log entry, a moderation record. What the key held is read
    /// first, so a write reported as failed puts it back rather than deleting the key
    /// (which would lose the original message); an acknowledged one, removals included,
    /// is carried over a reopen like an inserted entry.
    pub(super) fn overwrite_entry(
        &self,
        trees: &Trees,
        tree: TreeId,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        if let Some(value) = &value {
            self.ensure_space(value.len())?;
        }
        let sled_tree = trees.tree(tree);
        let before = sled_tree.get(&key).map_err(storage_error)?;
        let result = match value {
            Some(value) => sled_tree.insert(&key, value),
            None => sled_tree.remove(&key),
        };
        self.track(result, Tracked { tree, key, before })
    }

    /// Reports an entry sled took as failed after all, because a later write of the same
    /// operation failed (an append's last-activity counter, a chat message's counters): the
    /// caller is told the operation failed, so the entry is undone before writing resumes
    /// instead of being carried over a reopen as acknowledged (SPEC 5.4: what was reported
    /// as failed is never replayed).
    pub(super) fn report_failed(&self, tree: TreeId, key: &[u8]) {
        let mut health = unpoisoned(self.health.lock());
        let write = match health
            .unflushed
            .iter()
            .rposition(|w| w.tree == tree && w.key == key)
        {
            Some(i) => health.unflushed.remove(i),
            None => Tracked {
                tree,
                key: key.to_vec(),
                before: None,
            },
        };
        health.poisoned.push(write);
    }

    /// Remembers an acknowledged write until it is flushed, or a failed one for undoing.
    fn track(&self, result: sled::Result<Option<IVec>>, write: Tracked) -> Result<(), StoreError> {
        match result {
            Ok(_) => {
                let mut health = unpoisoned(self.health.lock());
                if health.unflushed.len() < MAX_UNFLUSHED {
                    health.unflushed.push(write);
                }
                Ok(())
            }
            Err(e) => {
                unpoisoned(self.health.lock()).poisoned.push(write);
                self.written(Err(e))
            }
        }
    }

    /// Flushes sled; a failure (or a stall, seen by [`Shared::check`]) stops writes.
    pub(super) fn flush_trees(&self, trees: &Trees, explicit: bool) -> Result<(), StoreError> {
        *unpoisoned(self.flushing_since.lock()) = Some(Instant::now());
        let result = trees.db.flush();
        *unpoisoned(self.flushing_since.lock()) = None;
        let mut health = unpoisoned(self.health.lock());
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

    pub(super) fn check(&self) -> Result<(), StoreError> {
        if let Some(since) = *unpoisoned(self.flushing_since.lock()) {
            if since.elapsed() >= FLUSH_STALL {
                return Err(StoreError::Unavailable(format!(
                    "a flush has not returned for {} s (sled is stuck after a failed write); restart easel",
                    since.elapsed().as_secs()
                )));
            }
        }
        let health = unpoisoned(self.health.lock());
        if let Some(reason) = &health.failure {
            return Err(StoreError::Unavailable(if health.wedged {
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
        let (failed, wedged, check_space) = {
            let h = unpoisoned(self.health.lock());
            #[cfg(test)]
            let check_space = !h.no_space_check;
            #[cfg(not(test))]
            let check_space = true;
            (h.failure.is_some(), h.wedged, check_space)
        };
        if wedged {
            return;
        }
        if !failed {
            if let Some(free) = free_bytes(&self.dir).filter(|_| check_space) {
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

    /// Reopens sled if it failed, undoes the writes reported as failed, flushes, and lets
    /// writes through again.
    fn resume(&self) -> Result<(), StoreError> {
        let sled_failed = unpoisoned(self.health.lock()).sled_failed;
        if sled_failed {
            self.reopen()?;
        }
        let trees = self.trees()?;
        let poisoned = std::mem::take(&mut unpoisoned(self.health.lock()).poisoned);
        // sled keeps the first I/O error of its background flusher in the open handle and
        // returns it from every later call, even after the space is back: a sled error
        // here means the next attempt must reopen it.
        let sled_error = |e: sled::Error, poisoned: Vec<_>| {
            let mut health = unpoisoned(self.health.lock());
            health.poisoned.extend(poisoned);
            health.sled_failed = true;
            storage_error(e)
        };
        // Newest first: a key written twice ends with what it held before the first write.
        for write in poisoned.iter().rev() {
            let tree = trees.tree(write.tree);
            let undone = match &write.before {
                Some(before) => tree.insert(&write.key, before.clone()),
                None => tree.remove(&write.key),
            };
            if let Err(e) = undone {
                return Err(sled_error(e, poisoned.clone()));
            }
        }
        if let Err(e) = trees.db.flush() {
            return Err(sled_error(e, poisoned));
        }
        let mut health = unpoisoned(self.health.lock());
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
        let old = unpoisoned(self.trees.write()).take();
        if let Some(old) = old {
            self.carry_unflushed(&old);
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
                let mut health = unpoisoned(self.health.lock());
                health.wedged = true;
                health.failure =
                    Some("sled did not close after a failed write (its files stay locked)".into());
                return Err(StoreError::Unavailable("sled did not close".into()));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match open_sled(&self.dir, &self.settings) {
                Ok(trees) => {
                    let trees = Arc::new(trees);
                    *unpoisoned(self.trees.write()) = Some(Arc::clone(&trees));
                    return self.write_carried(&trees);
                }
                Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads out of a failed handle the entries acknowledged since the last flush (batch
    /// durability): they exist only in its memory, and reopening from disk would drop
    /// them while live documents still show them — a reader must never see what a
    /// restart will not have (SPEC 5.4).
    fn carry_unflushed(&self, old: &Trees) {
        let keys = std::mem::take(&mut unpoisoned(self.health.lock()).unflushed);
        let mut carried = Vec::with_capacity(keys.len());
        let mut unreadable = 0usize;
        for write in keys {
            match old.tree(write.tree).get(&write.key) {
                Ok(Some(value)) => carried.push((write.tree, write.key, Some(value))),
                // A removal (or an overwrite removed since): its absence is carried, or the
                // disk's older record would come back.
                Ok(None) if write.before.is_some() => carried.push((write.tree, write.key, None)),
                // An appended entry removed since: a snapshot covered it.
                Ok(None) => {}
                Err(_) => unreadable += 1,
            }
        }
        if unreadable > 0 {
            tracing::error!(
                unreadable,
                "acknowledged entries not yet flushed could not be read back from the failed database; a restart will not have them"
            );
        }
        unpoisoned(self.health.lock()).carried.extend(carried);
    }

    /// Writes the carried entries into the reopened handle. They count as unflushed again
    /// until the next flush, so a failure before it carries them once more.
    fn write_carried(&self, trees: &Trees) -> Result<(), StoreError> {
        let mut carried = std::mem::take(&mut unpoisoned(self.health.lock()).carried);
        while let Some((tree, key, value)) = carried.pop() {
            let written = match &value {
                Some(value) => trees.tree(tree).insert(&key, value.clone()),
                None => trees.tree(tree).remove(&key),
            };
            let before = match written {
                Ok(before) => before,
                Err(e) => {
                    carried.push((tree, key, value));
                    unpoisoned(self.health.lock()).carried.extend(carried);
                    return Err(storage_error(e));
                }
            };
            let mut health = unpoisoned(self.health.lock());
            if health.unflushed.len() < MAX_UNFLUSHED {
                health.unflushed.push(Tracked { tree, key, before });
            }
        }
        Ok(())
    }
}
