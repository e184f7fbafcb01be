//! `easel cluster import | export` (SPEC 9): moving sessions between a sled data directory
//! and Redis, whole: every kept version with its number, time and update count, the log
//! written after the newest one, every chat message with its seq, `ts`, `from` and
//! `client_id` (edited and deleted ones as they stand), the chat edit log, moderation
//! records, and the counters that keep numbers from being handed out twice (`wb:seq`,
//! `chat:seq`, `last_version`).
//!
//! - Import reads the directory through [`SledStore`] (it must not be in use by a server)
//!   and writes each session that Redis does not have yet (one already there is skipped
//!   and reported, never merged). A session is written under its import keys
//!   (`easel:{s}:import:*`, same slot) and moved into place by one script: nodes, which
//!   may serve meanwhile, never see it half-imported; one a node wrote to meanwhile is
//!   skipped; an import that failed midway leaves only import keys, which a rerun clears.
//! - Export writes a new sled database and its `versions/` files into an empty directory,
//!   record by record in the sled layout of [`crate::store`], so `easel serve --data-dir`
//!   serves it as if it had written it.
//!
//! Owns: the copying. Must not touch: how either store is used while serving.

use std::io::Write;
use std::path::{Path, PathBuf};

use redis::Value;

use super::keys::{self, session_key};
use super::values::{self, corrupt, Entry};
use super::RedisStore;
use crate::protocol::tutor::ChatMessage;
use crate::store::repair::state_vector_of;
use crate::store::sled::keys::{
    edit_key, named_key, numbered_key, CHAT_EDITS_TREE, CHAT_SEQ_RESERVED, CHAT_TREE,
    LAST_ACTIVITY_MS, LAST_CHAT_SEQ, LAST_LOG_SEQ, LAST_SNAPSHOT_VERSION, META_TREE,
    MODERATION_TREE, SNAPSHOTS_TREE, UPDATES_TREE,
};
use crate::store::sled::records::{
    decode_snapshot_header, encode_chat, encode_chat_edit, encode_counter, encode_moderation,
    encode_snapshot, encode_update, SnapshotHeader, SNAPSHOT_FORMAT_V1,
};
use crate::store::sled::{storage_error, SledSettings};
use crate::store::{SledStore, Store, StoreError, StoredRecord, VERSIONS_DIR};

/// The node id written into imported stream entries.
const IMPORT_NODE: &str = "import";

/// Stream entries an export reads per `XRANGE`.
const EXPORT_PAGE_ENTRIES: usize = 256;

/// Why an import or export could not run.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("the data directory {0} does not exist")]
    NoDirectory(PathBuf),
    #[error("{0} is not empty: export writes only into an empty (or new) directory, so nothing there is overwritten or mixed in")]
    NotEmpty(PathBuf),
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

/// What one session's copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionReport {
    pub session: String,
    pub versions: usize,
    pub log_entries: usize,
    pub messages: usize,
    /// Why it was not copied (it already exists in Redis), if it was not.
    pub skipped: Option<String>,
}

/// Every session's report, in session order.
#[derive(Debug, Clone, Default)]
pub struct TransferReport {
    pub sessions: Vec<SessionReport>,
}

/// Copies every session of the sled directory `dir` into `redis`.
pub fn import(dir: &Path, redis: &RedisStore) -> Result<TransferReport, TransferError> {
    if !dir.is_dir() {
        return Err(TransferError::NoDirectory(dir.to_path_buf()));
    }
    let sled = SledStore::open_with(
        dir,
        SledSettings {
            flush_interval_ms: 0,
            keep_snapshots: usize::MAX,
            cache_mb: 64,
            sync_durability: false,
        },
        None,
    )?;
    redis.ping()?;
    let mut report = TransferReport::default();
    for info in sled.list_sessions()? {
        report.sessions.push(import_session(
            &sled,
            redis,
            &info.id,
            info.last_activity_ms,
        )?);
    }
    Ok(report)
}

