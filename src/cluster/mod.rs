//! One node of a cluster (SPEC 9): what makes several `easel serve` processes on one Redis
//! a single service, with no sticky sessions.
//!
//! Redis is the source of truth ([`RedisStore`]: every command and script lives there); a
//! node holds live replicas of the sessions its clients use. A whiteboard update or a chat
//! message is appended to the session's stream in Redis before anything is relayed (the
//! store does it on the session's lane, as sled's append). This module keeps the replicas
//! in step with what the other nodes do:
//!
//! - `reader.rs`: one thread, one blocking read over the streams of every session this
//!   node holds (whiteboard log, chat, events), handing other nodes' updates to the
//!   whiteboard's sequencer, chat messages to the tutor room in seq order (this node's own
//!   included: that is how every connection sees one order), and events to
//!   [`Session::hear`].
//! - `publisher.rs`: what the sessions publish on the [`Bus`] (awareness, presence, typing
//!   and tutor events, chat edits, moderation), queued and written to the session's event
//!   stream by one thread, so no session waits on Redis to tell the others.
//! - `watch.rs`: the node's heartbeat (a key with a TTL), the health seen by `/readyz` and
//!   the upgrade handler (Redis answering or not), and the sweep that removes the presence
//!   and awareness of nodes whose heartbeat is gone (within 30 s of their death).
//!
//! The data still flows one way: the reader is a source like a socket, feeding the session,
//! which fans out. Must not touch sockets, HTTP, or redis-rs (only [`RedisStore`]'s methods).
//!
//! [`Session::hear`]: crate::session::Session::hear

mod publisher;
mod reader;
mod watch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use crate::metrics::Metrics;
use crate::session::bus::{Bus, Event};
use crate::session::Session;
use crate::store::redis::{Cursor, RedisStore};
use crate::sync;

/// How long one blocking stream read waits for entries before it reads again with the
/// sessions held by then (a session loaded meanwhile waits at most this long for its first
/// read; entries of the sessions already read come at once). An idle node reads 20 times a
/// second: nothing to Redis, and a session's first entries come within 50 ms.
const READ_BLOCK: Duration = Duration::from_millis(50);

/// A session this node holds, and how far it has read that session's streams.
struct Held {
    session: Weak<Session>,
    cursor: Cursor,
}

/// This node of the cluster.
pub struct Cluster {
    node: Arc<str>,
    store: Arc<RedisStore>,
    metrics: Arc<Metrics>,
    held: Mutex<HashMap<Arc<str>, Held>>,
    /// Signalled when a session is held, so an idle reader starts reading at once.
    held_changed: Condvar,
    outgoing: publisher::Queue,
    /// Whether Redis answered the last ping (and reads succeed).
    healthy: AtomicBool,
    /// Whether Redis took this node's last heartbeat (a write): the watch's to set.
    writes_ok: AtomicBool,
    stopping: AtomicBool,
    /// Itself, to hand sessions as their `Bus`.
    me: Weak<Cluster>,
}

impl Cluster {
    /// Starts the node's threads (reader, publisher, watch) on `store`.
    pub fn start(store: Arc<RedisStore>, metrics: Arc<Metrics>) -> Arc<Self> {
        let node: Arc<str> = Arc::from(store.node_id());
        metrics.cluster.set_node(&node);
        let (outgoing, receiver) = publisher::queue();
        let cluster = Arc::new_cyclic(|me| Self {
            node,
            store,
            metrics,
            held: Mutex::new(HashMap::new()),
            held_changed: Condvar::new(),
            outgoing,
            healthy: AtomicBool::new(true),
            writes_ok: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            me: me.clone(),
        });
        // Ready only once Redis has answered. Left to the watch's first ping, a `/readyz`
        // just after the listener opened could say ready before Redis was ever reached (a
        // node that does not trust Redis's certificate answered 200 under load). At start,
        // before anything is served: at most the connect and I/O timeouts (1 + 2 s).
        cluster.set_healthy(cluster.store.ping().is_ok());
        reader::spawn(&cluster);
        publisher::spawn(&cluster, receiver);
        watch::spawn(&cluster);
        cluster
    }

    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// Whether Redis answers (for `/readyz` and upgrades: SPEC 9 answers 503 while not).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Sets whether Redis answers (and nothing here is stale); healthy only if its writes
    /// go through too (see [`Cluster::set_writes_ok`]).
    fn set_healthy(&self, up: bool) {
        let up = up && self.writes_ok.load(Ordering::Acquire);
        if self.healthy.swap(up, Ordering::AcqRel) != up {
            if up {
                tracing::info!(node = %self.node, "Redis answers again");
            } else {
                tracing::warn!(node = %self.node, "Redis does not answer: refusing upgrades until it does");
            }
        }
        self.metrics.cluster.redis_up.set(i64::from(up));
    }

