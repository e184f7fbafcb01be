//! Replays the Yjs update streams recorded from the real JS client (fixtures/*.updates,
//! see fixtures/README.md) through the server, and checks what other clients end up with.

use std::path::{Path, PathBuf};

use crate::support::*;
use serde_json::Value;
use yrs::sync::Message;
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

struct Fixture {
    name: String,
    updates: Vec<Vec<u8>>,
    meta: Value,
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn load_fixtures() -> Vec<Fixture> {
    let dir = fixtures_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_suffix(".updates").map(|s| s.to_string())
        })
        .collect();
    names.sort();
    assert!(
        !names.is_empty(),
        "no fixtures/*.updates files in {}",
        dir.display()
    );
    names
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(dir.join(format!("{name}.updates"))).unwrap();
            let mut updates = Vec::new();
            let mut pos = 0;
            while pos < bytes.len() {
                assert!(
                    pos + 4 <= bytes.len(),
                    "{name}.updates: truncated length at {pos}"
                );
                let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
                pos += 4;
                assert!(
                    pos + len <= bytes.len(),
                    "{name}.updates: truncated record at {pos}"
                );
                updates.push(bytes[pos..pos + len].to_vec());
                pos += len;
            }
            let meta_path = dir.join(format!("{name}.json"));
            let meta: Value = serde_json::from_slice(
                &std::fs::read(&meta_path)
                    .unwrap_or_else(|e| panic!("{}: {e}", meta_path.display())),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", meta_path.display()));
            if let Some(n) = meta["update_count"].as_u64() {
                assert_eq!(n as usize, updates.len(), "{name}: update_count vs records");
            }
            Fixture {
                name,
                updates,
                meta,
            }
        })
        .collect()
}

fn roots(f: &Fixture) -> Vec<(String, String)> {
    f.meta["roots"]
        .as_array()
        .unwrap_or_else(|| panic!("{}.json has no roots", f.name))
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Differences between a doc's content and the fixture's expectation (per root), and its state vector.
/// `want` overrides the expected content of some roots.
fn mismatches(
    f: &Fixture,
    doc: &Doc,
    want_override: &serde_json::Map<String, Value>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, kind) in roots(f) {
        let got = root_json(doc, &name, &kind);
        let want = want_override
            .get(&name)
            .unwrap_or(&f.meta["expected"][&name]);
        if normalize_numbers(&got) != normalize_numbers(want) {
            out.push(format!(
                "root {name:?} ({kind}):\n   got: {got}\n  want: {want}"
            ));
        }
    }
    if let Some(sv) = f.meta["state_vector"].as_object() {
        let have: StateVector = doc.transact().state_vector();
        for (client, clock) in sv {
            let id = yrs::ClientID::new(client.parse().unwrap());
            if have.get(&id) as u64 != clock.as_u64().unwrap() {
                out.push(format!(
                    "state vector: client {client} has clock {} want {clock}",
                    have.get(&id)
                ));
            }
        }
    }
    out
}

fn local_replay(f: &Fixture) -> Doc {
    let doc = Doc::new();
    for (i, u) in f.updates.iter().enumerate() {
        let upd = Update::decode_v1(u).unwrap_or_else(|e| panic!("{} record {i}: {e}", f.name));
        doc.transact_mut().apply_update(upd).unwrap();
    }
    doc
}

/// Roots where yrs itself (no server involved) does not reproduce the JS result: for those the
/// server can only be held to what yrs produces.
fn yrs_divergence(f: &Fixture) -> serde_json::Map<String, Value> {
    let doc = local_replay(f);
    let mut o = serde_json::Map::new();
    for (name, kind) in roots(f) {
        let got = root_json(&doc, &name, &kind);
        if normalize_numbers(&got) != normalize_numbers(&f.meta["expected"][&name]) {
            o.insert(name, got);
        }
    }
    o
}

/// Not a server test: checks that yrs alone reproduces what the JS client produced. A failure
/// here is a yrs/yjs divergence in the fixture (see the message), not an easel bug.
#[test]
fn fixtures_expected_content_matches_local_yrs_replay() {
    let mut failures = Vec::new();
    for f in load_fixtures() {
        let doc = local_replay(&f);
        // yrs re-encoding its own state must give the same content (what any server sends)
        let state = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let again = Doc::new();
        again
            .transact_mut()
            .apply_update(Update::decode_v1(&state).unwrap())
            .unwrap();
        for (name, kind) in roots(&f) {
            let a = root_json(&doc, &name, &kind);
            let b = root_json(&again, &name, &kind);
            if a != b {
                failures.push(format!(
                    "fixture {}: yrs state re-encoding changes root {name:?}:\n  applied: {a}\n  re-encoded: {b}",
                    f.name
                ));
            }
        }
        let m = mismatches(&f, &doc, &serde_json::Map::new());
        if !m.is_empty() {
            failures.push(format!(
                "fixture {} (yrs without server):\n{}",
                f.name,
                m.join("\n")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "yrs does not reproduce the JS result:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn fixtures_replayed_through_server_sync_to_second_client() {
    let fixtures = load_fixtures();
    let server = TestServer::start("");
    let mut failures = Vec::new();
    for f in &fixtures {
        let s = session_id(&format!("fixture-{}", f.name));
        let diverged = yrs_divergence(f);
        if !diverged.is_empty() {
            eprintln!(
                "note: fixture {}: yrs alone does not reproduce the JS content of roots {:?}; \
                 the server is compared with the yrs result for those",
                f.name,
                diverged.keys().collect::<Vec<_>>()
            );
        }
        // a live receiver (relay path) and the replaying client
        let mut live = server.wb_user(&s, "live").await;
        let mut w = server.wb_user(&s, "replayer").await;
        for u in &f.updates {
            // each record as its own sync update frame: [0, 2, varUint(len), bytes]
            let mut frame = vec![0u8, 2];
            write_var_buf(&mut frame, u);
            w.send_raw(frame).await;
        }
        // the server processed everything before answering this step 1
        w.barrier().await;
        let closed = w.received.iter().any(|m| matches!(m, Message::Auth(_)));
        assert!(
            !closed,
            "fixture {}: server sent auth to the replayer: {:?}",
            f.name, w.received
        );

        // a second client syncs from scratch
        let fresh = server.wb_user(&s, "fresh").await;
        let m = mismatches(f, &fresh.doc, &diverged);
        if !m.is_empty() {
            failures.push(format!(
                "fixture {}: a fresh client after sync:\n{}",
                f.name,
                m.join("\n")
            ));
        }

        // and the live client got everything relayed
        let want_sv: Vec<(u64, u64)> = f.meta["state_vector"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap()))
                    .collect()
            })
            .unwrap_or_default();
        let reached = |c: &WbClient| {
            let sv = c.doc.transact().state_vector();
            want_sv
                .iter()
                .all(|(id, clock)| sv.get(&yrs::ClientID::new(*id)) as u64 >= *clock)
        };
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !reached(&live) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match live.next_event(left).await {
                WbEvent::Msg(..) => {}
                other => {
                    failures.push(format!(
                        "fixture {}: the live client did not reach the state vector {:?} (has {:?}): {other:?}",
                        f.name,
                        want_sv,
                        live.doc.transact().state_vector()
                    ));
                    break;
                }
            }
        }
        let m = mismatches(f, &live.doc, &diverged);
        if !m.is_empty() {
            failures.push(format!(
                "fixture {}: the live client (relayed updates):\n{}",
                f.name,
                m.join("\n")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
