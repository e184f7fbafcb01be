//! The corpus through a real server: as a whiteboard frame from a student and from a viewer,
//! as an HTTP POST body, then a restart on the same data.

use super::*;

/// The frames a WebSocket client sends for a corpus file.
fn frames(entry: &Entry) -> Vec<Vec<u8>> {
    let wrap = |prefix: &[u8], payload: &[u8]| {
        let mut f = prefix.to_vec();
        write_var_buf(&mut f, payload);
        f
    };
    match entry.kind {
        Kind::Update => vec![wrap(&[0, 2], &entry.bytes)],
        Kind::Updates => split_updates(&entry.bytes)
            .into_iter()
            .map(|u| wrap(&[0, 2], u))
            .collect(),
        Kind::Sv => vec![wrap(&[0, 0], &entry.bytes)],
        Kind::Awareness => vec![wrap(&[1], &entry.bytes)],
        Kind::Frame => vec![entry.bytes.clone()],
    }
}

/// Sends step 1 and reads to its answer: `Ok` while the connection is open, `Err(code)`
/// once the server closed it.
async fn settle(c: &mut WbClient) -> Result<(), Option<u16>> {
    if let Some(code) = c.closed {
        return Err(code);
    }
    let sv = yrs::ReadTxn::state_vector(&c.doc.transact());
    if c.try_send_raw(encode_msg(&Message::Sync(SyncMessage::SyncStep1(sv))))
        .await
        .is_err()
    {
        return Err(c.expect_close(TIMEOUT).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_event(left).await {
            WbEvent::Msg(Message::Sync(SyncMessage::SyncStep2(_)), _) => return Ok(()),
            WbEvent::Msg(..) | WbEvent::Text(_) => {}
            WbEvent::Close(code, _) => return Err(code),
            WbEvent::End(_) => return Err(None),
            WbEvent::Timeout => panic!("no answer to sync step 1 within 20 s"),
        }
    }
}

/// Sends every frame, stopping once the server has closed the connection (checked every
/// 50 frames: a client that writes on into a closed connection could block on a full
/// socket buffer).
async fn send_all(c: &mut WbClient, frames: &[Vec<u8>]) {
    for (i, f) in frames.iter().enumerate() {
        if c.try_send_raw(f.clone()).await.is_err() {
            break;
        }
        if (i + 1) % 50 == 0 && settle(c).await.is_err() {
            break;
        }
    }
}

/// What a connection's end must look like after the file was sent.
fn assert_ws_outcome(entry: &Entry, who: &str, outcome: Result<(), Option<u16>>) {
    let ok = match entry.verdict {
        Verdict::Refuse if entry.kind == Kind::Frame => {
            matches!(outcome, Err(Some(1007 | 1003)))
        }
        Verdict::Refuse => outcome == Err(Some(1007)),
        Verdict::Drop => outcome.is_ok(),
        // A frame packed with messages may be rate limited (1008) instead, once the rate
        // limit counts messages (SPEC.md 7.1); either way the process serves on.
        Verdict::Accept if entry.kind == Kind::Frame => {
            matches!(outcome, Ok(()) | Err(Some(1008 | 1013)))
        }
        Verdict::Accept => outcome.is_ok(),
    };
    assert!(ok, "{}: {who} ended with {outcome:?}", entry.file);
}

fn api_path(session: &str) -> String {
    format!("/api/v2/session/{session}/whiteboard")
}

/// Replays one file in its own session; returns the session id and the witness's key.
async fn replay(server: &TestServer, entry: &Entry) -> String {
    let s = session_id("hostile");
    let mut witness = server.wb_user(&s, "witness").await;
    witness.map_set("board", "before", "1").await;
    witness.barrier().await;
    let frames = frames(entry);

    let mut student = server.wb_user(&s, "student").await;
    send_all(&mut student, &frames).await;
    let outcome = settle(&mut student).await;
    assert_ws_outcome(entry, "student", outcome);

    let mut viewer = server.wb(&s, &token("viewer", &s, "viewer")).await;
    send_all(&mut viewer, &frames).await;
    let outcome = settle(&mut viewer).await;
    // A viewer's well-formed update is not applied (permission denied, connection open).
    assert_ws_outcome(entry, "viewer", outcome);

    // The same bytes as HTTP POST bodies (a stream: in order, to the first refusal).
    let t = token("poster", &s, "student");
    let bodies: Vec<Vec<u8>> = match entry.kind {
        Kind::Updates => split_updates(&entry.bytes)
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect(),
        _ => vec![entry.bytes.clone()],
    };
    let mut statuses = Vec::new();
    for body in &bodies {
        let r = server
            .api("POST", &api_path(&s), Some(&t), Some(body))
            .await;
        statuses.push(r.status);
        if r.status != 204 {
            break;
        }
    }
    let last = statuses.last().copied().unwrap_or_default();
    match (entry.kind, entry.verdict) {
        (Kind::Update | Kind::Updates, Verdict::Accept) => assert_eq!(last, 204, "{}", entry.file),
        (Kind::Update | Kind::Updates, _) => {
            assert!(matches!(last, 400 | 413), "{}: {statuses:?}", entry.file)
        }
        // Not updates: refused as one when the guard refuses them, never a server error.
        _ => {
            let as_update = NestingIndex::default().check(&entry.bytes, MAX_NESTING);
            if as_update.is_err() {
                assert!(matches!(last, 400 | 413), "{}: {statuses:?}", entry.file);
            } else {
                assert!(matches!(last, 204 | 400), "{}: {statuses:?}", entry.file);
            }
        }
    }

    // The process is up, and the witness, which saw none of it fail, still converges.
    let r = server.http_get("/healthz").await;
    assert_eq!(r.status, 200, "{}: /healthz", entry.file);
    assert_eq!(
        settle(&mut witness).await,
        Ok(()),
        "{}: witness",
        entry.file
    );
    witness.map_set("board", "after", &entry.file).await;
    let mut late = server.wb_user(&s, "late").await;
    late.wait_doc("the witness's keys", |c| {
        c.map_get("board", "before").as_deref() == Some("1")
            && c.map_get("board", "after").as_deref() == Some(entry.file.as_str())
    })
    .await;
    // Nothing of a refused frame was applied, not even its valid first message.
    assert_eq!(late.map_get("board", "never"), None, "{}", entry.file);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_corpus_file_is_refused_over_the_wire_and_leaves_no_poison_in_the_store() {
    let started = std::time::Instant::now();
    let mut server = TestServer::start("");
    let _tmp = server.take_tempdir();
    let data_dir = server.data_dir.clone();
    let mut sessions = Vec::new();
    for entry in corpus() {
        let s = replay(&server, &entry).await;
        sessions.push((s, entry.file));
    }

    // Every session, with whatever the server accepted of the corpus, loads again.
    server.stop_graceful().await;
    drop(server);
    let server = TestServer::start_in(&data_dir, "");
    for (s, file) in &sessions {
        let mut c = server.wb_user(s, "after-restart").await;
        c.wait_doc("the witness's keys after a restart", |c| {
            c.map_get("board", "after").as_deref() == Some(file.as_str())
        })
        .await;
        assert_eq!(settle(&mut c).await, Ok(()), "{file}: after restart");
    }
    let r = server.http_get("/healthz").await;
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "{:?}",
        started.elapsed()
    );
}
