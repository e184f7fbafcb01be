//! The WebSocket itself, server side: the opening handshake (RFC 6455 4.2), the framing
//! (RFC 6455 5) and permessage-deflate (RFC 7692) over the upgraded HTTP connection.
//!
//! axum's WebSocket (tungstenite) has no permessage-deflate and refuses any frame with
//! RSV1 set, so this module owns the framing: [`Upgrade`] answers the handshake (and the
//! extension offer), [`Reader`] turns frames into whole messages (reassembling fragments,
//! inflating, checking UTF-8, close codes and every RSV/opcode/length rule, failing with
//! the close code RFC 6455 7.4.1 gives), [`Writer`] writes messages, compressing those over
//! the threshold with the shared compressed form (`deflate::compressed`).
//!
//! The reader never answers anything itself: a Ping or a Close comes out as a message, and
//! the connection loop (`ws::run`) has its writer answer it. Messages are axum's
//! [`Message`] type, which the outbox and the handlers already speak. Must not know about
//! sessions, the outbox or timing.

use std::future::Future;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use super::deflate::{self, Agreed, DeflateError, Inflater};

/// The upgraded connection.
pub type Io = TokioIo<hyper::upgrade::Upgraded>;

/// Why a read or a write failed. The ones a client caused carry the close code to send.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A framing rule broken (close 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A text message or close reason that is not UTF-8, or compressed data that does not
    /// inflate (close 1007).
    #[error("invalid data: {0}")]
    Invalid(&'static str),
    /// A message over the size limit, before or after inflating (close 1009). The reader
    /// stays usable: it skips the rest of that message, so the client's Close can be read.
    #[error("message over {0} bytes")]
    TooBig(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl SocketError {
    /// The close code that tells the client what it did wrong; `None` for I/O errors.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            SocketError::Protocol(_) => Some(super::close::PROTOCOL_ERROR),
            SocketError::Invalid(_) => Some(super::close::INVALID_PAYLOAD),
            SocketError::TooBig(_) => Some(super::close::TOO_BIG),
            SocketError::Io(_) => None,
        }
    }
}

/// Why an upgrade request is not one (answered `400`).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("not a WebSocket upgrade: {0}")]
    NotUpgrade(&'static str),
}

impl IntoResponse for HandshakeError {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, self.to_string()).into_response()
    }
}

/// Settings of one connection's socket.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Largest message, before and after inflating.
    pub max_message: usize,
    /// Messages at least this large are sent compressed when the client agreed to it.
    pub deflate_threshold: usize,
    /// Whether permessage-deflate may be agreed at all.
    pub deflate: bool,
    /// What the read buffer grows by while a message is in progress (none is kept between
    /// messages; it grows for a large one, then goes).
    pub read_buffer: usize,
    /// Frames are gathered up to this size before a write.
    pub write_buffer: usize,
}

/// A WebSocket upgrade request, checked (RFC 6455 4.2.1); answered by [`Upgrade::accept`].
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
    protocols: Vec<String>,
    extensions: Vec<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = HandshakeError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        use HandshakeError::NotUpgrade;
        if parts.method != Method::GET {
            return Err(NotUpgrade("the method must be GET"));
        }
        let h = &parts.headers;
        if !has_token(h, header::CONNECTION, "upgrade") {
            return Err(NotUpgrade("Connection: upgrade is missing"));
        }
        if !has_token(h, header::UPGRADE, "websocket") {
            return Err(NotUpgrade("Upgrade: websocket is missing"));
        }
        if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
            return Err(NotUpgrade("Sec-WebSocket-Version must be 13"));
        }
        let key = h
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .ok_or(NotUpgrade("Sec-WebSocket-Key is missing"))?;
        let list = |name| -> Vec<String> {
            h.get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect()
        };
        let protocols = list(header::SEC_WEBSOCKET_PROTOCOL);
        // Kept whole (offers hold `;` parameters); split on commas by the negotiation.
        let extensions = h
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect();
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(NotUpgrade("the connection cannot be upgraded"))?;
        Ok(Upgrade {
            key,
            on_upgrade,
            protocols,
            extensions,
        })
    }
}

