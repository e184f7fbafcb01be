//! The tutor (chat) client: JSON messages over a WebSocket.

use std::time::Duration;

use super::codec::short;
use super::server::TIMEOUT;
use super::ws::{ws_next, Ws, WsEvent};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

/// What a tutor client saw.
pub enum TutorEvent {
    Json(Value),
    Close(Option<u16>, String),
    End(String),
    Timeout,
}

/// By hand, not derived: the reasons are there to be shown when a test fails (no test
/// reads them otherwise).
impl std::fmt::Debug for TutorEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TutorEvent::Json(v) => write!(f, "Json({v})"),
            TutorEvent::Close(code, reason) => write!(f, "Close({code:?}, {reason:?})"),
            TutorEvent::End(why) => write!(f, "End({why})"),
            TutorEvent::Timeout => f.write_str("Timeout"),
        }
    }
}

pub struct TutorClient {
    pub ws: Ws,
    /// Every JSON message received so far.
    pub received: Vec<Value>,
    pub closed: Option<Option<u16>>,
}

impl TutorClient {
    pub fn new(ws: Ws) -> Self {
        TutorClient {
            ws,
            received: Vec::new(),
            closed: None,
        }
    }

    pub async fn send(&mut self, v: &Value) {
        self.ws
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .expect("send tutor message");
    }

    pub async fn send_raw_text(&mut self, s: &str) {
        self.ws
            .send(WsMessage::Text(s.into()))
            .await
            .expect("send text");
    }

    pub async fn try_send(&mut self, v: &Value) -> Result<(), tungstenite::Error> {
        self.ws.send(WsMessage::Text(v.to_string().into())).await
    }

    pub async fn next_event(&mut self, timeout: Duration) -> TutorEvent {
        if let Some(c) = self.closed {
            return TutorEvent::End(format!("already closed ({c:?})"));
        }
        match ws_next(&mut self.ws, timeout).await {
            WsEvent::Text(t) => {
                let v: Value = serde_json::from_str(&t)
                    .unwrap_or_else(|e| panic!("server sent non-JSON text {t:?}: {e}"));
                assert!(v.is_object(), "server sent a non-object JSON message: {t}");
                self.received.push(v.clone());
                TutorEvent::Json(v)
            }
            WsEvent::Binary(b) => panic!("tutor endpoint sent a binary frame: {}", short(&b)),
            WsEvent::Close(c, r) => {
                self.closed = Some(c);
                TutorEvent::Close(c, r)
            }
            WsEvent::End(e) => {
                self.closed = Some(None);
                TutorEvent::End(e)
            }
            WsEvent::Timeout => TutorEvent::Timeout,
        }
    }

    pub async fn next_json(&mut self) -> Value {
        match self.next_event(TIMEOUT).await {
            TutorEvent::Json(v) => v,
            other => panic!("expected a tutor message, got {other:?}"),
        }
    }

    pub async fn wait_for<F: FnMut(&Value) -> bool>(&mut self, what: &str, mut pred: F) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                TutorEvent::Json(v) => {
                    if pred(&v) {
                        return v;
                    }
                }
                TutorEvent::Timeout => panic!(
                    "timed out waiting for {what}; received so far: {:?}",
                    self.received
                ),
                other => panic!("while waiting for {what}: {other:?}"),
            }
        }
    }

    pub async fn wait_type(&mut self, ty: &str) -> Value {
        let t = ty.to_string();
        self.wait_for(&format!("a {ty:?} message"), move |v| {
            v["type"] == t.as_str()
        })
        .await
    }

    /// Sends a ping and waits for the pong; returns what arrived before the pong.
    pub async fn barrier(&mut self) -> Vec<Value> {
        let start = self.received.len();
        self.send(&json!({"type": "ping"})).await;
        self.wait_type("pong").await;
        let end = self.received.len() - 1;
        self.received[start..end].to_vec()
    }

    pub async fn expect_close(&mut self, timeout: Duration) -> Option<u16> {
        if let Some(c) = self.closed {
            return c;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                TutorEvent::Close(c, _) => return c,
                TutorEvent::End(_) => return None,
                TutorEvent::Timeout => panic!("tutor connection was not closed within {timeout:?}"),
                TutorEvent::Json(_) => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Sends a chat message and waits for its own acknowledgement (the broadcast back).
pub async fn chat(c: &mut TutorClient, text: &str) -> Value {
    c.send(&json!({"type":"chat","text":text})).await;
    let t = text.to_string();
    c.wait_for("own chat acknowledgement", move |v| {
        v["type"] == "chat" && v["text"] == t.as_str()
    })
    .await
}

/// Checks `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` (RFC 3339 date-time).
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        r.clone()
            .all(|i| b.get(i).is_some_and(|c| c.is_ascii_digit()))
    };
    if b.len() < 20 {
        return false;
    }
    if !(digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10)) {
        return false;
    }
    if !(b[10] == b'T' || b[10] == b't' || b[10] == b' ') {
        return false;
    }
    if !(digits(11..13) && b[13] == b':' && digits(14..16) && b[16] == b':' && digits(17..19)) {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(|c| c.is_ascii_digit()) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z') | Some(b'z') => i + 1 == b.len(),
        Some(b'+') | Some(b'-') => {
            i + 6 == b.len() && digits(i + 1..i + 3) && b[i + 3] == b':' && digits(i + 4..i + 6)
        }
        _ => false,
    }
}
