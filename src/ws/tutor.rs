//! The tutor endpoint's frame handling: JSON messages in, tutor-room calls out.
//!
//! Parses each text frame, checks it (size, role, rate), and turns it into a chat post, an
//! ephemeral relay or a reply. A bad message gets an error and the connection stays open;
//! too many within the window close it with 1008.
//!
//! Sizes (SPEC.md 7.1): chat text at most `tutor.max_text_chars` characters, `client_id`
//! `tutor.max_client_id_bytes`, `event.name` `tutor.max_event_name_bytes`, `event.data`
//! `tutor.max_event_data_bytes` of JSON; past them `too_large`. A frame too long to hold
//! anything valid is refused as `too_large` before it is parsed, so parsing never builds a
//! large tree. History (the connection's first, and `history` requests) is sent in pages
//! by the tutor room; the reader reads no further frame until the pages are queued.
//!
//! Must not store or broadcast by itself: the tutor room does; close codes come from
//! [`super::close`].

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes};

use super::close::{self, Close};
use super::outbox::Outbox;
use super::{Flow, FrameHandler};
use crate::auth::Role;
use crate::config::TutorConfig;
use crate::limits::{Strikes, TokenBucket};
use crate::metrics::Metrics;
use crate::protocol::tutor::{ClientMessage, ErrorCode, ServerMessage, UserInfo};
use crate::session::tutor::{check_text, ChatTextError, HistoryRange, Paging, PostError};
use crate::session::whiteboard::ConnId;
use crate::session::SessionHandle;
use crate::sync;

mod moderation;

/// Most messages one `history` request returns.
const MAX_HISTORY_PAGE: usize = 200;

/// Bytes of JSON a string of `n` bytes may take at most (every byte escaped as `\u00XX`).
const ESCAPED: usize = 6;

/// The longest text frame that can hold a valid message: the largest of the parts, each
/// escaped as much as JSON allows, and room for the rest of the object.
fn max_frame_bytes(c: &TutorConfig) -> usize {
    let text = c.max_text_chars.saturating_mul(4 * ESCAPED);
    let data = c.max_event_data_bytes.saturating_mul(ESCAPED);
    let ids = (c.max_client_id_bytes + c.max_event_name_bytes).saturating_mul(ESCAPED);
    text.max(data).saturating_add(ids).saturating_add(4096)
}

/// The length of a JSON value as compact text, without building the text.
fn json_len(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing a parsed value into a counter cannot fail.
    let _ = serde_json::to_writer(&mut c, value);
    c.0
}

pub struct TutorHandler {
    pub conn: ConnId,
    pub session: SessionHandle,
    pub outbox: Outbox,
    pub user: UserInfo,
    pub role: Role,
    pub bucket: TokenBucket,
    pub strikes: Strikes,
    pub config: TutorConfig,
    pub metrics: Arc<Metrics>,
    /// The rest of a change's handling once the room's lane has done it (see
    /// `TutorHandler::then`).
    pub finish: Finish,
}

/// What is left to do with a change's outcome, with the handler at hand.
type FinishFn = Box<dyn FnOnce(&mut TutorHandler) -> Flow + Send>;

/// Where a change's awaited outcome waits for the handler (`Default`: nothing).
#[derive(Default, Clone)]
pub struct Finish(Arc<Mutex<Option<FinishFn>>>);

impl TutorHandler {
    fn send(&self, message: ServerMessage<'_>) {
        self.outbox
            .send(Message::Text(Utf8Bytes::from(message.to_json())));
    }

