//! Joining a board larger than the send queue (SPEC §3, §7; issue #13): a board up to
//! `limits.max_doc_bytes` is joined at the default `max_send_queue_bytes` (16 MiB), while
//! the session's updates are queued for the joiner too, and several first joiners of an
//! unloaded board all get it.

use std::time::Duration;

use crate::support::*;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use yrs::sync::{Message, SyncMessage};

/// Over the default send queue limit (16 MiB), under the default `max_doc_bytes` (64 MiB).
const BOARD_BYTES: usize = 18_000_000;
/// Each value goes in its own update: a frame is at most `max_frame_bytes` (8 MiB).
const VALUES: usize = 5;

fn value(i: usize) -> String {
    char::from(b'a' + i as u8)
        .to_string()
        .repeat(BOARD_BYTES / VALUES)
}

/// A whiteboard client that takes messages as large as the server's `max_doc_bytes` (a
/// browser has no such limit; tungstenite's default is 16 MiB), no handshake yet.
async fn big_client(
    server: &TestServer,
    s: &str,
    user: &str,
    recv_buffer: Option<u32>,
) -> WbClient {
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (ws, _) = ws_connect_cfg(
        server.addr,
        &TestServer::wb_path(s),
        Some(&token(user, s, "student")),
        TokenVia::Query,
        &[],
        Some(config),
        recv_buffer,
    )
    .await
    .unwrap_or_else(|e| panic!("{user} connect: {}", describe_ws_err(&e)));
    WbClient::new(ws)
}

/// [`big_client`], handshake done.
async fn big_user(server: &TestServer, s: &str, user: &str) -> WbClient {
    let mut c = big_client(server, s, user, None).await;
    c.handshake().await;
    c
}

/// Fills session `s` with [`BOARD_BYTES`] and returns the writer, synced.
async fn big_board(server: &TestServer, s: &str) -> WbClient {
    let mut writer = big_user(server, s, "writer").await;
    for i in 0..VALUES {
        writer.map_set("m", &format!("k{i}"), &value(i)).await;
    }
    // The server has applied all of it once it answers a step 1 after them.
    writer.barrier().await;
    writer
}

fn holds_the_board(c: &WbClient) -> bool {
    (0..VALUES).all(|i| {
        c.map_get("m", &format!("k{i}"))
            .is_some_and(|v| v == value(i))
    })
}

fn step2_len(m: &Message) -> Option<usize> {
    match m {
        Message::Sync(SyncMessage::SyncStep2(u)) => Some(u.len()),
        _ => None,
    }
}

/// The joiner asks for the board twice (as y-websocket's `resyncInterval` does) while the
/// server is still writing the first answer to it and an update of the session waits in
/// its queue: the second answer, larger than the whole queue limit, must still be taken
/// (the old queue took a message over its limit only into an empty queue: it closed the
/// joiner with 1013 and read no further, so the watcher never heard the awareness).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_board_over_the_queue_limit_is_joined_behind_queued_updates() {
    let server = TestServer::start("");
    let s = session_id("big-join");
    let mut writer = big_board(&server, &s).await;
    let mut watcher = big_user(&server, &s, "watcher").await;

    // A small receive buffer: the server's writer is stuck in the first answer until
    // the joiner reads.
    let mut joiner = big_client(&server, &s, "joiner", Some(64 * 1024)).await;
    let first = joiner.next_msg().await;
    assert!(
        matches!(first, Message::Sync(SyncMessage::SyncStep1(_))),
        "greeting: {first:?}"
    );
    let fresh = yrs::StateVector::default();
    joiner
        .send_msg(&Message::Sync(SyncMessage::SyncStep1(fresh.clone())))
        .await;
    // The first answer is being written once its bytes reach the joiner's socket.
    eventually(
        "the first step 2 reaches the joiner's socket",
        TIMEOUT,
        || async {
            let mut probe = [0u8; 1];
            let peeked = tokio::time::timeout(
                Duration::from_millis(50),
                joiner.ws.get_ref().peek(&mut probe),
            )
            .await;
            matches!(peeked, Ok(Ok(n)) if n > 0).then_some(())
        },
    )
    .await;
    // An update of the session, queued for the joiner behind the answer being written.
    writer.map_set("m", "late", "after the join").await;
    watcher
        .wait_doc("the late update relayed", |c| {
            c.map_get("m", "late").is_some()
        })
        .await;
    // Step 1 again, and an awareness update behind it in the same frame: the server
    // reads that only once the step 1 is answered (it walks a frame in order), so once the
    // watcher hears it, the second answer is queued (or refused), with no fixed wait.
    let mut frame = encode_msg(&Message::Sync(SyncMessage::SyncStep1(fresh)));
    frame.extend(awareness_msg(&awareness_update(
        777,
        1,
        r#"{"user":"joiner"}"#,
    )));
    joiner.send_raw(frame).await;
    watcher
        .wait_for(
            "the joiner's awareness, read after its step 1 was answered",
            |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 777).is_some()),
        )
        .await;
    let mut step2s = Vec::new();
    while step2s.len() < 2 {
        match joiner.next_event(Duration::from_secs(60)).await {
            WbEvent::Msg(m, _) => step2s.extend(step2_len(&m)),
            other => panic!("joiner after {} step 2s: {other:?}", step2s.len()),
        }
    }
    assert!(
        step2s.iter().all(|&n| n > 16 * 1024 * 1024),
        "each answer holds the whole board: {step2s:?}"
    );
    assert!(holds_the_board(&joiner));
    assert_eq!(
        joiner.map_get("m", "late").as_deref(),
        Some("after the join")
    );
    assert_eq!(joiner.closed, None, "the joiner stays connected");
    // The session still serves its writer.
    writer.barrier().await;
}

/// Several clients open an unloaded big board at once while its writer keeps writing:
/// every one is synced to the whole board and stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_joiners_of_a_big_board_all_sync_while_it_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = session_id("big-storm");
    {
        let mut server = TestServer::start_in(dir.path(), "");
        let writer = big_board(&server, &s).await;
        writer.close().await;
        server.stop_graceful().await;
    }
    let server = TestServer::start_in(dir.path(), "");
    let mut writer = big_user(&server, &s, "writer").await;
    let joiners: Vec<_> = (0..4)
        .map(|i| {
            let server = &server;
            let s = &s;
            async move {
                let mut c = big_user(server, s, &format!("joiner{i}")).await;
                c.wait_doc("the whole board", holds_the_board).await;
                c
            }
        })
        .collect();
    let writes = async {
        for i in 0..20 {
            writer.map_set("live", &format!("w{i}"), "x").await;
        }
    };
    let (joiners, ()) = tokio::join!(futures_util::future::join_all(joiners), writes);
    for mut c in joiners {
        c.wait_doc("every live write", |c| c.map_get("live", "w19").is_some())
            .await;
        assert!(holds_the_board(&c));
        assert_eq!(c.closed, None);
    }
}
