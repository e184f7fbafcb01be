//! Awareness coalescing (SPEC §3, issue #13 item 4): within a tick (at most 16 ms) a session
//! relays the latest state of each awareness client once, as one message shared by every
//! receiver, the sender included; removals keep the client's own clock and are never
//! overtaken by an older state; a joiner's greeting carries the current states even while
//! their relay waits for the end of the tick.

use crate::support::*;
use yrs::sync::{Awareness, AwarenessUpdate, Message};
use yrs::ClientID;

/// One frame packing every update (a y-websocket client may pack several messages into a
/// frame; the server reads them all at once, so they fall within one tick).
fn packed(updates: &[AwarenessUpdate]) -> Vec<u8> {
    updates.iter().flat_map(awareness_msg).collect()
}

/// The state `client`'s entry of `m` carries, with its clock.
fn entry_of(m: &Message, client: u64) -> Option<(u32, String)> {
    match m {
        Message::Awareness(u) => awareness_entry(u, client).map(|e| (e.clock, e.json.to_string())),
        _ => None,
    }
}

/// The awareness messages `c` received that name `client`, in order.
fn relays_of(c: &WbClient, client: u64) -> Vec<(u32, String)> {
    c.received
        .iter()
        .filter_map(|m| entry_of(m, client))
        .collect()
}

