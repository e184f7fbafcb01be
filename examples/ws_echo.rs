//! An echo server on easel's own WebSocket layer, for the Autobahn|Testsuite.
//!
//! easel owns its RFC 6455 framing and its RFC 7692 permessage-deflate (`ws::socket`,
//! `ws::deflate`), and the connection loop that answers pings and closes (`ws::run`). The
//! testsuite's fuzzing client checks a server by having it echo every message back, which
//! neither of easel's endpoints does (they speak y-websocket and the tutor protocol), so
//! this example puts an echo handler behind the very same upgrade, reader, writer, outbox
//! and connection loop, with the server's default limits (message size and send queue
//! raised to what the testsuite's largest cases send). Nothing else of easel (auth,
//! sessions, the store) is involved.
//!
//! ```sh
//! cargo run --release --example ws_echo -- 127.0.0.1:9001
//! ```
//!
//! `scripts/autobahn.sh` runs the testsuite against it (README, "The WebSocket layer").

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::Message;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use easel::config::LimitsConfig;
use easel::limits::ConnectionCaps;
use easel::metrics::{Endpoint, Metrics};
use easel::ws::outbox::{outbox, Outbox};
use easel::ws::socket::Upgrade;
use easel::ws::upgrade::{connection_timing, socket_settings};
use easel::ws::{self as conn, Connection, Flow, FrameHandler};
use tokio::sync::watch;

/// The testsuite's largest message is 16 MiB (cases 9.1.6 and 9.2.6).
const LARGEST_CASE: usize = 16 * 1024 * 1024;

/// Echoes every data message back through the connection's outbox, as a session's
/// fan-out would queue it.
struct Echo {
    outbox: Outbox,
}

impl FrameHandler for Echo {
    fn on_frame(&mut self, frame: &Message) -> Flow {
        // A queue over its limit is marked overflowed and the writer closes with 1013, as
        // on a session: nothing to do here either way.
        let _queued = self.outbox.send(frame.clone());
        Flow::Continue
    }

    fn on_close(&mut self) {}
}

struct Echoing {
    limits: LimitsConfig,
    caps: Arc<ConnectionCaps>,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
    removed: watch::Receiver<easel::session::tutor::RemovedUsers>,
    next_id: std::sync::atomic::AtomicU64,
}

async fn echo(State(s): State<Arc<Echoing>>, upgrade: Upgrade) -> Result<Response, String> {
    let permit = s
        .caps
        .acquire("autobahn", "echo", Endpoint::Whiteboard)
        .map_err(|e| e.to_string())?;
    let (tx, rx) = outbox(s.limits.max_send_queue_bytes);
    let connection = Connection {
        id: s.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        endpoint: Endpoint::Whiteboard,
        session: Arc::from("echo"),
        user: "autobahn".to_owned(),
        permit,
        drain: None,
        token_expires: SystemTime::now() + Duration::from_secs(86_400),
        outbox: rx,
        timing: connection_timing(&s.limits, None),
        metrics: s.metrics.endpoint(Endpoint::Whiteboard).clone(),
        shutdown: s.shutdown.clone(),
        max_frame_bytes: s.limits.max_frame_bytes,
        removed: s.removed.clone(),
        admin: false,
    };
    Ok(
        upgrade.accept("", socket_settings(&s.limits), move |reader, writer| {
            conn::run((reader, writer), connection, Echo { outbox: tx })
        }),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".to_owned());
    let mut limits = LimitsConfig::default();
    limits.max_frame_bytes = limits.max_frame_bytes.max(LARGEST_CASE);
    limits.max_send_queue_bytes = limits.max_send_queue_bytes.max(2 * LARGEST_CASE);
    // Kept for the life of the process: a dropped sender reads as a shutdown.
    let (_shutdown_tx, shutdown) = watch::channel(false);
    let (_removed_tx, removed) = watch::channel(Default::default());
    let state = Arc::new(Echoing {
        caps: Arc::new(ConnectionCaps::new(
            limits.max_connections,
            usize::MAX,
            usize::MAX,
        )),
        limits,
        metrics: Metrics::new(),
        shutdown,
        removed,
        next_id: Default::default(),
    });
    let app = axum::Router::new().route("/", get(echo)).with_state(state);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("echoing on ws://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
