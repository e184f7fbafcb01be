//! `trivial-join`: the floor for a join storm (BENCHMARKS.md, scenario f). A WebSocket
//! server that answers every connection with one cached buffer and does nothing else: no
//! auth, no CRDT, no sessions, no state. What easel's time to synced is compared with.
//!
//! The buffer is the one binary message in FILE (the y-websocket sync step 2 of the
//! storm's board), framed once at start. Unless `--no-deflate`, it is also compressed once
//! at start (permessage-deflate, RFC 7692: raw deflate at zlib's default level 6, easel's
//! level too; sync flush, its 00 00 ff ff tail removed) and framed with RSV1. A joiner that
//! offers the extension gets `permessage-deflate; server_no_context_takeover;
//! client_no_context_takeover` and the compressed frame, any other the plain one: one
//! `write_all` of shared bytes either way. Then its frames are read and dropped until it
//! closes (a Close is answered with a Close).
//!
//! Usage: `trivial-join --listen 127.0.0.1:0 --answer FILE [--no-deflate]`; prints
//! `trivial listening on 127.0.0.1:PORT` once the buffers are ready. Loopback only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use flate2::{Compress, Compression, FlushCompress};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use easel_bench::wire::{accept_key, frame, OP_BINARY, OP_CLOSE, TAIL};

#[derive(Parser, Debug)]
#[command(
    name = "trivial-join",
    about = "Answers every WebSocket connection with one cached message (the join storm's floor)"
)]
struct Cli {
    /// The address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The payload of the binary message every connection gets.
    #[arg(long)]
    answer: PathBuf,
    /// Never agree to permessage-deflate.
    #[arg(long)]
    no_deflate: bool,
}

/// The largest upgrade request read.
const MAX_REQUEST: usize = 16 << 10;
/// The longest wait for the upgrade request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The answer, framed: plain, and compressed unless deflate is off.
struct Answers {
    plain: Vec<u8>,
    deflated: Option<Vec<u8>>,
}

/// `data` as one permessage-deflate message: raw deflate, no context, sync-flushed, the
/// flush's tail removed.
fn deflate(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity());
        }
        let consumed = usize::try_from(c.total_in())?.min(data.len());
        c.compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
            .context("compressing the answer")?;
        // The flush is complete once all input is taken and zlib did not fill the output.
        if c.total_in() as usize >= data.len() && out.len() < out.capacity() {
            break;
        }
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    Ok(out)
}

/// What the upgrade request asked for.
struct Request {
    key: String,
    protocol: Option<String>,
    /// A permessage-deflate offer we can take, and whether it named the server's window
    /// (15, the only one we compress with; the answer must then name it too).
    deflate: Option<bool>,
}

/// Parses the request's head (up to the empty line).
fn parse_request(head: &str) -> anyhow::Result<Request> {
    let mut lines = head.split("\r\n").filter(|l| !l.is_empty());
    let start = lines.next().unwrap_or_default();
    if !start.starts_with("GET ") {
        bail!("not a GET: {start:?}");
    }
    let mut req = Request {
        key: String::new(),
        protocol: None,
        deflate: None,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("a malformed header line");
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("sec-websocket-key") {
            req.key = value.to_string();
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") && req.protocol.is_none() {
            req.protocol = value.split(',').map(str::trim).next().map(str::to_string);
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") && req.deflate.is_none() {
            req.deflate = value.split(',').find_map(deflate_offer);
        }
    }
    if req.key.is_empty() {
        bail!("no Sec-WebSocket-Key");
    }
    Ok(req)
}

/// A permessage-deflate offer we can accept (RFC 7692 7.1): no parameter we do not know,
/// and a server window, if named, of 15 bits. Returns whether it named the window.
fn deflate_offer(offer: &str) -> Option<bool> {
    let mut params = offer.split(';').map(str::trim);
    if !params.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut named_window = false;
    for p in params {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover"
            | "client_no_context_takeover"
            | "client_max_window_bits" => {}
            "server_max_window_bits" if value == Some("15") => named_window = true,
            _ => return None,
        }
    }
    Some(named_window)
}

