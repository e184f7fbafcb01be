//! Shared helpers for the black-box integration tests.
//!
//! Every test spawns the real `easel` binary on 127.0.0.1:0 with a temporary data
//! directory and a temporary TOML config, and talks to it over real sockets only.
//! Nothing from the easel library crate is used.
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;
use yrs::sync::awareness::AwarenessUpdateEntry;
use yrs::sync::{AwarenessUpdate, Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, GetString, Map, ReadTxn, StateVector, Text, Transact, Update};

/// The HS256 secret every test server is started with (EASEL_JWT_SECRET).
pub const SECRET: &str = "easel-integration-test-secret-0123456789";
/// Default timeout for every wait in the tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// How long we wait for the `easel listening on` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

pub type Ws = WebSocketStream<TcpStream>;

// ---------------------------------------------------------------------------------------------
// Test server
// ---------------------------------------------------------------------------------------------

pub struct TestServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    _tmp: Option<tempfile::TempDir>,
}

/// Options for starting a server.
#[derive(Default, Clone)]
pub struct StartOpts {
    /// Extra environment variables (EASEL_JWT_SECRET is set unless overridden here).
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments appended after the standard ones.
    pub args: Vec<String>,
    /// Use this data directory instead of a fresh temporary one (for restart tests).
    pub data_dir: Option<PathBuf>,
}

impl TestServer {
    /// Starts `easel serve` with the given TOML config (may be empty).
    pub fn start(config_toml: &str) -> TestServer {
        Self::start_opts(config_toml, StartOpts::default())
    }

    pub fn start_with(config_toml: &str, env: &[(&str, &str)], args: &[&str]) -> TestServer {
        Self::start_opts(
            config_toml,
            StartOpts {
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                args: args.iter().map(|s| s.to_string()).collect(),
                data_dir: None,
            },
        )
    }

    /// Starts a server on an existing data directory (for restart/persistence tests).
    pub fn start_in(data_dir: &Path, config_toml: &str) -> TestServer {
        Self::start_opts(
            config_toml,
            StartOpts {
                data_dir: Some(data_dir.to_path_buf()),
                ..Default::default()
            },
        )
    }

    pub fn start_opts(config_toml: &str, opts: StartOpts) -> TestServer {
        match Self::try_start(config_toml, opts) {
            Ok(s) => s,
            Err(e) => panic!("easel failed to start: {e}"),
        }
    }

