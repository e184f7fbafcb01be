//! The operator commands (SPEC §1): `easel snapshot list | export | inspect | restore |
//! import` and `easel sessions`, on a stopped server's data directory, refused with a clear
//! message while a server holds the directory, and through a running server's HTTP API
//! with `--server URL --token JWT`.
//!
//! Real binary, real sled directory in a temp dir; the content is always written by a real
//! whiteboard client of a real server first.

use std::path::{Path, PathBuf};

use crate::support::*;
use serde_json::{json, Value};
use yrs::{Array, Doc, Map, Text, Transact};

mod through_server;

/// One row of `easel snapshot list`.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    version: u64,
    created_at: String,
    bytes: u64,
    updates: u64,
}

/// Parses the `snapshot list` table: a header line, then `version created_at bytes updates`.
fn parse_list(out: &CliOutput) -> Vec<Row> {
    let text = out.stdout_text();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("`snapshot list` printed nothing (stderr: {})", out.stderr));
    let h = header.to_ascii_lowercase();
    for col in ["version", "created_at", "bytes", "updates"] {
        assert!(h.contains(col), "header {header:?} lacks {col:?}");
    }
    lines
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(
                f.len(),
                4,
                "`snapshot list` row is not 4 columns: {l:?}\n{text}"
            );
            let num = |s: &str| -> u64 {
                s.parse()
                    .unwrap_or_else(|_| panic!("not a number {s:?} in row {l:?}"))
            };
            Row {
                version: num(f[0]),
                created_at: f[1].to_string(),
                bytes: num(f[2]),
                updates: num(f[3]),
            }
        })
        .collect()
}

/// The last unsigned integer in a text (the new version `restore` prints).
fn last_number(s: &str) -> Option<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .rfind(|t| !t.is_empty())
        .and_then(|t| t.parse().ok())
}

fn dir_args(args: &[&str], dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    v.push("--data-dir".into());
    v.push(dir.display().to_string());
    v
}

fn server_args(args: &[&str], server: &TestServer, token: &str) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    v.extend([
        "--server".into(),
        server.http_base(),
        "--token".into(),
        token.into(),
    ]);
    v
}

/// The content written by [`write_content`], as `snapshot inspect` should print it.
fn expected_content() -> Value {
    json!({
        "m": {"k": "v", "n": 42, "nested": {"deep": true}},
        "t": "hello text",
        "a": ["x", "y", 3],
    })
}

/// Writes a map (strings, a number, a nested map), a text and an array.
async fn write_content(c: &mut WbClient) {
    c.change(|d| {
        let m = d.get_or_insert_map("m");
        let t = d.get_or_insert_text("t");
        let a = d.get_or_insert_array("a");
        let mut txn = d.transact_mut();
        m.insert(&mut txn, "k", "v");
        m.insert(&mut txn, "n", 42);
        m.insert(&mut txn, "nested", yrs::MapPrelim::from([("deep", true)]));
        t.push(&mut txn, "hello text");
        a.push_back(&mut txn, "x");
        a.push_back(&mut txn, "y");
        a.push_back(&mut txn, 3);
    })
    .await;
    c.barrier().await;
}

/// The content of a doc for the roots of [`expected_content`].
fn content_of(doc: &Doc) -> Value {
    normalize_numbers(&json!({
        "m": root_json(doc, "m", "map"),
        "t": root_json(doc, "t", "text"),
        "a": root_json(doc, "a", "array"),
    }))
}

fn parse_json_stdout(out: &CliOutput, what: &str) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            out.stdout_text(),
            out.stderr
        )
    })
}

/// Starts a server, lets `f` write through it, stops it with SIGTERM (exit 0), and returns
/// the temp dir (kept alive) and the data directory.
async fn stopped_server_dir<F>(f: F) -> (tempfile::TempDir, PathBuf)
where
    F: AsyncFnOnce(&TestServer),
{
    let mut server = TestServer::start("");
    let tmp = server.take_tempdir().unwrap();
    let dir = server.data_dir.clone();
    f(&server).await;
    server.stop_graceful().await;
    drop(server);
    (tmp, dir)
}

