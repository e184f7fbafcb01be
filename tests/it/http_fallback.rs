//! The HTTP fallback (SPEC §6): a client with no WebSocket follows and edits a whiteboard and
//! a chat next to WebSocket clients, through the real server.

use std::time::{Duration, Instant};

use crate::support::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::json;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, Map, ReadTxn, Transact, Update};

fn wb_path(session: &str) -> String {
    format!("/api/v2/session/{session}/whiteboard")
}

fn msg_path(session: &str) -> String {
    format!("/api/v2/session/{session}/tutor/messages")
}

/// A document an HTTP-only client keeps, fed by GET answers.
fn apply(doc: &Doc, update: &[u8]) {
    let u = Update::decode_v1(update).expect("the server answers a Yjs v1 update");
    doc.transact_mut().apply_update(u).expect("it applies");
}

fn get_key(doc: &Doc, map: &str, key: &str) -> Option<String> {
    let m = doc.get_or_insert_map(map);
    let txn = doc.transact();
    m.get(&txn, key).map(|v| v.to_string(&txn))
}

fn sv_param(doc: &Doc) -> String {
    URL_SAFE_NO_PAD.encode(doc.transact().state_vector().encode_v1())
}

/// Starts a GET (a long poll) in the background; resolves to the answer and how long it took.
fn spawn_get(
    server: &TestServer,
    path: String,
    token: &str,
) -> tokio::task::JoinHandle<(HttpResponse, Duration)> {
    let addr = server.addr;
    let auth = format!("Bearer {token}");
    let started = Instant::now();
    tokio::spawn(async move {
        let r = http_request(
            addr,
            "GET",
            &path,
            &[("Authorization", auth.as_str())],
            None,
        )
        .await;
        (r, started.elapsed())
    })
}

