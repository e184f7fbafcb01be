//! The whiteboard on Redis: appends (`wb_append`), loading (`load`), snapshot versions
//! written under the compaction lease (`snapshot_write`), listing versions and sessions.
//!
//! The lease: [`RedisStore::write_snapshot`](crate::store::Store::write_snapshot) takes
//! `easel:{s}:lease` with `SET NX PX 30000`, waits up to [`LEASE_WAIT`] for another
//! node's, and takes over (counted in [`RedisStore::lease_takeovers`]) only a lease still
//! held at the end of that wait by a node whose heartbeat is gone; a live node's lease is
//! never taken (it expires by itself 30 s after a crash anyway). The script re-checks the
//! lease, so a write whose lease ran out in the meantime is refused, not interleaved.
//!
//! Owns: the wb, wb:seq, v, vs, meta and lease keys, and `easel:sessions`. Must not touch:
//! chat or presence keys.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::Value;

use super::keys::{self, session_key};
use super::values::{self, corrupt, Entry};
use super::{now_ms, RedisStore};
use crate::store::sled::records::{
    check_yjs_update, decode_snapshot_header, encode_snapshot, SnapshotHeader, SNAPSHOT_FORMAT_V1,
};
use crate::store::{SessionInfo, SnapshotInfo, StoreError, StoredRecord};

/// How long a lease lives unless released (a node that dies while holding it).
pub(super) const LEASE_TTL: Duration = Duration::from_secs(30);
/// How long a snapshot write waits for another node's lease.
pub(super) const LEASE_WAIT: Duration = Duration::from_secs(5);
const LEASE_POLL: Duration = Duration::from_millis(25);
/// Log entries a scan reads per script call: the most a rebuild holds of a Redis log at
/// once (one update each), and as many as the rebuild applies in one transaction.
const SCAN_PAGE_ENTRIES: usize = 256;

/// What one call of the `load` script read.
struct LoadedPage {
    version: u64,
    /// The version's state, when the page brings it.
    state: Option<Vec<u8>>,
    /// The seq the entries follow.
    from: u64,
    /// `wb:seq`: the last seq handed out.
    head: u64,
    entries: Vec<LoadedEntry>,
}

/// A whiteboard stream entry: its seq, and its update unless it has none (skipped).
struct LoadedEntry {
    /// `None`: an id easel never writes (not `0-<seq>`); skipped.
    seq: Option<u64>,
    update: Option<Vec<u8>>,
}

impl RedisStore {
    /// Appends `update` under the next seq; `seen` is the highest seq this node has seen
    /// for the session (the seq is above it, even after Redis lost writes).
    pub(super) fn redis_append_update(
        &self,
        session: &str,
        seen: u64,
        update: &[u8],
    ) -> Result<u64, StoreError> {
        self.register(session)?;
        let mut call = self.scripts.wb_append.prepare_invoke();
        call.key(session_key(session, keys::WB_SEQ))
            .key(session_key(session, keys::WB))
            .key(session_key(session, keys::META))
            .arg(&self.node_id)
            .arg(update)
            .arg(now_ms())
            .arg(seen);
        self.ring(&mut call, session);
        let seq = self.pool.run("append", |con| call.invoke::<Value>(con))?;
        values::unsigned(&seq, "wb_append seq")
    }

