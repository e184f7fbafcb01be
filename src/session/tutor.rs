//! A session's tutor room: who is present, and the chat with its gapless `seq`.
//!
//! The room owns the participant list and the next `seq`; it stores each chat message
//! through the [`Store`] before broadcasting it. Every change to the chat (posts, edits,
//! deletions, mutes, removals) runs on the room's lane (`super::lane`), off the async
//! workers, one at a time in the order queued, so every connection sees messages in `seq`
//! order; the room's lock is never held across a store write. It encodes each broadcast
//! once and pushes the same bytes into every outbox; it never touches a socket.
//!
//! History (on connect, on an `after_seq` resume, on a `history` request) is sent in pages:
//! at most [`Paging::messages`] messages and [`Paging::bytes`] bytes of JSON per `history`
//! frame (a single larger message goes alone), every page but the last marked
//! `"more":true`. Pages are read from the store on the blocking pool, one page at a time,
//! and each is queued only once the previous one is written, so however long the history,
//! neither the memory held nor the connection's send queue grows with it.
//!
//! A joining connection is a member at once (it counts in `participants`), but until its
//! history has been sent, what the room broadcasts to it is held back in order and queued
//! after the last page: nothing falls between the history and the live stream, and nothing
//! comes twice. What is held counts against the connection's send-queue limit (1013 past it).
//! Every broadcast goes through [`Peers::broadcast`]; a member is a [`Peer`] that holds back.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::{Message, Utf8Bytes};

use super::bus::{Bus, Event};
use super::lane::{Lane, LaneError};
use super::peers::{ConnId, Peer, Peers};
use crate::metrics::Metrics;
use crate::protocol::tutor::{ChatMessage, Participant, PresenceEvent, ServerMessage, UserInfo};
use crate::store::{ModerationRecord, Store, StoreError};
use crate::sync;
use crate::ws::outbox::Outbox;

mod moderation;
pub use moderation::{is_moderator, now_ms, parse_time, AmendError, ModerateError, RemovedUsers};

/// Why a chat text was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChatTextError {
    #[error("text must not be empty")]
    Empty,
    #[error("text is {chars} characters; the limit is {max}")]
    TooLong { chars: usize, max: usize },
}

/// Checks a chat text's length in Unicode scalar values (SPEC.md section 4).
pub fn check_text(text: &str, max_chars: usize) -> Result<(), ChatTextError> {
    match text.chars().count() {
        0 => Err(ChatTextError::Empty),
        chars if chars > max_chars => Err(ChatTextError::TooLong {
            chars,
            max: max_chars,
        }),
        _ => Ok(()),
    }
}

/// How history is cut into frames.
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    /// Most messages in one `history` frame.
    pub messages: usize,
    /// Most bytes of JSON in one `history` frame (a single larger message goes alone).
    pub bytes: usize,
}

/// Which messages a history holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryRange {
    /// Every message with `after < seq <= through`.
    After { after: u64, through: u64 },
    /// The newest `limit` messages with `seq < before`.
    Before { before: u64, limit: usize },
}

/// What a joining connection's history will be, decided under the room's lock at join.
#[derive(Debug, Clone, Copy)]
struct CatchUp {
    range: HistoryRange,
    /// `after_seq` of a resume: the edits to messages up to it follow the history.
    resume_after: Option<u64>,
}

/// Broadcasts held back for a member whose history is still being sent.
#[derive(Default)]
struct Held {
    messages: VecDeque<Message>,
    bytes: usize,
}

struct Member {
    user: UserInfo,
    outbox: Outbox,
    /// `Some` until the member's history has been sent.
    held: Option<Held>,
    /// Taken by [`Room::catch_up`].
    catch_up: Option<CatchUp>,
}

