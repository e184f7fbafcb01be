//! `easel store check` and `easel store recover`: finding and repairing a damaged data
//! directory (SPEC 5.4).
//!
//! Both work on a copy of sled's files, never on the originals: opening a sled database
//! may rewrite parts of it (it zeroes torn log tails), and `check` must change nothing.
//! `recover` reads whatever still reads from that copy, moves the damaged files aside into
//! `damaged-<unix seconds>/`, and builds a new database from what it read plus the
//! `versions/<session>/<N>.yjs` files, then says what it could not bring back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, Transact};

use super::sled::keys::{
    describe_key, key_number, named_key, numbered_key, split_key, CHAT_EDITS_TREE,
    CHAT_SEQ_RESERVED, CHAT_TREE, LAST_SNAPSHOT_VERSION, META_TREE, MODERATION_TREE,
    SNAPSHOTS_TREE, UPDATES_TREE,
};
use super::sled::records::{
    check_yjs_update, decode_chat, decode_chat_edit, decode_counter, decode_moderation,
    decode_snapshot_entry, decode_updates, encode_counter, encode_snapshot, SnapshotHeader,
};
use super::sled::{
    now_ms, quiet_catch_unwind, storage_error, version_files_in, SledSettings, VERSIONS_DIR,
};
use super::StoreError;

