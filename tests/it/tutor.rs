//! Tutor endpoint (SPEC §4): welcome, history, chat sequence numbers, presence, typing,
//! events, ping, history requests, after_seq, errors, limits.

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

fn participant<'a>(v: &'a Value, id: &str) -> Option<&'a Value> {
    v["participants"]
        .as_array()
        .unwrap_or_else(|| panic!("participants is not an array in {v}"))
        .iter()
        .find(|p| p["id"] == id)
}

fn seqs(history: &Value) -> Vec<u64> {
    history["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("history.messages is not an array: {history}"))
        .iter()
        .map(|m| {
            m["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("message without seq: {m}"))
        })
        .collect()
}

#[tokio::test]
async fn welcome_and_empty_history_on_connect() {
    let server = TestServer::start("");
    let s = session_id("tutor-welcome");
    let (_c, welcome, history) = server.tutor(&s, &token("alice", &s, "tutor")).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["session"], s.as_str());
    assert_eq!(welcome["user"]["id"], "alice");
    assert_eq!(welcome["user"]["name"], "Name of alice");
    assert_eq!(welcome["user"]["role"], "tutor");
    assert_eq!(
        welcome["last_seq"], 0,
        "last_seq of a new session: {welcome}"
    );
    let me = participant(&welcome, "alice")
        .unwrap_or_else(|| panic!("newcomer not in participants: {welcome}"));
    assert_eq!(me["connections"], 1);
    assert_eq!(me["role"], "tutor");
    assert_eq!(me["name"], "Name of alice");
    assert_eq!(history["type"], "history");
    assert_eq!(
        history["messages"],
        json!([]),
        "history of a new session: {history}"
    );
}

#[tokio::test]
async fn chat_is_broadcast_to_all_including_sender_with_seq_and_ts() {
    let server = TestServer::start("");
    let s = session_id("tutor-chat");
    let (mut a, _, _) = server.tutor(&s, &token("alice", &s, "tutor")).await;
    let (mut b, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;

    a.send(&json!({"type":"chat","text":"hello bob","client_id":"c-1"}))
        .await;
    for (who, c) in [("sender", &mut a), ("other", &mut b)] {
        let m = c.wait_type("chat").await;
        assert_eq!(m["seq"], 1, "{who}: first seq: {m}");
        assert_eq!(m["text"], "hello bob", "{who}");
        assert_eq!(m["client_id"], "c-1", "{who}: client_id echoed");
        assert_eq!(m["from"]["id"], "alice", "{who}");
        assert_eq!(m["from"]["name"], "Name of alice", "{who}");
        assert_eq!(m["from"]["role"], "tutor", "{who}");
        let ts = m["ts"]
            .as_str()
            .unwrap_or_else(|| panic!("{who}: ts missing: {m}"));
        assert!(is_rfc3339(ts), "{who}: ts is not RFC 3339: {ts:?}");
    }
    b.send(&json!({"type":"chat","text":"two"})).await;
    b.send(&json!({"type":"chat","text":"three"})).await;
    for c in [&mut a, &mut b] {
        let m2 = c.wait_type("chat").await;
        let m3 = c.wait_type("chat").await;
        assert_eq!(
            (m2["seq"].as_u64(), m2["text"].as_str()),
            (Some(2), Some("two"))
        );
        assert_eq!(
            (m3["seq"].as_u64(), m3["text"].as_str()),
            (Some(3), Some("three"))
        );
        assert_eq!(m2["from"]["id"], "bob");
    }

    // a newcomer gets last_seq and the history, oldest first
    let (_c, welcome, history) = server.tutor(&s, &token("carol", &s, "student")).await;
    assert_eq!(welcome["last_seq"], 3);
    assert_eq!(seqs(&history), vec![1, 2, 3]);
    let msgs = history["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["text"], "hello bob");
    assert_eq!(msgs[0]["from"]["id"], "alice");
    assert_eq!(msgs[2]["text"], "three");
    assert!(
        is_rfc3339(msgs[1]["ts"].as_str().unwrap_or("")),
        "history ts: {}",
        msgs[1]
    );
}

#[tokio::test]
async fn presence_joined_and_left_with_several_tabs() {
    let server = TestServer::start("");
    let s = session_id("tutor-presence");
    let (mut a, _, _) = server.tutor(&s, &token("alice", &s, "tutor")).await;

    let bob = token("bob", &s, "student");
    let (b1, w1, _) = server.tutor(&s, &bob).await;
    assert_eq!(participant(&w1, "alice").unwrap()["connections"], 1);
    assert_eq!(participant(&w1, "bob").unwrap()["connections"], 1);
    let joined = a.wait_type("presence").await;
    assert_eq!(joined["event"], "joined", "{joined}");
    assert_eq!(joined["user"]["id"], "bob");
    assert!(participant(&joined, "bob").is_some(), "{joined}");
    assert!(participant(&joined, "alice").is_some(), "{joined}");

    // second tab of bob: same participant, two connections, no new "joined"
    let (b2, w2, _) = server.tutor(&s, &bob).await;
    assert_eq!(participant(&w2, "bob").unwrap()["connections"], 2, "{w2}");
    let n_bob = w2["participants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["id"] == "bob")
        .count();
    assert_eq!(n_bob, 1, "two tabs must be one participant: {w2}");
    let before = a.barrier().await;
    assert!(
        !before
            .iter()
            .any(|v| v["type"] == "presence" && v["event"] == "joined"),
        "second tab announced a new join: {before:?}"
    );

    // close the first tab: bob is still present; close the second: bob left (exactly once)
    b1.close().await;
    b2.close().await;
    let left = a.wait_type("presence").await;
    assert_eq!(left["event"], "left", "after both tabs closed: {left}");
    assert_eq!(left["user"]["id"], "bob");
    assert!(
        participant(&left, "bob").is_none(),
        "bob still in participants after leaving: {left}"
    );
    let after = a.barrier().await;
    assert!(
        !after.iter().any(|v| v["type"] == "presence"),
        "extra presence after bob left: {after:?}"
    );

    // and a later newcomer does not see bob
    let (_c, w3, _) = server.tutor(&s, &token("carol", &s, "student")).await;
    assert!(participant(&w3, "bob").is_none(), "{w3}");
    assert!(participant(&w3, "alice").is_some(), "{w3}");
}

#[tokio::test]
async fn typing_and_event_relayed_to_others_not_sender() {
    let server = TestServer::start("");
    let s = session_id("tutor-typing");
    let (mut a, _, _) = server.tutor(&s, &token("alice", &s, "tutor")).await;
    let (mut b, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    a.wait_type("presence").await;

    a.send(&json!({"type":"typing","active":true})).await;
    let t = b.wait_type("typing").await;
    assert_eq!(t["active"], true, "{t}");
    assert_eq!(t["from"]["id"], "alice", "{t}");

    let data = json!({"hint":"look at line 3","progress":0.5,"nested":{"a":[1,2,3]}});
    a.send(&json!({"type":"event","name":"hint","data":data}))
        .await;
    let e = b.wait_type("event").await;
    assert_eq!(e["name"], "hint", "{e}");
    assert_eq!(e["data"], data, "{e}");
    assert_eq!(e["from"]["id"], "alice", "{e}");

    let own = a.barrier().await;
    assert!(
        !own.iter()
            .any(|v| v["type"] == "typing" || v["type"] == "event"),
        "typing/event echoed to the sender: {own:?}"
    );

    // events are not stored
    let (_c, welcome, history) = server.tutor(&s, &token("carol", &s, "student")).await;
    assert_eq!(welcome["last_seq"], 0);
    assert_eq!(history["messages"], json!([]));
}

#[tokio::test]
async fn ping_pong() {
    let server = TestServer::start("");
    let s = session_id("tutor-ping");
    let (mut a, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    for _ in 0..3 {
        a.send(&json!({"type":"ping"})).await;
        let p = a.next_json().await;
        assert_eq!(p["type"], "pong", "{p}");
    }
}

#[tokio::test]
async fn history_request_with_before_and_limit() {
    let server = TestServer::start("");
    let s = session_id("tutor-hist");
    let (mut a, _, _) = server.tutor(&s, &token("alice", &s, "tutor")).await;
    for i in 1..=5 {
        chat(&mut a, &format!("m{i}")).await;
    }
    a.send(&json!({"type":"history","before":4,"limit":2}))
        .await;
    let h = a.wait_type("history").await;
    assert_eq!(seqs(&h), vec![2, 3], "history before 4 limit 2: {h}");
    assert_eq!(h["messages"][0]["text"], "m2");

    a.send(&json!({"type":"history","before":6,"limit":200}))
        .await;
    let h = a.wait_type("history").await;
    assert_eq!(seqs(&h), vec![1, 2, 3, 4, 5], "{h}");

    a.send(&json!({"type":"history","before":1,"limit":10}))
        .await;
    let h = a.wait_type("history").await;
    assert_eq!(seqs(&h), Vec::<u64>::new(), "{h}");
}

#[tokio::test]
async fn history_on_connect_and_after_seq() {
    let server = TestServer::start("[tutor]\nhistory_on_connect = 3\n");
    let s = session_id("tutor-after");
    let t = token("alice", &s, "tutor");
    let (mut a, _, _) = server.tutor(&s, &t).await;
    for i in 1..=5 {
        chat(&mut a, &format!("m{i}")).await;
    }
    let (_c, w, h) = server.tutor(&s, &t).await;
    assert_eq!(w["last_seq"], 5);
    assert_eq!(
        seqs(&h),
        vec![3, 4, 5],
        "last history_on_connect messages, oldest first"
    );

    let (_c, _, h) = server.tutor_q(&s, &t, "after_seq=3").await;
    assert_eq!(seqs(&h), vec![4, 5], "after_seq=3");
    let (_c, _, h) = server.tutor_q(&s, &t, "after_seq=1").await;
    assert_eq!(
        seqs(&h),
        vec![2, 3, 4, 5],
        "after_seq=1 must return every message after 1"
    );
    let (_c, _, h) = server.tutor_q(&s, &t, "after_seq=5").await;
    assert_eq!(seqs(&h), Vec::<u64>::new(), "after_seq=5");
}

#[tokio::test]
async fn bad_messages_get_bad_message_and_connection_stays_open() {
    let server = TestServer::start("");
    let s = session_id("tutor-bad");
    let (mut a, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    for (what, raw) in [
        ("not JSON", "this is not json"),
        ("unknown type", r#"{"type":"bogus"}"#),
        ("no type", r#"{"text":"hi"}"#),
        ("chat without text", r#"{"type":"chat"}"#),
        ("JSON array", r#"[1,2,3]"#),
    ] {
        a.send_raw_text(raw).await;
        let e = a.wait_type("error").await;
        assert_eq!(e["code"], "bad_message", "{what}: {e}");
        assert!(
            e["message"].is_string(),
            "{what}: error without message: {e}"
        );
    }
    a.send(&json!({"type":"chat","text":""})).await;
    let e = a.wait_type("error").await;
    assert!(
        e["code"].is_string(),
        "empty chat text must be an error: {e}"
    );
    // still open and working
    let before = a.barrier().await;
    assert!(before.iter().all(|v| v["type"] != "chat"), "{before:?}");
    let m = chat(&mut a, "still here").await;
    assert_eq!(m["seq"], 1, "rejected messages must not take a seq: {m}");
}

#[tokio::test]
async fn text_limit_counts_unicode_scalar_values() {
    let server = TestServer::start("");
    let s = session_id("tutor-len");
    let (mut a, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    let (mut b, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;

    for (what, text) in [
        ("8000 ascii", "a".repeat(8000)),
        ("8000 two-byte chars", "é".repeat(8000)),
        ("8000 four-byte chars", "😀".repeat(8000)),
    ] {
        a.send(&json!({"type":"chat","text":text})).await;
        let m = b.wait_type("chat").await;
        assert_eq!(
            m["text"].as_str().map(|t| t.chars().count()),
            Some(8000),
            "{what}"
        );
        assert_eq!(m["text"], text.as_str(), "{what}: text altered");
    }
    for (what, text) in [
        ("8001 ascii", "a".repeat(8001)),
        ("8001 four-byte chars", "😀".repeat(8001)),
    ] {
        a.send(&json!({"type":"chat","text":text})).await;
        let e = a.wait_type("error").await;
        assert_eq!(e["code"], "too_large", "{what}: {e}");
    }
    let before = b.barrier().await;
    assert!(
        before.iter().all(|v| v["type"] != "chat"),
        "an oversized chat was relayed"
    );
    let m = chat(&mut a, "ok").await;
    assert_eq!(m["seq"], 4);
}

#[tokio::test]
async fn viewer_chat_is_forbidden() {
    let server = TestServer::start("");
    let s = session_id("tutor-viewer");
    let (mut t, _, _) = server.tutor(&s, &token("teacher", &s, "tutor")).await;
    let (mut v, w, _) = server.tutor(&s, &token("watcher", &s, "viewer")).await;
    assert_eq!(w["user"]["role"], "viewer");
    v.send(&json!({"type":"chat","text":"can I talk?"})).await;
    let e = v.wait_type("error").await;
    assert_eq!(e["code"], "forbidden", "{e}");
    let before = t.barrier().await;
    assert!(
        before.iter().all(|m| m["type"] != "chat"),
        "viewer chat relayed: {before:?}"
    );
    // the viewer still reads chat
    chat(&mut t, "you may listen").await;
    let m = v.wait_type("chat").await;
    assert_eq!(m["text"], "you may listen");
    assert_eq!(m["seq"], 1);
}

#[tokio::test]
async fn more_than_ten_bad_messages_close_1008() {
    let server = TestServer::start("");
    let s = session_id("tutor-abuse");
    let (mut a, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    for i in 0..10 {
        a.send_raw_text(&format!("garbage {i}")).await;
        let e = a.wait_type("error").await;
        assert_eq!(e["code"], "bad_message");
    }
    // ten bad messages are tolerated
    a.barrier().await;
    let _ = a.try_send(&json!({"type":"bogus-11"})).await;
    let code = a.expect_close(TIMEOUT).await;
    assert_eq!(code, Some(1008), "11th bad message within 60 s");
    // other clients are unaffected
    let (mut b, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    b.barrier().await;
}

#[tokio::test]
async fn rate_limit_gives_rate_limited() {
    let server = TestServer::start("[limits]\ntutor_rate = 1.0\ntutor_burst = 3\n");
    let s = session_id("tutor-rate");
    let (mut a, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    let n = 10;
    for i in 0..n {
        a.send(&json!({"type":"chat","text":format!("spam {i}")}))
            .await;
    }
    // every spam message gets exactly one answer: its chat acknowledgement or an error
    let mut accepted = 0;
    let mut limited = 0;
    for _ in 0..n {
        let v = a
            .wait_for("answer to a spam message", |v| {
                v["type"] == "chat" || v["type"] == "error"
            })
            .await;
        if v["type"] == "chat" {
            accepted += 1;
        } else {
            assert_eq!(v["code"], "rate_limited", "{v}");
            assert!(v["message"].is_string(), "{v}");
            limited += 1;
        }
    }
    assert!(
        limited >= 1,
        "no rate_limited error for {n} chats with tutor_rate 1, burst 3"
    );
    assert!(accepted <= 5, "{accepted} chats accepted with burst 3");
    // the bucket refills: a later chat goes through (polling with a deadline)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        a.send(&json!({"type":"chat","text":"after pause"})).await;
        let v = a
            .wait_for("answer to a later chat", |v| {
                v["type"] == "chat" || v["type"] == "error"
            })
            .await;
        if v["type"] == "chat" {
            assert_eq!(v["text"], "after pause");
            break;
        }
        assert_eq!(v["code"], "rate_limited", "{v}");
        assert!(
            std::time::Instant::now() < deadline,
            "bucket never refilled"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}
