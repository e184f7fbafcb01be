//! Correcting and moderating chat (SPEC 4.1): `edit`/`delete` and `mute`/`remove` on the
//! tutor WebSocket and over HTTP, with two students and a tutor; resumes that converge;
//! restarts that keep edits, deletions, mutes and bans; removed users refused on both
//! endpoints; and `easel store compact` purging a deleted message's text from disk.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Sends a chat message and waits for its acknowledgement.
async fn chat(c: &mut TutorClient, text: &str) -> Value {
    c.send(&json!({"type":"chat","text":text})).await;
    let t = text.to_string();
    c.wait_for("own chat acknowledgement", move |v| {
        v["type"] == "chat" && v["text"] == t.as_str()
    })
    .await
}

/// Waits for a message of type `ty` about `seq`.
async fn wait_seq(c: &mut TutorClient, ty: &str, seq: u64) -> Value {
    let t = ty.to_string();
    c.wait_for(&format!("{ty} of seq {seq}"), move |v| {
        v["type"] == t.as_str() && v["seq"] == seq
    })
    .await
}

/// Waits for an error and returns it.
async fn wait_error(c: &mut TutorClient) -> Value {
    c.wait_type("error").await
}

/// The message with `seq` in a list of messages.
fn find(messages: &Value, seq: u64) -> Value {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("not a message list: {messages}"))
        .iter()
        .find(|m| m["seq"] == seq)
        .cloned()
        .unwrap_or_else(|| panic!("no seq {seq} in {messages}"))
}

/// A deleted message is exactly `{"seq","deleted":true,"deleted_at"}`.
fn assert_deleted_stub(m: &Value, seq: u64) {
    let keys: Vec<&str> = m
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {m}"))
        .keys()
        .map(String::as_str)
        .collect();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(keys, ["deleted", "deleted_at", "seq"], "deleted stub: {m}");
    assert_eq!(m["seq"], seq);
    assert_eq!(m["deleted"], true);
    assert!(
        is_rfc3339(m["deleted_at"].as_str().unwrap_or("")),
        "deleted_at: {m}"
    );
}

fn tok(user: &str, s: &str, role: &str) -> String {
    token(user, s, role)
}

