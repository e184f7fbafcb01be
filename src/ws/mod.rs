//! The life of one WebSocket connection, shared by both endpoints.
//!
//! A connection is two tasks: the reader (this module's [`run`], driving an endpoint's
//! [`FrameHandler`]) and a writer that drains the connection's [`outbox::Outbox`] into the
//! socket.
//! Every outgoing message, whether the session's fan-out or the reader's own reply, goes
//! through the outbox, so order is kept and the writer is the only one touching the sink.
//! The writer also owns the liveness traffic (pings, the whiteboard keep-alive) and every
//! close: the reader asks for a close with a code; the writer sends it. This module knows
//! nothing of Yjs or chat: the endpoints in [`whiteboard`] and [`tutor`] do.
//!
//! Closing follows RFC 6455 5.5.1 on both endpoints:
//! - A close the server decides on (1008, 1009, 1011, 1013, 4401, 1012, ...) stops the
//!   queue taking more, writes what was queued before it, then sends the Close frame and
//!   waits briefly for the client's answer before the TCP connection ends.
//! - A client's Close is answered with a Close frame echoing its code (the writer sends it
//!   after whatever was queued before the reader read the Close; no data follows it).
//!   The reader does not wait for the writer between frames: a client that writes while
//!   its queue is still being written (every writer of a busy board) is read at once.
//!
//! A handler that must wait (rate-limit back-pressure, a store read, a paged reply) returns
//! [`Flow::RetryAfter`] or [`Flow::Then`]; the reader then reads no further frame until the
//! wait is over, but keeps watching the token's expiry, the writer and the shutdown.
//!
//! - A frame the [`socket`] refuses closes with the code it names (1002, 1007); a message
//!   over the size limit with 1009, and the reader reads on (skipping that message) so the
//!   client's answer is read rather than reset. A client's Ping is answered by the writer.
//!
//! Admission (who may upgrade) is [`upgrade`]'s; the framing and permessage-deflate are
//! [`socket`]'s and `deflate`'s; every close code is in [`close`]. This
//! module must not touch session state or the store: the handlers do, on the reader task.

pub mod close;
pub(crate) mod deflate;
mod frames;
pub mod outbox;
pub mod socket;
pub mod tutor;
pub mod upgrade;
pub mod whiteboard;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::limits::ConnectionPermit;
use crate::metrics::{Endpoint, EndpointMetrics};
use crate::session::whiteboard::ConnId;
use close::Close;
use outbox::OutboxReceiver;
use socket::{Io, SocketError};

/// The two halves of an upgraded connection's WebSocket.
pub type SocketReader = socket::Reader<ReadHalf<Io>>;
pub type SocketWriter = socket::Writer<WriteHalf<Io>>;

/// Longer than any connection lives; `Instant + Duration::MAX` would overflow.
const FAR_FUTURE: Duration = Duration::from_secs(10 * 365 * 86_400);

/// How long a closing connection may take to write what was queued before its Close frame.
/// A client that reads nothing in that time loses the rest (it would have to resync anyway).
const CLOSE_DRAIN: Duration = Duration::from_secs(5);

/// How long the client has to answer the server's Close frame before the TCP connection ends.
const CLOSE_ANSWER: Duration = Duration::from_secs(2);

/// Work a handler hands back to the reader: awaited before the next frame is read.
pub type FlowFuture = Pin<Box<dyn Future<Output = Flow> + Send>>;

/// What the reader does after a frame.
pub enum Flow {
    Continue,
    /// Come back with the same frame after this long (rate limit back-pressure). The handler
    /// keeps track of how far into the frame it got.
    RetryAfter(Duration),
    /// Await this, then go on with its outcome (a `RetryAfter` then retries the same frame).
    Then(FlowFuture),
    Close(Close),
}

