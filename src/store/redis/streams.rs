//! Reading what other nodes appended: [`StreamReader`] (one blocking `XREAD` over the wb,
//! chat and ev streams of many sessions), and the ephemeral events stream
//! ([`RedisStore::publish`], [`RedisStore::events_head`]).
//!
//! A reader has its own connection (a blocking read must not hold a pooled one), read
//! timeout the block time plus [`IO_TIMEOUT`]. On one Redis, one command serves every
//! cursor. On a Redis Cluster an `XREAD` may only name keys of one slot: the cursors are
//! grouped by slot, one group blocks as usual, several are polled without blocking every
//! [`CLUSTER_POLL`] until something arrives or the block time is up.
//!
//! Entries come grouped per stream, in stream order; the caller moves each cursor to the
//! last entry it got of that stream (`wb_after`/`chat_after` = the seq, `ev_after` = the id).
//! Entries this node appended itself come back too (field `node`): the caller skips them.
//!
//! On one Redis server a reader does not name every held session in its blocking read:
//! every append and event also rings the doorbell (`easel:bell`, an entry naming the
//! session), the reader blocks on that one key and then reads only the sessions named, and
//! once a second (and for sessions new to it) it reads every held session's streams
//! without waiting. A blocking `XREAD` costs Redis per key named, so with 100 sessions
//! held this took Redis's CPU from 4.1 s to 2.2 s in a 10 s run (BENCHMARKS.md). A Redis
//! Cluster has no doorbell (a script cannot write outside its session's slot): there the
//! reader names every held session, one read per slot group.
//!
//! Owns: `XREAD` and the ev stream. Must not touch: anything a script writes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;

use super::conn::{breaks_connection, Conn, Pool, IO_TIMEOUT};
use super::keys::{self, session_key};
use super::values::{self, corrupt, Entry};
use super::RedisStore;
use crate::metrics::Metrics;
use crate::protocol::tutor::ChatMessage;
use crate::store::sled::keys::check_session_id;
use crate::store::StoreError;

/// Entries read per stream per call.
const READ_COUNT: u64 = 512;
/// Length the ev stream is trimmed to (approximately): tens of seconds of a busy
/// session's cursor traffic, so a reader that lags (a backoff, a backlog after an outage)
/// still finds the presence and moderation events published meanwhile.
const EVENTS_MAXLEN: u64 = 10_000;
/// How often a reader on one Redis server reads every held session's streams whatever
/// the doorbell says (its safety net).
const FULL_READ: Duration = Duration::from_secs(1);
/// How often several slot groups of a Redis Cluster are polled.
const CLUSTER_POLL: Duration = Duration::from_millis(20);
/// How long a reader that cannot connect waits before answering its error (so a caller
/// that retries at once does not spin while Redis is down).
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// Where a reader stands in one session's three streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub session: Arc<str>,
    /// The last whiteboard seq applied (entries after it are read).
    pub wb_after: u64,
    /// The last chat seq seen.
    pub chat_after: u64,
    /// The last event id seen (`"0-0"`, or [`RedisStore::events_head`] to skip the past).
    pub ev_after: String,
}

/// One entry read from a session's streams.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEntry {
    Update {
        session: Arc<str>,
        seq: u64,
        node: String,
        update: Vec<u8>,
    },
    Chat {
        session: Arc<str>,
        node: String,
        /// As appended, its `seq` from the entry id.
        message: ChatMessage,
    },
    Event {
        session: Arc<str>,
        id: String,
        node: String,
        kind: String,
        data: Vec<u8>,
    },
    /// An entry that does not decode (counted in `easel_store_decode_errors_total` and
    /// logged): the reader moves its cursor past it, or it would be read again at once,
    /// forever.
    Skipped { session: Arc<str>, at: Position },
}

/// Where an entry stands in its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    Wb(u64),
    Chat(u64),
    Ev(String),
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Wb,
    Chat,
    Ev,
}

/// A blocking reader of many sessions' streams, with its own connection.
pub struct StreamReader {
    pool: Arc<Pool>,
    conn: Option<Conn>,
    cluster: bool,
    metrics: Option<Arc<Metrics>>,
    /// One Redis server: where this reader stands in the doorbell (`None`: not read yet).
    bell_after: Option<String>,
    /// When every held session's streams were last read in full (the doorbell's safety
    /// net: a ring trimmed away, or written before its session was held here).
    last_full: Option<Instant>,
    /// The sessions the last call was given.
    known: HashSet<Arc<str>>,
}

