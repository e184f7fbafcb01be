//! The join storm's joiner: a minimal WebSocket client (RFC 6455) of its own, because
//! tokio-tungstenite has no permessage-deflate (RFC 7692) and a browser joining a board
//! offers it. On the wire it does what Chrome does: its upgrade request offers
//! `permessage-deflate; client_max_window_bits`, the frames it sends are masked, and the
//! compressed messages it receives are inflated. It sends its own few small messages
//! uncompressed, which the extension allows (RSV1 clear).
//!
//! What it measures: the first sync step 2 is "synced" (compared with the run's reference
//! like every joiner's, `client::record_step2`), and the bytes the socket delivered until
//! then: the 101 response and every frame, compressed or not. Afterwards it only keeps the
//! connection alive (pongs; the server's sync step 1 answered) until the run finishes.
//!
//! Owns the socket, the handshake, the framing and the inflater; what a y-websocket
//! message means to a client and how a joiner's figures are recorded is `client`'s.

use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use flate2::{Decompress, FlushDecompress, Status};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use yrs::sync::{Awareness, Message, MessageReader, SyncMessage};
use yrs::updates::decoder::DecoderV1;
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, Transact};

use easel_bench::wire::{
    accept_key, frame, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, TAIL,
};

use crate::client::{self, ClientSpec, Counters, Phase, Shared};

/// The largest frame, and message once inflated: a 20 MB board with room to spare.
const MAX_MESSAGE: usize = 512 << 20;
/// The largest 101 response read.
const MAX_HEAD: usize = 16 << 10;
/// Room made in the read buffer before a read (a frame's whole length is reserved as soon
/// as its header is in, so a 20 MB step 2 is read into place without being moved).
const READ_CHUNK: usize = 256 << 10;
/// The offer Chrome sends.
const OFFER: &str = "permessage-deflate; client_max_window_bits";
/// Runs one storm joiner to the end of the run (the `Finish` phase), or to an error.
pub(crate) async fn join(
    spec: &ClientSpec,
    stats: &Shared,
    counters: &Counters,
    mut phase: watch::Receiver<Phase>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let open = Conn::open(&spec.url, spec.offer_deflate);
    let mut conn = match timeout(spec.connect_timeout, open).await {
        Ok(r) => r.context("connect")?,
        Err(_) => bail!("connect timed out after {:?}", spec.connect_timeout),
    };
    {
        let mut s = client::lock(stats);
        s.connect_us = Some(started.elapsed().as_micros() as u32);
        s.deflate = Some(conn.inflate.is_some());
    }
    // A joiner keeps no board (150 copies of 20 MB would not fit in memory): its document
    // stays empty, there to answer the server's sync step 1 as a fresh client would.
    let doc = Doc::new();
    let mut awareness = Awareness::new(doc.clone());
    for m in client::greeting(spec, &doc, &mut awareness)? {
        conn.send(OP_BINARY, &m).await?;
    }
    let mut synced = false;
    let sync_deadline = started + spec.sync_timeout;
    loop {
        while let Some(event) = conn.event()? {
            match event {
                Event::Message { binary: true, data } => {
                    let was_synced = synced;
                    let replies =
                        on_message(&data, &doc, &awareness, &mut synced, stats, counters)?;
                    if synced && !was_synced {
                        // Recorded before `mark_synced`: the orchestrator reads the figures
                        // once every joiner is counted.
                        client::lock(stats).wire_bytes = Some(conn.wire);
                        client::mark_synced(stats, counters, started);
                    }
                    for reply in replies {
                        conn.send(OP_BINARY, &reply).await?;
                    }
                }
                Event::Message { binary: false, .. } => {}
                Event::Ping(payload) => conn.send(OP_PONG, &payload).await?,
                Event::Close(code) => bail!("closed by the server (code {code:?})"),
            }
        }
        tokio::select! {
            biased;
            changed = phase.changed() => {
                if changed.is_err() || matches!(*phase.borrow_and_update(), Phase::Finish) {
                    break;
                }
            }
            read = conn.fill() => {
                if read.context("read")? == 0 {
                    bail!("connection ended by the server");
                }
            }
            _ = sleep_until(sync_deadline), if !synced => {
                bail!("not synced within {:?}", spec.sync_timeout);
            }
            _ = sleep_until(spec.deadline) => bail!("run deadline passed"),
        }
    }
    // Like the other clients: a close, then a bounded wait for the server's.
    let _ = timeout(Duration::from_secs(2), conn.close()).await;
    Ok(())
}

