//! A whiteboard's awareness (cursors, presence): the states, the bounds of SPEC.md 7.1 an
//! update must fit (client ids per connection and per session, size and depth of one
//! state), and the relay of what changed, coalesced per tick. Must not touch the document.
//!
//! Awareness is the hot path of a busy board (SPEC.md 3): every client sends its cursor
//! many times a second, and relaying each message as received costs one frame per message
//! per receiver. Instead an update is applied at once (so greetings and query-awareness
//! answers are always current) and the clients it changed are marked; the marked clients'
//! current states then go out as one awareness message, encoded once and shared by every
//! receiver, at most once per tick (`whiteboard.awareness_tick_ms`, default
//! [`AWARENESS_TICK_MS`]). A change after a quiet tick goes out at
//! once (a lone cursor move is not delayed); changes within a tick of the last relay wait
//! for its end, so a burst costs at most one frame per tick whatever its length.
//!
//! Why marks and not messages: a relay reads each marked client's state as it is when the
//! relay goes out, so it always carries the latest state per client, and a removal (a
//! `null` state at the client's own clock) can never be overtaken by an older state of the
//! same client. Relays are serialized (`relaying`), so a later relay never carries an
//! older state than an earlier one.
//!
//! Locks: `relaying` is taken first and held for a whole relay; under it `pending`, then
//! `states`, then `peers` are each taken alone. `peers` before `states` where both are held
//! (a join reads the states under the peer lock).

use std::time::Duration;

use super::*;

pub use crate::config::AWARENESS_TICK_MS;

/// A session's awareness and its coalescing relay. Shared (`Arc`) with the timer task that
/// sends a tick's changes at its end.
pub(super) struct AwarenessRelay {
    session: Arc<str>,
    states: Mutex<Awareness>,
    /// The session's connections (the whiteboard's own list).
    peers: Arc<Mutex<Peers<Outbox>>>,
    pending: Mutex<Pending>,
    /// Held for a whole relay: two relays at once could send an older state last.
    relaying: Mutex<()>,
    /// Changes within this long of the last relay wait for the tick's end.
    tick: Duration,
    /// Cluster mode: the other nodes, told of this node's clients' changes.
    bus: std::sync::OnceLock<Arc<dyn Bus>>,
    /// Cluster mode: the clients whose states came from another node, by node. Relayed to
    /// this node's connections like any, never published back.
    remote: Mutex<HashMap<ClientID, Arc<str>>>,
}

#[derive(Default)]
struct Pending {
    /// Clients whose state changed since the last relay took them.
    marked: HashSet<ClientID>,
    /// When the last relay went out (`None`: never).
    last: Option<Instant>,
    /// A timer task relays the marked clients at the end of the current tick.
    scheduled: bool,
}

/// What a change asks of the relay.
enum Next {
    /// A relay is due now (the last one is at least a tick old).
    RelayNow,
    /// Relay at this time: start the timer.
    RelayAt(Instant),
    /// A timer is running; it takes this change with it.
    Nothing,
}

impl AwarenessRelay {
    pub(super) fn new(
        session: Arc<str>,
        doc: Doc,
        peers: Arc<Mutex<Peers<Outbox>>>,
        tick: Duration,
    ) -> Self {
        Self {
            tick,
            session,
            states: Mutex::new(Awareness::new(doc)),
            peers,
            pending: Mutex::new(Pending::default()),
            relaying: Mutex::new(()),
            bus: Default::default(),
            remote: Default::default(),
        }
    }

    /// Starts publishing this node's changes, and asks the other nodes for their states.
    pub(super) fn attach_bus(&self, session: &str, bus: Arc<dyn Bus>) {
        bus.publish(session, Event::AwarenessQuery);
        let _ = self.bus.set(bus);
    }

    /// The states of this node's own clients among `clients`, as an awareness update's
    /// payload, to publish; `None` when there are none (or no bus).
    fn local_update(&self, clients: impl IntoIterator<Item = ClientID>) -> Option<Bytes> {
        self.bus.get()?;
        let local: Vec<ClientID> = {
            let remote = sync::lock(&self.remote);
            clients
                .into_iter()
                .filter(|id| !remote.contains_key(id))
                .collect()
        };
        if local.is_empty() {
            return None;
        }
        let update = self.states().update_with_clients(local).ok()?;
        (!update.clients.is_empty()).then(|| Bytes::from(update.encode_v1()))
    }

