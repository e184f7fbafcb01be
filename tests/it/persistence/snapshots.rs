//! Snapshot triggers and retention, and idle unloading.

use super::*;

#[tokio::test]
async fn snapshot_every_updates_triggers_snapshots() {
    // No interval snapshots during the test: only the update count may trigger them.
    let cfg = "[persist]\nsnapshot_every_updates = 20\nsnapshot_interval_s = 3600\n";
    let server = TestServer::start(cfg);
    let s = session_id("pers-every");
    let tutor = token("tina", &s, "tutor");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;
    assert!(
        server.snapshot_versions(&s, &tutor).await.is_empty(),
        "a new session has no snapshots"
    );
    // Housekeeping takes the snapshot the count asks for within a second or so, off the
    // relay path: each batch of 20 updates must have given one more version.
    let wait_for_versions = |n: usize| {
        let (server, s, tutor) = (&server, &s, &tutor);
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let listed = server.snapshot_list(s, tutor).await;
                if listed.len() >= n {
                    return listed
                        .iter()
                        .map(|e| e["version"].as_u64().unwrap())
                        .collect::<Vec<_>>();
                }
                assert!(
                    Instant::now() < deadline,
                    "with snapshot_every_updates = 20, {} updates must give {n} snapshot \
                     version(s) within 10 s; listed: {listed:?}",
                    20 * n
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // both clients stay connected: no "last client left" snapshot may help
    write_keys_confirmed(&mut a, &mut b, 20).await;
    wait_for_versions(1).await;
    write_more_keys_confirmed(&mut a, &mut b, 20, 40).await;
    let versions = wait_for_versions(2).await;
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions listed oldest first, increasing: {versions:?}"
    );
    // every listed entry is complete
    for e in server.snapshot_list(&s, &tutor).await {
        assert!(e["version"].is_u64(), "{e}");
        assert!(
            e["created_at"].as_str().is_some_and(is_rfc3339),
            "created_at must be RFC 3339: {e}"
        );
        assert!(e["bytes"].as_u64().is_some_and(|n| n > 0), "{e}");
        assert!(e["updates"].is_u64(), "{e}");
    }
    // the newest snapshot holds at least the first 40 keys
    let newest = *versions.last().unwrap();
    let r = server
        .api(
            "GET",
            &format!("/api/v2/session/{s}/snapshots/{newest}"),
            Some(&tutor),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "GET snapshot {newest}: {}", r.text());
    let doc = doc_from_update(&r.body);
    assert!(
        missing_keys(&doc, 40).is_empty(),
        "snapshot {newest} lacks keys: {:?}",
        missing_keys(&doc, 40)
    );
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn last_client_leaving_writes_a_snapshot() {
    let cfg = "[persist]\nsnapshot_every_updates = 100000\nsnapshot_interval_s = 3600\n";
    let server = TestServer::start(cfg);
    let s = session_id("pers-leave");
    let tutor = token("tina", &s, "tutor");
    let mut a = server.wb_user(&s, "alice").await;
    a.map_set("m", "k", "v").await;
    a.barrier().await;
    let before = server.snapshot_versions(&s, &tutor).await;
    let max_before = before.iter().copied().max().unwrap_or(0);
    a.close().await;
    let after = eventually(
        "a new snapshot version after the last client left",
        Duration::from_secs(10),
        || async {
            let v = server.snapshot_versions(&s, &tutor).await;
            v.iter().any(|&n| n > max_before).then_some(v)
        },
    )
    .await;
    let newest = *after.iter().max().unwrap();
    let r = server
        .api(
            "GET",
            &format!("/api/v2/session/{s}/snapshots/{newest}"),
            Some(&tutor),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "GET snapshot {newest}: {}", r.text());
    let doc = doc_from_update(&r.body);
    assert_eq!(doc_map_get(&doc, "m", "k").as_deref(), Some("v"));
}

#[tokio::test]
async fn keep_snapshots_bounds_the_versions_kept() {
    let cfg = "[persist]\nkeep_snapshots = 3\nsnapshot_every_updates = 100000\nsnapshot_interval_s = 3600\n";
    let server = TestServer::start(cfg);
    let s = session_id("pers-keep");
    let tutor = token("tina", &s, "tutor");
    let mut a = server.wb_user(&s, "alice").await;
    let mut taken: Vec<u64> = Vec::new();
    for i in 0..7 {
        a.map_set("m", "round", &i.to_string()).await;
        a.barrier().await;
        let v = server.take_snapshot(&s, &tutor).await;
        if let Some(&prev) = taken.last() {
            assert!(
                v > prev,
                "version numbers must keep increasing: {taken:?} then {v}"
            );
        }
        taken.push(v);
        let listed = server.snapshot_versions(&s, &tutor).await;
        assert!(
            listed.len() <= 3,
            "keep_snapshots = 3 but {} versions listed: {listed:?}",
            listed.len()
        );
        assert!(
            listed.windows(2).all(|w| w[0] < w[1]),
            "listed versions increase: {listed:?}"
        );
        assert_eq!(
            listed.last(),
            Some(&v),
            "the newest version is listed: {listed:?}"
        );
    }
    let listed = server.snapshot_versions(&s, &tutor).await;
    assert_eq!(
        listed,
        taken[taken.len() - 3..].to_vec(),
        "the last 3 versions are kept (taken: {taken:?})"
    );
    // an evicted version is gone
    let r = server
        .api(
            "GET",
            &format!("/api/v2/session/{s}/snapshots/{}", taken[0]),
            Some(&tutor),
            None,
        )
        .await;
    assert_eq!(r.status, 404, "evicted version {}: {}", taken[0], r.text());
    a.close().await;
}

#[tokio::test]
async fn idle_session_unloads_and_reloads_with_its_content() {
    let cfg = "[sessions]\nidle_unload_s = 1\n";
    let server = TestServer::start(cfg);
    let s = session_id("pers-idle");
    let mut a = server.wb_user(&s, "alice").await;
    a.map_set("m", "k", "kept").await;
    a.text_push("t", "idle text").await;
    a.barrier().await;
    assert_eq!(
        server.loaded_sessions().await,
        1,
        "one session loaded while connected"
    );
    a.close().await;
    server
        .wait_loaded_sessions(0, Duration::from_secs(10))
        .await;

    let fresh = server.wb_user(&s, "bob").await;
    assert_eq!(fresh.map_get("m", "k").as_deref(), Some("kept"));
    assert_eq!(fresh.text("t"), "idle text");
    assert_eq!(server.loaded_sessions().await, 1, "reloaded on use");
}