    /// [`Store::scan_whiteboard`](crate::store::Store::scan_whiteboard) a page of
    /// [`SCAN_PAGE_ENTRIES`] at a time: each page is one script, so the version, the state
    /// and the entries it hands over belong together. Between two pages another node (or
    /// this one) may write a snapshot and trim entries not read yet; the next page then
    /// brings that snapshot, handed over as a second `Snapshot` record, and the scan goes
    /// on after what it includes. Whatever was handed over before it is in it, so the
    /// records still build the stored document. Returns the seq the last page saw, when
    /// no entry was left to read.
    pub(super) fn redis_scan(
        &self,
        session: &str,
        each: &mut dyn FnMut(StoredRecord<'_>),
    ) -> Result<u64, StoreError> {
        let mut after = None;
        loop {
            let mut page = self.load_page(session, after)?;
            if let Some((version, state)) = self.loadable_state(session, &mut page, after)? {
                each(StoredRecord::Snapshot {
                    version,
                    state: &state,
                });
            }
            let mut last = page.from;
            for entry in &page.entries {
                last = entry.seq.unwrap_or(last);
                if let Some(update) = &entry.update {
                    each(StoredRecord::Update(update));
                }
            }
            // A full page of ids that are not `0-<seq>` (written by hand: they sort after
            // every id easel writes) would be read again and again: the log ends there.
            if page.entries.len() < SCAN_PAGE_ENTRIES || after == Some(last) {
                return Ok(page.head);
            }
            after = Some(last);
        }
    }

    /// One call of the `load` script: up to [`SCAN_PAGE_ENTRIES`] entries after `after`
    /// (`None`: from the newest version, which comes with them).
    fn load_page(&self, session: &str, after: Option<u64>) -> Result<LoadedPage, StoreError> {
        let mut call = self.scripts.load.prepare_invoke();
        call.key(session_key(session, keys::META))
            .key(session_key(session, keys::VERSION_STATES))
            .key(session_key(session, keys::WB))
            .key(session_key(session, keys::WB_SEQ));
        // Empty: no cursor yet.
        call.arg(after.map(|a| a.to_string()).unwrap_or_default())
            .arg(SCAN_PAGE_ENTRIES);
        let reply = self.pool.run("load", |con| call.invoke::<Value>(con))?;
        let what = "load reply";
        let [version, state, from, head, entries] = values::items(&reply, what)? else {
            return Err(corrupt(what));
        };
        let mut page = LoadedPage {
            version: values::unsigned(version, what)?,
            state: values::bytes(state, what)?,
            from: values::unsigned(from, what)?,
            head: values::unsigned(head, what)?,
            entries: Vec::new(),
        };
        for entry in values::items(entries, what)? {
            let entry = Entry::parse(entry, "wb entry")?;
            // The cursor of the next page: every id easel writes is `0-<seq>`.
            let seq = values::seq_of_id(&entry.id);
            let update = match entry.field("u").map(|u| values::bytes(u, "wb update")) {
                Some(Ok(Some(update))) if seq.is_some() => Some(update),
                _ => {
                    tracing::error!(%session, id = %entry.id, "a whiteboard stream entry that easel did not write, or with no update; skipped");
                    None
                }
            };
            page.entries.push(LoadedEntry { seq, update });
        }
        Ok(page)
    }

    /// The page's snapshot, or the newest older version that decodes when it does not (the
    /// changes between the two are lost), or nothing. `after` is the cursor the page was
    /// read from: the state comes on a first page, and on a later one only when a new
    /// snapshot trimmed entries past the cursor.
    fn loadable_state(
        &self,
        session: &str,
        page: &mut LoadedPage,
        after: Option<u64>,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let version = page.version;
        match page.state.take() {
            Some(state) => match check_yjs_update(&state) {
                Ok(()) => Ok(Some((version, state))),
                Err(e) => {
                    self.report_damaged(session, &format!("version {version}"), &e);
                    tracing::error!(%session, version, "loading an older version: the changes between the two are lost");
                    self.older_loadable_version(session, version)
                }
            },
            None => {
                let expected = after.is_none_or(|after| page.from != after);
                if version > 0 && expected {
                    tracing::error!(%session, version, "the newest version's state is missing");
                }
                Ok(None)
            }
        }
    }

    /// The newest version below `version` whose state decodes.
    fn older_loadable_version(
        &self,
        session: &str,
        version: u64,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let mut versions: Vec<u64> = self
            .redis_list_snapshots(session)?
            .into_iter()
            .map(|v| v.version)
            .filter(|&v| v < version)
            .collect();
        versions.sort_unstable();
        for older in versions.into_iter().rev() {
            if let Some(state) = self.redis_get_snapshot(session, older)? {
                if check_yjs_update(&state).is_ok() {
                    return Ok(Some((older, state)));
                }
            }
        }
        Ok(None)
    }

    pub(super) fn redis_write_snapshot(
        &self,
        session: &str,
        state: &[u8],
        state_vector: &[u8],
        update_count: u64,
        log_through: u64,
    ) -> Result<u64, StoreError> {
        self.register(session)?;
        self.take_lease(session)?;
        let written =
            self.write_under_lease(session, state, state_vector, update_count, log_through);
        let mut release = self.scripts.lease_release.prepare_invoke();
        release
            .key(session_key(session, keys::LEASE))
            .arg(&self.node_id);
        if let Err(e) = self
            .pool
            .run("lease release", |con| release.invoke::<Value>(con))
        {
            // It expires by itself; until then other nodes wait for it.
            tracing::warn!(%session, error = %e, "cannot release the compaction lease");
        }
        written
    }

    fn write_under_lease(
        &self,
        session: &str,
        state: &[u8],
        state_vector: &[u8],
        update_count: u64,
        log_through: u64,
    ) -> Result<u64, StoreError> {
        let meta = session_key(session, keys::META);
        let last: Value = self.pool.run("HGET last_version", |con| {
            redis::cmd("HGET").arg(&meta).arg("last_version").query(con)
        })?;
        let version = values::unsigned(&last, "last_version")?
            .checked_add(1)
            .ok_or_else(|| {
                StoreError::Corrupt(format!("snapshot version of {session} overflows"))
            })?;
        let header = SnapshotHeader {
            format_version: SNAPSHOT_FORMAT_V1,
            session: session.to_owned(),
            version,
            created_at_ms: now_ms(),
            update_count,
            state_len: state.len() as u64,
            state_vector: state_vector.to_vec(),
        };
        let header = encode_snapshot(&header, &[])?;
        let mut call = self.scripts.snapshot_write.prepare_invoke();
        call.key(session_key(session, keys::LEASE))
            .key(&meta)
            .key(session_key(session, keys::VERSIONS))
            .key(session_key(session, keys::VERSION_STATES))
            .key(session_key(session, keys::WB))
            .key(session_key(session, keys::WB_SEQ))
            .arg(&self.node_id)
            .arg(version)
            .arg(header)
            .arg(state)
            .arg(log_through)
            .arg(self.keep_snapshots)
            .arg(now_ms());
        let reply = self
            .pool
            .run("snapshot write", |con| call.invoke::<Value>(con))?;
        match values::number(&reply, "snapshot_write")? {
            -1 => Err(StoreError::Unavailable(format!(
                "the compaction lease of {session} ran out before the version was written; try again"
            ))),
            -2 => Err(StoreError::Unavailable(format!(
                "another node wrote a version of {session} meanwhile; try again"
            ))),
            -3 => Err(StoreError::Unavailable(format!(
                "the document of {session} is behind the newest stored version (it has not applied every entry up to it); \
                 catch up on the stream and try again"
            ))),
            n => u64::try_from(n).map_err(|_| corrupt("snapshot_write version")),
        }
    }

    /// Takes the session's compaction lease (see the module doc).
    fn take_lease(&self, session: &str) -> Result<(), StoreError> {
        let lease = session_key(session, keys::LEASE);
        let ttl_ms = LEASE_TTL.as_millis() as u64;
        let deadline = Instant::now() + LEASE_WAIT;
        loop {
            let taken: Value = self.pool.run("lease", |con| {
                redis::cmd("SET")
                    .arg(&lease)
                    .arg(&self.node_id)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query(con)
            })?;
            if !matches!(taken, Value::Nil) {
                return Ok(());
            }
            let holder: Value = self.pool.run("lease holder", |con| {
                redis::cmd("GET").arg(&lease).query(con)
            })?;
            let Some(holder) = values::text(&holder, "lease holder")? else {
                continue; // It expired in between: try again at once.
            };
            if holder == self.node_id {
                // Ours, left by a write of this node that did not release it.
                self.pool.run("lease renew", |con| {
                    redis::cmd("SET")
                        .arg(&lease)
                        .arg(&self.node_id)
                        .arg("PX")
                        .arg(ttl_ms)
                        .query::<Value>(con)
                })?;
                return Ok(());
            }
            if Instant::now() >= deadline {
                if !self.node_alive(&holder)? {
                    let mut call = self.scripts.lease_takeover.prepare_invoke();
                    call.key(&lease).arg(&holder).arg(&self.node_id).arg(ttl_ms);
                    let took = self
                        .pool
                        .run("lease takeover", |con| call.invoke::<Value>(con))?;
                    if values::number(&took, "lease_takeover")? == 1 {
                        self.lease_takeovers.fetch_add(1, Ordering::Relaxed);
                        if let Some(metrics) = &self.metrics {
                            metrics.cluster.lease_takeovers.inc();
                        }
                        tracing::warn!(%session, dead_node = %holder, "took over the compaction lease of a node whose heartbeat is gone");
                        return Ok(());
                    }
                    continue;
                }
                return Err(StoreError::Unavailable(format!(
                    "node {holder} is writing a version of {session}; try again"
                )));
            }
            std::thread::sleep(LEASE_POLL);
        }
    }

    pub(super) fn redis_list_snapshots(
        &self,
        session: &str,
    ) -> Result<Vec<SnapshotInfo>, StoreError> {
        let key = session_key(session, keys::VERSIONS);
        let reply: Value = self.pool.run("HGETALL versions", |con| {
            redis::cmd("HGETALL").arg(&key).query(con)
        })?;
        let mut versions = Vec::new();
        for (field, value) in values::pairs(&reply, "versions")? {
            let version =
                values::text(field, "version number")?.and_then(|v| v.parse::<u64>().ok());
            let header = values::bytes(value, "snapshot header")?.unwrap_or_default();
            let decoded = version
                .ok_or_else(|| "version number is not a number".to_owned())
                .and_then(|v| decode_snapshot_header(session, v, &header));
            match decoded {
                Ok(header) => versions.push(SnapshotInfo {
                    version: header.version,
                    created_at_ms: header.created_at_ms,
                    bytes: header.state_len,
                    updates: header.update_count,
                }),
                Err(e) => self.report_damaged(session, "snapshot header", &e),
            }
        }
        versions.sort_by_key(|v| v.version);
        Ok(versions)
    }

    pub(super) fn redis_get_snapshot(
        &self,
        session: &str,
        version: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = session_key(session, keys::VERSION_STATES);
        let reply: Value = self.pool.run("HGET version", |con| {
            redis::cmd("HGET").arg(&key).arg(version).query(con)
        })?;
        values::bytes(&reply, "version state")
    }

    pub(super) fn redis_list_sessions(&self) -> Result<Vec<SessionInfo>, StoreError> {
        let reply: Value = self.pool.run("SMEMBERS sessions", |con| {
            redis::cmd("SMEMBERS").arg(keys::SESSIONS).query(con)
        })?;
        let mut sessions = Vec::new();
        for member in values::items(&reply, "sessions")? {
            let Some(id) = values::text(member, "session id")? else {
                continue;
            };
            sessions.push(self.session_info(&id)?);
        }
        sessions.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(sessions)
    }

    /// Size, last activity and version count of one session (for `easel sessions`).
    pub(super) fn session_info(&self, session: &str) -> Result<SessionInfo, StoreError> {
        let mut bytes = 0;
        for suffix in keys::STORED {
            let key = session_key(session, suffix);
            let used: Value = self.pool.run("MEMORY USAGE", |con| {
                redis::cmd("MEMORY").arg("USAGE").arg(&key).query(con)
            })?;
            bytes += values::unsigned(&used, "memory usage")?;
        }
        let (versions, activity) = self.pool.run("session info", |con| {
            let versions: Value = redis::cmd("HLEN")
                .arg(session_key(session, keys::VERSIONS))
                .query(con)?;
            let activity: Value = redis::cmd("HGET")
                .arg(session_key(session, keys::META))
                .arg("last_activity_ms")
                .query(con)?;
            Ok((versions, activity))
        })?;
        Ok(SessionInfo {
            id: session.to_owned(),
            bytes,
            last_activity_ms: values::unsigned(&activity, "last_activity_ms")?,
            snapshots: values::unsigned(&versions, "version count")? as usize,
        })
    }
}
