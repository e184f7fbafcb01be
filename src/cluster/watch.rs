//! The node's watch: its heartbeat, its view of Redis's health, and the sweep after nodes
//! that died.
//!
//! Every second it pings Redis (the round trip is a metric; no answer makes the node
//! unhealthy: `/readyz` and upgrades answer 503, SPEC 9). Every [`HEARTBEAT`] it renews the
//! node's heartbeat key, which expires [`HEARTBEAT_TTL`] after the last renewal: a node
//! killed with `kill -9` stops renewing it. Every [`SWEEP`] it looks at the nodes the held
//! sessions know of (presence, awareness) and, for each whose heartbeat is gone, removes
//! its presence from Redis and its users and awareness states from the sessions here: a
//! dead node's users leave within `HEARTBEAT_TTL + SWEEP` (25 s; SPEC 9 asks 60).
//!
//! A Redis that lost its last writes (a crash under `appendfsync everysec`, a failover to a
//! replica that lagged) has counters behind the seqs clients were shown. When Redis's
//! `run_id` changes, and on every sweep, the watch raises each held session's counters to
//! what this node has read ([`RedisStore::raise_seqs`]), so no seq is handed out again,
//! even by a node that loaded the session after the loss (SPEC 5.1). Must not read streams.
//!
//! [`RedisStore::raise_seqs`]: crate::store::redis::RedisStore::raise_seqs

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Cluster;

const PING: Duration = Duration::from_secs(1);
pub(super) const HEARTBEAT: Duration = Duration::from_secs(5);
pub(super) const HEARTBEAT_TTL: Duration = Duration::from_secs(15);
const SWEEP: Duration = Duration::from_secs(10);

pub(super) fn spawn(cluster: &Arc<Cluster>) {
    let cluster = Arc::downgrade(cluster);
    let started = std::thread::Builder::new()
        .name("easel-cluster-watch".into())
        .spawn(move || run(cluster));
    if let Err(e) = started {
        tracing::error!(error = %e, "the cluster watch could not start");
    }
}

fn run(cluster: std::sync::Weak<Cluster>) {
    let mut last_heartbeat: Option<Instant> = None;
    let mut writes_ok = true;
    let mut last_sweep = Instant::now();
    let mut last_run_id: Option<String> = None;
    loop {
        let Some(node) = cluster.upgrade() else {
            return;
        };
        if node.stopping() {
            return;
        }
        let up = match node.store.ping() {
            Ok(round_trip) => {
                node.metrics
                    .cluster
                    .redis_round_trip
                    .observe(round_trip.as_secs_f64());
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "Redis ping failed");
                false
            }
        };
        // The heartbeat is this node's write check too: a Redis that answers PING but
        // refuses writes (out of memory, a failed disk, a replica) closes every writer with
        // 1013, so the node must not take new clients either. While it fails it is tried
        // every second.
        if up {
            if !writes_ok {
                last_heartbeat = None;
            }
            writes_ok = renew_if_due(&node, &mut last_heartbeat);
            node.set_writes_ok(writes_ok);
        }
        // Not ready while a session still holds an update Redis refused (the reader
        // rebuilds it once Redis answers): a joiner must not be served it.
        let stale = node
            .held_now()
            .iter()
            .any(|(session, _)| session.whiteboard.is_stale());
        node.set_healthy(up && !stale);
        if up {
            if let Ok(Some(run_id)) = node.store.run_id() {
                if last_run_id.as_ref().is_some_and(|last| *last != run_id) {
                    tracing::warn!(%run_id, "Redis restarted or failed over: raising the held sessions' seqs to what this node has seen");
                    node.store.forget_registered();
                    raise_seen_seqs(&node);
                }
                last_run_id = Some(run_id);
            }
        }
        if up && last_sweep.elapsed() >= SWEEP {
            last_sweep = Instant::now();
            sweep(&node, &mut last_heartbeat);
            raise_seen_seqs(&node);
        }
        drop(node);
        std::thread::sleep(PING);
    }
}

/// Raises every held session's counters to the seqs this node has read (a no-op unless
/// Redis lost writes).
fn raise_seen_seqs(node: &Cluster) {
    for (session, cursor) in node.held_now() {
        match node
            .store
            .raise_seqs(&session.id, cursor.wb_after, cursor.chat_after)
        {
            Ok(true) => tracing::error!(
                session = %session.id,
                whiteboard_seq = cursor.wb_after,
                chat_seq = cursor.chat_after,
                "Redis had lost seqs this node had seen: its counters are raised past them (what it lost is gone)"
            ),
            Ok(false) => {}
            Err(e) => tracing::debug!(session = %session.id, error = %e, "seqs not checked"),
        }
    }
}

/// Renews this node's heartbeat when [`HEARTBEAT`] has passed since the last renewal;
/// false when the renewal failed.
fn renew_if_due(node: &Cluster, last: &mut Option<Instant>) -> bool {
    if last.is_some_and(|t| t.elapsed() < HEARTBEAT) {
        return true;
    }
    match node.store.heartbeat(HEARTBEAT_TTL) {
        Ok(()) => {
            *last = Some(Instant::now());
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "heartbeat not renewed: Redis refuses writes");
            false
        }
    }
}

/// Removes what the held sessions keep of nodes whose heartbeat is gone. Renews this
/// node's heartbeat as it goes: a sweep over many sessions on a slow Redis can outlast
/// the heartbeat's TTL, and the other nodes would take this one for dead.
fn sweep(node: &Cluster, last_heartbeat: &mut Option<Instant>) {
    let mut alive: HashMap<Arc<str>, bool> = HashMap::new();
    let mut gone_counted: HashSet<Arc<str>> = HashSet::new();
    for (session, _) in node.held_now() {
        let _ = renew_if_due(node, last_heartbeat);
        let mut nodes: HashSet<Arc<str>> = session.tutor.remote_nodes().into_iter().collect();
        nodes.extend(session.whiteboard.awareness_nodes());
        if let Ok(present) = node.store.presence(&session.id) {
            nodes.extend(present.into_iter().map(|p| Arc::from(p.node)));
        }
        nodes.remove(&node.node);
        for other in nodes {
            let up = *alive
                .entry(other.clone())
                // A failed check counts as alive: Redis trouble must not look like deaths.
                .or_insert_with(|| node.store.node_alive(&other).unwrap_or(true));
            if up {
                continue;
            }
            if gone_counted.insert(other.clone()) {
                node.metrics.cluster.nodes_gone.inc();
                tracing::info!(node = %other, "a node's heartbeat is gone: removing its users and awareness");
            }
            if let Err(e) = node.store.presence_drop_node(&session.id, &other) {
                tracing::debug!(session = %session.id, node = %other, error = %e, "dead node's presence not dropped");
            }
            session.node_gone(&other);
        }
    }
}