/// An endpoint's handling of incoming frames. Handlers run on the reader task and must not
/// block: anything slow (a store read, waiting for the send queue, a whiteboard update's
/// outcome from the session's sequencer) goes into a [`Flow::Then`].
pub trait FrameHandler: Send {
    /// Runs once before the first frame is read (e.g. the tutor endpoint's history pages).
    fn on_start(&mut self) -> Flow {
        Flow::Continue
    }
    fn on_frame(&mut self, frame: &Message) -> Flow;
    /// Work the handler started without making the reader wait (the whiteboard's updates
    /// in flight): polled with every read, `Ready` with what its outcome calls for (a close).
    fn poll_in_flight(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Flow> {
        std::task::Poll::Pending
    }
    /// The connection is over; leave the session.
    fn on_close(&mut self);
    /// Adds what the handler counted locally to the shared metrics: called when the
    /// reader's own counts go (see `ReadCounts`), so a handler need not touch a shared
    /// counter per frame.
    fn flush_counters(&mut self) {}
}

/// Frames and bytes read but not yet added to the endpoint's shared counters. Like the
/// writer's per-batch counts: every connection shares those counters, and an atomic add
/// per frame made the cores take turns on their cache line. Flushed when the reader has
/// nothing more to read at once (the end of a burst), every [`ReadCounts::FLUSH_EVERY`]
/// frames of a longer one, when the reader starts to wait on its handler, and at close.
#[derive(Default)]
struct ReadCounts {
    frames: u64,
    bytes: u64,
}

impl ReadCounts {
    /// Most frames held back from the shared counters during a burst.
    const FLUSH_EVERY: u64 = 64;

    fn add(&mut self, len: usize) -> bool {
        self.frames += 1;
        self.bytes += len as u64;
        self.frames >= Self::FLUSH_EVERY
    }