impl Peer for Member {
    /// Queues a broadcast, or holds it back while the member's history is being sent.
    fn deliver(&mut self, msg: &Message) {
        let Some(held) = self.held.as_mut() else {
            self.outbox.send(msg.clone());
            return;
        };
        let len = match msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            _ => 0,
        };
        if held.bytes + len > self.outbox.limit() && !held.messages.is_empty() {
            // The connection could not keep up even with its history: it reconnects with
            // `after_seq` and gets the rest.
            held.messages.clear();
            held.bytes = 0;
            self.outbox.overflow();
            return;
        }
        held.bytes += len;
        held.messages.push_back(msg.clone());
    }
}

struct Inner {
    last_seq: u64,
    members: Peers<Member>,
    /// Cluster mode: the users connected to other nodes, by node, with their connection
    /// counts there (as those nodes published them).
    remote: BTreeMap<Arc<str>, BTreeMap<String, (UserInfo, usize)>>,
    /// Mutes and bans by user (SPEC 4.1), as stored.
    moderation: HashMap<String, ModerationRecord>,
    /// The newest `ts` of a message (ms): edits are stamped no earlier, so a resume's
    /// "changes since message N was posted" holds even if the clock steps back.
    last_ts_ms: u64,
    /// Cluster mode: `chat_edited`/`chat_deleted` frames of messages the stream reader has
    /// not delivered here yet, by seq; sent right after their message, never before it
    /// (a deletion relayed first would leave the deleted text on screen).
    early_amends: BTreeMap<u64, Vec<String>>,
}

/// Amendments held back for undelivered messages, at most; past it they are sent at once.
const EARLY_AMENDS_MAX: usize = 1024;

/// Why a history could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("history read interrupted: {0}")]
    Task(String),
}

/// Reads a session's chat history from the store, off the async workers. Owns what it
/// needs, so it can live in a connection's pending work.
#[derive(Clone)]
pub struct HistoryReader {
    session: Arc<str>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

/// A session's tutor room: its state ([`Room`], through `Deref`) and the lane its chat
/// changes run on (posts, edits, deletions, mutes, removals: see [`super::lane`]). A change
/// is made on a lane thread, never on an async worker: the store write (and, in sync
/// durability, the flush) happens there, with the room's lock not held, and the lock is
/// taken only to read what the change needs and, once it is stored, to relay it. The
/// lane runs one change at a time in the order they were queued, so seqs stay gapless
/// and connections see changes in the order they were stored.
pub struct TutorRoom {
    room: Arc<Room>,
    lane: Lane,
}

impl std::ops::Deref for TutorRoom {
    type Target = Room;
    fn deref(&self) -> &Room {
        &self.room
    }
}

/// Why a chat message was not posted.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("you are muted in this session")]
    Muted,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A lane that could not run a job: the store's error callers already handle.
fn lane_failed(e: LaneError) -> StoreError {
    StoreError::Unavailable(format!("the tutor room's lane: {e}"))
}

impl TutorRoom {
    pub fn load(
        session: Arc<str>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        history_limit: usize,
        flush_before_relay: bool,
        remove_ban: std::time::Duration,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            room: Arc::new(Room::load(
                session,
                store,
                metrics,
                history_limit,
                flush_before_relay,
                remove_ban,
            )?),
            lane: Lane::default(),
        })
    }

    /// Runs `job` on the room's lane (awaiting a place while its queue is full).
    fn on_lane<T: Send + 'static, E: From<StoreError> + Send + 'static>(
        &self,
        job: impl FnOnce(&Room) -> Result<T, E> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, E>> + Send + 'static {
        let room = self.room.clone();
        let queued = self.lane.run(move || job(&room));
        async move { queued.await.map_err(|e| E::from(lane_failed(e)))? }
    }

    /// Stores a chat message under the next `seq` and sends it to every connection, the
    /// sender's included (its acknowledgement); refused if `from`, acting with `role`, is
    /// muted by the time it is its turn.
    pub fn post_chat(
        &self,
        from: UserInfo,
        role: crate::auth::Role,
        text_body: String,
        client_id: Option<String>,
    ) -> impl std::future::Future<Output = Result<ChatMessage, PostError>> + Send + 'static {
        self.on_lane(move |room| room.store_chat(from, role, text_body, client_id))
    }
}

