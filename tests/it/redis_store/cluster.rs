//! The same store on a three-shard Redis Cluster on loopback: sessions spread over the
//! slots, each session's scripts on its own slot (the hash tag), the reader grouping its
//! XREADs per slot.

use std::collections::BTreeSet;
use std::time::Duration;

use easel::store::{Cursor, Store, StreamEntry};

use super::*;

fn cluster_store(cluster: &RedisClusterServer, node: &str) -> Arc<RedisStore> {
    Arc::new(
        RedisStore::connect(RedisTarget::Cluster(cluster.urls()), node.into(), 20)
            .expect("connect"),
    )
}

#[test]
fn sessions_spread_over_a_three_shard_cluster() {
    let cluster = RedisClusterServer::start(3);
    let (n1, n2) = (cluster_store(&cluster, "n1"), cluster_store(&cluster, "n2"));
    // Every shard's run_id (the watch raises the counters when one changes), in one order.
    let run_id = n1.run_id().unwrap().expect("a run_id");
    assert_eq!(run_id.split(',').count(), 3, "{run_id}");
    assert_eq!(n2.run_id().unwrap(), Some(run_id));
    let sessions: Vec<String> = (0..12).map(|i| format!("spread-{i}")).collect();
    let updates = text_updates("c", 4);
    for (i, s) in sessions.iter().enumerate() {
        let node = if i % 2 == 0 { &n1 } else { &n2 };
        for update in &updates {
            node.append_update(s, 0, update).unwrap();
        }
        node.append_chat(s, &chat_message("hi", "ann"), 100)
            .unwrap();
    }
    // Chat from two nodes at once on one session: gapless.
    let threads: Vec<_> = [n1.clone(), n2.clone()]
        .into_iter()
        .map(|node| {
            std::thread::spawn(move || {
                (0..30)
                    .map(|k| {
                        node.append_chat("busy", &chat_message(&format!("{k}"), "bob"), 100)
                            .unwrap()
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>());

    for s in &sessions {
        let loaded = n2.load_whiteboard(s).unwrap();
        assert_eq!(loaded.updates, updates, "{s}");
        let (state, sv) = state_of(&loaded.updates);
        assert_eq!(n1.write_snapshot(s, &state, &sv, 4, 4).unwrap(), 1);
        assert_eq!(n2.load_whiteboard(s).unwrap().updates.len(), 1);
        assert_eq!(n1.chat_after(s, 0, 10).unwrap().len(), 1);
    }
    let listed: BTreeSet<String> = n1
        .list_sessions()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert!(sessions.iter().all(|s| listed.contains(s)), "{listed:?}");

    // One reader over sessions in different slots sees each one's new entries.
    let cursors: Vec<Cursor> = sessions
        .iter()
        .map(|s| Cursor {
            session: Arc::from(s.as_str()),
            wb_after: 4,
            chat_after: 1,
            ev_after: "0-0".into(),
        })
        .collect();
    let mut reader = n1.stream_reader().unwrap();
    assert!(reader
        .read(&cursors, Duration::from_millis(50))
        .unwrap()
        .is_empty());
    for s in &sessions {
        n2.append_update(s, 0, &updates[0]).unwrap();
    }
    let mut seen = BTreeSet::new();
    wait_until("the reader sees every session's append", || {
        for entry in reader.read(&cursors, Duration::from_millis(200)).unwrap() {
            if let StreamEntry::Update {
                session, seq: 5, ..
            } = entry
            {
                seen.insert(session.to_string());
            }
        }
        seen.len() == sessions.len()
    });
}
