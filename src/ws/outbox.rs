//! A connection's outgoing queue, bounded in bytes.
//!
//! Sessions fan a message out by pushing the same `Message` (its `Bytes` shared, never
//! copied) into every receiver's [`Outbox`]; each connection's writer task drains its own
//! [`OutboxReceiver`] into its socket. Pushing never waits, so one slow reader never delays
//! the others; a queue that would pass its byte limit is marked overflowed instead of
//! dropping anything, and the writer closes that connection with 1013 so the client
//! reconnects and resyncs. Nothing in this module knows about sessions or protocols.
//!
//! The queue also counts messages pushed and messages the writer has handed to the socket,
//! so that others can wait until everything queued so far is written: paged replies (chat
//! history) wait for their previous page instead of filling the queue, and an idle check
//! counts a writer that makes progress as a live connection. Once the writer starts
//! closing, the queue takes nothing more, so draining it ends.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::sync;
use axum::extract::ws::Message;
use tokio::sync::Notify;

/// A plain queue under a briefly held lock rather than a tokio channel: an empty
/// `VecDeque` allocates nothing, where a channel preallocates a block of 32 slots (about
/// 1.3 KiB for every idle connection), and the writer takes its batch under one lock.
struct Shared {
    /// Each message with whether it holds the reply place (see [`Outbox::send_reply`]).
    queue: Mutex<VecDeque<(Message, bool)>>,
    /// A reply holds the place outside the byte limit.
    reply_queued: AtomicBool,
    /// Wakes the writer: a message was queued, or the last sender went away.
    ready: Notify,
    /// Live [`Outbox`] handles; at 0 the writer ends once the queue is drained.
    senders: AtomicUsize,
    /// The writer is gone: nothing more is queued.
    closed: AtomicBool,
    queued_bytes: AtomicUsize,
    limit: usize,
    overflowed: AtomicBool,
    /// Wakes every waiter: the reader and the writer both watch it, and the writer's wait
    /// stays registered while it is stuck writing (a `notify_one` could wake only that one).
    overflow: Notify,
    /// Messages ever queued, and messages the writer has handed to the socket; the queue
    /// is FIFO, so `written >= n` means the first `n` are all written.
    pushed: AtomicU64,
    written: AtomicU64,
    /// Wakes whoever waits for `written` to catch up (and for the writer's end).
    progress: Notify,
    /// The writer is closing the connection: nothing more is queued.
    closing: AtomicBool,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, VecDeque<(Message, bool)>> {
        // Nothing panics while holding this lock; recover the queue if something ever did.
        sync::lock(&self.queue)
    }

    /// Waits until every message queued before the call is written, or the writer is gone.
    async fn written_so_far(&self) {
        let target = self.pushed.load(Ordering::Acquire);
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            // Registered before the check, so a wake-up between the two is not lost.
            notified.as_mut().enable();
            if self.written.load(Ordering::Acquire) >= target || self.closed.load(Ordering::Acquire)
            {
                return;
            }
            notified.await;
        }
    }
}

/// The sending side; cheap to clone into a session's list of peers.
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The writer's side.
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

/// Creates a queue that holds at most `limit_bytes` of payload.
pub fn outbox(limit_bytes: usize) -> (Outbox, OutboxReceiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::new()),
        reply_queued: AtomicBool::new(false),
        ready: Notify::new(),
        senders: AtomicUsize::new(1),
        closed: AtomicBool::new(false),
        queued_bytes: AtomicUsize::new(0),
        limit: limit_bytes,
        overflowed: AtomicBool::new(false),
        overflow: Notify::new(),
        pushed: AtomicU64::new(0),
        written: AtomicU64::new(0),
        progress: Notify::new(),
        closing: AtomicBool::new(false),
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        OutboxReceiver { shared },
    )
}

fn payload_len(m: &Message) -> usize {
    match m {
        Message::Binary(b) => b.len(),
        Message::Text(t) => t.len(),
        _ => 0,
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::AcqRel);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.ready.notify_one();
        }
    }
}

impl Outbox {
    /// Queues a message. Returns `false` when the connection is gone or has overflowed
    /// (its writer is closing it); the message is then not queued.
    pub fn send(&self, message: Message) -> bool {
        if !self.admit(&message) {
            return false;
        }
        self.push(message, false);
        true
    }

