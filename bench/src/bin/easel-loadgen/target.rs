//! The server under test: a process this tool starts (easel with a secret and a temporary
//! data directory, the baseline, or the trivial join server with its answer), several easel nodes on one Redis (cluster mode, SPEC
//! 9: the Redis too is started here unless `--redis-url` names one), or servers already
//! running at URLs. Clients are spread over the nodes round-robin.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;

use crate::stats::{proc_sample, ProcSample};
/// What kind of server is on the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Easel,
    Baseline,
    /// `trivial-join`: one cached answer to every connection (join storm only).
    Trivial,
}

impl Kind {
    /// Also how the server's listening line starts: "NAME listening on ADDR".
    pub fn name(self) -> &'static str {
        match self {
            Kind::Easel => "easel",
            Kind::Baseline => "baseline",
            Kind::Trivial => "trivial",
        }
    }
}

pub struct Target {
    pub kind: Kind,
    /// `ws://127.0.0.1:PORT` of every node.
    pub bases: Vec<String>,
    /// For minting tokens (easel only).
    pub secret: String,
    /// The nodes' PIDs (CPU and memory are summed over them).
    pids: Vec<u32>,
    /// The Redis of a cluster, for its CPU time.
    redis_pid: Option<u32>,
    /// Processes this tool started (nodes, then Redis); stopped in that order.
    children: Vec<Child>,
    dir: Option<PathBuf>,
    /// The sync step 2 update every joiner gets, when known in advance (the trivial
    /// server's answer): the join storm then seeds nothing and checks against it.
    pub answer: Option<Bytes>,
}

/// Where a cluster's Redis comes from.
pub enum RedisChoice {
    /// Start `redis-server` on a free loopback port with this `appendfsync` (everysec,
    /// always, no) and an append-only file in the run's directory.
    Start { fsync: String },
    /// One already running (loopback only), with its PID if known.
    Url { url: String, pid: Option<u32> },
}

/// A fresh directory for one run's data, logs and config.
fn run_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "easel-loadgen-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Spawns `cmd` with stderr to `stderr_file`, and waits (at most 20 s) for its
/// "KIND listening on 127.0.0.1:PORT" line; keeps draining stdout afterwards.
fn spawn_listening(
    mut cmd: Command,
    kind: Kind,
    stderr_file: &Path,
) -> anyhow::Result<(Child, String)> {
    let stderr = std::fs::File::create(stderr_file)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let prefix = format!("{} listening on ", kind.name());
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix(prefix.as_str()) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(addr) if addr.starts_with("127.0.0.1:") => addr,
        Ok(addr) => {
            stop_child(child);
            bail!("server listens on {addr}, not on 127.0.0.1");
        }
        Err(_) => {
            stop_child(child);
            bail!(
                "{:?} did not print its listening line within 20 s\n{}",
                cmd.get_program(),
                tail(stderr_file)
            );
        }
    };
    Ok((child, format!("ws://{addr}")))
}

/// The command that starts one easel node in `dir`.
fn easel_command(
    bin: &Path,
    dir: &Path,
    secret: &str,
    config: Option<&Path>,
) -> anyhow::Result<Command> {
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("EASEL_JWT_SECRET", secret)
        .env(
            "EASEL_LOG",
            std::env::var("EASEL_LOG").unwrap_or("warn".into()),
        );
    if let Some(path) = config {
        cmd.arg("--config").arg(path);
    }
    Ok(cmd)
}

/// `redis-server` from PATH, else Debian's.
fn redis_server_bin() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("redis-server"))
                .find(|bin| bin.is_file())
        })
        .unwrap_or_else(|| PathBuf::from("/usr/bin/redis-server"))
}

/// Whether a Redis on `port` answers `PING`.
fn redis_answers(port: u16) -> bool {
    let Ok(addr) = format!("127.0.0.1:{port}").parse() else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    matches!(stream.read(&mut reply), Ok(n) if reply[..n].starts_with(b"+PONG"))
}

