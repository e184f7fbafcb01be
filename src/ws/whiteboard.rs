//! The whiteboard endpoint's frame handling: y-websocket messages in, session calls out.
//!
//! Reads every message of each binary frame, answers sync step 1 from the session's
//! document, hands updates and awareness to the [`Whiteboard`], enforces the viewer's
//! read-only rule and the rate limit. Maps protocol failures to close codes.
//!
//! The rate limit counts protocol messages, not frames (SPEC.md 7.1): a frame packed with a
//! million messages costs a million tokens. A frame is first checked whole for its framing
//! (no allocation), then walked one message at a time: each takes a token before it is
//! decoded; past the budget, awareness, query-awareness and auth messages are dropped
//! undecoded and counted (a client that keeps at it is closed with 1008), and a sync
//! message makes the reader wait for a token and resume the frame where it stopped
//! (back-pressure). Replies (step 2, awareness states) go through the connection's own send
//! queue, in bytes as sent; once it refuses them (1013), the rest of the frame is not read.
//! A step 2 is encoded off the async workers (the session's `sync_step2`): the reader
//! awaits it ([`Flow::Then`]) and then goes on with the frame after the step 1 it answers.
//!
//! An update from a writer is queued to the session's sequencer (which guards, applies,
//! stores and relays it off the async workers), and the reader reads on: up to
//! `MAX_IN_FLIGHT` (8) of a connection's updates are in flight, so that under load the
//! sequencer finds several queued and relays them as one batch. It still acts as if each
//! outcome were awaited: a step 1 is answered once the client's updates before it are in
//! (the step 2 includes them), the first refusal closes the connection and the updates
//! queued after it are not applied (the sequencer skips them), and a full queue holds the
//! reader (and, through TCP, the client).
//!
//! Must not touch the document or other connections directly: the session does, and every
//! close code comes from [`super::close`].

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::ws::Message;
use yrs::ClientID;

use super::close::{self, Close};
use super::frames::{self, Kind};
use super::outbox::Outbox;
use super::{Flow, FlowFuture, FrameHandler};
use crate::limits::{Strikes, TokenBucket};
use crate::metrics::Metrics;
use crate::protocol::wire::{self, Inbound};
use crate::session::whiteboard::{ApplyError, ConnId, Submitted, UpdateOutcome, Whiteboard};
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
    /// Where in the current frame to go on after a rate-limit wait (`None`: a new frame).
    resume_at: Option<usize>,
    /// Protocol messages read and not yet added to `whiteboard_messages_in` (the reader
    /// says when: [`FrameHandler::flush_counters`]).
    messages_in: u64,
    /// Updates queued to the sequencer whose outcome is not seen yet, oldest first.
    in_flight: std::collections::VecDeque<UpdateOutcome>,
    /// Set on the sequencer once one of this connection's updates is refused.
    refused: Arc<std::sync::atomic::AtomicBool>,
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
            resume_at: None,
            messages_in: 0,
            in_flight: std::collections::VecDeque::new(),
            refused: Arc::default(),
        }
    }

    fn whiteboard(&self) -> &Whiteboard {
        &self.session.whiteboard
    }

    /// A writer's update: `Ok(Some(_))` is the sequencer's outcome to await before the next
    /// message (it resolves to a retry of the frame, which resumes after this message, or
    /// to the close a refusal calls for).
    fn apply(
        &mut self,
        update: bytes::Bytes,
        message: Option<bytes::Bytes>,
    ) -> Result<Option<FlowFuture>, Close> {
        if !self.can_write {
            // A viewer's client answers the handshake with an empty step 2; only an update
            // that carries something is a write attempt worth refusing out loud.
            match self.whiteboard().is_empty_update(&update) {
                Ok(true) => return Ok(None),
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
            return Ok(None);
        }
        let submitted = self
            .whiteboard()
            .queue_update(self.conn, &self.refused, update, message);
        let wait_for = match submitted {
            // The sequencer's queue is full: this one is queued only once a place is free,
            // and nothing after it before then (back-pressure, through TCP).
            Submitted::Waiting(outcome) => {
                self.metrics.reader_waits.queue_full.inc();
                // Those in flight first: the first refusal decides the close.
                let mut all: Vec<UpdateOutcome> = self.in_flight.drain(..).collect();
                all.push(outcome);
                all
            }
            Submitted::Queued(outcome) => {
                self.in_flight.push_back(outcome);
                if self.in_flight.len() <= MAX_IN_FLIGHT {
                    return Ok(None);
                }
                // Too many in flight: read on once the oldest is in.
                self.metrics.reader_waits.in_flight.inc();
                self.in_flight.pop_front().into_iter().collect()
            }
        };
        Ok(Some(self.outcomes_then_retry(wait_for)))
    }

    /// Awaits `outcomes` in order, then goes back to the frame (where `resume_at` says),
    /// or closes as the first refusal calls for.
    fn outcomes_then_retry(&self, outcomes: Vec<UpdateOutcome>) -> FlowFuture {
        let (metrics, session, user) = (
            self.metrics.clone(),
            self.session.id.clone(),
            self.user.clone(),
        );
        Box::pin(async move {
            for outcome in outcomes {
                if let Err(e) = outcome.await {
                    return Flow::Close(refusal(e, &metrics, &session, &user));
                }
            }
            Flow::RetryAfter(std::time::Duration::ZERO)
        })
    }
}

