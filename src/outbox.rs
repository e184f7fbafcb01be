//! A connection's outgoing queue, bounded in bytes.
//!
//! Sessions fan a message out by pushing the same `Message` (its `Bytes` shared, never
//! copied) into every receiver's [`Outbox`]; each connection's writer task drains its own
//! [`OutboxReceiver`] into its socket. Pushing never waits, so one slow reader never delays
//! the others; a queue that would pass its byte limit is marked overflowed instead of
//! dropping anything, and the writer closes that connection with 1013 so the client
//! reconnects and resyncs. Nothing in this module knows about sessions or protocols.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::Message;
use tokio::sync::{mpsc, Notify};

struct Shared {
    queued_bytes: AtomicUsize,
    limit: usize,
    overflowed: AtomicBool,
    overflow: Notify,
}

/// The sending side; cheap to clone into a session's list of peers.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Message>,
    shared: Arc<Shared>,
}

/// The writer's side.
pub struct OutboxReceiver {
    rx: mpsc::UnboundedReceiver<Message>,
    shared: Arc<Shared>,
}

/// Creates a queue that holds at most `limit_bytes` of payload.
pub fn outbox(limit_bytes: usize) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        queued_bytes: AtomicUsize::new(0),
        limit: limit_bytes,
        overflowed: AtomicBool::new(false),
        overflow: Notify::new(),
    });
    (
        Outbox {
            tx,
            shared: shared.clone(),
        },
        OutboxReceiver { rx, shared },
    )
}

fn payload_len(m: &Message) -> usize {
    match m {
        Message::Binary(b) => b.len(),
        Message::Text(t) => t.len(),
        _ => 0,
    }
}

impl Outbox {
    /// Queues a message. Returns `false` when the connection is gone or has overflowed
    /// (its writer is closing it); the message is then not queued.
    pub fn send(&self, message: Message) -> bool {
        if self.shared.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        let len = payload_len(&message);
        let before = self.shared.queued_bytes.fetch_add(len, Ordering::AcqRel);
        // An empty queue takes any one message, so a document larger than the limit can
        // still be joined (its sync step 2 is one message); a backlog cannot grow past it.
        if before > 0 && before + len > self.shared.limit {
            self.shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.shared.overflowed.store(true, Ordering::Release);
            self.shared.overflow.notify_one();
            return false;
        }
        if self.tx.send(message).is_err() {
            self.shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }
}

impl OutboxReceiver {
    /// The next message, `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<Message> {
        let m = self.rx.recv().await?;
        self.release(&m);
        Some(m)
    }

    /// A message that is ready now, without waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        let m = self.rx.try_recv().ok()?;
        self.release(&m);
        Some(m)
    }

    fn release(&self, m: &Message) {
        self.shared
            .queued_bytes
            .fetch_sub(payload_len(m), Ordering::AcqRel);
    }

    /// A handle that tells when a sender found the queue over its limit.
    pub fn overflow_signal(&self) -> OverflowSignal {
        OverflowSignal(self.shared.clone())
    }
}

/// Waits for a queue's overflow, apart from the receiver so both can be polled at once.
pub struct OverflowSignal(Arc<Shared>);

impl OverflowSignal {
    /// Resolves once a sender found the queue over its limit.
    pub async fn overflowed(&self) {
        loop {
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
    async fn bytes_are_released_as_the_writer_drains() {
        let (tx, mut rx) = outbox(10);
        for _ in 0..5 {
            assert!(tx.send(Message::Binary(vec![0; 8].into())));
            rx.try_recv().unwrap();
        }
    }
}
