//! Persistence (SPEC §5, §6 snapshot routes): state across graceful restarts and kill -9,
//! durability modes, snapshot triggers and retention, idle unloading, live restore,
//! corrupt records, and memory after loading and unloading many sessions.
//!
//! Every test runs the real `easel` binary on a real sled directory in a temp dir and talks
//! to it over real sockets. Waits are conditions with timeouts; the only bounded sleep is in
//! `crash_with_batch_durability_loses_nothing_older_than_flush_interval`, whose very point
//! is the flush window.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::{json, Value};
use yrs::{Doc, Map, Transact};

mod memory;
mod restore;
mod snapshots;

fn map_len(doc: &Doc, map: &str) -> u32 {
    let m = doc.get_or_insert_map(map);
    let txn = doc.transact();
    m.len(&txn)
}

/// The keys `k000`..`k{n-1}` missing from root map `m` of `doc`.
fn missing_keys(doc: &Doc, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("k{i:03}"))
        .filter(|k| doc_map_get(doc, "m", k).as_deref() != Some(&format!("v{k}")[..]))
        .collect()
}

/// Sends `n` updates from `a`, each a distinct key `k{i}` = `vk{i}` of map `m`, and waits
/// until `b` has received all of them (so the server accepted and relayed every one).
async fn write_keys_confirmed(a: &mut WbClient, b: &mut WbClient, n: usize) {
    write_more_keys_confirmed(a, b, 0, n).await;
}

