//! Hostile HTTP clients (SPEC §2, §6, §7, §7.1), against the real binary: every refusal is
//! shown next to proof that other users carry on (`/healthz` answers fast, another user's
//! long poll or WebSocket still works), and that it is counted in `/metrics`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yrs::updates::decoder::Decode;
use yrs::{Doc, Map, ReadTxn, Transact, Update};

/// The `gICAgAI` of the issue: a state vector declaring 2^29 entries in five bytes.
const SV_BOMB: &str = "gICAgAI";

fn wb_api(session: &str) -> String {
    format!("/api/v2/session/{session}/whiteboard")
}

/// Peak resident memory of a process, in KiB (`VmHWM` of /proc/PID/status).
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM line")
}

/// `GET /healthz`: asserts 200 and returns how long it took.
async fn healthz(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let r = http_request(addr, "GET", "/healthz", &[], None).await;
    assert_eq!(r.status, 200, "/healthz: {}", r.text());
    started.elapsed()
}

/// The value of one metric line of `/metrics` (`name{labels}`), 0 when absent.
async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let r = http_request(addr, "GET", "/metrics", &[], None).await;
    r.text()
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn get_with(addr: SocketAddr, path: &str, token: &str) -> HttpResponse {
    let auth = bearer(token);
    http_request(addr, "GET", path, &[("Authorization", auth.as_str())], None).await
}

async fn post_with(addr: SocketAddr, path: &str, token: &str, body: &[u8]) -> HttpResponse {
    let auth = bearer(token);
    http_request(
        addr,
        "POST",
        path,
        &[("Authorization", auth.as_str())],
        Some(body),
    )
    .await
}

/// Reads one HTTP response off a raw socket: `(status, body)`, or `None` when the server
/// closed the connection first. Panics past `within`.
async fn read_response(s: &mut TcpStream, within: Duration) -> Option<(u16, String)> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < end + 4 + len {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = String::from_utf8_lossy(&buf[end + 4..]).to_string();
                return Some((status, body));
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .unwrap_or_else(|_| panic!("no response and no close within {within:?}"))
}