impl RedisStore {
    /// A reader with its own connection (opened on its first read).
    pub fn stream_reader(&self) -> Result<StreamReader, StoreError> {
        Ok(StreamReader {
            pool: self.pool.clone(),
            conn: None,
            cluster: self.cluster,
            metrics: self.metrics.clone(),
            bell_after: None,
            last_full: None,
            known: HashSet::new(),
        })
    }

    /// Adds the doorbell to an append script's call (one Redis server only: on a Redis
    /// Cluster a script must not write outside its session's slot).
    pub(super) fn ring(&self, call: &mut redis::ScriptInvocation<'_>, session: &str) {
        if !self.cluster {
            call.key(keys::BELL).arg(session).arg(keys::BELL_MAXLEN);
        }
    }

    /// Appends an ephemeral event (awareness, presence, moderation, ...) for the other
    /// nodes of `session`; never read back by a load.
    pub fn publish(&self, session: &str, kind: &str, data: &[u8]) -> Result<(), StoreError> {
        self.publish_many(&[(session, kind, data.to_vec())])
    }

    /// Appends events (session, kind, data), in order, in one round trip (a pipeline). On a
    /// Redis Cluster one command each: redis-rs's blocking cluster connection does not
    /// pipeline.
    pub fn publish_many(&self, events: &[(&str, &str, Vec<u8>)]) -> Result<(), StoreError> {
        for (session, _, _) in events {
            check_session_id(session)?;
        }
        let xadd = |session: &str, kind: &str, data: &[u8]| {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(session_key(session, keys::EVENTS))
                .arg("MAXLEN")
                .arg("~")
                .arg(EVENTS_MAXLEN)
                .arg("*")
                .arg("n")
                .arg(&self.node_id)
                .arg("k")
                .arg(kind)
                .arg("d")
                .arg(data);
            cmd
        };
        if self.cluster {
            for (session, kind, data) in events {
                let cmd = xadd(session, kind, data);
                self.pool.run("XADD ev", |con| cmd.query::<Value>(con))?;
            }
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut rung: Vec<&str> = Vec::new();
        for (session, kind, data) in events {
            pipe.add_command(xadd(session, kind, data)).ignore();
            if !rung.contains(session) {
                rung.push(session);
            }
        }
        for session in rung {
            pipe.cmd("XADD")
                .arg(keys::BELL)
                .arg("MAXLEN")
                .arg("~")
                .arg(keys::BELL_MAXLEN)
                .arg("*")
                .arg("s")
                .arg(session)
                .ignore();
        }
        self.pool.run("XADD ev", |con| pipe.query::<()>(con))?;
        Ok(())
    }

    /// The id a new reader of `session`'s events starts after: the newest, or `"0-0"`.
    pub fn events_head(&self, session: &str) -> Result<String, StoreError> {
        check_session_id(session)?;
        let key = session_key(session, keys::EVENTS);
        let reply: Value = self.pool.run("XREVRANGE ev", |con| {
            redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query(con)
        })?;
        match values::items(&reply, "ev head")?.first() {
            Some(entry) => Ok(Entry::parse(entry, "ev entry")?.id),
            None => Ok("0-0".into()),
        }
    }
}

impl StreamReader {
    /// One blocking read over every cursor's streams: returns what is new (possibly
    /// nothing, after `block`). An error is [`StoreError::Unreachable`]; the next call
    /// reconnects.
    pub fn read(
        &mut self,
        cursors: &[Cursor],
        block: Duration,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        if cursors.is_empty() {
            std::thread::sleep(block);
            return Ok(Vec::new());
        }
        let block = block.max(Duration::from_millis(1));
        if !self.cluster {
            return self.read_rung(cursors, block);
        }
        let mut groups: HashMap<redis::cluster_routing::Slot, Vec<Cursor>> = HashMap::new();
        for cursor in cursors {
            let slot =
                redis::cluster_routing::Slot::for_key(session_key(&cursor.session, keys::WB));
            groups.entry(slot).or_default().push(cursor.clone());
        }
        if groups.len() == 1 {
            return self.read_group(cursors, Some(block));
        }
        let deadline = Instant::now() + block;
        loop {
            let mut entries = Vec::new();
            for group in groups.values() {
                entries.extend(self.read_group(group, None)?);
            }
            let now = Instant::now();
            if !entries.is_empty() || now >= deadline {
                return Ok(entries);
            }
            std::thread::sleep(CLUSTER_POLL.min(deadline - now));
        }
    }