    /// Starts the server; returns Err(diagnostics) if it exits or never prints its line.
    pub fn try_start(config_toml: &str, opts: StartOpts) -> Result<TestServer, String> {
        let tmp = tempfile::Builder::new()
            .prefix("easel-test-")
            .tempdir()
            .expect("tempdir");
        let config_path = tmp.path().join("easel.toml");
        std::fs::write(&config_path, config_toml).expect("write config");
        let data_dir = match &opts.data_dir {
            Some(d) => d.clone(),
            None => tmp.path().join("data"),
        };
        std::fs::create_dir_all(&data_dir).expect("create data dir");

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_easel"));
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--config")
            .arg(&config_path)
            .args(&opts.args)
            .env_remove("EASEL_LISTEN")
            .env_remove("EASEL_DATA_DIR")
            .env_remove("EASEL_JWT_SECRET_FILE")
            .env_remove("EASEL_JWT_PUBLIC_KEY_FILE")
            .env_remove("EASEL_LOG_FORMAT")
            .env("EASEL_JWT_SECRET", SECRET)
            .env("EASEL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| format!("spawn easel: {e}"))?;

        let stderr_buf = Arc::new(Mutex::new(String::new()));
        let stdout_buf = Arc::new(Mutex::new(String::new()));
        {
            let mut err = child.stderr.take().unwrap();
            let buf = stderr_buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match err.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let mut b = buf.lock().unwrap();
                            b.push_str(&String::from_utf8_lossy(&chunk[..n]));
                            // keep memory bounded
                            if b.len() > 4_000_000 {
                                let cut = b.len() - 2_000_000;
                                let cut = (cut..b.len()).find(|i| b.is_char_boundary(*i)).unwrap();
                                b.drain(..cut);
                            }
                        }
                    }
                }
            });
        }
        let (tx, rx) = mpsc::channel::<String>();
        {
            let out = child.stdout.take().unwrap();
            let buf = stdout_buf.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(out);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            buf.lock().unwrap().push_str(&line);
                            let _ = tx.send(line.trim_end().to_string());
                        }
                    }
                }
            });
        }

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no `easel listening on` line within {STARTUP_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
                    stdout_buf.lock().unwrap(),
                    stderr_buf.lock().unwrap()
                ));
            }
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("easel listening on ") {
                        let addr: SocketAddr = rest
                            .trim()
                            .parse()
                            .map_err(|e| format!("bad address in {line:?}: {e}"))?;
                        break addr;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        // give the reader threads a moment to collect the output
                        std::thread::sleep(Duration::from_millis(100));
                        return Err(format!(
                            "easel exited with {status} before listening\nstdout:\n{}\nstderr:\n{}",
                            stdout_buf.lock().unwrap(),
                            stderr_buf.lock().unwrap()
                        ));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().ok();
                    std::thread::sleep(Duration::from_millis(100));
                    return Err(format!(
                        "easel closed stdout (exit {status:?}) before listening\nstdout:\n{}\nstderr:\n{}",
                        stdout_buf.lock().unwrap(),
                        stderr_buf.lock().unwrap()
                    ));
                }
            }
        };

        Ok(TestServer {
            child: Some(child),
            addr,
            data_dir,
            config_path,
            stderr: stderr_buf,
            stdout: stdout_buf,
            _tmp: Some(tmp),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Sends SIGTERM through `kill -TERM <pid>`.
    pub fn sigterm(&self) {
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -TERM failed: {st}");
    }

    /// Polls for the process to exit (condition wait with timeout).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .expect("child")
                .try_wait()
                .expect("try_wait")
            {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server process (SIGKILL) and waits for it; keeps the temp dir.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Takes ownership of the temp dir so it outlives this server (restart tests).
    pub fn take_tempdir(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }

    pub fn wb_path(session: &str) -> String {
        format!("/ws/v2/session/{session}/whiteboard")
    }

    pub fn tutor_path(session: &str) -> String {
        format!("/ws/v2/session/{session}")
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    // --- convenience connectors -------------------------------------------------------------

    /// Whiteboard client, token in the query string, sync handshake done.
    pub async fn wb(&self, session: &str, token: &str) -> WbClient {
        let mut c = self.wb_connect(session, token).await;
        c.handshake().await;
        c
    }

    /// Whiteboard client, token in the query string, no handshake yet.
    pub async fn wb_connect(&self, session: &str, token: &str) -> WbClient {
        let ws = ws_connect(
            self.addr,
            &Self::wb_path(session),
            Some(token),
            TokenVia::Query,
            &[],
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "whiteboard connect to {session} failed: {}",
                describe_ws_err(&e)
            )
        });
        WbClient::new(ws.0)
    }

    /// Whiteboard client for a fresh user with role student, handshake done.
    pub async fn wb_user(&self, session: &str, user: &str) -> WbClient {
        self.wb(session, &token(user, session, "student")).await
    }

    /// Tutor client, token in the query string; welcome + history already read.
    pub async fn tutor(&self, session: &str, token: &str) -> (TutorClient, Value, Value) {
        self.tutor_q(session, token, "").await
    }

    /// Tutor client with extra query (e.g. "after_seq=3"); welcome + history already read.
    pub async fn tutor_q(
        &self,
        session: &str,
        token: &str,
        extra_query: &str,
    ) -> (TutorClient, Value, Value) {
        let mut path = Self::tutor_path(session);
        if !extra_query.is_empty() {
            path.push('?');
            path.push_str(extra_query);
        }
        let (ws, _) = ws_connect(self.addr, &path, Some(token), TokenVia::Query, &[])
            .await
            .unwrap_or_else(|e| {
                panic!("tutor connect to {session} failed: {}", describe_ws_err(&e))
            });
        let mut c = TutorClient::new(ws);
        let welcome = c.next_json().await;
        assert_eq!(
            welcome["type"], "welcome",
            "first tutor message must be welcome, got {welcome}"
        );
        let history = c.next_json().await;
        assert_eq!(
            history["type"], "history",
            "second tutor message must be history, got {history}"
        );
        (c, welcome, history)
    }

    pub async fn http_get(&self, path: &str) -> HttpResponse {
        http_request(self.addr, "GET", path, &[], None).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let err = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
            let tail: String = {
                let n = err.len();
                let start = n.saturating_sub(12_000);
                let start = (start..=n).find(|i| err.is_char_boundary(*i)).unwrap_or(n);
                err[start..].to_string()
            };
            eprintln!("----- easel stderr (tail) -----\n{tail}\n----- end easel stderr -----");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signs arbitrary claims with HS256 and the given secret.
pub fn mint_with_secret(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}

/// Signs arbitrary claims with HS256 and the test secret.
pub fn mint(claims: &Value) -> String {
    mint_with_secret(claims, SECRET)
}

/// A valid one-hour token for `sub` on session `sid` with `role`.
pub fn token(sub: &str, sid: &str, role: &str) -> String {
    mint(&json!({
        "sub": sub,
        "sid": sid,
        "role": role,
        "name": format!("Name of {sub}"),
        "exp": now_s() + 3600,
    }))
}

// ---------------------------------------------------------------------------------------------
// WebSocket connection
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenVia {
    Query,
    Header,
    Subprotocol,
}

pub fn describe_ws_err(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(resp) => format!(
            "HTTP {} body {:?}",
            resp.status(),
            resp.body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
        ),
        other => other.to_string(),
    }
}

/// Connects a WebSocket; `path` may already contain a query.
pub async fn ws_connect(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    via: TokenVia,
    headers: &[(&str, &str)],
) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
    ws_connect_cfg(addr, path, token, via, headers, None, None).await
}

/// Like `ws_connect`, with an optional client config and an optional SO_RCVBUF size.
pub async fn ws_connect_cfg(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    via: TokenVia,
    headers: &[(&str, &str)],
    config: Option<WebSocketConfig>,
    recv_buffer: Option<u32>,
) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
    let mut path = path.to_string();
    if let (Some(t), TokenVia::Query) = (token, via) {
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str("token=");
        path.push_str(t);
    }
    let url = format!("ws://{addr}{path}");
    let mut req = url.into_client_request()?;
    {
        let h = req.headers_mut();
        match (token, via) {
            (Some(t), TokenVia::Header) => {
                h.insert(
                    "authorization",
                    HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
                );
            }
            (Some(t), TokenVia::Subprotocol) => {
                h.insert(
                    "sec-websocket-protocol",
                    HeaderValue::from_str(&format!("easel, bearer.{t}")).unwrap(),
                );
            }
            _ => {}
        }
        for (k, v) in headers {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
    }
    let socket = TcpSocket::new_v4()?;
    if let Some(n) = recv_buffer {
        socket.set_recv_buffer_size(n)?;
    }
    let stream = tokio::time::timeout(TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| tungstenite::Error::Io(std::io::Error::other("tcp connect timeout")))??;
    stream.set_nodelay(true)?;
    tokio::time::timeout(
        TIMEOUT,
        tokio_tungstenite::client_async_with_config(req, stream, config),
    )
    .await
    .map_err(|_| tungstenite::Error::Io(std::io::Error::other("websocket handshake timeout")))?
}

/// Result of reading a frame from a websocket.
#[derive(Debug)]
pub enum WsEvent {
    Binary(Vec<u8>),
    Text(String),
    /// A close frame: code (if any) and reason.
    Close(Option<u16>, String),
    /// The stream ended or failed without a close frame.
    End(String),
    /// Nothing arrived within the timeout.
    Timeout,
}

/// Reads the next data/close frame (pings and pongs are skipped).
pub async fn ws_next(ws: &mut Ws, timeout: Duration) -> WsEvent {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return WsEvent::Timeout,
            Ok(None) => return WsEvent::End("stream ended".into()),
            Ok(Some(Err(e))) => return WsEvent::End(format!("error: {e}")),
            Ok(Some(Ok(m))) => match m {
                WsMessage::Binary(b) => return WsEvent::Binary(b.to_vec()),
                WsMessage::Text(t) => return WsEvent::Text(t.to_string()),
                WsMessage::Close(cf) => {
                    return match cf {
                        Some(CloseFrame { code, reason }) => {
                            WsEvent::Close(Some(u16::from(code)), reason.to_string())
                        }
                        None => WsEvent::Close(None, String::new()),
                    }
                }
                WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
            },
        }
    }
}

