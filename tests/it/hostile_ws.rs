//! Hostile WebSocket input (SPEC §3, §4, §7.1): packed frames are charged per protocol
//! message, tutor sizes are capped, history goes out in pages, and closes follow RFC 6455
//! on both endpoints. Every test runs the real binary and talks raw WebSocket to it.

use std::time::{Duration, Instant};

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::{Message, SyncMessage};

/// Every message of a sync step 1 with an empty state vector: `[0, 0, 1, 0]`.
const EMPTY_STEP1: [u8; 4] = [0, 0, 1, 0];

/// Raw tutor connection: returns the socket after reading `welcome`.
async fn tutor_raw(server: &TestServer, session: &str, user: &str, query: &str) -> (Ws, Value) {
    let mut path = TestServer::tutor_path(session);
    if !query.is_empty() {
        path.push('?');
        path.push_str(query);
    }
    let (mut ws, _) = ws_connect(
        server.addr,
        &path,
        Some(&token(user, session, "student")),
        TokenVia::Query,
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("tutor connect: {}", describe_ws_err(&e)));
    let welcome = next_text_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

async fn next_text_json(ws: &mut Ws) -> Value {
    match ws_next(ws, TIMEOUT).await {
        WsEvent::Text(t) => serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t}: {e}")),
        other => panic!("expected a JSON text frame, got {other:?}"),
    }
}

/// Reads `history` frames until one without `"more":true`; returns each frame's seqs and
/// its length in bytes. Anything else in between fails the test.
async fn read_history(ws: &mut Ws) -> Vec<(Vec<u64>, usize)> {
    let mut pages = Vec::new();
    loop {
        let text = match ws_next(ws, TIMEOUT).await {
            WsEvent::Text(t) => t,
            other => panic!("expected a history frame, got {other:?} after {pages:?}"),
        };
        let v: Value = serde_json::from_str(&text).expect("history JSON");
        assert_eq!(v["type"], "history", "expected history, got {v}");
        let seqs = v["messages"]
            .as_array()
            .expect("messages array")
            .iter()
            .map(|m| m["seq"].as_u64().expect("seq"))
            .collect();
        pages.push((seqs, text.len()));
        if v["more"] != json!(true) {
            return pages;
        }
        assert!(pages.len() < 1000, "history never ends");
    }
}

fn sizes(pages: &[(Vec<u64>, usize)]) -> Vec<usize> {
    pages.iter().map(|(s, _)| s.len()).collect()
}

fn all_seqs(pages: &[(Vec<u64>, usize)]) -> Vec<u64> {
    pages.iter().flat_map(|(s, _)| s.iter().copied()).collect()
}

/// Reads until a JSON message of type `ty`, failing on close or timeout.
async fn wait_json(ws: &mut Ws, ty: &str) -> Value {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let v = match ws_next(ws, left).await {
            WsEvent::Text(t) => serde_json::from_str::<Value>(&t).expect("JSON"),
            other => panic!("waiting for {ty}: {other:?}"),
        };
        if v["type"] == ty {
            return v;
        }
    }
}

/// The whole close handshake as a client sees it: the next frames after the client's
/// Close are `before` (data), then a Close frame with `code`, then the end of the stream
/// with no error (a clean close, not 1006).
async fn expect_clean_close(ws: &mut Ws, code: u16) -> Vec<WsMessage> {
    let mut data = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no Close frame within {TIMEOUT:?}; data {data:?}"));
        match next {
            Some(Ok(WsMessage::Close(frame))) => {
                let got = frame.map(|f| u16::from(f.code));
                assert_eq!(got, Some(code), "the Close answer echoes the code");
                break;
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
            Some(Ok(m)) => data.push(m),
            Some(Err(e)) => panic!("connection failed before a Close frame (1006): {e}"),
            None => panic!("stream ended without a Close frame (1006); data {data:?}"),
        }
    }
    // After the handshake the stream ends cleanly: no reset, no further frames.
    match tokio::time::timeout(TIMEOUT, ws.next()).await {
        Ok(None) => {}
        Ok(Some(Err(e))) => panic!("the stream failed after the close handshake: {e}"),
        Ok(Some(Ok(m))) => panic!("a frame after the close handshake: {m:?}"),
        Err(_) => panic!("the TCP connection did not end after the close handshake"),
    }
    data
}

