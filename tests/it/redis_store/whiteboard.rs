//! Whiteboard appends, loads, versions and the compaction lease on Redis.

use std::collections::BTreeSet;

use std::time::{Duration, Instant};

use easel::store::redis::transfer::TransferError;
use easel::store::{RedisStore, Store, StoreError, StoredRecord};

use super::*;

#[test]
fn appends_load_back_in_order_after_the_newest_version() {
    let redis = RedisServer::start();
    let node = store(&redis, "n1", 20);
    let updates = text_updates("a", 6);
    for (i, update) in updates.iter().enumerate() {
        // Redis assigns the next seq; the one passed is only a floor (0: none seen).
        assert_eq!(node.append_update("s1", 0, update).unwrap(), i as u64 + 1);
    }
    let loaded = node.load_whiteboard("s1").unwrap();
    assert_eq!(loaded.snapshot_version, 0);
    assert_eq!(loaded.last_log_seq, 6);
    assert_eq!(loaded.updates, updates);

    let empty = node.load_whiteboard("never-written").unwrap();
    assert!(empty.updates.is_empty());
    assert_eq!((empty.snapshot_version, empty.last_log_seq), (0, 0));
}

/// SPEC 5.1, "numbers are never handed out twice": a Redis that lost its last writes (a
/// crash under `appendfsync everysec`, made here by hand) has its counters behind seqs the
/// nodes have seen. The next append goes above what the appending node has seen.
#[test]
fn a_redis_that_lost_writes_does_not_hand_out_a_seen_seq_again() {
    let redis = RedisServer::start();
    let node = store(&redis, "n1", 20);
    let updates = text_updates("w", 7);
    for (i, update) in updates[..6].iter().enumerate() {
        assert_eq!(
            node.append_update("s", i as u64 + 1, update).unwrap(),
            i as u64 + 1
        );
    }
    for i in 1..=5 {
        node.append_chat(
            "s",
            &ChatMessage {
                seq: i,
                ..chat_message(&format!("m{i}"), "ann")
            },
            100,
        )
        .unwrap();
    }
    // Lost: whiteboard seqs 4..=6, chat seqs 3..=5, counters and entries alike.
    raw(&redis, &["SET", "easel:{s}:wb:seq", "3"]);
    raw(&redis, &["XDEL", "easel:{s}:wb", "0-4", "0-5", "0-6"]);
    raw(&redis, &["SET", "easel:{s}:chat:seq", "2"]);
    raw(&redis, &["XDEL", "easel:{s}:chat", "0-3", "0-4", "0-5"]);
    // The node saw 6 and 5: the next seqs are 7 and 6, not 4 and 3.
    assert_eq!(node.append_update("s", 7, &updates[6]).unwrap(), 7);
    let message = ChatMessage {
        seq: 6,
        ..chat_message("m6", "ann")
    };
    assert_eq!(node.append_chat("s", &message, 100).unwrap(), 6);
    // And on from there, gapless again.
    assert_eq!(node.append_update("s", 8, &updates[0]).unwrap(), 8);
    let loaded = node.load_whiteboard("s").unwrap();
    assert_eq!(loaded.last_log_seq, 8);
    assert_eq!(loaded.updates.len(), 3 + 2);
    let seqs: Vec<u64> = node
        .chat_after("s", 0, 100)
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, [1, 2, 6]);
}

#[test]
fn seqs_are_gapless_across_two_nodes_appending_at_once() {
    let redis = RedisServer::start();
    let nodes = [store(&redis, "n1", 20), store(&redis, "n2", 20)];
    let per_node = 150;
    let threads: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let node = node.clone();
            let updates = text_updates(&format!("n{i}-"), per_node);
            std::thread::spawn(move || {
                updates
                    .iter()
                    .map(|u| node.append_update("s", 0, u).unwrap())
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=2 * per_node as u64).collect::<Vec<_>>());
    let loaded = nodes[1].load_whiteboard("s").unwrap();
    assert_eq!(loaded.updates.len(), 2 * per_node);
    assert_eq!(loaded.last_log_seq, 2 * per_node as u64);
    // Both nodes' texts are whole in the document the stream builds.
    let text = text_of(&loaded.updates);
    assert!(
        text.contains("n0-149,") && text.contains("n1-149,"),
        "{text}"
    );
}