/// HTTP with a JSON body and a bearer token.
async fn api_json(
    server: &TestServer,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> HttpResponse {
    let auth = format!("Bearer {token}");
    let body = body.map(|b| b.to_string());
    let mut headers = vec![("Authorization", auth.as_str())];
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    http_request(
        server.addr,
        method,
        path,
        &headers,
        body.as_deref().map(str::as_bytes),
    )
    .await
}

fn messages_path(s: &str) -> String {
    format!("/api/v2/session/{s}/tutor/messages")
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read data dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn edits_and_deletions_reach_everyone_and_show_in_history() {
    let server = TestServer::start("");
    let s = session_id("mod-edit");
    let (mut alice, _, _) = server.tutor(&s, &tok("alice", &s, "student")).await;
    let (mut bob, _, _) = server.tutor(&s, &tok("bob", &s, "student")).await;
    let (mut tina, _, _) = server.tutor(&s, &tok("tina", &s, "tutor")).await;

    chat(&mut alice, "helo").await;
    chat(&mut bob, "second line").await;

    alice
        .send(&json!({"type":"edit","seq":1,"text":"hello"}))
        .await;
    for (who, c) in [
        ("alice", &mut alice),
        ("bob", &mut bob),
        ("tina", &mut tina),
    ] {
        let e = wait_seq(c, "chat_edited", 1).await;
        assert_eq!(e["text"], "hello", "{who}: {e}");
        assert_eq!(e["by"]["id"], "alice", "{who}: {e}");
        assert!(is_rfc3339(e["edited_at"].as_str().unwrap_or("")), "{e}");
    }

    alice.send(&json!({"type":"delete","seq":1})).await;
    for (who, c) in [
        ("alice", &mut alice),
        ("bob", &mut bob),
        ("tina", &mut tina),
    ] {
        let d = wait_seq(c, "chat_deleted", 1).await;
        assert_eq!(d["by"]["id"], "alice", "{who}: {d}");
        assert!(d.get("text").is_none(), "{who}: {d}");
        assert!(is_rfc3339(d["deleted_at"].as_str().unwrap_or("")), "{d}");
    }

    bob.send(&json!({"type":"edit","seq":2,"text":"second line, fixed"}))
        .await;
    wait_seq(&mut tina, "chat_edited", 2).await;

    // A newcomer's history: the deleted message keeps its seq and nothing else; the edited
    // one carries its new text and edited_at.
    let (_carol, welcome, history) = server.tutor(&s, &tok("carol", &s, "student")).await;
    assert_eq!(welcome["last_seq"], 2);
    assert_deleted_stub(&find(&history["messages"], 1), 1);
    let second = find(&history["messages"], 2);
    assert_eq!(second["text"], "second line, fixed");
    assert!(is_rfc3339(second["edited_at"].as_str().unwrap_or("")));
    assert_eq!(second["from"]["id"], "bob");

    // A history request and the HTTP list say the same; the text is served nowhere.
    tina.send(&json!({"type":"history","limit":10})).await;
    let h = tina.wait_type("history").await;
    assert_deleted_stub(&find(&h["messages"], 1), 1);
    let r = server
        .api(
            "GET",
            &messages_path(&s),
            Some(&tok("x", &s, "viewer")),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let list = r.json();
    assert_deleted_stub(&find(&list["messages"], 1), 1);
    assert!(!r.text().contains("helo") && !r.text().contains("\"hello\""));
    let r = server
        .api(
            "GET",
            &format!("{}?after=0", messages_path(&s)),
            Some(&tok("x", &s, "viewer")),
            None,
        )
        .await;
    assert!(!r.text().contains("hello"), "{}", r.text());
}

#[tokio::test]
async fn role_rules_forbidden_and_not_found_over_websocket() {
    let server = TestServer::start("");
    let s = session_id("mod-rules");
    let (mut alice, _, _) = server.tutor(&s, &tok("alice", &s, "student")).await;
    let (mut bob, _, _) = server.tutor(&s, &tok("bob", &s, "student")).await;
    let (mut tina, _, _) = server.tutor(&s, &tok("tina", &s, "tutor")).await;
    let (mut vic, _, _) = server.tutor(&s, &tok("vic", &s, "viewer")).await;

    chat(&mut alice, "alice's line").await;
    chat(&mut bob, "bob's line").await;

    // Not yours: forbidden, and nothing changes.
    bob.send(&json!({"type":"edit","seq":1,"text":"hijacked"}))
        .await;
    let e = wait_error(&mut bob).await;
    assert_eq!(e["code"], "forbidden", "{e}");
    bob.send(&json!({"type":"delete","seq":1})).await;
    assert_eq!(wait_error(&mut bob).await["code"], "forbidden");
    vic.send(&json!({"type":"delete","seq":1})).await;
    assert_eq!(wait_error(&mut vic).await["code"], "forbidden");
    vic.send(&json!({"type":"edit","seq":2,"text":"x"})).await;
    assert_eq!(wait_error(&mut vic).await["code"], "forbidden");

    // No such message: not_found.
    alice
        .send(&json!({"type":"edit","seq":99,"text":"x"}))
        .await;
    assert_eq!(wait_error(&mut alice).await["code"], "not_found");
    alice.send(&json!({"type":"delete","seq":0})).await;
    assert_eq!(wait_error(&mut alice).await["code"], "not_found");

    // Students do not moderate.
    bob.send(&json!({"type":"mute","user":"alice","until":null}))
        .await;
    assert_eq!(wait_error(&mut bob).await["code"], "forbidden");
    bob.send(&json!({"type":"remove","user":"alice"})).await;
    assert_eq!(wait_error(&mut bob).await["code"], "forbidden");
    // The connections stayed open and nothing was announced.
    let seen = alice.barrier().await;
    assert!(
        seen.iter()
            .all(|v| v["type"] != "chat_edited" && v["type"] != "moderation"),
        "{seen:?}"
    );

    // A tutor may edit and delete anyone's message.
    tina.send(&json!({"type":"edit","seq":1,"text":"tidied by the tutor"}))
        .await;
    let e = wait_seq(&mut alice, "chat_edited", 1).await;
    assert_eq!(e["by"]["id"], "tina");
    tina.send(&json!({"type":"delete","seq":2})).await;
    let d = wait_seq(&mut bob, "chat_deleted", 2).await;
    assert_eq!(d["by"]["id"], "tina");

    // A deleted message is gone: editing or deleting it again is not_found.
    bob.send(&json!({"type":"delete","seq":2})).await;
    assert_eq!(wait_error(&mut bob).await["code"], "not_found");
    tina.send(&json!({"type":"edit","seq":2,"text":"back?"}))
        .await;
    assert_eq!(wait_error(&mut tina).await["code"], "not_found");
}

#[tokio::test]
async fn a_resume_with_after_seq_converges_on_edits_and_deletions() {
    let server = TestServer::start("");
    let s = session_id("mod-resume");
    let (mut alice, _, _) = server.tutor(&s, &tok("alice", &s, "student")).await;
    let (mut tina, _, _) = server.tutor(&s, &tok("tina", &s, "tutor")).await;
    for text in ["one", "two", "three"] {
        chat(&mut alice, text).await;
    }
    // An edit made before bob had message 3 is already in what he got.
    alice
        .send(&json!({"type":"edit","seq":1,"text":"one (old edit)"}))
        .await;
    wait_seq(&mut tina, "chat_edited", 1).await;

    let (bob, _, history) = server.tutor(&s, &tok("bob", &s, "student")).await;
    assert_eq!(find(&history["messages"], 1)["text"], "one (old edit)");
    chat(&mut alice, "four").await;
    bob.close().await;

    // While bob is away: an edit and a deletion of messages he has, and a new message.
    alice
        .send(&json!({"type":"edit","seq":2,"text":"two, edited"}))
        .await;
    wait_seq(&mut tina, "chat_edited", 2).await;
    tina.send(&json!({"type":"delete","seq":3})).await;
    wait_seq(&mut alice, "chat_deleted", 3).await;
    chat(&mut alice, "five").await;

    let (mut bob, welcome, history) = server
        .tutor_q(&s, &tok("bob", &s, "student"), "after_seq=4")
        .await;
    assert_eq!(welcome["last_seq"], 5);
    let seqs: Vec<u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [5], "{history}");
    // After the history: the changes to the messages he already had.
    let after: Vec<Value> = bob.barrier().await;
    let edited = after
        .iter()
        .find(|v| v["type"] == "chat_edited" && v["seq"] == 2)
        .unwrap_or_else(|| panic!("no chat_edited for seq 2 after the resume: {after:?}"));
    assert_eq!(edited["text"], "two, edited");
    assert_eq!(edited["by"]["id"], "alice");
    let deleted = after
        .iter()
        .find(|v| v["type"] == "chat_deleted" && v["seq"] == 3)
        .unwrap_or_else(|| panic!("no chat_deleted for seq 3 after the resume: {after:?}"));
    assert_eq!(deleted["by"]["id"], "tina");
    assert!(
        !after.iter().any(|v| v["seq"] == 1),
        "an edit made before message 4 was posted is not resent: {after:?}"
    );

    // A long poll after the newest message wakes for an edit, and carries it.
    let poll = {
        let path = format!("{}?after=5&wait=20", messages_path(&s));
        let token = tok("bob", &s, "student");
        let addr = server.addr;
        tokio::spawn(async move {
            let auth = format!("Bearer {token}");
            http_request(
                addr,
                "GET",
                &path,
                &[("Authorization", auth.as_str())],
                None,
            )
            .await
        })
    };
    // The poll is waiting once the server holds it (long_polls in /api/v2/status).
    eventually("the long poll is held", TIMEOUT, || async {
        let st = server.http_get("/api/v2/status").await.json();
        (st["long_polls"] == 1).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    alice
        .send(&json!({"type":"edit","seq":5,"text":"five, edited"}))
        .await;
    let r = poll.await.expect("long poll task");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the poll did not wake for the edit"
    );
    let body = r.json();
    assert_eq!(body["messages"], json!([]), "{body}");
    assert!(
        body["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .any(|c| c["type"] == "chat_edited" && c["seq"] == 5 && c["text"] == "five, edited"),
        "{body}"
    );

    // The HTTP list after 4 carries the same changes.
    let r = server
        .api(
            "GET",
            &format!("{}?after=4", messages_path(&s)),
            Some(&tok("bob", &s, "student")),
            None,
        )
        .await;
    let body = r.json();
    let changes = body["changes"].as_array().expect("changes").clone();
    assert!(
        changes
            .iter()
            .any(|c| c["type"] == "chat_edited" && c["seq"] == 2 && c["text"] == "two, edited"),
        "{body}"
    );
    assert!(
        changes
            .iter()
            .any(|c| c["type"] == "chat_deleted" && c["seq"] == 3),
        "{body}"
    );
}

#[tokio::test]
async fn a_muted_user_is_refused_chat_and_events_and_welcome_says_so() {
    let server = TestServer::start("");
    let s = session_id("mod-mute");
    let (mut alice, _, _) = server.tutor(&s, &tok("alice", &s, "student")).await;
    let (mut bob, _, _) = server.tutor(&s, &tok("bob", &s, "student")).await;
    let (mut tina, _, _) = server.tutor(&s, &tok("tina", &s, "tutor")).await;
    chat(&mut bob, "before the mute").await;

    tina.send(&json!({"type":"mute","user":"bob","until":null}))
        .await;
    for (who, c) in [
        ("alice", &mut alice),
        ("bob", &mut bob),
        ("tina", &mut tina),
    ] {
        let m = c.wait_type("moderation").await;
        assert_eq!(m["action"], "mute", "{who}: {m}");
        assert_eq!(m["user"], "bob", "{who}: {m}");
        assert!(m["until"].is_null(), "{who}: {m}");
        assert_eq!(m["by"]["id"], "tina", "{who}: {m}");
    }

    bob.send(&json!({"type":"chat","text":"let me speak"}))
        .await;
    let e = wait_error(&mut bob).await;
    assert_eq!(e["code"], "forbidden", "{e}");
    assert_eq!(e["reason"], "muted", "{e}");
    bob.send(&json!({"type":"event","name":"hint","data":{}}))
        .await;
    let e = wait_error(&mut bob).await;
    assert_eq!(
        (e["code"].clone(), e["reason"].clone()),
        (json!("forbidden"), json!("muted"))
    );
    bob.send(&json!({"type":"edit","seq":1,"text":"sneaky"}))
        .await;
    assert_eq!(wait_error(&mut bob).await["reason"], "muted");
    // A muted user's typing is dropped quietly (no error, not relayed).
    bob.send(&json!({"type":"typing","active":true})).await;
    let own = bob.barrier().await;
    assert!(!own.iter().any(|v| v["type"] == "error"), "{own:?}");
    // Nothing of it reached the others.
    let seen = alice.barrier().await;
    assert!(
        !seen
            .iter()
            .any(|v| v["type"] == "chat" || v["type"] == "event" || v["type"] == "typing"),
        "{seen:?}"
    );
    // Over HTTP too.
    let r = api_json(
        &server,
        "POST",
        &messages_path(&s),
        &tok("bob", &s, "student"),
        Some(json!({"text":"via http"})),
    )
    .await;
    assert_refusal(&r, 403, Some("forbidden"), "muted HTTP chat");
    assert_eq!(r.json()["reason"], "muted");

    // welcome shows who is muted.
    let (_bob2, welcome, _) = server.tutor(&s, &tok("bob", &s, "student")).await;
    let me = welcome["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "bob")
        .cloned()
        .unwrap();
    assert_eq!(me["muted"], true, "{welcome}");
    let alice_p = welcome["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "alice")
        .cloned()
        .unwrap();
    assert_eq!(alice_p["muted"], false, "{welcome}");

    // A time in the past unmutes.
    tina.send(&json!({"type":"mute","user":"bob","until":"2000-01-01T00:00:00Z"}))
        .await;
    let m = bob
        .wait_for("unmute", |v| {
            v["type"] == "moderation" && v["action"] == "unmute"
        })
        .await;
    assert_eq!(m["user"], "bob");
    chat(&mut bob, "free again").await;

    // A mute with an end, given with an offset, ends by itself.
    let until =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(2))
            .to_string()
            .replace('Z', "+00:00");
    tina.send(&json!({"type":"mute","user":"bob","until":until}))
        .await;
    let m = bob
        .wait_for("timed mute", |v| {
            v["type"] == "moderation" && v["action"] == "mute"
        })
        .await;
    assert!(m["until"].is_string(), "{m}");
    bob.send(&json!({"type":"chat","text":"still muted?"}))
        .await;
    assert_eq!(wait_error(&mut bob).await["reason"], "muted");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        bob.send(&json!({"type":"chat","text":"after the mute"}))
            .await;
        let v = bob
            .wait_for("chat or error", |v| {
                v["type"] == "chat" || v["type"] == "error"
            })
            .await;
        if v["type"] == "chat" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the timed mute never ended"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn remove_closes_both_endpoints_with_4403_and_refuses_reconnects() {
    let server = TestServer::start("");
    let s = session_id("mod-remove");
    let (mut alice, _, _) = server.tutor(&s, &tok("alice", &s, "student")).await;
    let (mut bob, _, _) = server.tutor(&s, &tok("bob", &s, "student")).await;
    let mut bob_wb = server.wb_user(&s, "bob").await;
    let (mut tina, _, _) = server.tutor(&s, &tok("tina", &s, "tutor")).await;

    tina.send(&json!({"type":"remove","user":"bob"})).await;
    let m = alice.wait_type("moderation").await;
    assert_eq!(m["action"], "remove");
    assert_eq!(m["user"], "bob");
    assert!(is_rfc3339(m["until"].as_str().unwrap_or("")), "{m}");
    let seen = bob.wait_type("moderation").await;
    assert_eq!(seen["action"], "remove");
    assert_eq!(bob.expect_close(TIMEOUT).await, Some(4403));
    assert_eq!(bob_wb.expect_close(TIMEOUT).await, Some(4403));
    alice
        .wait_for("bob left", |v| {
            v["type"] == "presence" && v["event"] == "left"
        })
        .await;

    // New connections to the session: 403 on both endpoints and over HTTP.
    let bob_token = tok("bob", &s, "student");
    let q = format!("?token={bob_token}");
    let r = ws_upgrade_raw(
        server.addr,
        &format!("{}{q}", TestServer::tutor_path(&s)),
        &[],
    )
    .await;
    assert_refusal(&r, 403, Some("forbidden"), "removed user's tutor reconnect");
    let r = ws_upgrade_raw(server.addr, &format!("{}{q}", TestServer::wb_path(&s)), &[]).await;
    assert_refusal(
        &r,
        403,
        Some("forbidden"),
        "removed user's whiteboard reconnect",
    );
    let r = server
        .api("GET", &messages_path(&s), Some(&bob_token), None)
        .await;
    assert_refusal(&r, 403, Some("forbidden"), "removed user's HTTP read");
    // Others are unaffected, and bob may still use other sessions.
    chat(&mut alice, "still here").await;
    let other = session_id("mod-remove-other");
    let (_b, _, _) = server.tutor(&other, &tok("bob", &other, "student")).await;
}

#[tokio::test]
async fn a_ban_ends_after_remove_ban_s() {
    let server = TestServer::start("[tutor]\nremove_ban_s = 1\n");
    let s = session_id("mod-ban-ends");
    let (mut tina, _, _) = server.tutor(&s, &tok("tina", &s, "tutor")).await;
    let (mut bob, _, _) = server.tutor(&s, &tok("bob", &s, "student")).await;
    tina.send(&json!({"type":"remove","user":"bob"})).await;
    assert_eq!(bob.expect_close(TIMEOUT).await, Some(4403));
    let bob_token = tok("bob", &s, "student");
    let path = format!("{}?token={bob_token}", TestServer::tutor_path(&s));
    let r = ws_upgrade_raw(server.addr, &path, &[]).await;
    assert_eq!(r.status, 403);
    eventually("the ban ends", Duration::from_secs(10), || {
        let path = path.clone();
        let addr = server.addr;
        async move {
            let r = ws_upgrade_raw(addr, &path, &[]).await;
            (r.status == 101).then_some(())
        }
    })
    .await;
    let (mut bob, _, _) = server.tutor(&s, &bob_token).await;
    chat(&mut bob, "back after the ban").await;
}

#[tokio::test]
async fn remove_ban_s_is_validated_at_start() {
    let err =
        match TestServer::try_start("[tutor]\nremove_ban_s = 999999999\n", StartOpts::default()) {
            Ok(_) => panic!("a ban of 30 years was accepted"),
            Err(e) => e,
        };
    assert!(err.contains("tutor.remove_ban_s"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn http_patch_delete_and_moderation_follow_the_same_rules() {
    let server = TestServer::start("");
    let s = session_id("mod-http");
    let (mut alice_ws, _, _) = server.tutor(&s, &tok("alice", &s, "student")).await;
    let (alice, bob, tina, vic) = (
        tok("alice", &s, "student"),
        tok("bob", &s, "student"),
        tok("tina", &s, "tutor"),
        tok("vic", &s, "viewer"),
    );
    let post = |who: String, text: &'static str| {
        let server = &server;
        let path = messages_path(&s);
        async move {
            let r = api_json(server, "POST", &path, &who, Some(json!({ "text": text }))).await;
            assert_eq!(r.status, 201, "{}", r.text());
            r.json()
        }
    };
    assert_eq!(post(alice.clone(), "alice typo").await["seq"], 1);
    assert_eq!(post(bob.clone(), "bob line").await["seq"], 2);
    let one = format!("{}/1", messages_path(&s));
    let two = format!("{}/2", messages_path(&s));

    let r = api_json(
        &server,
        "PATCH",
        &one,
        &alice,
        Some(json!({"text":"alice fixed"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = r.json();
    assert_eq!(m["text"], "alice fixed");
    assert!(is_rfc3339(m["edited_at"].as_str().unwrap_or("")));
    let e = wait_seq(&mut alice_ws, "chat_edited", 1).await;
    assert_eq!(e["text"], "alice fixed");

    // Refusals.
    let r = api_json(&server, "PATCH", &one, &bob, Some(json!({"text":"no"}))).await;
    assert_refusal(&r, 403, Some("forbidden"), "PATCH someone else's");
    let r = api_json(&server, "DELETE", &one, &bob, None).await;
    assert_refusal(&r, 403, Some("forbidden"), "DELETE someone else's");
    let r = api_json(&server, "DELETE", &one, &vic, None).await;
    assert_refusal(&r, 403, Some("forbidden"), "viewer DELETE");
    let r = api_json(
        &server,
        "PATCH",
        &format!("{}/77", messages_path(&s)),
        &alice,
        Some(json!({"text":"x"})),
    )
    .await;
    assert_refusal(&r, 404, Some("not_found"), "PATCH a missing message");
    let r = api_json(&server, "PATCH", &one, &alice, Some(json!({"text":""}))).await;
    assert_refusal(&r, 400, Some("bad_request"), "PATCH with empty text");
    let r = server.api("DELETE", &one, None, None).await;
    assert_refusal(&r, 401, Some("unauthorized"), "DELETE without a token");

    // The tutor deletes bob's line.
    let r = api_json(&server, "DELETE", &two, &tina, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_deleted_stub(&r.json(), 2);
    let d = wait_seq(&mut alice_ws, "chat_deleted", 2).await;
    assert_eq!(d["by"]["id"], "tina");
    let r = api_json(&server, "DELETE", &two, &tina, None).await;
    assert_refusal(&r, 404, Some("not_found"), "DELETE twice");
    let r = server
        .api("GET", &messages_path(&s), Some(&vic), None)
        .await;
    let list = r.json();
    assert_deleted_stub(&find(&list["messages"], 2), 2);
    assert_eq!(find(&list["messages"], 1)["text"], "alice fixed");
    assert!(!r.text().contains("bob line"));

    // Moderation over HTTP.
    let path = format!("/api/v2/session/{s}/tutor/moderation");
    let r = api_json(
        &server,
        "POST",
        &path,
        &bob,
        Some(json!({"type":"mute","user":"alice"})),
    )
    .await;
    assert_refusal(&r, 403, Some("forbidden"), "a student's moderation");
    let r = api_json(
        &server,
        "POST",
        &path,
        &tina,
        Some(json!({"type":"shout","user":"alice"})),
    )
    .await;
    assert_refusal(&r, 400, Some("bad_request"), "unknown moderation");
    let r = api_json(
        &server,
        "POST",
        &path,
        &tina,
        Some(json!({"type":"mute","user":"alice","until":"not a time"})),
    )
    .await;
    assert_refusal(&r, 400, Some("bad_request"), "a bad until");
    let r = api_json(
        &server,
        "POST",
        &path,
        &tina,
        Some(json!({"type":"mute","user":"alice","until":null})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["type"], "moderation");
    assert_eq!(alice_ws.wait_type("moderation").await["action"], "mute");
    let r = api_json(
        &server,
        "POST",
        &messages_path(&s),
        &alice,
        Some(json!({"text":"hi"})),
    )
    .await;
    assert_refusal(&r, 403, Some("forbidden"), "muted");
    let r = api_json(
        &server,
        "PATCH",
        &one,
        &alice,
        Some(json!({"text":"edit while muted"})),
    )
    .await;
    assert_eq!(r.json()["reason"], "muted");
    // A muted author may still delete their own message.
    let r = api_json(&server, "DELETE", &one, &alice, None).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let r = api_json(
        &server,
        "POST",
        &path,
        &tina,
        Some(json!({"type":"remove","user":"alice"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["action"], "remove");
    assert_eq!(alice_ws.expect_close(TIMEOUT).await, Some(4403));
    let r = api_json(&server, "PATCH", &one, &alice, Some(json!({"text":"x"}))).await;
    assert_refusal(&r, 403, Some("forbidden"), "removed user's PATCH");
}

// ---------------------------------------------------------------------------------------------
// Durability and compaction
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_crash_keeps_edits_deletions_mutes_and_bans() {
    let cfg = "[persist]\ndurability = \"sync\"\n";
    let mut server = TestServer::start(cfg);
    let tmp = server.take_tempdir().unwrap();
    let data_dir = server.data_dir.clone();
    let s = session_id("mod-restart");
    let (mut alice, _, _) = server.tutor(&s, &tok("alice", &s, "student")).await;
    let (mut bob, _, _) = server.tutor(&s, &tok("bob", &s, "student")).await;
    let (mut tina, _, _) = server.tutor(&s, &tok("tina", &s, "tutor")).await;
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
    let (mut alice, welcome, history) = server.tutor(&s, &tok("alice", &s, "student")).await;
    assert_eq!(welcome["last_seq"], 3);
    let me = welcome["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "alice")
        .cloned()
        .unwrap();
    assert_eq!(me["muted"], true, "the mute survived: {welcome}");
    let first = find(&history["messages"], 1);
    assert_eq!(first["text"], "first, edited");
    assert!(first["edited_at"].is_string());
    assert_deleted_stub(&find(&history["messages"], 2), 2);
    assert_eq!(find(&history["messages"], 3)["text"], "third");
    alice
        .send(&json!({"type":"chat","text":"muted still?"}))
        .await;
    assert_eq!(wait_error(&mut alice).await["reason"], "muted");
    let path = format!(
        "{}?token={}",
        TestServer::tutor_path(&s),
        tok("bob", &s, "student")
    );
    let r = ws_upgrade_raw(server.addr, &path, &[]).await;
    assert_refusal(&r, 403, Some("forbidden"), "ban after a restart");
    // A resume from before the restart converges too.
    let (mut tina, _, _) = server
        .tutor_q(&s, &tok("tina", &s, "tutor"), "after_seq=3")
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
    let (mut alice, _, _) = server.tutor(&s, &tok("alice", &s, "student")).await;
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
    let (_c, welcome, history) = server.tutor(&s, &tok("bob", &s, "student")).await;
    assert_eq!(welcome["last_seq"], 2);
    assert_eq!(find(&history["messages"], 1)["text"], "a line that stays");
    assert_deleted_stub(&find(&history["messages"], 2), 2);
    drop(tmp);
}
