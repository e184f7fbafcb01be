//! A whiteboard's awareness (cursors, presence): the states, the bounds of SPEC.md 7.1 an
//! update must fit (client ids per connection and per session, size and depth of one
//! state), and the relay of applied updates. Must not touch the document.

use super::*;

impl Board {
    pub(super) fn awareness(&self) -> MutexGuard<'_, Awareness> {
        sync::lock(&self.awareness)
    }

    /// An awareness message with every known state, or `None` when there are none.
    pub fn awareness_states(&self) -> Option<Bytes> {
        let update = self.awareness().update().ok()?;
        (!update.clients.is_empty()).then(|| wire::awareness(update))
    }

    /// Applies an awareness update from a connection and relays the message, unchanged, to
    /// every connection including the sender. Updates `announced` with the client ids the
    /// connection now speaks for.
    ///
    /// An update past the bounds of SPEC.md 7.1 (client ids per connection and per session,
    /// the size and depth of one state) is dropped whole and counted: the message is relayed
    /// as the client sent it, so it is either all applied or not at all. Returns whether it
    /// was applied.
    pub fn apply_awareness(
        &self,
        update: AwarenessUpdate,
        message: Bytes,
        announced: &mut HashSet<ClientID>,
    ) -> bool {
        let limits = self.options.limits;
        let mut peers = self.peers();
        let mut awareness = self.awareness();
        if let Err(why) = self.awareness_fits(&awareness, &update, announced) {
            drop(awareness);
            drop(peers);
            self.metrics.guard_refusals.awareness.inc();
            tracing::debug!(session = %self.session, why, limit_per_connection = limits.max_awareness_clients_per_connection, "awareness update refused");
            return false;
        }
        let summary = match awareness.apply_update_summary(update) {
            Ok(Some(summary)) => summary,
            Ok(None) => return true,
            Err(e) => {
                tracing::debug!(session = %self.session, error = %e, "awareness update ignored");
                return false;
            }
        };
        drop(awareness);
        // Only the entries that were applied make the connection speak for a client: an
        // entry at a clock the session already holds is ignored by the awareness, and
        // counting its id as announced would let this connection's close remove another
        // connection's live client (tests/hostile_doc.rs,
        // a_connection_cannot_remove_another_connections_awareness_client).
        for id in summary.added.iter().chain(&summary.updated) {
            announced.insert(*id);
        }
        for id in &summary.removed {
            announced.remove(id);
        }
        peers.broadcast(&Message::Binary(message), None);
        true
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
        // (tests/hostile_doc.rs, a_joiner_sending_back_the_states_it_was_greeted_with_is_not_refused).
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
