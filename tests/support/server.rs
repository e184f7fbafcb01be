//! Starting and stopping the real `easel serve` binary (`TestServer`), its HTTP API as the
//! tests use it (snapshots, loaded sessions, metrics), and what is read from the process
//! (stderr, resident memory). It must not know any protocol beyond calling the clients.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::doc::doc_from_update;
use super::http::{http_request, HttpResponse};
use super::token::token;
use super::tutor::TutorClient;
use super::wb::WbClient;
use super::ws::{describe_ws_err, ws_connect, TokenVia};

use serde_json::Value;
use yrs::Doc;

/// The HS256 secret every test server is started with (EASEL_JWT_SECRET).
pub const SECRET: &str = "easel-integration-test-secret-0123456789";
/// Default timeout for every wait in the tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// How long we wait for the `easel listening on` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

pub struct TestServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    stderr: Arc<Mutex<String>>,
    _tmp: Option<tempfile::TempDir>,
}

/// The `easel` binary with a clean environment (none of the EASEL_* settings of the shell
/// running the tests), the test secret, log level `log`, stdin closed and stdout and stderr
/// piped.
pub fn easel_command(log: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_easel"));
    cmd.env_remove("EASEL_LISTEN")
        .env_remove("EASEL_DATA_DIR")
        .env_remove("EASEL_JWT_SECRET_FILE")
        .env_remove("EASEL_JWT_PUBLIC_KEY_FILE")
        .env_remove("EASEL_LOG_FORMAT")
        .env("EASEL_JWT_SECRET", SECRET)
        .env("EASEL_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
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

        let mut cmd = easel_command("info");
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--config")
            .arg(&config_path)
            .args(&opts.args);
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
            stderr: stderr_buf,
            _tmp: Some(tmp),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
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

/// The value of one sample of a /metrics text, named exactly as written there
/// (`name{label="value",...}`); None when absent.
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.trim().parse().ok())?
    })
}

/// Resident set size of a process in KiB (VmRSS from /proc/PID/status).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// Peak resident set size of a process in KiB (VmHWM from /proc/PID/status); panics when
/// the process has no status (it died, which the caller's test is about to report anyway).
pub fn vm_hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:").unwrap_or_else(|| panic!("VmHWM of process {pid}"))
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
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
        self.api_typed(method, path, token, body, "application/octet-stream")
            .await
    }

    /// [`TestServer::api`] with a JSON body (if any) and a token.
    pub async fn api_json(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> HttpResponse {
        let body = body.map(|b| b.to_string());
        let body = body.as_deref().map(str::as_bytes);
        self.api_typed(method, path, Some(token), body, "application/json")
            .await
    }

    async fn api_typed(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
        content_type: &str,
    ) -> HttpResponse {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        if body.is_some() {
            headers.push(("Content-Type", content_type));
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
