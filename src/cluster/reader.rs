//! The stream reader: one thread that reads, in one blocking read, the streams of every
//! session this node holds, and feeds what it reads into the sessions.
//!
//! Per session and stream it reads in stream order from where the session's replica stands
//! (its cursor), so nothing is skipped and nothing comes twice: whiteboard updates of other
//! nodes go to the whiteboard's sequencer (this node's own are in the document already and
//! only move the cursor), chat messages go to the tutor room in seq order (its own too:
//! they are relayed only from here, so every connection sees one order), and other nodes'
//! events go to [`Session::hear`]. A failed read marks Redis unhealthy and is retried with
//! backoff on a fresh connection; the cursors stay where they were, so what was appended
//! meanwhile is read once Redis is back. Must not write to Redis.
//!
//! [`Session::hear`]: crate::session::Session::hear

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Cluster, READ_BLOCK};
use crate::protocol::tutor::ChatMessage;
use crate::session::bus::Event;
use crate::session::Session;
use crate::store::redis::{Position, StreamEntry, StreamReader};
use crate::sync;

/// What one read brought for one session.
#[derive(Default)]
struct Batch {
    /// The seq of the first and of the last whiteboard entry read, and the other nodes'
    /// updates among them.
    wb_first: Option<u64>,
    wb_through: Option<u64>,
    updates: Vec<Vec<u8>>,
    chats: Vec<ChatMessage>,
    events: Vec<(String, String, Vec<u8>)>,
    ev_last: Option<String>,
    /// The last chat seq among entries that did not decode.
    chat_skipped: Option<u64>,
}

pub(super) fn spawn(cluster: &Arc<Cluster>) {
    let cluster = Arc::downgrade(cluster);
    let started = std::thread::Builder::new()
        .name("easel-cluster-reader".into())
        .spawn(move || run(cluster));
    if let Err(e) = started {
        tracing::error!(error = %e, "the cluster stream reader could not start");
    }
}

fn run(cluster: std::sync::Weak<Cluster>) {
    let mut reader: Option<StreamReader> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(node) = cluster.upgrade() else {
            return;
        };
        if node.stopping() {
            return;
        }
        let held = node.held_now();
        if held.is_empty() {
            let guard = sync::lock(&node.held);
            let _ = node.held_changed.wait_timeout(guard, READ_BLOCK);
            continue;
        }
        let r = match reader.as_mut() {
            Some(r) => r,
            None => match node.store.stream_reader() {
                Ok(r) => reader.insert(r),
                Err(e) => {
                    failed(&node, &e, &mut backoff);
                    continue;
                }
            },
        };
        let cursors: Vec<_> = held.iter().map(|(_, c)| c.clone()).collect();
        match r.read(&cursors, READ_BLOCK) {
            Ok(entries) => {
                tracing::trace!(
                    sessions = cursors.len(),
                    entries = entries.len(),
                    "stream read"
                );
                backoff = Duration::from_millis(100);
                // Redis answers again: first undo, in every session, an update it refused
                // that a rollback could not undo while it was down.
                for (session, _) in &held {
                    if let Err(e) = session.whiteboard.refresh_if_stale() {
                        tracing::debug!(session = %session.id, error = %e, "stale document not rebuilt yet");
                    }
                }
                node.set_healthy(!held.iter().any(|(s, _)| s.whiteboard.is_stale()));
                dispatch(&node, &held, entries);
            }
            Err(e) => {
                reader = None;
                failed(&node, &e, &mut backoff);
            }
        }
    }
}

fn failed(node: &Cluster, e: &dyn std::fmt::Display, backoff: &mut Duration) {
    node.metrics.cluster.read_failures.inc();
    node.set_healthy(false);
    tracing::debug!(error = %e, retry_in_ms = backoff.as_millis() as u64, "stream read failed");
    std::thread::sleep(*backoff);
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
}