#[test]
fn a_version_trims_only_the_entries_it_includes() {
    let redis = RedisServer::start();
    let node = store(&redis, "n1", 20);
    let updates = text_updates("u", 8);
    for update in &updates[..5] {
        node.append_update("s", 0, update).unwrap();
    }
    let loaded = node.load_whiteboard("s").unwrap();
    let (state, sv) = state_of(&loaded.updates);
    // Appended between the load and the snapshot write: must survive it.
    for update in &updates[5..] {
        node.append_update("s", 0, update).unwrap();
    }
    let version = node
        .write_snapshot("s", &state, &sv, 5, loaded.last_log_seq)
        .unwrap();
    assert_eq!(version, 1);
    let after = node.load_whiteboard("s").unwrap();
    assert_eq!(after.snapshot_version, 1);
    assert_eq!(after.last_log_seq, 8);
    assert_eq!(
        after.updates.len(),
        1 + 3,
        "the version, then entries 6..=8"
    );
    assert_eq!(after.updates[1..], updates[5..]);
    assert_eq!(text_of(&after.updates), text_of(&updates));
    // The next append goes on from the stream's seq, not from the version.
    assert_eq!(node.append_update("s", 0, &updates[0]).unwrap(), 9);

    let listed = node.list_snapshots("s").unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].version, listed[0].bytes, listed[0].updates),
        (1, state.len() as u64, 5)
    );
    assert_eq!(node.get_snapshot("s", 1).unwrap(), Some(state));
    assert_eq!(node.get_snapshot("s", 2).unwrap(), None);
}

/// What `scan_whiteboard` hands over, owned: (snapshot version, bytes); version 0 marks
/// a log entry. And the seq it returns.
fn scan(
    node: &RedisStore,
    session: &str,
    mut also: impl FnMut(usize),
) -> (Vec<(u64, Vec<u8>)>, u64) {
    let mut records = Vec::new();
    let last = node
        .scan_whiteboard(session, &mut |record| {
            records.push(match record {
                StoredRecord::Snapshot { version, state } => (version, state.to_vec()),
                StoredRecord::Update(update) => (0, update.to_vec()),
            });
            also(records.len());
        })
        .unwrap();
    (records, last)
}

#[test]
fn a_scan_reads_what_a_load_reads_a_page_at_a_time() {
    let redis = RedisServer::start();
    let node = store(&redis, "n1", 20);
    assert_eq!(scan(&node, "empty", |_| {}), (Vec::new(), 0));
    // A version through 100, then two full pages of 256 entries: the last page is empty.
    let updates = text_updates("p", 100 + 512);
    for update in &updates {
        node.append_update("s", 0, update).unwrap();
    }
    let (state, sv) = state_of(&updates[..100]);
    assert_eq!(node.write_snapshot("s", &state, &sv, 100, 100).unwrap(), 1);
    let loaded = node.load_whiteboard("s").unwrap();
    let (records, last) = scan(&node, "s", |_| {});
    assert_eq!(last, loaded.last_log_seq);
    assert_eq!(last, 612);
    assert_eq!(records[0], (1, state));
    assert!(records[1..].iter().all(|(version, _)| *version == 0));
    let scanned: Vec<Vec<u8>> = records.into_iter().map(|(_, bytes)| bytes).collect();
    assert_eq!(scanned, loaded.updates);
}