/// The prefix of a session's keys while it is imported.
const IMPORTING: &str = "import:";

/// The keys an import writes (events, presence and the lease are not imported).
const IMPORTED: [&str; 11] = [
    keys::WB,
    keys::WB_SEQ,
    keys::VERSIONS,
    keys::VERSION_STATES,
    keys::META,
    keys::CHAT,
    keys::CHAT_SEQ,
    keys::CHAT_AMENDED,
    keys::EDITS,
    keys::EDITS_BY_SEQ,
    keys::MODERATION,
];

/// KEYS: the session's keys, then its import keys, in the same order. Moves each import
/// key that exists into place, unless the session got stored state meanwhile (a node
/// wrote to it): then the import keys go and 0 is returned. 1: imported.
const PUBLISH_IMPORT: &str = r#"
local n = #KEYS / 2
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    for j = n + 1, 2 * n do redis.call('DEL', KEYS[j]) end
    return 0
  end
end
for i = 1, n do
  if redis.call('EXISTS', KEYS[n + i]) == 1 then
    redis.call('RENAME', KEYS[n + i], KEYS[i])
  end
end
return 1
"#;

fn import_session(
    sled: &SledStore,
    redis: &RedisStore,
    session: &str,
    last_activity_ms: u64,
) -> Result<SessionReport, TransferError> {
    let mut report = SessionReport {
        session: session.to_owned(),
        ..Default::default()
    };
    if redis.session_exists(session)? {
        report.skipped = Some("already in Redis".into());
        return Ok(report);
    }
    let run = |what: &str, cmd: &redis::Cmd| redis.pool.run(what, |con| cmd.query::<Value>(con));
    // Everything is written under the session's import keys (same hash tag, so same slot)
    // and moved into place by one script at the end: a node never sees a half-imported
    // session, and an import that fails midway leaves nothing a rerun would skip.
    let tmp = |suffix: &str| session_key(session, &format!("{IMPORTING}{suffix}"));
    let mut clear = redis::cmd("DEL");
    for suffix in IMPORTED {
        clear.arg(tmp(suffix));
    }
    run("import: clear a failed import's keys", &clear)?;

    // Versions, with their numbers; the state vector is not in the listing: from the state.
    let mut last_version = 0;
    for info in sled.list_snapshots(session)? {
        let Some(state) = sled.get_snapshot(session, info.version)? else {
            continue;
        };
        let Some(state_vector) = state_vector_of(&state) else {
            tracing::error!(%session, version = info.version, "a version does not decode; not imported");
            continue;
        };
        let header = encode_snapshot(
            &SnapshotHeader {
                format_version: SNAPSHOT_FORMAT_V1,
                session: session.to_owned(),
                version: info.version,
                created_at_ms: info.created_at_ms,
                update_count: info.updates,
                state_len: state.len() as u64,
                state_vector,
            },
            &[],
        )?;
        let mut cmd = redis::cmd("HSET");
        cmd.arg(tmp(keys::VERSIONS)).arg(info.version).arg(header);
        run("import version", &cmd)?;
        let mut cmd = redis::cmd("HSET");
        cmd.arg(tmp(keys::VERSION_STATES))
            .arg(info.version)
            .arg(state);
        run("import version", &cmd)?;
        last_version = last_version.max(info.version);
        report.versions += 1;
    }

    // The log after the newest version, as the stream's newest entries. Their sled seqs
    // are not read back, only their order: they take the seqs just below `last_log_seq`,
    // so the next seq is the one sled would have used. Two scans, neither holding the log
    // (as a rebuild does not): one counts the entries, the other copies them.
    let mut entries = 0u64;
    let last_log_seq = sled.scan_whiteboard(session, &mut |record| {
        entries += u64::from(matches!(record, StoredRecord::Update(_)));
    })?;
    let head = last_log_seq.max(entries);
    let snap_through = head - entries;
    let (mut seen, mut failed) = (0u64, None);
    sled.scan_whiteboard(session, &mut |record| {
        let StoredRecord::Update(update) = record else {
            return;
        };
        seen += 1;
        if failed.is_some() || seen > entries {
            return;
        }
        let mut cmd = redis::cmd("XADD");
        cmd.arg(tmp(keys::WB))
            .arg(format!("0-{}", snap_through + seen))
            .arg("n")
            .arg(IMPORT_NODE)
            .arg("u")
            .arg(update);
        if let Err(e) = run("import update", &cmd) {
            failed = Some(e);
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    if seen != entries {
        return Err(StoreError::Unavailable(format!(
            "the log of {session} changed while it was imported: is a server using the directory?"
        ))
        .into());
    }
    report.log_entries = entries as usize;

    // Chat, each message as it stands (edited text, deleted without text), under its seq.
    let messages = sled.chat_after(session, 0, usize::MAX)?;
    for message in &messages {
        let json = serde_json::to_vec(message)
            .map_err(|e| StoreError::io_while("cannot encode a chat message", e))?;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(tmp(keys::CHAT))
            .arg(format!("0-{}", message.seq))
            .arg("n")
            .arg(IMPORT_NODE)
            .arg("m")
            .arg(json);
        run("import chat", &cmd)?;
    }
    report.messages = messages.len();
    for edit in sled.chat_edits_after(session, (0, 0), usize::MAX)? {
        let json = serde_json::to_string(&edit)
            .map_err(|e| StoreError::io_while("cannot encode a chat edit", e))?;
        let member = format!("{}{json}", super::chat::member_prefix(edit.at_ms, edit.seq));
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(tmp(keys::EDITS)).arg(0).arg(&member);
        run("import edit", &cmd)?;
        let mut cmd = redis::cmd("HSET");
        cmd.arg(tmp(keys::EDITS_BY_SEQ)).arg(edit.seq).arg(&member);
        run("import edit", &cmd)?;
    }
    for record in sled.moderation(session)? {
        if record.is_cleared() {
            continue;
        }
        let json = serde_json::to_vec(&record)
            .map_err(|e| StoreError::io_while("cannot encode a moderation record", e))?;
        let mut cmd = redis::cmd("HSET");
        cmd.arg(tmp(keys::MODERATION)).arg(&record.user).arg(json);
        run("import moderation", &cmd)?;
    }

    // The counters, then the move into place (`PUBLISH_IMPORT`).
    let last_chat = sled.last_chat_seq(session)?;
    let mut cmd = redis::cmd("SET");
    cmd.arg(tmp(keys::CHAT_SEQ)).arg(last_chat);
    run("import chat:seq", &cmd)?;
    let mut cmd = redis::cmd("SET");
    cmd.arg(tmp(keys::WB_SEQ)).arg(head);
    run("import wb:seq", &cmd)?;
    let mut cmd = redis::cmd("HSET");
    cmd.arg(tmp(keys::META))
        .arg("snap_through")
        .arg(snap_through)
        .arg("last_activity_ms")
        .arg(last_activity_ms);
    if last_version > 0 {
        cmd.arg("last_version").arg(last_version);
    }
    run("import meta", &cmd)?;

    let script = redis::Script::new(PUBLISH_IMPORT);
    let mut publish = script.prepare_invoke();
    for suffix in IMPORTED {
        publish.key(session_key(session, suffix));
    }
    for suffix in IMPORTED {
        publish.key(tmp(suffix));
    }
    let moved = redis
        .pool
        .run("import: publish", |con| publish.invoke::<Value>(con))?;
    if values::number(&moved, "import publish")? == 0 {
        report.skipped = Some("created in Redis while it was imported".into());
        return Ok(report);
    }
    redis.register(session)?;
    Ok(report)
}

/// Writes every session in `redis` into a new sled database in `dir` (new, or empty).
pub fn export(redis: &RedisStore, dir: &Path) -> Result<TransferReport, TransferError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| TransferError::Io { what, path, source }
    };
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(io("cannot read", dir))?;
        if entries.next().is_some() {
            return Err(TransferError::NotEmpty(dir.to_path_buf()));
        }
    }
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    redis.ping()?;
    let db = sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .open()
        .map_err(storage_error)?;
    let tree = |name: &str| db.open_tree(name).map_err(storage_error);
    let trees = SledTrees {
        snapshots: tree(SNAPSHOTS_TREE)?,
        updates: tree(UPDATES_TREE)?,
        chat: tree(CHAT_TREE)?,
        meta: tree(META_TREE)?,
        chat_edits: tree(CHAT_EDITS_TREE)?,
        moderation: tree(MODERATION_TREE)?,
    };
    let mut report = TransferReport::default();
    let mut sessions: Vec<String> = redis
        .redis_list_sessions()?
        .into_iter()
        .map(|s| s.id)
        .collect();
    sessions.sort();
    for session in sessions {
        report
            .sessions
            .push(export_session(redis, &trees, dir, &session)?);
    }
    db.flush().map_err(storage_error)?;
    Ok(report)
}

