//! Chat changes off the async workers (issue #13 item 1): every chat post, edit, deletion
//! and moderation, from the WebSocket or the HTTP API, runs on the tutor room's lane, an
//! `easel-lane` thread of a small pool (one per core, at least two) started by the first
//! change; seqs stay gapless and in order, in sync durability too. Read from the real
//! server: its thread names in /proc, and its answers (the debug build it runs asserts, in
//! each change, that it is on a lane thread: a change made anywhere else panics there and
//! the client is closed with 1011 instead of answered).

use serde_json::json;

use crate::support::*;

/// How many of the process's threads are chat lane threads (named `easel-lane`).
fn lane_threads(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "easel-lane")
        .count()
}

#[tokio::test]
async fn chat_changes_run_on_the_lane_pool_with_gapless_seqs() {
    let server = TestServer::start(
        "[persist]\ndurability = \"sync\"\n[limits]\ntutor_rate = 10000\ntutor_burst = 10000\n",
    );
    let pid = server.pid();
    let s = session_id("chat-lane");
    let path = format!("/api/v2/session/{s}/tutor/messages");
    let (mut alice, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    let (mut tina, _, _) = server.tutor(&s, &token("tina", &s, "tutor")).await;
    let (_bob, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    assert_eq!(lane_threads(pid), 0, "joins change nothing: no lane thread");

    // A burst over one WebSocket, each acknowledged before the next is sent.
    const BURST: u64 = 100;
    for i in 1..=BURST {
        let ack = chat(&mut alice, &format!("line {i}")).await;
        assert_eq!(ack["seq"], i, "{ack}");
    }
    // One over HTTP: the next seq.
    let r = server
        .api(
            "POST",
            &path,
            Some(&token("bob", &s, "student")),
            Some(json!({"text":"by http"}).to_string().as_bytes()),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["seq"], BURST + 1);
    // Another connection saw them all, in seq order, gapless.
    let mut seen = Vec::new();
    while seen.len() < (BURST + 1) as usize {
        let v = tina.wait_type("chat").await;
        seen.push(v["seq"].as_u64().expect("seq"));
    }
    assert_eq!(seen, (1..=BURST + 1).collect::<Vec<_>>());

    // An edit over the WebSocket, a deletion over HTTP, a mute over the WebSocket.
    alice
        .send(&json!({"type":"edit","seq":1,"text":"line one"}))
        .await;
    let e = tina.wait_type("chat_edited").await;
    assert_eq!(
        (e["seq"].as_u64(), e["text"].as_str()),
        (Some(1), Some("line one"))
    );
    let r = server
        .api(
            "DELETE",
            &format!("{path}/2"),
            Some(&token("alice", &s, "student")),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    tina.send(&json!({"type":"mute","user":"alice"})).await;
    let m = tina.wait_type("moderation").await;
    assert_eq!(
        (m["action"].as_str(), m["user"].as_str()),
        (Some("mute"), Some("alice"))
    );
    // Refusals still come back as before: a muted chat, an edit of a deleted message.
    alice.send(&json!({"type":"chat","text":"hush"})).await;
    let refused = alice
        .wait_for("the muted refusal", |v| v["type"] == "error")
        .await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert_eq!(refused["reason"], "muted", "{refused}");
    tina.send(&json!({"type":"edit","seq":2,"text":"x"})).await;
    let refused = tina.wait_for("not_found", |v| v["type"] == "error").await;
    assert_eq!(refused["code"], "not_found", "{refused}");

    // Every change above ran on the pool, however many there were.
    let pool = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    assert_eq!(lane_threads(pid), pool, "the chat lane pool's threads");
    // And nothing was closed under the clients: each change passed its lane assertion.
    let (_carol, welcome, history) = server.tutor(&s, &token("carol", &s, "student")).await;
    assert_eq!(welcome["last_seq"], BURST + 1, "{welcome}");
    assert!(history["messages"]
        .as_array()
        .is_some_and(|m| !m.is_empty()));
}
