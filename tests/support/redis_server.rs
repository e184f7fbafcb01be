//! A real `redis-server` for the cluster-mode tests: started on a free loopback port with
//! `--save '' --appendonly yes --appendfsync always --dir <tmp>` (nothing acknowledged is
//! lost across a crash), waited on with `PING`, killed by PID on drop, and stoppable and
//! restartable on the same port and directory (the outage tests); or speaking TLS only
//! ([`RedisServer::start_tls`], certificates made with `openssl`). Never the system service.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started Redis may take to answer `PING`.
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// TLS only (`rediss://`): its certificate and key, and the CA that signed them, are in
    /// `dir` ([`make_certificates`]).
    tls: bool,
    /// TLS, and a client must show a certificate the CA signed (`tls-auth-clients yes`):
    /// [`RedisServer::client_certificate`].
    client_auth: bool,
}

/// `redis-server` from PATH, else Debian's `/usr/bin/redis-server`.
fn redis_server_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|bin| bin.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from("/usr/bin/redis-server"))
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

fn spawn(port: u16, dir: &Path, tls: bool, client_auth: bool) -> Child {
    let mut cmd = Command::new(redis_server_bin());
    if tls {
        let port = port.to_string();
        cmd.args(["--port", "0", "--tls-port", &port])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients"])
            .arg(if client_auth { "yes" } else { "no" })
            .arg("--logfile")
            .arg(dir.join(LOG_FILE))
            .current_dir(dir);
    } else {
        cmd.arg("--port").arg(port.to_string());
    }
    cmd.arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("yes")
        .arg("--appendfsync")
        .arg("always")
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (install it: apt-get install redis-server)",
                redis_server_bin().display()
            )
        })
}

/// A TLS Redis's log (no plain `PING` on a TLS port: its log says when it listens).
const LOG_FILE: &str = "redis.log";

/// A CA and a certificate for 127.0.0.1 signed by it, in `dir` (`ca.crt`, `server.crt`,
/// `server.key`), made with the `openssl` command.
fn make_certificates(dir: &Path) {
    let openssl = |args: &str| {
        let out = Command::new("openssl")
            .args(args.split(' '))
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run openssl: {e} (install it: apt-get install openssl)")
            });
        assert!(
            out.status.success(),
            "openssl {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=easel-test-CA");
    openssl("req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1");
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write ext.cnf");
    openssl("x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext.cnf");
    // A client's, for a Redis that asks for one.
    openssl("req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=easel-node");
    std::fs::write(
        dir.join("client.cnf"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .expect("write client.cnf");
    openssl("x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 2 -extfile client.cnf");
}

/// Whether a Redis on `port` answers `PING` with `+PONG`.
fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().expect("addr"),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    matches!(stream.read(&mut reply), Ok(n) if reply[..n].starts_with(b"+PONG"))
}

impl RedisServer {
    /// Starts a fresh Redis in a new temporary directory.
    pub fn start() -> RedisServer {
        Self::start_with(false, false)
    }

    /// Starts a fresh Redis that speaks TLS only, with a certificate for 127.0.0.1 signed by
    /// a CA of its own; a client trusts it through [`RedisServer::ca_file`] (easel:
    /// `SSL_CERT_FILE`).
    pub fn start_tls() -> RedisServer {
        Self::start_with(true, false)
    }

    /// [`RedisServer::start_tls`], and a client must show a certificate signed by the same
    /// CA ([`RedisServer::client_certificate`]).
    pub fn start_tls_client_auth() -> RedisServer {
        Self::start_with(true, true)
    }