/// Entries easel never writes (an id that is not `0-<seq>`, no update), put there by hand:
/// skipped by a load and a scan alike, which still end.
#[test]
fn a_scan_skips_stream_entries_easel_did_not_write() {
    let redis = RedisServer::start();
    let node = store(&redis, "n1", 20);
    let updates = text_updates("h", 300);
    for update in &updates {
        node.append_update("s", 0, update).unwrap();
    }
    raw(&redis, &["XADD", "easel:{s}:wb", "0-301", "n", "x"]);
    for _ in 0..SCAN_PAGE {
        raw(
            &redis,
            &["XADD", "easel:{s}:wb", "*", "n", "x", "u", "junk"],
        );
    }
    let loaded = node.load_whiteboard("s").unwrap();
    assert_eq!(loaded.updates, updates);
    let (records, last) = scan(&node, "s", |_| {});
    assert_eq!(last, 300);
    let scanned: Vec<Vec<u8>> = records.into_iter().map(|(_, bytes)| bytes).collect();
    assert_eq!(scanned, updates);
}

/// A scan's page (`SCAN_PAGE_ENTRIES` in the Redis store).
const SCAN_PAGE: usize = 256;

#[test]
fn a_snapshot_written_during_a_scan_is_handed_over_and_the_scan_goes_on() {
    let redis = RedisServer::start();
    let (node, other) = (store(&redis, "n1", 20), store(&redis, "n2", 20));
    let updates = text_updates("c", 610);
    for update in &updates[..600] {
        node.append_update("s", 0, update).unwrap();
    }
    // While the scan hands over its first page (seqs 1..=256), another node snapshots
    // through 400, trimming 257..=400 before the scan read them, and 10 more are appended.
    let (state, sv) = state_of(&updates[..400]);
    let (records, last) = scan(&node, "s", |handed| {
        if handed == 10 {
            assert_eq!(other.write_snapshot("s", &state, &sv, 400, 400).unwrap(), 1);
            for update in &updates[600..] {
                other.append_update("s", 0, update).unwrap();
            }
        }
    });
    assert_eq!(last, 610);
    let snapshots: Vec<usize> = (0..records.len()).filter(|&i| records[i].0 > 0).collect();
    assert_eq!(
        snapshots,
        [256],
        "the version, handed over after the first page"
    );
    assert_eq!(records[256], (1, state));
    assert_eq!(records.len(), 256 + 1 + 210);
    let scanned: Vec<Vec<u8>> = records.into_iter().map(|(_, bytes)| bytes).collect();
    assert_eq!(text_of(&scanned), text_of(&updates));
}

#[test]
fn a_state_behind_the_newest_version_is_refused() {
    let redis = RedisServer::start();
    let node = store(&redis, "n1", 20);
    let updates = text_updates("u", 4);
    for update in &updates {
        node.append_update("s", 0, update).unwrap();
    }
    let (state, sv) = state_of(&updates);
    node.write_snapshot("s", &state, &sv, 4, 4).unwrap();
    // A node that applied only up to seq 2 would lose 3 and 4 (already trimmed).
    let (behind, behind_sv) = state_of(&updates[..2]);
    let refused = node.write_snapshot("s", &behind, &behind_sv, 2, 2);
    assert!(
        matches!(refused, Err(easel::store::StoreError::Unavailable(_))),
        "{refused:?}"
    );
    assert_eq!(
        text_of(&node.load_whiteboard("s").unwrap().updates),
        text_of(&updates)
    );
}

#[test]
fn versions_beyond_keep_are_pruned_and_numbers_never_reused() {
    let redis = RedisServer::start();
    let node = store(&redis, "n1", 3);
    let updates = text_updates("v", 6);
    for (i, update) in updates.iter().enumerate() {
        let seq = node.append_update("s", 0, update).unwrap();
        let (state, sv) = state_of(&updates[..=i]);
        assert_eq!(
            node.write_snapshot("s", &state, &sv, 1, seq).unwrap(),
            i as u64 + 1
        );
    }
    let kept: Vec<u64> = node
        .list_snapshots("s")
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(kept, [4, 5, 6]);
    assert_eq!(node.get_snapshot("s", 3).unwrap(), None);
    let loaded = node.load_whiteboard("s").unwrap();
    assert_eq!(loaded.snapshot_version, 6);
    assert_eq!(loaded.updates.len(), 1);
    assert_eq!(text_of(&loaded.updates), text_of(&updates));
}

