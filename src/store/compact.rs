//! `easel store compact`: rebuilds the sled database of a data directory into a fresh one
//! and swaps it in, offline.
//!
//! Why: sled is log-structured. A deleted chat message (SPEC 4.1) is overwritten in the
//! database, but the bytes of its old version stay in sled's log segments until sled
//! happens to rewrite them. Copying every live record into a new database leaves only what
//! is live; the old files are then deleted.
//!
//! How, crash-safe: the new database is built in `<dir>/.compact-new/`; then the marker
//! `SWAPPING` is written there, the old database's files move to `<dir>/.compact-old/`,
//! the marker `INSTALLING` is written, the new files move into `<dir>`, and both folders
//! are deleted. A compaction interrupted after `SWAPPING` is finished by the next
//! `easel store compact`, and until then the server refuses to open the directory (see
//! [`interrupted`]), so it never starts on half a database. One interrupted before it
//! left the old database in place; its partial copy is discarded.
//!
//! Must not touch: `versions/` (the whiteboard's snapshot files), `dev-secret`, the
//! `damaged-*` folders of `easel store recover` (copies of an old database, which may
//! hold deleted text: the report names them so the operator can delete them).

use std::path::{Path, PathBuf};

use super::repair::{io, is_locked, sled_files, RepairError};
use super::sled::storage_error;

const NEW_DIR: &str = ".compact-new";
const OLD_DIR: &str = ".compact-old";
const SWAPPING: &str = "SWAPPING";
const INSTALLING: &str = "INSTALLING";

/// What a compaction did.
#[derive(Debug, Default)]
pub struct CompactReport {
    /// Records copied into the new database.
    pub records: u64,
    /// Size of sled's files before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// `damaged-*` folders left by `easel store recover`: old copies, not compacted.
    pub left_alone: Vec<PathBuf>,
    /// An interrupted compaction was finished first.
    pub resumed: bool,
}

/// Whether `dir` holds a compaction interrupted midway through its swap: the database
/// there is incomplete until `easel store compact` runs again.
pub fn interrupted(dir: &Path) -> bool {
    dir.join(NEW_DIR).join(SWAPPING).exists()
}

fn size_of(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| size_of(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

fn sled_bytes(dir: &Path) -> Result<u64, RepairError> {
    Ok(sled_files(dir)?.iter().map(|f| size_of(f)).sum())
}

fn sync_dir(dir: &Path) -> Result<(), RepairError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("cannot sync", dir, e))
}

fn write_marker(dir: &Path, name: &str) -> Result<(), RepairError> {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("cannot write", &path, e))?;
    sync_dir(dir)
}

/// Moves every sled file of `from` into `to`.
fn move_sled_files(from: &Path, to: &Path) -> Result<(), RepairError> {
    std::fs::create_dir_all(to).map_err(|e| io("cannot create", to, e))?;
    for file in sled_files(from)? {
        if let Some(name) = file.file_name() {
            let target = to.join(name);
            if target.is_dir() {
                std::fs::remove_dir_all(&target).map_err(|e| io("cannot remove", &target, e))?;
            }
            std::fs::rename(&file, &target).map_err(|e| io("cannot move", &file, e))?;
        }
    }
    sync_dir(from)?;
    sync_dir(to)
}

/// The swap, from wherever an earlier run stopped.
fn swap(dir: &Path) -> Result<(), RepairError> {
    let new = dir.join(NEW_DIR);
    let old = dir.join(OLD_DIR);
    // `SWAPPING` is written only once the copy is whole, and goes before the new files
    // are all gone from `new` only by the removal below: with no `db` left in `new` the
    // new database is already in `dir`, and moving `dir`'s files aside would throw it away.
    if !new.join(INSTALLING).exists() && new.join("db").exists() {
        // Every sled file still in `dir` is the old database's.
        move_sled_files(dir, &old)?;
        write_marker(&new, INSTALLING)?;
    }
    move_sled_files(&new, dir)?;
    // The new database is whole in `dir`. `SWAPPING` goes first, on its own: were the
    // folder's removal cut short after `INSTALLING` went but before `SWAPPING` did, the
    // next run would take the installed database for the old one.
    let swapping = new.join(SWAPPING);
    std::fs::remove_file(&swapping).map_err(|e| io("cannot remove", &swapping, e))?;
    sync_dir(&new)?;
    std::fs::remove_dir_all(&new).map_err(|e| io("cannot remove", &new, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io("cannot remove", &old, e))?;
    }
    sync_dir(dir)
}