    fn start_with(tls: bool, client_auth: bool) -> RedisServer {
        // Another test may take the port between our probe and Redis's bind: try again.
        for _ in 0..5 {
            let mut server = RedisServer {
                child: None,
                port: free_port(),
                dir: tempfile::Builder::new()
                    .prefix("easel-redis-")
                    .tempdir()
                    .expect("tempdir"),
                tls,
                client_auth,
            };
            if tls {
                make_certificates(server.dir.path());
            }
            if server.try_run() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://` for a TLS Redis.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// A TLS Redis's client certificate and its key (PEM files), signed by its CA.
    pub fn client_certificate(&self) -> Option<(PathBuf, PathBuf)> {
        let dir = self.dir.path();
        self.tls
            .then(|| (dir.join("client.crt"), dir.join("client.key")))
    }

    /// A TLS Redis's CA certificate, which a client must trust.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.then(|| self.dir.path().join("ca.crt"))
    }

    /// Whether it accepts connections: a `PING`, or for a TLS Redis its log.
    fn is_ready(&self) -> bool {
        if self.tls {
            std::fs::read_to_string(self.dir.path().join(LOG_FILE))
                .is_ok_and(|log| log.contains("Ready to accept connections"))
        } else {
            answers_ping(self.port)
        }
    }

    /// Runs redis-server on this port and directory until it answers `PING`; false when
    /// it exits first (the port was taken) or never answers.
    fn try_run(&mut self) -> bool {
        if self.tls {
            // A restart must not find the last run's "ready" line.
            let _ = std::fs::remove_file(self.dir.path().join(LOG_FILE));
        }
        let mut child = spawn(self.port, self.dir.path(), self.tls, self.client_auth);
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if self.is_ready() {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Kills it (SIGKILL, as a crash): what it acknowledged is in its append-only file.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it and starts it again with nothing it had written: what a crash under
    /// `appendfsync everysec` does to its last second, for all of it.
    pub fn restart_empty(&mut self) {
        self.stop();
        let dir = self.dir.path();
        let _ = std::fs::remove_dir_all(dir.join("appendonlydir"));
        let _ = std::fs::remove_file(dir.join("dump.rdb"));
        self.restart();
    }

    /// Starts it again on the same port and directory (it reloads its append-only file).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        while !self.try_run() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of `shards` primaries (no replicas) on loopback, each a real
/// `redis-server --cluster-enabled yes` in its own temporary directory, joined with
/// `redis-cli --cluster create`; killed by PID on drop.
pub struct RedisClusterServer {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    _dirs: Vec<tempfile::TempDir>,
    /// TLS only, clients and the cluster bus alike, with client certificates asked for:
    /// the certificates of [`make_certificates`], shared by every node, are here.
    tls: Option<tempfile::TempDir>,
}

/// A port that is free, and whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + (rand_u16() % 20_000);
        let both = TcpListener::bind(("127.0.0.1", port))
            .and_then(|a| TcpListener::bind(("127.0.0.1", port + 10_000)).map(|b| (a, b)));
        if both.is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a Redis Cluster node");
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u16
}

impl RedisClusterServer {
    pub fn start(shards: usize) -> RedisClusterServer {
        Self::start_with(shards, false)
    }

    /// [`RedisClusterServer::start`] speaking TLS only, on the bus too, and asking clients
    /// for a certificate: [`RedisClusterServer::ca_file`],
    /// [`RedisClusterServer::client_certificate`].
    pub fn start_tls(shards: usize) -> RedisClusterServer {
        Self::start_with(shards, true)
    }

    fn start_with(shards: usize, tls: bool) -> RedisClusterServer {
        let mut cluster = RedisClusterServer {
            children: Vec::new(),
            ports: Vec::new(),
            _dirs: Vec::new(),
            tls: tls.then(|| {
                let certs = tempfile::Builder::new()
                    .prefix("easel-redis-cluster-tls-")
                    .tempdir()
                    .expect("tempdir");
                make_certificates(certs.path());
                certs
            }),
        };
        for _ in 0..shards {
            let dir = tempfile::Builder::new()
                .prefix("easel-redis-cluster-")
                .tempdir()
                .expect("tempdir");
            let port = free_cluster_port();
            let mut cmd = Command::new(redis_server_bin());
            match &cluster.tls {
                Some(certs) => {
                    let file = |name: &str| certs.path().join(name).display().to_string();
                    cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                        .args(["--tls-cluster", "yes", "--tls-auth-clients", "yes"])
                        .args(["--tls-cert-file", &file("server.crt")])
                        .args(["--tls-key-file", &file("server.key")])
                        .args(["--tls-ca-cert-file", &file("ca.crt")])
                        // The bus connects as a client: it shows the server's certificate.
                        .args(["--tls-client-cert-file", &file("server.crt")])
                        .args(["--tls-client-key-file", &file("server.key")])
                }
                None => cmd.args(["--port", &port.to_string()]),
            };
            let child = cmd
                .args(["--bind", "127.0.0.1"])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--cluster-node-timeout", "5000"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server --cluster-enabled");
            cluster.children.push(child);
            cluster.ports.push(port);
            cluster._dirs.push(dir);
        }
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        for &port in &cluster.ports {
            while !cluster.answers_ping(port) {
                assert!(
                    Instant::now() < deadline,
                    "cluster node {port} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let out = cluster
            .cli()
            .arg("--cluster")
            .arg("create")
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Every node must see every slot assigned before commands route reliably.
        let deadline = Instant::now() + Duration::from_secs(20);
        for &port in &cluster.ports {
            loop {
                let info = cluster
                    .cli()
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster not ok on {port}: {info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// `redis://127.0.0.1:<port>` (`rediss://` over TLS) of every node.
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.ports
            .iter()
            .map(|p| format!("{scheme}://127.0.0.1:{p}"))
            .collect()
    }

    /// Over TLS: the CA certificate that signed the nodes' certificates.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|certs| certs.path().join("ca.crt"))
    }

    /// Over TLS: a client certificate and its key (PEM files) the nodes accept.
    pub fn client_certificate(&self) -> Option<(PathBuf, PathBuf)> {
        self.tls.as_ref().map(|certs| {
            let dir = certs.path();
            (dir.join("client.crt"), dir.join("client.key"))
        })
    }

    /// `redis-cli`, speaking TLS with the client certificate when the cluster does.
    fn cli(&self) -> Command {
        let mut cli = Command::new(redis_server_bin().with_file_name("redis-cli"));
        if let Some(certs) = &self.tls {
            let dir = certs.path();
            cli.arg("--tls")
                .arg("--cacert")
                .arg(dir.join("ca.crt"))
                .arg("--cert")
                .arg(dir.join("client.crt"))
                .arg("--key")
                .arg(dir.join("client.key"));
        }
        cli.stdin(Stdio::null());
        cli
    }

    /// Whether the node on `port` answers `PING`.
    fn answers_ping(&self, port: u16) -> bool {
        if self.tls.is_none() {
            return answers_ping(port);
        }
        self.cli()
            .args(["-p", &port.to_string(), "ping"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
    }
}

impl Drop for RedisClusterServer {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