/// The tutor room's state. Its changes run on the room's lane (see [`TutorRoom`]).
pub struct Room {
    session: Arc<str>,
    inner: Arc<Mutex<Inner>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    history_limit: usize,
    flush_before_relay: bool,
    /// The last `seq`, for long polls waiting on new messages.
    seq_changes: tokio::sync::watch::Sender<u64>,
    /// Users removed and banned (SPEC 4.1), followed by every connection of the session.
    removed: tokio::sync::watch::Sender<RemovedUsers>,
    /// How long a removal bans (`tutor.remove_ban_s`).
    remove_ban: std::time::Duration,
    /// The stamp (ms) of the latest edit or deletion, for long polls waiting on `changes`
    /// (SPEC 4.1).
    amends: tokio::sync::watch::Sender<u64>,
    /// Cluster mode: the other nodes. Then the store assigns seqs, and chat messages reach
    /// this node's connections only in seq order through [`Room::deliver_chat`], its own
    /// included.
    bus: std::sync::OnceLock<Arc<dyn Bus>>,
}

fn text(json: String) -> Message {
    Message::Text(Utf8Bytes::from(json))
}

impl Room {
    fn load(
        session: Arc<str>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        history_limit: usize,
        flush_before_relay: bool,
        remove_ban: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let last_seq = store.last_chat_seq(&session)?;
        let moderation = Self::load_moderation(store.as_ref(), &session)?;
        let last_ts_ms = store
            .chat_get(&session, last_seq)?
            .and_then(|m| parse_time(&m.ts).ok())
            .unwrap_or(0);
        let removed = tokio::sync::watch::Sender::new(Self::bans(&moderation));
        Ok(Self {
            session,
            inner: Arc::new(Mutex::new(Inner {
                last_seq,
                members: Peers::default(),
                remote: BTreeMap::new(),
                moderation,
                last_ts_ms,
                early_amends: BTreeMap::new(),
            })),
            store,
            metrics,
            history_limit,
            flush_before_relay,
            seq_changes: tokio::sync::watch::Sender::new(last_seq),
            removed,
            remove_ban,
            amends: tokio::sync::watch::Sender::new(0),
            bus: Default::default(),
        })
    }

    /// Connects the room to the other nodes of a cluster (right after the load), with the
    /// users connected to them now (`(node, user, connections)`, from the shared store).
    pub fn attach_bus(&self, bus: Arc<dyn Bus>, present: Vec<(String, UserInfo, usize)>) {
        let mut inner = self.inner();
        for (node, user, connections) in present {
            if connections > 0 {
                inner
                    .remote
                    .entry(Arc::from(node))
                    .or_default()
                    .insert(user.id.clone(), (user, connections));
            }
        }
        let _ = self.bus.set(bus);
    }

    /// Sends an amendment frame of this node's own (see [`Room::send_amend`]).
    pub(super) fn relay_amend(&self, seq: u64, json: String) {
        let mut inner = self.inner();
        if self.bus.get().is_some() {
            Self::send_amend(&mut inner, seq, json);
        } else {
            inner.members.broadcast(&text(json), None);
        }
    }

    fn publish(&self, event: Event) {
        if let Some(bus) = self.bus.get() {
            bus.publish(&self.session, event);
        }
    }

    /// Whether `user` has a connection on another node.
    fn present_elsewhere(inner: &Inner, user: &str) -> bool {
        inner.remote.values().any(|users| users.contains_key(user))
    }

    fn local_connections(inner: &Inner, user: &str) -> usize {
        inner.members.values().filter(|m| m.user.id == user).count()
    }

    /// Tells the other nodes how many connections `user` has here now.
    fn publish_presence(&self, inner: &Inner, user: &UserInfo) {
        if self.bus.get().is_some() {
            self.publish(Event::Presence {
                user: user.clone(),
                connections: Self::local_connections(inner, &user.id),
            });
        }
    }

    fn announce(inner: &mut Inner, event: PresenceEvent, user: &UserInfo, except: Option<ConnId>) {
        let participants = Self::participants(inner);
        let msg = text(
            ServerMessage::Presence {
                event,
                user,
                participants: &participants,
            }
            .to_json(),
        );
        inner.members.broadcast(&msg, except);
    }

