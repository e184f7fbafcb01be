//! Nesting bombs (an `Any` nested 7,000 deep, shared types nested past the limit in one
//! update or one level per update) and poison pills (through the CLI, and in the store from
//! before the guard).

use super::*;

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

/// A board restarted on a store that holds records as a server without today's guard would
/// have stored them: a client sets board.before, the server stops, `in_snapshot` is folded
/// into a new snapshot of the board, `in_log` and then an edit setting board.after are
/// appended to its log, and the server starts again on the same data. Returns the new
/// server, the session, a client synced to it (both edits checked: the records did not cost
/// the board anything) and the data directory's owner.
async fn restarted_with_records_stored(
    name: &str,
    in_snapshot: &[Vec<u8>],
    in_log: &[Vec<u8>],
) -> (TestServer, String, WbClient, Option<tempfile::TempDir>) {
    let mut server = TestServer::start("");
    let s = session_id(name);
    let mut a = server.wb_user(&s, "a").await;
    a.map_set("board", "before", "kept").await;
    a.close().await;
    server.stop_graceful().await;
    let tmp = server.take_tempdir();
    let data_dir = server.data_dir.clone();
    {
        use easel::store::{SledStore, Store};
        use yrs::updates::decoder::Decode;
        use yrs::updates::encoder::Encode;
        let store = SledStore::open(&data_dir, 0, 20, None).expect("open the store");
        let stored = store.load_whiteboard(&s).expect("load");
        let mut seq = stored.last_log_seq;
        if !in_snapshot.is_empty() {
            let doc = Doc::new();
            let mut txn = doc.transact_mut();
            for update in stored.updates.iter().chain(in_snapshot) {
                txn.apply_update(yrs::Update::decode_v1(update).unwrap())
                    .unwrap();
            }
            drop(txn);
            let txn = doc.transact();
            let state = txn.encode_state_as_update_v1(&yrs::StateVector::default());
            let sv = txn.state_vector().encode_v1();
            store.write_snapshot(&s, &state, &sv, 1, seq).unwrap();
        }
        let edit = map_set_update(31, "board", "after", "kept too");
        for record in in_log.iter().chain([&edit]) {
            seq += 1;
            store.append_update(&s, seq, record).unwrap();
        }
        store.flush().unwrap();
    }
    let server = TestServer::start_in(&data_dir, "");
    let b = server.wb_user(&s, "b").await;
    assert_eq!(b.map_get("board", "before").as_deref(), Some("kept"));
    assert_eq!(b.map_get("board", "after").as_deref(), Some("kept too"));
    (server, s, b, tmp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_pill_stored_before_the_guard_is_skipped_and_counted() {
    // An Any bomb and a 20,000-deep chain.
    let pills = [deep_any_update(7_000), map_chain_update(9_002, 20_000)];
    let (server, s, b, tmp) = restarted_with_records_stored("poison", &[], &pills).await;
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

/// Text content in an array (a fuzz finding that hangs yrs's array iterator) is refused from
/// clients (the corpus replays it over the wire). A snapshot that holds it from before the
/// guard refused it still loads whole; a log entry holding it is what a client sent (a
/// held-back update the live board refused once its parent arrived, say) and is skipped
/// and counted, as the live board would have refused it.
#[tokio::test]
async fn a_stored_string_in_an_array_loads_from_a_snapshot_not_from_the_log() {
    let finding = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/hostile/update.refuse.fuzz-string-in-nested-array.bin"
    ))
    .unwrap();
    // The same by client 5: its id, and the id of the array its string names as parent.
    let mut by_client_5 = finding.clone();
    assert_eq!((by_client_5[2], by_client_5[13]), (1, 1));
    by_client_5[2] = 5;
    by_client_5[13] = 5;
    let (server, s, b, tmp) =
        restarted_with_records_stored("misplaced-text", &[finding], &[by_client_5]).await;
    let sv = b.doc.transact().state_vector();
    // Client 1's array item and its three UTF-16 units of text reached the joiner.
    assert_eq!(sv.get(&yrs::block::ClientID::new(1)), 4);
    // Client 5's did not.
    assert_eq!(sv.get(&yrs::block::ClientID::new(5)), 0);
    let skipped = server
        .metric("easel_store_decode_errors_total")
        .await
        .unwrap_or(0.0);
    assert_eq!(skipped, 1.0, "only the log entry is skipped");
    assert_server_alive(&server, &s).await;
    drop(tmp);
}
