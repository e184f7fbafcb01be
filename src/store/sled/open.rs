//! Opening the sled database: clearing what an interrupted write left, catching sled's
//! panics on damaged files, and telling a directory locked by another process (sled locks
//! its directory while open) from other failures: [`StoreError::Locked`].
//!
//! Owns: `sled::Config`, the open and its errors. Must not touch: the records (the caller
//! reads them) or the store's health (the caller decides what a failed open means).

use std::path::Path;
use std::sync::Mutex;

use super::keys::{
    CHAT_EDITS_TREE, CHAT_TREE, META_TREE, MODERATION_TREE, SNAPSHOTS_TREE, UPDATES_TREE,
};
use super::{storage_error, SledSettings, Trees};
use crate::store::{unpoisoned, StoreError};

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
pub(super) fn open_sled(dir: &Path, settings: &SledSettings) -> Result<Trees, StoreError> {
    remove_stale_files(dir);
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(settings.cache_mb.max(1).saturating_mul(1 << 20))
        .flush_every_ms((settings.flush_interval_ms > 0).then_some(settings.flush_interval_ms));
    let opened = quiet_catch_unwind(|| {
        let db = config.open().map_err(|e| open_error(dir, e))?;
        let open_tree = |name: &str| db.open_tree(name).map_err(storage_error);
        Ok(Trees {
            updates: open_tree(UPDATES_TREE)?,
            snapshots: open_tree(SNAPSHOTS_TREE)?,
            chat: open_tree(CHAT_TREE)?,
            meta: open_tree(META_TREE)?,
            chat_edits: open_tree(CHAT_EDITS_TREE)?,
            moderation: open_tree(MODERATION_TREE)?,
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
    let _serial = unpoisoned(HOOK.lock());
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

/// The error of a failed open: [`StoreError::Locked`] when another process holds `dir`.
fn open_error(dir: &Path, e: sled::Error) -> StoreError {
    if is_lock_failure(&e) {
        StoreError::Locked {
            dir: dir.to_path_buf(),
        }
    } else {
        StoreError::io_while(
            format!("cannot open the data directory {}", dir.display()),
            e,
        )
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
