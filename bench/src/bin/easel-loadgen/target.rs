//! The server under test: a process this tool starts (easel with a secret and a temporary
//! data directory, or the baseline), or one already running at a URL.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::stats::{proc_sample, ProcSample};

/// What kind of server is on the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Easel,
    Baseline,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Easel => "easel",
            Kind::Baseline => "baseline",
        }
    }
}

pub struct Target {
    pub kind: Kind,
    /// `ws://127.0.0.1:PORT`
    pub base: String,
    /// For minting tokens (easel only).
    pub secret: String,
    pub pid: Option<u32>,
    child: Option<Child>,
    dir: Option<PathBuf>,
}

impl Target {
    /// Starts `bin` and waits (at most 20 s) for its "listening on 127.0.0.1:PORT" line.
    pub fn start(kind: Kind, bin: &Path, server_config: Option<&str>) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "easel-loadgen-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let secret = format!(
            "easel-loadgen-secret-of-32-bytes-or-more-{}",
            std::process::id()
        );
        let stderr = std::fs::File::create(dir.join("server.stderr"))?;
        let mut cmd = Command::new(bin);
        match kind {
            Kind::Easel => {
                cmd.arg("serve")
                    .arg("--listen")
                    .arg("127.0.0.1:0")
                    .arg("--data-dir")
                    .arg(dir.join("data"))
                    .env("EASEL_JWT_SECRET", &secret)
                    .env(
                        "EASEL_LOG",
                        std::env::var("EASEL_LOG").unwrap_or("warn".into()),
                    );
                if let Some(toml) = server_config {
                    let path = dir.join("easel.toml");
                    std::fs::write(&path, toml)?;
                    cmd.arg("--config").arg(path);
                }
            }
            Kind::Baseline => {
                cmd.arg("127.0.0.1:0");
            }
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        // Reads the port, then keeps draining stdout so the server never blocks on it.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line
                    .strip_prefix("easel listening on ")
                    .or_else(|| line.strip_prefix("baseline listening on "))
                {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
            }
        });
        let mut target = Self {
            kind,
            base: String::new(),
            secret,
            pid: Some(child.id()),
            child: Some(child),
            dir: Some(dir),
        };
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let log = target.stderr_tail();
                target.stop();
                bail!(
                    "{} did not print its listening line within 20 s\n{log}",
                    bin.display()
                );
            }
        };
        if !addr.starts_with("127.0.0.1:") {
            target.stop();
            bail!("server listens on {addr}, not on 127.0.0.1");
        }
        target.base = format!("ws://{addr}");
        Ok(target)
    }

    /// A server already running (on the loopback only).
    pub fn external(
        kind: Kind,
        url: &str,
        secret: String,
        pid: Option<u32>,
    ) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_string();
        let host = base
            .strip_prefix("ws://")
            .context("--url must start with ws://")?;
        if !(host.starts_with("127.0.0.1:")
            || host.starts_with("localhost:")
            || host.starts_with("[::1]:"))
        {
            bail!("--url must be a loopback address (127.0.0.1, localhost, [::1])");
        }
        Ok(Self {
            kind,
            base,
            secret,
            pid,
            child: None,
            dir: None,
        })
    }

    pub fn sample(&self) -> Option<ProcSample> {
        proc_sample(self.pid?)
    }

    /// Whether a process we started is still alive.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    pub fn stderr_tail(&self) -> String {
        let Some(dir) = &self.dir else {
            return String::new();
        };
        let text = std::fs::read_to_string(dir.join("server.stderr")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(20);
        lines[from..].join("\n")
    }

    /// SIGTERM, then SIGKILL after 15 s; removes the temporary directory.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}
