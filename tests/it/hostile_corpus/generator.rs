//! The generator of the corpus: `cargo test --test it -- --ignored make_corpus` writes
//! `fixtures/hostile/`.

use super::*;

fn var(out: &mut Vec<u8>, n: u64) {
    write_var_uint(out, n)
}

fn string(out: &mut Vec<u8>, s: &str) {
    write_var_buf(out, s.as_bytes())
}

/// The start of an update with one struct of `client` at clock 0 whose parent is key "k"
/// of root map "m", with `info`'s content ref; the content and delete set follow.
fn one_struct(client: u64, info: u8) -> Vec<u8> {
    let mut b = Vec::new();
    var(&mut b, 1);
    var(&mut b, 1);
    var(&mut b, client);
    var(&mut b, 0);
    b.push(0b0010_0000 | info);
    var(&mut b, 1);
    string(&mut b, "m");
    string(&mut b, "k");
    b
}

/// A string item (`"v"` at m.k), complete with an empty delete set.
fn string_item(client: u64) -> Vec<u8> {
    let mut b = one_struct(client, 4);
    string(&mut b, "v");
    var(&mut b, 0);
    b
}

fn type_item(type_ref: u8, tail: &[u8]) -> Vec<u8> {
    let mut b = one_struct(1, 7);
    b.push(type_ref);
    b.extend_from_slice(tail);
    var(&mut b, 0);
    b
}