fn has_token(h: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl Upgrade {
    /// The subprotocols the client asked for, in its order.
    pub fn requested_protocols(&self) -> impl Iterator<Item = &str> {
        self.protocols.iter().map(String::as_str)
    }

    /// Answers `101`, choosing `protocol` if the client asked for it and permessage-deflate
    /// if offered and allowed, and runs `run` with the socket once the connection is ours.
    pub fn accept<F, Fut>(self, protocol: &str, settings: Settings, run: F) -> Response
    where
        F: FnOnce(Reader<ReadHalf<Io>>, Writer<WriteHalf<Io>>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let agreed = settings
            .deflate
            .then(|| deflate::negotiate(self.extensions.iter().map(String::as_str)))
            .flatten();
        let mut hasher = Sha1::new();
        hasher.update(self.key.as_bytes());
        hasher.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let accept = base64::engine::general_purpose::STANDARD.encode(hasher.finalize());
        let mut resp = Response::new(axum::body::Body::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        if self.protocols.iter().any(|p| p == protocol) {
            if let Ok(v) = HeaderValue::from_str(protocol) {
                h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
            }
        }
        if let Some((a, named_bits)) = agreed {
            if let Ok(v) = HeaderValue::from_str(&a.response(named_bits)) {
                h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
            }
        }
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let (r, w) = tokio::io::split(TokioIo::new(upgraded));
                    let reader = Reader::new(r, settings, agreed.is_some());
                    let writer = Writer::new(w, settings, agreed.map(|(a, _)| a));
                    // A task of its own rather than awaited here: this task's state keeps
                    // what `run` captured for as long as it lives, a second copy of it
                    // for every open connection.
                    tokio::spawn(run(reader, writer));
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        resp
    }
}

const OP_CONT: u8 = 0;
const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

/// The longest header a server frame has (no mask): 2 bytes and a 64-bit length.
const MAX_HEADER: usize = 10;

/// Most bytes one read takes while no message is in progress (on the stack; see
/// `Reader::read_between_messages`): a y-websocket update or a chat message fits.
const STACK_READ: usize = 4096;

/// A data message being reassembled from its frames.
struct Partial {
    text: bool,
    data: Vec<u8>,
    /// Payload bytes read so far (compressed ones for a compressed message): bounded by
    /// the size limit like the message itself.
    wire_len: usize,
    /// Set for a compressed message (RSV1 on its first frame).
    inflater: Option<Inflater>,
    /// A text message's bytes so far that are known to be UTF-8: each fragment is checked
    /// as it arrives, from here on, so a message that cannot become text fails at its first
    /// bad fragment (RFC 6455 8.1 "fail fast") rather than after its last.
    checked_utf8: usize,
}

/// What the next frame header says (the payload not yet read).
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    len: u64,
}

/// The reading half: whole messages out of frames. Cancel-safe: [`Reader::next`] keeps
/// everything it has read in `self`, so a `select!` may drop it and call again.
pub struct Reader<R> {
    io: R,
    buf: BytesMut,
    settings: Settings,
    deflate: bool,
    /// Boxed: most connections are between messages most of the time.
    partial: Option<Box<Partial>>,
    /// Payload bytes of an over-size frame still to be thrown away unread.
    skip: u64,
    /// The rest of an over-size message is thrown away (its continuation frames).
    skipping: bool,
    /// A Close was read or the stream failed: nothing more comes.
    done: bool,
    /// Bytes of compressed messages read (for the metrics), taken by [`Reader::take_compressed_bytes`].
    compressed_in: u64,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R, settings: Settings, deflate: bool) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            settings,
            deflate,
            partial: None,
            skip: 0,
            skipping: false,
            done: false,
            compressed_in: 0,
        }
    }

    /// Wire bytes of compressed messages read since the last call.
    pub fn take_compressed_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.compressed_in)
    }

    /// The next message: `None` once a Close was read or the connection ended. After an
    /// error nothing more comes, except after [`SocketError::TooBig`].
    pub async fn next(&mut self) -> Option<Result<Message, SocketError>> {
        if self.done {
            return None;
        }
        loop {
            match self.step() {
                Ok(Some(m)) => {
                    if matches!(m, Message::Close(_)) {
                        self.done = true;
                    }
                    return Some(Ok(m));
                }
                Ok(None) => {}
                Err(e) => {
                    if !matches!(e, SocketError::TooBig(_)) {
                        self.done = true;
                    }
                    return Some(Err(e));
                }
            }
            // More bytes are needed: the only await (both reads are cancel-safe).
            let read = if self.buf.is_empty() {
                self.read_between_messages().await
            } else {
                if self.buf.capacity() - self.buf.len() < self.settings.read_buffer / 2 {
                    self.buf.reserve(self.settings.read_buffer);
                }
                self.io.read_buf(&mut self.buf).await
            };
            match read {
                Ok(0) => {
                    self.done = true;
                    return None;
                }
                Ok(_) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(e.into()));
                }
            }
        }
    }

    /// Reads with nothing buffered, which is where an idle connection waits: into the stack,
    /// then copies what came into `buf`. A connection so holds no read buffer while it
    /// waits (a 1 KiB one reserved ahead was an eighth of each idle connection's memory).
    async fn read_between_messages(&mut self) -> std::io::Result<usize> {
        self.buf = BytesMut::new();
        std::future::poll_fn(|cx| {
            let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); STACK_READ];
            let mut read = tokio::io::ReadBuf::uninit(&mut stack);
            match std::pin::Pin::new(&mut self.io).poll_read(cx, &mut read) {
                std::task::Poll::Ready(Ok(())) => {
                    self.buf.extend_from_slice(read.filled());
                    std::task::Poll::Ready(Ok(read.filled().len()))
                }
                std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
                std::task::Poll::Pending => std::task::Poll::Pending,
            }
        })
        .await
    }

    /// Makes what progress the buffered bytes allow: a message, nothing yet, or an error.
    fn step(&mut self) -> Result<Option<Message>, SocketError> {
        loop {
            if self.skip > 0 {
                let n = usize::try_from(self.skip)
                    .unwrap_or(usize::MAX)
                    .min(self.buf.len());
                self.buf.advance(n);
                self.skip -= n as u64;
                if self.skip > 0 {
                    return Ok(None);
                }
            }
            let Some(h) = self.header()? else {
                return Ok(None);
            };
            let max = self.settings.max_message;
            let control = h.opcode >= OP_CLOSE;
            if !control {
                let so_far = self.partial.as_ref().map_or(0, |p| p.wire_len) as u64;
                let dropping = self.skipping && h.opcode == OP_CONT;
                if dropping || so_far.saturating_add(h.len) > max as u64 {
                    // Thrown away as it arrives: an over-size message is never held.
                    self.buf.advance(h.header_len);
                    self.skip = h.len;
                    self.skipping = !h.fin;
                    self.partial = None;
                    if dropping {
                        continue;
                    }
                    return Err(SocketError::TooBig(max));
                }
            }
            let total = h.header_len + h.len as usize; // bounded: `len` <= max or <= 125
            if self.buf.len() < total {
                // Not reserved up front: a client that declares a large frame and sends
                // nothing must not cost `max_frame_bytes` of memory. The buffer grows with
                // what arrives (the read loop reserves `read_buffer` at a time; `BytesMut`
                // doubles, so a large frame is not copied over and over).
                return Ok(None);
            }
            self.buf.advance(h.header_len);
            let mut payload = self.buf.split_to(h.len as usize);
            unmask(&mut payload, h.mask);
            if self.buf.is_empty() && self.buf.capacity() > self.settings.read_buffer * 4 {
                // A large frame grew the buffer; an idle connection should not keep that.
                self.buf = BytesMut::new();
            }
            if let Some(m) = self.frame(h, payload)? {
                return Ok(Some(m));
            }
        }
    }

    /// Parses the next frame header, checking every rule that does not need the payload.
    fn header(&self) -> Result<Option<Header>, SocketError> {
        use SocketError::Protocol;
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        let rsv1 = b[0] & 0x40 != 0;
        let opcode = b[0] & 0x0f;
        if b[0] & 0x30 != 0 {
            return Err(Protocol("RSV2 or RSV3 set"));
        }
        if b[1] & 0x80 == 0 {
            return Err(Protocol("client frames must be masked"));
        }
        let (len, at) = match b[1] & 0x7f {
            126 => {
                let Some(l) = b.get(2..4) else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes([l[0], l[1]])), 4)
            }
            127 => {
                let Some(l) = b.get(2..10) else {
                    return Ok(None);
                };
                let mut a = [0u8; 8];
                a.copy_from_slice(l);
                let len = u64::from_be_bytes(a);
                if len >> 63 != 0 {
                    return Err(Protocol("64-bit length with its top bit set"));
                }
                (len, 10)
            }
            n => (u64::from(n), 2),
        };
        let Some(m) = b.get(at..at + 4) else {
            return Ok(None);
        };
        let mask = [m[0], m[1], m[2], m[3]];
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin {
                    return Err(Protocol("fragmented control frame"));
                }
                if len > 125 {
                    return Err(Protocol("control frame over 125 bytes"));
                }
                if rsv1 {
                    return Err(Protocol("RSV1 on a control frame"));
                }
            }
            OP_TEXT | OP_BINARY => {
                if self.partial.is_some() || self.skipping {
                    return Err(Protocol("a new message inside a fragmented one"));
                }
                if rsv1 && !self.deflate {
                    return Err(Protocol("RSV1 set without permessage-deflate"));
                }
            }
            OP_CONT => {
                if self.partial.is_none() && !self.skipping {
                    return Err(Protocol("continuation frame without a message"));
                }
                if rsv1 {
                    return Err(Protocol("RSV1 on a continuation frame"));
                }
            }
            _ => return Err(Protocol("reserved opcode")),
        }
        Ok(Some(Header {
            fin,
            rsv1,
            opcode,
            mask,
            header_len: at + 4,
            len,
        }))
    }

    /// One whole frame: a message when it completes one.
    fn frame(&mut self, h: Header, payload: BytesMut) -> Result<Option<Message>, SocketError> {
        match h.opcode {
            OP_PING => return Ok(Some(Message::Ping(Bytes::copy_from_slice(&payload)))),
            OP_PONG => return Ok(Some(Message::Pong(Bytes::copy_from_slice(&payload)))),
            OP_CLOSE => return close_frame(&payload).map(|c| Some(Message::Close(c))),
            _ => {}
        }
        let max = self.settings.max_message;
        if h.opcode != OP_CONT {
            let inflater = h.rsv1.then(|| Inflater::new(max));
            if h.fin && inflater.is_none() {
                // The usual case, one frame uncompressed. A small one is copied out: a
                // `Bytes` split off the read buffer would keep the whole buffer alive for
                // as long as the session holds the message (awareness states, queued
                // updates). A large one had the buffer grown to fit it: it becomes the
                // message without a copy.
                let data = if payload.len() <= self.settings.read_buffer * 4 {
                    Bytes::copy_from_slice(&payload)
                } else {
                    payload.freeze()
                };
                return message(h.opcode == OP_TEXT, data).map(Some);
            }
            self.partial = Some(Box::new(Partial {
                text: h.opcode == OP_TEXT,
                data: Vec::new(),
                wire_len: 0,
                inflater,
                checked_utf8: 0,
            }));
        }
        let Some(p) = self.partial.as_mut() else {
            return Err(SocketError::Protocol(
                "continuation frame without a message",
            ));
        };
        p.wire_len += payload.len();
        match p.inflater.as_mut() {
            Some(inf) => {
                self.compressed_in += payload.len() as u64;
                inf.push(&payload).map_err(inflate_error)?;
            }
            None => p.data.extend_from_slice(&payload),
        }
        // The last fragment is checked with the whole message, below.
        if p.text && !h.fin {
            let so_far = match &p.inflater {
                Some(inf) => inf.output(),
                None => &p.data,
            };
            p.checked_utf8 = check_utf8_prefix(so_far, p.checked_utf8)?;
        }
        if !h.fin {
            return Ok(None);
        }
        let Some(p) = self.partial.take() else {
            return Ok(None);
        };
        let data = match p.inflater {
            Some(inf) => inf.finish().map_err(inflate_error)?,
            None => p.data,
        };
        message(p.text, Bytes::from(data)).map(Some)
    }
}

