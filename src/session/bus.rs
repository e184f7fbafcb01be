//! What a session tells the other nodes of a cluster, and hears from them (SPEC 9).
//!
//! In cluster mode several nodes hold replicas of the same session. Durable changes
//! (whiteboard updates, chat messages) reach the other nodes through the shared store's
//! streams; everything else a session's clients must see wherever they are connected
//! (awareness, presence, typing and tutor events, chat edits, moderation) is an [`Event`]
//! on the [`Bus`]. A session publishes what its own connections did, and [`Session::hear`]
//! applies what other nodes published, relaying it to this node's connections only.
//!
//! The session side knows only this trait; `crate::cluster` implements it over Redis (and
//! is the one that feeds the streams back in). Without a cluster there is no bus and none of
//! this runs. Must not touch sockets or the store.
//!
//! [`Session::hear`]: super::Session::hear

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Session;
use crate::protocol::tutor::UserInfo;
use crate::store::ModerationRecord;

/// One thing a node tells the others about a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// Awareness states of this node's clients (a y-protocols awareness update, the payload
    /// of an awareness message): the latest state per client, removals as `null`.
    #[serde(skip)]
    Awareness(Bytes),
    /// A node started holding the session: every node answers with its clients' states.
    AwarenessQuery,
    /// How many tutor connections `user` has on the publishing node now (0: none).
    Presence { user: UserInfo, connections: usize },
    /// A tutor-endpoint message for every connection of the session (typing, events, chat
    /// edits and deletions), as sent to clients.
    Relay { json: String },
    /// A chat message was edited or deleted at `at_ms` (for long polls waiting on changes);
    /// its frame comes as a [`Event::Relay`] too.
    Amended { at_ms: u64 },
    /// A user's moderation changed (mute, unmute, removal): the record as stored, and the
    /// announcement sent to clients. A removal closes the user's connections on every node.
    Moderation {
        record: ModerationRecord,
        json: String,
        removed: bool,
    },
}

/// The cluster as a session sees it.
pub trait Bus: Send + Sync + 'static {
    /// Tells the other nodes. Never blocks on the network: a bus queues what it sends.
    fn publish(&self, session: &str, event: Event);

    /// The session is now loaded on this node: from now on the bus feeds it what other
    /// nodes append and publish.
    fn hold(&self, session: &Arc<Session>);

    /// The session was unloaded from this node (or lost a race to be loaded): the bus
    /// stops feeding it, and only it (a replica loaded again since is fed on).
    fn release(&self, session: &Arc<Session>);
}
