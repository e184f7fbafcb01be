//! The connections of one live session and the one fan-out loop every broadcast goes
//! through ([`Peers::broadcast`]): the whiteboard's updates, awareness and restores, and
//! the tutor room's chat, presence and ephemeral messages.
//!
//! A broadcast clones the `Message` per connection, which clones only the handle of its
//! `Bytes` (or `Utf8Bytes`): one encoded buffer is shared by every queue, never copied.
//! Delivery never waits; a connection whose queue would pass its byte limit is marked
//! overflowed where it is delivered to ([`Peer::deliver`]), and its writer closes it with
//! 1013 (`ws::close::TRY_AGAIN_LATER`). Must not encode messages or touch documents.

use std::collections::HashMap;
use std::ops::Deref;

use axum::extract::ws::Message;

use crate::ws::outbox::Outbox;

/// Identifies one connection on this server.
pub type ConnId = u64;

/// A connection as a session's fan-out sees it.
pub trait Peer {
    /// Queues `msg` for this connection without waiting; past the queue's limit the
    /// connection is marked overflowed (and then closed with 1013), nothing is dropped
    /// silently.
    fn deliver(&mut self, msg: &Message);

    /// Queues several messages in order, as [`Peer::deliver`] would one by one.
    fn deliver_all<'a>(&mut self, msgs: impl Iterator<Item = &'a Message>) {
        for msg in msgs {
            self.deliver(msg);
        }
    }
}

impl Peer for Outbox {
    fn deliver(&mut self, msg: &Message) {
        // `send` marks the queue overflowed itself when `msg` does not fit.
        self.send(msg.clone());
    }

    fn deliver_all<'a>(&mut self, msgs: impl Iterator<Item = &'a Message>) {
        // One lock and one wake-up of the writer for the lot.
        self.send_all(msgs);
    }
}

/// The connections of a session, by id. Reads go through `Deref` to the map; changes go
/// through [`Peers::insert`], [`Peers::remove`] and [`Peers::get_mut`]; fan-out through
/// [`Peers::broadcast`] only.
pub struct Peers<P> {
    map: HashMap<ConnId, P>,
}

impl<P> Default for Peers<P> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
        }
    }
}

impl<P> Deref for Peers<P> {
    type Target = HashMap<ConnId, P>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<P: Peer> Peers<P> {
    pub fn insert(&mut self, id: ConnId, peer: P) -> Option<P> {
        self.map.insert(id, peer)
    }

    pub fn remove(&mut self, id: &ConnId) -> Option<P> {
        self.map.remove(id)
    }

    pub fn get_mut(&mut self, id: &ConnId) -> Option<&mut P> {
        self.map.get_mut(id)
    }

    /// Delivers `msg` to every connection but `except` (the sender, when it is not to
    /// hear its own message back).
    pub fn broadcast(&mut self, msg: &Message, except: Option<ConnId>) {
        for (id, peer) in self.map.iter_mut() {
            if Some(*id) != except {
                peer.deliver(msg);
            }
        }
    }

    /// Delivers a batch of messages, each to every connection but its own `except`, in
    /// the batch's order: each connection gets its share in one delivery.
    pub fn broadcast_all(&mut self, batch: &[(Message, Option<ConnId>)]) {
        for (id, peer) in self.map.iter_mut() {
            let theirs = batch
                .iter()
                .filter(|(_, except)| *except != Some(*id))
                .map(|(msg, _)| msg);
            peer.deliver_all(theirs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::outbox::outbox;

    #[test]
    fn broadcast_reaches_everyone_but_the_excepted_and_overflows_a_full_queue() {
        let mut peers = Peers::default();
        let (a, mut a_rx) = outbox(1 << 20);
        let (b, mut b_rx) = outbox(1 << 20);
        let (small, _small_rx) = outbox(4);
        peers.insert(1, a);
        peers.insert(2, b);
        peers.insert(3, small.clone());
        let msg = Message::Binary(bytes::Bytes::from_static(b"hello"));
        peers.broadcast(&msg, Some(2));
        assert!(matches!(a_rx.try_recv(), Some(Message::Binary(m)) if &m[..] == b"hello"));
        assert!(b_rx.try_recv().is_none());
        // An empty queue takes one message of any size; the second passes the four-byte
        // limit and marks the queue overflowed, so its writer closes with 1013.
        assert!(small.is_open());
        peers.broadcast(&msg, Some(2));
        assert!(!small.is_open());
        assert!(matches!(a_rx.try_recv(), Some(Message::Binary(_))));
    }

    #[test]
    fn a_batch_reaches_each_connection_in_order_without_its_own_messages() {
        let mut peers = Peers::default();
        let (a, mut a_rx) = outbox(1 << 20);
        let (b, mut b_rx) = outbox(1 << 20);
        peers.insert(1, a);
        peers.insert(2, b);
        let msg = |s: &'static str| Message::Binary(bytes::Bytes::from_static(s.as_bytes()));
        peers.broadcast_all(&[
            (msg("from a"), Some(1)),
            (msg("from b"), Some(2)),
            (msg("from the API"), None),
        ]);
        let drain = |rx: &mut crate::ws::outbox::OutboxReceiver| {
            std::iter::from_fn(|| rx.try_recv())
                .map(|m| match m {
                    Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
                    other => format!("{other:?}"),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(drain(&mut a_rx), ["from b", "from the API"]);
        assert_eq!(drain(&mut b_rx), ["from a", "from the API"]);
    }
}