/// One binary message: the first sync step 2 is recorded (without a copy when it leads the
/// message, as servers send it), the server's sync step 1 and awareness query are answered
/// as by a client with an empty document, the rest is dropped. Returns the replies.
fn on_message(
    data: &Bytes,
    doc: &Doc,
    awareness: &Awareness,
    synced: &mut bool,
    stats: &Shared,
    counters: &Counters,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut rest = 0;
    if !*synced {
        if let Some((start, len)) = client::step2_bounds(data) {
            client::record_step2(stats, counters, data.slice(start..start + len));
            *synced = true;
            rest = start + len;
        }
    }
    let mut replies = Vec::new();
    let mut decoder = DecoderV1::from(&data[rest..]);
    for msg in MessageReader::new(&mut decoder) {
        match msg.context("undecodable message")? {
            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                let diff = doc.transact().encode_state_as_update_v1(&sv);
                replies.push(Message::Sync(SyncMessage::SyncStep2(diff)).encode_v1());
            }
            Message::Sync(SyncMessage::SyncStep2(update)) if !*synced => {
                client::record_step2(stats, counters, Bytes::from(update));
                *synced = true;
            }
            // The joiner measures its join; what others write after it is not kept.
            Message::Sync(_) | Message::Awareness(_) => {}
            Message::AwarenessQuery => {
                replies.push(Message::Awareness(awareness.update()?).encode_v1());
            }
            Message::Auth(reason) => bail!("auth message from the server: {reason:?}"),
            Message::Custom(tag, _) => bail!("unknown message type {tag}"),
        }
    }
    Ok(replies)
}

/// One frame as received (a server's frames are not masked).
struct Frame {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    payload: Bytes,
}

/// What the frames amount to for the joiner.
enum Event {
    /// A whole data message, inflated if it came compressed.
    Message {
        binary: bool,
        data: Bytes,
    },
    Ping(Bytes),
    /// The server's close code, if it gave one.
    Close(Option<u16>),
}

/// A data message arriving in several frames, or compressed.
struct Partial {
    binary: bool,
    compressed: bool,
    data: Vec<u8>,
}

/// The receiving side of an agreed permessage-deflate.
struct Inflate {
    d: Decompress,
    /// `server_no_context_takeover`: the server compresses every message on its own, so
    /// the window is dropped after each; otherwise it carries over to the next message.
    reset_each: bool,
}

/// An upgraded connection: the socket, what was read but not yet parsed, and the message
/// being assembled.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// Bytes taken off the socket: the 101 response, then every whole frame parsed.
    wire: u64,
    inflate: Option<Inflate>,
    partial: Option<Partial>,
    rng: StdRng,
}