#[tokio::test]
async fn polling_client_and_websocket_client_edit_one_board() {
    let server = TestServer::start("");
    let s = session_id("http-wb");
    let t = token("poller", &s, "student");
    let mut ws = server.wb_user(&s, "alice").await;

    // The WebSocket client writes; the poller reads the whole state.
    ws.map_set("board", "from_ws", "1").await;
    ws.barrier().await;
    let r = server.api("GET", &wb_path(&s), Some(&t), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mine = Doc::new();
    apply(&mine, &r.body);
    assert_eq!(get_key(&mine, "board", "from_ws").as_deref(), Some("1"));

    // The poller writes; the WebSocket client receives it as a relayed update.
    let update = {
        let m = mine.get_or_insert_map("board");
        let mut txn = mine.transact_mut();
        m.insert(&mut txn, "from_http", "2");
        txn.encode_update_v1()
    };
    let r = server
        .api("POST", &wb_path(&s), Some(&t), Some(&update))
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    ws.wait_doc("the posted update", |c| {
        c.map_get("board", "from_http").as_deref() == Some("2")
    })
    .await;

    // With ?sv= the poller gets only what it lacks: applying it changes nothing it has.
    let r = server
        .api(
            "GET",
            &format!("{}?sv={}", wb_path(&s), sv_param(&mine)),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let before = mine.transact().state_vector();
    apply(&mine, &r.body);
    assert_eq!(
        mine.transact().state_vector(),
        before,
        "the diff held nothing new"
    );
    ws.map_set("board", "later", "3").await;
    ws.barrier().await;
    let r = server
        .api(
            "GET",
            &format!("{}?sv={}", wb_path(&s), sv_param(&mine)),
            Some(&t),
            None,
        )
        .await;
    apply(&mine, &r.body);
    assert_eq!(get_key(&mine, "board", "later").as_deref(), Some("3"));
    assert_eq!(
        doc_json(&mine, &["board"], &[]),
        doc_json(&ws.doc, &["board"], &[]),
        "the poller and the WebSocket client converged"
    );
}

#[tokio::test]
async fn long_poll_is_answered_soon_after_a_websocket_edit() {
    let server = TestServer::start("");
    let s = session_id("http-poll");
    let t = token("poller", &s, "student");
    let mut ws = server.wb_user(&s, "alice").await;
    ws.map_set("board", "a", "1").await;
    ws.barrier().await;
    let mine = Doc::new();
    apply(
        &mine,
        &server.api("GET", &wb_path(&s), Some(&t), None).await.body,
    );

    let path = format!("{}?sv={}&wait=8", wb_path(&s), sv_param(&mine));
    let poll = spawn_get(&server, path, &t);
    // Nothing new yet: the poll must still be waiting a moment later.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), async {
            while !poll.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_err(),
        "a long poll with nothing new answered at once"
    );
    ws.map_set("board", "b", "2").await;
    let (r, elapsed) = poll.await.expect("poll task");
    assert_eq!(r.status, 200);
    assert!(
        elapsed < Duration::from_secs(5),
        "answered after {elapsed:?}"
    );
    apply(&mine, &r.body);
    assert_eq!(get_key(&mine, "board", "b").as_deref(), Some("2"));

    // With nothing new the poll ends after `wait` with an empty update, 200.
    let path = format!("{}?sv={}&wait=1", wb_path(&s), sv_param(&mine));
    let started = Instant::now();
    let r = server.api("GET", &path, Some(&t), None).await;
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let before = mine.transact().state_vector();
    apply(&mine, &r.body);
    assert_eq!(mine.transact().state_vector(), before);
}

#[tokio::test]
async fn whiteboard_post_refusals() {
    let server = TestServer::start("");
    let s = session_id("http-bad");
    let student = token("stu", &s, "student");
    let viewer = token("vie", &s, "viewer");
    let mut ws = server.wb_user(&s, "alice").await;
    ws.map_set("board", "k", "v").await;
    ws.barrier().await;
    let before = server
        .api("GET", &wb_path(&s), Some(&student), None)
        .await
        .body;

    let r = server
        .api(
            "POST",
            &wb_path(&s),
            Some(&student),
            Some(b"\xff\x01garbage"),
        )
        .await;
    assert_refusal(&r, 400, Some("bad_request"), "undecodable update");
    let update = map_set_update(77, "board", "k", "viewer was here");
    let r = server
        .api("POST", &wb_path(&s), Some(&viewer), Some(&update))
        .await;
    assert_refusal(&r, 403, Some("forbidden"), "viewer post");
    let r = server.api("POST", &wb_path(&s), None, Some(&update)).await;
    assert_refusal(&r, 401, Some("unauthorized"), "no token");
    let r = server
        .api(
            "GET",
            &format!("{}?sv=%%%", wb_path(&s)),
            Some(&student),
            None,
        )
        .await;
    assert_refusal(&r, 400, Some("bad_request"), "bad sv");

    let after = server
        .api("GET", &wb_path(&s), Some(&student), None)
        .await
        .body;
    assert_eq!(before, after, "refused posts changed the document");
    // A viewer may read.
    let r = server.api("GET", &wb_path(&s), Some(&viewer), None).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn chat_over_http_and_websocket() {
    let server = TestServer::start("");
    let s = session_id("http-chat");
    let t = token("poller", &s, "student");
    let (mut tutor, _welcome, _history) = server.tutor(&s, &token("alice", &s, "tutor")).await;

    let body = serde_json::to_vec(&json!({"text": "hello from http"})).unwrap();
    let r = server
        .api("POST", &msg_path(&s), Some(&t), Some(&body))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let stored = r.json();
    assert_eq!(stored["seq"], 1);
    assert_eq!(stored["from"]["id"], "poller");
    let relayed = tutor.wait_type("chat").await;
    assert_eq!(relayed["text"], "hello from http");
    assert_eq!(relayed["seq"], 1);

    tutor
        .send(&json!({"type": "chat", "text": "hello from ws"}))
        .await;
    tutor
        .wait_for("own chat ack", |m| m["type"] == "chat" && m["seq"] == 2)
        .await;
    let r = server
        .api("GET", &format!("{}?after=0", msg_path(&s)), Some(&t), None)
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["last_seq"], 2);
    let texts: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["hello from http", "hello from ws"]);
    let r = server
        .api(
            "GET",
            &format!("{}?after=1&limit=1", msg_path(&s)),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.json()["messages"][0]["seq"], 2);

    // Long poll for seq > 2, answered by the next WebSocket chat.
    let poll = spawn_get(&server, format!("{}?after=2&wait=8", msg_path(&s)), &t);
    tutor.send(&json!({"type": "chat", "text": "third"})).await;
    let (r, elapsed) = poll.await.expect("poll task");
    assert!(
        elapsed < Duration::from_secs(5),
        "answered after {elapsed:?}"
    );
    assert_eq!(r.json()["messages"][0]["text"], "third");

    // Refusals.
    let viewer = token("vie", &s, "viewer");
    let r = server
        .api("POST", &msg_path(&s), Some(&viewer), Some(&body))
        .await;
    assert_refusal(&r, 403, Some("forbidden"), "viewer chat");
    let long = serde_json::to_vec(&json!({"text": "é".repeat(8001)})).unwrap();
    let r = server
        .api("POST", &msg_path(&s), Some(&t), Some(&long))
        .await;
    assert_refusal(&r, 413, Some("too_large"), "8001 characters");
    let ok = serde_json::to_vec(&json!({"text": "é".repeat(8000)})).unwrap();
    let r = server.api("POST", &msg_path(&s), Some(&t), Some(&ok)).await;
    assert_eq!(r.status, 201, "8000 characters are allowed");
    let r = server
        .api("POST", &msg_path(&s), Some(&t), Some(b"{}"))
        .await;
    assert_refusal(&r, 400, Some("bad_request"), "no text");
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json_errors() {
    let server = TestServer::start("");
    let r = server.http_get("/api/v2/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "not_found", "{}", r.text());
    let r = http_request(server.addr, "DELETE", "/healthz", &[], None).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"], "method_not_allowed", "{}", r.text());
    // The demo page at / is still served.
    assert_eq!(server.http_get("/").await.status, 200);
    // A path that routes but does not parse (a snapshot number that is not one) is a JSON 400.
    let s = session_id("bad-path");
    let tok = token("tess", &s, "tutor");
    let r = server
        .http_get(&format!("/api/v2/session/{s}/snapshots/abc?token={tok}"))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_request", "{}", r.text());
    // Without a token, a bad parameter is still a 401 first.
    let r = server
        .http_get(&format!("/api/v2/session/{s}/tutor/messages?after=x"))
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    let r = server
        .http_get(&format!(
            "/api/v2/session/{s}/tutor/messages?after=x&token={tok}"
        ))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
}

#[tokio::test]
async fn a_tutor_mints_a_working_student_link_and_nobody_else_can() {
    let server = TestServer::start("");
    let s = session_id("student-link");
    let post = |tok: String| {
        let server = &server;
        let s = s.clone();
        async move {
            let auth = format!("Bearer {tok}");
            let headers = [("Authorization", auth.as_str())];
            http_request(
                server.addr,
                "POST",
                &format!("/api/v2/session/{s}/student-link"),
                &headers,
                None,
            )
            .await
        }
    };
    let r = post(token("tess", &s, "tutor")).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let minted = v["token"].as_str().expect("token").to_string();
    assert_eq!(
        v["path"].as_str(),
        Some(format!("/?session={s}&token={minted}").as_str())
    );
    // The minted token is a student's of this session: it reads and writes the board.
    let doc = server.whiteboard_doc(&s, &minted).await;
    drop(doc);
    let mut student = server.wb(&s, &minted).await;
    student.map_set("board", "from", "student").await;
    student.barrier().await;
    let doc = server.whiteboard_doc(&s, &token("tess", &s, "tutor")).await;
    assert_eq!(
        doc_map_get(&doc, "board", "from").as_deref(),
        Some("student")
    );
    // Students and viewers may not mint; another session's tutor neither.
    assert_eq!(post(token("sam", &s, "student")).await.status, 403);
    assert_eq!(post(token("vic", &s, "viewer")).await.status, 403);
    assert_eq!(post(token("tom", "elsewhere", "tutor")).await.status, 403);
}

#[tokio::test]
async fn a_posted_client_id_is_bounded_like_on_the_websocket() {
    let server = TestServer::start("");
    let s = session_id("http-client-id");
    let tok = token("sam", &s, "student");
    let auth = format!("Bearer {tok}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let path = format!("/api/v2/session/{s}/tutor/messages");
    let long = "x".repeat(129);
    let body = serde_json::json!({"text": "hi", "client_id": long}).to_string();
    let r = http_request(server.addr, "POST", &path, &headers, Some(body.as_bytes())).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"], "too_large");
    let ok = "y".repeat(128);
    let body = serde_json::json!({"text": "hi", "client_id": ok}).to_string();
    let r = http_request(server.addr, "POST", &path, &headers, Some(body.as_bytes())).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["seq"], 1, "the refused one took no seq");
}