    /// Applies what another node published about this session (cluster mode), relaying to
    /// this node's connections what they must see.
    pub fn hear(&self, node: &str, event: Event) {
        // Parsed before the room's lock is taken, not under it.
        let amends = match &event {
            Event::Relay { json } => amended_seq(json),
            _ => None,
        };
        let mut inner = self.inner();
        match event {
            Event::Presence { user, connections } => {
                let was_here = Self::local_connections(&inner, &user.id) > 0
                    || Self::present_elsewhere(&inner, &user.id);
                let users = inner.remote.entry(Arc::from(node)).or_default();
                if connections == 0 {
                    users.remove(&user.id);
                } else {
                    users.insert(user.id.clone(), (user.clone(), connections));
                }
                let is_here = Self::local_connections(&inner, &user.id) > 0
                    || Self::present_elsewhere(&inner, &user.id);
                match (was_here, is_here) {
                    (false, true) => Self::announce(&mut inner, PresenceEvent::Joined, &user, None),
                    (true, false) => Self::announce(&mut inner, PresenceEvent::Left, &user, None),
                    _ => {}
                }
            }
            Event::Relay { json } => match amends {
                Some(seq) => Self::send_amend(&mut inner, seq, json),
                None => inner.members.broadcast(&text(json), None),
            },
            Event::Amended { at_ms } => {
                self.amends
                    .send_modify(|latest| *latest = (*latest).max(at_ms));
            }
            Event::Moderation {
                record,
                json,
                removed,
            } => {
                if record.is_spent(moderation::now_ms()) {
                    inner.moderation.remove(&record.user);
                } else {
                    inner.moderation.insert(record.user.clone(), record);
                }
                inner.members.broadcast(&text(json), None);
                if removed {
                    self.removed.send_replace(Self::bans(&inner.moderation));
                }
            }
            Event::Awareness(_) | Event::AwarenessQuery => {}
        }
    }

    /// A node died (cluster mode): its users' connections there are gone.
    pub fn node_gone(&self, node: &str) {
        let mut inner = self.inner();
        let Some(users) = inner.remote.remove(node) else {
            return;
        };
        for (id, (user, _)) in users {
            if Self::local_connections(&inner, &id) == 0 && !Self::present_elsewhere(&inner, &id) {
                Self::announce(&mut inner, PresenceEvent::Left, &user, None);
            }
        }
    }

    /// The nodes this room has heard of users on.
    pub fn remote_nodes(&self) -> Vec<Arc<str>> {
        self.inner().remote.keys().cloned().collect()
    }

    /// A chat message as the shared store holds it (cluster mode), delivered in seq order
    /// by the stream reader, whichever node it was posted on.
    pub fn deliver_chat(&self, message: &ChatMessage) {
        let mut inner = self.inner();
        if message.seq <= inner.last_seq {
            return;
        }
        inner.last_seq = message.seq;
        inner.last_ts_ms = inner.last_ts_ms.max(parse_time(&message.ts).unwrap_or(0));
        self.seq_changes.send_replace(message.seq);
        self.metrics.chat_messages.inc();
        let msg = text(ServerMessage::Chat(message).to_json());
        inner.members.broadcast(&msg, None);
        let due: Vec<u64> = inner
            .early_amends
            .range(..=message.seq)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in due {
            for json in inner.early_amends.remove(&seq).unwrap_or_default() {
                inner.members.broadcast(&text(json), None);
            }
        }
    }

