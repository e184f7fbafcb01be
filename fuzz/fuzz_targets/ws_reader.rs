//! The server's WebSocket reader (RFC 6455 framing, RFC 7692 inflating) on any bytes a
//! client sends, as `ws::run` drives it: message after message until the stream ends, a
//! Close is read or an error other than an over-size message stops it.
//!
//! Input: one byte of settings (bit 0: permessage-deflate agreed; bits 1–2: the largest
//! message, 64 B to 1 MiB, so that the over-size paths are reached), one byte of read size
//! (the stream arrives in pieces of 1 to 256 bytes, so every frame is also read cut
//! anywhere), then the stream.
#![no_main]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use axum::extract::ws::Message;
use easel::ws::socket::{Reader, Settings, SocketError};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// A client's bytes, handed over at most `piece` at a time.
struct Pieces<'a> {
    data: &'a [u8],
    piece: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.piece.min(self.data.len()).min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    easel_fuzz::server_panic_semantics();
    let [flags, piece, stream @ ..] = data else {
        return;
    };
    let max_message = [64, 1024, 64 * 1024, 1 << 20][usize::from(flags >> 1 & 3)];
    let settings = Settings {
        max_message,
        deflate_threshold: 1024,
        deflate: flags & 1 != 0,
        read_buffer: 1024,
        write_buffer: 64 * 1024,
    };
    let io = Pieces {
        data: stream,
        piece: usize::from(*piece) + 1,
    };
    let mut reader = Reader::new(io, settings, flags & 1 != 0);
    // Each round reads at least one byte or ends the reader: bounded by the input's length.
    for _ in 0..=stream.len() {
        match now(reader.next()) {
            None => break,
            Some(Ok(Message::Binary(b))) => {
                assert!(b.len() <= max_message, "a message over the limit")
            }
            Some(Ok(Message::Text(t))) => {
                assert!(t.len() <= max_message, "a message over the limit")
            }
            Some(Ok(Message::Close(_))) => {
                assert!(now(reader.next()).is_none(), "a message after a Close");
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(SocketError::TooBig(_))) => {}
            Some(Err(_)) => {
                assert!(now(reader.next()).is_none(), "a message after an error");
                break;
            }
        }
    }
});

/// The outcome of a future that must not wait: the stream is always ready.
fn now<F: Future>(f: F) -> F::Output {
    match std::pin::pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the reader waited on a stream that is always ready"),
    }
}
