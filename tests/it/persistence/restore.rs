//! Live restore, and a corrupt newest snapshot.

use super::*;

fn restored_state(c: &WbClient) -> bool {
    c.map_get("m", "k").as_deref() == Some("v1")
        && c.map_get("m", "x").is_none()
        && c.text("t") == "hello"
}

#[tokio::test]
async fn restore_reaches_connected_clients_live() {
    let server = TestServer::start("");
    let s = session_id("pers-restore");
    let tutor = token("tina", &s, "tutor");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;

    // A
    a.map_set("m", "k", "v1").await;
    a.text_push("t", "hello").await;
    b.wait_doc("state A at b", |c| {
        c.map_get("m", "k").as_deref() == Some("v1") && c.text("t") == "hello"
    })
    .await;
    let n = server.take_snapshot(&s, &tutor).await;
    assert!(server.snapshot_versions(&s, &tutor).await.contains(&n));

    // B
    a.map_set("m", "k", "v2").await;
    a.map_set("m", "x", "new").await;
    a.text_push("t", " world").await;
    b.wait_doc("state B at b", |c| {
        c.map_get("m", "k").as_deref() == Some("v2")
            && c.map_get("m", "x").as_deref() == Some("new")
            && c.text("t") == "hello world"
    })
    .await;

    // refusals first: the document must not change
    let student = token("sam", &s, "student");
    let r = server
        .api(
            "POST",
            &format!("/api/v2/session/{s}/snapshots/{n}/restore"),
            Some(&student),
            Some(b""),
        )
        .await;
    assert_refusal(&r, 403, Some("forbidden"), "restore as a student");
    let r = server
        .api(
            "POST",
            &format!("/api/v2/session/{s}/snapshots/999999/restore"),
            Some(&tutor),
            Some(b""),
        )
        .await;
    assert_refusal(&r, 404, None, "restore of a missing version");
    let r = server
        .api(
            "GET",
            &format!("/api/v2/session/{s}/snapshots/999999"),
            Some(&tutor),
            None,
        )
        .await;
    assert_refusal(&r, 404, None, "GET of a missing version");
    let doc = server.whiteboard_doc(&s, &tutor).await;
    assert_eq!(
        doc_map_get(&doc, "m", "k").as_deref(),
        Some("v2"),
        "refused restores change nothing"
    );
    assert_eq!(doc_text(&doc, "t"), "hello world");

    // restore N
    let r = server
        .api(
            "POST",
            &format!("/api/v2/session/{s}/snapshots/{n}/restore"),
            Some(&tutor),
            Some(b""),
        )
        .await;
    assert_eq!(r.status, 200, "restore {n}: {}", r.text());
    let v = r.json();
    let new_version = v["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("restore answer without a numeric version: {v}"));
    assert!(new_version > n, "restore records a new version > {n}: {v}");
    assert!(
        server
            .snapshot_versions(&s, &tutor)
            .await
            .contains(&new_version),
        "the new version {new_version} is listed"
    );

    // both clients, same sockets, see version N's content
    a.wait_doc("restored state at a (same socket)", restored_state)
        .await;
    b.wait_doc("restored state at b (same socket)", restored_state)
        .await;
    assert_eq!(
        doc_json(&a.doc, &["m"], &["t"]),
        json!({"m": {"k": "v1"}, "t": "hello"}),
        "a after restore"
    );
    assert_eq!(
        doc_json(&b.doc, &["m"], &["t"]),
        doc_json(&a.doc, &["m"], &["t"])
    );
    let doc = server.whiteboard_doc(&s, &tutor).await;
    assert_eq!(
        doc_json(&doc, &["m"], &["t"]),
        json!({"m": {"k": "v1"}, "t": "hello"}),
        "server state"
    );

    // editing continues on the same sockets
    b.map_set("m", "after", "restore").await;
    b.text_push("t", "!").await;
    a.wait_doc("b's edit after the restore reaches a", |c| {
        c.map_get("m", "after").as_deref() == Some("restore") && c.text("t") == "hello!"
    })
    .await;
    a.map_set("m", "k", "v3").await;
    b.wait_doc("a's edit after the restore reaches b", |c| {
        c.map_get("m", "k").as_deref() == Some("v3")
    })
    .await;
    // a late joiner agrees
    let c = server.wb_user(&s, "carol").await;
    assert_eq!(
        doc_json(&c.doc, &["m"], &["t"]),
        json!({"m": {"k": "v3", "after": "restore"}, "t": "hello!"})
    );
}

/// Overwrites the newest snapshot record of `session` in the sled directory with garbage.
/// Layout (src/store/sled_store.rs): tree `snapshots`, key `session \0 version (u64 BE)`,
/// value a bincode header then the Yjs state. Returns a description of what was overwritten.
fn corrupt_newest_snapshot(data_dir: &Path, session: &str) -> String {
    let db = sled::open(data_dir).expect("open the sled dir from the test (server stopped)");
    let names: Vec<String> = db
        .tree_names()
        .iter()
        .map(|n| String::from_utf8_lossy(n).to_string())
        .collect();
    assert!(
        names.iter().any(|n| n == "snapshots"),
        "no `snapshots` tree in {names:?}"
    );
    let tree = db.open_tree("snapshots").expect("open snapshots tree");
    let mut prefix = session.as_bytes().to_vec();
    prefix.push(0);
    // sled iterates in key order; versions are big-endian, so the last key is the newest
    let keys: Vec<sled::IVec> = tree
        .scan_prefix(&prefix)
        .keys()
        .map(|k| k.expect("key"))
        .collect();
    assert!(
        keys.len() >= 2,
        "expected the taken snapshot and the shutdown snapshot of {session}, found {} records",
        keys.len()
    );
    let newest = keys.last().unwrap().clone();
    let version = u64::from_be_bytes(newest[prefix.len()..].try_into().expect("u64 BE version"));
    // 0xFF is not a valid bincode varint tag, so the header cannot decode
    let garbage: Vec<u8> = std::iter::once(0xFFu8)
        .chain((0..63u8).map(|i| i.wrapping_mul(37) ^ 0xA5))
        .collect();
    tree.insert(&newest, garbage).expect("overwrite");
    db.flush().expect("flush");
    drop(tree);
    drop(db);
    format!(
        "snapshot version {version} of {session} ({} records; trees {names:?})",
        keys.len()
    )
}

#[tokio::test]
async fn corrupt_newest_snapshot_is_skipped_and_previous_version_used() {
    let cfg = "[persist]\nsnapshot_every_updates = 100000\nsnapshot_interval_s = 3600\n";
    let mut server = TestServer::start(cfg);
    let tmp = server.take_tempdir().unwrap();
    let data_dir = server.data_dir.clone();
    let s = session_id("pers-corrupt");
    let tutor = token("tina", &s, "tutor");
    let mut a = server.wb_user(&s, "alice").await;
    a.map_set("m", "early", "kept").await;
    a.text_push("t", "early text").await;
    a.barrier().await;
    let previous = server.take_snapshot(&s, &tutor).await;
    a.map_set("m", "late", "maybe").await;
    a.barrier().await;
    // the shutdown snapshot is the newest version; it will be corrupted
    server.stop_graceful().await;
    drop(server);

    let what = corrupt_newest_snapshot(&data_dir, &s);
    eprintln!("corrupted: {what}");

    let server = TestServer::try_start_in(&data_dir, cfg)
        .unwrap_or_else(|e| panic!("server must start over a corrupt record ({what}):\n{e}"));
    let fresh = server.wb_user(&s, "bob").await;
    assert_eq!(
        fresh.map_get("m", "early").as_deref(),
        Some("kept"),
        "the previous snapshot (version {previous}) must be used when the newest does not decode ({what})"
    );
    assert_eq!(fresh.text("t"), "early text");
    let errors = server.metric("easel_store_decode_errors_total").await;
    assert!(
        errors.is_some_and(|n| n >= 1.0),
        "easel_store_decode_errors_total must count the corrupt record, got {errors:?}"
    );
    // the list skips the record that does not decode, and still answers
    let listed = server.snapshot_versions(&s, &tutor).await;
    assert!(
        listed.contains(&previous),
        "version {previous} still listed: {listed:?}"
    );
    assert!(
        listed.iter().all(|&v| v <= previous),
        "the corrupt newer version must be skipped in the list: {listed:?}"
    );
    // the server keeps serving, and the session keeps working
    let r = server.http_get("/healthz").await;
    assert_eq!(r.status, 200);
    assert_server_alive(&server, &s).await;
    let v = server.take_snapshot(&s, &tutor).await;
    let r = server
        .api(
            "GET",
            &format!("/api/v2/session/{s}/snapshots/{v}"),
            Some(&tutor),
            None,
        )
        .await;
    assert_eq!(
        r.status,
        200,
        "new snapshot {v} after the corrupt one: {}",
        r.text()
    );
    let doc = doc_from_update(&r.body);
    assert_eq!(doc_map_get(&doc, "m", "early").as_deref(), Some("kept"));
    drop(tmp);
}