fn inflate_error(e: DeflateError) -> SocketError {
    match e {
        DeflateError::TooBig(n) => SocketError::TooBig(n),
        DeflateError::Invalid => SocketError::Invalid("compressed data that does not inflate"),
    }
}

/// Checks `data[from..]` as the start of UTF-8 text (a character cut at the end may be
/// completed by the next fragment); returns how far it is whole characters.
fn check_utf8_prefix(data: &[u8], from: usize) -> Result<usize, SocketError> {
    let rest = data.get(from..).unwrap_or_default();
    match std::str::from_utf8(rest) {
        Ok(_) => Ok(data.len()),
        Err(e) if e.error_len().is_none() => Ok(from + e.valid_up_to()),
        Err(_) => Err(SocketError::Invalid("a text message that is not UTF-8")),
    }
}

fn message(text: bool, data: Bytes) -> Result<Message, SocketError> {
    if !text {
        return Ok(Message::Binary(data));
    }
    let s = std::str::from_utf8(&data)
        .map_err(|_| SocketError::Invalid("a text message that is not UTF-8"))?;
    Ok(Message::Text(Utf8Bytes::from(s)))
}

/// A Close frame's code and reason, checked (RFC 6455 5.5.1, 7.4).
fn close_frame(payload: &[u8]) -> Result<Option<CloseFrame>, SocketError> {
    match payload.len() {
        0 => return Ok(None),
        1 => return Err(SocketError::Protocol("a close payload of one byte")),
        _ => {}
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let valid = matches!(code, 1000..=1003 | 1007..=1011 | 1012..=1014 | 3000..=4999);
    if !valid {
        return Err(SocketError::Protocol("a close code that may not be sent"));
    }
    let reason = std::str::from_utf8(&payload[2..])
        .map_err(|_| SocketError::Invalid("a close reason that is not UTF-8"))?;
    Ok(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    }))
}