impl Conn {
    /// Connects to a `ws://HOST:PORT/PATH?QUERY` URL and upgrades; whatever followed the
    /// 101 response stays buffered for [`Conn::event`].
    async fn open(url: &str, offer_deflate: bool) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .context("the URL must start with ws://")?;
        let (host, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
        let stream = TcpStream::connect(host)
            .await
            .with_context(|| format!("connecting to {host}"))?;
        stream.set_nodelay(true)?;
        let mut rng = StdRng::from_entropy();
        let key = base64::engine::general_purpose::STANDARD.encode(rng.gen::<[u8; 16]>());
        // What tungstenite sent for the other clients (no subprotocol, no Origin), plus the
        // browser's extension offer.
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
        );
        if offer_deflate {
            request.push_str(&format!("Sec-WebSocket-Extensions: {OFFER}\r\n"));
        }
        request.push_str("\r\n");
        let mut conn = Self {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            wire: 0,
            inflate: None,
            partial: None,
            rng,
        };
        conn.stream
            .write_all(request.as_bytes())
            .await
            .context("sending the upgrade request")?;
        let head = conn.read_head().await?;
        conn.inflate = check_response(&head, &key, offer_deflate)?;
        Ok(conn)
    }

    /// The response's status line and headers, up to and with the empty line.
    async fn read_head(&mut self) -> anyhow::Result<Bytes> {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = self.buf.split_to(i + 4).freeze();
                self.wire += head.len() as u64;
                return Ok(head);
            }
            if self.buf.len() > MAX_HEAD {
                bail!("the upgrade response's headers pass {MAX_HEAD} bytes");
            }
            if self.fill().await? == 0 {
                bail!("the server closed the connection during the upgrade");
            }
        }
    }

    /// Reads what the socket has into the buffer; 0 at the end of the stream. Cancel-safe
    /// (`read_buf` keeps nothing outside the buffer), so it can wait in a `select!`.
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    /// The next event the buffered frames make, or `None` until more bytes come.
    fn event(&mut self) -> anyhow::Result<Option<Event>> {
        while let Some(frame) = self.frame()? {
            if let Some(event) = self.on_frame(frame)? {
                return Ok(Some(event));
            }
        }
        Ok(None)
    }

    /// The next whole frame in the buffer, or `None` until more bytes come (room for the
    /// rest of the frame is then reserved).
    fn frame(&mut self) -> anyhow::Result<Option<Frame>> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (b[0], b[1]);
        if b0 & 0x30 != 0 {
            bail!("RSV2 or RSV3 set");
        }
        if b1 & 0x80 != 0 {
            bail!("a masked frame from the server");
        }
        let (len, head) = match b1 & 0x7f {
            126 if b.len() < 4 => return Ok(None),
            126 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() < 10 => return Ok(None),
            127 => (u64::from_be_bytes(<[u8; 8]>::try_from(&b[2..10])?), 10),
            n => (u64::from(n), 2),
        };
        if len > MAX_MESSAGE as u64 {
            bail!("a frame of {len} bytes (the limit is {MAX_MESSAGE})");
        }
        let total = head + len as usize;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let frame = self.buf.split_to(total).freeze();
        self.wire += total as u64;
        Ok(Some(Frame {
            fin: b0 & 0x80 != 0,
            rsv1: b0 & 0x40 != 0,
            opcode: b0 & 0x0f,
            payload: frame.slice(head..),
        }))
    }

    fn on_frame(&mut self, f: Frame) -> anyhow::Result<Option<Event>> {
        match f.opcode {
            OP_PING | OP_PONG | OP_CLOSE => {
                if !f.fin || f.rsv1 || f.payload.len() > 125 {
                    bail!("a malformed control frame");
                }
                Ok(match f.opcode {
                    OP_PING => Some(Event::Ping(f.payload)),
                    OP_CLOSE => Some(Event::Close(
                        f.payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])),
                    )),
                    _ => None,
                })
            }
            OP_TEXT | OP_BINARY => {
                if self.partial.is_some() {
                    bail!("a new message inside a fragmented one");
                }
                if f.rsv1 && self.inflate.is_none() {
                    bail!("RSV1 set without permessage-deflate");
                }
                let binary = f.opcode == OP_BINARY;
                if f.fin && !f.rsv1 {
                    // One uncompressed frame, the common case: no copy.
                    return Ok(Some(Event::Message {
                        binary,
                        data: f.payload,
                    }));
                }
                self.partial = Some(Partial {
                    binary,
                    compressed: f.rsv1,
                    data: Vec::new(),
                });
                self.append(f)
            }
            OP_CONT => {
                if self.partial.is_none() {
                    bail!("a continuation frame without a message");
                }
                if f.rsv1 {
                    bail!("RSV1 on a continuation frame");
                }
                self.append(f)
            }
            op => bail!("reserved opcode {op}"),
        }
    }

    /// Adds a data frame to the message being assembled; the message once its last frame
    /// is in.
    fn append(&mut self, f: Frame) -> anyhow::Result<Option<Event>> {
        let Some(p) = self.partial.as_mut() else {
            bail!("a data frame without a message");
        };
        if p.compressed {
            let Some(z) = self.inflate.as_mut() else {
                bail!("RSV1 set without permessage-deflate");
            };
            let mut ended = inflate(&mut z.d, &f.payload, &mut p.data)?;
            if f.fin {
                if !ended {
                    ended = inflate(&mut z.d, &TAIL, &mut p.data)?;
                }
                // A final deflate block ends the stream: the next message starts afresh
                // even with context takeover.
                if z.reset_each || ended {
                    z.d.reset(false);
                }
            }
        } else {
            if p.data.len() + f.payload.len() > MAX_MESSAGE {
                bail!("a message of more than {MAX_MESSAGE} bytes");
            }
            p.data.extend_from_slice(&f.payload);
        }
        if !f.fin {
            return Ok(None);
        }
        Ok(self.partial.take().map(|p| Event::Message {
            binary: p.binary,
            data: Bytes::from(p.data),
        }))
    }

    /// Sends one masked frame (RFC 6455 5.3: a fresh random key for every frame).
    async fn send(&mut self, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        let f = frame(opcode, false, Some(self.rng.gen()), payload);
        self.stream.write_all(&f).await.context("sending a frame")
    }

    /// Sends a Close (1000), then reads until the server's Close or the end of the stream.
    async fn close(&mut self) -> anyhow::Result<()> {
        self.send(OP_CLOSE, &1000u16.to_be_bytes()).await?;
        loop {
            while let Some(event) = self.event()? {
                if let Event::Close(_) = event {
                    return Ok(());
                }
            }
            if self.fill().await? == 0 {
                return Ok(());
            }
        }
    }
}