/// Starts `redis-server` on a free loopback port in `dir`; waits (10 s) for `PING`.
fn start_redis(dir: &Path, fsync: &str) -> anyhow::Result<(Child, String)> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let redis_dir = dir.join("redis");
    std::fs::create_dir_all(&redis_dir)?;
    let mut child = Command::new(redis_server_bin())
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "yes", "--appendfsync", fsync])
        .arg("--dir")
        .arg(&redis_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server (apt-get install redis-server)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("redis-server exited at start ({status})");
        }
        if redis_answers(port) {
            return Ok((child, format!("redis://127.0.0.1:{port}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop_child(child);
    bail!("redis-server did not answer PING within 10 s")
}

/// The last 20 lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// SIGTERM, then SIGKILL after 15 s.
fn stop_child(mut child: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}

fn secret() -> String {
    format!(
        "easel-loadgen-secret-of-32-bytes-or-more-{}",
        std::process::id()
    )
}

impl Target {
    /// Starts `bin` (one easel on sled, or the baseline; the trivial server has
    /// [`Target::start_trivial`]).
    /// With `cpus`, the server runs on those CPUs only (see pin.rs).
    pub fn start(
        kind: Kind,
        bin: &Path,
        server_config: Option<&str>,
        cpus: Option<&[usize]>,
    ) -> anyhow::Result<Self> {
        let dir = run_dir()?;
        let secret = secret();
        let mut cmd = match kind {
            Kind::Easel => {
                let config = write_config(&dir, server_config)?;
                easel_command(bin, &dir, &secret, config.as_deref())?
            }
            Kind::Baseline => {
                let mut cmd = Command::new(bin);
                cmd.arg("127.0.0.1:0");
                cmd
            }
            Kind::Trivial => {
                let _ = std::fs::remove_dir_all(&dir);
                bail!("the trivial server needs its answer (Target::start_trivial)");
            }
        };
        if let Some(cpus) = cpus {
            easel_bench::pin::pin_child(&mut cmd, cpus);
        }
        Self::start_one(kind, cmd, dir, secret)
    }

    /// Starts `trivial-join` answering every connection with `message` (the whole sync
    /// step 2 message; `step2` is the update inside it), written to a file in the run's
    /// directory; with permessage-deflate if `deflate`.
    pub fn start_trivial(
        bin: &Path,
        message: &[u8],
        step2: Bytes,
        deflate: bool,
    ) -> anyhow::Result<Self> {
        let dir = run_dir()?;
        let answer = dir.join("answer.bin");
        std::fs::write(&answer, message)
            .with_context(|| format!("writing {}", answer.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", "127.0.0.1:0", "--answer"])
            .arg(&answer);
        if !deflate {
            cmd.arg("--no-deflate");
        }
        let mut target = Self::start_one(Kind::Trivial, cmd, dir, secret())?;
        target.answer = Some(step2);
        Ok(target)
    }

    /// Runs `cmd`, one server in `dir`, and waits for its listening line.
    fn start_one(kind: Kind, cmd: Command, dir: PathBuf, secret: String) -> anyhow::Result<Self> {
        let mut target = Self {
            kind,
            bases: Vec::new(),
            secret,
            pids: Vec::new(),
            redis_pid: None,
            children: Vec::new(),
            dir: Some(dir.clone()),
            answer: None,
        };
        let (child, base) = spawn_listening(cmd, kind, &dir.join("server.stderr"))?;
        target.add_node(child, base);
        Ok(target)
    }

    /// Starts `nodes` easel nodes in cluster mode on one Redis (started here, or the one
    /// at a URL), each with its own node id and data directory.
    pub fn start_cluster(
        bin: &Path,
        server_config: Option<&str>,
        nodes: u32,
        redis: &RedisChoice,
    ) -> anyhow::Result<Self> {
        let dir = run_dir()?;
        let mut target = Self {
            kind: Kind::Easel,
            bases: Vec::new(),
            secret: secret(),
            pids: Vec::new(),
            redis_pid: None,
            children: Vec::new(),
            dir: Some(dir.clone()),
            answer: None,
        };
        let (redis_url, redis_child) = match redis {
            RedisChoice::Start { fsync } => {
                let (child, url) = start_redis(&dir, fsync)?;
                target.redis_pid = Some(child.id());
                (url, Some(child))
            }
            RedisChoice::Url { url, pid } => {
                if !url.starts_with("redis://127.0.0.1:") && !url.starts_with("redis://localhost:")
                {
                    bail!("--redis-url must be a loopback redis:// URL");
                }
                target.redis_pid = *pid;
                (url.clone(), None)
            }
        };
        let config = write_config(&dir, server_config)?;
        for n in 0..nodes {
            let node_dir = dir.join(format!("node{n}"));
            std::fs::create_dir_all(&node_dir)?;
            let mut cmd = easel_command(bin, &node_dir, &target.secret, config.as_deref())?;
            cmd.arg("--redis")
                .arg(&redis_url)
                .env("EASEL_NODE_ID", format!("lg-node{n}"));
            match spawn_listening(cmd, Kind::Easel, &dir.join(format!("node{n}.stderr"))) {
                Ok((child, base)) => target.add_node(child, base),
                Err(e) => {
                    target.children.extend(redis_child);
                    return Err(e);
                }
            }
        }
        // Last, so that `stop` ends the nodes before their Redis.
        target.children.extend(redis_child);
        Ok(target)
    }

    fn add_node(&mut self, child: Child, base: String) {
        self.pids.push(child.id());
        self.children.push(child);
        self.bases.push(base);
    }

    /// The node client number `n` (counted over the whole run) talks to.
    pub fn base_for(&self, n: u64) -> &str {
        let nodes = self.bases.len().max(1) as u64;
        self.bases
            .get((n % nodes) as usize)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// Servers already running (on the loopback only): one URL, or several nodes of a
    /// cluster, comma-separated.
    pub fn external(
        kind: Kind,
        urls: &str,
        secret: String,
        pids: Vec<u32>,
        redis_pid: Option<u32>,
    ) -> anyhow::Result<Self> {
        let mut bases = Vec::new();
        for url in urls.split(',') {
            let base = url.trim().trim_end_matches('/').to_string();
            let host = base
                .strip_prefix("ws://")
                .context("every URL must start with ws://")?;
            if !(host.starts_with("127.0.0.1:")
                || host.starts_with("localhost:")
                || host.starts_with("[::1]:"))
            {
                bail!("only loopback addresses (127.0.0.1, localhost, [::1]): {base}");
            }
            bases.push(base);
        }
        Ok(Self {
            kind,
            bases,
            secret,
            pids,
            redis_pid,
            children: Vec::new(),
            dir: None,
            answer: None,
        })
    }

    /// CPU time and memory of the nodes, summed (None unless every node can be read).
    pub fn sample(&self) -> Option<ProcSample> {
        if self.pids.is_empty() {
            return None;
        }
        let mut sum = ProcSample {
            cpu_s: 0.0,
            rss_kib: 0,
            hwm_kib: 0,
        };
        for pid in &self.pids {
            let s = proc_sample(*pid)?;
            sum.cpu_s += s.cpu_s;
            sum.rss_kib += s.rss_kib;
            sum.hwm_kib += s.hwm_kib;
        }
        Some(sum)
    }

    /// Restarts the nodes' peak-RSS count (VmHWM) from their current RSS (proc(5),
    /// `clear_refs` 5), so that a later [`Target::sample`] gives the peak of what happened
    /// since. False if any node's could not be reset (then the peak is the process's).
    pub fn reset_peak(&self) -> bool {
        !self.pids.is_empty()
            && self
                .pids
                .iter()
                .all(|pid| std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
    }

    /// The cluster's Redis, when its PID is known.
    pub fn redis_sample(&self) -> Option<ProcSample> {
        proc_sample(self.redis_pid?)
    }

    /// How many nodes the clients are spread over.
    pub fn nodes(&self) -> usize {
        self.bases.len()
    }

    /// Whether every process we started is still alive.
    pub fn alive(&mut self) -> bool {
        self.children
            .iter_mut()
            .all(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last lines of every log we keep.
    pub fn stderr_tail(&self) -> String {
        let Some(dir) = &self.dir else {
            return String::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return String::new();
        };
        let mut logs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "stderr"))
            .collect();
        logs.sort();
        logs.iter()
            .map(|p| tail(p))
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops the nodes, then Redis; removes the temporary directory.
    pub fn stop(&mut self) {
        for child in self.children.drain(..) {
            stop_child(child);
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Writes the preset's config into the run directory.
fn write_config(dir: &Path, toml: Option<&str>) -> anyhow::Result<Option<PathBuf>> {
    let Some(toml) = toml else {
        return Ok(None);
    };
    let path = dir.join("easel.toml");
    std::fs::write(&path, toml)?;
    Ok(Some(path))
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}