    /// Sends a `chat_edited`/`chat_deleted` frame for message `seq`, or holds it until the
    /// message itself is delivered here (cluster mode: messages come from the stream
    /// reader, an amendment can come first).
    fn send_amend(inner: &mut Inner, seq: u64, json: String) {
        let early = seq > inner.last_seq
            && inner.early_amends.values().map(Vec::len).sum::<usize>() < EARLY_AMENDS_MAX;
        if early {
            inner.early_amends.entry(seq).or_default().push(json);
        } else {
            inner.members.broadcast(&text(json), None);
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        sync::lock(&self.inner)
    }

    fn participants(inner: &Inner) -> Vec<Participant> {
        let now = moderation::now_ms();
        let mut by_user: BTreeMap<&str, Participant> = BTreeMap::new();
        for m in inner.members.values() {
            by_user
                .entry(&m.user.id)
                .or_insert_with(|| Participant {
                    user: m.user.clone(),
                    connections: 0,
                    muted: inner.moderation.get(&m.user.id).is_some_and(|r| {
                        r.muted_for(now, m.user.role == crate::auth::Role::Admin.as_str())
                    }),
                })
                .connections += 1;
        }
        for (user, connections) in inner.remote.values().flat_map(|users| users.values()) {
            by_user
                .entry(&user.id)
                .or_insert_with(|| Participant {
                    user: user.clone(),
                    connections: 0,
                    muted: inner.moderation.get(&user.id).is_some_and(|r| {
                        r.muted_for(now, user.role == crate::auth::Role::Admin.as_str())
                    }),
                })
                .connections += connections;
        }
        by_user.into_values().collect()
    }

    /// Adds a connection and queues its `welcome`; others hear `presence joined` when this
    /// is the user's first connection. The history (every message after `after_seq` when
    /// given, else the last `recent`) is decided here, under the room's lock, and sent by
    /// [`Room::catch_up`]; until then what the room broadcasts to this connection is
    /// held back, so no chat message falls between the history and the live stream.
    /// Reads nothing from the store (the caller is on an async worker).
    pub fn join(
        &self,
        conn: ConnId,
        user: UserInfo,
        outbox: Outbox,
        after_seq: Option<u64>,
        recent: usize,
    ) -> Result<(), StoreError> {
        let mut inner = self.inner();
        let through = inner.last_seq;
        let range = match after_seq {
            Some(after) => HistoryRange::After { after, through },
            None => HistoryRange::Before {
                before: through.saturating_add(1),
                limit: recent,
            },
        };
        let first = !inner.members.values().any(|m| m.user.id == user.id)
            && !Self::present_elsewhere(&inner, &user.id);
        inner.members.insert(
            conn,
            Member {
                user: user.clone(),
                outbox: outbox.clone(),
                held: Some(Held::default()),
                catch_up: Some(CatchUp {
                    range,
                    resume_after: after_seq.filter(|&a| a > 0),
                }),
            },
        );
        let participants = Self::participants(&inner);
        outbox.send(text(
            ServerMessage::Welcome {
                session: &self.session,
                user: &user,
                participants: &participants,
                last_seq: inner.last_seq,
            }
            .to_json(),
        ));
        if first {
            Self::announce(&mut inner, PresenceEvent::Joined, &user, Some(conn));
        }
        self.publish_presence(&inner, &user);
        Ok(())
    }

    /// Sends a joined connection its history in pages, then what was held back for it
    /// meanwhile, and from then on the live stream. `None` when there is nothing to do
    /// (the connection is gone, or caught up already).
    pub fn catch_up(
        &self,
        conn: ConnId,
        paging: Paging,
    ) -> Option<impl std::future::Future<Output = Result<(), HistoryError>> + Send + 'static> {
        let (plan, outbox) = {
            let mut inner = self.inner();
            let member = inner.members.get_mut(&conn)?;
            (member.catch_up.take()?, member.outbox.clone())
        };
        let reader = self.reader();
        let inner = self.inner.clone();
        Some(async move {
            let mut sent = reader.send(plan.range, &outbox, paging).await;
            if let (Ok(()), Some(after)) = (&sent, plan.resume_after) {
                sent = reader.send_changes(after, &outbox).await;
            }
            // Whatever happened, release what was held back (in order, under the lock so no
            // broadcast overtakes it); on an error the caller closes the connection.
            let mut inner = sync::lock(&inner);
            if let Some(member) = inner.members.get_mut(&conn) {
                if let Some(held) = member.held.take() {
                    for msg in held.messages {
                        member.outbox.send(msg);
                    }
                }
            }
            sent
        })
    }