fn cursor(n: u32) -> String {
    format!("{{\"cursor\":{{\"x\":{n},\"y\":{}}}}}", n * 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_within_a_tick_reaches_a_peer_as_fewer_frames_ending_in_the_last_state() {
    const N: u32 = 50;
    let server = TestServer::start("");
    let s = session_id("aw-burst");
    let mut a = server.wb_user(&s, "a").await;
    let mut b = server.wb_user(&s, "b").await;

    let burst: Vec<AwarenessUpdate> = (1..=N)
        .map(|clock| awareness_update(8100, clock, &cursor(clock)))
        .collect();
    a.send_raw(packed(&burst)).await;

    let last = b
        .wait_for("the burst's last state at the peer", |m| {
            entry_of(m, 8100).is_some_and(|(clock, _)| clock == N)
        })
        .await;
    assert_eq!(entry_of(&last, 8100), Some((N, cursor(N))));
    let seen = relays_of(&b, 8100);
    // Before coalescing: one frame per update (50). Now: the first change of a quiet
    // session at once, the rest of its tick together at the tick's end.
    assert!(
        seen.len() <= 3,
        "{} frames for a burst of {N} within one tick: {seen:?}",
        seen.len()
    );
    // Clocks only grow: no relay carried an older state after a newer one.
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");
    // Every message is its own frame (the stable y-websocket client reads only the first).
    assert_eq!(b.multi_message_frames, 0);

    // The sender hears its own state back, as before (the reference server echoes it).
    a.wait_for("the last state back at the sender", |m| {
        entry_of(m, 8100).is_some_and(|(clock, _)| clock == N)
    })
    .await;
    assert!(relays_of(&a, 8100).len() <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_separate_frames_is_coalesced_too() {
    const N: u32 = 60;
    let server = TestServer::start("");
    let s = session_id("aw-frames");
    let mut a = server.wb_user(&s, "a").await;
    let mut b = server.wb_user(&s, "b").await;
    for clock in 1..=N {
        a.send_awareness(&awareness_update(8150, clock, &cursor(clock)))
            .await;
    }
    b.wait_for("the last of the separate frames", |m| {
        entry_of(m, 8150).is_some_and(|(clock, _)| clock == N)
    })
    .await;
    let seen = relays_of(&b, 8150);
    // Frames sent back to back arrive within a few ticks even on a loaded machine; one
    // relay per frame (the old behaviour) would be N.
    assert!(
        (seen.len() as u32) < N / 2,
        "{} relays for {N} frames",
        seen.len()
    );
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_changes_of_several_clients_within_a_tick_go_out_merged() {
    let server = TestServer::start("");
    let s = session_id("aw-merge");
    let mut a = server.wb_user(&s, "a").await;
    let mut b = server.wb_user(&s, "b").await;
    // A quiet session relays its first change at once; the 16 that follow within the
    // tick share one message.
    a.send_awareness(&awareness_update(8199, 1, "{\"first\":true}"))
        .await;
    b.wait_for("the first change", |m| entry_of(m, 8199).is_some())
        .await;
    let ids: Vec<u64> = (8200..8215).collect();
    let updates: Vec<AwarenessUpdate> = ids
        .iter()
        .map(|id| awareness_update(*id, 1, &format!("{{\"id\":{id}}}")))
        .collect();
    a.send_raw(packed(&updates)).await;
    let mut frames = 0;
    let mut missing: Vec<u64> = ids.clone();
    while !missing.is_empty() {
        let m = b
            .wait_for("a relay of the packed clients", |m| {
                ids.iter().any(|id| entry_of(m, *id).is_some())
            })
            .await;
        frames += 1;
        missing.retain(|id| entry_of(&m, *id).is_none());
    }
    assert!(
        frames <= 2,
        "{} clients changed within a tick came in {frames} frames",
        ids.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_after_states_within_a_tick_arrives_as_the_removal_at_the_clients_clock() {
    let server = TestServer::start("");
    let s = session_id("aw-removal");
    let mut a = server.wb_user(&s, "a").await;
    let mut b = server.wb_user(&s, "b").await;
    a.send_awareness(&awareness_update(8300, 1, &cursor(1)))
        .await;
    b.wait_for("client 8300's first state", |m| entry_of(m, 8300).is_some())
        .await;
    // More states, then the close that removes the client: all within a tick, so the
    // states and the removal wait in the same tick.
    let burst: Vec<AwarenessUpdate> = (2..=6)
        .map(|clock| awareness_update(8300, clock, &cursor(clock)))
        .collect();
    a.send_raw(packed(&burst)).await;
    a.close().await;

    let removal = b
        .wait_for("client 8300's removal", |m| {
            entry_of(m, 8300).is_some_and(|(_, json)| json == "null")
        })
        .await;
    assert_eq!(
        entry_of(&removal, 8300),
        Some((6, "null".to_string())),
        "the removal carries the client's last clock"
    );
    // A marker through the same relay: once it is in, every relay marked before it is too.
    let mut c = server.wb_user(&s, "c").await;
    c.send_awareness(&awareness_update(8399, 1, "{\"marker\":1}"))
        .await;
    b.wait_for("the marker", |m| entry_of(m, 8399).is_some())
        .await;
    // What a y-protocols client makes of everything b received: 8300 is gone.
    let mut view = Awareness::default();
    for m in &b.received {
        if let Message::Awareness(u) = m {
            view.apply_update(u.clone())
                .expect("apply a relayed update");
        }
    }
    let id = ClientID::new(8300);
    assert!(view.state::<serde_json::Value>(id).is_none());
    assert_eq!(view.meta(id).map(|(clock, _)| clock), Some(6));
    let seen = relays_of(&b, 8300);
    assert_eq!(seen.last(), Some(&(6, "null".to_string())), "{seen:?}");
    // The same client back with its next clock is seen at once.
    c.send_awareness(&awareness_update(8300, 7, &cursor(7)))
        .await;
    b.wait_for("client 8300 back", |m| {
        entry_of(m, 8300).is_some_and(|(clock, json)| clock == 7 && json != "null")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_is_greeted_with_the_latest_states_while_their_relay_waits() {
    let server = TestServer::start("");
    let s = session_id("aw-greet");
    let mut a = server.wb_user(&s, "a").await;
    let burst: Vec<AwarenessUpdate> = (1..=20)
        .map(|clock| awareness_update(8400, clock, &cursor(clock)))
        .collect();
    a.send_raw(packed(&burst)).await;
    // The step 2 answering a's step 1 comes after the burst is applied (one reader).
    a.barrier().await;
    let c = server.wb(&s, &token("c", &s, "student")).await;
    let greeting = c
        .received
        .iter()
        .find_map(|m| entry_of(m, 8400))
        .expect("client 8400 in the joiner's greeting");
    assert_eq!(greeting, (20, cursor(20)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_of_zero_relays_every_change_at_once() {
    const N: u32 = 10;
    let server = TestServer::start("[whiteboard]\nawareness_tick_ms = 0\n");
    let s = session_id("aw-tick0");
    let mut a = server.wb_user(&s, "a").await;
    let mut b = server.wb_user(&s, "b").await;
    let burst: Vec<AwarenessUpdate> = (1..=N)
        .map(|clock| awareness_update(8500, clock, &cursor(clock)))
        .collect();
    a.send_raw(packed(&burst)).await;
    b.wait_for("the burst's last state", |m| {
        entry_of(m, 8500).is_some_and(|(clock, _)| clock == N)
    })
    .await;
    let clocks: Vec<u32> = relays_of(&b, 8500).into_iter().map(|(c, _)| c).collect();
    assert_eq!(clocks, (1..=N).collect::<Vec<u32>>());
}