struct SledTrees {
    snapshots: sled::Tree,
    updates: sled::Tree,
    chat: sled::Tree,
    meta: sled::Tree,
    chat_edits: sled::Tree,
    moderation: sled::Tree,
}

fn export_session(
    redis: &RedisStore,
    trees: &SledTrees,
    dir: &Path,
    session: &str,
) -> Result<SessionReport, TransferError> {
    let mut report = SessionReport {
        session: session.to_owned(),
        ..Default::default()
    };
    let insert = |tree: &sled::Tree, key: Vec<u8>, value: Vec<u8>| {
        tree.insert(key, value).map(|_| ()).map_err(storage_error)
    };
    let counter = |name: &str, n: u64| {
        insert(
            &trees.meta,
            named_key(session, name),
            encode_counter(n).to_vec(),
        )
    };
    let meta_key = session_key(session, keys::META);
    let meta: Value = redis.pool.run("HGETALL meta", |con| {
        redis::cmd("HGETALL").arg(&meta_key).query(con)
    })?;
    let mut snap_through = 0;
    let mut last_version = 0;
    let mut last_activity_ms = 0;
    for (name, value) in values::pairs(&meta, "meta")? {
        match values::text(name, "meta name")?.as_deref() {
            Some("snap_through") => snap_through = values::unsigned(value, "snap_through")?,
            Some("last_version") => last_version = values::unsigned(value, "last_version")?,
            Some("last_activity_ms") => {
                last_activity_ms = values::unsigned(value, "last_activity_ms")?
            }
            _ => {}
        }
    }

    // Versions: record and file, as sled's write_snapshot leaves them.
    let versions_key = session_key(session, keys::VERSIONS);
    let headers: Value = redis.pool.run("HGETALL versions", |con| {
        redis::cmd("HGETALL").arg(&versions_key).query(con)
    })?;
    for (version, header) in values::pairs(&headers, "versions")? {
        let Some(version) = values::text(version, "version")?.and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        let header = values::bytes(header, "header")?.unwrap_or_default();
        let header = match decode_snapshot_header(session, version, &header) {
            Ok(header) => header,
            Err(e) => {
                tracing::error!(%session, version, error = %e, "a version header does not decode; not exported");
                continue;
            }
        };
        let Some(state) = redis.redis_get_snapshot(session, version)? else {
            continue;
        };
        let header = SnapshotHeader {
            state_len: state.len() as u64,
            ..header
        };
        write_version_file(dir, session, version, &state)?;
        insert(
            &trees.snapshots,
            numbered_key(session, version),
            encode_snapshot(&header, &state)?,
        )?;
        report.versions += 1;
    }

    // The stream after the newest version, as log entries under their seqs, a page at a
    // time (a log can be much larger than the board).
    let wb_key = session_key(session, keys::WB);
    let mut after = snap_through;
    loop {
        let page: Value = redis.pool.run("XRANGE wb", |con| {
            redis::cmd("XRANGE")
                .arg(&wb_key)
                .arg(format!("(0-{after}"))
                .arg("+")
                .arg("COUNT")
                .arg(EXPORT_PAGE_ENTRIES)
                .query(con)
        })?;
        let page = values::items(&page, "wb entries")?;
        for entry in page {
            let entry = Entry::parse(entry, "wb entry")?;
            let seq = values::seq_of_id(&entry.id).ok_or_else(|| corrupt("wb entry id"))?;
            let update = entry.field_bytes("u", "wb update")?;
            insert(
                &trees.updates,
                numbered_key(session, seq),
                encode_update(&update),
            )?;
            report.log_entries += 1;
            after = seq;
        }
        if page.len() < EXPORT_PAGE_ENTRIES {
            break;
        }
    }
    let wb_seq = redis_counter(redis, session, keys::WB_SEQ)?;

    // Chat as it stands (amendments swapped in), the edit log, moderation.
    let messages: Vec<ChatMessage> =
        redis.redis_chat_read(session, super::chat::Direction::After, 0, usize::MAX)?;
    for message in &messages {
        insert(
            &trees.chat,
            numbered_key(session, message.seq),
            encode_chat(message)?,
        )?;
    }
    report.messages = messages.len();
    for edit in redis.redis_chat_edits_after(session, (0, 0), usize::MAX)? {
        insert(
            &trees.chat_edits,
            edit_key(session, edit.at_ms, edit.seq),
            encode_chat_edit(&edit)?,
        )?;
    }
    for record in redis.redis_moderation(session)? {
        insert(
            &trees.moderation,
            named_key(session, &record.user),
            encode_moderation(&record)?,
        )?;
    }
    let chat_seq = redis_counter(redis, session, keys::CHAT_SEQ)?;

    counter(LAST_LOG_SEQ, wb_seq)?;
    counter(LAST_SNAPSHOT_VERSION, last_version)?;
    counter(LAST_CHAT_SEQ, chat_seq)?;
    counter(CHAT_SEQ_RESERVED, chat_seq)?;
    counter(LAST_ACTIVITY_MS, last_activity_ms)?;
    Ok(report)
}