// ---------------------------------------------------------------------------------------------
// On a data directory
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn offline_list_export_inspect_import_roundtrip() {
    let s = session_id("cli-rt");
    let (tmp, dir) = stopped_server_dir(async |server: &TestServer| {
        let mut c = server.wb_user(&s, "alice").await;
        write_content(&mut c).await;
        assert_eq!(content_of(&c.doc), normalize_numbers(&expected_content()));
        c.close().await;
    })
    .await;
    let expected = normalize_numbers(&expected_content());

    // list: the shutdown / last-leave snapshot is there
    let out = run_cli(&dir_args(&["snapshot", "list", &s], &dir)).await;
    out.assert_ok("snapshot list --data-dir");
    let rows = parse_list(&out);
    assert!(
        !rows.is_empty(),
        "no versions listed:\n{}",
        out.stdout_text()
    );
    for r in &rows {
        assert!(
            is_rfc3339(&r.created_at),
            "created_at {:?} is not RFC 3339",
            r.created_at
        );
        assert!(r.bytes > 0, "{r:?}");
    }
    assert!(
        rows.windows(2).all(|w| w[0].version < w[1].version),
        "{rows:?}"
    );
    let newest = rows.last().unwrap().version;

    // export the current state to a file, and to stdout
    let file = tmp.path().join("export.bin");
    let out = run_cli(&dir_args(
        &["snapshot", "export", &s, "--out", file.to_str().unwrap()],
        &dir,
    ))
    .await;
    out.assert_ok("snapshot export --out");
    let bytes = std::fs::read(&file).expect("exported file");
    assert_eq!(
        content_of(&doc_from_update(&bytes)),
        expected,
        "exported file content"
    );
    let out = run_cli(&dir_args(&["snapshot", "export", &s], &dir)).await;
    out.assert_ok("snapshot export (stdout)");
    assert_eq!(
        content_of(&doc_from_update(&out.stdout)),
        expected,
        "export to stdout"
    );

    // export of a version
    let out = run_cli(&dir_args(
        &["snapshot", "export", &s, "--version", &newest.to_string()],
        &dir,
    ))
    .await;
    out.assert_ok("snapshot export --version");
    assert_eq!(
        content_of(&doc_from_update(&out.stdout)),
        expected,
        "export --version {newest}"
    );

    // inspect: the file, the session, a version
    let out = run_cli(&["snapshot", "inspect", file.to_str().unwrap()]).await;
    out.assert_ok("snapshot inspect FILE");
    assert_eq!(
        normalize_numbers(&parse_json_stdout(&out, "inspect FILE")),
        expected,
        "inspect FILE: one key per root type; maps → objects, arrays → arrays, text → strings"
    );
    let out = run_cli(&dir_args(&["snapshot", "inspect", &s], &dir)).await;
    out.assert_ok("snapshot inspect SESSION");
    assert_eq!(
        normalize_numbers(&parse_json_stdout(&out, "inspect SESSION")),
        expected
    );
    let out = run_cli(&dir_args(
        &["snapshot", "inspect", &s, "--version", &newest.to_string()],
        &dir,
    ))
    .await;
    out.assert_ok("snapshot inspect SESSION --version");
    assert_eq!(
        normalize_numbers(&parse_json_stdout(&out, "inspect --version")),
        expected
    );

    // a version that does not exist fails
    let out = run_cli(&dir_args(
        &["snapshot", "export", &s, "--version", "999999"],
        &dir,
    ))
    .await;
    assert!(
        !out.success(),
        "export of a missing version must fail:\n{out:?}"
    );

    // import the exported file into another session
    let s2 = session_id("cli-rt-import");
    let out = run_cli(&dir_args(
        &["snapshot", "import", &s2, file.to_str().unwrap()],
        &dir,
    ))
    .await;
    out.assert_ok("snapshot import");
    let out = run_cli(&dir_args(&["snapshot", "inspect", &s2], &dir)).await;
    out.assert_ok("snapshot inspect of the imported session");
    assert_eq!(
        normalize_numbers(&parse_json_stdout(&out, "inspect imported")),
        expected
    );

    // importing a file that is not an update fails and changes nothing
    let junk = tmp.path().join("junk.bin");
    std::fs::write(&junk, [0xFFu8, 0xFF, 0xFF, 0x01, 0x02]).unwrap();
    let out = run_cli(&dir_args(
        &["snapshot", "import", &s2, junk.to_str().unwrap()],
        &dir,
    ))
    .await;
    assert!(!out.success(), "import of a non-update must fail:\n{out:?}");

    // sessions lists both
    let out = run_cli(&dir_args(&["sessions"], &dir)).await;
    out.assert_ok("sessions --data-dir");
    let text = out.stdout_text();
    let ids: Vec<&str> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(ids.contains(&s.as_str()), "sessions lacks {s}:\n{text}");
    assert!(ids.contains(&s2.as_str()), "sessions lacks {s2}:\n{text}");

    // the imported session is served
    let server = TestServer::start_in(&dir, "");
    let c = server.wb_user(&s2, "bob").await;
    assert_eq!(
        content_of(&c.doc),
        expected,
        "imported session served by a server"
    );
    let c = server.wb_user(&s, "bob").await;
    assert_eq!(content_of(&c.doc), expected, "original session unchanged");
    drop(server);
    drop(tmp);
}

