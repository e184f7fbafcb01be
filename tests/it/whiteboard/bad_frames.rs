//! Frames the whiteboard refuses (1007, 1003, 1009), and one message per frame out.

use super::*;

async fn expect_close_code(c: &mut WbClient, code: u16, what: &str) {
    let got = c.expect_close(TIMEOUT).await;
    assert_eq!(
        got,
        Some(code),
        "{what}: expected close {code}, got {got:?}"
    );
}

#[tokio::test]
async fn undecodable_frames_close_1007() {
    let server = TestServer::start("");
    let s = session_id("wb-garbage");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // sync step 2 announcing 50 bytes but carrying 3
        ("truncated sync step 2", vec![0, 1, 50, 1, 2, 3]),
        // awareness announcing 20 bytes but carrying 1
        ("truncated awareness", vec![1, 20, 1]),
        // awareness whose payload is not an awareness update (client count 5, nothing else)
        ("bad awareness payload", vec![1, 1, 5]),
    ];
    for (what, bytes) in cases {
        let mut c = server.wb_user(&s, "garbler").await;
        c.send_raw(bytes.clone()).await;
        let got = c.expect_close(TIMEOUT).await;
        assert_eq!(
            got,
            Some(1007),
            "{what} ({bytes:?}): expected close 1007, got {got:?}"
        );
        assert_server_alive(&server, &s).await;
    }
    // Every close the server sent is counted by endpoint and code. The server counts a close
    // when its handler ends, after giving the client a moment to answer the Close frame, so
    // the count may trail the client seeing the close: wait for the line to say 3.
    let closes = eventually("three 1007 closes counted", TIMEOUT, || async {
        let text = server.http_get("/metrics").await.text();
        text.lines()
            .find(|l| l.starts_with("easel_closes_total{") && l.contains("code=\"1007\""))
            .filter(|l| l.ends_with(" 3"))
            .map(str::to_owned)
    })
    .await;
    assert!(closes.contains("endpoint=\"whiteboard\""), "{closes}");
}

#[tokio::test]
async fn unknown_message_type_closes_1003() {
    let server = TestServer::start("");
    let s = session_id("wb-unknown");
    let mut c = server.wb_user(&s, "u").await;
    c.send_raw(vec![9, 3, 1, 2, 3]).await;
    expect_close_code(&mut c, 1003, "message type 9").await;
    assert_server_alive(&server, &s).await;
}

#[tokio::test]
async fn text_frame_closes_1003() {
    let server = TestServer::start("");
    let s = session_id("wb-text");
    let mut c = server.wb_user(&s, "u").await;
    c.send_text("hello, I am a text frame").await;
    expect_close_code(&mut c, 1003, "text frame on the whiteboard").await;
    assert_server_alive(&server, &s).await;
}

#[tokio::test]
async fn update_yrs_rejects_closes_1007_and_doc_unchanged() {
    let server = TestServer::start("");
    let s = session_id("wb-badupdate");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;
    a.map_set("m", "k", "v").await;
    a.text_push("t", "stable text").await;
    b.wait_doc("B synced", |c| c.text("t") == "stable text")
        .await;
    let expected = doc_json(&b.doc, &["m", "junk"], &["t"]);

    // a valid update (a large text insert), truncated in the middle: yrs must reject it
    let good = {
        let d = Doc::with_client_id(31337);
        let t = d.get_or_insert_text("junk");
        let mut txn = d.transact_mut();
        t.push(&mut txn, &"x".repeat(200));
        drop(txn);
        let m = d.get_or_insert_map("m");
        let mut txn = d.transact_mut();
        m.insert(&mut txn, "k", "overwritten");
        txn.encode_update_v1()
    };
    let bad: Vec<u8> = good[..good.len() / 2].to_vec();
    assert!(
        Update::decode_v1(&bad).is_err(),
        "test precondition: truncated update must not decode"
    );
    let bad2: Vec<u8> = vec![0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3];
    assert!(
        Update::decode_v1(&bad2).is_err(),
        "test precondition: junk update must not decode"
    );

    for (what, upd) in [("truncated update", bad), ("junk update", bad2)] {
        for sub in [1u8, 2u8] {
            let mut c = server.wb_user(&s, "mallory").await;
            let mut frame = vec![0u8, sub];
            write_var_buf(&mut frame, &upd);
            c.send_raw(frame).await;
            let got = c.expect_close(TIMEOUT).await;
            assert_eq!(
                got,
                Some(1007),
                "{what} as sync sub {sub}: expected 1007, got {got:?}"
            );
        }
    }

    let before = b.barrier().await;
    assert!(
        !before
            .iter()
            .any(|m| matches!(m, Message::Sync(SyncMessage::Update(_)))),
        "a rejected update was relayed: {before:?}"
    );
    assert_eq!(doc_json(&b.doc, &["m", "junk"], &["t"]), expected);
    let fresh = server.wb_user(&s, "fresh").await;
    assert_eq!(
        doc_json(&fresh.doc, &["m", "junk"], &["t"]),
        expected,
        "server document changed"
    );
    assert_server_alive(&server, &s).await;
}

#[tokio::test]
async fn frame_over_max_frame_bytes_closes_1009() {
    let server = TestServer::start("[limits]\nmax_frame_bytes = 4096\n");
    let s = session_id("wb-big");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;

    // under the limit: fine
    a.text_push("t", &"s".repeat(3000)).await;
    b.wait_doc("3000-char update relayed", |c| c.text("t").len() == 3000)
        .await;

    // 5000 bytes in one frame
    let upd = map_set_update(8080, "big", "k", &"B".repeat(4980));
    let frame = update_msg(&upd);
    assert!(
        frame.len() >= 5000,
        "test precondition: frame is {} bytes",
        frame.len()
    );
    a.send_raw(frame).await;
    expect_close_code(&mut a, 1009, "5000-byte frame with max_frame_bytes = 4096").await;

    let before = b.barrier().await;
    assert!(
        !before.iter().any(is_update),
        "oversized update was relayed"
    );
    assert_eq!(b.map_get("big", "k"), None);
    assert_server_alive(&server, &s).await;
}

#[tokio::test]
async fn server_sends_one_message_per_frame() {
    let server = TestServer::start("");
    let s = session_id("wb-oneper");
    let mut a = server.wb_user(&s, "alice").await;
    a.send_awareness(&awareness_update(1212, 1, r#"{"a":1}"#))
        .await;
    a.map_set("m", "k", "v").await;
    a.barrier().await;
    // the late joiner gets step 1 and the awareness on connect: each must be its own frame
    let mut c = server.wb_user(&s, "carol").await;
    if !c.received.iter().any(|m| awareness_with(m, 1212).is_some()) {
        c.wait_for("awareness on connect", |m| {
            awareness_with(m, 1212).is_some()
        })
        .await;
    }
    c.send_raw(vec![3]).await;
    c.wait_for("query answer", |m| awareness_with(m, 1212).is_some())
        .await;
    assert_eq!(
        a.multi_message_frames, 0,
        "server packed messages into one frame"
    );
    assert_eq!(
        c.multi_message_frames, 0,
        "server packed messages into one frame"
    );
}