/// Waits until `/api/v2/status` says `key` is `want`.
async fn wait_status(addr: SocketAddr, key: &str, want: u64) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let r = http_request(addr, "GET", "/api/v2/status", &[], None).await;
        let got = r.json()[key].as_u64();
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "status {key} stayed {got:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A WebSocket upgrade's outcome: `Ok` when upgraded, else the HTTP status.
async fn ws_status(addr: SocketAddr, path: &str, token: &str) -> Result<Ws, u16> {
    match ws_connect(addr, path, Some(token), TokenVia::Query, &[]).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("ws connect to {path}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokenless_sv_bomb_is_401_and_costs_no_memory() {
    let server = TestServer::start("");
    let addr = server.addr;
    healthz(addr).await;
    let before = peak_rss_kb(server.pid());
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
    let grown_mb = peak_rss_kb(server.pid()).saturating_sub(before) / 1024;
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
    let before = peak_rss_kb(server.pid());
    for _ in 0..20 {
        let r = get_with(addr, &format!("{}?sv={SV_BOMB}", wb_api("lesson")), &t).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("sv"), "{}", r.text());
    }
    let grown_mb = peak_rss_kb(server.pid()).saturating_sub(before) / 1024;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthenticated_large_posts_are_refused_without_reading_the_body() {
    let server = TestServer::start("");
    let addr = server.addr;
    let before = peak_rss_kb(server.pid());
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
    let grown_mb = peak_rss_kb(server.pid()).saturating_sub(before) / 1024;
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

#[tokio::test]
async fn short_hmac_secrets_are_refused_at_start() {
    for secret in ["dev", "test-secret", "0123456789abcdef0123456789abcde"] {
        let err = TestServer::try_start(
            "",
            StartOpts {
                env: vec![("EASEL_JWT_SECRET".into(), secret.into())],
                ..Default::default()
            },
        )
        .err()
        .unwrap_or_else(|| panic!("a {}-byte secret was accepted", secret.len()));
        assert!(
            err.contains("auth.jwt_secret") && err.contains("32 bytes"),
            "{err}"
        );
    }
    // `easel token` refuses to sign with one too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(["token", "--sub", "alice", "--session", "lesson"])
        .env("EASEL_JWT_SECRET", "dev")
        .env_remove("EASEL_JWT_SECRET_FILE")
        .env_remove("EASEL_JWT_PUBLIC_KEY_FILE")
        .output()
        .expect("run easel token");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{err}");
    assert!(
        err.contains("EASEL_JWT_SECRET") && err.contains("32 bytes"),
        "{err}"
    );
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": "alice", "sid": "lesson", "exp": now_s() + 600});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c
}

#[tokio::test]
async fn nbf_in_the_future_is_401() {
    let server = TestServer::start("");
    let addr = server.addr;
    // The leeway is 30 s: 300 s ahead is refused, 10 s ahead and the past are not.
    let early = mint(&claims(json!({"nbf": now_s() + 300})));
    let r = get_with(addr, &wb_api("lesson"), &early).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "unauthorized");
    assert_eq!(
        ws_status(addr, "/ws/v2/session/lesson/whiteboard", &early)
            .await
            .err(),
        Some(401)
    );
    for nbf in [now_s() + 10, now_s() - 60] {
        let r = get_with(addr, &wb_api("lesson"), &mint(&claims(json!({"nbf": nbf})))).await;
        assert_eq!(r.status, 200, "nbf {nbf}: {}", r.text());
    }
    assert!(metric(addr, "easel_auth_failures_total{reason=\"not_yet_valid\"}").await >= 2.0);
}

#[tokio::test]
async fn crit_header_is_401() {
    let server = TestServer::start("");
    let addr = server.addr;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.crit = Some(vec!["https://example.com/must-understand".into()]);
    let t = jsonwebtoken::encode(
        &header,
        &claims(json!({"https://example.com/must-understand": true})),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode");
    let r = get_with(addr, &wb_api("lesson"), &t).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        ws_status(addr, "/ws/v2/session/lesson", &t).await.err(),
        Some(401)
    );
    // The same claims without `crit` pass.
    let ok = mint(&claims(
        json!({"https://example.com/must-understand": true}),
    ));
    assert_eq!(get_with(addr, &wb_api("lesson"), &ok).await.status, 200);
    assert!(metric(addr, "easel_auth_failures_total{reason=\"crit\"}").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_never_hold_the_token() {
    let server = TestServer::start_with("", &[("EASEL_LOG", "debug")], &[]);
    let addr = server.addr;
    let t = token("alice", "lesson", "student");
    let r = http_request(
        addr,
        "GET",
        &format!("{}?token={t}", wb_api("lesson")),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        post_with(
            addr,
            &wb_api("lesson"),
            &t,
            &map_set_update(1, "m", "k", "v")
        )
        .await
        .status,
        204
    );
    let _ws = ws_status(addr, "/ws/v2/session/lesson/whiteboard", &t)
        .await
        .expect("ws");
    let expired = mint(&claims(json!({"exp": now_s() - 3600})));
    let r = http_request(
        addr,
        "GET",
        &format!("{}?token={expired}", wb_api("lesson")),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 401);
    // The request spans were written (so the check below looks at real debug output).
    let deadline = Instant::now() + TIMEOUT;
    while !server
        .stderr_text()
        .contains("/api/v2/session/lesson/whiteboard")
    {
        assert!(
            Instant::now() < deadline,
            "no request span in the debug log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = server.stderr_text();
    for secret in [&t, &expired] {
        let signature = secret.rsplit('.').next().unwrap_or_default();
        assert!(!log.contains(signature), "a token is in the debug log");
    }
    assert!(
        !log.contains("token="),
        "a query string is in the debug log"
    );
}

#[tokio::test]
async fn open_file_limit_is_raised_to_the_hard_limit() {
    // Start the server with a low soft limit (as many systems' default of 1024 is).
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" serve --listen 127.0.0.1:0 --data-dir \"$1\"")
        .arg(env!("CARGO_BIN_EXE_easel"))
        .arg(tmp.path().join("data"))
        .env("EASEL_JWT_SECRET", SECRET)
        .env("EASEL_LOG", "warn")
        .env_remove("EASEL_LISTEN")
        .env_remove("EASEL_DATA_DIR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let mut out = child.stdout.take().expect("stdout");
    let listening = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut seen = Vec::new();
        let mut b = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("easel listening on") {
            match out.read(&mut b) {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&b[..n]),
            }
        }
        true
    });
    let ok = tokio::time::timeout(STARTUP_TIMEOUT, listening).await;
    // `serve` raises the limit as it starts serving, just after the listening line.
    let max_open_files = || -> Option<(String, String)> {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let mut nums = line.split_whitespace().skip(3);
        Some((nums.next()?.to_owned(), nums.next()?.to_owned()))
    };
    let deadline = Instant::now() + TIMEOUT;
    let mut seen = max_open_files();
    while matches!(&seen, Some((soft, hard)) if soft != hard) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        seen = max_open_files();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(ok, Ok(Ok(true))), "the server did not start");
    let (soft, hard) = seen.expect("Max open files line");
    assert_eq!(soft, hard, "soft limit not raised to the hard one");
    assert_ne!(soft, "256");
}
