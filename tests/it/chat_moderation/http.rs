//! SPEC 4.1 over HTTP: `PATCH`/`DELETE` of messages and `POST` moderation follow the same
//! rules as the WebSocket and reach its clients.

use serde_json::json;

use super::*;

#[tokio::test]
async fn http_patch_delete_and_moderation_follow_the_same_rules() {
    let server = TestServer::start("");
    let s = session_id("mod-http");
    let (mut alice_ws, _, _) = server.tutor(&s, &token("alice", &s, "student")).await;
    let (alice, bob, tina, vic) = (
        token("alice", &s, "student"),
        token("bob", &s, "student"),
        token("tina", &s, "tutor"),
        token("vic", &s, "viewer"),
    );
    let post = |who: String, text: &'static str| {
        let server = &server;
        let path = messages_path(&s);
        async move {
            let r = server
                .api_json("POST", &path, &who, Some(json!({ "text": text })))
                .await;
            assert_eq!(r.status, 201, "{}", r.text());
            r.json()
        }
    };
    assert_eq!(post(alice.clone(), "alice typo").await["seq"], 1);
    assert_eq!(post(bob.clone(), "bob line").await["seq"], 2);
    let one = format!("{}/1", messages_path(&s));
    let two = format!("{}/2", messages_path(&s));

    let r = server
        .api_json("PATCH", &one, &alice, Some(json!({"text":"alice fixed"})))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = r.json();
    assert_eq!(m["text"], "alice fixed");
    assert!(is_rfc3339(m["edited_at"].as_str().unwrap_or("")));
    let e = wait_seq(&mut alice_ws, "chat_edited", 1).await;
    assert_eq!(e["text"], "alice fixed");

    // Refusals.
    let r = server
        .api_json("PATCH", &one, &bob, Some(json!({"text":"no"})))
        .await;
    assert_refusal(&r, 403, Some("forbidden"), "PATCH someone else's");
    let r = server.api_json("DELETE", &one, &bob, None).await;
    assert_refusal(&r, 403, Some("forbidden"), "DELETE someone else's");
    let r = server.api_json("DELETE", &one, &vic, None).await;
    assert_refusal(&r, 403, Some("forbidden"), "viewer DELETE");
    let r = server
        .api_json(
            "PATCH",
            &format!("{}/77", messages_path(&s)),
            &alice,
            Some(json!({"text":"x"})),
        )
        .await;
    assert_refusal(&r, 404, Some("not_found"), "PATCH a missing message");
    let r = server
        .api_json("PATCH", &one, &alice, Some(json!({"text":""})))
        .await;
    assert_refusal(&r, 400, Some("bad_request"), "PATCH with empty text");
    let r = server.api("DELETE", &one, None, None).await;
    assert_refusal(&r, 401, Some("unauthorized"), "DELETE without a token");

    // The tutor deletes bob's line.
    let r = server.api_json("DELETE", &two, &tina, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_deleted_stub(&r.json(), 2);
    let d = wait_seq(&mut alice_ws, "chat_deleted", 2).await;
    assert_eq!(d["by"]["id"], "tina");
    let r = server.api_json("DELETE", &two, &tina, None).await;
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
    let r = server
        .api_json(
            "POST",
            &path,
            &bob,
            Some(json!({"type":"mute","user":"alice"})),
        )
        .await;
    assert_refusal(&r, 403, Some("forbidden"), "a student's moderation");
    let r = server
        .api_json(
            "POST",
            &path,
            &tina,
            Some(json!({"type":"shout","user":"alice"})),
        )
        .await;
    assert_refusal(&r, 400, Some("bad_request"), "unknown moderation");
    let r = server
        .api_json(
            "POST",
            &path,
            &tina,
            Some(json!({"type":"mute","user":"alice","until":"not a time"})),
        )
        .await;
    assert_refusal(&r, 400, Some("bad_request"), "a bad until");
    let r = server
        .api_json(
            "POST",
            &path,
            &tina,
            Some(json!({"type":"mute","user":"alice","until":null})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["type"], "moderation");
    assert_eq!(alice_ws.wait_type("moderation").await["action"], "mute");
    let r = server
        .api_json(
            "POST",
            &messages_path(&s),
            &alice,
            Some(json!({"text":"hi"})),
        )
        .await;
    assert_refusal(&r, 403, Some("forbidden"), "muted");
    let r = server
        .api_json(
            "PATCH",
            &one,
            &alice,
            Some(json!({"text":"edit while muted"})),
        )
        .await;
    assert_eq!(r.json()["reason"], "muted");
    // A muted author may still delete their own message.
    let r = server.api_json("DELETE", &one, &alice, None).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let r = server
        .api_json(
            "POST",
            &path,
            &tina,
            Some(json!({"type":"remove","user":"alice"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["action"], "remove");
    assert_eq!(alice_ws.expect_close(TIMEOUT).await, Some(4403));
    let r = server
        .api_json("PATCH", &one, &alice, Some(json!({"text":"x"})))
        .await;
    assert_refusal(&r, 403, Some("forbidden"), "removed user's PATCH");
}
