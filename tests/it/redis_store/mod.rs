//! The `Store` contract and the cluster methods of `RedisStore` against a real
//! `redis-server` (started per test by `support::RedisServer` on a free loopback port).
//! Two `RedisStore`s with different node ids stand for two nodes sharing one Redis.

mod chat;
mod cluster;
mod outage;
mod presence;
mod serve;
mod streams;
mod whiteboard;

use std::sync::Arc;

use easel::protocol::tutor::{ChatMessage, UserInfo};
use easel::store::{RedisStore, RedisTarget};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, Text, Transact};

use crate::support::*;

/// A store on `redis` for node `node`, keeping `keep` versions.
fn store(redis: &RedisServer, node: &str, keep: usize) -> Arc<RedisStore> {
    Arc::new(
        RedisStore::connect(RedisTarget::Url(redis.url()), node.into(), keep).expect("connect"),
    )
}

/// Runs one raw command on `redis`, as something else than easel would (damaged entries,
/// leftovers of a failed run).
fn raw(redis: &RedisServer, args: &[&str]) {
    let client = ::redis::Client::open(redis.url()).expect("client");
    let mut con = client.get_connection().expect("connection");
    let mut cmd = ::redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query::<::redis::Value>(&mut con).expect("raw command");
}

/// A chat entry that is not a message, under `id` of `key`.
fn xadd_not_a_message(redis: &RedisServer, key: &str, id: &str) {
    raw(redis, &["XADD", key, id, "n", "x", "m", "{not json"]);
}

/// `n` Yjs v1 updates, each inserting `"<tag><i>,"` at the end of root text `t`.
fn text_updates(tag: &str, n: usize) -> Vec<Vec<u8>> {
    let doc = Doc::new();
    let text = doc.get_or_insert_text("t");
    (0..n)
        .map(|i| {
            let mut txn = doc.transact_mut();
            let len = text.len(&txn);
            text.insert(&mut txn, len, &format!("{tag}{i},"));
            txn.encode_update_v1()
        })
        .collect()
}

/// Root text `t` of the document the updates build.
fn text_of(updates: &[Vec<u8>]) -> String {
    let doc = Doc::new();
    for update in updates {
        let update = yrs::Update::decode_v1(update).expect("a Yjs update");
        doc.transact_mut().apply_update(update).expect("applies");
    }
    let text = doc.get_or_insert_text("t");
    let txn = doc.transact();
    text.get_string(&txn)
}

/// The state and state vector of the document the updates build.
fn state_of(updates: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
    let doc = Doc::new();
    for update in updates {
        let update = yrs::Update::decode_v1(update).expect("a Yjs update");
        doc.transact_mut().apply_update(update).expect("applies");
    }
    let txn = doc.transact();
    (
        txn.encode_state_as_update_v1(&yrs::StateVector::default()),
        txn.state_vector().encode_v1(),
    )
}

fn chat_message(text: &str, from: &str) -> ChatMessage {
    ChatMessage {
        seq: 0,
        client_id: Some(format!("c-{text}")),
        from: UserInfo {
            id: from.into(),
            name: from.to_uppercase(),
            role: "student".into(),
        },
        text: text.into(),
        ts: "2026-01-01T00:00:00Z".into(),
        edited_at: None,
        deleted_at: None,
    }
}

/// Polls `done` every 20 ms for up to [`TIMEOUT`] (a condition wait, not a fixed sleep).
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "not within {TIMEOUT:?}: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