/// A writer's updates queued to the sequencer whose outcome the reader has not seen yet,
/// at most: past it the reader waits for the oldest before it reads on.
const MAX_IN_FLIGHT: usize = 8;

/// The close an update's refusal calls for: 1007 for what the update is, 1011 when it
/// could not be stored (1013 while a shared store is unreachable).
fn refusal(e: ApplyError, metrics: &Metrics, session: &str, user: &str) -> Close {
    match e {
        e @ (ApplyError::Decode(_) | ApplyError::Rejected(_) | ApplyError::Guard(_)) => {
            metrics.updates_rejected.inc();
            tracing::warn!(%session, %user, error = %e, "update refused");
            Close::new(close::INVALID_PAYLOAD, "update rejected")
        }
        ApplyError::Store(e) => {
            tracing::error!(%session, error = %e, "update not stored");
            Close::for_store(&e)
        }
    }
}

impl WhiteboardHandler {
    /// Queues a reply; `Err` when the send queue refused it (it is over its limit and the
    /// writer is closing with 1013), so the rest of the frame is not worth reading.
    fn reply(&self, message: bytes::Bytes) -> Result<(), Close> {
        if self.outbox.send(Message::Binary(message)) || self.outbox.is_open() {
            return Ok(());
        }
        Err(Close::new(
            close::TRY_AGAIN_LATER,
            "send queue full: reconnect and resync",
        ))
    }

    /// Answers sync step 1: the step 2 is encoded off the async workers (a large board
    /// takes tens of milliseconds), and the reader awaits it before it goes on with the
    /// frame, so replies keep the order of the messages they answer. The step 2 takes the
    /// send queue's one place for a large reply (see [`Outbox::send_reply`]): a board
    /// larger than the queue's limit joins whatever else is queued.
    fn answer_step1(&self, sv: &yrs::StateVector) -> FlowFuture {
        // Cluster mode with Redis down: what the document holds may not be stored.
        if let Err(e) = self.whiteboard().refuse_if_stale() {
            let close = Close::for_store(&e);
            return Box::pin(async move { Flow::Close(close) });
        }
        let step2 = self.whiteboard().sync_step2(sv);
        let outbox = self.outbox.clone();
        Box::pin(async move {
            let bytes = step2.await;
            if outbox.send_reply(Message::Binary(bytes)) || outbox.is_open() {
                // Back to the frame, after the message answered (`resume_at`).
                return Flow::RetryAfter(std::time::Duration::ZERO);
            }
            Flow::Close(Close::new(
                close::TRY_AGAIN_LATER,
                "send queue full: reconnect and resync",
            ))
        })
    }

    /// Handles one message (the bytes of exactly one); `Ok(Some(_))`: await this before the
    /// next message.
    fn handle(&mut self, bytes: &bytes::Bytes) -> Result<Option<FlowFuture>, Close> {
        let message = match wire::decode_frame(bytes) {
            Ok(mut m) if m.len() == 1 => m.pop(),
            Ok(_) => None,
            Err(e) => {
                if matches!(e, wire::WireError::AwarenessRefused(_)) {
                    self.metrics.guard_refusals.awareness.inc();
                } else {
                    self.metrics.updates_rejected.inc();
                }
                tracing::warn!(session = %self.session.id, user = %self.user, error = %e, "frame refused");
                return Err(Close::for_wire(&e));
            }
        };
        let Some(message) = message else {
            return Err(Close::new(close::INVALID_PAYLOAD, "malformed message"));
        };
        match message {
            Inbound::SyncStep1(sv) => Ok(Some(self.answer_step1(&sv))),
            Inbound::SyncStep2 { update } => self.apply(update, None),
            Inbound::Update { update, message } => self.apply(update, Some(message)),
            Inbound::Awareness { update, .. } => {
                let mut announced = std::mem::take(&mut self.announced);
                self.whiteboard().apply_awareness(update, &mut announced);
                self.announced = announced;
                Ok(None)
            }
            Inbound::Auth => Ok(None),
            Inbound::QueryAwareness => {
                let states = self
                    .whiteboard()
                    .awareness_states()
                    .unwrap_or_else(|| bytes::Bytes::from_static(wire::KEEPALIVE));
                self.reply(states).map(|()| None)
            }
        }
    }