/// Why a check, a recovery or a compaction ([`super::compact`]) could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("the data directory {0} does not exist")]
    NoDirectory(PathBuf),
    #[error("the data directory {0} is in use by a running server; stop it first")]
    Locked(PathBuf),
    /// Its database is split between the folders of an interrupted `easel store compact`:
    /// rebuilding from the half in place would report the rest lost and set it aside.
    #[error("the data directory {0} holds an interrupted compaction; run `easel store compact` to finish it first")]
    CompactInterrupted(PathBuf),
    /// A file operation failed: what was done (`cannot move`), on which path, and why.
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(super) fn io(what: &'static str, path: &Path, source: std::io::Error) -> RepairError {
    RepairError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What `check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Damage: each line one finding. Empty: healthy.
    pub problems: Vec<String>,
    /// Sessions seen (database or version files).
    pub sessions: usize,
    /// Records read.
    pub records: u64,
}

/// What `recover` did.
#[derive(Debug, Default)]
pub struct RecoverReport {
    /// Where the damaged files went.
    pub moved_to: Option<PathBuf>,
    /// Records copied from the old database.
    pub records_kept: u64,
    /// Versions rebuilt from `versions/` files.
    pub versions_from_files: u64,
    /// What could not be brought back, one line each.
    pub lost: Vec<String>,
}

/// The files of sled in a data directory (everything but ours: `versions/`, earlier
/// `damaged-*` folders, probe files).
pub(super) fn sled_files(dir: &Path) -> Result<Vec<PathBuf>, RepairError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io("cannot read", dir, e))?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "db" || name == "conf" || name == "blobs" || name.starts_with("snap.") {
            files.push(entry.path());
        }
    }
    Ok(files)
}

/// Whether another process holds the database (sled's lock is a `flock` on `db`).
pub(super) fn is_locked(dir: &Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let Ok(file) = std::fs::OpenOptions::new().read(true).open(dir.join("db")) else {
        return false;
    };
    // SAFETY: flock on a descriptor this function owns; released right after.
    unsafe {
        if libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 {
            return true;
        }
        libc::flock(file.as_raw_fd(), libc::LOCK_UN);
    }
    false
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)?.flatten() {
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(from, to).map(|_| ())
    }
}

/// A temporary folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("easel-check-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The records read from a (copy of a) database: tree → key → value, only those that
/// decode. Problems are added to `problems`.
#[derive(Default)]
struct Salvage {
    trees: BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>,
    opened: bool,
}

/// Copies sled's files of `dir` to a temporary folder (without sled's own snapshot and
/// settings files when `without_derived`: sled rebuilds them from the log and defaults)
/// and reads every record that reads and decodes.
fn salvage(dir: &Path, without_derived: bool, problems: &mut Vec<String>) -> Salvage {
    let mut salvage = Salvage::default();
    let Ok(scratch) = Scratch::new() else {
        problems.push("cannot create a temporary folder to examine the database".into());
        return salvage;
    };
    let files = match sled_files(dir) {
        Ok(files) => files,
        Err(e) => {
            problems.push(e.to_string());
            return salvage;
        }
    };
    if files.is_empty() {
        return salvage;
    }
    for file in files {
        let Some(name) = file.file_name() else {
            continue;
        };
        let name_str = name.to_string_lossy();
        // sled rebuilds its own snapshot (`snap.*`) from the log, and `conf` with the
        // settings easel always uses: the second attempt goes without either.
        let derived = name_str.starts_with("snap.") || name_str == "conf";
        if name_str.ends_with(".generating") || (without_derived && derived) {
            continue;
        }
        if let Err(e) = copy_tree(&file, &scratch.path().join(name)) {
            problems.push(format!("cannot read {}: {e}", file.display()));
        }
    }
    let settings = SledSettings {
        flush_interval_ms: 0,
        keep_snapshots: usize::MAX,
        cache_mb: 64,
        sync_durability: false,
    };
    let opened = quiet_catch_unwind(|| -> Result<sled::Db, StoreError> {
        sled::Config::new()
            .path(scratch.path())
            .cache_capacity(settings.cache_mb << 20)
            .flush_every_ms(None)
            .open()
            .map_err(storage_error)
    });
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => {
            problems.push(format!("the database does not open: {e}"));
            return salvage;
        }
        Err(panic) => {
            problems.push(format!(
                "the database does not open (sled panicked: {panic})"
            ));
            return salvage;
        }
    };
    salvage.opened = true;
    for name in [
        UPDATES_TREE,
        SNAPSHOTS_TREE,
        CHAT_TREE,
        META_TREE,
        CHAT_EDITS_TREE,
        MODERATION_TREE,
    ] {
        let read = quiet_catch_unwind(|| {
            let mut kept = BTreeMap::new();
            let mut bad = Vec::new();
            let tree = match db.open_tree(name) {
                Ok(tree) => tree,
                Err(e) => {
                    bad.push(format!("tree {name} does not open: {e}"));
                    return (kept, bad);
                }
            };
            for entry in tree.iter() {
                let (key, value) = match entry {
                    Ok(kv) => kv,
                    Err(e) => {
                        bad.push(format!("tree {name}: reading stopped: {e}"));
                        break;
                    }
                };
                match record_ok(name, &key, &value) {
                    Ok(()) => {
                        kept.insert(key.to_vec(), value.to_vec());
                    }
                    Err(e) => bad.push(format!("{name} record {}: {e}", describe_key(&key))),
                }
            }
            (kept, bad)
        });
        match read {
            Ok((kept, bad)) => {
                problems.extend(bad);
                salvage.trees.insert(name, kept);
            }
            Err(panic) => problems.push(format!("tree {name}: sled panicked reading it: {panic}")),
        }
    }
    drop(db);
    salvage
}

/// Whether a record of `tree` decodes.
fn record_ok(tree: &str, key: &[u8], value: &[u8]) -> Result<(), String> {
    let (session, _) = split_key(key).ok_or("key is not `session \\0 ...`")?;
    match tree {
        UPDATES_TREE => decode_updates(value).map(|_| ()),
        CHAT_TREE => decode_chat(value).map(|_| ()),
        META_TREE => decode_counter(value).map(|_| ()),
        CHAT_EDITS_TREE => decode_chat_edit(value).map(|_| ()),
        MODERATION_TREE => decode_moderation(value).map(|_| ()),
        _ => {
            let (_, state) = decode_snapshot_entry(session, key, value)?;
            check_yjs_update(state)
        }
    }
}

/// Sessions with version files, and their versions.
fn version_files(dir: &Path) -> BTreeMap<String, Vec<u64>> {
    let mut sessions = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(dir.join(VERSIONS_DIR)) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if crate::session::valid_session_id(&name) {
                sessions.insert(name, version_files_in(&entry.path()));
            }
        }
    }
    sessions
}

/// Versions each session has in the salvaged `snapshots` tree, and the counters.
fn db_versions(salvage: &Salvage) -> BTreeMap<String, BTreeSet<u64>> {
    let mut versions: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    if let Some(tree) = salvage.trees.get(SNAPSHOTS_TREE) {
        for key in tree.keys() {
            if let (Some((session, _)), Some(v)) = (split_key(key), key_number(key)) {
                versions.entry(session.to_owned()).or_default().insert(v);
            }
        }
    }
    versions
}

fn counter(salvage: &Salvage, session: &str, name: &str) -> Option<u64> {
    let value = salvage
        .trees
        .get(META_TREE)?
        .get(&named_key(session, name))?;
    decode_counter(value).ok()
}

/// Reports damage in the data directory `dir` without changing anything in it.
pub fn check(dir: &Path) -> Result<CheckReport, RepairError> {
    if !dir.is_dir() {
        return Err(RepairError::NoDirectory(dir.to_path_buf()));
    }
    if is_locked(dir) {
        return Err(RepairError::Locked(dir.to_path_buf()));
    }
    let mut report = CheckReport::default();
    let salvage = salvage(dir, false, &mut report.problems);
    report.records = salvage.trees.values().map(|t| t.len() as u64).sum();
    let in_db = db_versions(&salvage);
    let files = version_files(dir);
    let mut sessions: BTreeSet<&String> = in_db.keys().collect();
    sessions.extend(files.keys());
    report.sessions = sessions.len();
    for (session, versions) in &files {
        for &version in versions {
            let path = dir
                .join(VERSIONS_DIR)
                .join(session)
                .join(format!("{version}.yjs"));
            let readable = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|state| check_yjs_update(&state));
            if let Err(e) = readable {
                report.problems.push(format!("{}: {e}", path.display()));
            }
        }
        // A version file newer than the database's newest version: sled lost it (it
        // drops everything after a damaged spot of its log), or a crash came between the
        // file and the record.
        if salvage.opened {
            let newest_file = versions.last().copied().unwrap_or(0);
            let newest_db = in_db
                .get(session)
                .and_then(|v| v.last().copied())
                .unwrap_or(0);
            if newest_file > newest_db {
                report.problems.push(format!(
                    "session {session}: version {newest_file} is in versions/ but not in the database \
                     (the database lost what came after some point, or a snapshot was interrupted)"
                ));
            }
        }
    }
    Ok(report)
}

/// Moves the damaged database aside and builds a new one from what still reads and the
/// `versions/` files.
pub fn recover(dir: &Path, settings: &SledSettings) -> Result<RecoverReport, RepairError> {
    if !dir.is_dir() {
        return Err(RepairError::NoDirectory(dir.to_path_buf()));
    }
    if is_locked(dir) {
        return Err(RepairError::Locked(dir.to_path_buf()));
    }
    if super::compact::interrupted(dir) {
        return Err(RepairError::CompactInterrupted(dir.to_path_buf()));
    }
    let mut report = RecoverReport::default();
    let mut problems = Vec::new();
    let mut salvage = salvage(dir, false, &mut problems);
    if !salvage.opened {
        // sled's own snapshot file may be what is damaged: it can rebuild from the log.
        let mut second = Vec::new();
        let retry = self::salvage(dir, true, &mut second);
        if retry.opened {
            problems.retain(|p| !p.starts_with("the database does not open"));
            problems.extend(second);
            salvage = retry;
        }
    }
    report.lost.extend(problems);

    // Move the damaged files aside.
    let aside = dir.join(format!("damaged-{}", now_ms() / 1000));
    let files = sled_files(dir)?;
    if !files.is_empty() {
        std::fs::create_dir_all(&aside).map_err(|e| io("cannot create", &aside, e))?;
        for file in files {
            if let Some(name) = file.file_name() {
                std::fs::rename(&file, aside.join(name))
                    .map_err(|e| io("cannot move", &file, e))?;
            }
        }
        report.moved_to = Some(aside);
    }

    // A new database: what still reads, then the version files it lacks.
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(settings.cache_mb.max(1) << 20)
        .flush_every_ms(None)
        .open()
        .map_err(storage_error)?;
    for (name, records) in &salvage.trees {
        let tree = db.open_tree(name).map_err(storage_error)?;
        for (key, value) in records {
            tree.insert(key.as_slice(), value.as_slice())
                .map_err(storage_error)?;
            report.records_kept += 1;
        }
    }
    let snapshots = db.open_tree(SNAPSHOTS_TREE).map_err(storage_error)?;
    let meta = db.open_tree(META_TREE).map_err(storage_error)?;
    let in_db = db_versions(&salvage);
    for (session, versions) in version_files(dir) {
        let have = in_db.get(&session).cloned().unwrap_or_default();
        for &version in &versions {
            if have.contains(&version) {
                continue;
            }
            let path = dir
                .join(VERSIONS_DIR)
                .join(&session)
                .join(format!("{version}.yjs"));
            let state = match std::fs::read(&path) {
                Ok(state) => state,
                Err(e) => {
                    report.lost.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let Some(state_vector) = state_vector_of(&state) else {
                report
                    .lost
                    .push(format!("{}: not a Yjs v1 update", path.display()));
                continue;
            };
            let created_at_ms = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            let header = SnapshotHeader {
                format_version: 1,
                session: session.clone(),
                version,
                created_at_ms,
                update_count: 0,
                state_len: state.len() as u64,
                state_vector,
            };
            snapshots
                .insert(
                    numbered_key(&session, version),
                    encode_snapshot(&header, &state)?,
                )
                .map_err(storage_error)?;
            report.versions_from_files += 1;
        }
        if let Some(&newest) = versions.last() {
            let key = named_key(&session, LAST_SNAPSHOT_VERSION);
            let counted = counter(&salvage, &session, LAST_SNAPSHOT_VERSION).unwrap_or(0);
            if newest > counted {
                meta.insert(key, &encode_counter(newest)[..])
                    .map_err(storage_error)?;
            }
        }
        if !salvage.opened {
            report.lost.push(format!(
                "session {session}: the changes after version {} and the chat history",
                versions.last().copied().unwrap_or(0)
            ));
        }
    }
    // Chat seqs must never be handed out twice, even for messages that could not be
    // brought back: start every session above the highest seq found anywhere in the
    // damaged files (a gap, not a reuse).
    if let Some(aside) = &report.moved_to {
        let highest = highest_chat_seq_in(aside);
        if highest > 0 {
            let mut sessions: BTreeSet<String> = version_files(dir).into_keys().collect();
            for tree in salvage.trees.values() {
                sessions.extend(
                    tree.keys()
                        .filter_map(|k| split_key(k).map(|(s, _)| s.to_owned())),
                );
            }
            for session in sessions {
                let counted = counter(&salvage, &session, CHAT_SEQ_RESERVED).unwrap_or(0);
                if highest > counted {
                    meta.insert(
                        named_key(&session, CHAT_SEQ_RESERVED),
                        &encode_counter(highest)[..],
                    )
                    .map_err(storage_error)?;
                }
            }
        }
    }
    db.flush().map_err(storage_error)?;
    Ok(report)
}

/// The highest `"seq":N` in the raw bytes of sled's files under `dir` (chat messages are
/// stored as JSON): a bound on every chat seq the damaged database handed out.
fn highest_chat_seq_in(dir: &Path) -> u64 {
    const NEEDLE: &[u8] = b"{\"seq\":";
    let mut files = vec![dir.join("db")];
    if let Ok(blobs) = std::fs::read_dir(dir.join("blobs")) {
        files.extend(blobs.flatten().map(|e| e.path()));
    }
    let mut highest = 0u64;
    for file in files {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let mut at = 0;
        while let Some(found) = bytes[at..].windows(NEEDLE.len()).position(|w| w == NEEDLE) {
            let digits = &bytes[at + found + NEEDLE.len()..];
            let n = digits
                .iter()
                .take(20)
                .take_while(|b| b.is_ascii_digit())
                .fold(0u64, |n, b| {
                    n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
                });
            highest = highest.max(n);
            at += found + NEEDLE.len();
        }
    }
    highest
}

/// The v1-encoded state vector of a Yjs v1 update, `None` if it does not decode.
pub(super) fn state_vector_of(state: &[u8]) -> Option<Vec<u8>> {
    check_yjs_update(state).ok()?;
    let update = yrs::Update::decode_v1(state).ok()?;
    let doc = yrs::Doc::new();
    let mut txn = doc.transact_mut();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| txn.apply_update(update)))
        .ok()?
        .ok()?;
    Some(txn.state_vector().encode_v1())
}