fn deep_json(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn awareness_payload(entries: &[(u64, u32, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    var(&mut b, entries.len() as u64);
    for (client, clock, json) in entries {
        var(&mut b, *client);
        var(&mut b, u64::from(*clock));
        write_var_buf(&mut b, json);
    }
    b
}

fn update_stream(updates: &[Vec<u8>]) -> Vec<u8> {
    let mut b = Vec::new();
    for u in updates {
        b.extend_from_slice(&(u.len() as u32).to_be_bytes());
        b.extend_from_slice(u);
    }
    b
}

/// The map chain `m.k.k.k…`, `levels` maps below root "m": one update, or one per level.
fn map_chain(levels: usize, one_update: bool) -> Vec<Vec<u8>> {
    let doc = Doc::with_client_id(1);
    let root = doc.get_or_insert_map("m");
    let mut updates = Vec::new();
    let mut parent: Option<MapRef> = None;
    let mut txn = doc.transact_mut();
    for _ in 0..levels {
        let child = match &parent {
            None => root.insert(&mut txn, "k", MapPrelim::default()),
            Some(p) => p.insert(&mut txn, "k", MapPrelim::default()),
        };
        parent = Some(child);
        if !one_update {
            updates.push(txn.encode_update_v1());
            drop(txn);
            txn = doc.transact_mut();
        }
    }
    if one_update {
        updates.push(txn.encode_update_v1());
    }
    updates
}

#[test]
#[ignore = "writes fixtures/hostile/; run by hand to regenerate the corpus"]
fn make_corpus() {
    let big_client = 1u64 << 53;
    let mut files: Vec<(&str, Vec<u8>)> = Vec::new();

    // Updates.
    files.push(("update.refuse.any-7000-deep.bin", deep_any_update(7_000)));
    files.push(("update.accept.any-64-deep.bin", deep_any_update(64)));
    files.push(("update.refuse.any-65-deep.bin", deep_any_update(65)));
    files.push((
        "update.refuse.map-chain-20000-one-update.bin",
        map_chain(20_000, true).remove(0),
    ));
    files.push(("update.refuse.client-id-2-53.bin", string_item(big_client)));
    files.push((
        "update.accept.client-id-2-53-minus-1.bin",
        string_item(big_client - 1),
    ));
    files.push(("update.refuse.delete-set-client-id-2-53.bin", {
        let mut b = vec![0, 1];
        var(&mut b, big_client);
        b.extend_from_slice(&[1, 0, 1]);
        b
    }));
    files.push(("update.refuse.delete-set-clock-len-overflow.bin", {
        let mut b = vec![0, 1, 1, 1];
        var(&mut b, u64::from(u32::MAX - 1));
        var(&mut b, 10);
        b
    }));
    files.push(("update.refuse.clock-overflow.bin", {
        let mut b = vec![1, 1, 1];
        var(&mut b, u64::from(u32::MAX));
        b.extend_from_slice(&string_item(1)[4..]);
        b
    }));
    files.push(("update.refuse.truncated.bin", {
        let u = map_set_update(5, "board", "key", "a value long enough to cut");
        u[..u.len() / 2].to_vec()
    }));
    files.push(("update.refuse.string-length-overflow.bin", {
        let mut b = one_struct(1, 4);
        var(&mut b, u64::from(u32::MAX));
        b.extend_from_slice(b"v");
        b
    }));
    files.push(("update.refuse.struct-count-2-32.bin", {
        let mut b = vec![1];
        var(&mut b, 1 << 32);
        b.extend_from_slice(&[1, 0]);
        b
    }));
    files.push(("update.refuse.client-count-2-40.bin", {
        let mut b = Vec::new();
        var(&mut b, 1 << 40);
        b.extend_from_slice(&[1, 1, 0]);
        b
    }));
    files.push(("update.refuse.any-array-count-2-40.bin", {
        let mut b = one_struct(1, 8);
        b.extend_from_slice(&[1, 117]);
        var(&mut b, 1 << 40);
        b.push(126);
        var(&mut b, 0);
        b
    }));
    files.push(("update.refuse.binary-length-overflow.bin", {
        let mut b = one_struct(1, 3);
        var(&mut b, 1 << 31);
        b.extend_from_slice(&[1, 2, 3]);
        b
    }));
    files.push(("update.accept.xml-element-type-ref.bin", {
        let mut tag = Vec::new();
        string(&mut tag, "div");
        type_item(3, &tag)
    }));
    files.push((
        "update.refuse.weak-link-type-ref.bin",
        type_item(7, &[1, 1, 0, 1, 0]),
    ));
    files.push(("update.refuse.unknown-type-ref.bin", type_item(200, &[])));
    files.push(("update.refuse.json-negative-count.bin", {
        let mut b = one_struct(1, 2);
        var(&mut b, u64::from(u32::MAX));
        var(&mut b, 0);
        b
    }));
    files.push(("update.refuse.json-count-2-30.bin", {
        let mut b = one_struct(1, 2);
        var(&mut b, 1 << 30);
        string(&mut b, "1");
        var(&mut b, 0);
        b
    }));
    files.push(("update.refuse.json-deep-string.bin", {
        let mut b = one_struct(1, 2);
        var(&mut b, 0);
        string(&mut b, &deep_json(100_000));
        var(&mut b, 0);
        b
    }));
    files.push(("update.refuse.own-parent.bin", {
        // An item whose parent is the type it would itself create.
        let mut b = vec![1, 1, 1, 0, 7];
        b.extend_from_slice(&[0, 1, 0]);
        b.push(1);
        var(&mut b, 0);
        b
    }));
    files.push(("update.refuse.json-content-does-not-round-trip.bin", {
        // Legacy JSON content holding "1": yrs 0.28.1 integrates it, then writes a state
        // it cannot read back.
        let mut b = one_struct(1, 2);
        var(&mut b, 0);
        string(&mut b, "1");
        var(&mut b, 0);
        b
    }));
    files.push((
        "updates.refuse.map-chain-20000-one-level-each.updates",
        update_stream(&map_chain(20_000, false)),
    ));

    // State vectors.
    files.push((
        "sv.refuse.count-bomb-gICAgAI.bin",
        vec![0x80, 0x80, 0x80, 0x80, 0x02],
    ));
    files.push(("sv.refuse.truncated.bin", vec![2, 1, 1]));

    // Awareness.
    files.push(("awareness.refuse.declares-1000000-clients.bin", {
        let mut b = Vec::new();
        var(&mut b, 1_000_000);
        b.extend_from_slice(&[1, 1, 2]);
        b.extend_from_slice(b"{}");
        b
    }));
    files.push((
        "awareness.drop.json-100000-deep.bin",
        awareness_payload(&[(7, 1, deep_json(100_000).as_bytes())]),
    ));
    files.push((
        "awareness.drop.json-30000-deep-under-64k.bin",
        awareness_payload(&[(7, 1, deep_json(30_000).as_bytes())]),
    ));
    files.push((
        "awareness.refuse.state-not-utf8.bin",
        awareness_payload(&[(7, 1, &[0xff, 0xfe, b'{'])]),
    ));
    files.push(("awareness.refuse.trailing-bytes.bin", {
        let mut b = awareness_payload(&[(7, 1, b"{}")]);
        b.push(0);
        b
    }));

    // Frames.
    files.push(("frame.accept.query-awareness-x100000.bin", vec![3; 100_000]));
    files.push((
        "frame.refuse.truncated-update-message.bin",
        vec![0, 2, 100, 1, 2, 3],
    ));
    files.push(("frame.refuse.length-overflow.bin", {
        let mut b = vec![0, 2];
        var(&mut b, u64::from(u32::MAX));
        b.extend_from_slice(&[0, 0]);
        b
    }));
    files.push(("frame.refuse.length-wider-than-u32.bin", {
        let mut b = vec![1];
        var(&mut b, 1 << 40);
        b
    }));
    files.push(("frame.refuse.unknown-message-type.bin", vec![9, 0]));
    files.push(("frame.refuse.unknown-sync-sub-type.bin", vec![0, 7, 0]));
    files.push((
        "frame.refuse.auth-truncated-reason.bin",
        vec![2, 0, 50, b'x'],
    ));
    files.push(("frame.refuse.valid-update-then-garbage.bin", {
        let mut b = update_msg(&map_set_update(9, "board", "never", "applied"));
        b.extend_from_slice(&[0, 2, 200]);
        b
    }));
    files.push(("frame.refuse.sv-bomb-in-step1.bin", {
        let mut b = vec![0, 0];
        write_var_buf(&mut b, &[0x80, 0x80, 0x80, 0x80, 0x02]);
        b
    }));

    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).expect("create fixtures/hostile");
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("write corpus file");
    }
}