/// Reads until a close frame or the end of the stream, skipping data frames.
/// Returns Some(code) for a close frame with a code, None for a bare end of stream.
/// Panics if neither happens within `timeout`.
pub async fn ws_expect_close(ws: &mut Ws, timeout: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws_next(ws, left).await {
            WsEvent::Close(code, _) => return code,
            WsEvent::End(_) => return None,
            WsEvent::Timeout => panic!("connection was not closed within {timeout:?}"),
            WsEvent::Binary(_) | WsEvent::Text(_) => continue,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// y-websocket framing (our own parser, so trailing bytes and unknown tags are visible)
// ---------------------------------------------------------------------------------------------

pub fn write_var_uint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

pub fn write_var_buf(out: &mut Vec<u8>, buf: &[u8]) {
    write_var_uint(out, buf.len() as u64);
    out.extend_from_slice(buf);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn var_uint(&mut self) -> Result<u64, String> {
        let mut n: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or("unexpected end of frame (varUint)")?;
            self.pos += 1;
            n |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
            shift += 7;
            if shift > 63 {
                return Err("varUint too long".into());
            }
        }
    }
    fn var_buf(&mut self) -> Result<&'a [u8], String> {
        let len = self.var_uint()? as usize;
        if self.pos + len > self.buf.len() {
            return Err(format!("varUint8Array of {len} bytes past end of frame"));
        }
        let s = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Ok(s)
    }
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

/// Decodes every y-websocket message in a frame. Errors on anything malformed.
pub fn decode_frame(frame: &[u8]) -> Result<Vec<Message>, String> {
    let mut r = Reader { buf: frame, pos: 0 };
    let mut out = Vec::new();
    if frame.is_empty() {
        return Err("empty frame".into());
    }
    while !r.done() {
        let tag = r.var_uint()?;
        let msg = match tag {
            0 => {
                let sub = r.var_uint()?;
                let data = r.var_buf()?;
                match sub {
                    0 => Message::Sync(SyncMessage::SyncStep1(
                        StateVector::decode_v1(data)
                            .map_err(|e| format!("bad state vector: {e}"))?,
                    )),
                    1 => Message::Sync(SyncMessage::SyncStep2(data.to_vec())),
                    2 => Message::Sync(SyncMessage::Update(data.to_vec())),
                    s => return Err(format!("unknown sync sub-type {s}")),
                }
            }
            1 => {
                let data = r.var_buf()?;
                Message::Awareness(
                    AwarenessUpdate::decode_v1(data)
                        .map_err(|e| format!("bad awareness update: {e}"))?,
                )
            }
            2 => {
                let perm = r.var_uint()?;
                if perm == 0 {
                    let s = r.var_buf()?;
                    Message::Auth(Some(
                        String::from_utf8(s.to_vec())
                            .map_err(|_| "auth reason is not utf-8".to_string())?,
                    ))
                } else {
                    Message::Auth(None)
                }
            }
            3 => Message::AwarenessQuery,
            t => return Err(format!("unknown message type {t} from server")),
        };
        out.push(msg);
    }
    Ok(out)
}

pub fn encode_msg(m: &Message) -> Vec<u8> {
    m.encode_v1()
}

pub fn update_msg(update: &[u8]) -> Vec<u8> {
    encode_msg(&Message::Sync(SyncMessage::Update(update.to_vec())))
}

pub fn awareness_msg(update: &AwarenessUpdate) -> Vec<u8> {
    encode_msg(&Message::Awareness(update.clone()))
}

/// An awareness update for one client.
pub fn awareness_update(client_id: u64, clock: u32, json: &str) -> AwarenessUpdate {
    let mut clients = HashMap::new();
    clients.insert(
        ClientID::new(client_id),
        AwarenessUpdateEntry {
            clock,
            json: json.into(),
        },
    );
    AwarenessUpdate { clients }
}

pub fn awareness_entry(u: &AwarenessUpdate, client_id: u64) -> Option<&AwarenessUpdateEntry> {
    u.clients.get(&ClientID::new(client_id))
}

pub fn awareness_ids(u: &AwarenessUpdate) -> Vec<u64> {
    let mut v: Vec<u64> = u.clients.keys().map(|c| c.get()).collect();
    v.sort();
    v
}

/// An update that inserts `value` at `key` of root map `map`, from a fresh doc with client id `client`.
pub fn map_set_update(client: u64, map: &str, key: &str, value: &str) -> Vec<u8> {
    let doc = Doc::with_client_id(client);
    let m = doc.get_or_insert_map(map);
    let mut txn = doc.transact_mut();
    m.insert(&mut txn, key, value);
    txn.encode_update_v1()
}

/// A snapshot of a doc's content for the given roots, as JSON.
pub fn doc_json(doc: &Doc, maps: &[&str], texts: &[&str]) -> Value {
    let mut o = serde_json::Map::new();
    for m in maps {
        let r = doc.get_or_insert_map(*m);
        let txn = doc.transact();
        let any = yrs::types::ToJson::to_json(&r, &txn);
        o.insert(m.to_string(), any_to_json(&any));
    }
    for t in texts {
        let r = doc.get_or_insert_text(*t);
        let txn = doc.transact();
        o.insert(t.to_string(), Value::String(r.get_string(&txn)));
    }
    Value::Object(o)
}

pub fn any_to_json(any: &yrs::Any) -> Value {
    serde_json::to_value(any).unwrap_or_else(|e| panic!("yrs Any to JSON {any:?}: {e}"))
}

/// Rewrites every number as an f64 so that 120 and 120.0 compare equal.
pub fn normalize_numbers(v: &Value) -> Value {
    match v {
        Value::Number(n) => {
            let f = n.as_f64().expect("finite number");
            serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or(Value::Null)
        }
        Value::Array(a) => Value::Array(a.iter().map(normalize_numbers).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), normalize_numbers(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Content of one root of a doc as JSON, by kind ("map", "array", "text").
pub fn root_json(doc: &Doc, name: &str, kind: &str) -> Value {
    match kind {
        "map" => {
            let r = doc.get_or_insert_map(name);
            let txn = doc.transact();
            any_to_json(&yrs::types::ToJson::to_json(&r, &txn))
        }
        "array" => {
            let r = doc.get_or_insert_array(name);
            let txn = doc.transact();
            any_to_json(&yrs::types::ToJson::to_json(&r, &txn))
        }
        "text" => {
            let r = doc.get_or_insert_text(name);
            let txn = doc.transact();
            Value::String(r.get_string(&txn))
        }
        other => panic!("unknown root kind {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Whiteboard client
// ---------------------------------------------------------------------------------------------

/// What a whiteboard client saw.
#[derive(Debug)]
pub enum WbEvent {
    /// One decoded message and the raw bytes of the frame it came in.
    Msg(Message, Vec<u8>),
    Text(String),
    Close(Option<u16>, String),
    End(String),
    Timeout,
}

pub struct WbClient {
    pub ws: Ws,
    /// Local replica: every received update is applied to it.
    pub doc: Doc,
    pending: VecDeque<(Message, Vec<u8>)>,
    /// Every message received so far, in order.
    pub received: Vec<Message>,
    /// The raw frame each entry of `received` came in.
    pub received_raw: Vec<Vec<u8>>,
    /// Frames from the server that carried more than one message (contract: one per frame).
    pub multi_message_frames: usize,
    /// Set once the connection is closed: Some(code) for a close frame, None for EOF/error.
    pub closed: Option<Option<u16>>,
}

impl WbClient {
    pub fn new(ws: Ws) -> Self {
        WbClient {
            ws,
            doc: Doc::new(),
            pending: VecDeque::new(),
            received: Vec::new(),
            received_raw: Vec::new(),
            multi_message_frames: 0,
            closed: None,
        }
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(WsMessage::Binary(bytes.into()))
            .await
            .expect("send binary frame");
    }

    /// Sends, but tolerates the server having closed already.
    pub async fn try_send_raw(&mut self, bytes: Vec<u8>) -> Result<(), tungstenite::Error> {
        self.ws.send(WsMessage::Binary(bytes.into())).await
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(WsMessage::Text(text.into()))
            .await
            .expect("send text frame");
    }

    pub async fn send_msg(&mut self, m: &Message) {
        self.send_raw(encode_msg(m)).await
    }

    pub async fn send_update(&mut self, update: Vec<u8>) {
        self.send_msg(&Message::Sync(SyncMessage::Update(update)))
            .await
    }

    pub async fn send_awareness(&mut self, u: &AwarenessUpdate) {
        self.send_raw(awareness_msg(u)).await
    }

    /// Runs `f` on the local doc and sends the resulting update; returns the update.
    pub async fn change<F: FnOnce(&Doc)>(&mut self, f: F) -> Vec<u8> {
        let sv = self.doc.transact().state_vector();
        f(&self.doc);
        let upd = self.doc.transact().encode_diff_v1(&sv);
        self.send_update(upd.clone()).await;
        upd
    }

    pub async fn map_set(&mut self, map: &str, key: &str, value: &str) -> Vec<u8> {
        let (map, key, value) = (map.to_string(), key.to_string(), value.to_string());
        self.change(move |d| {
            let m = d.get_or_insert_map(map.as_str());
            let mut txn = d.transact_mut();
            m.insert(&mut txn, key.as_str(), value.as_str());
        })
        .await
    }

    pub async fn text_push(&mut self, text: &str, chunk: &str) -> Vec<u8> {
        let (text, chunk) = (text.to_string(), chunk.to_string());
        self.change(move |d| {
            let t = d.get_or_insert_text(text.as_str());
            let mut txn = d.transact_mut();
            t.push(&mut txn, &chunk);
        })
        .await
    }

    pub fn map_get(&self, map: &str, key: &str) -> Option<String> {
        let m = self.doc.get_or_insert_map(map);
        let txn = self.doc.transact();
        m.get(&txn, key).map(|v| v.to_string(&txn))
    }

    pub fn text(&self, name: &str) -> String {
        let t = self.doc.get_or_insert_text(name);
        let txn = self.doc.transact();
        t.get_string(&txn)
    }

    fn apply(&mut self, update: &[u8]) {
        let u = Update::decode_v1(update)
            .unwrap_or_else(|e| panic!("server sent an undecodable update: {e}"));
        self.doc
            .transact_mut()
            .apply_update(u)
            .unwrap_or_else(|e| panic!("applying server update failed: {e}"));
    }

    /// Next event. Sync updates (step 2 / update) are applied to the local doc when
    /// they are handed out, and every handed-out message is appended to `received`.
    pub async fn next_event(&mut self, timeout: Duration) -> WbEvent {
        if self.pending.is_empty() {
            if let Some(c) = self.closed {
                return WbEvent::End(format!("already closed ({c:?})"));
            }
            match ws_next(&mut self.ws, timeout).await {
                WsEvent::Binary(b) => {
                    let msgs = decode_frame(&b).unwrap_or_else(|e| {
                        panic!("server frame {} does not decode: {e}", short(&b))
                    });
                    if msgs.len() > 1 {
                        self.multi_message_frames += 1;
                    }
                    for m in msgs {
                        self.pending.push_back((m, b.clone()));
                    }
                }
                WsEvent::Text(t) => return WbEvent::Text(t),
                WsEvent::Close(c, r) => {
                    self.closed = Some(c);
                    return WbEvent::Close(c, r);
                }
                WsEvent::End(e) => {
                    self.closed = Some(None);
                    return WbEvent::End(e);
                }
                WsEvent::Timeout => return WbEvent::Timeout,
            }
        }
        let (m, raw) = self.pending.pop_front().expect("pending message");
        if let Message::Sync(SyncMessage::SyncStep2(u)) | Message::Sync(SyncMessage::Update(u)) = &m
        {
            let u = u.clone();
            self.apply(&u);
        }
        self.received.push(m.clone());
        self.received_raw.push(raw.clone());
        WbEvent::Msg(m, raw)
    }

    /// Next message; panics on close, text or timeout.
    pub async fn next_msg(&mut self) -> Message {
        match self.next_event(TIMEOUT).await {
            WbEvent::Msg(m, _) => m,
            other => panic!("expected a whiteboard message, got {other:?}"),
        }
    }

    /// Reads messages until `pred` matches one (returned). Panics on close or timeout.
    pub async fn wait_for<F: FnMut(&Message) -> bool>(
        &mut self,
        what: &str,
        mut pred: F,
    ) -> Message {
        self.wait_for_within(what, TIMEOUT, &mut pred).await
    }

    pub async fn wait_for_within<F: FnMut(&Message) -> bool>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: F,
    ) -> Message {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                WbEvent::Msg(m, _) => {
                    if pred(&m) {
                        return m;
                    }
                }
                WbEvent::Timeout => panic!("timed out after {timeout:?} waiting for {what}"),
                other => panic!("while waiting for {what}: {other:?}"),
            }
        }
    }

    /// Reads until the local doc satisfies `cond`.
    pub async fn wait_doc<F: FnMut(&WbClient) -> bool>(&mut self, what: &str, mut cond: F) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !cond(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                WbEvent::Msg(..) => {}
                WbEvent::Timeout => panic!("timed out waiting for document state: {what}"),
                other => panic!("while waiting for document state {what}: {other:?}"),
            }
        }
    }

    /// y-websocket client handshake: read the server's step 1 (must be the first message),
    /// answer with step 2, send our step 1, and wait for the server's step 2.
    pub async fn handshake(&mut self) {
        let first = self.next_msg().await;
        let sv = match first {
            Message::Sync(SyncMessage::SyncStep1(sv)) => sv,
            other => panic!("first message from the server must be sync step 1, got {other:?}"),
        };
        let diff = self.doc.transact().encode_diff_v1(&sv);
        self.send_msg(&Message::Sync(SyncMessage::SyncStep2(diff)))
            .await;
        let my_sv = self.doc.transact().state_vector();
        self.send_msg(&Message::Sync(SyncMessage::SyncStep1(my_sv)))
            .await;
        self.wait_for("sync step 2 from the server", |m| {
            matches!(m, Message::Sync(SyncMessage::SyncStep2(_)))
        })
        .await;
    }

    /// Sends step 1 and waits for the step 2 answer. Returns every message received
    /// before that answer (used to prove that something did NOT arrive).
    pub async fn barrier(&mut self) -> Vec<Message> {
        let start = self.received.len();
        let sv = self.doc.transact().state_vector();
        self.send_msg(&Message::Sync(SyncMessage::SyncStep1(sv)))
            .await;
        self.wait_for("sync step 2 (barrier)", |m| {
            matches!(m, Message::Sync(SyncMessage::SyncStep2(_)))
        })
        .await;
        let end = self.received.len() - 1;
        self.received[start..end].to_vec()
    }

    /// Reads until a close frame (Some(code)) or end of stream (None).
    pub async fn expect_close(&mut self, timeout: Duration) -> Option<u16> {
        if let Some(c) = self.closed {
            return c;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                WbEvent::Close(c, _) => return c,
                WbEvent::End(_) => return None,
                WbEvent::Timeout => {
                    panic!("whiteboard connection was not closed within {timeout:?}")
                }
                WbEvent::Msg(..) | WbEvent::Text(_) => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // drain until the server acknowledges
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

pub fn is_update(m: &Message) -> bool {
    matches!(
        m,
        Message::Sync(SyncMessage::Update(_)) | Message::Sync(SyncMessage::SyncStep2(_))
    )
}

pub fn short(b: &[u8]) -> String {
    if b.len() <= 64 {
        format!("{b:?}")
    } else {
        format!("{:?}... ({} bytes)", &b[..64], b.len())
    }
}

// ---------------------------------------------------------------------------------------------
// Tutor client
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub enum TutorEvent {
    Json(Value),
    Close(Option<u16>, String),
    End(String),
    Timeout,
}

pub struct TutorClient {
    pub ws: Ws,
    /// Every JSON message received so far.
    pub received: Vec<Value>,
    pub closed: Option<Option<u16>>,
}

impl TutorClient {
    pub fn new(ws: Ws) -> Self {
        TutorClient {
            ws,
            received: Vec::new(),
            closed: None,
        }
    }

    pub async fn send(&mut self, v: &Value) {
        self.ws
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .expect("send tutor message");
    }

    pub async fn send_raw_text(&mut self, s: &str) {
        self.ws
            .send(WsMessage::Text(s.into()))
            .await
            .expect("send text");
    }

    pub async fn try_send(&mut self, v: &Value) -> Result<(), tungstenite::Error> {
        self.ws.send(WsMessage::Text(v.to_string().into())).await
    }

    pub async fn next_event(&mut self, timeout: Duration) -> TutorEvent {
        if let Some(c) = self.closed {
            return TutorEvent::End(format!("already closed ({c:?})"));
        }
        match ws_next(&mut self.ws, timeout).await {
            WsEvent::Text(t) => {
                let v: Value = serde_json::from_str(&t)
                    .unwrap_or_else(|e| panic!("server sent non-JSON text {t:?}: {e}"));
                assert!(v.is_object(), "server sent a non-object JSON message: {t}");
                self.received.push(v.clone());
                TutorEvent::Json(v)
            }
            WsEvent::Binary(b) => panic!("tutor endpoint sent a binary frame: {}", short(&b)),
            WsEvent::Close(c, r) => {
                self.closed = Some(c);
                TutorEvent::Close(c, r)
            }
            WsEvent::End(e) => {
                self.closed = Some(None);
                TutorEvent::End(e)
            }
            WsEvent::Timeout => TutorEvent::Timeout,
        }
    }

    pub async fn next_json(&mut self) -> Value {
        match self.next_event(TIMEOUT).await {
            TutorEvent::Json(v) => v,
            other => panic!("expected a tutor message, got {other:?}"),
        }
    }

    pub async fn wait_for<F: FnMut(&Value) -> bool>(&mut self, what: &str, mut pred: F) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                TutorEvent::Json(v) => {
                    if pred(&v) {
                        return v;
                    }
                }
                TutorEvent::Timeout => panic!(
                    "timed out waiting for {what}; received so far: {:?}",
                    self.received
                ),
                other => panic!("while waiting for {what}: {other:?}"),
            }
        }
    }

    pub async fn wait_type(&mut self, ty: &str) -> Value {
        let t = ty.to_string();
        self.wait_for(&format!("a {ty:?} message"), move |v| {
            v["type"] == t.as_str()
        })
        .await
    }

    /// Sends a ping and waits for the pong; returns what arrived before the pong.
    pub async fn barrier(&mut self) -> Vec<Value> {
        let start = self.received.len();
        self.send(&json!({"type": "ping"})).await;
        self.wait_type("pong").await;
        let end = self.received.len() - 1;
        self.received[start..end].to_vec()
    }

    pub async fn expect_close(&mut self, timeout: Duration) -> Option<u16> {
        if let Some(c) = self.closed {
            return c;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                TutorEvent::Close(c, _) => return c,
                TutorEvent::End(_) => return None,
                TutorEvent::Timeout => panic!("tutor connection was not closed within {timeout:?}"),
                TutorEvent::Json(_) => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Checks `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` (RFC 3339 date-time).
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        r.clone()
            .all(|i| b.get(i).is_some_and(|c| c.is_ascii_digit()))
    };
    if b.len() < 20 {
        return false;
    }
    if !(digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10)) {
        return false;
    }
    if !(b[10] == b'T' || b[10] == b't' || b[10] == b' ') {
        return false;
    }
    if !(digits(11..13) && b[13] == b':' && digits(14..16) && b[16] == b':' && digits(17..19)) {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(|c| c.is_ascii_digit()) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z') | Some(b'z') => i + 1 == b.len(),
        Some(b'+') | Some(b'-') => {
            i + 6 == b.len() && digits(i + 1..i + 3) && b[i + 3] == b':' && digits(i + 4..i + 6)
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
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
            headers,
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
                    return HttpResponse {
                        status,
                        headers,
                        body: out,
                    };
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
    HttpResponse {
        status,
        headers,
        body,
    }
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

/// Retries `f` until it returns Some, with a timeout (condition wait, not a fixed sleep).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("condition not met within {timeout:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A unique session id per call (tests share nothing, but unique ids make logs readable).
pub fn session_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Asserts that a fresh client can connect, sync and exchange an update (server alive).
pub async fn assert_server_alive(server: &TestServer, session: &str) {
    let mut a = server.wb_user(session, "alive-a").await;
    let mut b = server.wb_user(session, "alive-b").await;
    let key = format!("alive-{}", now_s());
    a.map_set("alive", &key, "yes").await;
    b.wait_doc("alive key relayed", |c| {
        c.map_get("alive", &key).as_deref() == Some("yes")
    })
    .await;
    a.close().await;
    b.close().await;
}

// ---------------------------------------------------------------------------------------------
// Persistence, snapshot and CLI helpers (tests/persistence.rs, tests/cli.rs)
// ---------------------------------------------------------------------------------------------

/// An admin token covering every session (sid "*"), for `GET /api/v2/sessions`.
pub fn admin_token(sub: &str) -> String {
    mint(&json!({
        "sub": sub,
        "sid": "*",
        "role": "admin",
        "name": format!("Name of {sub}"),
        "exp": now_s() + 3600,
    }))
}

/// A Doc holding the content of a Yjs v1 update (panics if it does not decode or apply).
pub fn doc_from_update(update: &[u8]) -> Doc {
    let doc = Doc::new();
    let u = Update::decode_v1(update)
        .unwrap_or_else(|e| panic!("not a Yjs v1 update ({e}): {}", short(update)));
    doc.transact_mut()
        .apply_update(u)
        .unwrap_or_else(|e| panic!("update does not apply: {e}"));
    doc
}

/// `map.key` of a Doc as a string (None when absent).
pub fn doc_map_get(doc: &Doc, map: &str, key: &str) -> Option<String> {
    let m = doc.get_or_insert_map(map);
    let txn = doc.transact();
    m.get(&txn, key).map(|v| v.to_string(&txn))
}

/// Root text `name` of a Doc.
pub fn doc_text(doc: &Doc, name: &str) -> String {
    let t = doc.get_or_insert_text(name);
    let txn = doc.transact();
    t.get_string(&txn)
}

/// Sum of every sample of a Prometheus metric (`name` or `name{labels}`) in a /metrics text;
/// None when the metric has no sample.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let metric = line.split(['{', ' ']).next().unwrap_or_default();
        if metric != name {
            continue;
        }
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Resident set size of a process in KiB (VmRSS from /proc/PID/status).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl TestServer {
    /// Like [`TestServer::start_in`], returning the diagnostics instead of panicking.
    pub fn try_start_in(data_dir: &Path, config_toml: &str) -> Result<TestServer, String> {
        Self::try_start(
            config_toml,
            StartOpts {
                data_dir: Some(data_dir.to_path_buf()),
                ..Default::default()
            },
        )
    }

    /// An HTTP request with the token (if any) as `Authorization: Bearer`.
    pub async fn api(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> HttpResponse {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        if body.is_some() {
            headers.push(("Content-Type", "application/octet-stream"));
        }
        http_request(self.addr, method, path, &headers, body).await
    }

    /// Base URL for `--server`.
    pub fn http_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `sessions` from /api/v2/status (sessions loaded in memory).
    pub async fn loaded_sessions(&self) -> u64 {
        let r = self.http_get("/api/v2/status").await;
        assert_eq!(r.status, 200, "/api/v2/status: {}", r.text());
        let v = r.json();
        v["sessions"]
            .as_u64()
            .unwrap_or_else(|| panic!("/api/v2/status has no numeric sessions: {v}"))
    }

    /// Polls /api/v2/status until `sessions` == `n`.
    pub async fn wait_loaded_sessions(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.loaded_sessions().await;
            if now == n {
                return;
            }
            if Instant::now() >= deadline {
                panic!("/api/v2/status sessions did not reach {n} within {timeout:?} (last {now})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One Prometheus metric (summed over labels) from /metrics.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let r = self.http_get("/metrics").await;
        assert_eq!(r.status, 200, "/metrics");
        metric_sum(&r.text(), name)
    }

    /// `GET /api/v2/session/{s}/snapshots`: the listed versions (the whole JSON entries).
    pub async fn snapshot_list(&self, session: &str, token: &str) -> Vec<Value> {
        let r = self
            .api(
                "GET",
                &format!("/api/v2/session/{session}/snapshots"),
                Some(token),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "GET snapshots of {session}: {}", r.text());
        let v = r.json();
        v["versions"]
            .as_array()
            .unwrap_or_else(|| panic!("snapshot list without a versions array: {v}"))
            .clone()
    }

    /// Version numbers from the snapshot list, in the order listed.
    pub async fn snapshot_versions(&self, session: &str, token: &str) -> Vec<u64> {
        self.snapshot_list(session, token)
            .await
            .iter()
            .map(|e| {
                e["version"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("version is not a number: {e}"))
            })
            .collect()
    }

    /// `POST /api/v2/session/{s}/snapshots` → 201 {"version":N}; returns N.
    pub async fn take_snapshot(&self, session: &str, token: &str) -> u64 {
        let r = self
            .api(
                "POST",
                &format!("/api/v2/session/{session}/snapshots"),
                Some(token),
                Some(b""),
            )
            .await;
        assert_eq!(r.status, 201, "POST snapshots of {session}: {}", r.text());
        let v = r.json();
        v["version"]
            .as_u64()
            .unwrap_or_else(|| panic!("POST snapshots answered without a numeric version: {v}"))
    }

    /// `GET /api/v2/session/{s}/whiteboard` as a Doc.
    pub async fn whiteboard_doc(&self, session: &str, token: &str) -> Doc {
        let r = self
            .api(
                "GET",
                &format!("/api/v2/session/{session}/whiteboard"),
                Some(token),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "GET whiteboard of {session}: {}", r.text());
        doc_from_update(&r.body)
    }

    /// SIGTERM, then waits (up to 15 s) for exit status 0.
    pub async fn stop_graceful(&mut self) {
        self.sigterm();
        let st = self
            .wait_exit(Duration::from_secs(15))
            .await
            .expect("easel did not exit within 15 s of SIGTERM");
        assert!(st.success(), "exit status after SIGTERM: {st}");
    }
}

/// What a CLI run produced.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl CliOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).to_string()
    }
    pub fn success(&self) -> bool {
        self.status.success()
    }
    /// Panics with everything the command printed unless it exited 0.
    pub fn assert_ok(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what}: exit {}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout_text(),
            self.stderr
        );
        self
    }
}

/// How long one CLI invocation may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `easel ARGS...` (EASEL_JWT_SECRET set, no EASEL_DATA_DIR etc. from the outside),
/// in a scratch working directory, with a timeout; blocking.
pub fn run_cli_blocking(args: &[String]) -> CliOutput {
    let cwd = tempfile::Builder::new()
        .prefix("easel-cli-")
        .tempdir()
        .expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(args)
        .current_dir(cwd.path())
        .env_remove("EASEL_LISTEN")
        .env_remove("EASEL_DATA_DIR")
        .env_remove("EASEL_JWT_SECRET_FILE")
        .env_remove("EASEL_JWT_PUBLIC_KEY_FILE")
        .env_remove("EASEL_LOG_FORMAT")
        .env("EASEL_JWT_SECRET", SECRET)
        .env("EASEL_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn easel CLI");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`easel {}` did not finish within {CLI_TIMEOUT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_t.join().unwrap();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).to_string();
    CliOutput {
        status,
        stdout,
        stderr,
    }
}

/// Async wrapper of [`run_cli_blocking`] (runs on a blocking thread).
pub async fn run_cli<S: AsRef<str>>(args: &[S]) -> CliOutput {
    let args: Vec<String> = args.iter().map(|s| s.as_ref().to_string()).collect();
    tokio::task::spawn_blocking(move || run_cli_blocking(&args))
        .await
        .expect("CLI thread")
}
