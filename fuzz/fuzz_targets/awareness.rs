//! An awareness payload: decoded as the wire decoder does (structure only), then handed
//! to a whiteboard, which bounds it (SPEC.md 7.1) and applies it; and through the guard
//! with the server's limits.
#![no_main]

use std::collections::HashSet;

use easel::doc::guard::decode_awareness;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    easel_fuzz::server_panic_semantics();
    let limits = easel_fuzz::limits();
    let _ = decode_awareness(data, easel::protocol::wire::MAX_AWARENESS_ENTRIES, limits.max_awareness_state_bytes, limits.max_nesting);
    let Ok(update) = decode_awareness(data, usize::MAX, usize::MAX, usize::MAX) else {
        return;
    };
    let wb = easel_fuzz::whiteboard();
    let mut announced = HashSet::new();
    wb.apply_awareness(update, &mut announced);
    let _ = wb.awareness_states();
    wb.leave(1, &announced);
});
