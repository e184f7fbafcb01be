//! The whiteboard endpoint's frame handling: y-websocket messages in, session calls out.
//!
//! Decodes each binary frame (every message in it), answers sync step 1 from the session's
//! document, hands updates and awareness to the [`Whiteboard`], enforces the viewer's
//! read-only rule and the frame rate limit. Maps protocol failures to close codes.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::ws::Message;
use yrs::ClientID;

use super::{close, Close, Flow, FrameHandler};
use crate::limits::{Strikes, TokenBucket};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol::wire::{self, Inbound};
use crate::session::whiteboard::{ApplyError, ConnId, Whiteboard};
use crate::session::SessionHandle;

pub struct WhiteboardHandler {
    pub conn: ConnId,
    pub session: SessionHandle,
    pub outbox: Outbox,
    pub can_write: bool,
    pub bucket: TokenBucket,
    /// Awareness frames dropped by the rate limit; too many closes with 1008.
    pub drops: Strikes,
    pub metrics: Arc<Metrics>,
    pub user: String,
    denied_sent: bool,
    announced: HashSet<ClientID>,
}

impl WhiteboardHandler {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        conn: ConnId,
        session: SessionHandle,
        outbox: Outbox,
        can_write: bool,
        bucket: TokenBucket,
        drops: Strikes,
        metrics: Arc<Metrics>,
        user: String,
    ) -> Self {
        Self {
            conn,
            session,
            outbox,
            can_write,
            bucket,
            drops,
            metrics,
            user,
            denied_sent: false,
            announced: HashSet::new(),
        }
    }

    fn whiteboard(&self) -> &Whiteboard {
        &self.session.whiteboard
    }

    fn apply(&mut self, update: &[u8], message: Option<bytes::Bytes>) -> Result<(), Close> {
        if !self.can_write {
            // A viewer's client answers the handshake with an empty step 2; only an update
            // that carries something is a write attempt worth refusing out loud.
            match self.whiteboard().is_empty_update(update) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.metrics.guard_refusals.count(&e);
                    return Err(Close::new(close::INVALID_PAYLOAD, "update refused"));
                }
            }
            self.metrics.updates_rejected.inc();
            if !self.denied_sent {
                self.denied_sent = true;
                self.outbox
                    .send(Message::Binary(wire::permission_denied("read-only")));
            }
            return Ok(());
        }
        match self
            .whiteboard()
            .apply_update(Some(self.conn), update, message)
        {
            Ok(_) => Ok(()),
            Err(e @ (ApplyError::Decode(_) | ApplyError::Rejected(_) | ApplyError::Guard(_))) => {
                self.metrics.updates_rejected.inc();
                tracing::warn!(session = %self.session.id, user = %self.user, error = %e, "update refused");
                Err(Close::new(close::INVALID_PAYLOAD, "update rejected"))
            }
            Err(ApplyError::Store(e)) => {
                tracing::error!(session = %self.session.id, error = %e, "update not stored");
                Err(Close::new(close::INTERNAL, "storage error"))
            }
        }
    }
}

impl FrameHandler for WhiteboardHandler {
    fn on_frame(&mut self, frame: &Message) -> Flow {
        let bytes = match frame {
            Message::Binary(b) => b,
            Message::Text(_) => {
                return Flow::Close(Close::new(
                    close::UNSUPPORTED,
                    "text frames are not part of the whiteboard protocol",
                ))
            }
            _ => return Flow::Continue,
        };
        if !self.bucket.try_take() {
            // Updates are never dropped (the client would diverge): the reader waits for a
            // token instead, which back-pressures the client through TCP. Cursor traffic
            // is dropped and counted; a client that keeps at it is closed.
            if bytes.first() == Some(&0) {
                return Flow::RetryAfter(self.bucket.wait_time());
            }
            self.metrics.whiteboard.rate_limited.inc();
            if self.drops.strike() {
                return Flow::Close(Close::new(close::POLICY, "rate limit exceeded"));
            }
            return Flow::Continue;
        }
        let messages = match wire::decode_frame(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.metrics.updates_rejected.inc();
                tracing::warn!(session = %self.session.id, user = %self.user, error = %e, "frame refused");
                return Flow::Close(Close::new(e.close_code(), e.to_string()));
            }
        };
        for message in messages {
            let outcome = match message {
                Inbound::SyncStep1(sv) => {
                    self.outbox
                        .send(Message::Binary(self.whiteboard().sync_step2(&sv)));
                    Ok(())
                }
                Inbound::SyncStep2 { update } => self.apply(&update, None),
                Inbound::Update { update, message } => self.apply(&update, Some(message)),
                Inbound::Awareness { update, message } => {
                    let mut announced = std::mem::take(&mut self.announced);
                    self.whiteboard()
                        .apply_awareness(update, message, &mut announced);
                    self.announced = announced;
                    Ok(())
                }
                Inbound::Auth => Ok(()),
                Inbound::QueryAwareness => {
                    let states = self
                        .whiteboard()
                        .awareness_states()
                        .unwrap_or_else(|| bytes::Bytes::from_static(wire::KEEPALIVE));
                    self.outbox.send(Message::Binary(states));
                    Ok(())
                }
            };
            if let Err(c) = outcome {
                return Flow::Close(c);
            }
        }
        Flow::Continue
    }

    fn on_close(&mut self) {
        self.session.whiteboard.leave(self.conn, &self.announced);
    }
}