    /// Queues several messages in order, under one lock and with one wake-up of the
    /// writer (a sequencer's batch of updates: the writer then finds them all and writes
    /// them together). Stops at the first that does not fit, as [`Outbox::send`] would;
    /// returns whether all were queued.
    pub fn send_all<'a>(&self, messages: impl IntoIterator<Item = &'a Message>) -> bool {
        let mut all = true;
        let mut queued = 0;
        {
            let mut queue = self.shared.queue();
            for message in messages {
                if !self.admit(message) {
                    all = false;
                    break;
                }
                queue.push_back((message.clone(), false));
                queued += 1;
            }
            // Under the lock, so the count follows the queue's order.
            self.shared.pushed.fetch_add(queued, Ordering::AcqRel);
        }
        if queued > 0 {
            self.shared.ready.notify_one();
        }
        all
    }

    /// Counts `message` into the queue's bytes if the queue takes it; marks the queue
    /// overflowed (its writer then closes with 1013) if it would pass the limit.
    fn admit(&self, message: &Message) -> bool {
        if !self.is_open() {
            return false;
        }
        let len = payload_len(message);
        let before = self.shared.queued_bytes.fetch_add(len, Ordering::AcqRel);
        // An empty queue takes any one message; a backlog cannot grow past the limit. (A
        // step 2 larger than the limit goes through `send_reply`, whatever is queued.)
        if before > 0 && before + len > self.shared.limit {
            self.shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.overflow();
            return false;
        }
        true
    }

    fn push(&self, message: Message, reply: bool) {
        {
            let mut queue = self.shared.queue();
            queue.push_back((message, reply));
            // Under the lock, so the count follows the queue's order.
            self.shared.pushed.fetch_add(1, Ordering::AcqRel);
        }
        self.shared.ready.notify_one();
    }

    /// Queues a reply the client asked for (sync step 2: up to the whole document) in the
    /// queue's one place outside its byte limit, if that place is free; otherwise like
    /// [`Outbox::send`]. A board larger than the limit is then joined whatever is queued
    /// before its step 2 (the greeting, the session's updates), and the updates queued
    /// behind it are not refused for its size. The queue so holds at most its limit plus
    /// one reply; a client asking again before its last reply is written is bounded as
    /// usual. Returns what [`Outbox::send`] returns.
    pub fn send_reply(&self, message: Message) -> bool {
        if !self.is_open() {
            return false;
        }
        if self
            .shared
            .reply_queued
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return self.send(message);
        }
        self.push(message, true);
        true
    }

    /// The most bytes the queue holds.
    pub fn limit(&self) -> usize {
        self.shared.limit
    }

    /// Marks the queue overflowed, as a send past its limit would: its writer closes the
    /// connection with 1013. For a sender that holds messages back for the connection and
    /// finds them over the limit.
    pub fn overflow(&self) {
        self.shared.overflowed.store(true, Ordering::Release);
        self.shared.overflow.notify_waiters();
    }

    /// Whether the connection still takes messages (not closing, not overflowed, not gone).
    pub fn is_open(&self) -> bool {
        !(self.shared.overflowed.load(Ordering::Relaxed)
            || self.shared.closed.load(Ordering::Acquire)
            || self.shared.closing.load(Ordering::Acquire))
    }

    /// Waits until everything queued so far is written to the socket (or the connection is
    /// gone): a sender of many large messages sends the next one only then, so the queue
    /// holds one of them at a time instead of overflowing.
    pub async fn written(&self) {
        self.shared.written_so_far().await
    }
}

impl OutboxReceiver {
    /// The next message, `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Message> {
        loop {
            if let Some(m) = self.try_recv() {
                return Some(m);
            }
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                return None;
            }
            // `notify_one` leaves a permit when nobody waits, so a message queued since
            // `try_recv` wakes this at once.
            self.shared.ready.notified().await;
        }
    }

    /// A message that is ready now, without waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        let (m, reply) = self.shared.queue().pop_front()?;
        if reply {
            self.shared.reply_queued.store(false, Ordering::Release);
        } else {
            self.shared
                .queued_bytes
                .fetch_sub(payload_len(&m), Ordering::AcqRel);
        }
        Some(m)
    }

    /// A handle that tells when a sender found the queue over its limit.
    pub fn overflow_signal(&self) -> OverflowSignal {
        OverflowSignal(self.shared.clone())
    }

    /// A handle that waits for the writer to catch up, without holding the queue open.
    pub fn progress(&self) -> Progress {
        Progress(self.shared.clone())
    }

    /// Records that `n` more messages taken from the queue are handed to the socket.
    pub fn mark_written(&self, n: usize) {
        self.shared.written.fetch_add(n as u64, Ordering::AcqRel);
        self.shared.progress.notify_waiters();
    }

    /// The connection is closing: refuse whatever is queued from now on, so that draining
    /// what is already there ends.
    pub fn start_closing(&self) {
        self.shared.closing.store(true, Ordering::Release);
    }
}

