//! The sequencer (issue #13 item 1): every change to a whiteboard, from a WebSocket client
//! or the HTTP API, is applied on an `easel-lane` thread of a small pool (one per core, at
//! least two), started on the first update; sessions come and go without adding threads.
//! Read from the real server's /proc entries.

use std::time::{Duration, Instant};

use crate::support::*;

/// The process's thread count (`Threads:` in /proc/<pid>/status).
fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a Threads line")
}

/// The names of the process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|comm| comm.trim().to_string())
        .collect()
}

/// How many of the process's threads are sequencers (named `easel-lane`).
fn sequencer_threads(pid: u32) -> usize {
    thread_names(pid)
        .iter()
        .filter(|n| *n == "easel-lane")
        .count()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns whether it held.
async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn updates_run_on_the_sequencer_pool_and_sessions_leave_no_threads_behind() {
    let server = TestServer::start("[sessions]\nidle_unload_s = 1\n");
    let pid = server.pid();
    assert_eq!(server.loaded_sessions().await, 0);
    assert_eq!(
        sequencer_threads(pid),
        0,
        "no update yet, no sequencer thread"
    );
    // The server runs on this machine: it sizes its pool as this would.
    let pool = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));

    let mut after_round = Vec::new();
    for round in 0..3u64 {
        // A session only read starts nothing (its client's empty step 2 is not queued).
        let reader = server.wb_user(&session_id("seq-read"), "bob").await;
        reader.close().await;
        if round == 0 {
            assert_eq!(
                sequencer_threads(pid),
                0,
                "a read-only session started a sequencer"
            );
        }
        // Three sessions written over WebSockets, one over HTTP.
        let mut writers = Vec::new();
        for i in 0..3 {
            let s = session_id(&format!("seq-ws{i}"));
            let mut wb = server.wb_user(&s, "alice").await;
            wb.map_set("m", "k", &format!("{round}")).await;
            wb.barrier().await;
            writers.push(wb);
        }
        let posted = session_id("seq-http");
        let update = map_set_update(7 + round, "m", "k", "posted");
        let r = server
            .api(
                "POST",
                &format!("/api/v2/session/{posted}/whiteboard"),
                Some(&token("carol", &posted, "student")),
                Some(&update),
            )
            .await;
        assert_eq!(r.status, 204, "{}", r.text());
        assert_eq!(
            sequencer_threads(pid),
            pool,
            "round {round}: the pool's threads, however many sessions write: {:?}",
            thread_names(pid)
        );
        for wb in writers {
            wb.close().await;
        }
        server
            .wait_loaded_sessions(0, Duration::from_secs(20))
            .await;
        assert_eq!(sequencer_threads(pid), pool, "round {round}");
        after_round.push(threads(pid));
    }
    // Later rounds of sessions add no thread: the count returns to what it was after the
    // first (tokio's blocking pool lets its idle threads go after 10 s, hence the wait).
    let base = after_round[0];
    assert!(
        eventually(Duration::from_secs(45), || threads(pid) <= base).await,
        "threads {} did not return to {base} (after each round: {after_round:?}): {:?}",
        threads(pid),
        thread_names(pid)
    );
}
