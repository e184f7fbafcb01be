//! Running the `easel` CLI (`snapshot`, `sessions`, `token`, `store`) as a child process.

use std::io::Read;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::server::easel_command;

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
    let mut child = easel_command("warn")
        .args(args)
        .current_dir(cwd.path())
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
