//! Authentication and connection admission (SPEC §2, §7): refusals before the upgrade,
//! token transports, sid forms, live expiry (4401), origins and connection caps.

use std::time::{Duration, Instant};

use crate::support::*;
use base64::Engine;
use serde_json::json;

const ENDPOINTS: [&str; 2] = ["whiteboard", "tutor"];

fn path_for(endpoint: &str, session: &str) -> String {
    match endpoint {
        "whiteboard" => TestServer::wb_path(session),
        _ => TestServer::tutor_path(session),
    }
}

fn with_token(path: &str, token: &str) -> String {
    format!("{path}?token={token}")
}

fn unsigned_token(claims: &serde_json::Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

#[tokio::test]
async fn bad_or_missing_tokens_are_401_before_upgrade() {
    let server = TestServer::start("");
    let s = session_id("auth401");
    let exp = now_s() + 3600;
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        (
            "bad signature",
            Some(mint_with_secret(
                &json!({"sub":"u","sid":s,"exp":exp}),
                "some-other-secret-entirely",
            )),
        ),
        (
            "expired",
            Some(mint(&json!({"sub":"u","sid":s,"exp":now_s() - 3600}))),
        ),
        ("missing sid", Some(mint(&json!({"sub":"u","exp":exp})))),
        ("missing sub", Some(mint(&json!({"sid":s,"exp":exp})))),
        ("missing exp", Some(mint(&json!({"sub":"u","sid":s})))),
        ("not a jwt", Some("not.a.jwt".to_string())),
        (
            "alg none",
            Some(unsigned_token(&json!({"sub":"u","sid":s,"exp":exp}))),
        ),
    ];
    for endpoint in ENDPOINTS {
        for (what, tok) in &cases {
            let path = path_for(endpoint, &s);
            let path = match tok {
                Some(t) => with_token(&path, t),
                None => path,
            };
            let resp = ws_upgrade_raw(server.addr, &path, &[]).await;
            assert_refusal(
                &resp,
                401,
                Some("unauthorized"),
                &format!("{endpoint}: {what}"),
            );
            // the token must not be echoed back
            if let Some(t) = tok {
                assert!(
                    !resp.text().contains(t.as_str()),
                    "{endpoint}: {what}: token echoed in body"
                );
            }
        }
        // same through the Authorization header
        let bad = mint_with_secret(
            &json!({"sub":"u","sid":s,"exp":exp}),
            "wrong-secret-wrong-secret",
        );
        let auth = format!("Bearer {bad}");
        let resp = ws_upgrade_raw(
            server.addr,
            &path_for(endpoint, &s),
            &[("Authorization", &auth)],
        )
        .await;
        assert_refusal(
            &resp,
            401,
            Some("unauthorized"),
            &format!("{endpoint}: bad signature in header"),
        );
    }
}

#[tokio::test]
async fn session_not_covered_is_403() {
    let server = TestServer::start("");
    let s = session_id("auth403");
    let exp = now_s() + 3600;
    let cases = vec![
        (
            "other session",
            mint(&json!({"sub":"u","sid":"some-other-session","exp":exp})),
        ),
        (
            "list without it",
            mint(&json!({"sub":"u","sid":["x1","x2"],"exp":exp})),
        ),
        ("empty list", mint(&json!({"sub":"u","sid":[],"exp":exp}))),
    ];
    for endpoint in ENDPOINTS {
        for (what, t) in &cases {
            let resp =
                ws_upgrade_raw(server.addr, &with_token(&path_for(endpoint, &s), t), &[]).await;
            assert_refusal(
                &resp,
                403,
                Some("forbidden"),
                &format!("{endpoint}: {what}"),
            );
        }
    }
}

#[tokio::test]
async fn bad_session_id_is_400() {
    let server = TestServer::start("");
    let t = mint(&json!({"sub":"u","sid":"*","exp":now_s() + 3600}));
    let long = "a".repeat(129);
    for endpoint in ENDPOINTS {
        for bad in ["bad.id", "bad%24id", "bad%20id", long.as_str()] {
            let resp =
                ws_upgrade_raw(server.addr, &with_token(&path_for(endpoint, bad), &t), &[]).await;
            assert_refusal(&resp, 400, None, &format!("{endpoint}: session id {bad:?}"));
        }
    }
    // 128 characters is fine
    let ok = "b".repeat(128);
    let mut c = server.wb(&ok, &t).await;
    c.barrier().await;
}

