//! A minimal HTTP/1.1 client over a raw TCP stream (so malformed and partial requests can be
//! sent), and the shape of a refusal.

use std::net::SocketAddr;

use super::server::TIMEOUT;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// Sends one HTTP/1.1 request and reads the response (Content-Length, chunked, or to EOF).
/// A `101 Switching Protocols` answer is returned right after its headers.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    tokio::time::timeout(
        TIMEOUT,
        http_request_inner(addr, method, path, headers, body),
    )
    .await
    .unwrap_or_else(|_| panic!("HTTP {method} {path}: no complete response within {TIMEOUT:?}"))
}

async fn http_request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    let mut s = TcpStream::connect(addr).await.expect("tcp connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    let mut has_connection = false;
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("connection") {
            has_connection = true;
        }
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_connection {
        req.push_str("Connection: close\r\n");
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    s.write_all(&bytes).await.expect("write request");

    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16384];
    // headers
    let header_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut chunk).await.expect("read response");
        if n == 0 {
            panic!(
                "connection closed before response headers: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut rest = buf[header_end + 4..].to_vec();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    if status == 101 || status == 204 || status == 304 || method == "HEAD" {
        return HttpResponse {
            status,
            body: Vec::new(),
        };
    }
    let body = if let Some(cl) = get("content-length") {
        let n: usize = cl.parse().expect("content-length");
        while rest.len() < n {
            let k = s.read(&mut chunk).await.expect("read body");
            if k == 0 {
                break;
            }
            rest.extend_from_slice(&chunk[..k]);
        }
        rest.truncate(n);
        rest
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut out = Vec::new();
        let mut pos = 0usize;
        loop {
            // need a full size line
            let line_end = loop {
                if let Some(p) = find(&rest[pos..], b"\r\n") {
                    break pos + p;
                }
                let k = s.read(&mut chunk).await.expect("read chunk");
                if k == 0 {
                    return HttpResponse { status, body: out };
                }
                rest.extend_from_slice(&chunk[..k]);
            };
            let size_str = String::from_utf8_lossy(&rest[pos..line_end]).to_string();
            let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16)
                .expect("chunk size");
            pos = line_end + 2;
            if size == 0 {
                break;
            }
            while rest.len() < pos + size + 2 {
                let k = s.read(&mut chunk).await.expect("read chunk data");
                if k == 0 {
                    break;
                }
                rest.extend_from_slice(&chunk[..k]);
            }
            let end = (pos + size).min(rest.len());
            out.extend_from_slice(&rest[pos..end]);
            pos = (pos + size + 2).min(rest.len());
        }
        out
    } else {
        loop {
            let k = s.read(&mut chunk).await.unwrap_or(0);
            if k == 0 {
                break;
            }
            rest.extend_from_slice(&chunk[..k]);
        }
        rest
    };
    HttpResponse { status, body }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Sends a WebSocket upgrade request by hand and returns the HTTP answer
/// (for refusal tests: status and JSON body).
pub async fn ws_upgrade_raw(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut h: Vec<(&str, &str)> = vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ];
    h.extend_from_slice(headers);
    http_request(addr, "GET", path, &h, None).await
}

/// Asserts a pre-upgrade refusal: status, a JSON body with string "error" and "message",
/// and (when given) the error code.
pub fn assert_refusal(resp: &HttpResponse, status: u16, error: Option<&str>, what: &str) {
    assert_eq!(
        resp.status,
        status,
        "{what}: expected HTTP {status}, got {} with body {:?}",
        resp.status,
        resp.text()
    );
    let v: Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("{what}: refusal body is not JSON ({e}): {:?}", resp.text()));
    assert!(
        v["error"].is_string(),
        "{what}: body lacks string \"error\": {v}"
    );
    assert!(
        v["message"].is_string(),
        "{what}: body lacks string \"message\": {v}"
    );
    if let Some(code) = error {
        assert_eq!(v["error"], code, "{what}: wrong error code in {v}");
    }
}