    /// Whether Redis takes writes (the watch's heartbeat): a Redis that answers reads but
    /// refuses writes (out of memory, a failed disk) makes the node unready as one that is
    /// down.
    fn set_writes_ok(&self, ok: bool) {
        self.writes_ok.store(ok, Ordering::Release);
    }

    /// Stops the threads, after the publisher has sent what is queued (presence `0`s of the
    /// connections closed at shutdown), waiting at most `timeout` for it.
    pub fn stop(&self, timeout: Duration) {
        self.outgoing.drain(timeout);
        self.stopping.store(true, Ordering::Release);
        self.held_changed.notify_all();
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The sessions held now, with their cursors (dropping those unloaded meanwhile).
    fn held_now(&self) -> Vec<(Arc<Session>, Cursor)> {
        let mut held = sync::lock(&self.held);
        held.retain(|_, h| h.session.strong_count() > 0);
        held.values()
            .filter_map(|h| Some((h.session.upgrade()?, h.cursor.clone())))
            .collect()
    }
}

impl Bus for Cluster {
    fn publish(&self, session: &str, event: Event) {
        self.outgoing.push(&self.metrics, session, event);
    }

    fn hold(&self, session: &Arc<Session>) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let bus: Arc<dyn Bus> = me;
        let already = sync::lock(&self.held)
            .get(&session.id)
            .is_some_and(|h| std::ptr::eq(h.session.as_ptr(), Arc::as_ptr(session)));
        if already {
            return;
        }
        // Events are read from before presence is: a presence change in between is heard
        // (it carries an absolute count: hearing it again is harmless), not missed; and
        // the answers to this node's awareness query come after it.
        let ev_after = self
            .store
            .events_head(&session.id)
            .unwrap_or_else(|_| format!("{}-0", crate::session::tutor::now_ms()));
        // Who is connected to the other nodes now, minus the nodes that died since.
        let present = match self.store.presence(&session.id) {
            Ok(present) => present,
            Err(e) => {
                tracing::warn!(session = %session.id, error = %e, "presence of other nodes not read");
                Vec::new()
            }
        };
        let mut alive: HashMap<String, bool> = HashMap::new();
        let mut others = Vec::new();
        for entry in present {
            if entry.node == *self.node {
                continue;
            }
            let up = *alive
                .entry(entry.node.clone())
                .or_insert_with(|| self.store.node_alive(&entry.node).unwrap_or(true));
            if up {
                others.push((entry.node, entry.user, entry.count as usize));
            }
        }
        for (node, up) in alive {
            if !up {
                if let Err(e) = self.store.presence_drop_node(&session.id, &node) {
                    tracing::debug!(session = %session.id, %node, error = %e, "dead node's presence not dropped");
                }
            }
        }
        session.tutor.attach_bus(bus.clone(), others);
        session.whiteboard.attach_bus(bus);
        let cursor = Cursor {
            session: session.id.clone(),
            wb_after: session.whiteboard.log_through(),
            chat_after: session.tutor.last_seq(),
            ev_after,
        };
        sync::lock(&self.held).insert(
            session.id.clone(),
            Held {
                session: Arc::downgrade(session),
                cursor,
            },
        );
        self.held_changed.notify_all();
    }

    fn release(&self, session: &Arc<Session>) {
        let mut held = sync::lock(&self.held);
        let same = held
            .get(&session.id)
            .is_some_and(|h| std::ptr::eq(h.session.as_ptr(), Arc::as_ptr(session)));
        if same {
            held.remove(&session.id);
        }
    }
}
