//! Micro-benchmarks of the relay's hot path (criterion): frame decode, the update guard and
//! update apply, fan-out
//! encode, awareness relay, and snapshot encode/decode of a ~20 MB document built from a
//! realistic stroke workload. Results and commands: BENCHMARKS.md.
//!
//! `cargo bench -p easel-bench --bench hot_path` (all), or e.g.
//! `cargo bench -p easel-bench --bench hot_path -- fanout`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Message;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::SeedableRng;
use yrs::sync::{Awareness, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, Map, ReadTxn, StateVector, Transact, Update};

use easel::metrics::Metrics;
use easel::protocol::wire;
use easel::session::whiteboard::{Whiteboard, WhiteboardOptions};
use easel::store::{MemoryStore, SledStore, Store};
use easel::ws::outbox::{outbox, OutboxReceiver};
use easel_bench::workload;

fn options() -> WhiteboardOptions {
    WhiteboardOptions {
        snapshot_every_updates: u64::MAX,
        // The benches grow one document by hundreds of MB of strokes and never snapshot it.
        limits: easel::config::LimitsConfig {
            max_doc_bytes: usize::MAX,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A client that draws strokes of about `payload` bytes; each call gives the next update.
struct Writer {
    doc: Doc,
    rng: StdRng,
    seq: u32,
    points: usize,
}

impl Writer {
    fn new(client: u64, payload: usize) -> Self {
        Self {
            doc: Doc::with_client_id(client),
            rng: StdRng::seed_from_u64(client),
            seq: 0,
            points: workload::points_for_payload(payload),
        }
    }

    fn next(&mut self) -> Vec<u8> {
        let map = self.doc.get_or_insert_map(workload::STROKES);
        let key = format!("bench.{}", self.seq);
        let marker = workload::update_marker(0, self.seq, 1_234_567);
        let value = workload::stroke(&mut self.rng, &key, "bench", &marker, self.points);
        self.seq += 1;
        let mut txn = self.doc.transact_mut();
        map.insert(&mut txn, key.as_str(), value);
        txn.encode_update_v1()
    }
}

fn whiteboard(store: Arc<dyn Store>, seed_bytes: usize) -> Whiteboard {
    let wb =
        Whiteboard::load("bench".into(), store, Arc::new(Metrics::new()), options()).expect("load");
    if seed_bytes > 0 {
        let doc = workload::build_document(seed_bytes, 7);
        let state = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        wb.apply_update(None, &state, None).expect("seed");
    }
    wb
}

fn drain(receivers: &mut [OutboxReceiver]) {
    for rx in receivers.iter_mut() {
        while rx.try_recv().is_some() {}
    }
}

fn frame_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_decode");
    let mut w = Writer::new(1, 500);
    let update = wire::update(w.next());
    g.throughput(Throughput::Bytes(update.len() as u64));
    g.bench_function("update_500B", |b| {
        b.iter(|| wire::decode_frame(std::hint::black_box(&update)).unwrap())
    });
    let mut aw = Awareness::new(Doc::with_client_id(9));
    aw.set_local_state_raw(
        r##"{"user":{"name":"user-1","color":"#1e88e5"},"cursor":{"x":812,"y":377}}"##,
    );
    let awareness = wire::awareness(aw.update().unwrap());
    g.throughput(Throughput::Bytes(awareness.len() as u64));
    g.bench_function("awareness_cursor", |b| {
        b.iter(|| wire::decode_frame(std::hint::black_box(&awareness)).unwrap())
    });
    g.finish();
}

fn update_apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("update_apply");
    // A whiteboard already holding ~1 MB of strokes, as in a lesson well under way.
    let mut w = Writer::new(2, 500);
    let yrs_doc = workload::build_document(1 << 20, 7);
    // The update guard alone (SPEC 7.1), against an index of the same ~1 MB document: what
    // every update pays before yrs decodes it.
    let mut index = easel::doc::guard::NestingIndex::default();
    let seeded = index
        .check(
            &yrs_doc
                .transact()
                .encode_state_as_update_v1(&StateVector::default()),
            64,
        )
        .expect("seed passes the guard");
    index.commit(seeded);
    let mut gw = Writer::new(3, 500);
    g.bench_function("guard_only_500B", |b| {
        b.iter_batched(
            || gw.next(),
            |u| index.check(std::hint::black_box(&u), 64).expect("guard"),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("yrs_only_500B", |b| {
        b.iter_batched(
            || w.next(),
            |u| {
                let mut txn = yrs_doc.transact_mut();
                txn.apply_update(Update::decode_v1(&u).unwrap()).unwrap();
            },
            BatchSize::SmallInput,
        )
    });
    let mem = whiteboard(Arc::new(MemoryStore::new(20)), 1 << 20);
    let mut w = Writer::new(3, 500);
    g.bench_function("whiteboard_memory_store_500B", |b| {
        b.iter_batched(
            || w.next(),
            |u| mem.apply_update(Some(1), &u, None).unwrap(),
            BatchSize::SmallInput,
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let sled: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 100, 20, None).unwrap());
    let on_disk = whiteboard(sled, 1 << 20);
    let mut w = Writer::new(4, 500);
    g.bench_function("whiteboard_sled_store_500B", |b| {
        b.iter_batched(
            || w.next(),
            |u| on_disk.apply_update(Some(1), &u, None).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    let mut w = Writer::new(5, 500);
    let u = w.next();
    g.bench_function("encode_update_frame_500B", |b| {
        b.iter(|| wire::update(std::hint::black_box(&u).to_vec()))
    });
    for peers in [10usize, 100] {
        let wb = whiteboard(Arc::new(MemoryStore::new(20)), 0);
        let mut receivers = Vec::new();
        for id in 0..peers as u64 {
            let (tx, rx) = outbox(16 << 20);
            wb.join(id + 10, tx);
            receivers.push(rx);
        }
        let mut w = Writer::new(6 + peers as u64, 500);
        g.throughput(Throughput::Elements(peers as u64));
        g.bench_function(format!("apply_and_relay_to_{peers}_peers"), |b| {
            b.iter_batched(
                || {
                    drain(&mut receivers);
                    let u = w.next();
                    let frame = wire::update(u.clone());
                    (u, frame)
                },
                |(u, frame)| {
                    let msg = Bytes::copy_from_slice(&frame);
                    wb.apply_update(Some(1), &u, Some(msg)).unwrap()
                },
                BatchSize::SmallInput,
            )
        });
        // The relay alone: one shared frame pushed to every peer's queue.
        let frame = Message::Binary(wire::update(u.clone()));
        let senders: Vec<_> = (0..peers)
            .map(|_| outbox(usize::MAX / 2))
            .collect::<Vec<_>>();
        let (txs, mut rxs): (Vec<_>, Vec<_>) = senders.into_iter().unzip();
        g.bench_function(format!("outbox_push_to_{peers}_peers"), |b| {
            b.iter_batched(
                || drain(&mut rxs),
                |_| {
                    for tx in &txs {
                        tx.send(frame.clone());
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn awareness_relay(c: &mut Criterion) {
    let mut g = c.benchmark_group("awareness_relay");
    for peers in [10usize, 100] {
        let wb = whiteboard(Arc::new(MemoryStore::new(20)), 0);
        let mut receivers = Vec::new();
        for id in 0..peers as u64 {
            let (tx, rx) = outbox(16 << 20);
            wb.join(id + 10, tx);
            receivers.push(rx);
        }
        let mut aw = Awareness::new(Doc::with_client_id(77));
        let mut announced = HashSet::new();
        let mut x = 0u32;
        g.throughput(Throughput::Elements(peers as u64));
        g.bench_function(format!("cursor_to_{peers}_peers"), |b| {
            b.iter_batched(
                || {
                    drain(&mut receivers);
                    x = (x + 7) % 1600;
                    aw.set_local_state_raw(format!(
                        r##"{{"user":{{"name":"user-1","color":"#1e88e5"}},"cursor":{{"x":{x},"y":377}}}}"##
                    ));
                    wire::awareness(aw.update().unwrap())
                },
                |frame| {
                    // What the socket handler does: decode the frame, apply, relay. Outside
                    // a runtime nothing times a tick, so every change is relayed at once.
                    for m in wire::decode_frame(&frame).unwrap() {
                        if let wire::Inbound::Awareness { update, .. } = m {
                            wb.apply_awareness(update, &mut announced);
                        }
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn snapshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot_20MB");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    let doc = workload::build_document(20_000_000, 42);
    let state = doc
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    let strokes = doc
        .transact()
        .get_map(workload::STROKES)
        .map(|m| m.len(&doc.transact()))
        .unwrap_or(0);
    eprintln!(
        "snapshot_20MB: document of {} bytes, {} live strokes",
        state.len(),
        strokes
    );
    g.throughput(Throughput::Bytes(state.len() as u64));
    g.bench_function("encode_state", |b| {
        b.iter(|| {
            doc.transact()
                .encode_state_as_update_v1(&StateVector::default())
        })
    });
    g.bench_function("encode_sync_step2_frame", |b| {
        b.iter(|| {
            yrs::sync::Message::Sync(SyncMessage::SyncStep2(
                doc.transact()
                    .encode_state_as_update_v1(&StateVector::default()),
            ))
            .encode_v1()
        })
    });
    g.bench_function("decode_and_load", |b| {
        b.iter(|| {
            let fresh = Doc::new();
            fresh
                .transact_mut()
                .apply_update(Update::decode_v1(&state).unwrap())
                .unwrap();
            fresh
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    frame_decode,
    update_apply,
    fanout,
    awareness_relay,
    snapshot
);
criterion_main!(benches);