#[test]
fn two_nodes_snapshotting_at_once_take_turns_under_the_lease() {
    let redis = RedisServer::start();
    let nodes = [store(&redis, "n1", 20), store(&redis, "n2", 20)];
    let updates = text_updates("l", 3);
    for update in &updates {
        nodes[0].append_update("s", 0, update).unwrap();
    }
    let (state, sv) = state_of(&updates);
    let rounds = 10;
    let threads: Vec<_> = nodes
        .iter()
        .map(|node| {
            let (node, state, sv) = (node.clone(), state.clone(), sv.clone());
            std::thread::spawn(move || {
                (0..rounds)
                    .map(|_| node.write_snapshot("s", &state, &sv, 3, 3).unwrap())
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let versions: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let distinct: BTreeSet<u64> = versions.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        versions.len(),
        "a version number handed out twice: {versions:?}"
    );
    assert_eq!(distinct, (1..=2 * rounds).collect());
    assert_eq!(nodes[1].lease_takeovers() + nodes[0].lease_takeovers(), 0);
}

#[test]
fn sessions_are_listed_with_their_versions_and_activity() {
    let redis = RedisServer::start();
    let node = store(&redis, "n1", 20);
    let updates = text_updates("x", 2);
    node.append_update("b-session", 0, &updates[0]).unwrap();
    let (state, sv) = state_of(&updates[..1]);
    node.write_snapshot("b-session", &state, &sv, 1, 1).unwrap();
    node.append_chat("a-session", &chat_message("hi", "ann"), 100)
        .unwrap();
    let sessions = node.list_sessions().unwrap();
    let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["a-session", "b-session"]);
    assert_eq!(sessions[1].snapshots, 1);
    assert!(
        sessions
            .iter()
            .all(|s| s.bytes > 0 && s.last_activity_ms > 0),
        "{sessions:?}"
    );
    assert!(node.append_update("bad id!", 0, &updates[0]).is_err());
}

#[test]
fn import_and_export_copy_a_log_longer_than_a_page() {
    // A sled directory with a version through 100 and 600 entries after it (sled keeps runs
    // of up to 16 updates per entry; import and export read them a page at a time).
    let dir = tempfile::tempdir().unwrap();
    let updates = text_updates("x", 700);
    {
        let sled = when_unlocked(|| easel::store::SledStore::open(dir.path(), 0, 20, None));
        for (i, update) in updates[..100].iter().enumerate() {
            sled.append_update("s", i as u64 + 1, update).unwrap();
        }
        let (state, sv) = state_of(&updates[..100]);
        sled.write_snapshot("s", &state, &sv, 100, 100).unwrap();
        for (i, update) in updates[100..].iter().enumerate() {
            sled.append_update("s", 101 + i as u64, update).unwrap();
        }
        sled.flush().unwrap();
    }
    let redis = RedisServer::start();
    let node = store(&redis, "n1", 20);
    let report = when_unlocked(|| {
        easel::store::redis::transfer::import(dir.path(), &node).map_err(|e| match e {
            TransferError::Store(e) => e,
            other => panic!("import: {other}"),
        })
    });
    assert_eq!(report.sessions[0].log_entries, 600);
    let loaded = node.load_whiteboard("s").unwrap();
    assert_eq!((loaded.snapshot_version, loaded.last_log_seq), (1, 700));
    assert_eq!(loaded.updates.len(), 1 + 600);
    assert_eq!(text_of(&loaded.updates), text_of(&updates));

    let back = tempfile::tempdir().unwrap();
    let exported = back.path().join("exported");
    let report = easel::store::redis::transfer::export(&node, &exported).unwrap();
    assert_eq!(report.sessions[0].log_entries, 600);
    let sled = when_unlocked(|| easel::store::SledStore::open(&exported, 0, 20, None));
    let reloaded = sled.load_whiteboard("s").unwrap();
    assert_eq!(reloaded.last_log_seq, 700);
    assert_eq!(reloaded.updates, loaded.updates);
}

/// `open` once sled has let go of the directory: it releases a dropped database's lock only
/// when its I/O threads are done with it, so a reopen right after may find it still held.
fn when_unlocked<T>(mut open: impl FnMut() -> Result<T, StoreError>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open() {
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
}
