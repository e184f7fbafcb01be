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

mod bodies_and_caps;
mod sync_and_polls;
mod tokens_and_start;

/// The `gICAgAI` of the issue: a state vector declaring 2^29 entries in five bytes.
const SV_BOMB: &str = "gICAgAI";

fn wb_api(session: &str) -> String {
    format!("/api/v2/session/{session}/whiteboard")
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
    metric_sample(&r.text(), series).unwrap_or(0.0)
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