/// Waits for the writer to catch up with the queue; does not count as a sender.
pub struct Progress(Arc<Shared>);

impl Progress {
    /// Waits until every message queued before the call is written, or the writer is gone.
    pub async fn written(&self) {
        self.0.written_so_far().await
    }

    /// How many messages the writer has handed to the socket so far.
    pub fn written_count(&self) -> u64 {
        self.0.written.load(Ordering::Acquire)
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        // Senders may outlive the writer for a moment (a session fanning out): refuse
        // their messages and free what was queued.
        self.shared.closed.store(true, Ordering::Release);
        self.shared.queue().clear();
        self.shared.progress.notify_waiters();
    }
}

/// Waits for a queue's overflow, apart from the receiver so both can be polled at once.
pub struct OverflowSignal(Arc<Shared>);

impl OverflowSignal {
    /// Resolves once a sender found the queue over its limit.
    pub async fn overflowed(&self) {
        loop {
            // Made before the check: `notify_waiters` reaches a `Notified` from its creation.
            let notified = self.0.overflow.notified();
            if self.0.overflowed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes of the messages ready now.
    fn ready_sizes(rx: &mut OutboxReceiver) -> Vec<usize> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|m| payload_len(&m))
            .collect()
    }

    /// A writer that collects the sizes of what it receives until every sender is gone.
    fn collecting_writer(mut rx: OutboxReceiver) -> tokio::task::JoinHandle<Vec<usize>> {
        tokio::spawn(async move {
            let mut sizes = Vec::new();
            while let Some(m) = rx.recv().await {
                sizes.push(payload_len(&m));
            }
            sizes
        })
    }

    #[tokio::test]
    async fn a_reply_larger_than_the_limit_joins_a_busy_queue() {
        let (tx, mut rx) = outbox(10);
        assert!(tx.send(Message::Binary(vec![0; 6].into())));
        // Larger than the whole limit, behind a queued message: takes the reply place.
        assert!(tx.send_reply(Message::Binary(vec![0; 25].into())));
        // Updates behind it are bounded by the limit alone, not refused for its size.
        assert!(tx.send(Message::Binary(vec![0; 4].into())));
        assert!(tx.is_open());
        // A second reply while the first waits is bounded as usual.
        assert!(!tx.send_reply(Message::Binary(vec![0; 25].into())));
        assert_eq!(ready_sizes(&mut rx), [6, 25, 4]);
    }

    #[tokio::test]
    async fn the_reply_place_is_free_again_once_written() {
        let (tx, mut rx) = outbox(10);
        assert!(tx.send_reply(Message::Binary(vec![0; 25].into())));
        assert_eq!(rx.try_recv().map(|m| payload_len(&m)), Some(25));
        assert!(tx.send(Message::Binary(vec![0; 6].into())));
        assert!(tx.send_reply(Message::Binary(vec![0; 25].into())));
        assert!(tx.is_open());
    }