    /// A reader of this room's history, for paged replies.
    pub fn reader(&self) -> HistoryReader {
        HistoryReader {
            session: self.session.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Removes a connection. Others hear `presence left` when it was the user's last one.
    pub fn leave(&self, conn: ConnId) {
        let mut inner = self.inner();
        let Some(gone) = inner.members.remove(&conn) else {
            return;
        };
        self.publish_presence(&inner, &gone.user);
        if inner.members.values().any(|m| m.user.id == gone.user.id)
            || Self::present_elsewhere(&inner, &gone.user.id)
        {
            return;
        }
        Self::announce(&mut inner, PresenceEvent::Left, &gone.user, None);
    }

    /// Stores a chat message under the next `seq` and relays it. Runs on the room's lane
    /// only, the one place `last_seq` changes: the lock is let go while the message is
    /// stored (and flushed), and whoever reads `last_seq` meanwhile (a join deciding its
    /// history) sees the previous one and gets this message by the relay.
    fn store_chat(
        &self,
        from: UserInfo,
        role: crate::auth::Role,
        text_body: String,
        client_id: Option<String>,
    ) -> Result<ChatMessage, PostError> {
        debug_assert!(super::lane::on_lane_thread(), "a chat post off the lane");
        let seq = {
            let inner = self.inner();
            let admin = role == crate::auth::Role::Admin;
            let now = moderation::now_ms();
            if inner
                .moderation
                .get(&from.id)
                .is_some_and(|r| r.muted_for(now, admin))
            {
                return Err(PostError::Muted);
            }
            inner.last_seq + 1
        };
        let mut message = ChatMessage {
            seq,
            client_id,
            from,
            text: text_body,
            ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            edited_at: None,
            deleted_at: None,
        };
        message.seq = self
            .store
            .append_chat(&self.session, &message, self.history_limit)?;
        if self.flush_before_relay {
            self.store.flush()?;
        }
        if self.bus.get().is_some() {
            // The stream reader delivers it, in seq order with the other nodes' messages.
            return Ok(message);
        }
        let mut inner = self.inner();
        inner.last_seq = message.seq;
        inner.last_ts_ms = inner.last_ts_ms.max(parse_time(&message.ts).unwrap_or(0));
        self.seq_changes.send_replace(message.seq);
        self.metrics.chat_messages.inc();
        let msg = text(ServerMessage::Chat(&message).to_json());
        inner.members.broadcast(&msg, None);
        Ok(message)
    }

    /// Sends an ephemeral message (typing, event) to every connection but the sender's.
    pub fn relay(&self, from: ConnId, message: &ServerMessage<'_>) {
        let json = message.to_json();
        if self.bus.get().is_some() {
            self.publish(Event::Relay { json: json.clone() });
        }
        let msg = text(json);
        let mut inner = self.inner();
        inner.members.broadcast(&msg, Some(from));
    }

    pub fn last_seq(&self) -> u64 {
        self.inner().last_seq
    }

    /// Follows the last `seq` (for long polls).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.seq_changes.subscribe()
    }

    /// Messages after `after`, oldest first.
    pub fn history_after(&self, after: u64, limit: usize) -> Result<Vec<ChatMessage>, StoreError> {
        self.store.chat_after(&self.session, after, limit)
    }

    /// The newest `limit` messages before `before` (all if `None`), oldest first.
    pub fn history_before(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        self.store
            .chat_before(&self.session, before.unwrap_or(u64::MAX), limit)
    }
}

/// Counts bytes without keeping them.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length of a message's JSON, as it appears in a `history` frame.
fn json_len(message: &ChatMessage) -> usize {
    let mut c = Counter(0);
    // Serialising a plain struct into a counter cannot fail.
    let _ = serde_json::to_writer(&mut c, message);
    c.0
}

/// `{"type":"history","messages":[` ... `],"more":true}` around the messages, and the
/// commas between them.
const PAGE_ENVELOPE: usize = 48;

/// Cuts `messages` into frames of at most `paging.messages` messages and `paging.bytes`
/// bytes (a single larger message goes alone).
fn cut_pages(messages: &[ChatMessage], paging: Paging) -> Vec<&[ChatMessage]> {
    let mut pages = Vec::new();
    let (mut start, mut bytes) = (0, PAGE_ENVELOPE);
    for (i, m) in messages.iter().enumerate() {
        let len = json_len(m) + 1;
        let count = i - start;
        if count > 0 && (count >= paging.messages.max(1) || bytes + len > paging.bytes) {
            pages.push(&messages[start..i]);
            start = i;
            bytes = PAGE_ENVELOPE;
        }
        bytes += len;
    }
    if start < messages.len() {
        pages.push(&messages[start..]);
    }
    pages
}

impl HistoryReader {
    /// Up to `limit` messages with `seq > after`, oldest first, read on the blocking pool.
    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<ChatMessage>, HistoryError> {
        let (store, session) = (self.store.clone(), self.session.clone());
        tokio::task::spawn_blocking(move || store.chat_after(&session, after, limit))
            .await
            .map_err(|e| HistoryError::Task(e.to_string()))?
            .map_err(HistoryError::from)
    }

