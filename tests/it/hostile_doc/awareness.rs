//! Awareness floods, and the clock of a relayed awareness removal.

use super::*;

/// Every awareness message `client` receives until the answer to its query-awareness (the
/// answer is the last one returned).
async fn query_awareness(client: &mut WbClient) -> Vec<yrs::sync::AwarenessUpdate> {
    client.send_raw(vec![3]).await;
    let mut seen = Vec::new();
    // The answer is an awareness message; earlier relays may come first. A barrier after
    // the query orders them: the answer is queued before the step 2.
    let sv = client.doc.transact().state_vector();
    client
        .send_msg(&Message::Sync(SyncMessage::SyncStep1(sv)))
        .await;
    loop {
        match client.next_msg().await {
            Message::Awareness(u) => seen.push(u),
            Message::Sync(SyncMessage::SyncStep2(_)) => return seen,
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_awareness_clients_from_one_viewer_are_dropped_with_memory_bounded() {
    let server = TestServer::start("");
    let s = session_id("aw-bomb");
    let mut observer = server.wb_user(&s, "observer").await;
    // Warm up the process (a session, a join) before the baseline.
    assert_server_alive(&server, &s).await;
    let before = vm_hwm_kib(server.pid());

    let flood = awareness_flood(1, 1_000_000);
    let mut viewer = server.wb(&s, &token("v", &s, "viewer")).await;
    let _ = viewer.try_send_raw(flood.clone()).await;
    let refusals = eventually(
        "the flood counted as an awareness refusal",
        TIMEOUT,
        || async {
            let n =
                metric_labelled(&server, "easel_guard_refusals_total{reason=\"awareness\"}").await;
            (n >= 1.0).then_some(n)
        },
    )
    .await;
    assert_eq!(refusals, 1.0);
    // Nothing of it reached the others or stayed in the session.
    let answers = query_awareness(&mut observer).await;
    let most = answers.iter().map(|u| u.clients.len()).max().unwrap_or(0);
    assert!(
        most <= 16,
        "an awareness message with {most} clients was relayed"
    );

    // A later joiner gets its greeting at once, not a 1013.
    let started = Instant::now();
    let mut late = server.wb_connect(&s, &token("late", &s, "student")).await;
    late.handshake().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let greeting: Vec<usize> = late
        .received
        .iter()
        .filter_map(|m| match m {
            Message::Awareness(u) => Some(u.clients.len()),
            _ => None,
        })
        .collect();
    assert!(greeting.iter().all(|n| *n <= 16), "{greeting:?}");
    assert!(late.closed.is_none());

    // Peak memory: the 7 MB frame, refused by its client count before anything decodes it.
    let after = vm_hwm_kib(server.pid());
    eprintln!(
        "awareness flood of {} bytes: VmHWM {before} KiB -> {after} KiB",
        flood.len()
    );
    assert!(
        after.saturating_sub(before) < 32 * 1024,
        "VmHWM grew by {} KiB for a {} byte frame",
        after - before,
        flood.len()
    );
    assert_server_alive(&server, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_speaks_for_at_most_16_awareness_clients_of_at_most_64_kib() {
    let server = TestServer::start("");
    let s = session_id("aw-cap");
    let mut observer = server.wb_user(&s, "observer").await;
    let mut p = server.wb_user(&s, "p").await;
    let refused = || metric_labelled(&server, "easel_guard_refusals_total{reason=\"awareness\"}");

    // 16 client ids, one update each: all relayed.
    for i in 0..16u64 {
        p.send_awareness(&awareness_update(100 + i, 1, &format!("{{\"n\":{i}}}")))
            .await;
    }
    observer
        .wait_for(
            "the 16th client id",
            |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 115).is_some()),
        )
        .await;
    // The 17th is refused; an update of one of the 16 after it still goes through, and the
    // observer, which gets the relays in order, never saw the 17th.
    p.send_awareness(&awareness_update(116, 1, "{\"n\":16}"))
        .await;
    p.send_awareness(&awareness_update(100, 2, "{\"n\":\"again\"}"))
        .await;
    observer
        .wait_for("client 100's second state", |m| {
            matches!(m, Message::Awareness(u) if awareness_entry(u, 100).is_some_and(|e| e.clock == 2))
        })
        .await;
    let relayed_117 = observer
        .received
        .iter()
        .any(|m| matches!(m, Message::Awareness(u) if awareness_entry(u, 116).is_some()));
    assert!(!relayed_117, "a 17th client id was relayed");
    assert_eq!(refused().await, 1.0);
    let states = query_awareness(&mut observer).await;
    let answer = states.last().expect("an answer to query awareness");
    let ids: Vec<u64> = awareness_ids(answer)
        .into_iter()
        .filter(|id| (100..200).contains(id))
        .collect();
    assert_eq!(ids, (100..116).collect::<Vec<u64>>());

    // A state over 64 KiB is refused; one just under it is accepted.
    let over = format!("{{\"s\":\"{}\"}}", "x".repeat(64 * 1024));
    p.send_awareness(&awareness_update(101, 2, &over)).await;
    let under = format!("{{\"s\":\"{}\"}}", "y".repeat(60 * 1024));
    p.send_awareness(&awareness_update(101, 3, &under)).await;
    let got = observer
        .wait_for("client 101's state under 64 KiB", |m| {
            matches!(m, Message::Awareness(u) if awareness_entry(u, 101).is_some_and(|e| e.clock >= 2))
        })
        .await;
    match got {
        Message::Awareness(u) => {
            let e = awareness_entry(&u, 101).expect("entry");
            assert_eq!(e.clock, 3, "the state over 64 KiB was relayed");
            assert_eq!(e.json.len(), under.len());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(refused().await, 2.0);
    assert!(p.closed.is_none() && observer.closed.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_removal_of_a_closed_connections_client_carries_its_own_clock() {
    let server = TestServer::start("");
    let s = session_id("aw-clock");
    let mut a = server.wb_user(&s, "a").await;
    let mut b = server.wb_user(&s, "b").await;
    a.send_awareness(&awareness_update(777, 5, "{\"user\":\"a\"}"))
        .await;
    b.wait_for(
        "client 777's state",
        |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 777).is_some()),
    )
    .await;
    a.close().await;
    let removal = b
        .wait_for("client 777's removal", |m| {
            matches!(m, Message::Awareness(u) if awareness_entry(u, 777).is_some_and(|e| &*e.json == "null"))
        })
        .await;
    let Message::Awareness(u) = removal else {
        unreachable!()
    };
    assert_eq!(
        awareness_entry(&u, 777).map(|e| e.clock),
        Some(5),
        "the removal must carry the client's last clock, not a bumped one"
    );
    // So the same client announcing itself again with its next clock is seen at once.
    let mut again = server.wb_user(&s, "a-again").await;
    again
        .send_awareness(&awareness_update(777, 6, "{\"user\":\"a\"}"))
        .await;
    b.wait_for("client 777 back with clock 6", |m| {
        matches!(m, Message::Awareness(u) if awareness_entry(u, 777).is_some_and(|e| e.clock == 6 && &*e.json != "null"))
    })
    .await;
}

/// An awareness message of several clients (id, clock, JSON state).
fn awareness_of(entries: &[(u64, u32, &str)]) -> yrs::sync::AwarenessUpdate {
    let mut update = awareness_update(entries[0].0, entries[0].1, entries[0].2);
    for (id, clock, json) in &entries[1..] {
        update.clients.insert(
            yrs::ClientID::new(*id),
            yrs::sync::awareness::AwarenessUpdateEntry {
                clock: *clock,
                json: (*json).into(),
            },
        );
    }
    update
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cannot_remove_another_connections_awareness_client() {
    let server = TestServer::start("");
    let s = session_id("aw-owner");
    let mut a = server.wb_user(&s, "a").await;
    let mut b = server.wb_user(&s, "b").await;
    a.send_awareness(&awareness_update(500, 3, "{\"who\":\"a\"}"))
        .await;
    b.wait_for(
        "client 500",
        |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 500).is_some()),
    )
    .await;
    // M sends 500 at an old clock (ignored: the session has clock 3) with a client of its
    // own (applied), then leaves: only its own client is removed.
    let mut m = server.wb_user(&s, "m").await;
    m.send_awareness(&awareness_of(&[
        (500, 1, "{\"who\":\"m\"}"),
        (600, 1, "{\"who\":\"m\"}"),
    ]))
    .await;
    b.wait_for(
        "client 600",
        |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 600).is_some()),
    )
    .await;
    m.close().await;
    let removal = b
        .wait_for("client 600's removal", |m| {
            matches!(m, Message::Awareness(u) if awareness_entry(u, 600).is_some_and(|e| &*e.json == "null"))
        })
        .await;
    let Message::Awareness(removal) = removal else {
        unreachable!()
    };
    assert!(
        awareness_entry(&removal, 500).is_none(),
        "M's leaving removed A's client 500: {removal:?}"
    );
    let states = query_awareness(&mut b).await;
    let answer = states.last().expect("an answer to query awareness");
    assert_eq!(
        awareness_entry(answer, 500).map(|e| (e.clock, e.json.to_string())),
        Some((3, "{\"who\":\"a\"}".to_string()))
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_sending_back_the_states_it_was_greeted_with_is_not_refused() {
    // y-websocket clients send back every awareness change they apply, the greeting too:
    // with more than 16 others in the session, that echo names more than 16 client ids.
    let server = TestServer::start("");
    let s = session_id("aw-echo");
    let mut p = server.wb_user(&s, "p").await;
    let mut q = server.wb_user(&s, "q").await;
    for i in 0..16u64 {
        p.send_awareness(&awareness_update(200 + i, 1, "{}")).await;
    }
    for i in 0..4u64 {
        q.send_awareness(&awareness_update(300 + i, 1, "{}")).await;
    }
    q.wait_for(
        "p's 16th client",
        |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 215).is_some()),
    )
    .await;
    p.wait_for(
        "q's 4th client",
        |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 303).is_some()),
    )
    .await;
    let mut n = server.wb(&s, &token("n", &s, "student")).await;
    let greeting = n
        .received
        .iter()
        .find_map(|m| match m {
            Message::Awareness(u) => Some(u.clone()),
            _ => None,
        })
        .expect("an awareness greeting");
    assert_eq!(greeting.clients.len(), 20);
    n.send_awareness(&greeting).await;
    n.send_awareness(&awareness_update(400, 1, "{\"me\":1}"))
        .await;
    p.wait_for(
        "the joiner's own client",
        |m| matches!(m, Message::Awareness(u) if awareness_entry(u, 400).is_some()),
    )
    .await;
    assert_eq!(
        metric_labelled(&server, "easel_guard_refusals_total{reason=\"awareness\"}").await,
        0.0,
        "the echo of the greeting was counted as a refusal"
    );
}
