//! Refusals at start (short secrets, the open-file limit) and token checks (`nbf`, `crit`,
//! no token in debug logs).

use super::*;

#[tokio::test]
async fn short_hmac_secrets_are_refused_at_start() {
    for secret in ["dev", "test-secret", "0123456789abcdef0123456789abcde"] {
        let err = TestServer::try_start(
            "",
            StartOpts {
                env: vec![("EASEL_JWT_SECRET".into(), secret.into())],
                ..Default::default()
            },
        )
        .err()
        .unwrap_or_else(|| panic!("a {}-byte secret was accepted", secret.len()));
        assert!(
            err.contains("auth.jwt_secret") && err.contains("32 bytes"),
            "{err}"
        );
    }
    // `easel token` refuses to sign with one too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(["token", "--sub", "alice", "--session", "lesson"])
        .env("EASEL_JWT_SECRET", "dev")
        .env_remove("EASEL_JWT_SECRET_FILE")
        .env_remove("EASEL_JWT_PUBLIC_KEY_FILE")
        .output()
        .expect("run easel token");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{err}");
    assert!(
        err.contains("EASEL_JWT_SECRET") && err.contains("32 bytes"),
        "{err}"
    );
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": "alice", "sid": "lesson", "exp": now_s() + 600});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c
}

#[tokio::test]
async fn nbf_in_the_future_is_401() {
    let server = TestServer::start("");
    let addr = server.addr;
    // The leeway is 30 s: 300 s ahead is refused, 10 s ahead and the past are not.
    let early = mint(&claims(json!({"nbf": now_s() + 300})));
    let r = get_with(addr, &wb_api("lesson"), &early).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "unauthorized");
    assert_eq!(
        ws_status(addr, "/ws/v2/session/lesson/whiteboard", &early)
            .await
            .err(),
        Some(401)
    );
    for nbf in [now_s() + 10, now_s() - 60] {
        let r = get_with(addr, &wb_api("lesson"), &mint(&claims(json!({"nbf": nbf})))).await;
        assert_eq!(r.status, 200, "nbf {nbf}: {}", r.text());
    }
    assert!(metric(addr, "easel_auth_failures_total{reason=\"not_yet_valid\"}").await >= 2.0);
}

#[tokio::test]
async fn crit_header_is_401() {
    let server = TestServer::start("");
    let addr = server.addr;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.crit = Some(vec!["https://example.com/must-understand".into()]);
    let t = jsonwebtoken::encode(
        &header,
        &claims(json!({"https://example.com/must-understand": true})),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode");
    let r = get_with(addr, &wb_api("lesson"), &t).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        ws_status(addr, "/ws/v2/session/lesson", &t).await.err(),
        Some(401)
    );
    // The same claims without `crit` pass.
    let ok = mint(&claims(
        json!({"https://example.com/must-understand": true}),
    ));
    assert_eq!(get_with(addr, &wb_api("lesson"), &ok).await.status, 200);
    assert!(metric(addr, "easel_auth_failures_total{reason=\"crit\"}").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_never_hold_the_token() {
    let server = TestServer::start_with("", &[("EASEL_LOG", "debug")], &[]);
    let addr = server.addr;
    let t = token("alice", "lesson", "student");
    let r = http_request(
        addr,
        "GET",
        &format!("{}?token={t}", wb_api("lesson")),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        post_with(
            addr,
            &wb_api("lesson"),
            &t,
            &map_set_update(1, "m", "k", "v")
        )
        .await
        .status,
        204
    );
    let _ws = ws_status(addr, "/ws/v2/session/lesson/whiteboard", &t)
        .await
        .expect("ws");
    let expired = mint(&claims(json!({"exp": now_s() - 3600})));
    let r = http_request(
        addr,
        "GET",
        &format!("{}?token={expired}", wb_api("lesson")),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 401);
    // The request spans were written (so the check below looks at real debug output).
    let deadline = Instant::now() + TIMEOUT;
    while !server
        .stderr_text()
        .contains("/api/v2/session/lesson/whiteboard")
    {
        assert!(
            Instant::now() < deadline,
            "no request span in the debug log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = server.stderr_text();
    for secret in [&t, &expired] {
        let signature = secret.rsplit('.').next().unwrap_or_default();
        assert!(!log.contains(signature), "a token is in the debug log");
    }
    assert!(
        !log.contains("token="),
        "a query string is in the debug log"
    );
}

#[tokio::test]
async fn open_file_limit_is_raised_to_the_hard_limit() {
    // Start the server with a low soft limit (as many systems' default of 1024 is).
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" serve --listen 127.0.0.1:0 --data-dir \"$1\"")
        .arg(env!("CARGO_BIN_EXE_easel"))
        .arg(tmp.path().join("data"))
        .env("EASEL_JWT_SECRET", SECRET)
        .env("EASEL_LOG", "warn")
        .env_remove("EASEL_LISTEN")
        .env_remove("EASEL_DATA_DIR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let mut out = child.stdout.take().expect("stdout");
    let listening = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut seen = Vec::new();
        let mut b = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("easel listening on") {
            match out.read(&mut b) {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&b[..n]),
            }
        }
        true
    });
    let ok = tokio::time::timeout(STARTUP_TIMEOUT, listening).await;
    // `serve` raises the limit as it starts serving, just after the listening line.
    let max_open_files = || -> Option<(String, String)> {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let mut nums = line.split_whitespace().skip(3);
        Some((nums.next()?.to_owned(), nums.next()?.to_owned()))
    };
    let deadline = Instant::now() + TIMEOUT;
    let mut seen = max_open_files();
    while matches!(&seen, Some((soft, hard)) if soft != hard) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        seen = max_open_files();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(ok, Ok(Ok(true))), "the server did not start");
    let (soft, hard) = seen.expect("Max open files line");
    assert_eq!(soft, hard, "soft limit not raised to the hard one");
    assert_ne!(soft, "256");
}
