//! The plain snapshot files beside the database: `versions/<session>/<N>.yjs`, the Yjs v1
//! state of every kept snapshot version (written to a temporary name, fsynced, renamed).
//! They are what `easel store recover` rebuilds a damaged database from, and what a load
//! falls back on when the database lost a version it had.
//!
//! Owns: the folder layout, reading, writing and listing version files. Must not touch:
//! the sled database (the store decides when a file is written or pruned).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::records::check_yjs_update;
use super::Shared;
use crate::store::StoreError;

/// The folder of the plain snapshot files, inside the data directory.
pub const VERSIONS_DIR: &str = "versions";

impl Shared {
    pub(super) fn versions_dir(&self, session: &str) -> PathBuf {
        self.dir.join(VERSIONS_DIR).join(session)
    }

    /// The version numbers of the session's `versions/` files, ascending.
    pub(super) fn version_files(&self, session: &str) -> Vec<u64> {
        version_files_in(&self.versions_dir(session))
    }

    /// The state in a version file, if it reads and decodes.
    pub(super) fn read_version_file(&self, session: &str, version: u64) -> Result<Vec<u8>, String> {
        let path = self.versions_dir(session).join(format!("{version}.yjs"));
        let state = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        check_yjs_update(&state)?;
        Ok(state)
    }

    /// Writes `versions/<session>/<version>.yjs`: temporary name, fsync, rename, fsync of
    /// the folder, so a crash leaves the old file or the whole new one.
    pub(super) fn write_version_file(
        &self,
        session: &str,
        version: u64,
        state: &[u8],
    ) -> Result<(), StoreError> {
        let folder = self.versions_dir(session);
        let io = |what: &str, e: std::io::Error| {
            let context = format!("{what} {}", folder.display());
            self.fail(format!("{context}: {e}"), false);
            StoreError::io_while(context, e)
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

    /// Removes the session's version files older than the newest `keep_snapshots`.
    pub(super) fn prune_version_files(&self, session: &str) {
        let files = self.version_files(session);
        let keep_from = files.len().saturating_sub(self.settings.keep_snapshots);
        for old in &files[..keep_from] {
            let path = self.versions_dir(session).join(format!("{old}.yjs"));
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove a pruned version file");
            }
        }
    }
}

/// The version numbers of the `<N>.yjs` files in `folder`, ascending.
pub(crate) fn version_files_in(folder: &Path) -> Vec<u64> {
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
