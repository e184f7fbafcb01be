//! The guard's promise: whatever `NestingIndex::check` passes, yrs decodes and integrates
//! without panicking or overflowing its stack, and the result reads back as JSON.
//!
//! Strict on purpose: a panic in yrs's integration is a finding here even though the
//! whiteboard catches it (and rolls back); a stack overflow or abort would kill the server.
//! An update that waits for content the document lacks is skipped, as the whiteboard holds
//! it back instead of giving it to yrs (`whiteboard_restore` drives such updates in order):
//! applied alone, every one of them re-found yrs's `find_index` panic (`fixtures/hostile/open`).
#![no_main]

use easel::doc::guard::NestingIndex;
use libfuzzer_sys::fuzz_target;
use yrs::updates::decoder::Decode;
use yrs::{Doc, Transact, Update};

fuzz_target!(|data: &[u8]| {
    match NestingIndex::default().check(data, easel_fuzz::limits().max_nesting) {
        Ok(checked) if !checked.waits => {}
        _ => return,
    }
    let Ok(update) = Update::decode_v1(data) else {
        return;
    };
    let doc = Doc::new();
    let _ = doc.transact_mut().apply_update(update);
    let _ = easel::doc::json::doc_to_json(&doc);
});
