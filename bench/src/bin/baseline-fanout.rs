//! `baseline-fanout`: the least a WebSocket relay can do on this machine, to measure easel
//! against (BENCHMARKS.md, scenario e).
//!
//! Every binary frame a client sends is relayed, as the same shared bytes, to every other
//! client connected on the same path. No auth, no CRDT, no persistence, no limits. Each
//! connection is a reader and a writer task with an unbounded queue between the room and
//! the writer, which batches what is queued before a flush, as easel's writer does.
//!
//! Usage: `baseline-fanout [127.0.0.1:PORT]` (default 127.0.0.1:0); prints
//! `baseline listening on 127.0.0.1:PORT`. Loopback addresses only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

type Peers = HashMap<u64, mpsc::UnboundedSender<Message>>;

#[derive(Default)]
struct Rooms {
    rooms: Mutex<HashMap<String, Arc<Mutex<Peers>>>>,
}

impl Rooms {
    fn join(&self, path: &str, id: u64, tx: mpsc::UnboundedSender<Message>) -> Arc<Mutex<Peers>> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let room = rooms.entry(path.to_string()).or_default().clone();
        room.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        room
    }

    fn leave(&self, path: &str, id: u64) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(room) = rooms.get(path) {
            let mut peers = room.lock().unwrap_or_else(|e| e.into_inner());
            peers.remove(&id);
            if peers.is_empty() {
                drop(peers);
                rooms.remove(path);
            }
        }
    }
}

/// Most frames written before a flush, as easel's writer.
const BATCH: usize = 64;

// The handshake callback's error type is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
async fn connection(stream: TcpStream, id: u64, rooms: Arc<Rooms>) {
    let _ = stream.set_nodelay(true);
    let mut path = String::new();
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        // Frames fed in one batch go out in one write; flush sends what is left.
        .write_buffer_size(64 * 1024)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        |req: &Request, resp: Response| {
            path = req.uri().path().to_string();
            Ok(resp)
        },
        Some(config),
    )
    .await;
    let Ok(ws) = ws else { return };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let room = rooms.join(&path, id, tx);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let mut next = Some(m);
            let mut n = 0;
            while let Some(m) = next {
                if sink.feed(m).await.is_err() {
                    return;
                }
                n += 1;
                next = if n < BATCH { rx.try_recv().ok() } else { None };
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    while let Some(Ok(msg)) = stream.next().await {
        match msg {
            Message::Binary(_) => {
                let peers = room.lock().unwrap_or_else(|e| e.into_inner());
                for (peer, tx) in peers.iter() {
                    if *peer != id {
                        let _ = tx.send(msg.clone());
                    }
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    rooms.leave(&path, id);
    drop(room);
    writer.abort();
}

fn main() -> std::process::ExitCode {
    let addr: SocketAddr = match std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("127.0.0.1:0")
        .parse()
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: bad address: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rooms = Arc::new(Rooms::default());
    let ids = AtomicU64::new(0);
    easel_bench::listen::serve_loopback("baseline", addr, |stream| {
        connection(stream, ids.fetch_add(1, Ordering::Relaxed), rooms.clone())
    })
}