fn close_frame(code: u16, reason: &str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

// ---------------------------------------------------------------------------------------------
// Packed frames
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_packed_frame_is_charged_per_message_and_stalls_nobody() {
    let server = TestServer::start("");
    let pid = server.pid();
    let attacked = session_id("packed");
    let other = session_id("bystander");

    let mut b1 = server.wb_user(&other, "b1").await;
    let mut b2 = server.wb_user(&other, "b2").await;
    let mut attacker = server.wb_user(&attacked, "attacker").await;
    let hwm_before = vm_hwm_kib(pid);

    // 4,000,000 query-awareness messages in one 4 MB frame (under max_frame_bytes).
    const PACKED: usize = 4_000_000;
    let frame = vec![3u8; PACKED];
    let started = Instant::now();
    attacker.send_raw(frame).await;

    // Meanwhile the other session's updates go through promptly.
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let key = format!("k{i}");
        let sent = Instant::now();
        b1.map_set("m", &key, "v").await;
        b2.wait_doc("bystander update", |c| c.map_get("m", &key).is_some())
            .await;
        worst = worst.max(sent.elapsed());
    }

    // The attacker gets at most its burst of answers, then 1008 (sustained abuse).
    let mut answers = 0usize;
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        assert!(
            answers <= 5000 && Instant::now() < deadline,
            "the attacker's answers are not limited: {answers} after {:?}; VmHWM {hwm_before} -> {} KiB",
            started.elapsed(),
            vm_hwm_kib(pid)
        );
        match attacker.next_event(Duration::from_secs(20)).await {
            WbEvent::Msg(Message::Awareness(_), _) => answers += 1,
            WbEvent::Msg(..) => {}
            WbEvent::Close(code, _) => break code,
            other => panic!(
                "attacker: expected answers then a close, got {other:?} after {answers} answers"
            ),
        }
    };
    let elapsed = started.elapsed();
    let hwm_after = vm_hwm_kib(pid);
    eprintln!(
        "packed frame of {PACKED} messages: {answers} answers, close {code:?} after {elapsed:?}; \
         VmHWM {hwm_before} -> {hwm_after} KiB; worst bystander latency {worst:?}"
    );
    assert_eq!(
        code,
        Some(1008),
        "a frame of 4M messages is sustained abuse"
    );
    // The burst, and what the rate (300/s) refilled while the frame was read.
    let budget = 1000 + (300.0 * elapsed.as_secs_f64()) as usize + 1;
    assert!(
        (900..=budget).contains(&answers),
        "answers are limited by the message budget ({budget}), got {answers}"
    );
    assert!(
        hwm_after.saturating_sub(hwm_before) < 48 * 1024,
        "peak RSS grew by {} KiB for a 4 MB frame",
        hwm_after - hwm_before
    );
    assert!(
        worst < Duration::from_millis(1500),
        "another session was stalled: worst latency {worst:?}"
    );
    assert_server_alive(&server, &other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn packed_sync_messages_wait_for_the_budget_and_none_is_lost() {
    // 100 at once, then 500 a second: 1,100 step 1s take about 2 s, not 0.
    let server = TestServer::start("[limits]\nwhiteboard_rate = 500.0\nwhiteboard_burst = 100\n");
    let s = session_id("packed-sync");
    let mut writer = server.wb_user(&s, "writer").await;
    writer.map_set("m", "k", "v").await;
    let mut c = server.wb_user(&s, "reader").await;
    c.wait_doc("synced", |c| c.map_get("m", "k").is_some())
        .await;

    const N: usize = 1100;
    let mut frame = Vec::with_capacity(N * 4 + 1);
    for _ in 0..N {
        frame.extend_from_slice(&EMPTY_STEP1);
    }
    let started = Instant::now();
    c.send_raw(frame).await;
    let mut step2 = 0;
    loop {
        match c.next_event(Duration::from_secs(15)).await {
            WbEvent::Msg(Message::Sync(SyncMessage::SyncStep2(_)), _) => {
                step2 += 1;
                if step2 == N {
                    break;
                }
            }
            WbEvent::Msg(..) => {}
            other => panic!("expected {N} step 2 answers (none lost), got {other:?} after {step2}"),
        }
    }
    let elapsed = started.elapsed();
    eprintln!("{N} packed step 1s answered in {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(1500),
        "1,100 sync messages at 500/s (burst 100) were answered in {elapsed:?}"
    );
    // Back-pressure, not abuse: the connection is still good.
    c.barrier().await;
}

// ---------------------------------------------------------------------------------------------
// Tutor sizes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_huge_client_id_is_too_large_and_joins_still_work() {
    let server = TestServer::start("");
    let s = session_id("client-id");
    let (mut a, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;

    let huge = "x".repeat(4 * 1024 * 1024);
    a.send(&json!({"type":"chat","text":"hi","client_id": huge}))
        .await;
    let e = a.wait_type("error").await;
    assert_eq!(e["code"], "too_large", "{e}");
    let e_129 = "y".repeat(129);
    a.send(&json!({"type":"chat","text":"hi","client_id": e_129}))
        .await;
    let e = a.wait_type("error").await;
    assert_eq!(e["code"], "too_large", "{e}");
    // The connection stays, and 128 bytes is fine.
    let ok_id = "z".repeat(128);
    a.send(&json!({"type":"chat","text":"kept","client_id": ok_id}))
        .await;
    let chat = a.wait_type("chat").await;
    assert_eq!(chat["client_id"], json!(ok_id));
    assert_eq!(
        chat["seq"], 1,
        "nothing was stored for the refused messages"
    );

    let (_b, welcome, history) = server.tutor(&s, &token("bob", &s, "student")).await;
    assert_eq!(welcome["last_seq"], 1);
    let msgs = history["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["text"], "kept");
    assert_eq!(
        server.metric("easel_tutor_too_large_total").await,
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_name_and_data_are_capped() {
    let server = TestServer::start("");
    let s = session_id("events");
    let (mut a, _, _) = server.tutor(&s, &token("alice", &s, "tutor")).await;
    let (mut b, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    a.wait_type("presence").await;

    a.send(&json!({"type":"event","name":"n".repeat(129),"data":{}}))
        .await;
    assert_eq!(a.wait_type("error").await["code"], "too_large");
    // 64 KiB of JSON is the limit: a string of 65,534 bytes plus its quotes fits...
    let fits = "d".repeat(64 * 1024 - 2);
    a.send(&json!({"type":"event","name":"n".repeat(128),"data":fits}))
        .await;
    let ev = b.wait_type("event").await;
    assert_eq!(ev["data"].as_str().map(str::len), Some(64 * 1024 - 2));
    assert_eq!(ev["name"].as_str().map(str::len), Some(128));
    // ...one byte more does not.
    let over = "d".repeat(64 * 1024 - 1);
    a.send(&json!({"type":"event","name":"hint","data":{"x":over}}))
        .await;
    assert_eq!(a.wait_type("error").await["code"], "too_large");
    // A frame far past anything valid is refused unparsed; the connection stays.
    let blob = format!("[{}0]", "0,".repeat(2 * 1024 * 1024));
    a.send_raw_text(&format!(
        r#"{{"type":"event","name":"hint","data":{blob}}}"#
    ))
    .await;
    assert_eq!(a.wait_type("error").await["code"], "too_large");
    a.send(&json!({"type":"event","name":"last","data":{"ok":true}}))
        .await;
    let ev = b.wait_type("event").await;
    assert_eq!(
        ev["name"], "last",
        "the refused events were not relayed: {ev}"
    );
    a.barrier().await;
}

// ---------------------------------------------------------------------------------------------
// History pages
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_goes_out_in_pages_in_order() {
    let server = TestServer::start(
        "[tutor]\nhistory_page_messages = 10\nhistory_page_bytes = 8192\nhistory_on_connect = 50\n",
    );
    let s = session_id("pages");
    let (mut a, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    for i in 1..=35 {
        a.send(&json!({"type":"chat","text":format!("m{i}")})).await;
        a.wait_for("ack", |v| v["type"] == "chat" && v["seq"] == i)
            .await;
    }

    // On connect: the last 50 (all 35) in 4 frames, in order.
    let (mut b, welcome) = tutor_raw(&server, &s, "bob", "").await;
    assert_eq!(welcome["last_seq"], 35);
    let pages = read_history(&mut b).await;
    assert_eq!(sizes(&pages), [10, 10, 10, 5]);
    assert_eq!(all_seqs(&pages), (1..=35).collect::<Vec<_>>());

    // after_seq resume: everything after 3, however many.
    let (mut c, _) = tutor_raw(&server, &s, "carol", "after_seq=3").await;
    let pages = read_history(&mut c).await;
    assert_eq!(sizes(&pages), [10, 10, 10, 2]);
    assert_eq!(all_seqs(&pages), (4..=35).collect::<Vec<_>>());

    // A request: 25 before 36.
    c.send(WsMessage::Text(
        json!({"type":"history","before":36,"limit":25})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    let pages = read_history(&mut c).await;
    assert_eq!(sizes(&pages), [10, 10, 5]);
    assert_eq!(all_seqs(&pages), (11..=35).collect::<Vec<_>>());

    // Pages are cut by bytes too: 3,000-character messages, at most 8 KiB a frame.
    for i in 36..=40 {
        a.send(&json!({"type":"chat","text":"w".repeat(3000)}))
            .await;
        a.wait_for("ack", |v| v["type"] == "chat" && v["seq"] == i)
            .await;
    }
    let (mut d, _) = tutor_raw(&server, &s, "dave", "after_seq=35").await;
    let pages = read_history(&mut d).await;
    assert_eq!(all_seqs(&pages), (36..=40).collect::<Vec<_>>());
    assert_eq!(sizes(&pages), [2, 2, 1]);
    for (_, bytes) in &pages {
        assert!(*bytes <= 8192, "a history frame of {bytes} bytes");
    }

    // A chat posted while a joiner is catching up comes after its last page, once.
    let (mut e, _) = tutor_raw(&server, &s, "erin", "after_seq=0").await;
    a.send(&json!({"type":"chat","text":"live"})).await;
    let pages = read_history(&mut e).await;
    let mut seqs = all_seqs(&pages);
    let live = wait_json(&mut e, "chat").await;
    seqs.push(live["seq"].as_u64().expect("seq"));
    assert_eq!(seqs, (1..=41).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// Close handshake
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_close_is_answered_after_what_was_queued_on_both_endpoints() {
    let server = TestServer::start("");
    let s = session_id("close");

    // Tutor: ping and Close back to back; the pong comes first, then the echo.
    let (mut t, _) = tutor_raw(&server, &s, "alice", "").await;
    let _ = read_history(&mut t).await;
    t.send(WsMessage::Text(json!({"type":"ping"}).to_string().into()))
        .await
        .expect("send ping");
    t.send(close_frame(1000, "bye")).await.expect("send close");
    let data = expect_clean_close(&mut t, 1000).await;
    assert_eq!(data.len(), 1, "{data:?}");
    assert!(
        matches!(&data[0], WsMessage::Text(x) if x.contains("pong")),
        "{data:?}"
    );

    // Whiteboard: a query and a step 1, then Close(4000): both answers, then Close(4000).
    let mut w = server.wb_connect(&s, &token("bob", &s, "student")).await;
    w.wait_for("server step 1", |m| {
        matches!(m, Message::Sync(SyncMessage::SyncStep1(_)))
    })
    .await;
    let mut frame = vec![3u8];
    frame.extend_from_slice(&EMPTY_STEP1);
    w.send_raw(frame).await;
    w.ws.send(close_frame(4000, "done"))
        .await
        .expect("send close");
    let data = expect_clean_close(&mut w.ws, 4000).await;
    let kinds: Vec<_> = data
        .iter()
        .map(|m| match m {
            WsMessage::Binary(b) => b.first().copied(),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        [Some(1), Some(0)],
        "awareness answer then step 2: {data:?}"
    );

    // Many queued messages: every chat posted before the Close reaches the client first.
    let (mut c, _) = tutor_raw(&server, &s, "carol", "").await;
    let _ = read_history(&mut c).await;
    let (mut poster, _, _) = server.tutor(&s, &token("dave", &s, "student")).await;
    for i in 0..20 {
        poster
            .send(&json!({"type":"chat","text":format!("c{i}")}))
            .await;
    }
    let last = poster
        .wait_for("last ack", |v| v["type"] == "chat" && v["text"] == "c19")
        .await;
    // Dave's ack of c19 can reach him before the fan-out has queued c19 for carol; carol's
    // own chat is sequenced after every earlier one (one room, one order), so once it is
    // queued for her, all 20 are too. Her Close follows it on the same socket.
    c.send(WsMessage::Text(
        json!({"type":"chat","text":"carol's last"})
            .to_string()
            .into(),
    ))
    .await
    .expect("send chat");
    c.send(close_frame(1000, "")).await.expect("send close");
    let data = expect_clean_close(&mut c, 1000).await;
    let chats: Vec<&str> = data
        .iter()
        .filter_map(|m| match m {
            WsMessage::Text(t) if t.contains("\"type\":\"chat\"") => Some(t.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        chats.len(),
        21,
        "every chat queued before the Close (dave's last {last}): {chats:?}"
    );
    assert!(chats[20].contains("carol's last"), "{chats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_close_comes_after_the_queued_messages() {
    let server = TestServer::start("[tutor]\nbad_message_limit = 3\n");
    let s = session_id("server-close");
    let (mut t, _) = tutor_raw(&server, &s, "alice", "").await;
    let _ = read_history(&mut t).await;
    for _ in 0..4 {
        t.send(WsMessage::Text("not json".into()))
            .await
            .expect("send");
    }
    // Four errors (the fourth strike closes), then Close(1008), then a clean end.
    let mut errors = 0;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, t.next())
            .await
            .expect("a close within the timeout");
        match next {
            Some(Ok(WsMessage::Text(x))) => {
                assert!(x.contains("bad_message"), "{x}");
                errors += 1;
            }
            Some(Ok(WsMessage::Close(f))) => {
                assert_eq!(f.map(|f| u16::from(f.code)), Some(1008));
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("expected Close(1008), got {other:?} after {errors} errors"),
        }
    }
    assert_eq!(
        errors, 4,
        "every error queued before the close is written first"
    );
    // Our answer completes the handshake; the server then ends the connection.
    let _ = t.send(close_frame(1008, "")).await;
    let end =
        tokio::time::timeout(TIMEOUT, async { while let Some(Ok(_)) = t.next().await {} }).await;
    assert!(
        end.is_ok(),
        "the server did not end the connection after the handshake"
    );
}