#[tokio::test]
async fn token_via_query_header_and_subprotocol() {
    let server = TestServer::start("");
    let s = session_id("auth-via");
    for endpoint in ENDPOINTS {
        for via in [TokenVia::Query, TokenVia::Header, TokenVia::Subprotocol] {
            let t = token(&format!("user-{via:?}"), &s, "student");
            let (mut ws, resp) =
                ws_connect(server.addr, &path_for(endpoint, &s), Some(&t), via, &[])
                    .await
                    .unwrap_or_else(|e| panic!("{endpoint} via {via:?}: {}", describe_ws_err(&e)));
            if via == TokenVia::Subprotocol {
                let proto = resp
                    .headers()
                    .get("sec-websocket-protocol")
                    .map(|v| v.to_str().unwrap().to_string());
                assert_eq!(
                    proto.as_deref(),
                    Some("easel"),
                    "{endpoint}: subprotocol answer"
                );
            }
            // the connection really works
            match ws_next(&mut ws, TIMEOUT).await {
                WsEvent::Binary(b) if endpoint == "whiteboard" => {
                    assert_eq!(b[0], 0, "first whiteboard message must be sync");
                }
                WsEvent::Text(t) if endpoint == "tutor" => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(v["type"], "welcome");
                    assert_eq!(v["user"]["id"], format!("user-{via:?}"));
                }
                other => panic!("{endpoint} via {via:?}: unexpected first event {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn sid_star_and_list_forms_are_accepted() {
    let server = TestServer::start("");
    let s = session_id("auth-sid");
    let exp = now_s() + 3600;
    let star = mint(&json!({"sub":"star","sid":"*","exp":exp}));
    let list = mint(&json!({"sub":"list","sid":["unrelated", s.clone(), "other"],"exp":exp}));
    for (what, t) in [("star", star), ("list", list)] {
        let mut wb = server.wb(&s, &t).await;
        wb.barrier().await;
        let (_tc, welcome, _h) = server.tutor(&s, &t).await;
        assert_eq!(welcome["user"]["id"], what);
        assert_eq!(
            welcome["user"]["role"], "student",
            "role defaults to student"
        );
    }
}

#[tokio::test]
async fn easel_token_command_mints_a_usable_token() {
    let server = TestServer::start("");
    let s = session_id("auth-cli");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_easel"))
        .args([
            "token",
            "--sub",
            "cli-user",
            "--session",
            &s,
            "--role",
            "tutor",
            "--name",
            "Cli",
            "--ttl",
            "1h",
        ])
        .env("EASEL_JWT_SECRET", SECRET)
        .output()
        .expect("run easel token");
    assert!(
        out.status.success(),
        "easel token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let t = stdout.trim_end_matches('\n');
    assert_eq!(
        t.lines().count(),
        1,
        "easel token must print only the token: {stdout:?}"
    );
    assert_eq!(t.split('.').count(), 3, "not a JWT: {t:?}");
    let (_c, welcome, _h) = server.tutor(&s, t).await;
    assert_eq!(welcome["user"]["id"], "cli-user");
    assert_eq!(welcome["user"]["role"], "tutor");
    assert_eq!(welcome["user"]["name"], "Cli");
}

#[tokio::test]
async fn token_expiry_on_live_connection_closes_4401() {
    let server = TestServer::start("[auth]\nleeway_s = 0\n");
    let s = session_id("auth-exp");
    let exp = now_s() + 3;
    let t = mint(&json!({"sub":"shortlived","sid":s,"exp":exp}));
    let mut wb = server.wb(&s, &t).await;
    let (mut tc, _w, _h) = server.tutor(&s, &t).await;
    let start = Instant::now();
    let (wb_code, tc_code) = tokio::join!(
        wb.expect_close(Duration::from_secs(12)),
        tc.expect_close(Duration::from_secs(12))
    );
    assert_eq!(wb_code, Some(4401), "whiteboard close code on token expiry");
    assert_eq!(tc_code, Some(4401), "tutor close code on token expiry");
    assert!(start.elapsed() < Duration::from_secs(12));
    let closed_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let delta_ms = closed_at_ms - (exp as i64) * 1000;
    assert!(
        delta_ms > -1000,
        "closed {delta_ms} ms relative to exp: before the token expired"
    );
    // a client reconnecting right away with the same (now expired) token is refused:
    // the token was judged expired a moment ago, so the upgrade must not accept it again
    let resp = ws_upgrade_raw(server.addr, &with_token(&TestServer::wb_path(&s), &t), &[]).await;
    assert_refusal(
        &resp,
        401,
        Some("unauthorized"),
        &format!("reconnect with the same token right after the 4401 close (closed {delta_ms} ms after exp)"),
    );
}

#[tokio::test]
async fn disallowed_origin_is_403() {
    let server = TestServer::start("[http]\nallowed_origins = [\"http://good.example\"]\n");
    let s = session_id("auth-origin");
    let t = token("o", &s, "student");
    for endpoint in ENDPOINTS {
        let resp = ws_upgrade_raw(
            server.addr,
            &with_token(&path_for(endpoint, &s), &t),
            &[("Origin", "http://evil.example")],
        )
        .await;
        assert_refusal(&resp, 403, None, &format!("{endpoint}: Origin not allowed"));
        let ok = ws_upgrade_raw(
            server.addr,
            &with_token(&path_for(endpoint, &s), &t),
            &[("Origin", "http://good.example")],
        )
        .await;
        assert_eq!(
            ok.status,
            101,
            "{endpoint}: allowed origin refused: {} {}",
            ok.status,
            ok.text()
        );
    }
}

#[tokio::test]
async fn per_user_connection_cap_is_429() {
    let server = TestServer::start("[limits]\nmax_connections_per_user = 2\n");
    let s = session_id("auth-cap");
    let t = token("capped", &s, "student");
    let mut c1 = server.wb(&s, &t).await;
    let mut c2 = server.wb(&s, &t).await;
    c1.barrier().await;
    c2.barrier().await;
    let resp = ws_upgrade_raw(server.addr, &with_token(&TestServer::wb_path(&s), &t), &[]).await;
    assert_refusal(&resp, 429, None, "third whiteboard connection of one user");

    // per endpoint: the tutor endpoint still takes two
    let (_t1, _, _) = server.tutor(&s, &t).await;
    let (_t2, _, _) = server.tutor(&s, &t).await;
    let resp = ws_upgrade_raw(
        server.addr,
        &with_token(&TestServer::tutor_path(&s), &t),
        &[],
    )
    .await;
    assert_refusal(&resp, 429, None, "third tutor connection of one user");

    // per user: someone else is fine; per session: the same user elsewhere is fine
    let mut other = server.wb_user(&s, "someone-else").await;
    other.barrier().await;
    let s2 = session_id("auth-cap-other");
    let mut elsewhere = server.wb(&s2, &token("capped", &s2, "student")).await;
    elsewhere.barrier().await;

    // closing one frees a slot
    c1.close().await;
    let addr = server.addr;
    let path = with_token(&TestServer::wb_path(&s), &t);
    let _c3 = eventually("a slot frees after a close", TIMEOUT, || {
        let path = path.clone();
        async move {
            ws_connect(addr, &path, None, TokenVia::Query, &[])
                .await
                .ok()
        }
    })
    .await;
}

#[tokio::test]
async fn total_connection_cap_is_503() {
    let server = TestServer::start("[limits]\nmax_connections = 3\n");
    let s = session_id("auth-total");
    let mut a = server.wb_user(&s, "u1").await;
    let (_b, _, _) = server.tutor(&s, &token("u2", &s, "student")).await;
    let mut c = server.wb_user(&s, "u3").await;
    a.barrier().await;
    c.barrier().await;
    for endpoint in ENDPOINTS {
        let resp = ws_upgrade_raw(
            server.addr,
            &with_token(&path_for(endpoint, &s), &token("u4", &s, "student")),
            &[],
        )
        .await;
        assert_refusal(
            &resp,
            503,
            None,
            &format!("{endpoint}: fourth connection with max_connections = 3"),
        );
    }
}