/// Checks the upgrade response: status 101, the accept hash of our key, and at most the
/// permessage-deflate we offered. Returns the inflater if it was agreed.
fn check_response(head: &[u8], key: &str, offered: bool) -> anyhow::Result<Option<Inflate>> {
    let text = std::str::from_utf8(head).context("the upgrade response is not UTF-8")?;
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let status = lines.next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("101") {
        bail!("upgrade refused: {status}");
    }
    let expected = accept_key(key);
    let mut accepted = false;
    let mut inflate = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("a malformed header line in the upgrade response: {line:?}");
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accepted = value == expected;
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            for ext in value.split(',') {
                let mut params = ext.split(';').map(str::trim);
                let agreed = params.next().unwrap_or_default();
                if !offered
                    || inflate.is_some()
                    || !agreed.eq_ignore_ascii_case("permessage-deflate")
                {
                    bail!("the server answered an extension not offered: {ext:?}");
                }
                inflate = Some(Inflate {
                    d: Decompress::new(false),
                    reset_each: params
                        .any(|p| p.eq_ignore_ascii_case("server_no_context_takeover")),
                });
            }
        }
    }
    if !accepted {
        bail!("missing or wrong Sec-WebSocket-Accept");
    }
    Ok(inflate)
}

/// Inflates `input` (raw deflate) onto the end of `out`, which grows by doubling, never past
/// [`MAX_MESSAGE`]. Returns whether the stream ended (a final block; the rest of `input` is
/// then ignored).
fn inflate(d: &mut Decompress, mut input: &[u8], out: &mut Vec<u8>) -> anyhow::Result<bool> {
    loop {
        if out.len() == out.capacity() {
            if out.len() >= MAX_MESSAGE {
                bail!("a compressed message inflates past {MAX_MESSAGE} bytes");
            }
            let add = out
                .len()
                .max(input.len().saturating_mul(2))
                .max(64 << 10)
                .min(MAX_MESSAGE - out.len());
            out.reserve_exact(add);
        }
        let (in_before, out_before) = (d.total_in(), out.len());
        let status = d
            .decompress_vec(input, out, FlushDecompress::Sync)
            .context("invalid compressed data")?;
        let taken = usize::try_from(d.total_in() - in_before)
            .unwrap_or(input.len())
            .min(input.len());
        input = &input[taken..];
        if status == Status::StreamEnd {
            return Ok(true);
        }
        // zlib stops early only when the output is full.
        if input.is_empty() && out.len() < out.capacity() {
            return Ok(false);
        }
        if taken == 0 && out.len() == out_before && out.len() < out.capacity() {
            bail!("invalid compressed data (no progress)");
        }
    }
}