fn redis_counter(redis: &RedisStore, session: &str, suffix: &str) -> Result<u64, StoreError> {
    let key = session_key(session, suffix);
    let value: Value = redis
        .pool
        .run("GET counter", |con| redis::cmd("GET").arg(&key).query(con))?;
    values::unsigned(&value, suffix)
}

/// `versions/<session>/<N>.yjs`, fsynced (the file `easel store recover` rebuilds from).
fn write_version_file(
    dir: &Path,
    session: &str,
    version: u64,
    state: &[u8],
) -> Result<(), TransferError> {
    let folder = dir.join(VERSIONS_DIR).join(session);
    let path = folder.join(format!("{version}.yjs"));
    let written = (|| {
        std::fs::create_dir_all(&folder)?;
        let mut file = std::fs::File::create(&path)?;
        file.write_all(state)?;
        file.sync_all()
    })();
    written.map_err(|source| TransferError::Io {
        what: "cannot write",
        path,
        source,
    })
}

impl RedisStore {
    /// Whether Redis holds anything of `session` (its counters, versions or chat).
    pub(super) fn session_exists(&self, session: &str) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("EXISTS");
        for suffix in [keys::WB_SEQ, keys::CHAT_SEQ, keys::META, keys::VERSIONS] {
            cmd.arg(session_key(session, suffix));
        }
        // In a Redis Cluster, EXISTS over several keys needs them in one slot: they are.
        let found: Value = self.pool.run("EXISTS", |con| cmd.query(con))?;
        Ok(values::number(&found, "EXISTS")? > 0)
    }
}
