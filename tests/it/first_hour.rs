//! A newcomer's first hour with easel: development mode that survives restarts, CLI
//! errors a person can act on, and logs that read well in a file.
//!
//! Real binary throughout. The development-mode servers here run WITHOUT a JWT secret
//! (unlike `TestServer`, which always sets one), so this file has its own small launcher.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

/// A `serve` started with no secret configured, its output collected.
struct DevServer {
    child: Child,
    base: String,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl DevServer {
    /// Starts `easel serve` on `data_dir` without a secret; Err(all output) when it exits
    /// before printing its `easel listening on` line.
    fn try_start(data_dir: &Path) -> Result<DevServer, String> {
        let mut child = easel_command("info")
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env_remove("EASEL_JWT_SECRET")
            .spawn()
            .expect("spawn easel serve");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let buf = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut b = buf.lock().unwrap();
                b.push_str(&line);
                b.push('\n');
            }
        });
        let buf = stderr.clone();
        std::thread::spawn(move || {
            // Bytes, not lines: the test looks for escape bytes.
            let mut err = err;
            let mut chunk = [0u8; 4096];
            while let Ok(n) = err.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let out = stdout.lock().unwrap().clone();
            if let Some(addr) = out
                .lines()
                .find_map(|l| l.strip_prefix("easel listening on "))
            {
                return Ok(DevServer {
                    base: format!("http://{}", addr.trim()),
                    child,
                    stdout,
                    stderr,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Let the reader threads catch the last bytes.
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!(
                    "exit {status}\nstdout:\n{}\nstderr:\n{}",
                    stdout.lock().unwrap(),
                    stderr.lock().unwrap()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "easel did not listen within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start(data_dir: &Path) -> DevServer {
        Self::try_start(data_dir).unwrap_or_else(|e| panic!("easel did not start: {e}"))
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGTERM, then waits (bounded) for a clean exit; returns everything it logged.
    fn stop(mut self) -> String {
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "no exit within 15 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "exit after SIGTERM: {status}");
        // The pipe closes with the process; give the reader a moment to drain it.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.stderr().contains("shutdown complete") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stderr()
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `easel ARGS` with NO secret in the environment (development mode).
fn cli_dev(args: &[&str], cwd: &Path) -> CliOutput {
    let out = easel_command("warn")
        .args(args)
        .current_dir(cwd)
        .env_remove("EASEL_JWT_SECRET")
        .output()
        .expect("run easel");
    CliOutput {
        status: out.status,
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The token of the `demo (ROLE)` link in a start-up log.
fn demo_token(log: &str, role: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.contains(&format!("demo ({role}):")))
        .unwrap_or_else(|| panic!("no demo ({role}) link in:\n{log}"));
    line.split("token=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("no token in {line:?}"))
        .to_owned()
}

#[test]
fn development_secret_survives_a_restart_and_easel_token_uses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data_s = data.to_str().unwrap();

    let server = DevServer::start(&data);
    let log = server.stderr();
    let student = demo_token(&log, "student");
    // The log says where the secret is, that it is for development, and how to get an admin.
    let secret_file = data.join("dev-secret");
    assert!(
        log.contains(&secret_file.display().to_string()) && log.contains("development only"),
        "the start-up log must name the secret file and say it is for development:\n{log}"
    );
    assert!(
        log.contains("easel token") && log.contains("--role admin"),
        "{log}"
    );
    // The secret: 32 random bytes (64 hex digits), readable by its owner only.
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&secret_file).expect("dev-secret kept in the data dir");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&secret_file).unwrap();
        assert_eq!(text.trim().len(), 64, "{text:?}");
    }
    // One command for an admin token, with no secret configured.
    let admin = cli_dev(
        &[
            "token",
            "--data-dir",
            data_s,
            "--sub",
            "me",
            "--session",
            "*",
            "--role",
            "admin",
        ],
        tmp.path(),
    );
    admin.assert_ok("easel token --data-dir");
    let admin = admin.stdout_text().trim().to_owned();
    // Something to save: an update imported through the server.
    let file = tmp.path().join("note.bin");
    std::fs::write(&file, map_set_update(7, "m", "kept", "yes")).unwrap();
    cli_dev(
        &[
            "snapshot",
            "import",
            "demo",
            file.to_str().unwrap(),
            "--server",
            &server.base,
            "--token",
            &admin,
        ],
        tmp.path(),
    )
    .assert_ok("import through the server with the minted admin token");
    let log = server.stop();
    // Shutdown says what it saved.
    let saved = log
        .lines()
        .find(|l| l.contains("final save"))
        .unwrap_or_else(|| panic!("no final-save line at shutdown:\n{log}"));
    assert!(saved.contains("demo v"), "{saved}");
    // "listening" once, no escape bytes in a piped log.
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a piped log:\n{log:?}"
    );
    assert!(
        !log.contains("listening"),
        "the listening line belongs to stdout only:\n{log}"
    );

    // Restart: the old demo link and the minted admin token still work.
    let server = DevServer::start(&data);
    assert_eq!(
        server
            .stdout
            .lock()
            .unwrap()
            .matches("easel listening on")
            .count(),
        1
    );
    let out = cli_dev(
        &[
            "snapshot",
            "inspect",
            "demo",
            "--server",
            &server.base,
            "--token",
            &student,
        ],
        tmp.path(),
    );
    out.assert_ok("GET the whiteboard with the demo link's token after a restart");
    assert!(out.stdout_text().contains("kept"), "{}", out.stdout_text());
    let out = cli_dev(
        &["sessions", "--server", &server.base, "--token", &admin],
        tmp.path(),
    );
    out.assert_ok("sessions with the minted admin token after a restart");
    assert!(out.stdout_text().contains("demo"));
    drop(server);
}

#[test]
fn serve_on_a_held_directory_prints_no_link_and_names_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let first = DevServer::start(&data);
    let second = DevServer::try_start(&data)
        .err()
        .expect("a second serve on a held directory must fail");
    assert!(
        !second.contains("token="),
        "links printed before the lock error:\n{second}"
    );
    assert!(!second.contains("easel listening on"), "{second}");
    assert!(second.contains("in use"), "{second}");
    assert!(second.contains("--data-dir"), "{second}");
    assert!(
        !second.contains("--server"),
        "serve has no --server:\n{second}"
    );
    // It names the process holding the directory.
    assert!(
        second.contains(&format!("pid {}", first.child.id())),
        "the holder's pid is not named:\n{second}"
    );
    // The snapshot commands suggest the server's API instead.
    let out = cli_dev(
        &[
            "snapshot",
            "list",
            "demo",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(!out.success());
    assert!(
        out.stderr.contains("--server URL --token JWT")
            && out.stderr.contains(&format!("pid {}", first.child.id())),
        "{}",
        out.stderr
    );
    drop(first);
}

#[test]
fn cli_errors_are_said_in_words() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();

    let out = cli_dev(&["snapshot", "inspect", "./nope.bin"], cwd);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.stderr.trim(), "error: no such file: ./nope.bin");

    let out = cli_dev(&["serve", "--config", "nope.toml"], cwd);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.stderr.trim(), "error: no such file: nope.toml");

    std::fs::write(
        cwd.join("bad.toml"),
        "[limits]\nmax_connections = \"lots\"\n",
    )
    .unwrap();
    let out = cli_dev(&["serve", "--config", "bad.toml"], cwd);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr
            .contains("limits.max_connections: expected a whole number")
            && out.stderr.contains("got the string \"lots\"")
            && !out.stderr.contains("usize"),
        "{}",
        out.stderr
    );

    // An unknown session is an error, not an empty table.
    let data = cwd.join("data");
    let server = DevServer::start(&data);
    drop(server.stop());
    let out = cli_dev(
        &[
            "snapshot",
            "list",
            "nosuch",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        cwd,
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        out.stderr.trim(),
        format!("error: no session nosuch in {}", data.display())
    );
    assert!(out.stdout.is_empty());

    // Without a secret and without a development secret, `token` says where it looked.
    let out = cli_dev(
        &[
            "token",
            "--sub",
            "me",
            "--session",
            "*",
            "--data-dir",
            "elsewhere",
        ],
        cwd,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("elsewhere/dev-secret"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_bad_token_is_refused_in_words() {
    let server = TestServer::start("");
    let out = cli_dev(
        &[
            "sessions",
            "--server",
            &server.http_base(),
            "--token",
            "not-a-jwt",
        ],
        server.data_dir.parent().unwrap(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("401"), "{}", out.stderr);
    assert!(out.stderr.contains("not a JWT"), "{}", out.stderr);
    assert!(
        !out.stderr.contains("InvalidToken") && !out.stderr.contains("{\""),
        "{}",
        out.stderr
    );
}

#[test]
fn every_argument_has_help_text() {
    let tmp = tempfile::tempdir().unwrap();
    let commands: &[&[&str]] = &[
        &["serve"],
        &["token"],
        &["sessions"],
        &["snapshot", "list"],
        &["snapshot", "export"],
        &["snapshot", "inspect"],
        &["snapshot", "restore"],
        &["snapshot", "import"],
        &["store", "check"],
        &["store", "recover"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = cli_dev(&args, tmp.path());
        out.assert_ok("--help");
        let help = out.stdout_text();
        let mut section = "";
        for line in help.lines() {
            if !line.starts_with(' ') {
                section = line;
                continue;
            }
            if section.starts_with("Arguments") || section.starts_with("Options") {
                // "  <SESSION>  Session id." / "      --data-dir <DATA_DIR>  Data directory…";
                // a continuation line of a long description is indented further.
                let item = line.trim_start();
                if !(item.starts_with('<') || item.starts_with('-')) {
                    continue;
                }
                assert!(
                    item.contains("  "),
                    "`easel {}`: {item:?} has no help text\n{help}",
                    cmd.join(" ")
                );
            }
        }
    }
}

#[tokio::test]
async fn repeated_refusals_of_one_token_are_logged_once_then_summarised() {
    let mut server = TestServer::start("");
    let bad = mint_with_secret(
        &serde_json::json!({"sub": "stale", "sid": "*", "role": "student", "exp": now_s() + 3600}),
        "a-different-secret-of-at-least-32-bytes!!",
    );
    let auth = format!("Bearer {bad}");
    for _ in 0..20 {
        let r = http_request(
            server.addr,
            "GET",
            "/api/v2/session/stale-tab/whiteboard",
            &[("Authorization", &auth)],
            None,
        )
        .await;
        assert_eq!(r.status, 401);
    }
    // Another bad token is its own first line.
    let other = format!("Bearer {}x", &bad[..bad.len() - 1]);
    let r = http_request(
        server.addr,
        "GET",
        "/api/v2/session/stale-tab/whiteboard",
        &[("Authorization", &other)],
        None,
    )
    .await;
    assert_eq!(r.status, 401);
    server.stop_graceful().await;
    let log = server.stderr_text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request refused"))
        .collect();
    assert_eq!(refused.len(), 2, "one line per token:\n{log}");
    let summary: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused again"))
        .collect();
    assert_eq!(summary.len(), 1, "{log}");
    assert!(summary[0].contains("refused=19"), "{}", summary[0]);
    // The token itself is never logged.
    let signature = bad.rsplit('.').next().unwrap();
    assert!(!log.contains(signature), "the token is in the log:\n{log}");
}
