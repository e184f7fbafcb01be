//! The commands through a running server's HTTP API (`--server URL --token JWT`).

use super::*;

#[tokio::test]
async fn commands_through_a_running_server() {
    let server = TestServer::start("");
    let s = session_id("cli-srv");
    let tutor = token("tina", &s, "tutor");
    let mut a = server.wb_user(&s, "alice").await;
    let mut b = server.wb_user(&s, "bob").await;
    write_content(&mut a).await;
    let expected = normalize_numbers(&expected_content());
    b.wait_doc("content at b", |c| content_of(&c.doc) == expected)
        .await;

    // list before and after a snapshot
    let n = server.take_snapshot(&s, &tutor).await;
    let out = run_cli(&server_args(&["snapshot", "list", &s], &server, &tutor)).await;
    let rows = parse_list(out.assert_ok("snapshot list --server"));
    assert!(rows.iter().any(|r| r.version == n), "{rows:?} lacks {n}");

    // export: current state and version n
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("srv-export.bin");
    let out = run_cli(&server_args(
        &["snapshot", "export", &s, "--out", file.to_str().unwrap()],
        &server,
        &tutor,
    ))
    .await;
    out.assert_ok("snapshot export --server --out");
    assert_eq!(
        content_of(&doc_from_update(&std::fs::read(&file).unwrap())),
        expected
    );
    let out = run_cli(&server_args(
        &["snapshot", "export", &s, "--version", &n.to_string()],
        &server,
        &tutor,
    ))
    .await;
    out.assert_ok("snapshot export --server --version");
    assert_eq!(content_of(&doc_from_update(&out.stdout)), expected);

    // inspect through the server
    let out = run_cli(&server_args(&["snapshot", "inspect", &s], &server, &tutor)).await;
    out.assert_ok("snapshot inspect --server");
    assert_eq!(
        normalize_numbers(&parse_json_stdout(&out, "inspect --server")),
        expected
    );

    // change, then restore n through the server: the connected clients follow live
    a.map_set("m", "k", "changed").await;
    a.map_set("m", "extra", "gone after restore").await;
    a.text_push("t", " and more").await;
    b.wait_doc("change at b", |c| c.map_get("m", "extra").is_some())
        .await;

    let student = token("sam", &s, "student");
    let out = run_cli(&server_args(
        &["snapshot", "restore", &s, "--version", &n.to_string()],
        &server,
        &student,
    ))
    .await;
    assert!(
        !out.success(),
        "restore with a student token must fail:\n{out:?}"
    );

    let out = run_cli(&server_args(
        &["snapshot", "restore", &s, "--version", &n.to_string()],
        &server,
        &tutor,
    ))
    .await;
    out.assert_ok("snapshot restore --server");
    let new_version = last_number(&out.stdout_text())
        .unwrap_or_else(|| panic!("restore printed no version: {:?}", out.stdout_text()));
    assert!(new_version > n, "new version {new_version} > {n}");
    a.wait_doc("restored content at a (same socket)", |c| {
        content_of(&c.doc) == expected
    })
    .await;
    b.wait_doc("restored content at b (same socket)", |c| {
        content_of(&c.doc) == expected
    })
    .await;
    assert_eq!(b.map_get("m", "extra"), None);

    // import into another session through the server
    let s2 = session_id("cli-srv-import");
    let tutor2 = token("tina", &s2, "tutor");
    let out = run_cli(&server_args(
        &["snapshot", "import", &s2, file.to_str().unwrap()],
        &server,
        &tutor2,
    ))
    .await;
    out.assert_ok("snapshot import --server");
    let doc = server.whiteboard_doc(&s2, &tutor2).await;
    assert_eq!(content_of(&doc), expected, "imported through the server");

    // sessions: admin with sid "*" only
    let admin = admin_token("root");
    let out = run_cli(&server_args(&["sessions"], &server, &admin)).await;
    out.assert_ok("sessions --server (admin)");
    let text = out.stdout_text();
    assert!(
        text.lines()
            .skip(1)
            .any(|l| l.split_whitespace().next() == Some(s.as_str())),
        "sessions --server lacks {s}:\n{text}"
    );
    let out = run_cli(&server_args(&["sessions"], &server, &tutor)).await;
    assert!(
        !out.success(),
        "sessions with a tutor token must fail:\n{out:?}"
    );
    let r = server
        .api("GET", "/api/v2/sessions", Some(&admin), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let entry = v["sessions"]
        .as_array()
        .unwrap_or_else(|| panic!("no sessions array: {v}"))
        .iter()
        .find(|e| e["id"] == s.as_str())
        .unwrap_or_else(|| panic!("GET /api/v2/sessions lacks {s}: {v}"))
        .clone();
    assert!(entry["bytes"].as_u64().is_some_and(|n| n > 0), "{entry}");
    assert!(entry["last_activity_ms"].is_u64(), "{entry}");
    assert!(
        entry["snapshots"].as_u64().is_some_and(|n| n >= 2),
        "{entry}"
    );
    let r = server
        .api("GET", "/api/v2/sessions", Some(&tutor), None)
        .await;
    assert_refusal(
        &r,
        403,
        Some("forbidden"),
        "GET /api/v2/sessions with a tutor token",
    );

    // a server that is not there: a clear failure, not a hang
    let out = run_cli(&[
        "snapshot",
        "list",
        &s,
        "--server",
        "http://127.0.0.1:1",
        "--token",
        &tutor,
    ])
    .await;
    assert!(!out.success(), "an unreachable server must fail:\n{out:?}");
}