    fn flush(&mut self, metrics: &EndpointMetrics, handler: &mut impl FrameHandler) {
        if self.frames > 0 {
            metrics.frames_in.inc_by(self.frames);
            metrics.bytes_in.inc_by(self.bytes);
            *self = Self::default();
            handler.flush_counters();
        }
    }
}

/// Everything a connection holds while it lives.
pub struct Connection {
    pub id: ConnId,
    pub endpoint: Endpoint,
    pub session: Arc<str>,
    pub user: String,
    /// Holds the connection's place under the caps until the connection is over.
    pub permit: ConnectionPermit,
    /// Keeps shutdown waiting until the connection is over (see [`DrainGuard`]).
    pub drain: Option<DrainGuard>,
    pub token_expires: SystemTime,
    /// What the session and the handler queue for this connection.
    pub outbox: OutboxReceiver,
    pub timing: Timing,
    pub metrics: EndpointMetrics,
    pub shutdown: watch::Receiver<bool>,
    pub max_frame_bytes: usize,
    /// The session's removed users (SPEC 4.1): the connection closes with 4403 when its
    /// user is among them.
    pub removed: watch::Receiver<crate::session::tutor::RemovedUsers>,
    /// Whether the user came as an admin: only an admin's removal closes it.
    pub admin: bool,
}

/// A connection's hold on shutdown: a clone of the sender whose every copy shutdown waits
/// to see dropped (`recv()` on its receiver returning `None`), instead of polling a count.
pub struct DrainGuard {
    _held: mpsc::Sender<()>,
}

impl DrainGuard {
    pub fn new(sender: mpsc::Sender<()>) -> Self {
        Self { _held: sender }
    }
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

/// What the reader tells the writer, once.
enum WriterCmd {
    /// The server closes: write what is queued, then this Close frame.
    Close(Close),
    /// The client sent a Close: answer it, echoing its code (RFC 6455 5.5.1), and stop.
    PeerClosed(Option<CloseFrame>),
}

/// What the reader is waiting on instead of reading the next frame.
enum Work {
    /// Call the handler again with the frame at this time.
    Retry(Instant),
    Run(FlowFuture),
}

impl Work {
    /// `None`: call the handler again with the frame; `Some`: the awaited outcome.
    /// Cancel-safe: the select loop may drop this future and poll a new one later.
    async fn wait(&mut self) -> Option<Flow> {
        match self {
            Work::Retry(at) => {
                // A retry due now (a whiteboard frame resuming after the sequencer's
                // outcome) goes on at once: the timer wheel would round it up to a tick.
                if *at > Instant::now() {
                    tokio::time::sleep_until(*at).await;
                }
                None
            }
            Work::Run(fut) => Some(fut.as_mut().await),
        }
    }
}

/// The reader's side of closing: asks the writer at most once.
struct Closer {
    cmd_tx: Option<oneshot::Sender<WriterCmd>>,
    /// The close the server asked for, if any.
    asked: Option<Close>,
    /// Once the server asked for a close, the reader gives up at this time.
    deadline: Instant,
}

impl Closer {
    fn ask(&mut self, close: Close) {
        if let Some(tx) = self.cmd_tx.take() {
            let _ = tx.send(WriterCmd::Close(close.clone()));
            self.asked = Some(close);
            self.deadline = Instant::now() + CLOSE_DRAIN + CLOSE_ANSWER;
        }
    }
}

/// Applies a handler's answer for `frame` (`None`: the start-up work).
fn settle(
    flow: Flow,
    frame: Option<Message>,
    work: &mut Option<(Option<Message>, Work)>,
    closer: &mut Closer,
) {
    *work = match flow {
        Flow::Continue => None,
        Flow::RetryAfter(d) => frame.map(|f| (Some(f), Work::Retry(Instant::now() + d))),
        Flow::Then(fut) => Some((frame, Work::Run(fut))),
        Flow::Close(c) => {
            closer.ask(c);
            None
        }
    };
}

/// What the reader finds next: a frame (or the end of the stream), or what the handler's
/// work in flight calls for.
enum Next {
    Frame(Option<Result<Message, SocketError>>),
    InFlight(Flow),
}

/// Reads the next frame, watching the handler's work in flight meanwhile. When no frame is
/// ready, the counts held back so far go to the shared counters first.
async fn next_frame(
    stream: &mut SocketReader,
    counts: &mut ReadCounts,
    metrics: &EndpointMetrics,
    handler: &mut impl FrameHandler,
) -> Next {
    let mut next = std::pin::pin!(stream.next());
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(flow) = handler.poll_in_flight(cx) {
            return std::task::Poll::Ready(Next::InFlight(flow));
        }
        match next.as_mut().poll(cx) {
            std::task::Poll::Ready(frame) => std::task::Poll::Ready(Next::Frame(frame)),
            std::task::Poll::Pending => {
                counts.flush(metrics, handler);
                std::task::Poll::Pending
            }
        }
    })
    .await
}