/// Writes keys `from..n` as [`write_keys_confirmed`] does (after keys `0..from`).
async fn write_more_keys_confirmed(a: &mut WbClient, b: &mut WbClient, from: usize, n: usize) {
    for i in from..n {
        let k = format!("k{i:03}");
        a.map_set("m", &k, &format!("v{k}")).await;
    }
    b.wait_doc(&format!("{n} keys relayed to the second client"), |c| {
        map_len(&c.doc, "m") as usize >= n && missing_keys(&c.doc, n).is_empty()
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Restarts and crashes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn graceful_restart_keeps_whiteboard_and_chat() {
    let mut server = TestServer::start("");
    let tmp = server.take_tempdir().unwrap();
    let data_dir = server.data_dir.clone();
    let s = session_id("pers-restart");

    let mut wb = server.wb_user(&s, "alice").await;
    wb.map_set("shapes", "rect", "red").await;
    wb.map_set("shapes", "circle", "blue").await;
    wb.text_push("notes", "first line").await;
    wb.text_push("notes", ", more").await;
    wb.barrier().await;
    let expected = doc_json(&wb.doc, &["shapes"], &["notes"]);
    assert_eq!(
        expected,
        json!({"shapes": {"rect": "red", "circle": "blue"}, "notes": "first line, more"})
    );

    let (mut tc, welcome, _) = server.tutor(&s, &token("tina", &s, "tutor")).await;
    assert_eq!(welcome["last_seq"], 0, "new session: {welcome}");
    for (i, t) in ["one", "two", "three"].iter().enumerate() {
        tc.send(&json!({"type": "chat", "text": t})).await;
        let ack = tc
            .wait_for("chat ack", |v| v["type"] == "chat" && v["text"] == *t)
            .await;
        assert_eq!(ack["seq"], i as u64 + 1, "{ack}");
    }

    server.stop_graceful().await;
    drop(server);

    let server = TestServer::start_in(&data_dir, "");
    let fresh = server.wb_user(&s, "bob").await;
    assert_eq!(
        doc_json(&fresh.doc, &["shapes"], &["notes"]),
        expected,
        "whiteboard after a graceful restart"
    );
    let (mut tc, welcome, history) = server.tutor(&s, &token("tina", &s, "tutor")).await;
    assert_eq!(welcome["last_seq"], 3, "last_seq after restart: {welcome}");
    let msgs = history["messages"].as_array().expect("history.messages");
    let got: Vec<(Value, Value)> = msgs
        .iter()
        .map(|m| (m["seq"].clone(), m["text"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (json!(1), json!("one")),
            (json!(2), json!("two")),
            (json!(3), json!("three"))
        ],
        "history after restart: {history}"
    );
    tc.send(&json!({"type": "chat", "text": "four"})).await;
    let m = tc
        .wait_for("ack of the first chat after restart", |v| {
            v["type"] == "chat" && v["text"] == "four"
        })
        .await;
    assert_eq!(m["seq"], 4, "seq must continue after a restart: {m}");
    drop(tmp);
}

/// Moved from the lifecycle tests.
#[tokio::test]
async fn state_survives_graceful_restart() {
    let mut server = TestServer::start("");
    let tmp = server.take_tempdir().unwrap();
    let data_dir = server.data_dir.clone();
    let s = session_id("life-restart");
    {
        let mut wb = server.wb_user(&s, "alice").await;
        wb.map_set("m", "persist", "yes").await;
        wb.text_push("t", "kept text").await;
        wb.barrier().await;
        let (mut tc, _, _) = server.tutor(&s, &token("alice", &s, "tutor")).await;
        for t in ["one", "two"] {
            tc.send(&json!({"type":"chat","text":t})).await;
            tc.wait_for("ack", |v| v["type"] == "chat" && v["text"] == t)
                .await;
        }
        server.sigterm();
        let st = server
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("exit after SIGTERM");
        assert!(st.success(), "{st}");
    }
    drop(server);

    let server = TestServer::start_in(&data_dir, "");
    let fresh = server.wb_user(&s, "bob").await;
    assert_eq!(
        fresh.map_get("m", "persist").as_deref(),
        Some("yes"),
        "whiteboard lost on restart"
    );
    assert_eq!(fresh.text("t"), "kept text");
    let (mut tc, welcome, history) = server.tutor(&s, &token("bob", &s, "student")).await;
    assert_eq!(welcome["last_seq"], 2, "{welcome}");
    let texts: Vec<_> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].clone())
        .collect();
    assert_eq!(texts, vec![json!("one"), json!("two")]);
    tc.send(&json!({"type":"chat","text":"three"})).await;
    let m = tc.wait_type("chat").await;
    assert_eq!(m["seq"], 3, "seq must survive restarts: {m}");
    drop(tmp);
}

/// Moved from the lifecycle tests.
#[tokio::test]
async fn sync_durability_survives_kill_9() {
    let cfg = "[persist]\ndurability = \"sync\"\n";
    let mut server = TestServer::start(cfg);
    let tmp = server.take_tempdir().unwrap();
    let data_dir = server.data_dir.clone();
    let s = session_id("life-kill");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;
    a.map_set("m", "durable", "yes").await;
    // relayed => durable under durability = "sync"
    b.wait_doc("relay", |c| {
        c.map_get("m", "durable").as_deref() == Some("yes")
    })
    .await;
    let (mut tc, _, _) = server.tutor(&s, &token("alice", &s, "tutor")).await;
    tc.send(&json!({"type":"chat","text":"durable chat"})).await;
    tc.wait_type("chat").await;
    server.kill();
    drop(server);

    let server = TestServer::start_in(&data_dir, cfg);
    let fresh = server.wb_user(&s, "carol").await;
    assert_eq!(
        fresh.map_get("m", "durable").as_deref(),
        Some("yes"),
        "relayed update lost by kill -9"
    );
    let (_tc, welcome, history) = server.tutor(&s, &token("carol", &s, "student")).await;
    assert_eq!(welcome["last_seq"], 1, "{welcome}");
    assert_eq!(history["messages"][0]["text"], "durable chat");
    drop(tmp);
}

#[tokio::test]
async fn crash_with_batch_durability_loses_nothing_older_than_flush_interval() {
    // Defaults: durability = "batch", flush_interval_ms = 100.
    let cfg = "[persist]\ndurability = \"batch\"\nflush_interval_ms = 100\n";
    let mut server = TestServer::start(cfg);
    let tmp = server.take_tempdir().unwrap();
    let data_dir = server.data_dir.clone();
    let s = session_id("pers-batch");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;
    write_keys_confirmed(&mut a, &mut b, 200).await;

    // The point of this test is the flush window: SPEC §5.1 promises that what was
    // accepted is on disk within flush_interval_ms (100 ms). Wait five intervals, then kill.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill();
    drop(server);

    let server = TestServer::start_in(&data_dir, cfg);
    let fresh = server.wb_user(&s, "carol").await;
    let missing = missing_keys(&fresh.doc, 200);
    assert!(
        missing.is_empty(),
        "after kill -9 (500 ms after the last accepted update) {} of 200 keys are missing: {:?}",
        missing.len(),
        missing
    );
    drop(tmp);
}

#[tokio::test]
async fn crash_with_sync_durability_loses_nothing_relayed() {
    let cfg = "[persist]\ndurability = \"sync\"\n";
    let mut server = TestServer::start(cfg);
    let tmp = server.take_tempdir().unwrap();
    let data_dir = server.data_dir.clone();
    let s = session_id("pers-sync");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;
    write_keys_confirmed(&mut a, &mut b, 50).await;
    // kill -9 right after the second client saw the last update: no grace period
    server.kill();
    drop(server);

    let server = TestServer::start_in(&data_dir, cfg);
    let fresh = server.wb_user(&s, "carol").await;
    let missing = missing_keys(&fresh.doc, 50);
    assert!(
        missing.is_empty(),
        "durability = \"sync\": relayed updates lost by kill -9: {missing:?}"
    );
    drop(tmp);
}