/// One connection: the upgrade, the cached answer, then frames dropped until the close.
async fn connection(mut stream: TcpStream, answers: Arc<Answers>) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(&mut stream);
    let mut head = Vec::new();
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > MAX_REQUEST {
                bail!("the upgrade request passes {MAX_REQUEST} bytes");
            }
            let line = (&mut reader)
                .take((MAX_REQUEST + 1 - head.len()) as u64)
                .read_until(b'\n', &mut head)
                .await?;
            if line == 0 {
                bail!("the client left during the upgrade");
            }
        }
        Ok::<(), anyhow::Error>(())
    })
    .await
    .context("the upgrade request timed out")??;
    // Whatever the client sent after the request stays in `reader`, read as frames below.
    let req = parse_request(std::str::from_utf8(&head)?)?;
    let accept = accept_key(&req.key);
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = &req.protocol {
        response.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    let body = match (&answers.deflated, req.deflate) {
        (Some(deflated), Some(named_window)) => {
            response.push_str(
                "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
                 client_no_context_takeover",
            );
            if named_window {
                response.push_str("; server_max_window_bits=15");
            }
            response.push_str("\r\n");
            deflated
        }
        _ => &answers.plain,
    };
    response.push_str("\r\n");
    let stream = reader.get_mut();
    stream.write_all(response.as_bytes()).await?;
    stream.write_all(body).await?;
    drain(&mut reader).await
}

/// Reads the client's frames and drops them; answers its Close with a Close and ends.
async fn drain(reader: &mut BufReader<&mut TcpStream>) -> anyhow::Result<()> {
    loop {
        let mut h = [0u8; 2];
        match reader.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let len = match h[1] & 0x7f {
            126 => u64::from(reader.read_u16().await?),
            127 => reader.read_u64().await?,
            n => u64::from(n),
        };
        let mut mask = [0u8; 4];
        if h[1] & 0x80 != 0 {
            reader.read_exact(&mut mask).await?;
        }
        if h[0] & 0x0f != OP_CLOSE {
            tokio::io::copy(&mut (&mut *reader).take(len), &mut tokio::io::sink()).await?;
            continue;
        }
        if len > 125 {
            bail!("a close frame over 125 bytes");
        }
        let mut payload = vec![0u8; len as usize];
        reader.read_exact(&mut payload).await?;
        // Echo the status code (RFC 6455 5.5.1), without the reason.
        let code: Vec<u8> = payload
            .iter()
            .zip(mask.iter().cycle())
            .map(|(b, m)| b ^ m)
            .take(2)
            .collect();
        let stream = reader.get_mut();
        stream
            .write_all(&frame(OP_CLOSE, false, None, &code))
            .await?;
        stream.shutdown().await?;
        return Ok(());
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let answers = match std::fs::read(&cli.answer) {
        Ok(payload) => {
            let deflated = if cli.no_deflate {
                None
            } else {
                match deflate(&payload) {
                    Ok(d) => Some(frame(OP_BINARY, true, None, &d)),
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        return std::process::ExitCode::FAILURE;
                    }
                }
            };
            Answers {
                plain: frame(OP_BINARY, false, None, &payload),
                deflated,
            }
        }
        Err(e) => {
            eprintln!("error: reading {}: {e}", cli.answer.display());
            return std::process::ExitCode::from(2);
        }
    };
    eprintln!(
        "trivial-join: answer of {} bytes framed, {}",
        answers.plain.len(),
        match &answers.deflated {
            Some(d) => format!("{} bytes framed compressed (zlib level 6)", d.len()),
            None => "no compression".into(),
        }
    );
    let answers = Arc::new(answers);
    easel_bench::listen::serve_loopback("trivial", cli.listen, |stream| {
        connection(stream, answers.clone())
    })
}