    /// Awaits `outcome` (a change queued on the room's lane) before the next frame is read,
    /// then comes back to this frame to `finish` with the handler (an error reply, a
    /// strike), like the whiteboard's resume after its sequencer's outcome.
    fn then<T: Send + 'static>(
        &self,
        outcome: impl Future<Output = T> + Send + 'static,
        finish: impl FnOnce(&mut Self, T) -> Flow + Send + 'static,
    ) -> Flow {
        let slot = self.finish.clone();
        // A task of its own holding the session: should the connection go before the
        // change is made, the session stays loaded (no second room can load and hand out
        // the same seq) until it is.
        let held = self.session.clone();
        let done = tokio::spawn(async move {
            let out = outcome.await;
            drop(held);
            out
        });
        Flow::Then(Box::pin(async move {
            let Ok(out) = done.await else {
                return Flow::Close(Close::new(close::INTERNAL, "storage error"));
            };
            *sync::lock(&slot.0) = Some(Box::new(move |h: &mut Self| finish(h, out)));
            Flow::RetryAfter(Duration::ZERO)
        }))
    }

    fn paging(&self) -> Paging {
        Paging {
            messages: self.config.history_page_messages,
            bytes: self.config.history_page_bytes,
        }
    }

    /// Refuses something too large: `too_large`, counted, and a strike.
    fn too_large(&mut self, message: &str) -> Flow {
        self.metrics.tutor_too_large.inc();
        self.error(ErrorCode::TooLarge, message, true)
    }

    /// Answers with an error; `strike` counts it toward the bad-message limit.
    fn error(&mut self, code: ErrorCode, message: &str, strike: bool) -> Flow {
        self.send(ServerMessage::Error {
            code,
            message,
            reason: None,
        });
        if strike && self.strikes.strike() {
            tracing::info!(session = %self.session.id, user = %self.user.id, "too many bad messages");
            return Flow::Close(Close::new(close::POLICY, "too many bad messages"));
        }
        Flow::Continue
    }

    fn handle(&mut self, message: ClientMessage) -> Flow {
        let room = &self.session.tutor;
        match message {
            ClientMessage::Chat { text, client_id } => {
                if !self.role.can_write() {
                    return self.error(ErrorCode::Forbidden, "viewers may not chat", false);
                }
                if room.is_muted(&self.user.id, self.role) {
                    return self.muted();
                }
                match check_text(&text, self.config.max_text_chars) {
                    Ok(()) => {}
                    Err(e @ ChatTextError::Empty) => {
                        return self.error(ErrorCode::BadMessage, &e.to_string(), true)
                    }
                    Err(e @ ChatTextError::TooLong { .. }) => {
                        return self.too_large(&e.to_string())
                    }
                }
                if let Some(id) = &client_id {
                    if id.len() > self.config.max_client_id_bytes {
                        let max = self.config.max_client_id_bytes;
                        return self.too_large(&format!(
                            "client_id is {} bytes; the limit is {max}",
                            id.len()
                        ));
                    }
                }
                // Stored and relayed on the room's lane; the next frame is read after.
                let posted = room.post_chat(self.user.clone(), self.role, text, client_id);
                return self.then(posted, |h, posted| match posted {
                    Ok(_) => Flow::Continue,
                    // Muted while the post waited its turn.
                    Err(PostError::Muted) => h.muted(),
                    Err(PostError::Store(e)) => {
                        tracing::error!(session = %h.session.id, error = %e, "chat not stored");
                        Flow::Close(Close::for_store(&e))
                    }
                });
            }
            // A muted user's typing is dropped quietly: others would wait for a message that
            // cannot come, and an error per keystroke helps nobody (SPEC 4.1 leaves it open).
            ClientMessage::Typing { .. } if room.is_muted(&self.user.id, self.role) => {}
            ClientMessage::Typing { active } => {
                room.relay(
                    self.conn,
                    &ServerMessage::Typing {
                        from: &self.user,
                        active,
                    },
                );
            }
            ClientMessage::Event { name, data } => {
                if !self.role.can_write() {
                    return self.error(ErrorCode::Forbidden, "viewers may not send events", false);
                }
                if room.is_muted(&self.user.id, self.role) {
                    return self.muted();
                }
                if name.len() > self.config.max_event_name_bytes {
                    let max = self.config.max_event_name_bytes;
                    return self.too_large(&format!(
                        "event name is {} bytes; the limit is {max}",
                        name.len()
                    ));
                }
                let data_len = json_len(&data);
                if data_len > self.config.max_event_data_bytes {
                    let max = self.config.max_event_data_bytes;
                    return self.too_large(&format!(
                        "event data is {data_len} bytes; the limit is {max}"
                    ));
                }
                let room = &self.session.tutor;
                room.relay(
                    self.conn,
                    &ServerMessage::Event {
                        from: &self.user,
                        name: &name,
                        data: &data,
                    },
                );
            }
            ClientMessage::History { before, limit } => {
                let limit = limit
                    .unwrap_or(self.config.history_on_connect)
                    .min(MAX_HISTORY_PAGE);
                let newest = room.last_seq().saturating_add(1);
                let range = HistoryRange::Before {
                    before: before.unwrap_or(newest).min(newest),
                    limit,
                };
                let (reader, outbox, paging) = (room.reader(), self.outbox.clone(), self.paging());
                let session = self.session.id.clone();
                // Read and sent off the reader, page by page; the next frame is read after.
                return Flow::Then(Box::pin(async move {
                    match reader.send(range, &outbox, paging).await {
                        Ok(()) => Flow::Continue,
                        Err(e) => {
                            tracing::error!(%session, error = %e, "history not read");
                            Flow::Close(Close::new(close::INTERNAL, "storage error"))
                        }
                    }
                }));
            }
            ClientMessage::Ping => self.send(ServerMessage::Pong),
            ClientMessage::Edit { seq, text } => return self.edit(seq, text),
            ClientMessage::Delete { seq } => return self.delete(seq),
            ClientMessage::Mute { user, until } => return self.mute(&user, until.as_deref()),
            ClientMessage::Remove { user } => return self.remove(&user),
        }
        Flow::Continue
    }
}

impl FrameHandler for TutorHandler {
    fn on_start(&mut self) -> Flow {
        let Some(catch_up) = self.session.tutor.catch_up(self.conn, self.paging()) else {
            return Flow::Continue;
        };
        let session = self.session.id.clone();
        Flow::Then(Box::pin(async move {
            match catch_up.await {
                Ok(()) => Flow::Continue,
                Err(e) => {
                    tracing::error!(%session, error = %e, "tutor join failed: history unreadable");
                    Flow::Close(Close::new(close::INTERNAL, "storage error"))
                }
            }
        }))
    }

    fn on_frame(&mut self, frame: &Message) -> Flow {
        // Back with the frame whose change the lane has done: finish it, nothing more.
        let finish = sync::lock(&self.finish.0).take();
        if let Some(finish) = finish {
            return finish(self);
        }
        let text = match frame {
            Message::Text(t) => t.as_str(),
            Message::Binary(_) => {
                return self.error(ErrorCode::BadMessage, "expected a JSON text frame", true)
            }
            _ => return Flow::Continue,
        };
        if !self.bucket.try_take() {
            self.metrics.tutor.rate_limited.inc();
            return self.error(ErrorCode::RateLimited, "slow down", true);
        }
        let max = max_frame_bytes(&self.config);
        if text.len() > max {
            return self.too_large(&format!(
                "message is {} bytes; no valid message is longer than {max}",
                text.len()
            ));
        }
        match ClientMessage::parse(text) {
            Ok(message) => self.handle(message),
            Err(e) => self.error(ErrorCode::BadMessage, &e, true),
        }
    }

    fn on_close(&mut self) {
        self.session.tutor.leave(self.conn);
    }
}
