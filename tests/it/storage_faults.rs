//! Storage faults over the real binary (SPEC 5.1, 5.4): kill -9 never makes a number come
//! back, a full disk is reported and recovered from without a restart, a damaged database
//! is rebuilt from the `versions/` files, memory stays flat over session churn, and the
//! CLI ends quietly on a closed pipe.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;

/// A config whose batch flush happens only long after the test is done with the server:
/// what is not flushed by the store's own promises is lost by the kill -9.
const LAZY_FLUSH: &str = "[persist]\ndurability = \"batch\"\nflush_interval_ms = 60000\n";

/// POSTs a chat line over HTTP; returns its seq.
async fn post_chat(server: &TestServer, session: &str, token: &str, text: &str) -> u64 {
    let auth = format!("Bearer {token}");
    let body = json!({ "text": text }).to_string();
    let r = http_request(
        server.addr,
        "POST",
        &format!("/api/v2/session/{session}/tutor/messages"),
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        Some(body.as_bytes()),
    )
    .await;
    assert_eq!(r.status, 201, "POST chat: {}", r.text());
    r.json()["seq"].as_u64().expect("seq")
}

/// A Yjs update setting `map.key = value` (client `client`).
fn set(client: u64, key: &str, value: &str) -> Vec<u8> {
    map_set_update(client, "board", key, value)
}

async fn post_update(server: &TestServer, session: &str, token: &str, update: &[u8]) -> u16 {
    let r = server
        .api(
            "POST",
            &format!("/api/v2/session/{session}/whiteboard"),
            Some(token),
            Some(update),
        )
        .await;
    r.status
}

/// Kills the server with SIGKILL and starts a new one on the same data directory.
fn kill_and_restart(server: &mut TestServer, config: &str) -> (TestServer, tempfile::TempDir) {
    let tmp = server.take_tempdir().expect("tempdir");
    server.kill();
    let again = TestServer::start_in(&server.data_dir, config);
    (again, tmp)
}

#[tokio::test]
async fn kill9_with_batch_durability_never_hands_out_an_acknowledged_chat_seq_again() {
    let mut server = TestServer::start(LAZY_FLUSH);
    let session = session_id("seqs");
    let tok = token("ada", &session, "tutor");
    let (mut chat, _, _) = server.tutor(&session, &tok).await;
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        chat.send(&json!({"type": "chat", "text": format!("line {i}")}))
            .await;
        let ack = chat.wait_type("chat").await;
        acknowledged.push(ack["seq"].as_u64().expect("seq"));
    }
    assert_eq!(acknowledged, vec![1, 2, 3, 4, 5]);
    let (server2, _tmp) = kill_and_restart(&mut server, LAZY_FLUSH);
    let (mut chat, welcome, _) = server2.tutor(&session, &tok).await;
    chat.send(&json!({"type": "chat", "text": "after the crash"}))
        .await;
    let next = chat.wait_type("chat").await["seq"].as_u64().expect("seq");
    let highest = *acknowledged.iter().max().expect("acks");
    assert!(
        next > highest,
        "first seq after kill -9 is {next}, but {highest} was acknowledged before (welcome {welcome})"
    );
}

#[tokio::test]
async fn an_acknowledged_snapshot_version_survives_kill9_and_is_never_reused() {
    // Sync durability: the bug showed with it too (the version was not flushed).
    let config = "[persist]\ndurability = \"sync\"\nflush_interval_ms = 60000\n";
    let mut server = TestServer::start(config);
    let session = session_id("versions");
    let tok = token("tina", &session, "tutor");
    assert_eq!(
        post_update(&server, &session, &tok, &set(7, "k", "v1")).await,
        204
    );
    let first = server.take_snapshot(&session, &tok).await;
    assert_eq!(
        post_update(&server, &session, &tok, &set(7, "k", "v2")).await,
        204
    );
    let acknowledged = server.take_snapshot(&session, &tok).await;
    assert!(acknowledged > first);
    let (server2, _tmp) = kill_and_restart(&mut server, config);
    let versions = server2.snapshot_versions(&session, &tok).await;
    assert!(
        versions.contains(&acknowledged),
        "version {acknowledged} was answered 201 before the kill; stored now: {versions:?}"
    );
    let next = server2.take_snapshot(&session, &tok).await;
    assert!(
        next > acknowledged,
        "a new snapshot after the restart is numbered {next}, not above {acknowledged}"
    );
    // Its plain file is there too.
    let file = server2
        .data_dir
        .join("versions")
        .join(&session)
        .join(format!("{acknowledged}.yjs"));
    assert!(file.is_file(), "{} missing", file.display());
}

