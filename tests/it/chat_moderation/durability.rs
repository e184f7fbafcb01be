//! SPEC 4.1 across a crash and `easel store compact`: edits, deletions, mutes and bans
//! survive a kill -9; compaction purges a deleted message's text from every file.

use serde_json::json;

use super::*;

#[tokio::test]
async fn a_crash_keeps_edits_deletions_mutes_and_bans() {
    let cfg = "[persist]\ndurability = \"sync\"\n";
    let mut server = TestServer::start(cfg);
    let tmp = server.take_tempdir().unwrap();
    let data_dir = server.data_dir.clone();
    let s = session_id("mod-restart");
    let (mut alice, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    let (mut bob, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    let (mut tina, _, _) = server.tutor(&s, &token("tina", &s, "tutor")).await;
    chat(&mut alice, "first").await;
    chat(&mut bob, "second").await;
    chat(&mut alice, "third").await;
    alice
        .send(&json!({"type":"edit","seq":1,"text":"first, edited"}))
        .await;
    wait_seq(&mut tina, "chat_edited", 1).await;
    tina.send(&json!({"type":"delete","seq":2})).await;
    wait_seq(&mut tina, "chat_deleted", 2).await;
    tina.send(&json!({"type":"mute","user":"alice","until":null}))
        .await;
    tina.wait_for("mute", |v| v["action"] == "mute").await;
    tina.send(&json!({"type":"remove","user":"bob"})).await;
    tina.wait_for("remove", |v| v["action"] == "remove").await;
    assert_eq!(bob.expect_close(TIMEOUT).await, Some(4403));

    // kill -9: with durability = "sync", what anyone saw is on disk.
    server.kill();
    drop(server);
    let server = TestServer::start_in(&data_dir, cfg);
    let (mut alice, welcome, history) = server.tutor(&s, &token("alice", &s, "student")).await;
    assert_eq!(welcome["last_seq"], 3);
    let me = participant(&welcome, "alice");
    assert_eq!(me["muted"], true, "the mute survived: {welcome}");
    let first = find(&history["messages"], 1);
    assert_eq!(first["text"], "first, edited");
    assert!(first["edited_at"].is_string());
    assert_deleted_stub(&find(&history["messages"], 2), 2);
    assert_eq!(find(&history["messages"], 3)["text"], "third");
    alice
        .send(&json!({"type":"chat","text":"muted still?"}))
        .await;
    assert_eq!(alice.wait_type("error").await["reason"], "muted");
    let path = format!(
        "{}?token={}",
        TestServer::tutor_path(&s),
        token("bob", &s, "student")
    );
    let r = ws_upgrade_raw(server.addr, &path, &[]).await;
    assert_refusal(&r, 403, Some("forbidden"), "ban after a restart");
    // A resume from before the restart converges too.
    let (mut tina, _, _) = server
        .tutor_q(&s, &token("tina", &s, "tutor"), "after_seq=3")
        .await;
    let after = tina.barrier().await;
    assert!(
        after
            .iter()
            .any(|v| v["type"] == "chat_deleted" && v["seq"] == 2),
        "{after:?}"
    );
    assert!(
        after
            .iter()
            .any(|v| v["type"] == "chat_edited" && v["seq"] == 1 && v["text"] == "first, edited"),
        "{after:?}"
    );
    drop(tmp);
}

#[tokio::test]
async fn store_compact_purges_deleted_text_from_every_file() {
    let mut server = TestServer::start("");
    let tmp = server.take_tempdir().unwrap();
    let data_dir = server.data_dir.clone();
    let s = session_id("mod-compact");
    let secret = format!("purge-me-{}", std::process::id());
    let (mut alice, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    chat(&mut alice, "a line that stays").await;
    chat(&mut alice, &secret).await;
    alice.send(&json!({"type":"delete","seq":2})).await;
    wait_seq(&mut alice, "chat_deleted", 2).await;
    let whiteboard = server.wb_user(&s, "alice").await;
    drop(whiteboard);

    // While the server holds the directory, compact refuses.
    let out = run_cli(&["store", "compact", "--data-dir", data_dir.to_str().unwrap()]).await;
    assert!(
        !out.success(),
        "compact ran beside a server: {}",
        out.stdout_text()
    );
    assert!(out.stderr.contains("in use"), "{}", out.stderr);
    server.stop_graceful().await;
    drop(server);

    // Before compaction, sled's log may still hold the old bytes (why compact exists).
    let before = files_containing(&data_dir, secret.as_bytes());
    eprintln!("files holding the deleted text before compact: {before:?}");

    let out = run_cli(&["store", "compact", "--data-dir", data_dir.to_str().unwrap()]).await;
    out.assert_ok("store compact");
    assert!(
        out.stdout_text().contains("compacted"),
        "{}",
        out.stdout_text()
    );
    let after = files_containing(&data_dir, secret.as_bytes());
    assert!(after.is_empty(), "deleted text still on disk in {after:?}");

    // Everything else is intact.
    let server = TestServer::start_in(&data_dir, "");
    let (_c, welcome, history) = server.tutor(&s, &token("bob", &s, "student")).await;
    assert_eq!(welcome["last_seq"], 2);
    assert_eq!(find(&history["messages"], 1)["text"], "a line that stays");
    assert_deleted_stub(&find(&history["messages"], 2), 2);
    drop(tmp);
}