    /// One Redis server: blocks on the doorbell alone, then reads the streams of the
    /// sessions it names; every [`FULL_READ`], and for sessions new to this reader, reads
    /// the streams of those sessions without waiting for a ring (the doorbell is taken
    /// first, so nothing falls between the two).
    fn read_rung(
        &mut self,
        cursors: &[Cursor],
        block: Duration,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        if self.bell_after.is_none() {
            self.bell_after = Some(self.bell_head()?);
            self.last_full = None;
        }
        if self.last_full.is_none_or(|t| t.elapsed() >= FULL_READ) {
            self.last_full = Some(Instant::now());
            self.known = cursors.iter().map(|c| c.session.clone()).collect();
            return self.read_group(cursors, None);
        }
        let new: Vec<Cursor> = cursors
            .iter()
            .filter(|c| !self.known.contains(&c.session))
            .cloned()
            .collect();
        self.known = cursors.iter().map(|c| c.session.clone()).collect();
        if !new.is_empty() {
            let entries = self.read_group(&new, None)?;
            if !entries.is_empty() {
                return Ok(entries);
            }
        }
        let rung = self.read_bell(block)?;
        let wanted: Vec<Cursor> = cursors
            .iter()
            .filter(|c| rung.contains(&c.session))
            .cloned()
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        self.read_group(&wanted, None)
    }

    /// The newest doorbell id (`"0-0"` when it is empty).
    fn bell_head(&mut self) -> Result<String, StoreError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(keys::BELL).arg("+").arg("-").arg("COUNT").arg(1);
        let reply = self.query(&cmd, None, "XREVRANGE bell")?;
        match values::items(&reply, "bell head")?.first() {
            Some(entry) => Ok(Entry::parse(entry, "bell entry")?.id),
            None => Ok("0-0".into()),
        }
    }

    /// Waits (at most `block`) for rings after this reader's place in the doorbell;
    /// returns the sessions named and moves the place past them.
    fn read_bell(&mut self, block: Duration) -> Result<HashSet<Arc<str>>, StoreError> {
        let after = self.bell_after.clone().unwrap_or_else(|| "0-0".into());
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(keys::BELL_MAXLEN)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(keys::BELL)
            .arg(&after);
        let reply = self.query(&cmd, Some(block), "XREAD bell")?;
        let mut rung = HashSet::new();
        let what = "bell reply";
        let per_stream: Vec<&Value> = match &reply {
            Value::Nil => return Ok(rung),
            Value::Map(map) => map.iter().map(|(_, v)| v).collect(),
            other => values::items(other, what)?
                .iter()
                .map(|item| match values::items(item, what)? {
                    [_key, entries] => Ok(entries),
                    _ => Err(corrupt(what)),
                })
                .collect::<Result<_, _>>()?,
        };
        for entries in per_stream {
            for entry in values::items(entries, what)? {
                let entry = Entry::parse(entry, "bell entry")?;
                if let Ok(session) = entry.field_text("s", "bell session") {
                    rung.insert(Arc::from(session));
                }
                self.bell_after = Some(entry.id);
            }
        }
        Ok(rung)
    }

    /// Runs `cmd` on this reader's connection (opened if need be); `block`: how long the
    /// command may block in Redis, on top of the I/O timeout.
    fn query(
        &mut self,
        cmd: &redis::Cmd,
        block: Option<Duration>,
        what: &str,
    ) -> Result<Value, StoreError> {
        let conn = match self.conn.as_mut() {
            Some(conn) => conn,
            None => match self.pool.open() {
                Ok(conn) => self.conn.insert(conn),
                Err(e) => {
                    std::thread::sleep(RECONNECT_PAUSE);
                    return Err(e);
                }
            },
        };
        let timeout = block.unwrap_or_default() + IO_TIMEOUT;
        let reply = conn
            .set_read_timeout(Some(timeout))
            .and_then(|()| cmd.query::<Value>(conn.like()));
        reply.map_err(|e| {
            let message = format!("Redis {what}: {e}");
            if breaks_connection(&e) {
                self.conn = None;
                // A failed reader starts over: its place in the doorbell is read again.
                self.bell_after = None;
                self.pool.failed(&message);
            }
            StoreError::Unreachable(message)
        })
    }

