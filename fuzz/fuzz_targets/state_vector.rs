//! A client's state vector (sync step 1, `?sv=`): decoded through the guard, then used as
//! the server uses it, to encode the diff of a document with content.
#![no_main]

use easel::doc::guard::decode_state_vector;
use libfuzzer_sys::fuzz_target;
use yrs::{Doc, Map, ReadTxn, Text, Transact};

fuzz_target!(|data: &[u8]| {
    easel_fuzz::server_panic_semantics();
    let Ok(sv) = decode_state_vector(data) else {
        return;
    };
    let doc = Doc::with_client_id(7);
    let map = doc.get_or_insert_map("m");
    let text = doc.get_or_insert_text("t");
    {
        let mut txn = doc.transact_mut();
        map.insert(&mut txn, "k", "v");
        text.push(&mut txn, "hello");
        text.remove_range(&mut txn, 1, 2);
    }
    let txn = doc.transact();
    let _ = txn.encode_diff_v1(&sv);
    let _ = txn.state_vector() < sv;
});