/// A tmpfs mounted on a fresh folder, unmounted (lazily, so a leftover process cannot
/// block it) when dropped, even when the test fails.
struct Tmpfs {
    mount: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Self, String> {
        let parent = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mount = parent.path().join("fs");
        std::fs::create_dir_all(&mount).map_err(|e| e.to_string())?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .status()
            .map_err(|e| format!("mount: {e}"))?;
        if !status.success() {
            return Err(format!("mount -t tmpfs failed: {status}"));
        }
        Ok(Self {
            mount,
            _parent: parent,
        })
    }

    /// Fills the file system with `filler` until it refuses a byte more.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.mount.join("filler");
        let mut file = std::fs::File::create(&path).expect("create filler");
        let chunk = vec![0xAAu8; 64 << 10];
        let mut small = false;
        for _ in 0..100_000 {
            let result = if small {
                file.write_all(&chunk[..512])
            } else {
                file.write_all(&chunk)
            };
            if result.is_err() {
                if small {
                    break;
                }
                small = true;
            }
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

async fn readyz(server: &TestServer) -> (u16, String) {
    let r = server.http_get("/readyz").await;
    (r.status, r.text())
}

#[tokio::test]
async fn a_full_disk_is_reported_refused_and_recovered_from_without_a_restart() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let fs = match Tmpfs::mount("24m") {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let data = fs.mount.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let config = "shutdown_timeout_s = 4\n";
    let mut server = TestServer::start_in(&data, config);
    let session = session_id("full");
    let tok = token("fay", &session, "student");
    let mut writer = server.wb(&session, &tok).await;
    writer.map_set("board", "before", "yes").await;
    writer.barrier().await;

    let filler = fs.fill();
    let (status, reason) = eventually("readyz 503 on a full disk", TIMEOUT, || async {
        let (status, text) = readyz(&server).await;
        (status == 503).then_some((status, text))
    })
    .await;
    assert_eq!(status, 503);
    assert!(reason.contains("disk full"), "readyz body: {reason}");
    assert_eq!(server.metric("easel_store_writable").await, Some(0.0));

    // A write is refused with 1011, and the live document does not keep it: a reader must
    // never see what a restart will not have (the document is rebuilt from the store).
    writer.map_set("board", "refused", "yes").await;
    assert_eq!(writer.expect_close(TIMEOUT).await, Some(1011));
    // Reads go on.
    let doc = server.whiteboard_doc(&session, &tok).await;
    assert_eq!(doc_map_get(&doc, "board", "before").as_deref(), Some("yes"));
    assert_eq!(doc_map_get(&doc, "board", "refused"), None);

    // Space comes back: ready again and writing, with no restart.
    std::fs::remove_file(&filler).expect("remove filler");
    eventually("readyz 200 once space is back", TIMEOUT, || async {
        (readyz(&server).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(server.metric("easel_store_writable").await, Some(1.0));
    let failures = server.metric("easel_store_write_failures_total").await;
    assert!(
        failures.is_some_and(|n| n >= 1.0),
        "write failures counted: {failures:?}"
    );
    let mut writer = server.wb(&session, &tok).await;
    writer.map_set("board", "after", "yes").await;
    writer.barrier().await;
    let doc = server.whiteboard_doc(&session, &tok).await;
    assert_eq!(doc_map_get(&doc, "board", "after").as_deref(), Some("yes"));
    // In batch durability "after" is on disk only after the next flush; a snapshot's 201
    // says it is (an unflushed write lost at an unsaved shutdown is what batch allows).
    // "late" then leaves the shutdown something it cannot save.
    let tutor = token("tia", &session, "tutor");
    server.take_snapshot(&session, &tutor).await;
    writer.map_set("board", "late", "yes").await;
    writer.barrier().await;
    writer.close().await;

    // SIGTERM on a full disk: ends within shutdown_timeout_s, non-zero, and says so.
    let filler = fs.fill();
    let started = Instant::now();
    server.sigterm();
    let status = server
        .wait_exit(Duration::from_secs(4 + 3))
        .await
        .expect("easel did not exit within shutdown_timeout_s (+3 s) on a full disk");
    assert!(
        !status.success(),
        "exit status {status} after an unsaved shutdown"
    );
    assert!(started.elapsed() < Duration::from_secs(7));
    assert!(
        server.stderr_text().contains("not everything was saved"),
        "the log does not say what was not saved"
    );

    // A start on the still-full disk either refuses, saying why, or comes up not ready;
    // either way it leaves nothing that stops the next start.
    let _tmp = server.take_tempdir();
    match TestServer::try_start_in(&data, config) {
        Err(refused) => assert!(
            refused.contains("disk") && !refused.contains("panicked at"),
            "start on a full disk: {refused}"
        ),
        Ok(mut full) => {
            eventually("not ready on a full disk", TIMEOUT, || async {
                (readyz(&full).await.0 == 503).then_some(())
            })
            .await;
            full.kill();
        }
    }

    // The next start works, with what was accepted.
    std::fs::remove_file(&filler).expect("remove filler");
    let server = TestServer::start_in(&data, config);
    let doc = server.whiteboard_doc(&session, &tok).await;
    assert_eq!(doc_map_get(&doc, "board", "before").as_deref(), Some("yes"));
    assert_eq!(doc_map_get(&doc, "board", "after").as_deref(), Some("yes"));
    assert_eq!(readyz(&server).await.0, 200);
    drop(server);
}

fn flip_byte(path: &Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for flipping");
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.read_exact(&mut b).expect("read");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(&[b[0] ^ 0xFF]).expect("write");
    f.sync_all().expect("sync");
}

/// Flips the first byte of every occurrence of `needle` in the file; returns how many.
fn flip_every(path: &Path, needle: &[u8]) -> usize {
    let mut bytes = std::fs::read(path).expect("read for flipping");
    let at: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    for &i in &at {
        bytes[i] ^= 0xFF;
    }
    std::fs::write(path, &bytes).expect("write flipped");
    at.len()
}

/// `easel store check` on a damaged directory: non-zero, and it says `damaged`.
fn assert_check_reports_damage(data: &std::path::Path) {
    let check = store_cli("check", data);
    assert!(
        !check.success(),
        "store check exit 0 on damage:\n{}",
        check.stdout_text()
    );
    assert!(
        check.stdout_text().contains("damaged"),
        "{}",
        check.stdout_text()
    );
}

fn store_cli(command: &str, data: &Path) -> CliOutput {
    run_cli_blocking(&[
        "store".to_string(),
        command.to_string(),
        "--data-dir".to_string(),
        data.display().to_string(),
    ])
}

#[tokio::test]
async fn a_damaged_database_is_refused_by_name_and_recovered_from_the_version_files() {
    let mut server = TestServer::start("");
    let session = session_id("flip");
    let tok = token("rita", &session, "tutor");
    // Enough chat for sled's log to span several segments (512 KiB each), then the board.
    let long = "x".repeat(7000);
    let mut last_seq = 0;
    for i in 0..150 {
        last_seq = post_chat(&server, &session, &tok, &format!("{i} {long}")).await;
    }
    assert_eq!(
        post_update(&server, &session, &tok, &set(9, "shape", "circle")).await,
        204
    );
    let version = server.take_snapshot(&session, &tok).await;
    server.stop_graceful().await;
    let data = server.data_dir.clone();
    let _tmp = server.take_tempdir();

    assert!(
        store_cli("check", &data).success(),
        "check of a healthy directory"
    );

    // 1. Damage sled opens over: every copy of the board's content in the database is hit.
    // The board comes back from its version file, and the damage is counted.
    let flipped = flip_every(&data.join("db"), b"circle");
    assert!(flipped > 0, "the board's content is not in the db file");
    assert_check_reports_damage(&data);
    let mut server = TestServer::start_in(&data, "");
    let doc = server.whiteboard_doc(&session, &tok).await;
    assert_eq!(
        doc_map_get(&doc, "board", "shape").as_deref(),
        Some("circle")
    );
    let counted = server
        .metric("easel_store_decode_errors_total")
        .await
        .unwrap_or(0.0);
    assert!(
        counted >= 1.0,
        "damage read over was not counted ({counted})"
    );
    server.stop_graceful().await;
    let _tmp2 = server.take_tempdir();

    // 2. Damage sled refuses: serve names the way out, recover rebuilds.
    flip_byte(&data.join("conf"), 3);
    let refused = TestServer::try_start_in(&data, "")
        .err()
        .expect("serve started on a database sled refuses");
    assert!(
        refused.contains("easel store recover"),
        "serve's refusal does not name `easel store recover`:\n{refused}"
    );
    assert!(
        !refused.contains("panicked at"),
        "serve panicked:\n{refused}"
    );

    assert_check_reports_damage(&data);

    let recover = store_cli("recover", &data);
    recover.assert_ok("store recover");
    let said = recover.stdout_text();
    assert!(said.contains("moved the damaged database"), "{said}");
    assert!(store_cli("check", &data).success(), "check after recover");

    let server = TestServer::start_in(&data, "");
    let doc = server.whiteboard_doc(&session, &tok).await;
    assert_eq!(
        doc_map_get(&doc, "board", "shape").as_deref(),
        Some("circle")
    );
    assert!(server
        .snapshot_versions(&session, &tok)
        .await
        .contains(&version));
    // Chat that could not be brought back never gets its seqs handed out again.
    let next = post_chat(&server, &session, &tok, "after recovery").await;
    assert!(
        next > last_seq,
        "chat seq {next} after recovery, {last_seq} was used before"
    );
    assert!(server.take_snapshot(&session, &tok).await > version);
}

#[tokio::test]
async fn resident_memory_stays_flat_over_rounds_of_opening_and_unloading_sessions() {
    let config = "[persist]\ncache_mb = 8\n[sessions]\nidle_unload_s = 1\n";
    let server = TestServer::start(config);
    let sessions: Vec<String> = (0..200).map(|i| session_id(&format!("mem{i}"))).collect();
    let tokens: Vec<String> = sessions
        .iter()
        .enumerate()
        .map(|(i, s)| token(&format!("u{i}"), s, "student"))
        .collect();
    let payload = "p".repeat(16 << 10);
    let mut rss = Vec::new();
    for round in 0..5u64 {
        for (i, (session, tok)) in sessions.iter().zip(&tokens).enumerate() {
            let update = set(1000 + i as u64, &format!("r{round}"), &payload);
            assert_eq!(post_update(&server, session, tok, &update).await, 204);
        }
        server
            .wait_loaded_sessions(0, Duration::from_secs(20))
            .await;
        rss.push(vm_rss_kib(server.pid()).expect("VmRSS"));
    }
    eprintln!("VmRSS per round (KiB): {rss:?}");
    let growth = rss[4].saturating_sub(rss[1]);
    assert!(
        growth < 6 * 1024,
        "resident memory grew {growth} KiB from round 2 to round 5: {rss:?}"
    );
}

#[tokio::test]
async fn sessions_piped_into_head_ends_quietly() {
    let mut server = TestServer::start("");
    // Long ids: the listing must be larger than a pipe's buffer for head to close it.
    for i in 0..700 {
        let session = format!("{}-{i}", "s".repeat(120));
        let tok = token(&format!("p{i}"), &session, "student");
        assert_eq!(
            post_update(&server, &session, &tok, &set(5, "k", "v")).await,
            204
        );
    }
    server.stop_graceful().await;
    let data = server.data_dir.clone();
    let _tmp = server.take_tempdir();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' sessions --data-dir '{}' | head -1",
            env!("CARGO_BIN_EXE_easel"),
            data.display()
        ))
        .env("EASEL_JWT_SECRET", SECRET)
        .env("EASEL_LOG", "warn")
        .output()
        .expect("run the pipeline");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pipeline exit {}: {stderr}",
        out.status
    );
    assert!(
        !stderr.contains("panicked"),
        "easel panicked on the closed pipe: {stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}