    /// One `XREAD` over `cursors` (keys of one slot in a cluster); `block`: `BLOCK`.
    fn read_group(
        &mut self,
        cursors: &[Cursor],
        block: Option<Duration>,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        let mut streams: HashMap<String, (Arc<str>, Stream)> = HashMap::new();
        let mut key_args = Vec::with_capacity(cursors.len() * 3);
        let mut id_args = Vec::with_capacity(cursors.len() * 3);
        for cursor in cursors {
            for (suffix, stream, after) in [
                (keys::WB, Stream::Wb, format!("0-{}", cursor.wb_after)),
                (keys::CHAT, Stream::Chat, format!("0-{}", cursor.chat_after)),
                (keys::EVENTS, Stream::Ev, cursor.ev_after.clone()),
            ] {
                let key = session_key(&cursor.session, suffix);
                streams.insert(key.clone(), (cursor.session.clone(), stream));
                key_args.push(key);
                id_args.push(after);
            }
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(READ_COUNT);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&key_args).arg(&id_args);
        let reply = self.query(&cmd, block, "XREAD")?;
        parse_xread(&reply, &streams, self.metrics.as_deref())
    }
}

/// An `XREAD` reply (`Nil`, RESP2 `[[key, entries], ...]` or a RESP3 map).
fn parse_xread(
    reply: &Value,
    streams: &HashMap<String, (Arc<str>, Stream)>,
    metrics: Option<&Metrics>,
) -> Result<Vec<StreamEntry>, StoreError> {
    let what = "XREAD reply";
    let per_stream: Vec<(&Value, &Value)> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
        other => values::items(other, what)?
            .iter()
            .map(|item| match values::items(item, what)? {
                [key, entries] => Ok((key, entries)),
                _ => Err(corrupt(what)),
            })
            .collect::<Result<_, _>>()?,
    };
    let mut out = Vec::new();
    for (key, entries) in per_stream {
        let key = values::text(key, what)?.unwrap_or_default();
        let Some((session, stream)) = streams.get(&key) else {
            return Err(corrupt("XREAD named a stream it was not asked for"));
        };
        for entry in values::items(entries, what)? {
            let entry = Entry::parse(entry, "stream entry")?;
            match to_stream_entry(session, *stream, &entry) {
                Ok(e) => out.push(e),
                Err(e) => {
                    if let Some(metrics) = metrics {
                        metrics.store_decode_errors.inc();
                    }
                    tracing::error!(session = %session, id = %entry.id, error = %e, "a stream entry does not decode; skipped");
                    let at = match stream {
                        Stream::Wb => values::seq_of_id(&entry.id).map(Position::Wb),
                        Stream::Chat => values::seq_of_id(&entry.id).map(Position::Chat),
                        Stream::Ev => Some(Position::Ev(entry.id.clone())),
                    };
                    if let Some(at) = at {
                        out.push(StreamEntry::Skipped {
                            session: session.clone(),
                            at,
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}

fn to_stream_entry(
    session: &Arc<str>,
    stream: Stream,
    entry: &Entry<'_>,
) -> Result<StreamEntry, StoreError> {
    let node = entry.field_text("n", "entry node")?;
    let seq = || values::seq_of_id(&entry.id).ok_or_else(|| corrupt("stream id is not 0-<seq>"));
    Ok(match stream {
        Stream::Wb => StreamEntry::Update {
            session: session.clone(),
            seq: seq()?,
            node,
            update: entry.field_bytes("u", "wb update")?,
        },
        Stream::Chat => {
            let json = entry.field_bytes("m", "chat message")?;
            let message: ChatMessage = serde_json::from_slice(&json)
                .map_err(|e| StoreError::Corrupt(format!("chat message: {e}")))?;
            StreamEntry::Chat {
                session: session.clone(),
                node,
                message: ChatMessage {
                    seq: seq()?,
                    ..message
                },
            }
        }
        Stream::Ev => StreamEntry::Event {
            session: session.clone(),
            id: entry.id.clone(),
            node,
            kind: entry.field_text("k", "event kind")?,
            data: entry.field_bytes("d", "event data")?,
        },
    })
}
