//! The publisher: what the sessions of this node tell the other nodes, written to each
//! session's event stream by one thread, in the order it was published.
//!
//! A session publishes from wherever it is (an async worker relaying awareness, a lane
//! storing a chat edit) and must never wait on Redis, so [`Queue::push`] only queues. The
//! thread writes each event with [`RedisStore::publish`]; a presence change also updates
//! the session's presence hash (what a node that loads the session later reads). While
//! Redis does not answer, awareness is dropped (it is ephemeral: the next move of the
//! cursor replaces it, and the query a node sends on load gathers the rest) and every
//! other event is retried with backoff in order, so presence, moderation and relays arrive
//! once Redis is back. Must not read streams or touch sessions.
//!
//! [`RedisStore::publish`]: crate::store::redis::RedisStore::publish

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Cluster;
use crate::metrics::Metrics;
use crate::session::bus::Event;

/// The kind of an awareness event: its data is the awareness update's bytes.
pub(super) const AWARENESS: &str = "aw";
/// The kind of every other event: its data is the [`Event`] as JSON.
pub(super) const JSON: &str = "j";

/// Events queued at most; past it an event is dropped and counted (the thread is
/// retrying a down Redis, or cannot keep up).
const QUEUE_EVENTS: usize = 16 * 1024;

pub(super) struct Queue {
    sender: SyncSender<(Arc<str>, Event)>,
    /// Queued and not yet written (or given up).
    pending: Arc<AtomicUsize>,
}

pub(super) struct Incoming {
    receiver: Receiver<(Arc<str>, Event)>,
    pending: Arc<AtomicUsize>,
}

pub(super) fn queue() -> (Queue, Incoming) {
    let (sender, receiver) = mpsc::sync_channel(QUEUE_EVENTS);
    let pending = Arc::new(AtomicUsize::new(0));
    (
        Queue {
            sender,
            pending: pending.clone(),
        },
        Incoming { receiver, pending },
    )
}

impl Queue {
    pub(super) fn push(&self, metrics: &Metrics, session: &str, event: Event) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        match self.sender.try_send((Arc::from(session), event)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                metrics.cluster.events_dropped.inc();
                tracing::warn!(%session, "event to other nodes dropped: queue full");
            }
        }
    }

    /// Waits (at most `timeout`) until everything queued so far is written.
    pub(super) fn drain(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.pending.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

pub(super) fn spawn(cluster: &Arc<Cluster>, incoming: Incoming) {
    let cluster = Arc::downgrade(cluster);
    let started = std::thread::Builder::new()
        .name("easel-cluster-publisher".into())
        .spawn(move || run(cluster, incoming));
    if let Err(e) = started {
        tracing::error!(error = %e, "the cluster publisher could not start");
    }
}

/// The event's kind and bytes in the stream.
fn encode(event: &Event) -> Option<(&'static str, Vec<u8>)> {
    match event {
        Event::Awareness(update) => Some((AWARENESS, update.to_vec())),
        event => serde_json::to_vec(event).ok().map(|json| (JSON, json)),
    }
}

fn run(cluster: std::sync::Weak<Cluster>, incoming: Incoming) {
    // The connection count of each (session, user) this node last wrote to the presence
    // hash, so a change is written as the difference (the hash sums every node's).
    let mut presence: HashMap<(Arc<str>, String), usize> = HashMap::new();
    loop {
        let (session, event) = match incoming.receiver.recv_timeout(Duration::from_millis(500)) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => match cluster.upgrade() {
                Some(node) if !node.stopping() => continue,
                _ => return,
            },
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(node) = cluster.upgrade() else {
            return;
        };
        write(&node, &mut presence, &session, &event);
        incoming.pending.fetch_sub(1, Ordering::AcqRel);
        if presence.len() > 100_000 {
            presence.retain(|_, count| *count > 0);
        }
    }
}

/// Writes one event, retrying while Redis is down unless it is awareness or the node is
/// stopping.
fn write(
    node: &Cluster,
    presence: &mut HashMap<(Arc<str>, String), usize>,
    session: &Arc<str>,
    event: &Event,
) {
    let Some((kind, data)) = encode(event) else {
        return;
    };
    let mut backoff = Duration::from_millis(50);
    loop {
        let written = (|| {
            if let Event::Presence { user, connections } = event {
                let key = (session.clone(), user.id.clone());
                let before = presence.get(&key).copied().unwrap_or(0);
                if before != *connections {
                    node.store
                        .presence_change(session, user, *connections as u64)?;
                }
                presence.insert(key, *connections);
            }
            node.store.publish(session, kind, &data)
        })();
        match written {
            Ok(()) => return,
            Err(e) => {
                if kind == AWARENESS || node.stopping() {
                    node.metrics.cluster.events_dropped.inc();
                    return;
                }
                tracing::debug!(%session, error = %e, "event to other nodes not written yet; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
