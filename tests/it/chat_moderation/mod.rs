//! Correcting and moderating chat (SPEC 4.1): `edit`/`delete` and `mute`/`remove` on the
//! tutor WebSocket and over HTTP, with two students and a tutor; resumes that converge;
//! restarts that keep edits, deletions, mutes and bans; removed users refused on both
//! endpoints; and `easel store compact` purging a deleted message's text from disk.

mod durability;
mod http;
mod websocket;

use serde_json::Value;

use crate::support::*;

/// Waits for a message of type `ty` about `seq`.
async fn wait_seq(c: &mut TutorClient, ty: &str, seq: u64) -> Value {
    let t = ty.to_string();
    c.wait_for(&format!("{ty} of seq {seq}"), move |v| {
        v["type"] == t.as_str() && v["seq"] == seq
    })
    .await
}

/// The message with `seq` in a list of messages.
fn find(messages: &Value, seq: u64) -> Value {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("not a message list: {messages}"))
        .iter()
        .find(|m| m["seq"] == seq)
        .cloned()
        .unwrap_or_else(|| panic!("no seq {seq} in {messages}"))
}

/// A deleted message is exactly `{"seq","deleted":true,"deleted_at"}`.
fn assert_deleted_stub(m: &Value, seq: u64) {
    let keys: Vec<&str> = m
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {m}"))
        .keys()
        .map(String::as_str)
        .collect();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(keys, ["deleted", "deleted_at", "seq"], "deleted stub: {m}");
    assert_eq!(m["seq"], seq);
    assert_eq!(m["deleted"], true);
    assert!(
        is_rfc3339(m["deleted_at"].as_str().unwrap_or("")),
        "deleted_at: {m}"
    );
}

/// The entry of `user` in a `welcome`'s (or a `presence`'s) participants.
fn participant(welcome: &Value, user: &str) -> Value {
    welcome["participants"]
        .as_array()
        .unwrap_or_else(|| panic!("no participants: {welcome}"))
        .iter()
        .find(|p| p["id"] == user)
        .cloned()
        .unwrap_or_else(|| panic!("no participant {user} in {welcome}"))
}

fn messages_path(s: &str) -> String {
    format!("/api/v2/session/{s}/tutor/messages")
}
