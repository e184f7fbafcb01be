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

mod awareness;
mod bounds;
mod nesting;

// ---------------------------------------------------------------------------------------------
// Crafted updates
// ---------------------------------------------------------------------------------------------

/// Root map, key and client of the crafted bombs.
const BOMB_MAP: &str = "m";
const BOMB_KEY: &str = "k";

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
    metric_sample(&text, sample).unwrap_or(0.0)
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
