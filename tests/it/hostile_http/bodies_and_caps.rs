//! Large and slow requests, and the per-user caps on connections and new sessions.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthenticated_large_posts_are_refused_without_reading_the_body() {
    let server = TestServer::start("");
    let addr = server.addr;
    let before = vm_hwm_kib(server.pid());
    let declared = 8 * 1024 * 1024;
    // Fifty clients announce 8 MiB each, send 64 KiB of it and stall.
    let mut stalled = Vec::new();
    for i in 0..50 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n",
            wb_api(&format!("s{i}"))
        );
        s.write_all(head.as_bytes()).await.expect("write head");
        s.write_all(&vec![0x41; 64 * 1024])
            .await
            .expect("write some body");
        let started = Instant::now();
        let (status, body) = read_response(&mut s, Duration::from_secs(5))
            .await
            .expect("a response before the body");
        assert_eq!(status, 401, "{body}");
        assert!(started.elapsed() < Duration::from_secs(2));
        stalled.push(s);
    }
    let took = healthz(addr).await;
    assert!(took < Duration::from_millis(500), "/healthz took {took:?}");
    let grown_mb = vm_hwm_kib(server.pid()).saturating_sub(before) / 1024;
    assert!(grown_mb < 64, "peak RSS grew {grown_mb} MiB");
    // A viewer is refused before its body is read too.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {}\r\nContent-Length: {declared}\r\n\r\n",
        wb_api("lesson"),
        bearer(&token("vic", "lesson", "viewer"))
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    let (status, _) = read_response(&mut s, Duration::from_secs(5))
        .await
        .expect("a response");
    assert_eq!(status, 403);
    // Another user's post goes through.
    let r = post_with(
        addr,
        &wb_api("lesson"),
        &token("alice", "lesson", "student"),
        &map_set_update(3, "m", "k", "v"),
    )
    .await;
    assert_eq!(r.status, 204);
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_headers_and_slow_bodies_are_cut_off() {
    let server = TestServer::start("[limits]\nhttp_timeout_s = 2\n");
    let addr = server.addr;
    // Headers that never finish.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    // A connection that sends nothing at all.
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    // An authorized body that stalls half-way.
    let mut body = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {}\r\nContent-Length: 1000\r\n\r\n",
        wb_api("lesson"),
        bearer(&token("alice", "lesson", "student"))
    );
    body.write_all(head.as_bytes()).await.expect("write");
    body.write_all(&[0u8; 10]).await.expect("write");
    let started = Instant::now();
    // Meanwhile others are served.
    let took = healthz(addr).await;
    assert!(took < Duration::from_millis(500), "/healthz took {took:?}");
    let within = Duration::from_secs(8);
    assert_eq!(read_response(&mut slow, within).await, None, "slow headers");
    assert_eq!(read_response(&mut silent, within).await, None, "silent");
    let (status, text) = read_response(&mut body, within)
        .await
        .expect("a 408 for the slow body");
    assert_eq!(status, 408, "{text}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
    assert!(metric(addr, "easel_limit_refusals_total{limit=\"http_timeout\"}").await >= 3.0);
    // A request sent in time on a fresh connection is served.
    let r = get_with(addr, &wb_api("lesson"), &token("bob", "lesson", "student")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_are_capped_per_user_across_sessions() {
    let server = TestServer::start(
        "[limits]\nmax_connections_per_user_total = 3\nmax_connections_per_user = 8\n",
    );
    let addr = server.addr;
    let alice = token("alice", "*", "student");
    let mut held = Vec::new();
    for (i, path) in [
        "/ws/v2/session/s1/whiteboard",
        "/ws/v2/session/s2",
        "/ws/v2/session/s3/whiteboard",
    ]
    .iter()
    .enumerate()
    {
        held.push(
            ws_status(addr, path, &alice)
                .await
                .unwrap_or_else(|s| panic!("connection {i}: {s}")),
        );
    }
    assert_eq!(
        ws_status(addr, "/ws/v2/session/s4/whiteboard", &alice)
            .await
            .err(),
        Some(429)
    );
    // Bob is not affected.
    let _bob = ws_status(
        addr,
        "/ws/v2/session/s4/whiteboard",
        &token("bob", "*", "student"),
    )
    .await
    .expect("bob connects");
    // Alice closes one and may open another.
    let mut first = held.remove(0);
    let _ = first.close(None).await;
    drop(first);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match ws_status(addr, "/ws/v2/session/s4/whiteboard", &alice).await {
            Ok(ws) => {
                held.push(ws);
                break;
            }
            Err(429) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("alice after a close: {s}"),
        }
    }
    assert!(
        metric(
            addr,
            "easel_auth_failures_total{reason=\"per_user_total_cap\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_sessions_are_rate_limited_per_user() {
    let server = TestServer::start("[limits]\nmax_new_sessions_per_user_per_minute = 3\n");
    let addr = server.addr;
    let alice = token("alice", "*", "student");
    for s in ["n1", "n2", "n3"] {
        let r = get_with(addr, &wb_api(s), &alice).await;
        assert_eq!(r.status, 200, "{s}: {}", r.text());
    }
    // A fourth session would be loaded: refused, on HTTP and before a WebSocket upgrade.
    let r = get_with(addr, &wb_api("n4"), &alice).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"], "too_many_new_sessions");
    assert_eq!(
        ws_status(addr, "/ws/v2/session/n5/whiteboard", &alice)
            .await
            .err(),
        Some(429)
    );
    wait_status(addr, "sessions", 3).await;
    // Sessions already in memory cost nothing.
    let r = get_with(addr, &wb_api("n1"), &alice).await;
    assert_eq!(r.status, 200);
    let _ws = ws_status(addr, "/ws/v2/session/n2/whiteboard", &alice)
        .await
        .expect("a loaded session");
    // Bob has his own budget.
    let r = get_with(addr, &wb_api("n4"), &token("bob", "*", "student")).await;
    assert_eq!(r.status, 200);
    assert!(
        metric(
            addr,
            "easel_limit_refusals_total{limit=\"new_sessions_per_user\"}"
        )
        .await
            >= 2.0
    );
}
