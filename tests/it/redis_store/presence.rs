//! Presence across nodes and node heartbeats on Redis.

use std::time::Duration;

use super::*;

fn user(id: &str) -> UserInfo {
    UserInfo {
        id: id.into(),
        name: id.to_uppercase(),
        role: "student".into(),
    }
}

#[test]
fn connection_counts_add_up_across_nodes_and_a_dead_node_is_dropped() {
    let redis = RedisServer::start();
    let (n1, n2) = (store(&redis, "n1", 20), store(&redis, "n2", 20));
    let (ann, bob) = (user("ann"), user("bob"));

    let first = n1.presence_change("s", &ann, 1).unwrap();
    assert_eq!(first.total, 1, "ann's first connection anywhere: joined");
    assert_eq!(n2.presence_change("s", &ann, 1).unwrap().total, 2);
    assert_eq!(n2.presence_change("s", &bob, 1).unwrap().total, 1);
    let presence = n1.presence("s").unwrap();
    let counts: Vec<(&str, &str, u64)> = presence
        .iter()
        .map(|e| (e.user.id.as_str(), e.node.as_str(), e.count))
        .collect();
    assert_eq!(
        counts,
        [("ann", "n1", 1), ("ann", "n2", 1), ("bob", "n2", 1)]
    );
    assert_eq!(presence[0].user, ann);

    // ann closes her tab on n1: still there through n2.
    let closed = n1.presence_change("s", &ann, 0).unwrap();
    assert_eq!(closed.total, 1);
    assert!(closed.gone.is_empty());

    // n2 dies: ann and bob had no other connection, so both leave.
    n2.heartbeat(Duration::from_millis(200)).unwrap();
    assert!(n1.node_alive("n2").unwrap());
    wait_until("n2's heartbeat expires", || !n1.node_alive("n2").unwrap());
    let dropped = n1.presence_drop_node("s", "n2").unwrap();
    assert_eq!(dropped.gone, [ann.clone(), bob.clone()]);
    assert!(dropped.presence.is_empty());
    assert!(n1.presence("s").unwrap().is_empty());

    // Last connection closed normally: gone, total 0.
    n1.presence_change("s", &bob, 1).unwrap();
    let left = n1.presence_change("s", &bob, 0).unwrap();
    assert_eq!((left.total, left.gone.as_slice()), (0, [bob].as_slice()));

    // Counts are absolute: the same write again (a retry after a lost reply) is no
    // second connection.
    n1.presence_change("s", &ann, 2).unwrap();
    assert_eq!(n1.presence_change("s", &ann, 2).unwrap().total, 2);
}
