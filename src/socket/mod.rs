//! The life of one WebSocket connection, shared by both endpoints.
//!
//! A connection is two tasks: the reader (this module's [`run`], driving an endpoint's
//! [`FrameHandler`]) and a writer that drains the connection's [`Outbox`] into the socket.
//! Every outgoing message, whether the session's fan-out or the reader's own reply, goes
//! through the outbox, so order is kept and the writer is the only one touching the sink.
//! The writer also owns the liveness traffic (pings, the whiteboard keep-alive) and every
//! close: the reader asks for a close with a code; the writer sends it. This module knows
//! nothing of Yjs or chat: the endpoints in [`whiteboard`] and [`tutor`] do.

pub mod tutor;
pub mod whiteboard;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::limits::ConnectionPermit;
use crate::metrics::{Endpoint, EndpointMetrics};
use crate::outbox::OutboxReceiver;
use crate::session::whiteboard::ConnId;

/// Close codes the server sends.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const RESTART: u16 = 1012;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const TOKEN_EXPIRED: u16 = 4401;
}

/// A close the server decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

impl Close {
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// Longer than any connection lives; `Instant + Duration::MAX` would overflow.
const FAR_FUTURE: Duration = Duration::from_secs(10 * 365 * 86_400);

/// What the reader does after a frame.
pub enum Flow {
    Continue,
    /// Come back with the same frame after this long (rate limit back-pressure).
    RetryAfter(Duration),
    Close(Close),
}

/// An endpoint's handling of incoming frames. Handlers run on the reader task and must not
/// block for long: they apply, store and fan out, then return.
pub trait FrameHandler: Send {
    fn on_frame(&mut self, frame: &Message) -> Flow;
    /// The connection is over; leave the session.
    fn on_close(&mut self);
}

/// Everything a connection holds while it lives.
pub struct Connection {
    pub id: ConnId,
    pub endpoint: Endpoint,
    pub session: Arc<str>,
    pub user: String,
    /// Holds the connection's place under the caps until the connection is over.
    pub permit: ConnectionPermit,
    pub token_expires: SystemTime,
    /// What the session and the handler queue for this connection.
    pub outbox: OutboxReceiver,
    pub timing: Timing,
    pub metrics: EndpointMetrics,
    pub shutdown: watch::Receiver<bool>,
    pub max_frame_bytes: usize,
}

/// Timing of a connection's writer and reader.
#[derive(Clone, Copy)]
pub struct Timing {
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// Send a keep-alive when nothing was sent for this long (whiteboard only).
    pub keepalive: Option<(Duration, &'static [u8])>,
    /// Most frames the writer batches before a flush.
    pub batch: usize,
}

/// Runs a connection until either side closes it.
pub async fn run(socket: WebSocket, conn: Connection, mut handler: impl FrameHandler) {
    let Connection {
        outbox,
        timing,
        metrics,
        shutdown,
        max_frame_bytes,
        ..
    } = conn;
    let (sink, mut stream) = socket.split();
    // A oneshot, not a channel: the writer is asked to close at most once, and an idle
    // connection should not carry a channel's preallocated block (about 1 KiB).
    let (close_tx, close_rx) = oneshot::channel::<Close>();
    let mut close_tx = Some(close_tx);
    metrics.connections.inc();
    let mut writer = tokio::spawn(write_loop(
        sink,
        outbox,
        close_rx,
        shutdown,
        timing,
        metrics.clone(),
    ));

    let expiry = Instant::now()
        + conn
            .token_expires
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .min(FAR_FUTURE);
    let mut last_heard = Instant::now();
    let mut asked: Option<Close> = None;
    let mut writer_result: Option<Option<Close>> = None;
    let mut client_closed = false;
    let mut ask = |close: Close, asked: &mut Option<Close>| {
        if let Some(tx) = close_tx.take() {
            let _ = tx.send(close.clone());
            *asked = Some(close);
        }
    };

    'read: loop {
        tokio::select! {
            frame = stream.next() => {
                let frame = match frame {
                    Some(Ok(f)) => f,
                    Some(Err(e)) => {
                        let text = e.to_string();
                        if text.contains("too long") || text.contains("Space limit") {
                            ask(Close::new(close::TOO_BIG, "frame too large"), &mut asked);
                        } else {
                            tracing::debug!(conn = conn.id, error = %text, "read error");
                        }
                        break 'read;
                    }
                    None => { client_closed = true; break 'read; }
                };
                last_heard = Instant::now();
                if asked.is_some() {
                    continue; // closing: discard what is still in flight
                }
                let len = match &frame {
                    Message::Binary(b) => b.len(),
                    Message::Text(t) => t.len(),
                    Message::Close(_) => { client_closed = true; break 'read; }
                    _ => continue,
                };
                metrics.frames_in.inc();
                metrics.bytes_in.inc_by(len as u64);
                if len > max_frame_bytes {
                    ask(Close::new(close::TOO_BIG, "frame too large"), &mut asked);
                    continue;
                }
                loop {
                    match handler.on_frame(&frame) {
                        Flow::Continue => break,
                        Flow::Close(c) => { ask(c, &mut asked); break; }
                        Flow::RetryAfter(d) => tokio::time::sleep(d).await,
                    }
                }
            }
            _ = tokio::time::sleep_until(expiry), if asked.is_none() => {
                ask(Close::new(close::TOKEN_EXPIRED, "token expired"), &mut asked);
            }
            _ = tokio::time::sleep_until(last_heard + timing.idle_timeout), if asked.is_none() => {
                ask(Close::new(close::GOING_AWAY, "idle timeout"), &mut asked);
            }
            res = &mut writer => {
                writer_result = Some(res.ok().flatten());
                break 'read;
            }
        }
    }

    handler.on_close();
    // Let the writer send its close frame, then give the peer a moment to answer it, so
    // that the socket is not reset under a close frame the client has not read yet.
    let sent = match writer_result {
        Some(sent) => sent,
        None if client_closed => {
            writer.abort();
            None
        }
        None => {
            ask(
                Close::new(close::GOING_AWAY, "connection ended"),
                &mut asked,
            );
            tokio::time::timeout(Duration::from_secs(2), &mut writer)
                .await
                .ok()
                .and_then(|r| r.ok())
                .flatten()
        }
    };
    if !client_closed {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    metrics.connections.dec();
    let code = sent.as_ref().map(|c| c.code);
    let reason = sent
        .as_ref()
        .map(|c| c.reason.as_str())
        .unwrap_or("client closed");
    tracing::info!(
        conn = conn.id,
        endpoint = conn.endpoint.as_str(),
        session = %conn.session,
        user = %conn.user,
        code,
        reason,
        "connection closed"
    );
    drop(conn.permit);
}

/// Resolves when the server starts shutting down (or is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // Drop the borrow guard at once: it must not live across an await.
    let _ = shutdown.wait_for(|stop| *stop).await.is_ok();
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut outbox: OutboxReceiver,
    mut close_rx: oneshot::Receiver<Close>,
    mut shutdown: watch::Receiver<bool>,
    timing: Timing,
    metrics: EndpointMetrics,
) -> Option<Close> {
    let mut ping =
        tokio::time::interval_at(Instant::now() + timing.ping_interval, timing.ping_interval);
    let mut last_sent = Instant::now();
    let overflow = outbox.overflow_signal();
    let keepalive_after = timing.keepalive.map(|(d, _)| d).unwrap_or(FAR_FUTURE);
    let close = loop {
        tokio::select! {
            biased;
            // Polled only until it completes: every outcome leaves the loop.
            c = &mut close_rx => match c {
                Ok(c) => break c,
                Err(_) => return None,
            },
            _ = overflow.overflowed() => {
                break Close::new(close::TRY_AGAIN_LATER, "send queue full: reconnect and resync");
            }
            _ = stopping(&mut shutdown) => {
                break Close::new(close::RESTART, "server restarting");
            }
            m = outbox.recv() => {
                let mut next = Some(m?);
                let (mut n, mut bytes) = (0, 0);
                while let Some(m) = next {
                    bytes += match &m { Message::Binary(b) => b.len(), Message::Text(t) => t.len(), _ => 0 };
                    if sink.feed(m).await.is_err() {
                        return None;
                    }
                    n += 1;
                    next = if n < timing.batch { outbox.try_recv() } else { None };
                }
                // Once per batch: these counters are shared by every connection, and an
                // atomic add per frame made the two cores take turns on their cache line.
                metrics.frames_out.inc_by(n as u64);
                metrics.bytes_out.inc_by(bytes as u64);
                if sink.flush().await.is_err() {
                    return None;
                }
                last_sent = Instant::now();
            }
            _ = tokio::time::sleep_until(last_sent + keepalive_after), if timing.keepalive.is_some() => {
                let frame = timing.keepalive.map(|(_, f)| f).unwrap_or_default();
                if sink.send(Message::Binary(bytes::Bytes::from_static(frame))).await.is_err() {
                    return None;
                }
                metrics.frames_out.inc();
                last_sent = Instant::now();
            }
            _ = ping.tick() => {
                if sink.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                    return None;
                }
            }
        }
    };
    let frame = CloseFrame {
        code: close.code,
        reason: Utf8Bytes::from(close.reason.clone()),
    };
    let _ = sink.send(Message::Close(Some(frame))).await;
    Some(close)
}
