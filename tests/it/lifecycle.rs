//! Process lifecycle (SPEC §1, §5.2, §6): HTTP health/metrics/status, graceful shutdown on
//! SIGTERM/SIGINT (1012, exit 0), configuration errors. Persistence across restarts is in
//! tests/it/persistence/.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn health_ready_metrics_status() {
    let server = TestServer::start("");
    let s = session_id("life-http");
    // one live connection so that the numbers have something to count
    let mut wb = server.wb_user(&s, "alice").await;
    wb.map_set("m", "k", "v").await;
    wb.barrier().await;

    let r = server.http_get("/healthz").await;
    assert_eq!(r.status, 200, "/healthz: {}", r.text());
    let r = server.http_get("/readyz").await;
    assert_eq!(r.status, 200, "/readyz: {}", r.text());

    let r = server.http_get("/metrics").await;
    assert_eq!(r.status, 200, "/metrics");
    let text = r.text();
    let metric_lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with("easel_"))
        .collect();
    assert!(
        !metric_lines.is_empty(),
        "/metrics has no easel_ samples:\n{text}"
    );
    for l in &metric_lines {
        let value = l.rsplit(' ').next().unwrap();
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "not a Prometheus sample line: {l:?}"
        );
    }

    let r = server.http_get("/api/v2/status").await;
    assert_eq!(r.status, 200, "/api/v2/status");
    let v = r.json();
    assert!(v["version"].is_string(), "status.version: {v}");
    assert!(v["uptime_s"].is_number(), "status.uptime_s: {v}");
    assert!(!v["connections"].is_null(), "status.connections: {v}");
    assert!(!v["sessions"].is_null(), "status.sessions: {v}");

    let r = server.http_get("/no/such/route").await;
    assert_eq!(r.status, 404);
}

async fn shutdown_with(signal: &str) {
    let mut server = TestServer::start("");
    let s = session_id("life-term");
    let mut wb = server.wb_user(&s, "alice").await;
    wb.map_set("m", "k", "v").await;
    wb.barrier().await;
    let (mut tc, _, _) = server.tutor(&s, &token("bob", &s, "student")).await;
    tc.barrier().await;

    let st = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(server.pid().to_string())
        .status()
        .expect("kill");
    assert!(st.success());

    let (wb_code, tc_code) = tokio::join!(
        wb.expect_close(Duration::from_secs(10)),
        tc.expect_close(Duration::from_secs(10))
    );
    assert_eq!(wb_code, Some(1012), "{signal}: whiteboard close code");
    assert_eq!(tc_code, Some(1012), "{signal}: tutor close code");
    let status = server
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("easel did not exit within 10 s of SIG{signal}"));
    assert!(status.success(), "exit status after SIG{signal}: {status}");
}

#[tokio::test]
async fn sigterm_closes_sockets_1012_and_exits_0() {
    shutdown_with("TERM").await;
}

#[tokio::test]
async fn sigint_closes_sockets_1012_and_exits_0() {
    shutdown_with("INT").await;
}

#[tokio::test]
async fn unknown_config_key_fails_startup_naming_it() {
    let err = match TestServer::try_start("[limits]\nmax_frame_bytez = 10\n", StartOpts::default())
    {
        Ok(_) => panic!("easel started with an unknown config key"),
        Err(e) => e,
    };
    assert!(
        err.contains("max_frame_bytez"),
        "start-up error does not name the key:\n{err}"
    );

    let err = match TestServer::try_start(
        "[limits]\nmax_frame_bytes = \"lots\"\n",
        StartOpts::default(),
    ) {
        Ok(_) => panic!("easel started with a bad config value"),
        Err(e) => e,
    };
    assert!(
        err.contains("max_frame_bytes"),
        "start-up error does not name the key:\n{err}"
    );
}
