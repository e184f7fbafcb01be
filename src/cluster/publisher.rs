//! The publisher: what the sessions of this node tell the other nodes, written to each
//! session's event stream by one thread, in the order it was published.
//!
//! A session publishes from wherever it is (an async worker relaying awareness, a lane
//! storing a chat edit) and must never wait on Redis, so [`Queue::push`] only queues. The
//! thread takes whatever is queued (up to [`BATCH`] events) and writes it in one round
//! trip ([`RedisStore::publish_many`]: a pipeline); a presence change also sets the
//! session's presence hash (what a node that loads the session later reads). Awareness
//! is the bulk of the traffic and is ephemeral: past [`QUEUE_AWARENESS`] queued states,
//! or while Redis does not answer, it is dropped and counted (the next move of the cursor
//! replaces it, and the query a node sends on load gathers the rest). Every other event
//! (presence, moderation, relays, edits) is never dropped: it is retried with backoff, in
//! order, until Redis takes it. Must not read streams or touch sessions.
//!
//! [`RedisStore::publish_many`]: crate::store::redis::RedisStore::publish_many

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Cluster;
use crate::metrics::Metrics;
use crate::session::bus::Event;

/// The kind of an awareness event: its data is the awareness update's bytes.
pub(super) const AWARENESS: &str = "aw";
/// The kind of every other event: its data is the [`Event`] as JSON.
pub(super) const JSON: &str = "j";

/// Awareness states queued at most; past it one is dropped and counted (the thread is
/// retrying a down Redis, or cannot keep up). Other events are not bounded here: they are
/// few (each comes from a rate-limited client action) and must not be lost.
const QUEUE_AWARENESS: usize = 16 * 1024;

/// Events written in one round trip at most.
const BATCH: usize = 256;

pub(super) struct Queue {
    sender: Sender<(Arc<str>, Event)>,
    /// Queued and not yet written (or given up).
    pending: Arc<AtomicUsize>,
    /// Of which awareness.
    awareness: Arc<AtomicUsize>,
}

pub(super) struct Incoming {
    receiver: Receiver<(Arc<str>, Event)>,
    pending: Arc<AtomicUsize>,
    awareness: Arc<AtomicUsize>,
}

pub(super) fn queue() -> (Queue, Incoming) {
    let (sender, receiver) = mpsc::channel();
    let pending = Arc::new(AtomicUsize::new(0));
    let awareness = Arc::new(AtomicUsize::new(0));
    (
        Queue {
            sender,
            pending: pending.clone(),
            awareness: awareness.clone(),
        },
        Incoming {
            receiver,
            pending,
            awareness,
        },
    )
}

impl Queue {
    pub(super) fn push(&self, metrics: &Metrics, session: &str, event: Event) {
        let is_awareness = matches!(event, Event::Awareness(_));
        if is_awareness && self.awareness.fetch_add(1, Ordering::AcqRel) >= QUEUE_AWARENESS {
            self.awareness.fetch_sub(1, Ordering::AcqRel);
            metrics.cluster.events_dropped.inc();
            tracing::debug!(%session, "awareness to other nodes dropped: queue full");
            return;
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.sender.send((Arc::from(session), event)).is_err() {
            // The thread is gone (the node is stopping).
            self.pending.fetch_sub(1, Ordering::AcqRel);
            if is_awareness {
                self.awareness.fetch_sub(1, Ordering::AcqRel);
            }
            metrics.cluster.events_dropped.inc();
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
    // hash: an unchanged count is not written again.
    let mut presence: HashMap<(Arc<str>, String), usize> = HashMap::new();
    loop {
        let first = match incoming.receiver.recv_timeout(Duration::from_millis(500)) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => match cluster.upgrade() {
                Some(node) if !node.stopping() => continue,
                _ => return,
            },
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match incoming.receiver.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let Some(node) = cluster.upgrade() else {
            return;
        };
        let taken = batch.len();
        let awareness = batch
            .iter()
            .filter(|(_, e)| matches!(e, Event::Awareness(_)))
            .count();
        write(&node, &mut presence, batch);
        incoming.awareness.fetch_sub(awareness, Ordering::AcqRel);
        incoming.pending.fetch_sub(taken, Ordering::AcqRel);
        if presence.len() > 100_000 {
            presence.retain(|_, count| *count > 0);
        }
    }
}

/// Writes a batch of events in order, retrying while Redis is down; awareness is dropped
/// instead of retried, and everything is given up once the node is stopping.
fn write(
    node: &Cluster,
    presence: &mut HashMap<(Arc<str>, String), usize>,
    mut batch: Vec<(Arc<str>, Event)>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match write_once(node, presence, &batch) {
            Ok(()) => return,
            Err(e) => {
                let before = batch.len();
                batch.retain(|(_, e)| !matches!(e, Event::Awareness(_)));
                let dropped = before - batch.len();
                if node.stopping() {
                    node.metrics.cluster.events_dropped.inc_by(before as u64);
                    return;
                }
                node.metrics.cluster.events_dropped.inc_by(dropped as u64);
                if batch.is_empty() {
                    return;
                }
                tracing::debug!(events = batch.len(), error = %e, "events to other nodes not written yet; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One attempt: the presence hash changes (one script each), then every event in one
/// pipeline. A retry after a partial write may write an event twice: the events a node
/// hears are idempotent (absolute presence counts, states at their clocks, moderation
/// records) but a relayed tutor event, which a client may see twice.
fn write_once(
    node: &Cluster,
    presence: &mut HashMap<(Arc<str>, String), usize>,
    batch: &[(Arc<str>, Event)],
) -> Result<(), crate::store::StoreError> {
    for (session, event) in batch {
        if let Event::Presence { user, connections } = event {
            let key = (session.clone(), user.id.clone());
            if presence.get(&key) != Some(connections) {
                node.store
                    .presence_change(session, user, *connections as u64)?;
                presence.insert(key, *connections);
            }
        }
    }
    let encoded: Vec<(&str, &str, Vec<u8>)> = batch
        .iter()
        .filter_map(|(session, event)| {
            let (kind, data) = encode(event)?;
            Some((&**session, kind, data))
        })
        .collect();
    node.store.publish_many(&encoded)
}
