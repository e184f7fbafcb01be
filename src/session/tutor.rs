//! A session's tutor room: who is present, and the chat with its gapless `seq`.
//!
//! The room owns the participant list and the next `seq`; it stores each chat message
//! through the [`Store`] before broadcasting it, under one short lock so that every
//! connection sees messages in `seq` order. It encodes each broadcast once and pushes the
//! same bytes into every outbox; it never touches a socket.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::{Message, Utf8Bytes};

use super::whiteboard::ConnId;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol::tutor::{ChatMessage, Participant, PresenceEvent, ServerMessage, UserInfo};
use crate::store::{Store, StoreError};

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

struct Member {
    user: UserInfo,
    outbox: Outbox,
}

struct Inner {
    last_seq: u64,
    members: HashMap<ConnId, Member>,
}

pub struct TutorRoom {
    session: Arc<str>,
    inner: Mutex<Inner>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    history_limit: usize,
    flush_before_relay: bool,
    /// The last `seq`, for long polls waiting on new messages.
    seq_changes: tokio::sync::watch::Sender<u64>,
}

fn text(json: String) -> Message {
    Message::Text(Utf8Bytes::from(json))
}

impl TutorRoom {
    pub fn load(
        session: Arc<str>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        history_limit: usize,
        flush_before_relay: bool,
    ) -> Result<Self, StoreError> {
        let last_seq = store.last_chat_seq(&session)?;
        Ok(Self {
            session,
            inner: Mutex::new(Inner {
                last_seq,
                members: HashMap::new(),
            }),
            store,
            metrics,
            history_limit,
            flush_before_relay,
            seq_changes: tokio::sync::watch::Sender::new(last_seq),
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn participants(members: &HashMap<ConnId, Member>) -> Vec<Participant> {
        let mut by_user: BTreeMap<&str, Participant> = BTreeMap::new();
        for m in members.values() {
            by_user
                .entry(&m.user.id)
                .or_insert_with(|| Participant {
                    user: m.user.clone(),
                    connections: 0,
                })
                .connections += 1;
        }
        by_user.into_values().collect()
    }

    /// Adds a connection and queues its greeting: `welcome`, then `history` (every message
    /// after `after_seq` when given, else the last `recent`). Others hear `presence joined`
    /// when this is the user's first connection. All under the room's lock, so no chat
    /// message can fall between the history and the live stream.
    pub fn join(
        &self,
        conn: ConnId,
        user: UserInfo,
        outbox: Outbox,
        after_seq: Option<u64>,
        recent: usize,
    ) -> Result<(), StoreError> {
        let mut inner = self.inner();
        let history = match after_seq {
            Some(after) => self.store.chat_after(&self.session, after, usize::MAX)?,
            None => self.store.chat_before(&self.session, u64::MAX, recent)?,
        };
        let first = !inner.members.values().any(|m| m.user.id == user.id);
        inner.members.insert(
            conn,
            Member {
                user: user.clone(),
                outbox: outbox.clone(),
            },
        );
        let participants = Self::participants(&inner.members);
        outbox.send(text(
            ServerMessage::Welcome {
                session: &self.session,
                user: &user,
                participants: &participants,
                last_seq: inner.last_seq,
            }
            .to_json(),
        ));
        outbox.send(text(
            ServerMessage::History { messages: &history }.to_json(),
        ));
        if first {
            let msg = text(
                ServerMessage::Presence {
                    event: PresenceEvent::Joined,
                    user: &user,
                    participants: &participants,
                }
                .to_json(),
            );
            for (id, m) in inner.members.iter() {
                if *id != conn {
                    m.outbox.send(msg.clone());
                }
            }
        }
        Ok(())
    }

    /// Removes a connection. Others hear `presence left` when it was the user's last one.
    pub fn leave(&self, conn: ConnId) {
        let mut inner = self.inner();
        let Some(gone) = inner.members.remove(&conn) else {
            return;
        };
        if inner.members.values().any(|m| m.user.id == gone.user.id) {
            return;
        }
        let participants = Self::participants(&inner.members);
        let msg = text(
            ServerMessage::Presence {
                event: PresenceEvent::Left,
                user: &gone.user,
                participants: &participants,
            }
            .to_json(),
        );
        for m in inner.members.values() {
            m.outbox.send(msg.clone());
        }
    }

    /// Stores a chat message under the next `seq` and sends it to every connection,
    /// the sender's included (its acknowledgement).
    pub fn post_chat(
        &self,
        from: UserInfo,
        text_body: String,
        client_id: Option<String>,
    ) -> Result<ChatMessage, StoreError> {
        let mut inner = self.inner();
        let message = ChatMessage {
            seq: inner.last_seq + 1,
            client_id,
            from,
            text: text_body,
            ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        };
        self.store
            .append_chat(&self.session, &message, self.history_limit)?;
        if self.flush_before_relay {
            self.store.flush()?;
        }
        inner.last_seq = message.seq;
        self.seq_changes.send_replace(message.seq);
        self.metrics.chat_messages.inc();
        let msg = text(ServerMessage::Chat(&message).to_json());
        for m in inner.members.values() {
            m.outbox.send(msg.clone());
        }
        Ok(message)
    }

    /// Sends an ephemeral message (typing, event) to every connection but the sender's.
    pub fn relay(&self, from: ConnId, message: &ServerMessage<'_>) {
        let msg = text(message.to_json());
        let inner = self.inner();
        for (id, m) in inner.members.iter() {
            if *id != from {
                m.outbox.send(msg.clone());
            }
        }
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
