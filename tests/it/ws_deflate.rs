//! RFC 6455 framing and RFC 7692 permessage-deflate against the real server, Autobahn
//! style: a raw client writes the handshake and the frames byte by byte (masking, RSV bits,
//! fragments, control frames) and reads the server's frames raw, so nothing in a client
//! library hides what is on the wire.

use std::time::Duration;

use crate::support::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, ReadTxn, Text, Transact, Update};

struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// The handshake response's headers, lower-cased names.
    headers: Vec<(String, String)>,
}

#[derive(Debug)]
struct Frame {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    payload: Vec<u8>,
}

const TEXT: u8 = 1;
const BINARY: u8 = 2;
const CLOSE: u8 = 8;
const PING: u8 = 9;
const PONG: u8 = 10;

impl Raw {
    async fn connect(server: &TestServer, path: &str, extensions: Option<&str>) -> Raw {
        let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
        let ext = extensions
            .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n",
            server.addr
        );
        tcp.write_all(req.as_bytes()).await.expect("write request");
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(TIMEOUT, tcp.read(&mut chunk))
                .await
                .expect("handshake timeout")
                .expect("read");
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // RFC 6455 4.2.2's example key and accept.
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        let headers = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Raw {
            tcp,
            buf: buf[end..].to_vec(),
            headers,
        }
    }

    async fn wb(server: &TestServer, session: &str, extensions: Option<&str>) -> Raw {
        Raw::wb_as(server, session, "u1", extensions).await
    }

    /// As `user`: one user may hold only a few connections to a session.
    async fn wb_as(server: &TestServer, session: &str, user: &str, ext: Option<&str>) -> Raw {
        let path = format!(
            "{}?token={}",
            TestServer::wb_path(session),
            token(user, session, "student")
        );
        let extensions = ext;
        Raw::connect(server, &path, extensions).await
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Writes one masked frame with exactly these bits.
    async fn send_raw(&mut self, first: u8, payload: &[u8], masked: bool) {
        let mut f = vec![first];
        let m = if masked { 0x80 } else { 0 };
        if payload.len() < 126 {
            f.push(m | payload.len() as u8);
        } else if payload.len() <= 0xffff {
            f.push(m | 126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            f.push(m | 127);
            f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        let key = [0x37, 0xfa, 0x21, 0x3d];
        if masked {
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        // The server may have closed already (that is what some tests wait for).
        let _ = self.tcp.write_all(&f).await;
    }

    async fn send(&mut self, fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) {
        let first = (if fin { 0x80 } else { 0 }) | (if rsv1 { 0x40 } else { 0 }) | opcode;
        self.send_raw(first, payload, true).await;
    }

    /// The next frame, or `None` when the connection ends or nothing comes in time.
    async fn next(&mut self) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some((f, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Some(f);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// The next frame that is not a ping (the server's keep-alive pings are ignored).
    async fn next_data(&mut self) -> Option<Frame> {
        loop {
            let f = self.next().await?;
            if f.opcode != PING {
                return Some(f);
            }
        }
    }

    /// Reads until the server's Close; its code. Panics if the connection ends without one.
    async fn close_code(&mut self) -> u16 {
        loop {
            match self.next().await {
                Some(f) if f.opcode == CLOSE => {
                    assert!(f.payload.len() >= 2, "close without a code");
                    return u16::from_be_bytes([f.payload[0], f.payload[1]]);
                }
                Some(_) => continue,
                None => panic!("the connection ended without a Close frame"),
            }
        }
    }
}

fn parse(b: &[u8]) -> Option<(Frame, usize)> {
    if b.len() < 2 {
        return None;
    }
    assert_eq!(b[1] & 0x80, 0, "server frames are never masked");
    let (len, at) = match b[1] & 0x7f {
        126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize, 4),
        127 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(b.get(2..10)?);
            (u64::from_be_bytes(a) as usize, 10)
        }
        n => (n as usize, 2),
    };
    let payload = b.get(at..at + len)?.to_vec();
    Some((
        Frame {
            fin: b[0] & 0x80 != 0,
            rsv1: b[0] & 0x40 != 0,
            opcode: b[0] & 0x0f,
            payload,
        },
        at + len,
    ))
}

/// One message compressed on its own (as with no context takeover), tail removed.
fn deflate(data: &[u8], bits: u8) -> Vec<u8> {
    let mut c = Compress::new_with_window_bits(Compression::default(), false, bits);
    let mut out = Vec::with_capacity(data.len() + 1024);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert_eq!(c.total_in() as usize, data.len());
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Inflates one message with a fresh inflater: works only if the sender kept no context.
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(data.len() * 20 + 1024);
    loop {
        let before = d.total_in() as usize;
        d.decompress_vec(&input[before..], &mut out, FlushDecompress::Sync)
            .expect("the server's message inflates on its own");
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// A y-websocket update message holding a document with `n` characters of text.
fn big_update(n: usize) -> (Vec<u8>, String) {
    let doc = Doc::new();
    let text = doc.get_or_insert_text("t");
    let content: String = (0..n).map(|i| (b'a' + (i % 23) as u8) as char).collect();
    let update = {
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, &content);
        txn.encode_update_v1()
    };
    let mut msg = vec![0, 2];
    write_var_buf(&mut msg, &update);
    (msg, content)
}

/// The text of the document in a sync step 2 or update message.
fn text_of(msg: &[u8]) -> String {
    assert_eq!(msg[0], 0, "a sync message");
    let mut pos = 2;
    let mut len = 0u64;
    let mut shift = 0;
    loop {
        let b = msg[pos];
        pos += 1;
        len |= u64::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let update = &msg[pos..pos + len as usize];
    let doc = Doc::new();
    let text = doc.get_or_insert_text("t");
    let mut txn = doc.transact_mut();
    txn.apply_update(Update::decode_v1(update).unwrap())
        .unwrap();
    text.get_string(&txn)
}

/// Reads data messages until a sync step 2 (`[0, 1, ...]`), inflating compressed ones.
async fn step2(c: &mut Raw) -> (Vec<u8>, bool) {
    loop {
        let f = c.next_data().await.expect("a frame before step 2");
        assert!(f.fin);
        let data = if f.rsv1 {
            inflate(&f.payload)
        } else {
            f.payload
        };
        if data.len() > 1 && data[0] == 0 && data[1] == 1 {
            return (data, f.rsv1);
        }
    }
}

const OFFER: &str = "permessage-deflate; client_max_window_bits";
const AGREED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

#[tokio::test]
async fn negotiation_answers_each_offer() {
    let server = TestServer::start("");
    let s = session_id("defl-neg");
    let c = Raw::wb(&server, &s, None).await;
    assert_eq!(c.header("sec-websocket-extensions"), None);
    let c = Raw::wb(&server, &s, Some(OFFER)).await;
    assert_eq!(c.header("sec-websocket-extensions"), Some(AGREED));
    let c = Raw::wb(
        &server,
        &s,
        Some("permessage-deflate; server_max_window_bits=10"),
    )
    .await;
    assert_eq!(
        c.header("sec-websocket-extensions"),
        Some(format!("{AGREED}; server_max_window_bits=10").as_str())
    );
    // A malformed offer is declined; the next acceptable one is taken.
    let c = Raw::wb(
        &server,
        &s,
        Some("permessage-deflate; bogus, permessage-deflate"),
    )
    .await;
    assert_eq!(c.header("sec-websocket-extensions"), Some(AGREED));
    let c = Raw::wb(
        &server,
        &s,
        Some("permessage-deflate; server_max_window_bits=8"),
    )
    .await;
    assert_eq!(c.header("sec-websocket-extensions"), None);
    // The operator can turn it off.
    let off = TestServer::start("[limits]\npermessage_deflate = false\n");
    let c = Raw::wb(&off, &s, Some(OFFER)).await;
    assert_eq!(c.header("sec-websocket-extensions"), None);
}

/// A compressed update sent in three fragments (RSV1 on the first only) with a ping between
/// them; a second client joins and gets the board compressed, small frames raw, and every
/// compressed message inflates on its own (no context takeover), at 15 and 10 bits.
#[tokio::test]
async fn compressed_fragmented_in_and_compressed_join_out() {
    let server = TestServer::start("");
    let s = session_id("defl-frag");
    let mut a = Raw::wb(&server, &s, Some(OFFER)).await;
    let (msg, content) = big_update(200_000);
    let z = deflate(&msg, 15);
    let third = z.len() / 3;
    a.send(false, true, BINARY, &z[..third]).await;
    a.send(true, false, PING, b"mid").await;
    a.send(false, false, 0, &z[third..2 * third]).await;
    a.send(true, false, 0, &z[2 * third..]).await;
    let pong = loop {
        let f = a.next().await.expect("pong");
        if f.opcode == PONG {
            break f;
        }
    };
    assert_eq!(pong.payload, b"mid");
    for bits in [None, Some(10)] {
        let offer = match bits {
            None => OFFER.to_owned(),
            Some(b) => format!("permessage-deflate; server_max_window_bits={b}"),
        };
        // The update is applied by the time a joiner's step 2 holds it.
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let mut b = Raw::wb(&server, &s, Some(&offer)).await;
            // Small messages from the server stay raw (the step 1 is a few bytes).
            let first = b.next_data().await.expect("first frame");
            assert!(!first.rsv1 || first.payload.len() >= 64, "{first:?}");
            b.send(true, false, BINARY, &[0, 0, 1, 0]).await;
            let (step2, compressed) = step2(&mut b).await;
            if text_of(&step2) == content {
                assert!(compressed, "a 200 kB step 2 goes out compressed");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "update never applied"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The same join twice: both compressed answers inflate independently and are identical
/// (compressed once, shared).
#[tokio::test]
async fn no_context_takeover_each_message_inflates_alone() {
    let server = TestServer::start("");
    let s = session_id("defl-ctx");
    let mut a = Raw::wb(&server, &s, Some(OFFER)).await;
    let (msg, content) = big_update(50_000);
    // Uncompressed from a client that negotiated: RSV1 is per message.
    a.send(true, false, BINARY, &msg).await;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while seen.len() < 2 {
        let mut b = Raw::wb(&server, &s, Some(OFFER)).await;
        b.send(true, false, BINARY, &[0, 0, 1, 0]).await;
        let (step2, compressed) = step2(&mut b).await;
        if text_of(&step2) == content {
            assert!(compressed);
            seen.push(step2);
        } else {
            assert!(
                tokio::time::Instant::now() < deadline,
                "update never applied"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(seen[0], seen[1]);
}

/// The tutor endpoint's path for `session`, with a student token of `user`.
fn tutor_path_for(session: &str, user: &str) -> String {
    format!(
        "{}?token={}",
        TestServer::tutor_path(session),
        token(user, session, "student")
    )
}

/// A frame as the raw client writes it: first byte (FIN, RSV, opcode), payload, masked.
type RawFrame = (u8, Vec<u8>, bool);

async fn closes_with(extensions: Option<&str>, frames: &[RawFrame], code: u16) {
    let server = TestServer::start("[limits]\nmax_frame_bytes = 100000\n");
    let s = session_id("defl-close");
    let mut c = Raw::wb(&server, &s, extensions).await;
    for (first, payload, masked) in frames {
        c.send_raw(*first, payload, *masked).await;
    }
    assert_eq!(c.close_code().await, code, "{frames:?}");
    // Every refusal is counted, by its close code.
    let wanted = format!("code=\"{code}\"");
    eventually(
        "the close counted in easel_closes_total",
        TIMEOUT,
        || async {
            let metrics = server.http_get("/metrics").await.text();
            metrics
                .lines()
                .any(|l| {
                    l.starts_with("easel_closes_total{")
                        && l.contains(&wanted)
                        && l.contains("whiteboard")
                        && !l.ends_with(" 0")
                })
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn protocol_errors_close_1002() {
    let bin = 0x80 | BINARY;
    let cases: Vec<(Option<&str>, Vec<RawFrame>)> = vec![
        (None, vec![(bin, vec![0, 0, 1, 0], false)]), // unmasked
        (None, vec![(bin | 0x20, vec![0, 0, 1, 0], true)]), // RSV2
        (None, vec![(bin | 0x10, vec![0, 0, 1, 0], true)]), // RSV3
        (None, vec![(bin | 0x40, vec![0, 0, 1, 0], true)]), // RSV1 not negotiated
        (Some(OFFER), vec![(0x80 | PING | 0x40, vec![], true)]), // RSV1 on control
        (None, vec![(0x80 | 3, vec![], true)]),       // reserved data opcode
        (None, vec![(0x80 | 0x0b, vec![], true)]),    // reserved control opcode
        (None, vec![(PING, vec![1], true)]),          // fragmented ping
        (None, vec![(0x80 | PING, vec![0; 126], true)]), // ping over 125
        (None, vec![(0x80, vec![1], true)]),          // continuation alone
        (None, vec![(BINARY, vec![0], true), (bin, vec![0], true)]), // new msg mid-fragment
        (None, vec![(0x80 | CLOSE, vec![3], true)]),  // 1-byte close payload
        (
            None,
            vec![(0x80 | CLOSE, 1005u16.to_be_bytes().to_vec(), true)],
        ),
        (
            None,
            vec![(0x80 | CLOSE, 999u16.to_be_bytes().to_vec(), true)],
        ),
        (
            Some(OFFER),
            vec![(BINARY | 0x40, vec![1], true), (0x80 | 0x40, vec![1], true)],
        ), // RSV1 on continuation
    ];
    for (ext, frames) in cases {
        closes_with(ext, &frames, 1002).await;
    }
}

#[tokio::test]
async fn invalid_data_closes_1007() {
    // Not UTF-8, in a close reason and in compressed data.
    let mut reason = 1000u16.to_be_bytes().to_vec();
    reason.extend_from_slice(&[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xff]);
    closes_with(None, &[(0x80 | CLOSE, reason, true)], 1007).await;
    closes_with(
        Some(OFFER),
        &[(0x80 | 0x40 | BINARY, vec![0xff; 32], true)],
        1007,
    )
    .await;
    // A text frame that is not UTF-8 on the tutor endpoint.
    let server = TestServer::start("");
    let s = session_id("defl-utf8");
    let path = tutor_path_for(&s, "u1");
    let mut c = Raw::connect(&server, &path, None).await;
    c.send(true, false, TEXT, &[b'{', 0xc0, 0xaf, b'}']).await;
    assert_eq!(c.close_code().await, 1007);
    // Split across fragments, a valid sequence is fine (the tutor answers the JSON).
    let mut c = Raw::connect(&server, &path, Some(OFFER)).await;
    let msg = "{\"type\":\"ping\",\"x\":\"κόσμε\"}".as_bytes();
    c.send(false, false, TEXT, &msg[..14]).await;
    c.send(true, false, 0, &msg[14..]).await;
    c.send(true, false, CLOSE, &1000u16.to_be_bytes()).await;
    assert_eq!(c.close_code().await, 1000, "the Close is echoed");
}

#[tokio::test]
async fn a_text_message_fails_at_its_first_fragment_that_is_not_utf8() {
    // RFC 6455 8.1 ("fail fast"), Autobahn 6.4.1/6.4.2: the message's last fragment is never
    // sent, so only a check of each fragment as it arrives can close the connection.
    let server = TestServer::start("");
    let s = session_id("defl-failfast");
    let path = tutor_path_for(&s, "u1");
    // A character cut between two fragments is not an error; one that cannot be is.
    let valid = "{\"type\":\"ping\",\"x\":\"κ".as_bytes();
    let (cut, rest) = valid.split_at(valid.len() - 1);
    let mut c = Raw::connect(&server, &path, None).await;
    c.send(false, false, TEXT, cut).await;
    c.send(false, false, 0, rest).await;
    c.send(false, false, 0, &[0xf4, 0x90, 0x80, 0x80]).await; // past U+10FFFF
    assert_eq!(c.close_code().await, 1007);
    // The same inside a compressed message: checked as it inflates.
    let mut c = Raw::connect(&server, &path, Some(OFFER)).await;
    c.send(false, true, TEXT, &deflate(&[b'{', 0xc0, 0xaf], 15))
        .await;
    assert_eq!(c.close_code().await, 1007);
}

#[tokio::test]
async fn every_ping_gets_its_pong_in_order() {
    let server = TestServer::start("");
    let s = session_id("defl-pings");
    let mut c = Raw::wb(&server, &s, None).await;
    // Back to back, as Autobahn 2.10 sends them: one pong for each.
    for i in 0..10 {
        c.send(true, false, PING, format!("p{i}").as_bytes()).await;
    }
    let mut pongs = Vec::new();
    while pongs.len() < 10 {
        let f = c.next_data().await.expect("a pong for each ping");
        if f.opcode == PONG {
            pongs.push(String::from_utf8(f.payload).expect("the ping's payload"));
        }
    }
    let sent: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    assert_eq!(pongs, sent);
    c.send(true, false, CLOSE, &1000u16.to_be_bytes()).await;
    assert_eq!(c.close_code().await, 1000);
}

#[tokio::test]
async fn over_size_and_zip_bombs_close_1009() {
    // Raw and over the limit.
    closes_with(None, &[(0x80 | BINARY, vec![0; 150_000], true)], 1009).await;
    // Over the limit across fragments.
    closes_with(
        None,
        &[
            (BINARY, vec![0; 60_000], true),
            (0x80, vec![0; 60_000], true),
        ],
        1009,
    )
    .await;
    // 500 bytes that inflate to 50 MB against a 100 kB limit.
    let bomb = deflate(&vec![0u8; 50_000_000], 15);
    assert!(bomb.len() < 100_000);
    closes_with(Some(OFFER), &[(0x80 | 0x40 | BINARY, bomb, true)], 1009).await;
}

#[tokio::test]
async fn a_close_is_answered_with_the_same_code() {
    let server = TestServer::start("");
    let s = session_id("defl-echo");
    for ext in [None, Some(OFFER)] {
        let mut c = Raw::wb(&server, &s, ext).await;
        c.send(true, false, CLOSE, &4000u16.to_be_bytes()).await;
        assert_eq!(c.close_code().await, 4000);
        // Then the server ends the TCP connection.
        assert!(c.next().await.is_none());
    }
}

/// `n` clients that offer deflate join `session` at once; each one's compressed step 2
/// payload (the first compressed frame over 1,000 bytes).
async fn compressed_joins(server: &TestServer, session: &str, n: usize) -> Vec<Vec<u8>> {
    let joins = (0..n).map(|i| async move {
        let mut c = Raw::wb_as(server, session, &format!("j{i}"), Some(OFFER)).await;
        c.send(true, false, BINARY, &[0, 0, 1, 0]).await;
        loop {
            let f = c.next_data().await.expect("step 2");
            if f.rsv1 && f.payload.len() > 1000 {
                return f.payload;
            }
        }
    });
    futures_util::future::join_all(joins).await
}

/// A join storm: 30 clients that negotiated deflate join a 1 MB board at once; the board is
/// compressed once, not 30 times, and every joiner gets the same bytes.
#[tokio::test]
async fn a_join_storm_compresses_the_board_once() {
    let server = TestServer::start("");
    let s = session_id("defl-storm");
    let mut a = Raw::wb(&server, &s, None).await;
    let (msg, content) = big_update(1_000_000);
    a.send(true, false, BINARY, &msg).await;
    // Applied once one uncompressed joiner sees it.
    eventually("the board applied", TIMEOUT, || async {
        let mut b = Raw::wb(&server, &s, None).await;
        b.send(true, false, BINARY, &[0, 0, 1, 0]).await;
        (text_of(&step2(&mut b).await.0) == content).then_some(())
    })
    .await;
    let before = server
        .metric("easel_deflate_compressions_total")
        .await
        .unwrap_or(0.0);
    let got = compressed_joins(&server, &s, 30).await;
    assert!(got.iter().all(|g| g == &got[0]));
    assert_eq!(text_of(&inflate(&got[0])), content);
    let after = server
        .metric("easel_deflate_compressions_total")
        .await
        .unwrap_or(0.0);
    assert!(
        after - before <= 2.0,
        "{} compressions for 30 joiners",
        after - before
    );
}

/// A y-websocket update message holding `update`.
fn update_message(update: &[u8]) -> Vec<u8> {
    let mut msg = vec![0, 2];
    write_var_buf(&mut msg, update);
    msg
}

/// A board over 1 MiB that comes to rest has its join answer encoded and compressed ahead
/// (`session::prepare`): joiners then get that form (nobody compresses at their join), all
/// the same bytes, inflating with a fresh inflater to the board. Once the board changes, the
/// answer prepared for the old state is not served: a later joiner gets the change too.
#[tokio::test]
async fn a_board_at_rest_has_its_join_answer_compressed_ahead() {
    let server = TestServer::start("");
    let s = session_id("defl-ahead");
    let mut writer = Raw::wb(&server, &s, None).await;
    let doc = Doc::new();
    let text = doc.get_or_insert_text("t");
    let content: String = (0..1_200_000)
        .map(|i| (b'a' + (i % 23) as u8) as char)
        .collect();
    let first = {
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, &content);
        txn.encode_update_v1()
    };
    writer
        .send(true, false, BINARY, &update_message(&first))
        .await;
    eventually("the join answer prepared", TIMEOUT, || async {
        let n = server
            .metric("easel_whiteboard_join_answers_prepared_total")
            .await?;
        (n >= 1.0).then_some(())
    })
    .await;
    let before = server
        .metric("easel_deflate_compressions_total")
        .await
        .expect("the compressions metric");
    let got = compressed_joins(&server, &s, 8).await;
    assert!(
        got.iter().all(|g| g == &got[0]),
        "one form for every joiner"
    );
    assert_eq!(text_of(&inflate(&got[0])), content);
    let after = server
        .metric("easel_deflate_compressions_total")
        .await
        .expect("the compressions metric");
    assert_eq!(
        after, before,
        "no joiner's answer was compressed at its join"
    );

    // A change: the answer prepared for the state before it is not what joiners get.
    let sv = doc.transact().state_vector();
    let second = {
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, content.len() as u32, "and then some");
        drop(txn);
        doc.transact().encode_state_as_update_v1(&sv)
    };
    writer
        .send(true, false, BINARY, &update_message(&second))
        .await;
    let changed = format!("{content}and then some");
    eventually(
        "a joiner gets the board with its change",
        TIMEOUT,
        || async {
            let mut c = Raw::wb_as(&server, &s, "late", Some(OFFER)).await;
            c.send(true, false, BINARY, &[0, 0, 1, 0]).await;
            (text_of(&step2(&mut c).await.0) == changed).then_some(())
        },
    )
    .await;
}
