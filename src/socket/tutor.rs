//! The tutor endpoint's frame handling: JSON messages in, tutor-room calls out.
//!
//! Parses each text frame, checks it (size, role, rate), and turns it into a chat post, an
//! ephemeral relay or a reply. A bad message gets an error and the connection stays open;
//! too many within the window close it with 1008.

use std::sync::Arc;

use axum::extract::ws::{Message, Utf8Bytes};

use super::{close, Close, Flow, FrameHandler};
use crate::auth::Role;
use crate::config::TutorConfig;
use crate::limits::{Strikes, TokenBucket};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol::tutor::{ClientMessage, ErrorCode, ServerMessage, UserInfo};
use crate::session::tutor::{check_text, ChatTextError};
use crate::session::whiteboard::ConnId;
use crate::session::SessionHandle;

/// Most messages one `history` request returns.
const MAX_HISTORY_PAGE: usize = 200;

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
}

impl TutorHandler {
    fn send(&self, message: ServerMessage<'_>) {
        self.outbox
            .send(Message::Text(Utf8Bytes::from(message.to_json())));
    }

    /// Answers with an error; `strike` counts it toward the bad-message limit.
    fn error(&mut self, code: ErrorCode, message: &str, strike: bool) -> Flow {
        self.send(ServerMessage::Error { code, message });
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
                match check_text(&text, self.config.max_text_chars) {
                    Ok(()) => {}
                    Err(e @ ChatTextError::Empty) => {
                        return self.error(ErrorCode::BadMessage, &e.to_string(), true)
                    }
                    Err(e @ ChatTextError::TooLong { .. }) => {
                        return self.error(ErrorCode::TooLarge, &e.to_string(), true)
                    }
                }
                if let Err(e) = room.post_chat(self.user.clone(), text, client_id) {
                    tracing::error!(session = %self.session.id, error = %e, "chat not stored");
                    return Flow::Close(Close::new(close::INTERNAL, "storage error"));
                }
            }
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
                match room.history_before(before, limit) {
                    Ok(messages) => self.send(ServerMessage::History {
                        messages: &messages,
                    }),
                    Err(e) => {
                        tracing::error!(session = %self.session.id, error = %e, "history not read");
                        return Flow::Close(Close::new(close::INTERNAL, "storage error"));
                    }
                }
            }
            ClientMessage::Ping => self.send(ServerMessage::Pong),
        }
        Flow::Continue
    }
}

impl FrameHandler for TutorHandler {
    fn on_frame(&mut self, frame: &Message) -> Flow {
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
        match ClientMessage::parse(text) {
            Ok(message) => self.handle(message),
            Err(e) => self.error(ErrorCode::BadMessage, &e, true),
        }
    }

    fn on_close(&mut self) {
        self.session.tutor.leave(self.conn);
    }
}