    /// Sends `range` to `outbox` as `history` frames, oldest first; always at least one
    /// frame (an empty history is `"messages":[]`). Each frame is queued once the previous
    /// one is written. Stops early, without error, when the connection goes away.
    pub async fn send(
        &self,
        range: HistoryRange,
        outbox: &Outbox,
        paging: Paging,
    ) -> Result<(), HistoryError> {
        // Seqs are gapless, so the newest `limit` before `before` are those after
        // `before - 1 - limit`: both forms are read forwards, a page at a time.
        let (mut cursor, through) = match range {
            HistoryRange::After { after, through } => (after, through),
            HistoryRange::Before { before, limit } => {
                let through = before.saturating_sub(1);
                (through.saturating_sub(limit as u64), through)
            }
        };
        let per_read = paging.messages.max(1);
        let mut sent_any = false;
        loop {
            let mut page = if cursor < through {
                self.read_after(cursor, per_read).await?
            } else {
                Vec::new()
            };
            let full = page.len() >= per_read;
            page.retain(|m| m.seq <= through);
            let last = match page.last() {
                Some(m) => {
                    cursor = m.seq;
                    !full || cursor >= through
                }
                None => true,
            };
            if page.is_empty() && sent_any {
                // The previous frame said more would come: end the history plainly.
                self.send_page(outbox, &[], false).await;
                return Ok(());
            }
            let frames = cut_pages(&page, paging);
            let n = frames.len();
            if n == 0 {
                self.send_page(outbox, &[], false).await;
                return Ok(());
            }
            for (i, frame) in frames.into_iter().enumerate() {
                let more = !(last && i + 1 == n);
                if !self.send_page(outbox, frame, more).await {
                    return Ok(());
                }
                sent_any = true;
            }
            if last {
                return Ok(());
            }
        }
    }

