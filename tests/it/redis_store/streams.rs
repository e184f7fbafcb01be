//! The stream reader: one blocking read over many sessions, and the events stream.

use std::time::{Duration, Instant};

use easel::store::redis::Position;
use easel::store::{Cursor, Store, StreamEntry};

use super::*;

#[test]
fn one_read_returns_entries_of_several_sessions_with_their_cursors() {
    let redis = RedisServer::start();
    let (n1, n2) = (store(&redis, "n1", 20), store(&redis, "n2", 20));
    let updates = text_updates("r", 3);
    n2.append_update("a", 0, &updates[0]).unwrap();
    n2.append_update("a", 0, &updates[1]).unwrap();
    n2.append_update("b", 0, &updates[2]).unwrap();
    n2.append_chat("b", &chat_message("hello", "bob"), 100)
        .unwrap();
    n2.publish("a", "awareness", b"\x01\x02").unwrap();

    let mut cursors: Vec<Cursor> = ["a", "b"]
        .iter()
        .map(|s| Cursor {
            session: Arc::from(*s),
            wb_after: 0,
            chat_after: 0,
            ev_after: "0-0".into(),
        })
        .collect();
    let mut reader = n1.stream_reader().unwrap();
    let entries = reader.read(&cursors, Duration::from_secs(1)).unwrap();
    assert_eq!(entries.len(), 5, "{entries:?}");
    let mut updates_of_a = Vec::new();
    for entry in &entries {
        match entry {
            StreamEntry::Update {
                session,
                seq,
                node,
                update,
            } => {
                assert_eq!(node, "n2");
                if &**session == "a" {
                    updates_of_a.push((*seq, update.clone()));
                } else {
                    assert_eq!((*seq, update), (1, &updates[2]));
                }
            }
            StreamEntry::Chat {
                session,
                node,
                message,
            } => {
                assert_eq!((&**session, node.as_str()), ("b", "n2"));
                assert_eq!((message.seq, message.text.as_str()), (1, "hello"));
            }
            StreamEntry::Event {
                session,
                node,
                kind,
                data,
                ..
            } => {
                assert_eq!(
                    (&**session, node.as_str(), kind.as_str()),
                    ("a", "n2", "awareness")
                );
                assert_eq!(data, b"\x01\x02");
            }
            other => panic!("nothing here is damaged: {other:?}"),
        }
    }
    assert_eq!(
        updates_of_a,
        [(1, updates[0].clone()), (2, updates[1].clone())]
    );

    // With the cursors moved past them, the same read blocks, then sees only what is new.
    cursors[0].wb_after = 2;
    cursors[0].ev_after = n1.events_head("a").unwrap();
    cursors[1].wb_after = 1;
    cursors[1].chat_after = 1;
    let started = Instant::now();
    assert!(reader
        .read(&cursors, Duration::from_millis(300))
        .unwrap()
        .is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "it blocked"
    );
    let writer = {
        let n2 = n2.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            n2.append_update("b", 0, b"\x00\x00").unwrap()
        })
    };
    let started = Instant::now();
    let woken = reader.read(&cursors, Duration::from_secs(5)).unwrap();
    assert_eq!(writer.join().unwrap(), 2);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "woken by the append, not the timeout"
    );
    assert!(
        matches!(&woken[..], [StreamEntry::Update { session, seq: 2, .. }] if &**session == "b"),
        "{woken:?}"
    );
    assert_eq!(n1.events_head("never").unwrap(), "0-0");
}

#[test]
fn an_entry_that_does_not_decode_is_reported_skipped_so_the_reader_moves_past_it() {
    let redis = RedisServer::start();
    let node = store(&redis, "n1", 20);
    // A chat entry that is not a message: written by something else than easel.
    xadd_not_a_message(&redis, "easel:{s}:chat", "0-1");
    let mut cursor = Cursor {
        session: Arc::from("s"),
        wb_after: 0,
        chat_after: 0,
        ev_after: "0-0".into(),
    };
    let mut reader = node.stream_reader().unwrap();
    let entries = reader
        .read(std::slice::from_ref(&cursor), Duration::from_millis(100))
        .unwrap();
    assert!(
        matches!(&entries[..], [StreamEntry::Skipped { session, at: Position::Chat(1) }] if &**session == "s"),
        "{entries:?}"
    );
    // Past it, the read blocks instead of returning the same entry again and again.
    cursor.chat_after = 1;
    assert!(reader
        .read(std::slice::from_ref(&cursor), Duration::from_millis(100))
        .unwrap()
        .is_empty());
}
