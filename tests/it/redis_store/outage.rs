//! Redis going away and coming back: every call fails with `Unreachable` (fast, no hang),
//! and the same `RedisStore` works again once Redis is back, with nothing acknowledged lost.

use std::time::{Duration, Instant};

use easel::store::{Cursor, Store, StoreError};

use super::*;

#[test]
fn unreachable_while_redis_is_down_and_back_without_a_new_store() {
    let mut redis = RedisServer::start();
    let node = store(&redis, "n1", 20);
    let updates = text_updates("o", 3);
    assert_eq!(node.append_update("s", 0, &updates[0]).unwrap(), 1);
    assert_eq!(
        node.append_chat("s", &chat_message("before", "ann"), 100)
            .unwrap(),
        1
    );
    let mut reader = node.stream_reader().unwrap();
    let cursor = [Cursor {
        session: Arc::from("s"),
        wb_after: 1,
        chat_after: 1,
        ev_after: "0-0".into(),
    }];
    assert!(reader
        .read(&cursor, Duration::from_millis(10))
        .unwrap()
        .is_empty());

    redis.stop();
    let started = Instant::now();
    let failed = node.append_update("s", 0, &updates[1]);
    assert!(
        matches!(failed, Err(StoreError::Unreachable(_))),
        "{failed:?}"
    );
    assert!(matches!(node.check(), Err(StoreError::Unreachable(_))));
    assert!(matches!(
        node.load_whiteboard("s"),
        Err(StoreError::Unreachable(_))
    ));
    assert!(matches!(node.ping(), Err(StoreError::Unreachable(_))));
    assert!(matches!(
        reader.read(&cursor, Duration::from_millis(10)),
        Err(StoreError::Unreachable(_))
    ));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "failures are quick: {:?}",
        started.elapsed()
    );

    redis.restart();
    wait_until("the store reaches Redis again", || node.check().is_ok());
    // Nothing acknowledged was lost (appendfsync always), seqs go on.
    assert_eq!(node.append_update("s", 0, &updates[2]).unwrap(), 2);
    let loaded = node.load_whiteboard("s").unwrap();
    assert_eq!(loaded.updates, [updates[0].clone(), updates[2].clone()]);
    assert_eq!(
        node.append_chat("s", &chat_message("after", "ann"), 100)
            .unwrap(),
        2
    );
    wait_until("the reader reconnects", || {
        reader.read(&cursor, Duration::from_millis(10)).is_ok()
    });
}
