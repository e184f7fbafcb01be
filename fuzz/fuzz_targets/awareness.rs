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
    let mut message = vec![1u8];
    let mut len = data.len() as u64;
    loop {
        let b = (len & 0x7f) as u8;
        len >>= 7;
        message.push(if len == 0 { b } else { b | 0x80 });
        if len == 0 {
            break;
        }
    }
    message.extend_from_slice(data);
    let mut announced = HashSet::new();
    wb.apply_awareness(update, message.into(), &mut announced);
    let _ = wb.awareness_states();
    wb.leave(1, &announced);
});
