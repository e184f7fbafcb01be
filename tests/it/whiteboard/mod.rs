//! Whiteboard endpoint (SPEC §3): y-websocket sync, relay, awareness, viewers, keep-alive,
//! and the close codes for bad frames.

use std::time::{Duration, Instant};

use crate::support::*;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::{Doc, Map, ReadTxn, Text, Transact, Update};

mod bad_frames;
mod sequencer;

fn auth_count(c: &WbClient) -> usize {
    c.received
        .iter()
        .filter(|m| matches!(m, Message::Auth(_)))
        .count()
}

fn awareness_with(m: &Message, id: u64) -> Option<String> {
    match m {
        Message::Awareness(u) => awareness_entry(u, id).map(|e| e.json.to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn two_clients_sync_both_ways_map_and_text() {
    let server = TestServer::start("");
    let s = session_id("wb-sync");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;

    a.map_set("shapes", "s1", "circle").await;
    b.wait_doc("map key from A reaches B", |c| {
        c.map_get("shapes", "s1").as_deref() == Some("circle")
    })
    .await;

    b.text_push("notes", "hello from B").await;
    a.wait_doc("text from B reaches A", |c| {
        c.text("notes") == "hello from B"
    })
    .await;

    // concurrent edits converge
    a.text_push("notes", " +A").await;
    b.map_set("shapes", "s2", "square").await;
    a.wait_doc("A sees s2", |c| {
        c.map_get("shapes", "s2").as_deref() == Some("square")
    })
    .await;
    b.wait_doc("B sees +A", |c| c.text("notes").ends_with(" +A"))
        .await;
    assert_eq!(a.text("notes"), b.text("notes"));
    assert_eq!(
        doc_json(&a.doc, &["shapes"], &["notes"]),
        doc_json(&b.doc, &["shapes"], &["notes"])
    );

    assert_eq!(
        a.multi_message_frames, 0,
        "server packed several messages into one frame (A)"
    );
    assert_eq!(
        b.multi_message_frames, 0,
        "server packed several messages into one frame (B)"
    );
}

#[tokio::test]
async fn late_joiner_gets_full_state_via_step1_step2() {
    let server = TestServer::start("");
    let s = session_id("wb-late");
    let mut a = server.wb_user(&s, "alice").await;
    a.map_set("shapes", "k1", "v1").await;
    a.map_set("shapes", "k2", "v2").await;
    a.text_push("notes", "some text").await;
    // the barrier's step 2 proves the server processed A's updates before it
    a.barrier().await;

    // late joiner: the server's step 1 must already contain A's client
    let mut c = server.wb_connect(&s, &token("carol", &s, "student")).await;
    let first = c.next_msg().await;
    let sv = match first {
        Message::Sync(SyncMessage::SyncStep1(sv)) => sv,
        other => panic!("first message must be sync step 1, got {other:?}"),
    };
    let a_client = a.doc.client_id();
    assert!(
        sv.get(&a_client) > 0,
        "server state vector {sv:?} does not include A's client {a_client:?}"
    );
    // answer with our (empty) diff, then ask for the full state
    let diff = c.doc.transact().encode_diff_v1(&sv);
    c.send_msg(&Message::Sync(SyncMessage::SyncStep2(diff)))
        .await;
    let my_sv = c.doc.transact().state_vector();
    c.send_msg(&Message::Sync(SyncMessage::SyncStep1(my_sv)))
        .await;
    c.wait_for("step 2", |m| {
        matches!(m, Message::Sync(SyncMessage::SyncStep2(_)))
    })
    .await;
    assert_eq!(
        doc_json(&c.doc, &["shapes"], &["notes"]),
        doc_json(&a.doc, &["shapes"], &["notes"]),
        "late joiner's document differs after step 2"
    );

    // a joiner with offline content pushes it through its step 2; A gets it relayed
    let mut d = server.wb_connect(&s, &token("dave", &s, "student")).await;
    {
        let m = d.doc.get_or_insert_map("shapes");
        let mut txn = d.doc.transact_mut();
        m.insert(&mut txn, "offline", "from-dave");
    }
    d.handshake().await;
    assert_eq!(d.map_get("shapes", "k1").as_deref(), Some("v1"));
    a.wait_doc("offline content of D via its step 2", |c| {
        c.map_get("shapes", "offline").as_deref() == Some("from-dave")
    })
    .await;
}

#[tokio::test]
async fn update_is_not_echoed_to_sender() {
    let server = TestServer::start("");
    let s = session_id("wb-noecho");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;
    a.map_set("m", "k", "v").await;
    b.wait_doc("B receives the update", |c| {
        c.map_get("m", "k").as_deref() == Some("v")
    })
    .await;
    let before = a.barrier().await;
    let echoed: Vec<_> = before
        .iter()
        .filter(|m| matches!(m, Message::Sync(SyncMessage::Update(_))))
        .collect();
    assert!(
        echoed.is_empty(),
        "sender got its own update echoed: {echoed:?}"
    );
}

#[tokio::test]
async fn update_is_echoed_when_echo_updates_true() {
    let server = TestServer::start("[whiteboard]\necho_updates = true\n");
    let s = session_id("wb-echo");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;
    let sent = a.map_set("m", "k", "v").await;
    let m = a
        .wait_for("the echo of A's own update", |m| {
            matches!(m, Message::Sync(SyncMessage::Update(_)))
        })
        .await;
    if let Message::Sync(SyncMessage::Update(u)) = m {
        let echoed = Update::decode_v1(&u).expect("echo decodes");
        let orig = Update::decode_v1(&sent).unwrap();
        assert_eq!(
            echoed.state_vector(),
            orig.state_vector(),
            "echo does not carry the sent update"
        );
    }
    b.wait_doc("B receives the update", |c| {
        c.map_get("m", "k").as_deref() == Some("v")
    })
    .await;
}

#[tokio::test]
async fn several_messages_in_one_incoming_frame_are_all_applied() {
    let server = TestServer::start("");
    let s = session_id("wb-packed");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;

    let u1 = map_set_update(7001, "packed", "one", "1");
    let u2 = map_set_update(7002, "packed", "two", "2");
    let u3 = map_set_update(7003, "packed", "three", "3");
    let aw = awareness_update(7001, 1, r#"{"cursor":{"x":1}}"#);
    let mut frame = Vec::new();
    frame.extend(update_msg(&u1));
    frame.extend(update_msg(&u2));
    frame.extend(awareness_msg(&aw));
    frame.extend(update_msg(&u3));
    // and a step 1 at the end, which must be answered with a step 2
    frame.extend(encode_msg(&Message::Sync(SyncMessage::SyncStep1(
        a.doc.transact().state_vector(),
    ))));
    a.send_raw(frame).await;

    b.wait_doc("all three packed updates applied", |c| {
        c.map_get("packed", "one").as_deref() == Some("1")
            && c.map_get("packed", "two").as_deref() == Some("2")
            && c.map_get("packed", "three").as_deref() == Some("3")
    })
    .await;
    let seen_aw = b.received.iter().any(|m| awareness_with(m, 7001).is_some());
    if !seen_aw {
        b.wait_for("packed awareness relayed", |m| {
            awareness_with(m, 7001).is_some()
        })
        .await;
    }
    // A gets the step 2 for its packed step 1 (it contains the packed updates, not echoed as updates)
    a.wait_for("step 2 answering the packed step 1", |m| {
        matches!(m, Message::Sync(SyncMessage::SyncStep2(_)))
    })
    .await;
    assert_eq!(a.map_get("packed", "three").as_deref(), Some("3"));
}

#[tokio::test]
async fn awareness_relayed_to_others_and_sender_and_removed_on_close() {
    let server = TestServer::start("");
    let s = session_id("wb-aw");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;

    let state = r#"{"user":{"name":"alice"},"cursor":{"x":10,"y":20}}"#;
    a.send_awareness(&awareness_update(4242, 1, state)).await;

    let got = b
        .wait_for("A's awareness at B", |m| awareness_with(m, 4242).is_some())
        .await;
    let json = awareness_with(&got, 4242).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&json).unwrap(),
        serde_json::from_str::<serde_json::Value>(state).unwrap()
    );
    a.wait_for("A's own awareness relayed back to A", |m| {
        awareness_with(m, 4242).is_some()
    })
    .await;

    // a late joiner gets the current awareness on connect
    let mut c = server.wb_user(&s, "carol").await;
    if !c.received.iter().any(|m| awareness_with(m, 4242).is_some()) {
        c.wait_for("awareness states sent on connect", |m| {
            awareness_with(m, 4242).is_some()
        })
        .await;
    }

    // A disconnects: its awareness client is removed and the removal relayed
    a.close().await;
    let removal = b
        .wait_for("removal of A's awareness", |m| {
            awareness_with(m, 4242).is_some_and(|j| j == "null")
        })
        .await;
    if let Message::Awareness(u) = &removal {
        // SPEC 3: the removal carries the clock the client last used (y-protocols'
        // removeAwarenessStates), so the same client reconnecting is seen again at once.
        assert_eq!(
            awareness_entry(u, 4242).unwrap().clock,
            1,
            "removal must keep the client's clock: {u:?}"
        );
    }
    c.wait_for("removal of A's awareness at C", |m| {
        awareness_with(m, 4242).is_some_and(|j| j == "null")
    })
    .await;
}

#[tokio::test]
async fn query_awareness_is_answered_with_every_state() {
    let server = TestServer::start("");
    let s = session_id("wb-query");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;
    a.send_awareness(&awareness_update(5151, 1, r#"{"name":"a"}"#))
        .await;
    b.send_awareness(&awareness_update(5252, 3, r#"{"name":"b"}"#))
        .await;
    a.wait_for("A sees B's awareness", |m| {
        awareness_with(m, 5252).is_some()
    })
    .await;
    b.wait_for("B sees A's awareness", |m| {
        awareness_with(m, 5151).is_some()
    })
    .await;

    let mut c = server.wb_user(&s, "carol").await;
    c.send_raw(vec![3]).await;
    let ans = c
        .wait_for("awareness answer to query", |m| {
            awareness_with(m, 5151).is_some() && awareness_with(m, 5252).is_some()
        })
        .await;
    if let Message::Awareness(u) = ans {
        assert_eq!(awareness_entry(&u, 5252).unwrap().clock, 3);
    }
}

#[tokio::test]
async fn viewer_update_dropped_with_read_only_and_connection_stays_open() {
    let server = TestServer::start("");
    let s = session_id("wb-viewer");
    let mut st = server.wb_user(&s, "student").await;
    st.map_set("m", "base", "1").await;
    st.barrier().await;
    let mut v = server.wb(&s, &token("watcher", &s, "viewer")).await;
    assert_eq!(
        v.map_get("m", "base").as_deref(),
        Some("1"),
        "viewer can read"
    );

    let auth_during_handshake = auth_count(&v);
    v.map_set("m", "viewer-key", "nope").await;
    let mut raw_auth = v
        .received
        .iter()
        .position(|m| matches!(m, Message::Auth(_)))
        .map(|i| v.received_raw[i].clone());
    let deadline = Instant::now() + TIMEOUT;
    while raw_auth.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match v.next_event(left).await {
            WbEvent::Msg(Message::Auth(reason), raw) => {
                assert_eq!(reason.as_deref(), Some("read-only"), "auth message reason");
                raw_auth = Some(raw);
            }
            WbEvent::Msg(..) => {}
            other => panic!("viewer: expected auth read-only after its update, got {other:?}"),
        }
    }
    if auth_during_handshake > 0 {
        eprintln!("note: the server answered the viewer's (empty) handshake step 2 with the read-only auth message");
    }
    let mut expected = vec![2u8, 0, 9];
    expected.extend_from_slice(b"read-only");
    assert_eq!(raw_auth.unwrap(), expected, "auth frame bytes");

    // stays open: its awareness is relayed to others and itself
    v.send_awareness(&awareness_update(9090, 1, r#"{"cursor":"viewer"}"#))
        .await;
    st.wait_for("viewer's awareness at student", |m| {
        awareness_with(m, 9090).is_some()
    })
    .await;
    v.wait_for("viewer's awareness back at viewer", |m| {
        awareness_with(m, 9090).is_some()
    })
    .await;

    // a second update is dropped too; only the first one is answered
    v.map_set("m", "viewer-key-2", "nope").await;
    v.barrier().await;
    assert_eq!(
        auth_count(&v),
        1,
        "auth answered more than once: {:?}",
        v.received
    );

    // nothing of the viewer's reached the document
    let before = st.barrier().await;
    assert!(
        !before
            .iter()
            .any(|m| matches!(m, Message::Sync(SyncMessage::Update(_)))),
        "a viewer's update was relayed: {before:?}"
    );
    assert_eq!(st.map_get("m", "viewer-key"), None);
    let fresh = server.wb_user(&s, "fresh").await;
    assert_eq!(
        fresh.map_get("m", "viewer-key"),
        None,
        "viewer update reached the server doc"
    );
    assert_eq!(
        fresh.map_get("m", "viewer-key-2"),
        None,
        "viewer update reached the server doc"
    );
    assert_eq!(fresh.map_get("m", "base").as_deref(), Some("1"));
}

#[tokio::test]
async fn keepalive_zero_client_awareness_when_idle() {
    let server = TestServer::start("[whiteboard]\nkeepalive_s = 1\n");
    let s = session_id("wb-keepalive");
    let mut a = server.wb_user(&s, "alone").await;
    let start = Instant::now();
    let mut seen = Vec::new();
    // two keep-alives in a row, each within keepalive_s + slack of the previous
    for i in 0..2 {
        let t0 = Instant::now();
        loop {
            match a.next_event(Duration::from_secs(4)).await {
                WbEvent::Msg(Message::Awareness(u), raw) if u.clients.is_empty() => {
                    assert_eq!(raw, vec![1u8, 1, 0], "keep-alive frame bytes");
                    seen.push(t0.elapsed());
                    break;
                }
                WbEvent::Msg(..) => continue,
                WbEvent::Timeout => panic!(
                    "keep-alive #{i} [1,1,0] did not arrive within 4 s (keepalive_s = 1), {:?} after handshake",
                    start.elapsed()
                ),
                other => panic!("idle connection: {other:?}"),
            }
        }
    }
    assert_eq!(seen.len(), 2);
}