#[tokio::test]
async fn offline_restore_then_serve() {
    let s = session_id("cli-restore");
    let mut version_a = 0;
    let (tmp, dir) = stopped_server_dir(async |server: &TestServer| {
        let tutor = token("tina", &s, "tutor");
        let mut c = server.wb_user(&s, "alice").await;
        c.map_set("m", "k", "v1").await;
        c.text_push("t", "hello").await;
        c.barrier().await;
        version_a = server.take_snapshot(&s, &tutor).await;
        c.map_set("m", "k", "v2").await;
        c.map_set("m", "x", "new").await;
        c.text_push("t", " world").await;
        c.barrier().await;
        c.close().await;
    })
    .await;

    let out = run_cli(&dir_args(&["snapshot", "list", &s], &dir)).await;
    out.assert_ok("snapshot list");
    let rows = parse_list(&out);
    let versions: Vec<u64> = rows.iter().map(|r| r.version).collect();
    assert!(
        versions.contains(&version_a),
        "{versions:?} lacks {version_a}"
    );
    let newest = *versions.iter().max().unwrap();
    assert!(
        newest > version_a,
        "a later snapshot (shutdown / last leave) exists: {versions:?}"
    );

    let out = run_cli(&dir_args(&["snapshot", "inspect", &s], &dir)).await;
    out.assert_ok("inspect before restore");
    assert_eq!(
        parse_json_stdout(&out, "inspect"),
        json!({"m": {"k": "v2", "x": "new"}, "t": "hello world"})
    );

    // a missing version fails and changes nothing
    let out = run_cli(&dir_args(
        &["snapshot", "restore", &s, "--version", "999999"],
        &dir,
    ))
    .await;
    assert!(
        !out.success(),
        "restore of a missing version must fail:\n{out:?}"
    );

    let out = run_cli(&dir_args(
        &[
            "snapshot",
            "restore",
            &s,
            "--version",
            &version_a.to_string(),
        ],
        &dir,
    ))
    .await;
    out.assert_ok("snapshot restore --data-dir");
    let new_version = last_number(&out.stdout_text())
        .unwrap_or_else(|| panic!("restore printed no version: {:?}", out.stdout_text()));
    assert!(
        new_version > newest,
        "restore prints the new version (> {newest}), got {new_version}: {:?}",
        out.stdout_text()
    );
    let out = run_cli(&dir_args(&["snapshot", "list", &s], &dir)).await;
    let versions: Vec<u64> = parse_list(out.assert_ok("list after restore"))
        .iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(versions.iter().max(), Some(&new_version), "{versions:?}");
    let out = run_cli(&dir_args(&["snapshot", "inspect", &s], &dir)).await;
    out.assert_ok("inspect after restore");
    assert_eq!(
        parse_json_stdout(&out, "inspect after restore"),
        json!({"m": {"k": "v1"}, "t": "hello"})
    );

    let server = TestServer::start_in(&dir, "");
    let c = server.wb_user(&s, "bob").await;
    assert_eq!(
        c.map_get("m", "k").as_deref(),
        Some("v1"),
        "served after offline restore"
    );
    assert_eq!(c.map_get("m", "x"), None);
    assert_eq!(c.text("t"), "hello");
    let listed = server
        .snapshot_versions(&s, &token("tina", &s, "tutor"))
        .await;
    assert!(
        listed.contains(&new_version),
        "HTTP list {listed:?} lacks {new_version}"
    );
    drop(server);
    drop(tmp);
}

#[tokio::test]
async fn locked_data_dir_is_refused_with_a_hint_to_use_server() {
    let mut server = TestServer::start("");
    let s = session_id("cli-locked");
    let mut c = server.wb_user(&s, "alice").await;
    c.map_set("m", "k", "v").await;
    c.barrier().await;
    let dir = server.data_dir.clone();
    let file = dir.parent().unwrap().join("import.bin");
    std::fs::write(&file, map_set_update(7, "m", "imported", "yes")).unwrap();

    let cmds: Vec<Vec<String>> = vec![
        dir_args(&["snapshot", "list", &s], &dir),
        dir_args(&["snapshot", "export", &s], &dir),
        dir_args(&["snapshot", "inspect", &s], &dir),
        dir_args(&["snapshot", "restore", &s, "--version", "1"], &dir),
        dir_args(&["snapshot", "import", &s, file.to_str().unwrap()], &dir),
        dir_args(&["sessions"], &dir),
    ];
    for args in cmds {
        let out = run_cli(&args).await;
        let all = format!("{}\n{}", out.stdout_text(), out.stderr);
        assert!(
            !out.success(),
            "`easel {}` succeeded on a directory a server holds:\n{all}",
            args.join(" ")
        );
        let lower = all.to_ascii_lowercase();
        assert!(
            (lower.contains("in use") || lower.contains("locked")) && all.contains("--server"),
            "`easel {}`: the message must say the directory is in use/locked and mention --server, got:\n{all}",
            args.join(" ")
        );
    }
    // the server did not notice
    assert!(server.is_running());
    c.map_set("m", "k2", "v2").await;
    c.barrier().await;
    assert_server_alive(&server, &s).await;
    let doc = server.whiteboard_doc(&s, &token("tina", &s, "tutor")).await;
    assert_eq!(
        doc_map_get(&doc, "m", "imported"),
        None,
        "refused import changed nothing"
    );
}
