//! The tutor endpoint's side of SPEC 4.1: `edit`, `delete`, `mute` and `remove` frames,
//! checked here (text size) and carried out by the tutor room, and the `forbidden`
//! (reason `muted`) answer to a muted user's chat and events.
//!
//! Each change runs on the tutor room's lane; the reader awaits it, then answers here.
//! Refusals (`not_found`, `forbidden`) are answered with an error and no strike: they are
//! well-formed requests a client may make in good faith (a message deleted meanwhile).

use super::{close, Close, Flow, TutorHandler};
use crate::protocol::tutor::{ErrorCode, ServerMessage};
use crate::session::tutor::{check_text, AmendError, ChatTextError, ModerateError};

impl TutorHandler {
    /// `forbidden`, reason `muted`.
    pub(super) fn muted(&mut self) -> Flow {
        self.send(ServerMessage::Error {
            code: ErrorCode::Forbidden,
            message: "you are muted in this session",
            reason: Some("muted"),
        });
        Flow::Continue
    }

    fn storage_failed(&self, e: &dyn std::fmt::Display) -> Flow {
        tracing::error!(session = %self.session.id, error = %e, "chat change not stored");
        Flow::Close(Close::new(close::INTERNAL, "storage error"))
    }

    fn amended(&mut self, result: Result<(), AmendError>) -> Flow {
        match result {
            Ok(()) => Flow::Continue,
            Err(AmendError::NotFound(seq)) => {
                self.error(ErrorCode::NotFound, &format!("no message {seq}"), false)
            }
            Err(e @ AmendError::Forbidden(_)) => {
                self.error(ErrorCode::Forbidden, &e.to_string(), false)
            }
            Err(AmendError::Muted) => self.muted(),
            Err(AmendError::Store(e)) => self.storage_failed(&e),
        }
    }

    pub(super) fn edit(&mut self, seq: u64, text: String) -> Flow {
        match check_text(&text, self.config.max_text_chars) {
            Ok(()) => {}
            Err(e @ ChatTextError::Empty) => {
                return self.error(ErrorCode::BadMessage, &e.to_string(), true)
            }
            Err(e @ ChatTextError::TooLong { .. }) => return self.too_large(&e.to_string()),
        }
        let edited = self
            .session
            .tutor
            .edit_chat(&self.user, self.role, seq, text);
        self.then(edited, |h, result| h.amended(result.map(|_| ())))
    }

    pub(super) fn delete(&mut self, seq: u64) -> Flow {
        let deleted = self.session.tutor.delete_chat(&self.user, self.role, seq);
        self.then(deleted, |h, result| h.amended(result.map(|_| ())))
    }

    fn moderated(&mut self, result: Result<String, ModerateError>) -> Flow {
        match result {
            Ok(_) => Flow::Continue,
            Err(e @ ModerateError::Forbidden(_)) => {
                self.error(ErrorCode::Forbidden, &e.to_string(), false)
            }
            Err(e @ ModerateError::BadRequest(_)) => {
                self.error(ErrorCode::BadMessage, &e.to_string(), true)
            }
            Err(ModerateError::Store(e)) => self.storage_failed(&e),
        }
    }

    pub(super) fn mute(&mut self, user: &str, until: Option<&str>) -> Flow {
        let muted = self.session.tutor.mute(&self.user, self.role, user, until);
        self.then(muted, Self::moderated)
    }

    pub(super) fn remove(&mut self, user: &str) -> Flow {
        let removed = self.session.tutor.remove(&self.user, self.role, user);
        self.then(removed, Self::moderated)
    }
}
