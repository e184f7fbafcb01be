//! SPEC 4.1 over the tutor WebSocket: edits and deletions relayed and served from history,
//! the role rules, resumes that converge, mutes, and removals closing both endpoints.

use std::time::Duration;

use serde_json::{json, Value};

use super::*;

#[tokio::test]
async fn edits_and_deletions_reach_everyone_and_show_in_history() {
    let server = TestServer::start("");
    let s = session_id("mod-edit");
    let (mut alice, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    let (mut bob, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    let (mut tina, _, _) = server.tutor(&s, &token("tina", &s, "tutor")).await;

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
    let (_carol, welcome, history) = server.tutor(&s, &token("carol", &s, "student")).await;
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
            Some(&token("x", &s, "viewer")),
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
            Some(&token("x", &s, "viewer")),
            None,
        )
        .await;
    assert!(!r.text().contains("hello"), "{}", r.text());
}

#[tokio::test]
async fn role_rules_forbidden_and_not_found_over_websocket() {
    let server = TestServer::start("");
    let s = session_id("mod-rules");
    let (mut alice, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    let (mut bob, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    let (mut tina, _, _) = server.tutor(&s, &token("tina", &s, "tutor")).await;
    let (mut vic, _, _) = server.tutor(&s, &token("vic", &s, "viewer")).await;

    chat(&mut alice, "alice's line").await;
    chat(&mut bob, "bob's line").await;

    // Not yours: forbidden, and nothing changes.
    bob.send(&json!({"type":"edit","seq":1,"text":"hijacked"}))
        .await;
    let e = bob.wait_type("error").await;
    assert_eq!(e["code"], "forbidden", "{e}");
    bob.send(&json!({"type":"delete","seq":1})).await;
    assert_eq!(bob.wait_type("error").await["code"], "forbidden");
    vic.send(&json!({"type":"delete","seq":1})).await;
    assert_eq!(vic.wait_type("error").await["code"], "forbidden");
    vic.send(&json!({"type":"edit","seq":2,"text":"x"})).await;
    assert_eq!(vic.wait_type("error").await["code"], "forbidden");

    // No such message: not_found.
    alice
        .send(&json!({"type":"edit","seq":99,"text":"x"}))
        .await;
    assert_eq!(alice.wait_type("error").await["code"], "not_found");
    alice.send(&json!({"type":"delete","seq":0})).await;
    assert_eq!(alice.wait_type("error").await["code"], "not_found");

    // Students do not moderate.
    bob.send(&json!({"type":"mute","user":"alice","until":null}))
        .await;
    assert_eq!(bob.wait_type("error").await["code"], "forbidden");
    bob.send(&json!({"type":"remove","user":"alice"})).await;
    assert_eq!(bob.wait_type("error").await["code"], "forbidden");
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
    assert_eq!(bob.wait_type("error").await["code"], "not_found");
    tina.send(&json!({"type":"edit","seq":2,"text":"back?"}))
        .await;
    assert_eq!(tina.wait_type("error").await["code"], "not_found");
}

#[tokio::test]
async fn a_resume_with_after_seq_converges_on_edits_and_deletions() {
    let server = TestServer::start("");
    let s = session_id("mod-resume");
    let (mut alice, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    let (mut tina, _, _) = server.tutor(&s, &token("tina", &s, "tutor")).await;
    for text in ["one", "two", "three"] {
        chat(&mut alice, text).await;
    }
    // An edit made before bob had message 3 is already in what he got.
    alice
        .send(&json!({"type":"edit","seq":1,"text":"one (old edit)"}))
        .await;
    wait_seq(&mut tina, "chat_edited", 1).await;

    let (bob, _, history) = server.tutor(&s, &token("bob", &s, "student")).await;
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
        .tutor_q(&s, &token("bob", &s, "student"), "after_seq=4")
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
        let token = token("bob", &s, "student");
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
            Some(&token("bob", &s, "student")),
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
    let (mut alice, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    let (mut bob, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    let (mut tina, _, _) = server.tutor(&s, &token("tina", &s, "tutor")).await;
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
    let e = bob.wait_type("error").await;
    assert_eq!(e["code"], "forbidden", "{e}");
    assert_eq!(e["reason"], "muted", "{e}");
    bob.send(&json!({"type":"event","name":"hint","data":{}}))
        .await;
    let e = bob.wait_type("error").await;
    assert_eq!(
        (e["code"].clone(), e["reason"].clone()),
        (json!("forbidden"), json!("muted"))
    );
    bob.send(&json!({"type":"edit","seq":1,"text":"sneaky"}))
        .await;
    assert_eq!(bob.wait_type("error").await["reason"], "muted");
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
    let r = server
        .api_json(
            "POST",
            &messages_path(&s),
            &token("bob", &s, "student"),
            Some(json!({"text":"via http"})),
        )
        .await;
    assert_refusal(&r, 403, Some("forbidden"), "muted HTTP chat");
    assert_eq!(r.json()["reason"], "muted");

    // welcome shows who is muted.
    let (_bob2, welcome, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    let me = participant(&welcome, "bob");
    assert_eq!(me["muted"], true, "{welcome}");
    let alice_p = participant(&welcome, "alice");
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
    assert_eq!(bob.wait_type("error").await["reason"], "muted");
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
    let (mut alice, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    let (mut bob, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    let mut bob_wb = server.wb_user(&s, "bob").await;
    let (mut tina, _, _) = server.tutor(&s, &token("tina", &s, "tutor")).await;

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
    let bob_token = token("bob", &s, "student");
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
    let (_b, _, _) = server.tutor(&other, &token("bob", &other, "student")).await;
}

#[tokio::test]
async fn a_ban_ends_after_remove_ban_s() {
    let server = TestServer::start("[tutor]\nremove_ban_s = 1\n");
    let s = session_id("mod-ban-ends");
    let (mut tina, _, _) = server.tutor(&s, &token("tina", &s, "tutor")).await;
    let (mut bob, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    tina.send(&json!({"type":"remove","user":"bob"})).await;
    assert_eq!(bob.expect_close(TIMEOUT).await, Some(4403));
    let bob_token = token("bob", &s, "student");
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

/// The session routes that read the store without opening the session refuse a removed
/// user too: listing and reading snapshots (the whiteboard's content) and, for a removed
/// tutor, minting a student link (a fresh identity that would walk past the ban).
#[tokio::test]
async fn a_removed_user_is_refused_snapshots_and_student_links() {
    let server = TestServer::start("");
    let s = session_id("mod-remove-routes");
    let (mut ada, _, _) = server.tutor(&s, &token("ada", &s, "admin")).await;
    let (mut tom, _, _) = server.tutor(&s, &token("tom", &s, "tutor")).await;
    ada.send(&json!({"type":"remove","user":"tom"})).await;
    assert_eq!(tom.expect_close(TIMEOUT).await, Some(4403));
    let tom_token = token("tom", &s, "tutor");
    for (method, path) in [
        ("GET", format!("/api/v2/session/{s}/snapshots")),
        ("GET", format!("/api/v2/session/{s}/snapshots/1")),
        ("POST", format!("/api/v2/session/{s}/student-link")),
    ] {
        let r = server.api(method, &path, Some(&tom_token), None).await;
        let what = format!("removed tutor: {method} {path}");
        assert_refusal(&r, 403, Some("forbidden"), &what);
        // A page tells "removed" from "no access" by it.
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        assert_eq!(body["reason"], "removed", "{what}: {body}");
    }
    // Others still may.
    let ada_token = token("ada", &s, "admin");
    let r = server
        .api(
            "GET",
            &format!("/api/v2/session/{s}/snapshots"),
            Some(&ada_token),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "admin's snapshot list");
}

/// A tutor may not moderate an admin, and cannot get round that by muting or removing the
/// admin's id while the admin is away: the admin comes in, unmuted, and stays when the
/// removals are published again. The same id as a student is held to them.
#[tokio::test]
async fn a_tutor_cannot_mute_or_remove_an_absent_admin() {
    let server = TestServer::start("");
    let s = session_id("mod-absent-admin");
    let (mut tina, _, _) = server.tutor(&s, &token("tina", &s, "tutor")).await;
    let (mut bob, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    tina.send(&json!({"type":"mute","user":"ada","until":null}))
        .await;
    tina.wait_for("ada muted", |v| {
        v["type"] == "moderation" && v["action"] == "mute"
    })
    .await;
    tina.send(&json!({"type":"remove","user":"ada"})).await;
    tina.wait_for("ada removed", |v| {
        v["type"] == "moderation" && v["action"] == "remove"
    })
    .await;

    let ada_token = token("ada", &s, "admin");
    let (mut ada, welcome, _) = server.tutor(&s, &ada_token).await;
    assert_eq!(participant(&welcome, "ada")["muted"], false, "{welcome}");
    chat(&mut ada, "admin here").await;
    let r = server
        .api("GET", &messages_path(&s), Some(&ada_token), None)
        .await;
    assert_eq!(r.status, 200, "admin's HTTP read");
    // Another removal publishes the removed users again: the admin stays.
    tina.send(&json!({"type":"remove","user":"bob"})).await;
    assert_eq!(bob.expect_close(TIMEOUT).await, Some(4403));
    ada.wait_for("bob's removal", |v| {
        v["type"] == "moderation" && v["user"] == "bob"
    })
    .await;
    chat(&mut ada, "still here").await;

    let as_student = token("ada", &s, "student");
    let r = server
        .api("GET", &messages_path(&s), Some(&as_student), None)
        .await;
    assert_refusal(&r, 403, Some("forbidden"), "the same id as a student");
}
