//! State-vector bombs, the empty state vector, and the caps on long polls.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokenless_sv_bomb_is_401_and_costs_no_memory() {
    let server = TestServer::start("");
    let addr = server.addr;
    healthz(addr).await;
    let before = vm_hwm_kib(server.pid());
    let path = format!("{}?sv={SV_BOMB}", wb_api("lesson"));
    // Four loops, as in the issue, bounded in count.
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move {
                for _ in 0..25 {
                    let r = http_request(addr, "GET", &path, &[], None).await;
                    assert_eq!(r.status, 401, "{}", r.text());
                    assert_eq!(r.json()["error"], "unauthorized");
                }
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    while loops.iter().any(|l| !l.is_finished()) {
        slowest = slowest.max(healthz(addr).await);
    }
    for l in loops {
        l.await.expect("flood loop");
    }
    let grown_mb = vm_hwm_kib(server.pid()).saturating_sub(before) / 1024;
    assert!(
        grown_mb < 64,
        "peak RSS grew {grown_mb} MiB under the flood"
    );
    assert!(
        slowest < Duration::from_millis(500),
        "/healthz took {slowest:?}"
    );
    assert!(metric(addr, "easel_auth_failures_total{reason=\"missing\"}").await >= 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sv_bomb_with_a_valid_token_is_400_and_costs_no_memory() {
    let server = TestServer::start("");
    let addr = server.addr;
    let t = token("alice", "lesson", "student");
    let before = vm_hwm_kib(server.pid());
    for _ in 0..20 {
        let r = get_with(addr, &format!("{}?sv={SV_BOMB}", wb_api("lesson")), &t).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("sv"), "{}", r.text());
    }
    let grown_mb = vm_hwm_kib(server.pid()).saturating_sub(before) / 1024;
    assert!(grown_mb < 64, "peak RSS grew {grown_mb} MiB");
    assert!(metric(addr, "easel_limit_refusals_total{limit=\"state_vector\"}").await >= 20.0);
    // Another user still reads the board.
    let r = get_with(addr, &wb_api("lesson"), &token("bob", "lesson", "student")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn empty_sv_answers_the_whole_board() {
    let server = TestServer::start("");
    let addr = server.addr;
    let t = token("alice", "lesson", "student");
    let r = post_with(
        addr,
        &wb_api("lesson"),
        &t,
        &map_set_update(11, "board", "title", "fractions"),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    for query in ["?sv=", "?sv=&wait=1", ""] {
        let r = get_with(addr, &format!("{}{query}", wb_api("lesson")), &t).await;
        assert_eq!(r.status, 200, "{query}: {}", r.text());
        let doc = Doc::new();
        let board = doc.get_or_insert_map("board");
        doc.transact_mut()
            .apply_update(Update::decode_v1(&r.body).expect("a Yjs v1 update"))
            .expect("applies");
        let txn = doc.transact();
        assert_eq!(
            board.get(&txn, "title").map(|v| v.to_string(&txn)),
            Some("fractions".into()),
            "{query}"
        );
        assert_eq!(
            txn.state_vector().get(&yrs::ClientID::new(11)),
            1,
            "{query}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_polls_are_capped_per_user_and_in_all_and_healthz_stays_up() {
    let server = TestServer::start(
        "[limits]\nmax_long_polls_per_user = 2\nmax_long_polls = 3\nmax_connections = 2\n",
    );
    let addr = server.addr;
    let poll = |user: &str| {
        let t = token(user, "lesson", "student");
        let path = format!("{}?wait=20&sv=AA", wb_api("lesson"));
        // `sv=AA`: the empty state vector, and the board is empty: the poll is held.
        tokio::spawn(async move {
            let started = Instant::now();
            let auth = bearer(&t);
            let r = tokio::time::timeout(Duration::from_secs(25), raw_get(addr, &path, &auth))
                .await
                .expect("long poll answered");
            (r, started.elapsed())
        })
    };
    let a1 = poll("alice");
    let a2 = poll("alice");
    wait_status(addr, "long_polls", 2).await;
    // Alice's third is refused at once, not held.
    let started = Instant::now();
    let r = get_with(
        addr,
        &format!("{}?wait=20", wb_api("lesson")),
        &token("alice", "lesson", "student"),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"], "too_many_long_polls");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Bob's is held: he is not affected by Alice.
    let b1 = poll("bob");
    wait_status(addr, "long_polls", 3).await;
    // The server-wide cap: Carol is refused.
    let r = get_with(
        addr,
        &format!("{}?wait=20", wb_api("lesson")),
        &token("carol", "lesson", "student"),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    // A plain GET (no wait) is no long poll: still served.
    let r = get_with(
        addr,
        &wb_api("lesson"),
        &token("carol", "lesson", "student"),
    )
    .await;
    assert_eq!(r.status, 200);
    // The WebSocket cap full too: /healthz still answers, fast.
    let _w1 = ws_status(
        addr,
        "/ws/v2/session/lesson/whiteboard",
        &token("dan", "lesson", "student"),
    )
    .await
    .expect("first ws");
    let _w2 = ws_status(
        addr,
        "/ws/v2/session/other/whiteboard",
        &token("dan", "other", "student"),
    )
    .await
    .expect("second ws");
    let third = ws_status(
        addr,
        "/ws/v2/session/x/whiteboard",
        &token("erin", "x", "student"),
    )
    .await;
    assert_eq!(third.err(), Some(503));
    let took = healthz(addr).await;
    assert!(took < Duration::from_millis(500), "/healthz took {took:?}");
    // A change answers every held poll.
    let r = post_with(
        addr,
        &wb_api("lesson"),
        &token("carol", "lesson", "student"),
        &map_set_update(5, "m", "k", "v"),
    )
    .await;
    assert_eq!(r.status, 204);
    for h in [a1, a2, b1] {
        let ((status, _), took) = h.await.expect("poll task");
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(15), "{took:?}");
    }
    wait_status(addr, "long_polls", 0).await;
    assert!(
        metric(
            addr,
            "easel_limit_refusals_total{limit=\"long_polls_per_user\"}"
        )
        .await
            >= 1.0
    );
    assert!(metric(addr, "easel_limit_refusals_total{limit=\"long_polls\"}").await >= 1.0);
}

/// A GET on a raw socket with no overall timeout of its own (long polls outlast
/// `support::TIMEOUT`): `(status, body)`.
async fn raw_get(addr: SocketAddr, path: &str, auth: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    read_response(&mut s, Duration::from_secs(40))
        .await
        .expect("a response")
}