/// Copies every record of every tree of the database in `dir` into a new one in `to`,
/// then runs `while_held` before letting go of `dir`'s database: sled's lock on it is what
/// keeps a server from starting there, so the `SWAPPING` marker (which makes `serve`
/// refuse the directory) is written before the lock goes, never after.
fn copy_database(
    dir: &Path,
    to: &Path,
    cache_mb: u64,
    while_held: impl FnOnce() -> Result<(), RepairError>,
) -> Result<u64, RepairError> {
    let open = |path: &Path| {
        sled::Config::new()
            .path(path)
            .cache_capacity(cache_mb.max(1) << 20)
            .flush_every_ms(None)
            .open()
            .map_err(storage_error)
    };
    let source = open(dir)?;
    let target = open(to)?;
    let mut records = 0;
    for name in source.tree_names() {
        let from = source.open_tree(&name).map_err(storage_error)?;
        let into = target.open_tree(&name).map_err(storage_error)?;
        for entry in from.iter() {
            let (key, value) = entry.map_err(storage_error)?;
            into.insert(key, value).map_err(storage_error)?;
            records += 1;
        }
    }
    target.flush().map_err(storage_error)?;
    drop(target);
    while_held()?;
    drop(source);
    Ok(records)
}

/// Compacts the database in `dir` (see the module docs). Refuses while a server holds it.
pub fn compact(dir: &Path, cache_mb: u64) -> Result<CompactReport, RepairError> {
    if !dir.is_dir() {
        return Err(RepairError::NoDirectory(dir.to_path_buf()));
    }
    if is_locked(dir) {
        return Err(RepairError::Locked(dir.to_path_buf()));
    }
    let mut report = CompactReport::default();
    let new = dir.join(NEW_DIR);
    if interrupted(dir) {
        swap(dir)?;
        report.resumed = true;
    } else if new.exists() {
        // A build that never reached the swap: the old database is whole; start again.
        std::fs::remove_dir_all(&new).map_err(|e| io("cannot remove", &new, e))?;
    }
    report.bytes_before = sled_bytes(dir)?;
    std::fs::create_dir_all(&new).map_err(|e| io("cannot create", &new, e))?;
    report.records = copy_database(dir, &new, cache_mb, || {
        sync_dir(&new)?;
        write_marker(&new, SWAPPING)
    })?;
    swap(dir)?;
    report.bytes_after = sled_bytes(dir)?;
    if let Ok(entries) = std::fs::read_dir(dir) {
        report.left_alone = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("damaged-"))
            .map(|e| e.path())
            .collect();
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::tutor::ChatMessage;
    use crate::store::{SledStore, Store};

    fn store_with_chat(dir: &Path) {
        let store = SledStore::open(dir, 0, 5, None).unwrap();
        for seq in 1..=3 {
            let m = ChatMessage {
                seq,
                text: format!("line {seq}"),
                ..Default::default()
            };
            store.append_chat("s", &m, 100).unwrap();
        }
        store.close().unwrap();
        drop(store);
        // sled's flusher thread lets go of the directory a moment after the close (a
        // compaction then found it locked, once, in CI): waited out, as a user who stopped
        // the server before `easel store compact` would.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while is_locked(dir) {
            assert!(
                std::time::Instant::now() < deadline,
                "the store kept its lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn texts(dir: &Path) -> Vec<String> {
        let store = SledStore::open(dir, 0, 5, None).unwrap();
        let texts = store
            .chat_after("s", 0, 10)
            .unwrap()
            .into_iter()
            .map(|m| m.text)
            .collect();
        drop(store);
        texts
    }

    #[test]
    fn compacts_and_keeps_every_record() {
        let dir = tempfile::tempdir().unwrap();
        store_with_chat(dir.path());
        let report = compact(dir.path(), 8).unwrap();
        assert!(report.records >= 3, "{report:?}");
        assert!(!report.resumed);
        assert!(!dir.path().join(NEW_DIR).exists() && !dir.path().join(OLD_DIR).exists());
        assert_eq!(texts(dir.path()), ["line 1", "line 2", "line 3"]);
    }

    #[test]
    fn an_interrupted_swap_blocks_serve_and_is_finished_by_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        store_with_chat(dir.path());
        // Interrupted after the old files moved aside, before the new ones moved in.
        let new = dir.path().join(NEW_DIR);
        std::fs::create_dir_all(&new).unwrap();
        copy_database(dir.path(), &new, 8, || Ok(())).unwrap();
        write_marker(&new, SWAPPING).unwrap();
        move_sled_files(dir.path(), &dir.path().join(OLD_DIR)).unwrap();
        assert!(interrupted(dir.path()));
        let refused = SledStore::open(dir.path(), 0, 5, None)
            .err()
            .map(|e| e.to_string());
        assert!(
            refused
                .as_deref()
                .is_some_and(|e| e.contains("easel store compact")),
            "{refused:?}"
        );
        // `store recover` would rebuild from the half in place and set the chat aside.
        let settings = crate::store::SledSettings {
            flush_interval_ms: 0,
            keep_snapshots: 20,
            cache_mb: 8,
            sync_durability: false,
        };
        let refused = super::super::repair::recover(dir.path(), &settings);
        assert!(
            matches!(refused, Err(RepairError::CompactInterrupted(_))),
            "{refused:?}"
        );
        let report = compact(dir.path(), 8).unwrap();
        assert!(report.resumed);
        assert!(!interrupted(dir.path()));
        assert_eq!(texts(dir.path()), ["line 1", "line 2", "line 3"]);
    }

    /// No moment between the copy and the `SWAPPING` marker when a server could open the
    /// old database (and then have its files moved from under it).
    #[test]
    fn the_old_database_stays_locked_until_the_swap_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        store_with_chat(dir.path());
        let new = dir.path().join(NEW_DIR);
        std::fs::create_dir_all(&new).unwrap();
        copy_database(dir.path(), &new, 8, || {
            assert!(
                is_locked(dir.path()),
                "the old database was let go before the marker"
            );
            write_marker(&new, SWAPPING)
        })
        .unwrap();
        assert!(interrupted(dir.path()));
    }

    /// The state a crash inside the last folder removal could leave with the old order:
    /// the new database installed in `dir`, `.compact-new/` holding `SWAPPING` alone. The
    /// next run must not move the installed database aside as if it were the old one.
    #[test]
    fn a_swap_cut_short_while_cleaning_up_keeps_the_installed_database() {
        let dir = tempfile::tempdir().unwrap();
        store_with_chat(dir.path());
        let new = dir.path().join(NEW_DIR);
        std::fs::create_dir_all(&new).unwrap();
        write_marker(&new, SWAPPING).unwrap();
        assert!(interrupted(dir.path()));
        let report = compact(dir.path(), 8).unwrap();
        assert!(report.resumed);
        assert!(!interrupted(dir.path()));
        assert_eq!(texts(dir.path()), ["line 1", "line 2", "line 3"]);
    }

    #[test]
    fn a_build_that_never_reached_the_swap_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        store_with_chat(dir.path());
        let new = dir.path().join(NEW_DIR);
        std::fs::create_dir_all(new.join("junk")).unwrap();
        let report = compact(dir.path(), 8).unwrap();
        assert!(!report.resumed);
        assert_eq!(texts(dir.path()), ["line 1", "line 2", "line 3"]);
    }
}
