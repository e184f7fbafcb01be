//! Hostile documents against the real binary over real sockets (SPEC.md 3 and 7.1): nesting
//! bombs in `Any` values and in shared types, poison pills in the store, the pending and
//! document size bounds, awareness floods, and the clock of a relayed awareness removal.
//!
//! Every test here failed on the code before the update guard (commit 5abd628): most by
//! killing the process (a stack overflow in `yrs`'s recursive decoder), the others by
//! accepting what the guard now refuses. See notes/doctests.md for which failed how.

use std::time::{Duration, Instant};

use crate::support::*;
use yrs::sync::{Message, SyncMessage};
use yrs::types::ToJson;
use yrs::{Doc, GetString, Map, MapPrelim, MapRef, Out, ReadTxn, Text, Transact};

// ---------------------------------------------------------------------------------------------
// Crafted updates
// ---------------------------------------------------------------------------------------------

/// Root map, key and client of the crafted bombs.
const BOMB_MAP: &str = "m";
const BOMB_KEY: &str = "k";

/// An update setting key "k" of root map "m" to an `Any` array nested `depth` deep: two bytes
/// a level, so 7,000 levels are 14 KB (the same bytes as `deep_any_update` in guard.rs).
fn deep_any_update(depth: usize) -> Vec<u8> {
    // One client (1) with one struct at clock 0: an item of Any content (info 8) with a
    // parent sub (0x20), parent root "m", key "k", one value.
    let mut b = vec![1, 1, 1, 0, 0b0010_1000, 1, 1, b'm', 1, b'k', 1];
    // `depth` arrays of one element each (tag 117, length 1), then null (126).
    b.extend(std::iter::repeat_n([117u8, 1], depth).flatten());
    b.push(126);
    // Empty delete set.
    b.push(0);
    b
}

/// A chain of `depth` nested Y.Maps under key "k" of root map "m", all in one update of
/// `client`: item i (clock i) is a Y.Map whose parent is the map item i-1 created. Written
/// by hand so that 20,000 levels cost the test nothing (checked against yrs in
/// `crafted_updates_are_what_they_claim`).
fn map_chain_update(client: u64, depth: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(depth * 8 + 16);
    write_var_uint(&mut b, 1); // one client
    write_var_uint(&mut b, depth as u64); // structs
    write_var_uint(&mut b, client);
    write_var_uint(&mut b, 0); // first clock
    for i in 0..depth {
        // Type content (7), with a parent sub (0x20), no origins: the parent is explicit.
        b.push(0x27);
        if i == 0 {
            write_var_uint(&mut b, 1); // a root type by name
            write_var_buf(&mut b, BOMB_MAP.as_bytes());
        } else {
            write_var_uint(&mut b, 0); // the type created by item (client, i - 1)
            write_var_uint(&mut b, client);
            write_var_uint(&mut b, (i - 1) as u64);
        }
        write_var_buf(&mut b, BOMB_KEY.as_bytes());
        b.push(1); // type ref: Y.Map
    }
    b.push(0); // empty delete set
    b
}

/// How many Y.Maps are nested under m.k, m.k.k, ... in `doc`.
fn chain_depth(doc: &Doc) -> usize {
    let root = doc.get_or_insert_map(BOMB_MAP);
    let txn = doc.transact();
    let mut depth = 0;
    let mut current: Option<MapRef> = match root.get(&txn, BOMB_KEY) {
        Some(Out::YMap(m)) => Some(m),
        _ => None,
    };
    while let Some(m) = current {
        depth += 1;
        current = match m.get(&txn, BOMB_KEY) {
            Some(Out::YMap(next)) => Some(next),
            _ => None,
        };
    }
    depth
}

/// Whether root map "m" has key "k" at all (for the `Any` bomb: it must leave no trace).
fn has_bomb_key(doc: &Doc) -> bool {
    let root = doc.get_or_insert_map(BOMB_MAP);
    let txn = doc.transact();
    root.get(&txn, BOMB_KEY).is_some()
}

/// A raw awareness message announcing `count` clients with ids `first..first + count`,
/// clock 1 and state `{}`: about seven bytes a client.
fn awareness_flood(first: u64, count: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(count as usize * 7 + 8);
    write_var_uint(&mut payload, count);
    for id in first..first + count {
        write_var_uint(&mut payload, id);
        write_var_uint(&mut payload, 1);
        write_var_buf(&mut payload, b"{}");
    }
    let mut msg = vec![1];
    write_var_buf(&mut msg, &payload);
    msg
}