fn unmask(data: &mut [u8], mask: [u8; 4]) {
    // Eight bytes at a time: a debug build unmasking a large frame byte by byte is slow.
    let m8 = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(a) ^ m8).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// The writing half. Frames are gathered in a buffer and written by [`Writer::flush`];
/// a payload larger than the buffer is written straight from its `Bytes`, not copied.
pub struct Writer<W> {
    io: W,
    buf: Vec<u8>,
    settings: Settings,
    deflate: Option<Agreed>,
    /// A Close was sent: no more frames.
    closed: bool,
    compressed_out: u64,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub fn new(io: W, settings: Settings, deflate: Option<Agreed>) -> Self {
        Self {
            io,
            buf: Vec::new(),
            settings,
            deflate,
            closed: false,
            compressed_out: 0,
        }
    }

    /// Whether permessage-deflate was agreed.
    pub fn deflate(&self) -> bool {
        self.deflate.is_some()
    }

    /// Wire bytes of compressed messages sent since the last call.
    pub fn take_compressed_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.compressed_out)
    }

    /// Queues one message (compressed if agreed and over the threshold); written by
    /// [`Writer::flush`] or once the buffer is full. A Close goes through [`Writer::close`].
    pub async fn feed(&mut self, m: Message) -> Result<(), SocketError> {
        if self.closed {
            return Err(SocketError::Io(std::io::ErrorKind::BrokenPipe.into()));
        }
        let (opcode, bytes): (u8, &[u8]) = match &m {
            Message::Binary(b) => (OP_BINARY, b),
            Message::Text(t) => (OP_TEXT, t.as_str().as_bytes()),
            Message::Ping(p) => (OP_PING, p),
            Message::Pong(p) => (OP_PONG, p),
            Message::Close(c) => return self.close(c.clone()).await,
        };
        if let Some(a) = self.deflate {
            if opcode < OP_CLOSE && bytes.len() >= self.settings.deflate_threshold {
                let bits = a.server_window_bits;
                let compressed = match &m {
                    // The fan-out's one `Bytes` for every receiver: compressed once for all.
                    Message::Binary(b) => deflate::compressed(b, bits).await,
                    // A text message's bytes are this connection's own copy (axum's
                    // `Utf8Bytes` gives no `Bytes`): compressed without the shared cache.
                    _ => deflate::compress(Bytes::copy_from_slice(bytes), bits).await,
                };
                if let Some(c) = compressed {
                    self.compressed_out += c.len() as u64;
                    return self.frame(opcode, true, &c).await;
                }
            }
        }
        self.frame(opcode, false, bytes).await
    }

    async fn frame(&mut self, opcode: u8, rsv1: bool, payload: &[u8]) -> Result<(), SocketError> {
        let len = payload.len();
        // The buffer starts empty for every batch (see `write_buffered`): one allocation
        // for the header and a small payload together.
        self.buf.reserve(
            MAX_HEADER
                + if len > self.settings.write_buffer {
                    0
                } else {
                    len
                },
        );
        self.buf.push(0x80 | if rsv1 { 0x40 } else { 0 } | opcode);
        if len < 126 {
            self.buf.push(len as u8);
        } else if let Ok(l) = u16::try_from(len) {
            self.buf.push(126);
            self.buf.extend_from_slice(&l.to_be_bytes());
        } else {
            self.buf.push(127);
            self.buf.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if len > self.settings.write_buffer {
            self.write_buffered().await?;
            self.io.write_all(payload).await?;
        } else {
            self.buf.extend_from_slice(payload);
            if self.buf.len() >= self.settings.write_buffer {
                self.write_buffered().await?;
            }
        }
        Ok(())
    }

    async fn write_buffered(&mut self) -> Result<(), SocketError> {
        if !self.buf.is_empty() {
            self.io.write_all(&self.buf).await?;
            // Not kept for the next batch: an idle connection should hold no write buffer,
            // and an allocation per batch is little beside its write.
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Writes everything fed so far.
    pub async fn flush(&mut self) -> Result<(), SocketError> {
        self.write_buffered().await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Feeds and flushes.
    pub async fn send(&mut self, m: Message) -> Result<(), SocketError> {
        self.feed(m).await?;
        self.flush().await
    }

    /// Sends a Close frame (once) and flushes; nothing can be sent after it.
    pub async fn close(&mut self, frame: Option<CloseFrame>) -> Result<(), SocketError> {
        if self.closed {
            return Ok(());
        }
        let mut payload = Vec::new();
        if let Some(f) = frame {
            payload.extend_from_slice(&f.code.to_be_bytes());
            // A control frame holds 125 bytes: the reason is cut at a character boundary.
            let mut reason = f.reason.as_str();
            while reason.len() > 123 {
                let mut end = 123;
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason = &reason[..end];
            }
            payload.extend_from_slice(reason.as_bytes());
        }
        self.frame(OP_CLOSE, false, &payload).await?;
        self.closed = true;
        self.flush().await
    }
}