    #[tokio::test]
    async fn overflow_marks_instead_of_dropping_silently() {
        let (tx, mut rx) = outbox(10);
        assert!(tx.send(Message::Binary(vec![0; 6].into())));
        assert!(!tx.send(Message::Binary(vec![0; 6].into())));
        // Once overflowed, nothing more is accepted, even what would fit.
        assert!(!tx.send(Message::Binary(vec![0; 1].into())));
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            rx.overflow_signal().overflowed(),
        )
        .await
        .unwrap();
        assert_eq!(payload_len(&rx.recv().await.unwrap()), 6);
    }

    #[tokio::test]
    async fn an_empty_queue_takes_one_oversized_message() {
        let (tx, mut rx) = outbox(10);
        assert!(tx.send(Message::Binary(vec![0; 50].into())));
        assert!(!tx.send(Message::Binary(vec![0; 1].into())));
        assert_eq!(payload_len(&rx.recv().await.unwrap()), 50);
    }

    #[tokio::test]
    async fn the_writer_ends_once_every_sender_is_gone_and_the_queue_is_drained() {
        let (tx, rx) = outbox(100);
        let second = tx.clone();
        assert!(tx.send(Message::Binary(vec![1].into())));
        drop(tx);
        assert!(second.send(Message::Binary(vec![2].into())));
        let waiting = collecting_writer(rx);
        drop(second);
        let got = tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, vec![1, 1]);
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_for_a_message() {
        let (tx, mut rx) = outbox(100);
        let waiting = tokio::spawn(async move { rx.recv().await.map(|m| payload_len(&m)) });
        tokio::task::yield_now().await;
        assert!(tx.send(Message::Binary(vec![0; 3].into())));
        let got = tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, Some(3));
    }

    #[test]
    fn nothing_is_queued_once_the_writer_is_gone() {
        let (tx, rx) = outbox(100);
        drop(rx);
        assert!(!tx.send(Message::Binary(vec![0; 3].into())));
    }

    #[tokio::test]
    async fn waiting_for_the_writer_ends_when_it_wrote_what_was_queued_before() {
        let (tx, mut rx) = outbox(100);
        let progress = rx.progress();
        assert!(tx.send(Message::Binary(vec![1].into())));
        assert!(tx.send(Message::Binary(vec![2].into())));
        let waiting = tokio::spawn(async move { progress.written().await });
        rx.try_recv().unwrap();
        rx.mark_written(1);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        rx.try_recv().unwrap();
        rx.mark_written(1);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_closing_queue_takes_nothing_more() {
        let (tx, rx) = outbox(100);
        assert!(tx.send(Message::Binary(vec![1].into())));
        rx.start_closing();
        assert!(!tx.is_open());
        assert!(!tx.send(Message::Binary(vec![2].into())));
        // Dropping the writer's side releases anyone waiting for it.
        drop(rx);
        tokio::time::timeout(std::time::Duration::from_secs(1), tx.written())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_overflow_wakes_every_waiter_even_one_that_is_not_polled() {
        let (tx, rx) = outbox(4);
        let (writer_side, reader_side) = (rx.overflow_signal(), rx.overflow_signal());
        // The writer's wait: polled once, then left registered while it is stuck writing.
        let stuck = writer_side.overflowed();
        tokio::pin!(stuck);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(std::future::Future::poll(stuck.as_mut(), &mut cx).is_pending());
        let reader = tokio::spawn(async move { reader_side.overflowed().await });
        tokio::task::yield_now().await;
        assert!(tx.send(Message::Binary(vec![0; 4].into())));
        assert!(
            !tx.send(Message::Binary(vec![0; 4].into())),
            "over the limit"
        );
        tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the reader's wait woke although the writer's was registered first")
            .expect("reader task");
        assert!(std::future::Future::poll(stuck.as_mut(), &mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_batch_is_queued_in_order_and_stops_at_the_limit() {
        let (tx, mut rx) = outbox(10);
        let batch: Vec<Message> = [3, 4, 2, 5, 1]
            .iter()
            .map(|n| Message::Binary(vec![0; *n].into()))
            .collect();
        // 3 + 4 + 2 fit; 5 would pass the limit: the queue overflows and takes no more.
        assert!(!tx.send_all(&batch));
        assert!(!tx.is_open());
        assert_eq!(ready_sizes(&mut rx), [3, 4, 2]);
        let (tx, rx) = outbox(100);
        assert!(tx.send_all(&batch));
        let writer = collecting_writer(rx);
        drop(tx);
        let sizes = tokio::time::timeout(std::time::Duration::from_secs(5), writer)
            .await
            .expect("the writer woke for the batch")
            .expect("writer task");
        assert_eq!(sizes, [3, 4, 2, 5, 1]);
    }

    #[tokio::test]
    async fn bytes_are_released_as_the_writer_drains() {
        let (tx, mut rx) = outbox(10);
        for _ in 0..5 {
            assert!(tx.send(Message::Binary(vec![0; 8].into())));
            rx.try_recv().unwrap();
        }
    }
}
