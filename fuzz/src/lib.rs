//! Helpers shared by the fuzz targets in `fuzz_targets/`.

use std::sync::{Arc, Once};

use easel::metrics::Metrics;
use easel::config::LimitsConfig;
use easel::session::whiteboard::{Whiteboard, WhiteboardOptions};
use easel::store::MemoryStore;
use yrs::updates::decoder::Decode;
use yrs::{Doc, Transact, Update};

/// The server's own limits (SPEC.md defaults).
pub fn limits() -> LimitsConfig {
    LimitsConfig::default()
}

/// libfuzzer-sys installs a panic hook that aborts, so a `catch_unwind` in the code under
/// test (the guard's around yrs's state vector and awareness decoders, the whiteboard's
/// around integration) would count as a crash although the server survives it. Restore the
/// default hook: a panic caught by the code under test is survived, as in the server; one
/// that escapes the target is still a crash (libfuzzer-sys aborts on it).
pub fn server_panic_semantics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = std::panic::take_hook();
    });
}

/// A whiteboard on a fresh in-memory store, configured as the server configures it.
pub fn whiteboard() -> Whiteboard {
    let options = WhiteboardOptions {
        snapshot_every_updates: u64::MAX,
        ..Default::default()
    };
    match Whiteboard::load(
        "fuzz".into(),
        Arc::new(MemoryStore::new(20)),
        Arc::new(Metrics::new()),
        options,
    ) {
        Ok(wb) => wb,
        Err(e) => panic!("a memory store cannot fail to load: {e}"),
    }
}

/// A document's content as JSON, from a Yjs v1 state the whiteboard encoded.
pub fn json_of(state: &[u8]) -> serde_json::Value {
    let doc = Doc::new();
    let update = match Update::decode_v1(state) {
        Ok(u) => u,
        Err(e) => panic!("the whiteboard encoded a state yrs cannot decode: {e}"),
    };
    if let Err(e) = doc.transact_mut().apply_update(update) {
        panic!("the whiteboard encoded a state yrs cannot apply: {e}");
    }
    easel::doc::json::doc_to_json(&doc)
}

/// Splits fuzz input as `fixtures/*.updates` are laid out: `[u32 big-endian length][bytes]`
/// repeated; a length past the end takes what remains. So the recorded fixtures are seeds.
pub fn chunks(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let rest = &data[4..];
        let len = len.min(rest.len());
        out.push(&rest[..len]);
        data = &rest[len..];
    }
    out
}
