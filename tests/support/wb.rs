//! The whiteboard client: a WebSocket plus a local replica of the document.

use std::collections::VecDeque;
use std::time::Duration;

use super::codec::{awareness_msg, decode_frame, encode_msg, short};
use super::server::{TestServer, TIMEOUT};
use super::token::now_s;
use super::ws::{ws_next, Ws, WsEvent};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use yrs::sync::{AwarenessUpdate, Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, Map, ReadTxn, Text, Transact, Update};

/// What a whiteboard client saw.
pub enum WbEvent {
    /// One decoded message and the raw bytes of the frame it came in.
    Msg(Message, Vec<u8>),
    Text(String),
    Close(Option<u16>, String),
    End(String),
    Timeout,
}

/// By hand, not derived: the text, reasons and raw bytes are there to be shown when a test
/// fails (no test reads them otherwise), and a raw frame is shortened.
impl std::fmt::Debug for WbEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WbEvent::Msg(m, raw) => write!(f, "Msg({m:?}, frame {})", short(raw)),
            WbEvent::Text(t) => write!(f, "Text({t:?})"),
            WbEvent::Close(code, reason) => write!(f, "Close({code:?}, {reason:?})"),
            WbEvent::End(why) => write!(f, "End({why})"),
            WbEvent::Timeout => f.write_str("Timeout"),
        }
    }
}

pub struct WbClient {
    pub ws: Ws,
    /// Local replica: every received update is applied to it.
    pub doc: Doc,
    pending: VecDeque<(Message, Vec<u8>)>,
    /// Every message received so far, in order.
    pub received: Vec<Message>,
    /// The raw frame each entry of `received` came in.
    pub received_raw: Vec<Vec<u8>>,
    /// Frames from the server that carried more than one message (contract: one per frame).
    pub multi_message_frames: usize,
    /// Set once the connection is closed: Some(code) for a close frame, None for EOF/error.
    pub closed: Option<Option<u16>>,
}

impl WbClient {
    pub fn new(ws: Ws) -> Self {
        WbClient {
            ws,
            doc: Doc::new(),
            pending: VecDeque::new(),
            received: Vec::new(),
            received_raw: Vec::new(),
            multi_message_frames: 0,
            closed: None,
        }
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(WsMessage::Binary(bytes.into()))
            .await
            .expect("send binary frame");
    }

    /// Sends, but tolerates the server having closed already.
    pub async fn try_send_raw(&mut self, bytes: Vec<u8>) -> Result<(), tungstenite::Error> {
        self.ws.send(WsMessage::Binary(bytes.into())).await
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(WsMessage::Text(text.into()))
            .await
            .expect("send text frame");
    }

    pub async fn send_msg(&mut self, m: &Message) {
        self.send_raw(encode_msg(m)).await
    }

    pub async fn send_update(&mut self, update: Vec<u8>) {
        self.send_msg(&Message::Sync(SyncMessage::Update(update)))
            .await
    }

    pub async fn send_awareness(&mut self, u: &AwarenessUpdate) {
        self.send_raw(awareness_msg(u)).await
    }

    /// Runs `f` on the local doc and sends the resulting update; returns the update.
    pub async fn change<F: FnOnce(&Doc)>(&mut self, f: F) -> Vec<u8> {
        let sv = self.doc.transact().state_vector();
        f(&self.doc);
        let upd = self.doc.transact().encode_diff_v1(&sv);
        self.send_update(upd.clone()).await;
        upd
    }

    pub async fn map_set(&mut self, map: &str, key: &str, value: &str) -> Vec<u8> {
        let (map, key, value) = (map.to_string(), key.to_string(), value.to_string());
        self.change(move |d| {
            let m = d.get_or_insert_map(map.as_str());
            let mut txn = d.transact_mut();
            m.insert(&mut txn, key.as_str(), value.as_str());
        })
        .await
    }

    pub async fn text_push(&mut self, text: &str, chunk: &str) -> Vec<u8> {
        let (text, chunk) = (text.to_string(), chunk.to_string());
        self.change(move |d| {
            let t = d.get_or_insert_text(text.as_str());
            let mut txn = d.transact_mut();
            t.push(&mut txn, &chunk);
        })
        .await
    }

    pub fn map_get(&self, map: &str, key: &str) -> Option<String> {
        let m = self.doc.get_or_insert_map(map);
        let txn = self.doc.transact();
        m.get(&txn, key).map(|v| v.to_string(&txn))
    }

    pub fn text(&self, name: &str) -> String {
        let t = self.doc.get_or_insert_text(name);
        let txn = self.doc.transact();
        t.get_string(&txn)
    }

    fn apply(&mut self, update: &[u8]) {
        let u = Update::decode_v1(update)
            .unwrap_or_else(|e| panic!("server sent an undecodable update: {e}"));
        self.doc
            .transact_mut()
            .apply_update(u)
            .unwrap_or_else(|e| panic!("applying server update failed: {e}"));
    }