    /// The clients among `clients` that no other node speaks for.
    pub(super) fn not_remote(&self, clients: &HashSet<ClientID>) -> HashSet<ClientID> {
        let remote = sync::lock(&self.remote);
        clients
            .iter()
            .filter(|id| !remote.contains_key(id))
            .copied()
            .collect()
    }

    fn publish(&self, update: Option<Bytes>) {
        if let (Some(bus), Some(update)) = (self.bus.get(), update) {
            bus.publish(&self.session, Event::Awareness(update));
        }
    }

    fn states(&self) -> MutexGuard<'_, Awareness> {
        sync::lock(&self.states)
    }

    /// Marks `clients` as changed and sees that they are relayed within a tick.
    fn changed(self: &Arc<Self>, clients: impl IntoIterator<Item = ClientID>) {
        let mut clients = clients.into_iter().peekable();
        if clients.peek().is_none() {
            return;
        }
        let next = {
            let mut pending = sync::lock(&self.pending);
            pending.marked.extend(clients);
            let now = Instant::now();
            if pending.scheduled {
                Next::Nothing
            } else {
                match pending.last {
                    Some(last) if now.duration_since(last) < self.tick => {
                        pending.scheduled = true;
                        Next::RelayAt(last + self.tick)
                    }
                    _ => {
                        // Counted from now, so a change right behind this one waits for
                        // the end of the tick instead of making a second relay at once.
                        pending.last = Some(now);
                        Next::RelayNow
                    }
                }
            }
        };
        match next {
            Next::Nothing => {}
            Next::RelayNow => self.relay(),
            Next::RelayAt(at) => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(Arc::clone(self).relay_at(at));
                }
                // No runtime to time it (a caller outside the server): relay now.
                Err(_) => {
                    sync::lock(&self.pending).scheduled = false;
                    self.relay();
                }
            },
        }
    }

    /// The timer: relays at `at`, and again a tick later for as long as changes keep
    /// arriving meanwhile, so a session with steady cursor traffic keeps one task.
    async fn relay_at(self: Arc<Self>, mut at: Instant) {
        loop {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            {
                let mut pending = sync::lock(&self.pending);
                if pending.marked.is_empty() {
                    pending.scheduled = false;
                    return;
                }
                let now = Instant::now();
                pending.last = Some(now);
                at = now + self.tick;
            }
            self.relay();
        }
    }

    /// Sends the marked clients' current states (a removal as `null` at the client's own
    /// clock) to every connection of the session, the senders included, as one message.
    fn relay(&self) {
        let _one_at_a_time = sync::lock(&self.relaying);
        let marked = std::mem::take(&mut sync::lock(&self.pending).marked);
        if marked.is_empty() {
            return;
        }
        let (update, known) = {
            let states = self.states();
            // Every marked client was applied, so the awareness knows it (it keeps a
            // removed client's clock); the filter only keeps `update_with_clients` total.
            let known: Vec<ClientID> = marked
                .into_iter()
                .filter(|id| states.meta(*id).is_some())
                .collect();
            (states.update_with_clients(known.clone()), known)
        };
        self.publish(self.local_update(known));
        match update {
            Ok(update) if !update.clients.is_empty() => {
                let frame = Message::Binary(wire::awareness(update));
                sync::lock(&self.peers).broadcast(&frame, None);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(session = %self.session, error = %e, "awareness relay skipped");
            }
        }
    }
}