    /// Queues one `history` frame once everything queued before is written; `false` when
    /// the connection no longer takes messages.
    async fn send_page(&self, outbox: &Outbox, messages: &[ChatMessage], more: bool) -> bool {
        outbox.written().await;
        let json = ServerMessage::History { messages, more }.to_json();
        self.metrics.history_pages.inc();
        outbox.send(text(json)) || outbox.is_open()
    }
}

/// The seq a relayed `chat_edited`/`chat_deleted` frame amends, if it is one.
fn amended_seq(json: &str) -> Option<u64> {
    /// Only the two fields looked at: the rest of the frame is skipped, not built.
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(rename = "type")]
        kind: String,
        seq: Option<u64>,
    }
    let head: Head = serde_json::from_str(json).ok()?;
    matches!(head.kind.as_str(), "chat_edited" | "chat_deleted")
        .then_some(head.seq)
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, text: &str) -> ChatMessage {
        ChatMessage {
            seq,
            client_id: None,
            from: UserInfo {
                id: "u".into(),
                name: "U".into(),
                role: "student".into(),
            },
            text: text.into(),
            ts: "2026-01-01T00:00:00.000Z".into(),
            ..Default::default()
        }
    }

    /// A bus that goes nowhere: cluster mode as a room sees it, without the cluster.
    struct Nowhere;

    impl Bus for Nowhere {
        fn publish(&self, _: &str, _: Event) {}
        fn hold(&self, _: &Arc<super::super::Session>) {}
        fn release(&self, _: &Arc<super::super::Session>) {}
    }

    fn types_of(rx: &mut crate::ws::outbox::OutboxReceiver) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv())
            .filter_map(|m| match m {
                Message::Text(t) => serde_json::from_str::<serde_json::Value>(&t).ok(),
                _ => None,
            })
            .filter_map(|v| v["type"].as_str().map(str::to_owned))
            .collect()
    }

    #[tokio::test]
    async fn in_cluster_mode_an_amendment_heard_before_its_message_waits_for_it() {
        let store: Arc<dyn Store> = Arc::new(crate::store::MemoryStore::default());
        let room = TutorRoom::load(
            "s".into(),
            store,
            Arc::new(Metrics::new()),
            100,
            false,
            std::time::Duration::from_secs(600),
        )
        .unwrap();
        room.attach_bus(Arc::new(Nowhere), Vec::new());
        let (outbox, mut rx) = crate::ws::outbox::outbox(1 << 20);
        room.join(1, msg(0, "").from, outbox, None, 10).unwrap();
        let paging = Paging {
            messages: 10,
            bytes: 1 << 20,
        };
        // The history is sent as the "socket" takes it: this test is the writer.
        let catch_up = tokio::spawn(room.catch_up(1, paging).unwrap());
        while !catch_up.is_finished() {
            let taken = std::iter::from_fn(|| rx.try_recv()).count();
            rx.mark_written(taken);
            tokio::task::yield_now().await;
        }
        catch_up.await.unwrap().unwrap();
        types_of(&mut rx);

        // Another node deleted message 1 before this node's reader delivered it.
        let deleted = r#"{"type":"chat_deleted","seq":1,"deleted_at":"2026-01-01T00:00:01.000Z","by":{"id":"u","name":"U","role":"student"}}"#;
        room.hear(
            "other",
            Event::Relay {
                json: deleted.into(),
            },
        );
        assert!(types_of(&mut rx).is_empty(), "held until message 1 is here");
        room.deliver_chat(&msg(1, "oops"));
        assert_eq!(types_of(&mut rx), ["chat", "chat_deleted"]);
        // Once the message is here, an amendment goes out at once.
        room.hear(
            "other",
            Event::Relay {
                json: deleted.into(),
            },
        );
        assert_eq!(types_of(&mut rx), ["chat_deleted"]);
    }

    #[test]
    fn pages_hold_at_most_the_count_and_bytes() {
        let messages: Vec<_> = (1..=35).map(|i| msg(i, "hello")).collect();
        let pages = cut_pages(
            &messages,
            Paging {
                messages: 10,
                bytes: 1 << 20,
            },
        );
        assert_eq!(
            pages.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [10, 10, 10, 5]
        );
        let big: Vec<_> = (1..=4).map(|i| msg(i, &"x".repeat(1000))).collect();
        let pages = cut_pages(
            &big,
            Paging {
                messages: 200,
                bytes: 2500,
            },
        );
        assert_eq!(pages.iter().map(|p| p.len()).collect::<Vec<_>>(), [2, 2]);
        for p in &pages {
            let json = ServerMessage::History {
                messages: p,
                more: true,
            }
            .to_json();
            assert!(json.len() <= 2500, "{}", json.len());
        }
        // A message larger than a page goes alone.
        let pages = cut_pages(
            &big,
            Paging {
                messages: 200,
                bytes: 10,
            },
        );
        assert_eq!(pages.len(), 4);
        assert!(cut_pages(
            &[],
            Paging {
                messages: 1,
                bytes: 1
            }
        )
        .is_empty());
    }
}