    /// Walks the frame from `self.resume_at`.
    fn walk(&mut self, bytes: &bytes::Bytes) -> Flow {
        if self.resume_at.is_none() {
            // The framing of the whole frame first: nothing of a frame cut short or holding
            // an unknown type is applied.
            match frames::count_messages(bytes) {
                Ok(n) => self.messages_in += n as u64,
                Err(e) => {
                    self.metrics.updates_rejected.inc();
                    tracing::warn!(session = %self.session.id, user = %self.user, error = %e, "frame refused");
                    return Flow::Close(Close::for_wire(&e));
                }
            }
        }
        let mut pos = self.resume_at.unwrap_or(0);
        while pos < bytes.len() {
            let (kind, end) = match frames::next_message(bytes, pos) {
                Ok(m) => m,
                Err(e) => return Flow::Close(Close::for_wire(&e)),
            };
            if kind == Kind::SyncStep1 && !self.in_flight.is_empty() {
                // A step 1 is answered from the document: with the client's own updates in
                // it, as when each was awaited. Back to this message once they are in.
                self.resume_at = Some(pos);
                self.metrics.reader_waits.step1.inc();
                let in_flight = self.in_flight.drain(..).collect();
                return Flow::Then(self.outcomes_then_retry(in_flight));
            }
            if !self.bucket.try_take() {
                if matches!(kind, Kind::Sync | Kind::SyncStep1) {
                    // Updates are never dropped (the client would diverge): the reader
                    // waits for a token instead, which back-pressures the client through
                    // TCP, and comes back to this message.
                    self.resume_at = Some(pos);
                    return Flow::RetryAfter(self.bucket.wait_time());
                }
                // Cursor traffic is dropped, undecoded, and counted; a client that keeps
                // at it is closed.
                self.metrics.whiteboard.rate_limited.inc();
                if self.drops.strike() {
                    return Flow::Close(Close::new(close::POLICY, "rate limit exceeded"));
                }
                pos = end;
                continue;
            }
            match self.handle(&bytes.slice(pos..end)) {
                Ok(None) => {}
                Ok(Some(outcome)) => {
                    // The sequencer has the update; the frame goes on after it once the
                    // outcome is in.
                    self.resume_at = Some(end);
                    return Flow::Then(outcome);
                }
                Err(c) => return Flow::Close(c),
            }
            pos = end;
        }
        Flow::Continue
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
        let flow = self.walk(bytes);
        // Either comes back to this frame where `resume_at` says.
        if !matches!(flow, Flow::RetryAfter(_) | Flow::Then(_)) {
            self.resume_at = None;
        }
        flow
    }