impl Board {
    /// Applies awareness states another node's clients sent (cluster mode) and relays
    /// what changed to this node's connections within a tick. Those states were checked
    /// against SPEC 7.1's bounds by the node their client is connected to.
    pub fn apply_remote_awareness(&self, node: &str, update: &[u8]) {
        // Read from Redis: checked by the guard like a client's (structure, count, sizes,
        // depth) before yrs decodes it, whatever the node that wrote it checked.
        let limits = self.options.limits;
        let decoded = guard::decode_awareness(
            update,
            crate::protocol::wire::MAX_AWARENESS_ENTRIES,
            limits.max_awareness_state_bytes,
            limits.max_nesting,
        );
        let update = match decoded {
            Ok(update) => update,
            Err(e) => {
                self.metrics.guard_refusals.awareness.inc();
                tracing::warn!(session = %self.session, %node, error = %e, "awareness from another node refused");
                return;
            }
        };
        let summary = self.awareness().apply_update_summary(update);
        if let Ok(Some(summary)) = summary {
            // Only what applied: a stale entry (an older clock, e.g. an answer to a query
            // that crossed the client's move to this node) says nothing of who speaks for
            // the client now. Marked before the relay, which publishes only unmarked ones.
            let changes = summary.all_changes();
            {
                let node: Arc<str> = Arc::from(node);
                let mut remote = sync::lock(&self.awareness.remote);
                for id in &changes {
                    remote.insert(*id, node.clone());
                }
            }
            self.awareness.changed(changes);
        }
    }

    /// Publishes the states of every client connected to this node (the answer to another
    /// node's [`Event::AwarenessQuery`]).
    pub fn publish_local_awareness(&self) {
        let all: Vec<ClientID> = self.awareness().iter().map(|(id, _)| id).collect();
        self.awareness.publish(self.awareness.local_update(all));
    }

    /// The nodes whose clients' awareness states this node holds. Marks of clients whose
    /// state is gone (removed, not pending a relay) are forgotten here, so the map does not
    /// grow with every client the session ever saw.
    pub fn awareness_nodes(&self) -> HashSet<Arc<str>> {
        let pending = sync::lock(&self.awareness.pending).marked.clone();
        let live: HashSet<ClientID> = self
            .awareness()
            .iter()
            .filter(|(_, s)| s.data.is_some())
            .map(|(id, _)| id)
            .collect();
        let mut remote = sync::lock(&self.awareness.remote);
        remote.retain(|id, _| live.contains(id) || pending.contains(id));
        remote.values().cloned().collect()
    }

    /// Removes the states of the clients of a node that died (cluster mode), as their
    /// connections' close would have.
    pub fn drop_node_awareness(&self, node: &str) {
        let gone: HashSet<ClientID> = sync::lock(&self.awareness.remote)
            .iter()
            .filter(|(_, n)| &***n == node)
            .map(|(id, _)| *id)
            .collect();
        if !gone.is_empty() {
            self.remove_awareness_clients(&gone);
        }
        // Forgotten with it: the sweep asks only about nodes some state still names.
        sync::lock(&self.awareness.remote).retain(|_, n| &**n != node);
    }

