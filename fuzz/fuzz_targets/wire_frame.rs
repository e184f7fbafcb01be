//! `decode_frame` on any bytes a WebSocket client sends; every update it yields goes
//! through the guard, as the whiteboard handler does next.
#![no_main]

use easel::doc::guard::NestingIndex;
use easel::protocol::wire::{decode_frame, Inbound};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    easel_fuzz::server_panic_semantics();
    let frame = bytes::Bytes::copy_from_slice(data);
    if let Ok(messages) = decode_frame(&frame) {
        for m in messages {
            if let Inbound::Update { update, .. } | Inbound::SyncStep2 { update } = m {
                let _ = NestingIndex::default().check(&update, easel_fuzz::limits().max_nesting);
            }
        }
    }
});