    fn poll_in_flight(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Flow> {
        // The sequencer answers a connection's updates in the order they were queued: the
        // oldest is the one to watch.
        while let Some(oldest) = self.in_flight.front_mut() {
            match oldest.as_mut().poll(cx) {
                std::task::Poll::Pending => return std::task::Poll::Pending,
                std::task::Poll::Ready(Ok(_)) => {
                    self.in_flight.pop_front();
                }
                std::task::Poll::Ready(Err(e)) => {
                    self.in_flight.clear();
                    return std::task::Poll::Ready(Flow::Close(refusal(
                        e,
                        &self.metrics,
                        &self.session.id,
                        &self.user,
                    )));
                }
            }
        }
        std::task::Poll::Pending
    }

    fn on_close(&mut self) {
        self.session.whiteboard.leave(self.conn, &self.announced);
    }

    fn flush_counters(&mut self) {
        if self.messages_in > 0 {
            self.metrics
                .whiteboard_messages_in
                .inc_by(std::mem::take(&mut self.messages_in));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::{Duration, Instant};

    use yrs::updates::decoder::Decode;
    use yrs::{GetString, Text, Transact};

    use super::*;
    use crate::config::Config;
    use crate::session::whiteboard::QUEUE_JOBS;
    use crate::session::Registry;
    use crate::store::{MemoryStore, Store};
    use crate::ws::outbox::outbox;

    /// `n` updates of one client, each typing one more character of "t".
    fn typed(n: u32) -> Vec<Vec<u8>> {
        let doc = yrs::Doc::with_client_id(7);
        let text = doc.get_or_insert_text("t");
        (0..n)
            .map(|i| {
                let mut txn = doc.transact_mut();
                text.insert(&mut txn, i, "x");
                txn.encode_update_v1()
            })
            .collect()
    }

    /// One binary frame holding each update as a y-websocket message.
    fn frame(updates: &[Vec<u8>]) -> Message {
        let bytes: Vec<u8> = updates
            .iter()
            .flat_map(|u| wire::update(u.clone()).to_vec())
            .collect();
        Message::Binary(bytes.into())
    }

    /// A writer's handler on session "s" of a fresh registry (rate limit out of the way),
    /// another handle on that session for the test, and the metrics.
    fn writer() -> (WhiteboardHandler, SessionHandle, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let registry = Registry::new(store, metrics.clone(), Arc::new(Config::default()));
        let session = registry.open("s").unwrap();
        let ours = session.clone();
        let (tx, _rx) = outbox(1 << 20);
        let handler = WhiteboardHandler::new(
            1,
            session,
            tx,
            true,
            TokenBucket::new(1e6, 1_000_000),
            Strikes::new(10, Duration::from_secs(60)),
            metrics.clone(),
            "u".into(),
        );
        (handler, ours, metrics)
    }

    /// Awaits a flow the handler returned, on a runtime of its own.
    fn finish(flow: FlowFuture) -> Flow {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(flow)
    }

    /// The text "t" of the session's board.
    fn board_text(session: &SessionHandle) -> String {
        let doc = yrs::Doc::new();
        let state = session.whiteboard.encode_state();
        doc.transact_mut()
            .apply_update(yrs::Update::decode_v1(&state).unwrap())
            .unwrap();
        let text = doc.get_or_insert_text("t");
        let got = text.get_string(&doc.transact());
        got
    }

    /// A writer's reader keeps at most `MAX_IN_FLIGHT` updates at the sequencer: the one
    /// after makes it wait for the oldest (counted as a wait), and once that is in it reads
    /// on; every update is applied, in order.
    #[test]
    fn a_reader_waits_once_its_updates_in_flight_reach_the_bound() {
        let (mut handler, ours, metrics) = writer();
        let release = ours.whiteboard.hold_sequencer();
        let updates = typed(MAX_IN_FLIGHT as u32 + 1);
        let (bound, next) = updates.split_at(MAX_IN_FLIGHT);
        assert!(matches!(handler.on_frame(&frame(bound)), Flow::Continue));
        assert_eq!(handler.in_flight.len(), MAX_IN_FLIGHT);
        assert_eq!(metrics.reader_waits.in_flight.get(), 0);

        let next = frame(next);
        let Flow::Then(mut wait) = handler.on_frame(&next) else {
            panic!("the update past the bound did not make the reader wait");
        };
        assert_eq!(metrics.reader_waits.in_flight.get(), 1);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            wait.as_mut().poll(&mut cx).is_pending(),
            "the sequencer is held"
        );

        drop(release);
        assert!(matches!(finish(wait), Flow::RetryAfter(d) if d.is_zero()));
        // Back to the frame after the update it queued: nothing more in it.
        assert!(matches!(handler.on_frame(&next), Flow::Continue));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !handler.in_flight.is_empty() {
            assert!(Instant::now() < deadline, "updates still in flight");
            assert!(handler.poll_in_flight(&mut cx).is_pending(), "a refusal");
            std::thread::yield_now();
        }
        assert_eq!(board_text(&ours), "x".repeat(updates.len()));
    }

    /// With the session's sequencer queue full, a writer's update makes its reader wait
    /// (counted as a wait) until the update has a place and its outcome is in: the client is
    /// slowed through TCP, nothing is dropped.
    #[test]
    fn a_reader_waits_while_the_sessions_queue_is_full() {
        let (mut handler, ours, metrics) = writer();
        let release = ours.whiteboard.hold_sequencer();
        // Another writer's updates fill the queue behind the held job.
        let theirs = {
            let doc = yrs::Doc::with_client_id(8);
            let text = doc.get_or_insert_text("u");
            (0..QUEUE_JOBS)
                .map(|_| {
                    let mut txn = doc.transact_mut();
                    text.push(&mut txn, "y");
                    txn.encode_update_v1()
                })
                .collect::<Vec<_>>()
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut queued = Vec::new();
        for update in theirs {
            let mut job = Box::pin(ours.whiteboard.submit_update(None, update.into(), None));
            let _ = job.as_mut().poll(&mut cx);
            queued.push(job);
        }
        assert!(ours.whiteboard.sequencer_queued() > QUEUE_JOBS);
        let mine = typed(1);
        let Flow::Then(mut wait) = handler.on_frame(&frame(&mine)) else {
            panic!("the update found no place and the reader did not wait");
        };
        assert_eq!(metrics.reader_waits.queue_full.get(), 1);
        assert!(handler.in_flight.is_empty(), "nothing left in flight");
        assert!(
            wait.as_mut().poll(&mut cx).is_pending(),
            "the queue is full"
        );
        drop(release);
        assert!(matches!(finish(wait), Flow::RetryAfter(d) if d.is_zero()));
        assert_eq!(board_text(&ours), "x");
        drop(queued);
    }
}
