//! Chat on Redis: seqs assigned atomically with the append, history, trimming, SPEC 4.1's
//! edits and moderation.

use easel::store::{ChatEdit, ModerationRecord, Store};

use super::*;

#[test]
fn chat_seqs_are_gapless_and_in_one_order_across_two_nodes() {
    let redis = RedisServer::start();
    let nodes = [store(&redis, "n1", 20), store(&redis, "n2", 20)];
    let per_node = 100;
    let threads: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let node = node.clone();
            std::thread::spawn(move || {
                (0..per_node)
                    .map(|k| {
                        let m = chat_message(&format!("n{i}-{k}"), &format!("user{i}"));
                        node.append_chat("s", &m, 10_000).unwrap()
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let per_thread: Vec<Vec<u64>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for seqs in &per_thread {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one node's seqs go up"
        );
    }
    let mut all: Vec<u64> = per_thread.concat();
    all.sort_unstable();
    assert_eq!(all, (1..=2 * per_node).collect::<Vec<_>>());

    // Every node reads the same history, with the seqs Redis gave.
    let from_one = nodes[0].chat_after("s", 0, 1000).unwrap();
    let from_two = nodes[1].chat_after("s", 0, 1000).unwrap();
    assert_eq!(from_one, from_two);
    assert_eq!(
        from_one.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=2 * per_node).collect::<Vec<_>>()
    );
    // Each message is whole: sender, client id, time.
    let first_of_n1 = from_one.iter().find(|m| m.text == "n1-0").unwrap();
    assert_eq!(first_of_n1.from.id, "user1");
    assert_eq!(first_of_n1.client_id.as_deref(), Some("c-n1-0"));
    assert_eq!(first_of_n1.ts, "2026-01-01T00:00:00Z");
    assert_eq!(nodes[1].last_chat_seq("s").unwrap(), 2 * per_node);
}

#[test]
fn history_after_and_before_and_trimming() {
    let redis = RedisServer::start();
    let node = store(&redis, "n1", 20);
    for i in 1..=10 {
        let seq = node
            .append_chat("s", &chat_message(&format!("m{i}"), "ann"), 6)
            .unwrap();
        assert_eq!(seq, i);
    }
    let seqs = |messages: Vec<ChatMessage>| messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    // Only the newest 6 are kept; the counter survives the trim.
    assert_eq!(
        seqs(node.chat_after("s", 0, 100).unwrap()),
        [5, 6, 7, 8, 9, 10]
    );
    assert_eq!(seqs(node.chat_after("s", 7, 100).unwrap()), [8, 9, 10]);
    assert_eq!(seqs(node.chat_after("s", 4, 2).unwrap()), [5, 6]);
    assert_eq!(seqs(node.chat_before("s", 9, 2).unwrap()), [7, 8]);
    assert_eq!(seqs(node.chat_before("s", 100, 3).unwrap()), [8, 9, 10]);
    assert!(node.chat_before("s", 5, 10).unwrap().is_empty());
    assert!(node.chat_after("s", 10, 10).unwrap().is_empty());
    assert!(node.chat_after("s", 0, 0).unwrap().is_empty());
    assert_eq!(node.last_chat_seq("s").unwrap(), 10);
    assert_eq!(node.last_chat_seq("other").unwrap(), 0);
    assert_eq!(node.chat_get("s", 9).unwrap().unwrap().text, "m9");
    assert_eq!(node.chat_get("s", 2).unwrap(), None, "trimmed");
}

#[test]
fn edits_deletions_and_moderation_are_shared() {
    let redis = RedisServer::start();
    let nodes = [store(&redis, "n1", 20), store(&redis, "n2", 20)];
    for i in 1..=3 {
        nodes[0]
            .append_chat("s", &chat_message(&format!("m{i}"), "ann"), 3)
            .unwrap();
    }
    let by = UserInfo {
        id: "tutor".into(),
        name: "T".into(),
        role: "tutor".into(),
    };
    let edit = |seq, at_ms| ChatEdit {
        seq,
        at_ms,
        by: by.clone(),
    };
    let mut edited = nodes[0].chat_get("s", 2).unwrap().unwrap();
    edited.text = "m2 fixed".into();
    edited.edited_at = Some("2026-01-01T00:01:00Z".into());
    nodes[0]
        .chat_amend("s", &edited, &edit(2, 10), None)
        .unwrap();
    nodes[1]
        .chat_amend("s", &edited, &edit(2, 30), Some(10))
        .unwrap();
    let deleted = ChatMessage {
        seq: 1,
        deleted_at: Some("2026-01-01T00:02:00Z".into()),
        ..Default::default()
    };
    nodes[1]
        .chat_amend("s", &deleted, &edit(1, 20), None)
        .unwrap();

    // The other node reads the amended forms; a deleted message has no text.
    let history = nodes[0].chat_after("s", 0, 10).unwrap();
    assert_eq!(
        history[0].deleted_at.as_deref(),
        Some("2026-01-01T00:02:00Z")
    );
    assert_eq!(history[0].text, "");
    assert_eq!(history[1].text, "m2 fixed");
    assert_eq!(history[2].text, "m3");
    // One log entry per message, its latest change, in (at_ms, seq) order.
    let log: Vec<(u64, u64)> = nodes[0]
        .chat_edits_after("s", (0, 0), 10)
        .unwrap()
        .iter()
        .map(|e| (e.at_ms, e.seq))
        .collect();
    assert_eq!(log, [(20, 1), (30, 2)]);
    assert_eq!(
        nodes[0].chat_edits_after("s", (20, 1), 10).unwrap().len(),
        1
    );
    assert_eq!(
        nodes[0].chat_edits_after("s", (30, 2), 10).unwrap().len(),
        0
    );
    // Trimming seq 1 takes its amendment and its log entry with it.
    nodes[1]
        .append_chat("s", &chat_message("m4", "ann"), 3)
        .unwrap();
    let log: Vec<u64> = nodes[0]
        .chat_edits_after("s", (0, 0), 10)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(log, [2]);

    let muted = ModerationRecord {
        user: "bob".into(),
        muted: true,
        ..Default::default()
    };
    nodes[0].set_moderation("s", &muted).unwrap();
    assert_eq!(nodes[1].moderation("s").unwrap(), [muted]);
    nodes[1]
        .set_moderation(
            "s",
            &ModerationRecord {
                user: "bob".into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(nodes[0].moderation("s").unwrap().is_empty());
}

#[test]
fn a_stored_message_that_does_not_decode_is_skipped_not_fatal() {
    let redis = RedisServer::start();
    let node = store(&redis, "n1", 20);
    node.append_chat("s", &chat_message("good", "ann"), 100)
        .unwrap();
    // Another writer left something that is not a message under seq 2.
    xadd_not_a_message(&redis, "easel:{s}:chat", "0-2");
    raw(&redis, &["SET", "easel:{s}:chat:seq", "2"]);
    let after = node
        .append_chat("s", &chat_message("after", "ann"), 100)
        .unwrap();
    assert_eq!(after, 3);
    let texts: Vec<String> = node
        .chat_after("s", 0, 10)
        .unwrap()
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts, ["good", "after"]);
}
