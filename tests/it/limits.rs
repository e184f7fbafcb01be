//! Limits on the whiteboard (SPEC §3, §7): slow readers are closed with 1013 without
//! delaying the others; rate-limited sync frames are delayed, never dropped.

use std::time::Duration;

use crate::support::*;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::{Map, Transact, Update};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_reader_is_closed_1013_and_fast_reader_gets_everything() {
    let server = TestServer::start("[limits]\nmax_send_queue_bytes = 262144\n");
    let s = session_id("slow-reader");

    let mut writer = server.wb_user(&s, "writer").await;
    let mut fast = server.wb_user(&s, "fast").await;
    // the slow reader: a tiny receive buffer, and after the handshake it never reads
    let (ws, _) = ws_connect_cfg(
        server.addr,
        &TestServer::wb_path(&s),
        Some(&token("slow", &s, "student")),
        TokenVia::Query,
        &[],
        None,
        Some(4096),
    )
    .await
    .unwrap_or_else(|e| panic!("slow reader connect: {}", describe_ws_err(&e)));
    let mut slow = WbClient::new(ws);
    slow.handshake().await;

    // Each update is one 8000-character value under its own key of a Y.Map: no block merging,
    // so every side does constant work per update (a single growing Y.Text would make yrs
    // squash the blocks into one ever larger string, which is quadratic in debug builds).
    const UPDATES: usize = 1200;
    const CHUNK: usize = 8000;
    fn value(i: usize) -> String {
        let c = (b'a' + (i % 26) as u8) as char;
        std::iter::repeat_n(c, CHUNK).collect()
    }
    fn map_len(c: &WbClient) -> usize {
        let m = c.doc.get_or_insert_map("big");
        let txn = c.doc.transact();
        m.len(&txn) as usize
    }

    // The fast receiver reads concurrently while the writer writes. It only reads and
    // decodes frames while the writer runs (applying 8 KB updates to a yrs doc in a debug
    // build is slower than the writer, which would make it a slow reader too); it applies
    // them to its document afterwards.
    // The writer stays at most WINDOW updates ahead of the fast reader, so the fast reader's
    // queue stays far below the limit however slow a debug build decodes; the slow reader,
    // which never reads, still passes it.
    const WINDOW: usize = 8;
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let received_by_fast = received.clone();
    let fast_task = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        let mut updates: Vec<Vec<u8>> = Vec::new();
        while updates.len() < UPDATES {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match ws_next(&mut fast.ws, left).await {
                WsEvent::Binary(b) => {
                    for m in decode_frame(&b).expect("fast reader: frame decodes") {
                        if let Message::Sync(SyncMessage::Update(u)) = m {
                            updates.push(u);
                        }
                        received_by_fast.store(updates.len(), std::sync::atomic::Ordering::Release);
                    }
                }
                other => panic!(
                    "fast reader: {other:?} after {} of {UPDATES} updates",
                    updates.len()
                ),
            }
        }
        for u in updates {
            fast.doc
                .transact_mut()
                .apply_update(Update::decode_v1(&u).expect("relayed update decodes"))
                .expect("relayed update applies");
        }
        fast
    });

    let started = std::time::Instant::now();
    for i in 0..UPDATES {
        writer.map_set("big", &format!("k{i:04}"), &value(i)).await;
        let pace_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while received.load(std::sync::atomic::Ordering::Acquire) + WINDOW < i {
            assert!(
                tokio::time::Instant::now() < pace_deadline,
                "fast reader stalled at {i}"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    eprintln!(
        "writer sent {} bytes in {:?}",
        UPDATES * CHUNK,
        started.elapsed()
    );

    let fast = tokio::time::timeout(Duration::from_secs(120), fast_task)
        .await
        .expect("fast reader did not get everything in time")
        .expect("fast reader task panicked");
    eprintln!("fast reader complete after {:?}", started.elapsed());
    for i in 0..UPDATES {
        assert!(
            fast.map_get("big", &format!("k{i:04}")) == Some(value(i)),
            "fast reader: key k{i:04} missing or wrong"
        );
    }

    // While the slow reader still reads nothing (the server's writer is stuck writing to
    // it), the server ends its connection by itself: only the writer and the fast reader
    // stay. (It used to wait for the 60 s idle timeout: only the stuck writer watched the
    // send queue.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = server.http_get("/api/v2/status").await.json();
        if v["connections"].as_u64() == Some(2) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow reader's connection is still open 20 s after its queue overflowed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // now the slow reader reads: its connection must end, with 1013 if a close frame arrives
    let code = slow.expect_close(Duration::from_secs(30)).await;
    if let Some(code) = code {
        assert_eq!(code, 1013, "slow reader close code");
    }
    eprintln!(
        "slow reader: closed with {code:?} after receiving {} of {UPDATES} updates",
        map_len(&slow)
    );

    // the writer is unaffected
    writer.barrier().await;
    assert!(writer.closed.is_none());
}

#[tokio::test]
async fn rate_limited_sync_frames_are_delayed_not_dropped() {
    let server = TestServer::start("[limits]\nwhiteboard_rate = 20.0\nwhiteboard_burst = 5\n");
    let s = session_id("wb-rate");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;
    let n = 60;
    for i in 0..n {
        a.map_set("m", &format!("k{i}"), &format!("v{i}")).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if (0..n).all(|i| b.map_get("m", &format!("k{i}")).is_some()) {
            break;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match b.next_event(left).await {
            WbEvent::Msg(..) => {}
            other => panic!("waiting for {n} rate-limited updates: {other:?}"),
        }
    }
    a.barrier().await;
    assert!(
        a.closed.is_none(),
        "sync frames under a rate limit closed the connection"
    );
}