    /// Next event. Sync updates (step 2 / update) are applied to the local doc when
    /// they are handed out, and every handed-out message is appended to `received`.
    pub async fn next_event(&mut self, timeout: Duration) -> WbEvent {
        if self.pending.is_empty() {
            if let Some(c) = self.closed {
                return WbEvent::End(format!("already closed ({c:?})"));
            }
            match ws_next(&mut self.ws, timeout).await {
                WsEvent::Binary(b) => {
                    let msgs = decode_frame(&b).unwrap_or_else(|e| {
                        panic!("server frame {} does not decode: {e}", short(&b))
                    });
                    if msgs.len() > 1 {
                        self.multi_message_frames += 1;
                    }
                    for m in msgs {
                        self.pending.push_back((m, b.clone()));
                    }
                }
                WsEvent::Text(t) => return WbEvent::Text(t),
                WsEvent::Close(c, r) => {
                    self.closed = Some(c);
                    return WbEvent::Close(c, r);
                }
                WsEvent::End(e) => {
                    self.closed = Some(None);
                    return WbEvent::End(e);
                }
                WsEvent::Timeout => return WbEvent::Timeout,
            }
        }
        let (m, raw) = self.pending.pop_front().expect("pending message");
        if let Message::Sync(SyncMessage::SyncStep2(u)) | Message::Sync(SyncMessage::Update(u)) = &m
        {
            let u = u.clone();
            self.apply(&u);
        }
        self.received.push(m.clone());
        self.received_raw.push(raw.clone());
        WbEvent::Msg(m, raw)
    }

    /// Next message; panics on close, text or timeout.
    pub async fn next_msg(&mut self) -> Message {
        match self.next_event(TIMEOUT).await {
            WbEvent::Msg(m, _) => m,
            other => panic!("expected a whiteboard message, got {other:?}"),
        }
    }

    /// Reads messages until `pred` matches one (returned). Panics on close or timeout.
    pub async fn wait_for<F: FnMut(&Message) -> bool>(
        &mut self,
        what: &str,
        mut pred: F,
    ) -> Message {
        self.wait_for_within(what, TIMEOUT, &mut pred).await
    }

    pub async fn wait_for_within<F: FnMut(&Message) -> bool>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: F,
    ) -> Message {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                WbEvent::Msg(m, _) => {
                    if pred(&m) {
                        return m;
                    }
                }
                WbEvent::Timeout => panic!("timed out after {timeout:?} waiting for {what}"),
                other => panic!("while waiting for {what}: {other:?}"),
            }
        }
    }

    /// Reads until the local doc satisfies `cond`.
    pub async fn wait_doc<F: FnMut(&WbClient) -> bool>(&mut self, what: &str, mut cond: F) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !cond(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                WbEvent::Msg(..) => {}
                WbEvent::Timeout => panic!("timed out waiting for document state: {what}"),
                other => panic!("while waiting for document state {what}: {other:?}"),
            }
        }
    }

    /// y-websocket client handshake: read the server's step 1 (must be the first message),
    /// answer with step 2, send our step 1, and wait for the server's step 2.
    pub async fn handshake(&mut self) {
        let first = self.next_msg().await;
        let sv = match first {
            Message::Sync(SyncMessage::SyncStep1(sv)) => sv,
            other => panic!("first message from the server must be sync step 1, got {other:?}"),
        };
        let diff = self.doc.transact().encode_diff_v1(&sv);
        self.send_msg(&Message::Sync(SyncMessage::SyncStep2(diff)))
            .await;
        let my_sv = self.doc.transact().state_vector();
        self.send_msg(&Message::Sync(SyncMessage::SyncStep1(my_sv)))
            .await;
        self.wait_for("sync step 2 from the server", |m| {
            matches!(m, Message::Sync(SyncMessage::SyncStep2(_)))
        })
        .await;
    }

    /// Sends step 1 and waits for the step 2 answer. Returns every message received
    /// before that answer (used to prove that something did NOT arrive).
    pub async fn barrier(&mut self) -> Vec<Message> {
        let start = self.received.len();
        let sv = self.doc.transact().state_vector();
        self.send_msg(&Message::Sync(SyncMessage::SyncStep1(sv)))
            .await;
        self.wait_for("sync step 2 (barrier)", |m| {
            matches!(m, Message::Sync(SyncMessage::SyncStep2(_)))
        })
        .await;
        let end = self.received.len() - 1;
        self.received[start..end].to_vec()
    }

    /// Reads until a close frame (Some(code)) or end of stream (None).
    pub async fn expect_close(&mut self, timeout: Duration) -> Option<u16> {
        if let Some(c) = self.closed {
            return c;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                WbEvent::Close(c, _) => return c,
                WbEvent::End(_) => return None,
                WbEvent::Timeout => {
                    panic!("whiteboard connection was not closed within {timeout:?}")
                }
                WbEvent::Msg(..) | WbEvent::Text(_) => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // drain until the server acknowledges
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

pub fn is_update(m: &Message) -> bool {
    matches!(
        m,
        Message::Sync(SyncMessage::Update(_)) | Message::Sync(SyncMessage::SyncStep2(_))
    )
}

/// Asserts that a fresh client can connect, sync and exchange an update (server alive).
pub async fn assert_server_alive(server: &TestServer, session: &str) {
    let mut a = server.wb_user(session, "alive-a").await;
    let mut b = server.wb_user(session, "alive-b").await;
    let key = format!("alive-{}", now_s());
    a.map_set("alive", &key, "yes").await;
    b.wait_doc("alive key relayed", |c| {
        c.map_get("alive", &key).as_deref() == Some("yes")
    })
    .await;
    a.close().await;
    b.close().await;
}