    pub(super) fn awareness(&self) -> MutexGuard<'_, Awareness> {
        self.awareness.states()
    }

    /// An awareness message with every known state, or `None` when there are none.
    pub fn awareness_states(&self) -> Option<Bytes> {
        let update = self.awareness().update().ok()?;
        (!update.clients.is_empty()).then(|| wire::awareness(update))
    }

    /// Applies an awareness update from a connection; what it changed is relayed to every
    /// connection, the sender included, within a tick (coalesced with the
    /// session's other changes of that tick: see the module docs). Updates `announced`
    /// with the client ids the connection now speaks for.
    ///
    /// An update past the bounds of SPEC.md 7.1 (client ids per connection and per session,
    /// the size and depth of one state) is dropped whole and counted, so it is either all
    /// applied or not at all. Returns whether it was applied.
    pub fn apply_awareness(
        &self,
        update: AwarenessUpdate,
        announced: &mut HashSet<ClientID>,
    ) -> bool {
        let limits = self.options.limits;
        let summary = {
            let mut awareness = self.awareness();
            if let Err(why) = self.awareness_fits(&awareness, &update, announced) {
                drop(awareness);
                self.metrics.guard_refusals.awareness.inc();
                tracing::debug!(session = %self.session, why, limit_per_connection = limits.max_awareness_clients_per_connection, "awareness update refused");
                return false;
            }
            match awareness.apply_update_summary(update) {
                Ok(Some(summary)) => summary,
                Ok(None) => return true,
                Err(e) => {
                    tracing::debug!(session = %self.session, error = %e, "awareness update ignored");
                    return false;
                }
            }
        };
        // Only the entries that were applied make the connection speak for a client: an
        // entry at a clock the session already holds is ignored by the awareness, and
        // counting its id as announced would let this connection's close remove another
        // connection's live client (tests/it/hostile_doc/awareness.rs,
        // a_connection_cannot_remove_another_connections_awareness_client).
        for id in summary.added.iter().chain(&summary.updated) {
            announced.insert(*id);
        }
        for id in &summary.removed {
            announced.remove(id);
        }
        if !summary.added.is_empty() || !summary.updated.is_empty() {
            // A client that moved here from another node (it keeps its clientID) is this
            // node's to publish from now on.
            let mut remote = sync::lock(&self.awareness.remote);
            for id in summary.added.iter().chain(&summary.updated) {
                remote.remove(id);
            }
        }
        // `updated` includes a renewal (same state, next clock): y-protocols clients drop a
        // peer whose clock has not moved for 30 s, so renewals must be relayed too.
        self.awareness.changed(summary.all_changes());
        true
    }

    /// Removes the awareness clients a closing connection announced, at each client's own
    /// last clock (as y-protocols' `removeAwarenessStates` does): a bumped clock would hide
    /// the same client, when it reconnects with its old clock, until its state's clock
    /// passed the bumped one. The removal is relayed like any change (within a tick, after
    /// any earlier state of the same client).
    pub(super) fn remove_awareness_clients(&self, clients: &HashSet<ClientID>) {
        let removed = {
            let mut awareness = self.awareness();
            let entries: HashMap<ClientID, AwarenessUpdateEntry> = clients
                .iter()
                .filter_map(|id| {
                    let (clock, _) = awareness.meta(*id)?;
                    let entry = AwarenessUpdateEntry {
                        clock,
                        json: Arc::from("null"),
                    };
                    Some((*id, entry))
                })
                .collect();
            if entries.is_empty() {
                return;
            }
            // Same clock, null state: y-protocols and yrs both remove the state.
            match awareness.apply_update_summary(AwarenessUpdate { clients: entries }) {
                Ok(summary) => summary.map(|s| s.removed).unwrap_or_default(),
                Err(e) => {
                    tracing::debug!(session = %self.session, error = %e, "awareness removal not applied");
                    return;
                }
            }
        };
        self.awareness.changed(removed);
    }

    /// Checks an awareness update against SPEC.md 7.1's bounds.
    pub(super) fn awareness_fits(
        &self,
        awareness: &Awareness,
        update: &AwarenessUpdate,
        announced: &HashSet<ClientID>,
    ) -> Result<(), &'static str> {
        let limits = self.options.limits;
        for entry in update.clients.values() {
            if entry.json.len() > limits.max_awareness_state_bytes {
                return Err("a state over its size limit");
            }
            if guard::check_json_depth(entry.json.as_bytes(), limits.max_nesting).is_err() {
                return Err("a state nested too deep");
            }
        }
        // An entry the awareness would ignore (a clock it already holds) announces nothing:
        // y-websocket clients send back every state they apply, the greeting included, so a
        // joiner's echo names every client of the session; it is not a refusal
        // (tests/it/hostile_doc/awareness.rs,
        // a_joiner_sending_back_the_states_it_was_greeted_with_is_not_refused).
        let new_ids = update
            .clients
            .iter()
            .filter(|(id, entry)| {
                !announced.contains(id)
                    && &*entry.json != "null"
                    && awareness
                        .meta(**id)
                        .is_none_or(|(clock, _)| entry.clock > clock)
            })
            .count();
        if new_ids == 0 {
            return Ok(());
        }
        if announced.len() + new_ids > limits.max_awareness_clients_per_connection {
            return Err("more client ids than one connection may announce");
        }
        let fresh = update
            .clients
            .keys()
            .filter(|id| awareness.meta(**id).is_none())
            .count();
        if fresh > 0 && awareness.iter().count() + fresh > limits.max_awareness_clients_per_session
        {
            return Err("more client ids than one session may hold");
        }
        Ok(())
    }
}