#[test]
fn crafted_updates_are_what_they_claim() {
    // The Any bomb at a harmless depth is a valid update whose value nests that deep.
    let doc = doc_from_update(&deep_any_update(5));
    let root = doc.get_or_insert_map(BOMB_MAP);
    let txn = doc.transact();
    let json = any_to_json(&root.to_json(&txn));
    assert_eq!(json, serde_json::json!({"k": [[[[[null]]]]]}));
    drop(txn);
    // The hand-written chain is the chain yrs would build.
    let doc = doc_from_update(&map_chain_update(77, 6));
    assert_eq!(chain_depth(&doc), 6);
    // About seven bytes a client: a million fit in one 8 MiB frame.
    let flood = awareness_flood(1, 1_000_000);
    assert!(flood.len() < 8 * 1024 * 1024, "{}", flood.len());
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn healthz(server: &TestServer) -> u16 {
    server.http_get("/healthz").await.status
}

/// A labelled Prometheus sample, e.g. `easel_guard_refusals_total{reason="awareness"}`
/// (0 when absent: a counter not yet incremented may not be listed).
async fn metric_labelled(server: &TestServer, sample: &str) -> f64 {
    let text = server.http_get("/metrics").await.text();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .unwrap_or(0.0)
}

/// Peak resident memory (VmHWM) of a process in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

async fn post_update(server: &TestServer, session: &str, token: &str, body: &[u8]) -> HttpResponse {
    server
        .api(
            "POST",
            &format!("/api/v2/session/{session}/whiteboard"),
            Some(token),
            Some(body),
        )
        .await
}

/// Sends `update` and asserts that the server closes the connection with 1007.
async fn expect_refused_1007(client: &mut WbClient, update: Vec<u8>, what: &str) {
    // The server may close before the whole frame is read: a failed send is fine.
    let _ = client.try_send_raw(update_msg(&update)).await;
    let code = client.expect_close(TIMEOUT).await;
    assert_eq!(code, Some(1007), "{what}: expected close 1007");
}

/// Nests one more Y.Map under the deepest one of the chain in the client's own document and
/// sends that change alone; returns the new map.
fn nest_one_level(client: &mut WbClient, parent: Option<&MapRef>) -> (MapRef, Vec<u8>) {
    let root = client.doc.get_or_insert_map(BOMB_MAP);
    let sv = client.doc.transact().state_vector();
    let child = {
        let mut txn = client.doc.transact_mut();
        match parent {
            None => root.insert(&mut txn, BOMB_KEY, MapPrelim::default()),
            Some(p) => p.insert(&mut txn, BOMB_KEY, MapPrelim::default()),
        }
    };
    let update = client.doc.transact().encode_diff_v1(&sv);
    (child, update)
}

/// Builds the chain one level per update on a fresh connection until the server refuses a
/// level with 1007; returns the number of the refused level (1: the first nested map).
async fn nest_until_refused(server: &TestServer, session: &str, max_levels: usize) -> usize {
    let mut c = server.wb_user(session, "nester").await;
    let mut parent: Option<MapRef> = None;
    for level in 1..=max_levels {
        let (child, update) = nest_one_level(&mut c, parent.as_ref());
        let _ = c.try_send_raw(update_msg(&update)).await;
        // A round trip: the server answers step 1 only if it kept the connection.
        let sv = c.doc.transact().state_vector();
        let _ = c
            .try_send_raw(encode_msg(&Message::Sync(SyncMessage::SyncStep1(sv))))
            .await;
        loop {
            match c.next_event(TIMEOUT).await {
                WbEvent::Msg(Message::Sync(SyncMessage::SyncStep2(_)), _) => break,
                WbEvent::Msg(..) => {}
                WbEvent::Close(code, reason) => {
                    assert_eq!(code, Some(1007), "level {level} refused with {reason:?}");
                    return level;
                }
                other => panic!("level {level}: {other:?}"),
            }
        }
        parent = Some(child);
    }
    panic!("{max_levels} nested levels were all accepted");
}

// ---------------------------------------------------------------------------------------------
// 1. Any nested 7,000 deep
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_value_nested_7000_deep_is_refused_and_the_process_stays_up() {
    let server = TestServer::start("");
    let s = session_id("deep-any");
    let mut a = server.wb_user(&s, "a").await;
    let mut b = server.wb_user(&s, "b").await;
    a.map_set("before", "x", "1").await;
    b.wait_doc("the edit before", |c| c.map_get("before", "x").is_some())
        .await;

    let bomb = deep_any_update(7_000);
    assert!(bomb.len() > 14_000 && bomb.len() < 14_100, "{}", bomb.len());

    // From a viewer over the WebSocket: closed with 1007, nothing else happens.
    let mut viewer = server.wb(&s, &token("v", &s, "viewer")).await;
    expect_refused_1007(&mut viewer, bomb.clone(), "a viewer's 7,000-deep Any").await;
    assert_eq!(healthz(&server).await, 200, "the process died");
    // The other clients carry on: an edit still syncs, and no trace of the bomb arrived.
    a.map_set("after", "x", "2").await;
    b.wait_doc("an edit after the bomb", |c| {
        c.map_get("after", "x").is_some()
    })
    .await;
    assert!(!has_bomb_key(&b.doc));

    // The same bytes from a student over HTTP: 400 (or 413), document unchanged.
    let student = token("poster", &s, "student");
    let r = post_update(&server, &s, &student, &bomb).await;
    assert!(
        r.status == 400 || r.status == 413,
        "POST of a 7,000-deep Any: {} {}",
        r.status,
        r.text()
    );
    assert_eq!(healthz(&server).await, 200, "the process died");
    let doc = server.whiteboard_doc(&s, &student).await;
    assert!(!has_bomb_key(&doc));
    assert_eq!(doc_map_get(&doc, "after", "x").as_deref(), Some("2"));
    // And from a student over the WebSocket too.
    let mut c = server.wb_user(&s, "c").await;
    expect_refused_1007(&mut c, bomb, "a student's 7,000-deep Any").await;
    assert_server_alive(&server, &s).await;
    assert!(
        metric_labelled(&server, "easel_guard_refusals_total{reason=\"too_deep\"}").await >= 3.0
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Shared types nested deep: in one update, and one level per update
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_chains_stop_at_max_nesting_and_the_session_survives_restore_and_restart() {
    let config = "[limits]\nmax_nesting = 8\n";
    let mut server = TestServer::start(config);
    let s = session_id("deep-maps");
    let mut watcher = server.wb_user(&s, "watcher").await;

    // 20,000 nested maps in one update from a student: 1007, nothing integrated.
    let mut bomber = server.wb_user(&s, "bomber").await;
    expect_refused_1007(
        &mut bomber,
        map_chain_update(9_001, 20_000),
        "a 20,000-deep chain",
    )
    .await;
    assert_eq!(healthz(&server).await, 200);
    // The same over HTTP: 400.
    let student = token("poster", &s, "student");
    let r = post_update(&server, &s, &student, &map_chain_update(9_003, 20_000)).await;
    assert_eq!(r.status, 400, "POST of a 20,000-deep chain: {}", r.text());

    // One level per update: root "m" is level 1, so with a limit of 8 the 8th nested map
    // (level 9) is refused and the 7 below it are kept.
    assert_eq!(nest_until_refused(&server, &s, 20).await, 8);
    watcher
        .wait_doc("the 7 accepted levels", |c| chain_depth(&c.doc) == 7)
        .await;
    let barrier = watcher.barrier().await;
    assert!(
        barrier.iter().all(|m| !is_update(m)),
        "the refused level was relayed: {barrier:?}"
    );
    assert_eq!(chain_depth(&watcher.doc), 7);
    assert_eq!(chain_depth(&server.whiteboard_doc(&s, &student).await), 7);

    // Snapshot, delete the chain's root, restore the snapshot over HTTP.
    let tutor = token("tutor", &s, "tutor");
    let version = server.take_snapshot(&s, &tutor).await;
    let mut editor = server.wb_user(&s, "editor").await;
    editor
        .change(|d| {
            let m = d.get_or_insert_map(BOMB_MAP);
            let mut txn = d.transact_mut();
            m.remove(&mut txn, BOMB_KEY);
        })
        .await;
    watcher
        .wait_doc("the chain's root deleted", |c| chain_depth(&c.doc) == 0)
        .await;
    let r = server
        .api(
            "POST",
            &format!("/api/v2/session/{s}/snapshots/{version}/restore"),
            Some(&tutor),
            Some(b""),
        )
        .await;
    assert_eq!(r.status, 200, "restore: {}", r.text());
    assert!(r.json()["version"].as_u64().unwrap_or(0) > version);
    watcher
        .wait_doc("the chain restored", |c| chain_depth(&c.doc) == 7)
        .await;
    // The restored chain still counts against the limit: one level more is refused at once.
    {
        let mut c = server.wb_user(&s, "restored-nester").await;
        let deepest = {
            let root = c.doc.get_or_insert_map(BOMB_MAP);
            let txn = c.doc.transact();
            let mut m = match root.get(&txn, BOMB_KEY) {
                Some(Out::YMap(m)) => m,
                other => panic!("no chain after restore: {other:?}"),
            };
            while let Some(Out::YMap(next)) = m.get(&txn, BOMB_KEY) {
                m = next;
            }
            m
        };
        let (_, update) = nest_one_level(&mut c, Some(&deepest));
        expect_refused_1007(&mut c, update, "an 8th level under the restored chain").await;
    }
    drop((watcher, editor, bomber));

    // Restart: the session loads, with the restored chain and no stored record refused.
    server.stop_graceful().await;
    let tmp = server.take_tempdir();
    let data_dir = server.data_dir.clone();
    let server = TestServer::start_in(&data_dir, config);
    let fresh = server.wb_user(&s, "after-restart").await;
    assert_eq!(chain_depth(&fresh.doc), 7);
    assert_eq!(
        server.metric("easel_store_decode_errors_total").await,
        Some(0.0)
    );
    assert_server_alive(&server, &s).await;
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_chain_one_level_per_update_stops_at_the_default_limit_of_64() {
    let server = TestServer::start("");
    let s = session_id("deep-maps-64");
    assert_eq!(nest_until_refused(&server, &s, 80).await, 64);
    let doc = server
        .whiteboard_doc(&s, &token("reader", &s, "student"))
        .await;
    assert_eq!(chain_depth(&doc), 63);
    assert_server_alive(&server, &s).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Poison pills: through the CLI, and in the store from before the guard
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_import_refuses_a_nesting_bomb_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let s = session_id("import-bomb");
    let file = dir.path().join("chain.yjs");
    std::fs::write(&file, map_chain_update(4_242, 2_000)).unwrap();
    let args = |file: &std::path::Path| {
        vec![
            "snapshot".to_string(),
            "import".into(),
            s.clone(),
            file.display().to_string(),
            "--data-dir".into(),
            data.display().to_string(),
        ]
    };
    let out = run_cli(&args(&file)).await;
    assert!(!out.success(), "a 2,000-deep chain was imported: {out:?}");
    assert!(
        out.stderr.contains("nested deeper than 1024"),
        "no clear message: {}",
        out.stderr
    );
    // Within what a decoder's stack is safe for, the session's own limit (64) refuses it.
    std::fs::write(&file, map_chain_update(4_242, 100)).unwrap();
    let out = run_cli(&args(&file)).await;
    assert!(!out.success(), "a 100-deep chain was imported: {out:?}");
    assert!(
        out.stderr.contains("nested deeper than 64"),
        "no clear message: {}",
        out.stderr
    );
    // The session holds nothing of it: a harmless import after it works and is all there is.
    let ok = dir.path().join("ok.yjs");
    std::fs::write(&ok, map_set_update(5, "m", "fine", "yes")).unwrap();
    run_cli(&args(&ok)).await.assert_ok("a harmless import");
    let server = TestServer::start_in(&data, "");
    let doc = server.whiteboard_doc(&s, &token("r", &s, "student")).await;
    assert_eq!(doc_map_get(&doc, "m", "fine").as_deref(), Some("yes"));
    assert_eq!(chain_depth(&doc), 0);
}

/// The same for an `Any` bomb, through `import` and `inspect FILE`: both commands pass the
/// file through the guard before `yrs` decodes it (a 14 KB file used to abort the CLI with a
/// stack overflow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_import_and_inspect_refuse_a_deep_any_file_without_crashing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let s = session_id("import-any");
    let file = dir.path().join("any.yjs");
    std::fs::write(&file, deep_any_update(7_000)).unwrap();
    let path = file.display().to_string();
    let data = data.display().to_string();
    for args in [
        vec!["snapshot", "import", &s, &path, "--data-dir", &data],
        vec!["snapshot", "inspect", &path],
    ] {
        let out = run_cli(&args).await;
        assert!(!out.success(), "{args:?}: a 7,000-deep Any was accepted");
        // A refusal, not a crash: an exit code, not a signal, and the reason.
        assert!(out.status.code().is_some(), "{args:?} crashed: {out:?}");
        assert!(
            out.stderr.contains("nested deeper than"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_pill_stored_before_the_guard_is_skipped_and_counted() {
    let mut server = TestServer::start("");
    let s = session_id("poison");
    let mut a = server.wb_user(&s, "a").await;
    a.map_set("board", "before", "kept").await;
    a.close().await;
    server.stop_graceful().await;
    let tmp = server.take_tempdir();
    let data_dir = server.data_dir.clone();

    // What a server without the guard would have logged: an Any bomb, a 20,000-deep chain,
    // then an ordinary edit.
    {
        use easel::store::{SledStore, Store};
        let store = SledStore::open(&data_dir, 0, 20, None).expect("open the store");
        let last = store.load_whiteboard(&s).expect("load").last_log_seq;
        store
            .append_update(&s, last + 1, &deep_any_update(7_000))
            .unwrap();
        store
            .append_update(&s, last + 2, &map_chain_update(9_002, 20_000))
            .unwrap();
        store
            .append_update(
                &s,
                last + 3,
                &map_set_update(31, "board", "after", "kept too"),
            )
            .unwrap();
        store.flush().unwrap();
    }

    let server = TestServer::start_in(&data_dir, "");
    let b = server.wb_user(&s, "b").await;
    assert_eq!(b.map_get("board", "before").as_deref(), Some("kept"));
    assert_eq!(b.map_get("board", "after").as_deref(), Some("kept too"));
    assert!(!has_bomb_key(&b.doc));
    assert_eq!(healthz(&server).await, 200);
    let skipped = server
        .metric("easel_store_decode_errors_total")
        .await
        .unwrap_or(0.0);
    assert!(
        skipped >= 2.0,
        "the two poison pills were not counted: {skipped}"
    );
    assert_server_alive(&server, &s).await;
    drop(tmp);
}

// ---------------------------------------------------------------------------------------------
// 4. Updates waiting for missing blocks
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// 5. Document size
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// 6. Awareness floods
// ---------------------------------------------------------------------------------------------

/// Every awareness message `client` receives until the answer to its query-awareness (the
/// answer is the last one returned).
async fn query_awareness(client: &mut WbClient) -> Vec<yrs::sync::AwarenessUpdate> {
    client.send_raw(vec![3]).await;
    let mut seen = Vec::new();
    // The answer is an awareness message; earlier relays may come first. A barrier after
    // the query orders them: the answer is queued before the step 2.
    let sv = client.doc.transact().state_vector();
    client
        .send_msg(&Message::Sync(SyncMessage::SyncStep1(sv)))
        .await;
    loop {
        match client.next_msg().await {
            Message::Awareness(u) => seen.push(u),
            Message::Sync(SyncMessage::SyncStep2(_)) => return seen,
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_awareness_clients_from_one_viewer_are_dropped_with_memory_bounded() {
    let server = TestServer::start("");
    let s = session_id("aw-bomb");
    let mut observer = server.wb_user(&s, "observer").await;
    // Warm up the process (a session, a join) before the baseline.
    assert_server_alive(&server, &s).await;
    let before = vm_hwm_kib(server.pid());

    let flood = awareness_flood(1, 1_000_000);
    let mut viewer = server.wb(&s, &token("v", &s, "viewer")).await;
    let _ = viewer.try_send_raw(flood.clone()).await;
    let refusals = eventually(
        "the flood counted as an awareness refusal",
        TIMEOUT,
        || async {
            let n =
                metric_labelled(&server, "easel_guard_refusals_total{reason=\"awareness\"}").await;
            (n >= 1.0).then_some(n)
        },
    )
    .await;
    assert_eq!(refusals, 1.0);
    // Nothing of it reached the others or stayed in the session.
    let answers = query_awareness(&mut observer).await;
    let most = answers.iter().map(|u| u.clients.len()).max().unwrap_or(0);
    assert!(
        most <= 16,
        "an awareness message with {most} clients was relayed"
    );

    // A later joiner gets its greeting at once, not a 1013.
    let started = Instant::now();
    let mut late = server.wb_connect(&s, &token("late", &s, "student")).await;
    late.handshake().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let greeting: Vec<usize> = late
        .received
        .iter()
        .filter_map(|m| match m {
            Message::Awareness(u) => Some(u.clients.len()),
            _ => None,
        })
        .collect();
    assert!(greeting.iter().all(|n| *n <= 16), "{greeting:?}");
    assert!(late.closed.is_none());

    // Peak memory: the 7 MB frame, refused by its client count before anything decodes it.
    let after = vm_hwm_kib(server.pid());
    eprintln!(
        "awareness flood of {} bytes: VmHWM {before} KiB -> {after} KiB",
        flood.len()
    );
    assert!(
        after.saturating_sub(before) < 32 * 1024,
        "VmHWM grew by {} KiB for a {} byte frame",
        after - before,
        flood.len()
    );
    assert_server_alive(&server, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_speaks_for_at_most_16_awareness_clients_of_at_most_64_kib() {
    let server = TestServer::start("");
    let s = session_id("aw-cap");
    let mut observer = server.wb_user(&s, "observer").await;
    let mut p = server.wb_user(&s, "p").await;
    let refused = || metric_labelled(&server, "easel_guard_refusals_total{reason=\"awareness\"}");

    // 16 client ids, one update each: all relayed.
    for i in 0..16u64 {
        p.send_awareness(&awareness_update(100 + i, 1, &format!("{{\"n\":{i}}}")))
            .await;
    }
    observer
        .wait_for(
            "the 16th client id",
            |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 115).is_some()),
        )
        .await;
    // The 17th is refused; an update of one of the 16 after it still goes through, and the
    // observer, which gets the relays in order, never saw the 17th.
    p.send_awareness(&awareness_update(116, 1, "{\"n\":16}"))
        .await;
    p.send_awareness(&awareness_update(100, 2, "{\"n\":\"again\"}"))
        .await;
    observer
        .wait_for("client 100's second state", |m| {
            matches!(m, Message::Awareness(u) if awareness_entry(u, 100).is_some_and(|e| e.clock == 2))
        })
        .await;
    let relayed_117 = observer
        .received
        .iter()
        .any(|m| matches!(m, Message::Awareness(u) if awareness_entry(u, 116).is_some()));
    assert!(!relayed_117, "a 17th client id was relayed");
    assert_eq!(refused().await, 1.0);
    let states = query_awareness(&mut observer).await;
    let answer = states.last().expect("an answer to query awareness");
    let ids: Vec<u64> = awareness_ids(answer)
        .into_iter()
        .filter(|id| (100..200).contains(id))
        .collect();
    assert_eq!(ids, (100..116).collect::<Vec<u64>>());

    // A state over 64 KiB is refused; one just under it is accepted.
    let over = format!("{{\"s\":\"{}\"}}", "x".repeat(64 * 1024));
    p.send_awareness(&awareness_update(101, 2, &over)).await;
    let under = format!("{{\"s\":\"{}\"}}", "y".repeat(60 * 1024));
    p.send_awareness(&awareness_update(101, 3, &under)).await;
    let got = observer
        .wait_for("client 101's state under 64 KiB", |m| {
            matches!(m, Message::Awareness(u) if awareness_entry(u, 101).is_some_and(|e| e.clock >= 2))
        })
        .await;
    match got {
        Message::Awareness(u) => {
            let e = awareness_entry(&u, 101).expect("entry");
            assert_eq!(e.clock, 3, "the state over 64 KiB was relayed");
            assert_eq!(e.json.len(), under.len());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(refused().await, 2.0);
    assert!(p.closed.is_none() && observer.closed.is_none());
}

// ---------------------------------------------------------------------------------------------
// 7. The clock of a relayed awareness removal
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_removal_of_a_closed_connections_client_carries_its_own_clock() {
    let server = TestServer::start("");
    let s = session_id("aw-clock");
    let mut a = server.wb_user(&s, "a").await;
    let mut b = server.wb_user(&s, "b").await;
    a.send_awareness(&awareness_update(777, 5, "{\"user\":\"a\"}"))
        .await;
    b.wait_for(
        "client 777's state",
        |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 777).is_some()),
    )
    .await;
    a.close().await;
    let removal = b
        .wait_for("client 777's removal", |m| {
            matches!(m, Message::Awareness(u) if awareness_entry(u, 777).is_some_and(|e| &*e.json == "null"))
        })
        .await;
    let Message::Awareness(u) = removal else {
        unreachable!()
    };
    assert_eq!(
        awareness_entry(&u, 777).map(|e| e.clock),
        Some(5),
        "the removal must carry the client's last clock, not a bumped one"
    );
    // So the same client announcing itself again with its next clock is seen at once.
    let mut again = server.wb_user(&s, "a-again").await;
    again
        .send_awareness(&awareness_update(777, 6, "{\"user\":\"a\"}"))
        .await;
    b.wait_for("client 777 back with clock 6", |m| {
        matches!(m, Message::Awareness(u) if awareness_entry(u, 777).is_some_and(|e| e.clock == 6 && &*e.json != "null"))
    })
    .await;
}

/// An awareness message of several clients (id, clock, JSON state).
fn awareness_of(entries: &[(u64, u32, &str)]) -> yrs::sync::AwarenessUpdate {
    let mut update = awareness_update(entries[0].0, entries[0].1, entries[0].2);
    for (id, clock, json) in &entries[1..] {
        update.clients.insert(
            yrs::ClientID::new(*id),
            yrs::sync::awareness::AwarenessUpdateEntry {
                clock: *clock,
                json: (*json).into(),
            },
        );
    }
    update
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cannot_remove_another_connections_awareness_client() {
    let server = TestServer::start("");
    let s = session_id("aw-owner");
    let mut a = server.wb_user(&s, "a").await;
    let mut b = server.wb_user(&s, "b").await;
    a.send_awareness(&awareness_update(500, 3, "{\"who\":\"a\"}"))
        .await;
    b.wait_for(
        "client 500",
        |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 500).is_some()),
    )
    .await;
    // M sends 500 at an old clock (ignored: the session has clock 3) with a client of its
    // own (applied), then leaves: only its own client is removed.
    let mut m = server.wb_user(&s, "m").await;
    m.send_awareness(&awareness_of(&[
        (500, 1, "{\"who\":\"m\"}"),
        (600, 1, "{\"who\":\"m\"}"),
    ]))
    .await;
    b.wait_for(
        "client 600",
        |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 600).is_some()),
    )
    .await;
    m.close().await;
    let removal = b
        .wait_for("client 600's removal", |m| {
            matches!(m, Message::Awareness(u) if awareness_entry(u, 600).is_some_and(|e| &*e.json == "null"))
        })
        .await;
    let Message::Awareness(removal) = removal else {
        unreachable!()
    };
    assert!(
        awareness_entry(&removal, 500).is_none(),
        "M's leaving removed A's client 500: {removal:?}"
    );
    let states = query_awareness(&mut b).await;
    let answer = states.last().expect("an answer to query awareness");
    assert_eq!(
        awareness_entry(answer, 500).map(|e| (e.clock, e.json.to_string())),
        Some((3, "{\"who\":\"a\"}".to_string()))
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_sending_back_the_states_it_was_greeted_with_is_not_refused() {
    // y-websocket clients send back every awareness change they apply, the greeting too:
    // with more than 16 others in the session, that echo names more than 16 client ids.
    let server = TestServer::start("");
    let s = session_id("aw-echo");
    let mut p = server.wb_user(&s, "p").await;
    let mut q = server.wb_user(&s, "q").await;
    for i in 0..16u64 {
        p.send_awareness(&awareness_update(200 + i, 1, "{}")).await;
    }
    for i in 0..4u64 {
        q.send_awareness(&awareness_update(300 + i, 1, "{}")).await;
    }
    q.wait_for(
        "p's 16th client",
        |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 215).is_some()),
    )
    .await;
    p.wait_for(
        "q's 4th client",
        |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 303).is_some()),
    )
    .await;
    let mut n = server.wb(&s, &token("n", &s, "student")).await;
    let greeting = n
        .received
        .iter()
        .find_map(|m| match m {
            Message::Awareness(u) => Some(u.clone()),
            _ => None,
        })
        .expect("an awareness greeting");
    assert_eq!(greeting.clients.len(), 20);
    n.send_awareness(&greeting).await;
    n.send_awareness(&awareness_update(400, 1, "{\"me\":1}"))
        .await;
    p.wait_for(
        "the joiner's own client",
        |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 400).is_some()),
    )
    .await;
    assert_eq!(
        metric_labelled(&server, "easel_guard_refusals_total{reason=\"awareness\"}").await,
        0.0,
        "the echo of the greeting was counted as a refusal"
    );
}