/// Runs a connection until either side closes it.
///
/// Not an `async fn`: its arguments would be kept in the connection's state for its whole
/// life beside the copies the body moves them into (about a kilobyte of each idle
/// connection). The set-up runs here; the returned future only ever uses what it captured
/// in place.
pub fn run(
    (mut stream, sink): (SocketReader, SocketWriter),
    conn: Connection,
    mut handler: impl FrameHandler,
) -> impl Future<Output = ()> + Send {
    let Connection {
        id,
        endpoint,
        session,
        user,
        permit,
        drain,
        token_expires,
        outbox,
        timing,
        metrics,
        shutdown,
        max_frame_bytes,
        mut removed,
        admin,
    } = conn;
    // The reader hands the client's pings to the writer, which alone writes.
    let (pong_tx, pong_rx) = watch::channel(Pings::default());
    // A oneshot, not a channel: the writer is told at most once, and an idle connection
    // should not carry a channel's preallocated block (about 1 KiB).
    let (cmd_tx, cmd_rx) = oneshot::channel::<WriterCmd>();
    let progress = outbox.progress();
    // The writer watches these too, but not while it is stuck writing to a client that
    // does not read: then only the reader can end the connection.
    let overflow = outbox.overflow_signal();
    let mut stopping_rx = shutdown.clone();
    metrics.connections.inc();
    let mut writer = tokio::spawn(write_loop(
        sink,
        outbox,
        cmd_rx,
        pong_rx,
        shutdown,
        timing,
        metrics.clone(),
    ));

    let expiry = Instant::now()
        + token_expires
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .min(FAR_FUTURE);
    async move {
        let mut last_heard = Instant::now();
        let mut written_seen = progress.written_count();
        let mut closer = Closer {
            cmd_tx: Some(cmd_tx),
            asked: None,
            deadline: Instant::now() + FAR_FUTURE,
        };
        let mut writer_result: Option<Option<Close>> = None;
        let mut client_closed = false;
        let mut peer_close: Option<CloseFrame> = None;
        // The frame being handled when the handler asked to wait, and what it waits on.
        let mut work: Option<(Option<Message>, Work)> = None;
        let mut counts = ReadCounts::default();
        settle(handler.on_start(), None, &mut work, &mut closer);
        // Made once, not per frame (each wait would register and unregister itself on every
        // frame read): what makes the server close, and one timer for the reader's deadlines,
        // moved only when it fires or a close brings its deadline nearer.
        // Polled only when one of them fired (see `WhenWoken`), not on every frame read.
        let mut signals = WhenWoken::new(async {
            tokio::select! {
                _ = overflow.overflowed() => Close::queue_full(),
                _ = removed_from_session(&mut removed, &user, admin) => Close::removed(),
                _ = stopping(&mut stopping_rx) => Close::restart(),
            }
        });
        // When the timer is set for; past the next deadline it is moved back to it below.
        let mut armed = Instant::now() + FAR_FUTURE;
        let timer = tokio::time::sleep_until(armed);
        tokio::pin!(timer);

        'read: loop {
            let due = match closer.asked {
                Some(_) => closer.deadline,
                None => expiry.min(last_heard + timing.idle_timeout),
            };
            if due < armed {
                armed = due;
                timer.as_mut().reset(due);
            }
            tokio::select! {
                next = next_frame(&mut stream, &mut counts, &metrics, &mut handler), if work.is_none() => {
                    let frame = match next {
                        Next::InFlight(flow) => {
                            settle(flow, None, &mut work, &mut closer);
                            continue;
                        }
                        Next::Frame(frame) => frame,
                    };
                    let frame = match frame {
                        Some(Ok(f)) => f,
                        Some(Err(e)) => {
                            match (&e, e.close_code()) {
                                (SocketError::TooBig(_), _) => {
                                    // The reader skips the rest of that message: read on, so
                                    // the client's answer to our Close is read, not reset.
                                    closer.ask(Close::new(close::TOO_BIG, "frame too large"));
                                    continue;
                                }
                                (_, Some(code)) => {
                                    tracing::debug!(conn = id, error = %e, "protocol error");
                                    closer.ask(Close::new(code, e.to_string()));
                                }
                                (_, None) => tracing::debug!(conn = id, error = %e, "read error"),
                            }
                            break 'read;
                        }
                        None => { client_closed = closer.asked.is_none(); break 'read; }
                    };
                    last_heard = Instant::now();
                    let compressed = stream.take_compressed_bytes();
                    if compressed > 0 {
                        metrics.compressed_bytes_in.inc_by(compressed);
                    }
                    if let Message::Close(c) = frame {
                        // An answer to our Close, or the client's own: either way the reading
                        // is over. The writer echoes a client's Close.
                        client_closed = closer.asked.is_none();
                        peer_close = c;
                        break 'read;
                    }
                    if let Message::Ping(p) = frame {
                        if closer.asked.is_none() {
                            pong_tx.send_modify(|pings| pings.push(p));
                        }
                        continue;
                    }
                    if closer.asked.is_some() {
                        continue; // closing: discard what is still in flight
                    }
                    let len = match &frame {
                        Message::Binary(b) => b.len(),
                        Message::Text(t) => t.len(),
                        _ => continue,
                    };
                    if counts.add(len) {
                        counts.flush(&metrics, &mut handler);
                    }
                    if len > max_frame_bytes {
                        closer.ask(Close::new(close::TOO_BIG, "frame too large"));
                        continue;
                    }
                    let flow = handler.on_frame(&frame);
                    settle(flow, Some(frame), &mut work, &mut closer);
                    if work.is_some() {
                        // The reader waits now; the counts should not wait with it.
                        counts.flush(&metrics, &mut handler);
                    }
                }
                outcome = async { match work.as_mut() { Some((_, w)) => w.wait().await, None => std::future::pending().await } }, if work.is_some() => {
                    let frame = work.take().and_then(|(f, _)| f);
                    let flow = match (outcome, &frame) {
                        (Some(flow), _) => flow,
                        (None, Some(f)) => handler.on_frame(f),
                        (None, None) => Flow::Continue,
                    };
                    settle(flow, frame, &mut work, &mut closer);
                    if work.is_none() {
                        // The client was not read while it waited: do not count that as silence.
                        last_heard = Instant::now();
                    }
                }
                close = &mut signals, if closer.asked.is_none() => {
                    work = None;
                    closer.ask(close);
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if closer.asked.is_some() {
                        if now >= closer.deadline {
                            break 'read;
                        }
                    } else if now >= expiry {
                        work = None;
                        closer.ask(Close::new(close::TOKEN_EXPIRED, "token expired"));
                    } else if now >= last_heard + timing.idle_timeout {
                        // While the handler's work is pending the client is not read: it counts
                        // as alive as long as the writer gets something to it.
                        let written = progress.written_count();
                        if work.is_some() && written != written_seen {
                            written_seen = written;
                            last_heard = now;
                        } else {
                            closer.ask(Close::new(close::GOING_AWAY, "idle timeout"));
                        }
                    }
                    // Fired: set again at the top of the loop, for whatever is due next.
                    armed = Instant::now() + FAR_FUTURE;
                }
                res = &mut writer => {
                    writer_result = Some(res.ok().flatten());
                    break 'read;
                }
            }
        }
        drop(work);

        counts.flush(&metrics, &mut handler);
        handler.on_close();
        let sent = match writer_result {
            Some(sent) => sent,
            None if client_closed => {
                if let Some(tx) = closer.cmd_tx.take() {
                    let _ = tx.send(WriterCmd::PeerClosed(peer_close.take()));
                }
                let sent = tokio::time::timeout(CLOSE_ANSWER, &mut writer)
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .flatten();
                sent
            }
            None => {
                closer.ask(Close::new(close::GOING_AWAY, "connection ended"));
                tokio::time::timeout(CLOSE_DRAIN, &mut writer)
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .flatten()
            }
        };
        writer.abort();
        if !client_closed && sent.is_some() {
            // Give the client a moment to answer our Close, so the socket is not reset under
            // a Close frame it has not read yet.
            let _ = tokio::time::timeout(CLOSE_ANSWER, async {
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
        if let Some(code) = code {
            metrics.closed(code);
        }
        let reason = sent
            .as_ref()
            .map(|c| c.reason.as_str())
            .unwrap_or("client closed");
        tracing::info!(
            conn = id,
            endpoint = endpoint.as_str(),
            session = %session,
            user = %user,
            code,
            reason,
            "connection closed"
        );
        drop(permit);
        // Last: once every connection's guard is gone, shutdown goes on to the final save.
        drop(drain);
    }
}

/// Resolves when `user` is among the session's removed users with a ban still running.
/// Cancel-safe: it looks at the current value first on every poll.
async fn removed_from_session(
    removed: &mut watch::Receiver<crate::session::tutor::RemovedUsers>,
    user: &str,
    admin: bool,
) {
    loop {
        let now = crate::session::tutor::now_ms();
        if removed
            .borrow_and_update()
            .get(user)
            .is_some_and(|&(until, by_admin)| until > now && (!admin || by_admin))
        {
            return;
        }
        if removed.changed().await.is_err() {
            // The session is gone: nobody can be removed from it any more.
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves when the server starts shutting down (or is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // Drop the borrow guard at once: it must not live across an await.
    let _ = shutdown.wait_for(|stop| *stop).await.is_ok();
}

fn payload_len(m: &Message) -> usize {
    match m {
        Message::Binary(b) => b.len(),
        Message::Text(t) => t.len(),
        _ => 0,
    }
}

/// Writes what the queue holds, for a writer about to send its Close frame (the queue
/// takes nothing more: `start_closing` came first).
async fn write_queued(
    sink: &mut SocketWriter,
    outbox: &mut OutboxReceiver,
    metrics: &EndpointMetrics,
) -> Result<(), SocketError> {
    let (mut n, mut bytes) = (0u64, 0u64);
    while let Some(m) = outbox.try_recv() {
        bytes += payload_len(&m) as u64;
        let fed = sink.feed(m).await;
        outbox.mark_written(1);
        fed?;
        n += 1;
    }
    metrics.frames_out.inc_by(n);
    metrics.bytes_out.inc_by(bytes);
    Ok(())
}

/// What interrupts the writer's data path: the reader's command, an overflow, shutdown or
/// a Ping to answer.
enum Control {
    Cmd(Result<WriterCmd, oneshot::error::RecvError>),
    Overflow,
    Stop,
    Pong,
}

/// Waits for the first [`Control`]. The writer keeps one of these pinned while it writes
/// batch after batch, making a new one only after it fired: made afresh for every batch,
/// each of its waits registered and unregistered itself on every message written.
async fn control(
    cmd_rx: &mut oneshot::Receiver<WriterCmd>,
    overflow: &outbox::OverflowSignal,
    shutdown: &mut watch::Receiver<bool>,
    pong_rx: &mut watch::Receiver<Pings>,
) -> Control {
    tokio::select! {
        biased;
        c = cmd_rx => Control::Cmd(c),
        _ = overflow.overflowed() => Control::Overflow,
        _ = stopping(shutdown) => Control::Stop,
        Ok(()) = pong_rx.changed() => Control::Pong,
    }
}

/// Polls a future only when it woke its task itself, or on the first poll.
///
/// The writer waits on its messages and on its rare [`Control`]s together (the reader on its
/// frames and on the signals that close the connection), and `select!` polls every branch
/// whenever the task wakes: each poll of the control future would take the locks of three
/// `Notify`s (one of them shared by every connection: the shutdown signal's), once per batch
/// written to every receiver of a busy board. Here the rare future gets a waker of its own
/// that records that it fired, and is polled only then.
struct WhenWoken<F> {
    inner: Pin<Box<F>>,
    flag: Arc<WokeFlag>,
    waker: std::task::Waker,
}

/// Set by the inner future's waker; the task to wake with it.
struct WokeFlag {
    woke: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for WokeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.store(true, std::sync::atomic::Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WhenWoken<F> {
    fn new(inner: F) -> Self {
        let flag = Arc::new(WokeFlag {
            // The first poll registers the inner future's waits.
            woke: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        });
        Self {
            inner: Box::pin(inner),
            waker: std::task::Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        // Registered before the flag is read: a wake between the two is not lost.
        self.flag.task.register(cx.waker());
        if !self
            .flag
            .woke
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return std::task::Poll::Pending;
        }
        let this = &mut *self;
        this.inner
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&this.waker))
    }
}

/// Most pings held for the writer to answer. RFC 6455 5.5.3 lets a server answer only the
/// latest of the pings it has not answered yet; clients (and the Autobahn testsuite's case
/// 2.10) expect a pong for each, so the latest few are kept. Bounded: a client that sends
/// pings and reads nothing holds at most this many payloads (125 bytes each) here.
const PINGS_HELD: usize = 16;

/// The client's latest pings, from the reader to the writer (through a `watch`, which the
/// writer already polls: no channel's preallocated block on every idle connection). Empty
/// until the client's first ping; answered ones stay until newer ones push them out.
#[derive(Default)]
struct Pings {
    /// Pings read so far.
    read: u64,
    /// The payloads of the latest ones (at most [`PINGS_HELD`]), oldest first.
    latest: std::collections::VecDeque<bytes::Bytes>,
}

impl Pings {
    fn push(&mut self, payload: bytes::Bytes) {
        if self.latest.len() == PINGS_HELD {
            self.latest.pop_front();
        }
        self.latest.push_back(payload);
        self.read += 1;
    }

    /// The payloads of the pings read after the first `answered` that are still held.
    fn after(&self, answered: u64) -> impl Iterator<Item = &bytes::Bytes> {
        let held = self.latest.len();
        let new = usize::try_from(self.read.saturating_sub(answered)).map_or(held, |n| n.min(held));
        self.latest.iter().skip(held - new)
    }
}

/// The writer task. Not an `async fn`, for the reason [`run`] is not.
fn write_loop(
    mut sink: SocketWriter,
    mut outbox: OutboxReceiver,
    mut cmd_rx: oneshot::Receiver<WriterCmd>,
    mut pong_rx: watch::Receiver<Pings>,
    mut shutdown: watch::Receiver<bool>,
    timing: Timing,
    metrics: EndpointMetrics,
) -> impl Future<Output = Option<Close>> + Send {
    let overflow = outbox.overflow_signal();
    let keepalive_after = timing.keepalive.map(|(d, _)| d).unwrap_or(FAR_FUTURE);
    let mut next_ping = Instant::now() + timing.ping_interval;
    let mut last_sent = Instant::now();
    // Pings answered so far (see `Pings`).
    let mut answered = 0;
    async move {
        // One timer for the ping and the keep-alive, moved only when it fires (then it looks
        // at what is due): moving it after every batch written cost a trip to the timer wheel
        // per message.
        let timer = tokio::time::sleep_until(next_ping.min(last_sent + keepalive_after));
        tokio::pin!(timer);
        let close = loop {
            let interrupt = {
                let mut interrupt =
                    WhenWoken::new(control(&mut cmd_rx, &overflow, &mut shutdown, &mut pong_rx));
                loop {
                    tokio::select! {
                        biased;
                        c = &mut interrupt => break c,
                        m = outbox.recv() => {
                            let mut next = Some(m?);
                            let (mut n, mut bytes) = (0, 0);
                            while let Some(m) = next {
                                bytes += payload_len(&m);
                                let fed = sink.feed(m).await;
                                n += 1;
                                if fed.is_err() {
                                    outbox.mark_written(n);
                                    return None;
                                }
                                next = if n < timing.batch { outbox.try_recv() } else { None };
                            }
                            // Once per batch, like the counters below: each mark takes the
                            // progress signal's lock.
                            outbox.mark_written(n);
                            // Once per batch: these counters are shared by every connection, and an
                            // atomic add per frame made the two cores take turns on their cache line.
                            metrics.frames_out.inc_by(n as u64);
                            metrics.bytes_out.inc_by(bytes as u64);
                            let compressed = sink.take_compressed_bytes();
                            if compressed > 0 {
                                metrics.compressed_bytes_out.inc_by(compressed);
                            }
                            if sink.flush().await.is_err() {
                                return None;
                            }
                            last_sent = Instant::now();
                        }
                        () = &mut timer => {
                            let now = Instant::now();
                            if let Some((_, frame)) = timing.keepalive.filter(|_| now >= last_sent + keepalive_after) {
                                if sink.send(Message::Binary(bytes::Bytes::from_static(frame))).await.is_err() {
                                    return None;
                                }
                                metrics.frames_out.inc();
                                last_sent = now;
                            }
                            if now >= next_ping {
                                if sink.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                                    return None;
                                }
                                next_ping = now + timing.ping_interval;
                            }
                            timer.as_mut().reset(next_ping.min(last_sent + keepalive_after));
                        }
                    }
                }
            };
            match interrupt {
                Control::Cmd(Ok(WriterCmd::Close(c))) => break c,
                Control::Cmd(Ok(WriterCmd::PeerClosed(echo))) => {
                    // What was queued before the client's Close was read goes first.
                    outbox.start_closing();
                    let echo = echo.map(|c| CloseFrame {
                        code: c.code,
                        reason: Utf8Bytes::from_static(""),
                    });
                    let _ = tokio::time::timeout(CLOSE_ANSWER, async {
                        write_queued(&mut sink, &mut outbox, &metrics).await?;
                        sink.close(echo).await
                    })
                    .await;
                    return None;
                }
                Control::Cmd(Err(_)) => return None,
                Control::Overflow => break Close::queue_full(),
                Control::Stop => break Close::restart(),
                Control::Pong => {
                    let pongs: Vec<_> = {
                        let pings = pong_rx.borrow_and_update();
                        let unanswered = pings.after(answered).cloned().collect();
                        answered = pings.read;
                        unanswered
                    };
                    for p in pongs {
                        if sink.feed(Message::Pong(p)).await.is_err() {
                            return None;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return None;
                    }
                }
            }
        };
        // Whatever was queued before the close goes first; nothing queued after it does.
        outbox.start_closing();
        let frame = CloseFrame {
            code: close.code,
            reason: Utf8Bytes::from(close.reason.clone()),
        };
        let finished = tokio::time::timeout(CLOSE_DRAIN, async {
            write_queued(&mut sink, &mut outbox, &metrics).await?;
            sink.close(Some(frame)).await
        })
        .await;
        match finished {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(code = close.code, error = %e, "close frame not sent"),
            Err(_) => tracing::info!(
                code = close.code,
                "close frame not sent: the client read nothing for {CLOSE_DRAIN:?}"
            ),
        }
        Some(close)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_keep_the_latest_sixteen_and_hand_out_only_new_ones() {
        let mut pings = Pings::default();
        let payload = |i: usize| bytes::Bytes::from(format!("p{i}"));
        for i in 0..20 {
            pings.push(payload(i));
        }
        // A writer that answered none: the oldest four are gone, the rest come in order.
        let held: Vec<_> = pings.after(0).cloned().collect();
        assert_eq!(held, (4..20).map(payload).collect::<Vec<_>>());
        // One that answered 18: only the last two.
        let new: Vec<_> = pings.after(18).cloned().collect();
        assert_eq!(new, vec![payload(18), payload(19)]);
        assert_eq!(pings.after(20).count(), 0);
    }
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::task::{Context, Poll, Waker};

    /// A waker that counts its wakes.
    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }

    #[test]
    fn a_future_polled_when_woken_is_polled_only_after_its_own_wake() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let inner_waker: Arc<Mutex<Option<Waker>>> = Arc::default();
        let inner = {
            let (polls, ready, inner_waker) = (polls.clone(), ready.clone(), inner_waker.clone());
            std::future::poll_fn(move |cx| {
                polls.fetch_add(1, Ordering::AcqRel);
                *inner_waker.lock().unwrap() = Some(cx.waker().clone());
                if ready.load(Ordering::Acquire) {
                    Poll::Ready(7)
                } else {
                    Poll::Pending
                }
            })
        };
        let mut guarded = WhenWoken::new(inner);
        let task = Arc::new(Count(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);

        // The first poll reaches the inner future, so that it registers its waits.
        assert!(Pin::new(&mut guarded).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Acquire), 1);
        // Polls for other reasons (the task woken by its messages) do not.
        for _ in 0..5 {
            assert!(Pin::new(&mut guarded).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Acquire), 1);
        // The inner future's own wake wakes the task, and the next poll reaches it.
        ready.store(true, Ordering::Release);
        inner_waker
            .lock()
            .unwrap()
            .take()
            .expect("registered")
            .wake();
        assert_eq!(task.0.load(Ordering::Acquire), 1, "the task was woken");
        assert_eq!(Pin::new(&mut guarded).poll(&mut cx), Poll::Ready(7));
        assert_eq!(polls.load(Ordering::Acquire), 2);
    }
}
