//! `easel serve --redis URL` (cluster mode, one node for now), the `sessions` and
//! `snapshot` commands with `--redis`, and `easel cluster import | export` between a sled
//! directory written by a real server and Redis, and back.

use std::path::Path;

use easel::store::Store;
use serde_json::{json, Value};
use yrs::{Map, Text, Transact};

use super::*;

fn redis_args(args: &[&str], redis: &RedisServer) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    v.extend(["--redis".into(), redis.url()]);
    v
}

/// A map key and a text, written by a real whiteboard client.
async fn write_board(c: &mut WbClient) {
    c.change(|d| {
        let m = d.get_or_insert_map("m");
        let t = d.get_or_insert_text("t");
        let mut txn = d.transact_mut();
        m.insert(&mut txn, "k", "v");
        t.push(&mut txn, "hello text");
    })
    .await;
    c.barrier().await;
}

fn board_of(doc: &yrs::Doc) -> Value {
    json!({"m": root_json(doc, "m", "map"), "t": root_json(doc, "t", "text")})
}

fn expected_board() -> Value {
    json!({"m": {"k": "v"}, "t": "hello text"})
}

/// `GET .../tutor/messages` (all of them).
async fn messages_over_http(server: &TestServer, session: &str, token: &str) -> Value {
    let r = server
        .api(
            "GET",
            &format!("/api/v2/session/{session}/tutor/messages?after=0&limit=200"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "GET messages: {}", r.text());
    r.json()
}

#[tokio::test]
async fn serve_on_redis_keeps_board_and_chat_there() {
    let mut redis = RedisServer::start();
    let server = TestServer::start_with("", &[], &["--redis", &redis.url()]);
    let s = session_id("on-redis");
    let mut c = server.wb_user(&s, "alice").await;
    write_board(&mut c).await;
    let tutor = token("tina", &s, "tutor");
    let (mut t, _, _) = server.tutor(&s, &tutor).await;
    let first = chat(&mut t, "first").await;
    let second = chat(&mut t, "second").await;
    assert_eq!(
        (first["seq"].as_u64(), second["seq"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(server.http_get("/readyz").await.status, 200);

    // It is all in Redis: another node (a store of its own) reads it.
    let other = super::store(&redis, "other", 20);
    let stored = other.load_whiteboard(&s).unwrap();
    assert_eq!(
        board_of(&doc_from_update(&state_of(&stored.updates).0)),
        expected_board()
    );
    let texts: Vec<String> = other
        .chat_after(&s, 0, 10)
        .unwrap()
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts, ["first", "second"]);

    // The operator commands reach the same Redis.
    let version = server.take_snapshot(&s, &tutor).await;
    let out = run_cli(&redis_args(&["sessions"], &redis)).await;
    out.assert_ok("sessions --redis");
    assert!(out.stdout_text().contains(&s), "{}", out.stdout_text());
    let out = run_cli(&redis_args(&["snapshot", "list", &s], &redis)).await;
    out.assert_ok("snapshot list --redis");
    assert!(
        out.stdout_text()
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&version.to_string())),
        "{}",
        out.stdout_text()
    );

    // Redis down: not ready, and back by itself.
    redis.stop();
    eventually("readyz 503 while Redis is down", TIMEOUT, || async {
        (server.http_get("/readyz").await.status == 503).then_some(())
    })
    .await;
    redis.restart();
    eventually("readyz 200 once Redis is back", TIMEOUT, || async {
        (server.http_get("/readyz").await.status == 200).then_some(())
    })
    .await;
    let third = chat(&mut t, "third").await;
    assert_eq!(
        third["seq"].as_u64(),
        Some(3),
        "seqs go on after the outage"
    );
}

#[tokio::test]
async fn a_bad_redis_url_is_refused_at_start() {
    let err = TestServer::try_start(
        "",
        StartOpts {
            args: vec!["--redis".into(), "http://127.0.0.1:6379".into()],
            ..Default::default()
        },
    )
    .err()
    .expect("serve must refuse a URL that is not redis://");
    assert!(err.contains("redis://"), "{err}");
}

#[tokio::test]
async fn import_a_sled_directory_into_redis_and_export_it_back() {
    // A real server on sled writes a board, chat (one message edited) and versions.
    let s = session_id("moving");
    let tutor = token("tina", &s, "tutor");
    let mut sled_server = TestServer::start("");
    let tmp = sled_server.take_tempdir().unwrap();
    let dir = sled_server.data_dir.clone();
    let mut c = sled_server.wb_user(&s, "alice").await;
    write_board(&mut c).await;
    let v1 = sled_server.take_snapshot(&s, &tutor).await;
    c.text_push("t", "!").await;
    c.barrier().await;
    let (mut t, _, _) = sled_server.tutor(&s, &tutor).await;
    for text in ["one", "two", "three"] {
        chat(&mut t, text).await;
    }
    t.send(&json!({"type":"edit","seq":2,"text":"two, fixed"}))
        .await;
    t.wait_type("chat_edited").await;
    let chat_before = messages_over_http(&sled_server, &s, &tutor).await;
    let board_before = board_of(&sled_server.whiteboard_doc(&s, &tutor).await);
    c.close().await;
    t.close().await;
    sled_server.stop_graceful().await;
    drop(sled_server);
    let sled_versions: Vec<u64> = {
        let sled = easel::store::SledStore::open(&dir, 0, 20, None).unwrap();
        sled.list_snapshots(&s)
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect()
    };
    assert!(sled_versions.contains(&v1), "{sled_versions:?}");

    let redis = RedisServer::start();
    // What an import that failed midway leaves: its keys, which a rerun clears first.
    raw(
        &redis,
        &["SET", &format!("easel:{{{s}}}:import:wb:seq"), "999"],
    );
    xadd_not_a_message(&redis, &format!("easel:{{{s}}}:import:chat"), "0-77");
    let out = run_cli(&redis_args(
        &[
            "cluster",
            "import",
            "--data-dir",
            &dir.display().to_string(),
        ],
        &redis,
    ))
    .await;
    out.assert_ok("cluster import");
    assert!(
        out.stdout_text().contains(&format!("imported {s}")),
        "{}",
        out.stdout_text()
    );

    // In Redis: versions with their numbers, chat with seqs, senders and times, the edit.
    let node = super::store(&redis, "check", 20);
    let versions: Vec<u64> = node
        .list_snapshots(&s)
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, sled_versions);
    let stored: Vec<Value> = node
        .chat_after(&s, 0, 100)
        .unwrap()
        .iter()
        .map(|m| serde_json::to_value(m).unwrap())
        .collect();
    assert_eq!(Value::Array(stored), chat_before["messages"]);
    assert_eq!(node.chat_edits_after(&s, (0, 0), 10).unwrap().len(), 1);
    assert!(node.last_chat_seq(&s).unwrap() >= 3);
    // A second import skips what is there.
    let again = run_cli(&redis_args(
        &[
            "cluster",
            "import",
            "--data-dir",
            &dir.display().to_string(),
        ],
        &redis,
    ))
    .await;
    again.assert_ok("second import");
    assert!(
        again.stdout_text().contains(&format!("skipped {s}")),
        "{}",
        again.stdout_text()
    );

    // A node on Redis serves it as it was, and goes on from the imported seqs.
    let node_server = TestServer::start_with("", &[], &["--redis", &redis.url()]);
    assert_eq!(
        board_of(&node_server.whiteboard_doc(&s, &tutor).await),
        board_before
    );
    assert_eq!(
        messages_over_http(&node_server, &s, &tutor).await["messages"],
        chat_before["messages"]
    );
    let (mut t, _, _) = node_server.tutor(&s, &tutor).await;
    let four = chat(&mut t, "four").await;
    assert_eq!(four["seq"].as_u64(), Some(node.last_chat_seq(&s).unwrap()));
    assert!(four["seq"].as_u64() > Some(3));
    t.close().await;
    drop(node_server);
    let chat_after_four = node.chat_after(&s, 0, 100).unwrap();

    // Export: never into a directory with something in it.
    let out = run_cli(&redis_args(
        &[
            "cluster",
            "export",
            "--data-dir",
            &dir.display().to_string(),
        ],
        &redis,
    ))
    .await;
    assert!(
        !out.success(),
        "export into a non-empty directory must fail"
    );
    assert!(out.stderr.contains("not empty"), "{}", out.stderr);
    let back = tmp.path().join("exported");
    let out = run_cli(&redis_args(
        &[
            "cluster",
            "export",
            "--data-dir",
            &back.display().to_string(),
        ],
        &redis,
    ))
    .await;
    out.assert_ok("cluster export");

    // Served from sled again: the same board, chat, versions.
    let served = TestServer::start_in(&back, "");
    assert_eq!(
        board_of(&served.whiteboard_doc(&s, &tutor).await),
        board_before
    );
    let messages = messages_over_http(&served, &s, &tutor).await;
    let expected: Vec<Value> = chat_after_four
        .iter()
        .map(|m| serde_json::to_value(m).unwrap())
        .collect();
    assert_eq!(messages["messages"], Value::Array(expected));
    assert_eq!(served.snapshot_versions(&s, &tutor).await, sled_versions);
    assert!(Path::new(&back).join("versions").join(&s).is_dir());
    let (mut t, _, _) = served.tutor(&s, &tutor).await;
    let five = chat(&mut t, "five").await;
    assert!(five["seq"].as_u64() > four["seq"].as_u64(), "{five}");

    // The restore tool works on Redis too: back to v1 (before the "!"), as a new version.
    let out = run_cli(&redis_args(
        &["snapshot", "restore", &s, "--version", &v1.to_string()],
        &redis,
    ))
    .await;
    out.assert_ok("snapshot restore --redis");
    let restored = node.load_whiteboard(&s).unwrap();
    assert_eq!(
        board_of(&doc_from_update(&state_of(&restored.updates).0)),
        expected_board()
    );
    assert!(restored.snapshot_version > *sled_versions.last().unwrap());
}
