//! The size bounds: updates waiting for missing blocks, and the document size.

use super::*;

/// `n` updates of one client, each appending 200 characters to root text "t".
fn text_updates(client: u64, n: usize) -> (Vec<Vec<u8>>, String) {
    let doc = Doc::with_client_id(client);
    let text = doc.get_or_insert_text("t");
    let mut updates = Vec::new();
    for i in 0..n {
        let chunk: String = std::iter::repeat_n((b'a' + (i % 26) as u8) as char, 200).collect();
        let mut txn = doc.transact_mut();
        text.push(&mut txn, &chunk);
        updates.push(txn.encode_update_v1());
    }
    let all = text.get_string(&doc.transact());
    (updates, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_updates_are_bounded_and_survive_a_restart() {
    let config = "[limits]\nmax_pending_bytes = 4096\n";
    let mut server = TestServer::start(config);
    let (updates, all) = text_updates(4_343, 30);
    let each = updates[1].len();
    assert!((200..260).contains(&each), "{each}");
    // How many updates fit under the bound.
    let fit = 4096 / each;

    // Past the bound: 1007, and nothing is relayed.
    let over = session_id("pending-over");
    let mut o = server.wb_user(&over, "o").await;
    let mut w = server.wb_user(&over, "w").await;
    for u in &updates[1..=fit] {
        o.send_update(u.clone()).await;
    }
    let seen = o.barrier().await;
    assert!(seen.iter().all(|m| !is_update(m)), "{seen:?}");
    expect_refused_1007(
        &mut o,
        updates[fit + 1].clone(),
        "the update past 4096 pending bytes",
    )
    .await;
    assert_eq!(
        metric_labelled(&server, "easel_guard_refusals_total{reason=\"pending\"}").await,
        1.0
    );
    let seen = w.barrier().await;
    assert!(seen.iter().all(|m| !is_update(m)), "{seen:?}");
    assert_eq!(w.text("t"), "");

    // Under the bound: accepted and logged. Leave (a snapshot is taken when the last client
    // goes), stop, start again, then send the missing first update: everything integrates.
    let s = session_id("pending");
    let mut p = server.wb_user(&s, "p").await;
    for u in &updates[1..=fit] {
        p.send_update(u.clone()).await;
    }
    let seen = p.barrier().await;
    assert!(seen.iter().all(|m| !is_update(m)), "{seen:?}");
    p.close().await;
    server.stop_graceful().await;
    let tmp = server.take_tempdir();
    let data_dir = server.data_dir.clone();
    let server = TestServer::start_in(&data_dir, config);
    let mut reader = server.wb_user(&s, "reader").await;
    assert_eq!(reader.text("t"), "", "pending content became visible");
    let mut q = server.wb_user(&s, "q").await;
    q.send_update(updates[0].clone()).await;
    let expected: String = all.chars().take(200 * (fit + 1)).collect();
    reader
        .wait_doc("every pending update integrated after the restart", |c| {
            c.text("t").len() == expected.len()
        })
        .await;
    assert_eq!(reader.text("t"), expected);
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_past_max_doc_bytes_is_refused_and_leaves_no_trace() {
    let server = TestServer::start("[limits]\nmax_doc_bytes = 65536\n");
    let s = session_id("doc-size");
    let mut a = server.wb_user(&s, "a").await;
    let mut b = server.wb_user(&s, "b").await;
    let big = |c: char, n: usize| -> String { std::iter::repeat_n(c, n).collect() };

    // 40 KB fits.
    a.map_set("board", "first", &big('f', 40_000)).await;
    b.wait_doc("the first 40 KB", |c| c.map_get("board", "first").is_some())
        .await;

    // 30 KB more would make about 70 KB: 1007, not relayed, not kept.
    let over = map_set_update(71, "board", "second", &big('s', 30_000));
    expect_refused_1007(&mut a, over, "an update past max_doc_bytes").await;
    let seen = b.barrier().await;
    assert!(seen.iter().all(|m| !is_update(m)), "relayed: {seen:?}");
    assert_eq!(b.map_get("board", "second"), None);

    // Over HTTP: 413, and the document is unchanged.
    let student = token("poster", &s, "student");
    let over = map_set_update(72, "board", "third", &big('t', 30_000));
    let r = post_update(&server, &s, &student, &over).await;
    assert_eq!(r.status, 413, "POST past max_doc_bytes: {}", r.text());
    let doc = server.whiteboard_doc(&s, &student).await;
    assert_eq!(doc_map_get(&doc, "board", "second"), None);
    assert_eq!(doc_map_get(&doc, "board", "third"), None);
    assert_eq!(
        doc_map_get(&doc, "board", "first").map(|v| v.len()),
        Some(40_000)
    );
    let seen = b.barrier().await;
    assert!(seen.iter().all(|m| !is_update(m)), "relayed: {seen:?}");
    assert!(
        metric_labelled(&server, "easel_guard_refusals_total{reason=\"doc_size\"}").await >= 2.0
    );

    // What still fits is accepted.
    let r = post_update(
        &server,
        &s,
        &student,
        &map_set_update(73, "board", "small", "ok"),
    )
    .await;
    assert_eq!(
        r.status,
        204,
        "a small update after the refusals: {}",
        r.text()
    );
    b.wait_doc("the small update", |c| {
        c.map_get("board", "small").is_some()
    })
    .await;
}