fn dispatch(
    node: &Cluster,
    held: &[(Arc<Session>, crate::store::redis::Cursor)],
    entries: Vec<StreamEntry>,
) {
    let mut batches: HashMap<Arc<str>, Batch> = HashMap::new();
    for entry in entries {
        match entry {
            StreamEntry::Update {
                session,
                seq,
                node: from,
                update,
            } => {
                let batch = batches.entry(session).or_default();
                batch.wb_first.get_or_insert(seq);
                batch.wb_through = Some(seq);
                if from != *node.node {
                    batch.updates.push(update);
                }
            }
            StreamEntry::Chat {
                session, message, ..
            } => {
                batches.entry(session).or_default().chats.push(message);
            }
            StreamEntry::Event {
                session,
                id,
                node: from,
                kind,
                data,
            } => {
                let batch = batches.entry(session).or_default();
                if from != *node.node {
                    observe_lag(node, &id);
                    batch.events.push((from, kind, data));
                }
                batch.ev_last = Some(id);
            }
            StreamEntry::Skipped { session, at } => {
                let batch = batches.entry(session).or_default();
                match at {
                    // In the log, applied by no node alike (as on a load).
                    Position::Wb(seq) => {
                        batch.wb_first.get_or_insert(seq);
                        batch.wb_through = Some(seq);
                    }
                    Position::Chat(seq) => batch.chat_skipped = Some(seq),
                    Position::Ev(id) => batch.ev_last = Some(id),
                }
            }
        }
    }
    for (session, cursor) in held {
        let Some(mut batch) = batches.remove(&session.id) else {
            continue;
        };
        if let (Some(first), Some(through)) = (batch.wb_first, batch.wb_through) {
            // Seqs are gapless in the stream: a first entry past the next seq means the
            // ones between were trimmed under a version before this node read them.
            if first > cursor.wb_after + 1 {
                node.metrics.cluster.catch_ups.inc();
                tracing::warn!(session = %session.id, after = cursor.wb_after, first, "stream entries trimmed before this node read them: catching up from the stored version");
                if let Err(e) = session.whiteboard.catch_up(through) {
                    tracing::warn!(session = %session.id, error = %e, "catch-up failed; the next read tries again");
                    // The cursor stays: the same gap is found and caught up next time.
                    batch.wb_through = None;
                }
            } else if !batch.updates.is_empty() || through > session.whiteboard.log_through() {
                session.whiteboard.apply_remote(through, batch.updates);
            }
        }
        let chat_last = batch.chats.last().map(|m| m.seq).max(batch.chat_skipped);
        for message in &batch.chats {
            session.tutor.deliver_chat(message);
        }
        for (from, kind, data) in batch.events {
            match decode(&kind, data) {
                Some(event) => session.hear(&from, event),
                None => {
                    tracing::debug!(session = %session.id, %kind, "an event of an unknown kind ignored")
                }
            }
        }
        let mut all = sync::lock(&node.held);
        if let Some(h) = all.get_mut(&session.id) {
            if let Some(through) = batch.wb_through {
                h.cursor.wb_after = h.cursor.wb_after.max(through);
            }
            if let Some(last) = chat_last {
                h.cursor.chat_after = h.cursor.chat_after.max(last);
            }
            if let Some(last) = batch.ev_last {
                h.cursor.ev_after = last;
            }
        }
    }
}

/// An event's kind and bytes as the publisher wrote them (`publisher::encode`).
fn decode(kind: &str, data: Vec<u8>) -> Option<Event> {
    match kind {
        super::publisher::AWARENESS => Some(Event::Awareness(data.into())),
        super::publisher::JSON => serde_json::from_slice(&data).ok(),
        _ => None,
    }
}

/// Event ids are Redis's own (`<ms>-<n>`): their time is when the other node published.
fn observe_lag(node: &Cluster, id: &str) {
    let Some(ms) = id.split('-').next().and_then(|ms| ms.parse::<u64>().ok()) else {
        return;
    };
    let now = crate::session::tutor::now_ms();
    node.metrics
        .cluster
        .stream_lag
        .observe(now.saturating_sub(ms) as f64 / 1e3);
}
