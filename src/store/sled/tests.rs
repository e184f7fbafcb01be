//! Tests of the sled store through the [`Store`] seam: reopening, snapshots and pruning,
//! damage, chat seqs, the locked directory and a real full disk. One file beside the code
//! (not one per module): they share fixtures and each exercises several modules at once.

use super::keys::{describe_key, named_key, LAST_CHAT_SEQ};
use super::records::{
    decode_chat, decode_counter, decode_update, decode_updates, encode_counter, encode_update,
    encode_updates,
};
use super::*;
use crate::protocol::tutor::UserInfo;
use std::time::Duration;
use yrs::{GetString, ReadTxn, StateVector, Text, Transact};

const SESSION: &str = "room-1";

impl SledStore {
    fn t(&self) -> Arc<Trees> {
        self.shared.trees().unwrap()
    }
}

/// Opens `dir`, waiting out the lock of a store this test just dropped: sled's flusher
/// thread lets go of the directory a moment after the last handle is gone.
fn open(dir: &Path) -> SledStore {
    open_with(dir, 10, 3)
}

/// [`open`] with a flush interval (ms) and the versions to keep.
pub(super) fn open_with(dir: &Path, flush_ms: u64, keep: usize) -> SledStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match SledStore::open(dir, flush_ms, keep, None) {
            Ok(store) => return store,
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open: {e}"),
        }
    }
}

/// A Yjs v1 update inserting `text` into a fresh document's text `t`.
fn text_update(text: &str) -> Vec<u8> {
    let doc = yrs::Doc::new();
    let t = doc.get_or_insert_text("t");
    let mut txn = doc.transact_mut();
    t.insert(&mut txn, 0, text);
    txn.encode_update_v1()
}

/// The text `t` of a document built from `updates` in order.
fn text_of(updates: &[Vec<u8>]) -> String {
    use yrs::updates::decoder::Decode;
    let doc = yrs::Doc::new();
    let t = doc.get_or_insert_text("t");
    let mut txn = doc.transact_mut();
    for update in updates {
        txn.apply_update(yrs::Update::decode_v1(update).unwrap())
            .unwrap();
    }
    t.get_string(&txn)
}

/// The whole document of `updates` as (state, state vector).
fn merged_state(updates: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
    use yrs::updates::decoder::Decode;
    use yrs::updates::encoder::Encode;
    let doc = yrs::Doc::new();
    let mut txn = doc.transact_mut();
    for update in updates {
        txn.apply_update(yrs::Update::decode_v1(update).unwrap())
            .unwrap();
    }
    let state = txn.encode_state_as_update_v1(&StateVector::default());
    (state, txn.state_vector().encode_v1())
}

fn chat(seq: u64) -> ChatMessage {
    ChatMessage {
        seq,
        client_id: Some(format!("c{seq}")),
        from: UserInfo {
            id: "u1".into(),
            name: "Ada".into(),
            role: "tutor".into(),
        },
        text: format!("message {seq}"),
        ts: "2024-01-01T00:00:00Z".into(),
        ..Default::default()
    }
}

fn seqs(messages: &[ChatMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

fn versions(store: &SledStore, session: &str) -> Vec<u64> {
    let list = store.list_snapshots(session).unwrap();
    list.iter().map(|s| s.version).collect()
}

#[test]
fn log_and_snapshot_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let first = text_update("hello");
    let (state, sv) = merged_state(std::slice::from_ref(&first));
    let later = [text_update("A"), text_update("B")];
    {
        let store = open(dir.path());
        assert_eq!(store.load_whiteboard(SESSION).unwrap().updates.len(), 0);
        store.append_update(SESSION, 1, &first).unwrap();
        assert_eq!(store.write_snapshot(SESSION, &state, &sv, 1, 1).unwrap(), 1);
        for (seq, update) in (2..).zip(&later) {
            store.append_update(SESSION, seq, update).unwrap();
        }
        store.flush().unwrap();
    }
    let store = open(dir.path());
    let loaded = store.load_whiteboard(SESSION).unwrap();
    assert_eq!(loaded.snapshot_version, 1);
    assert_eq!(loaded.last_log_seq, 3);
    assert_eq!(
        loaded.updates,
        vec![state, later[0].clone(), later[1].clone()]
    );
    let text = text_of(&loaded.updates);
    assert!(text.contains("hello") && text.contains('A') && text.contains('B'));
    let info = store.list_snapshots(SESSION).unwrap();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].updates, 1);
    assert_eq!(info[0].bytes, loaded.updates[0].len() as u64);
    assert!(info[0].created_at_ms > 0);
}

/// A run of updates appended as one is one entry under the last one's seq: it loads (and
/// scans) back as its updates in order, between the entries before and after it, survives a
/// reopen, and a snapshot through its seq replaces it whole.
#[test]
fn a_run_of_updates_is_one_entry_that_loads_as_its_updates() {
    let dir = tempfile::tempdir().unwrap();
    let updates: Vec<Vec<u8>> = ["a", "b", "c", "d", "e"].map(text_update).to_vec();
    {
        let store = open(dir.path());
        store.append_update(SESSION, 1, &updates[0]).unwrap();
        let run: Vec<&[u8]> = updates[1..4].iter().map(Vec::as_slice).collect();
        assert_eq!(store.append_updates(SESSION, 2, &run).unwrap(), 4);
        assert_eq!(
            store.append_updates(SESSION, 5, &[]).unwrap(),
            4,
            "nothing to append"
        );
        store.append_updates(SESSION, 5, &[&updates[4]]).unwrap();
        assert_eq!(
            session_keys(&store.t().updates, SESSION).unwrap().len(),
            3,
            "one entry for the run"
        );
        store.flush().unwrap();
    }
    let store = open(dir.path());
    let loaded = store.load_whiteboard(SESSION).unwrap();
    assert_eq!(
        (loaded.updates.clone(), loaded.last_log_seq),
        (updates.clone(), 5)
    );
    assert_eq!(scanned(&store), (updates.clone(), 0, 5));
    let (state, sv) = merged_state(&updates[..4]);
    store.write_snapshot(SESSION, &state, &sv, 4, 4).unwrap();
    let loaded = store.load_whiteboard(SESSION).unwrap();
    assert_eq!(loaded.updates, vec![state.clone(), updates[4].clone()]);
    assert_eq!(scanned(&store), (vec![state, updates[4].clone()], 1, 5));
}

/// What `scan_whiteboard` hands over, in order: the records, which of them is the
/// snapshot (1: the first; 0: none), and the last log seq it returns.
fn scanned(store: &SledStore) -> (Vec<Vec<u8>>, usize, u64) {
    let (mut records, mut snapshot_at) = (Vec::new(), 0);
    let last = store
        .scan_whiteboard(SESSION, &mut |record| match record {
            StoredRecord::Snapshot { state, .. } => {
                records.push(state.to_vec());
                snapshot_at = records.len();
            }
            StoredRecord::Update(update) => records.push(update.to_vec()),
        })
        .unwrap();
    (records, snapshot_at, last)
}

#[test]
fn snapshot_replaces_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let updates = [text_update("a"), text_update("b"), text_update("c")];
    for (seq, update) in (1..).zip(&updates) {
        store.append_update(SESSION, seq, update).unwrap();
        store.append_update("other", seq, update).unwrap();
    }
    // An update appended while the snapshot of the first three was encoded.
    let late = text_update("d");
    store.append_update(SESSION, 4, &late).unwrap();
    let (state, sv) = merged_state(&updates);
    store.write_snapshot(SESSION, &state, &sv, 3, 3).unwrap();

    let loaded = store.load_whiteboard(SESSION).unwrap();
    assert_eq!(loaded.updates, vec![state.clone(), late.clone()]);
    assert_eq!(loaded.last_log_seq, 4);
    // Another session's log is untouched.
    assert_eq!(store.load_whiteboard("other").unwrap().updates.len(), 3);

    // Once the last entry is covered too, the seq counter still knows where it was.
    let (state, sv) = merged_state(&[updates.to_vec(), vec![late]].concat());
    store.write_snapshot(SESSION, &state, &sv, 1, 4).unwrap();
    assert!(session_keys(&store.t().updates, SESSION)
        .unwrap()
        .is_empty());
    let loaded = store.load_whiteboard(SESSION).unwrap();
    assert_eq!((loaded.updates.len(), loaded.last_log_seq), (1, 4));
    // Appends after the snapshot continue the log.
    store.append_update(SESSION, 5, &updates[0]).unwrap();
    assert_eq!(store.load_whiteboard(SESSION).unwrap().updates.len(), 2);
}

#[test]
fn keeps_newest_snapshots_and_never_reuses_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sv) = merged_state(&[text_update("x")]);
    {
        let store = open(dir.path()); // keep_snapshots = 3
        for expected in 1..=5 {
            assert_eq!(
                store.write_snapshot(SESSION, &state, &sv, 0, 0).unwrap(),
                expected
            );
        }
        assert_eq!(versions(&store, SESSION), vec![3, 4, 5]);
        assert_eq!(store.get_snapshot(SESSION, 1).unwrap(), None);
        assert_eq!(store.get_snapshot(SESSION, 5).unwrap(), Some(state.clone()));
    }
    let store = open(dir.path());
    assert_eq!(store.write_snapshot(SESSION, &state, &sv, 0, 0).unwrap(), 6);
    // Even with every stored version gone, the counter in meta goes on.
    // Even with every stored version and file gone, the counter in meta goes on.
    for key in session_keys(&store.t().snapshots, SESSION).unwrap() {
        store.t().snapshots.remove(key).unwrap();
    }
    std::fs::remove_dir_all(store.shared.versions_dir(SESSION)).unwrap();
    assert_eq!(store.write_snapshot(SESSION, &state, &sv, 0, 0).unwrap(), 7);
    assert_eq!(versions(&store, SESSION), vec![7]);
}

#[test]
fn damaged_newest_snapshot_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = SledStore::open(dir.path(), 10, 5, Some(metrics.clone())).unwrap();
    let (old_state, old_sv) = merged_state(&[text_update("old")]);
    let (new_state, new_sv) = merged_state(&[text_update("new")]);
    store
        .write_snapshot(SESSION, &old_state, &old_sv, 1, 0)
        .unwrap();
    store
        .write_snapshot(SESSION, &new_state, &new_sv, 1, 0)
        .unwrap();
    store
        .t()
        .snapshots
        .insert(numbered_key(SESSION, 2), &b"garbage, not a snapshot"[..])
        .unwrap();
    // A log entry that does not decode is skipped too.
    store
        .append_update(SESSION, 1, &text_update("log"))
        .unwrap();
    store
        .t()
        .updates
        .insert(numbered_key(SESSION, 999), &[9u8, 1, 2][..])
        .unwrap();

    // Version 2's file is intact: the load takes it (damage counted: the record, the
    // loss the file repairs, the log entry).
    let loaded = store.load_whiteboard(SESSION).unwrap();
    assert_eq!(loaded.snapshot_version, 2);
    assert_eq!(loaded.updates[0], new_state);
    assert_eq!(loaded.updates.len(), 2);
    assert_eq!(metrics.store_decode_errors.get(), 3);
    assert_eq!(store.get_snapshot(SESSION, 2).unwrap(), Some(new_state));

    // Without the file, the previous version is used.
    std::fs::remove_file(store.shared.versions_dir(SESSION).join("2.yjs")).unwrap();
    let before = metrics.store_decode_errors.get();
    let loaded = store.load_whiteboard(SESSION).unwrap();
    assert_eq!(loaded.snapshot_version, 1);
    assert_eq!(loaded.updates.len(), 2);
    assert_eq!(loaded.updates[0], old_state);
    assert_eq!(metrics.store_decode_errors.get(), before + 2);

    assert_eq!(versions(&store, SESSION), vec![1]);
    assert!(matches!(
        store.get_snapshot(SESSION, 2),
        Err(StoreError::Corrupt(_))
    ));
}

#[test]
fn chat_seqs_are_reserved_ahead_so_a_crash_never_reuses_one() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        for seq in 1..=5 {
            store.append_chat(SESSION, &chat(seq), 100).unwrap();
        }
        // Within one process, the real last seq (an unload and reload leaves no gap).
        assert_eq!(store.last_chat_seq(SESSION).unwrap(), 5);
        // Dropped without close(): as after a kill -9.
    }
    let store = open(dir.path());
    let after_crash = store.last_chat_seq(SESSION).unwrap();
    assert_eq!(after_crash, CHAT_SEQ_BLOCK);
    store
        .append_chat(SESSION, &chat(after_crash + 1), 100)
        .unwrap();
    store.close().unwrap();
    drop(store);
    // A clean close gives the unused reservation back: no gap after a clean restart.
    let store = open(dir.path());
    assert_eq!(store.last_chat_seq(SESSION).unwrap(), after_crash + 1);
    // A message posted after close() (a connection still draining) reserves anew on
    // disk, so a crash right after it still never hands its seq out again.
    store
        .append_chat(SESSION, &chat(after_crash + 2), 100)
        .unwrap();
    store.close().unwrap();
    store
        .append_chat(SESSION, &chat(after_crash + 3), 100)
        .unwrap();
    let t = store.shared.trees().unwrap();
    let reserved = store
        .shared
        .read_counter(&t, SESSION, CHAT_SEQ_RESERVED)
        .unwrap()
        .unwrap_or(0);
    assert!(reserved >= after_crash + 3, "reserved on disk: {reserved}");
}

#[test]
fn snapshot_versions_are_files_too_and_pruned_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()); // keep_snapshots = 3
    let (state, sv) = merged_state(&[text_update("x")]);
    for _ in 0..5 {
        store.write_snapshot(SESSION, &state, &sv, 0, 0).unwrap();
    }
    let folder = dir.path().join(VERSIONS_DIR).join(SESSION);
    assert_eq!(version_files_in(&folder), vec![3, 4, 5]);
    assert_eq!(std::fs::read(folder.join("5.yjs")).unwrap(), state);
}

/// sled meeting a full disk itself (writes faster than the monitor looks): the store
/// refuses writes, and once space is back reopens sled and writes again, in process.
/// Needs root (a small tmpfs); skipped otherwise.
#[test]
fn a_sled_write_failure_is_recovered_by_reopening() {
    let Some(fs) = SmallTmpfs::mount() else {
        return;
    };
    let mount = fs.path.clone();
    let store = SledStore::open(&mount, 60_000, 3, None).unwrap();
    store
        .append_update(SESSION, 1, &text_update("kept"))
        .unwrap();
    store.flush().unwrap();
    // Were the monitor to tick while the last MiB fills, it would refuse writes before sled
    // meets the full disk (seen once in a parallel run): this test is about sled's failure.
    unpoisoned(store.shared.health.lock()).no_space_check = true;
    let filler = fs.fill();
    // Free a little, so sled's first buffer fits and a later one does not.
    let len = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(len - (2 << 20))
        .unwrap();
    let update = vec![1u8; 2000];
    let mut failed_at = None;
    for seq in 2..20_000u64 {
        if store.append_update(SESSION, seq, &update).is_err() {
            failed_at = Some(seq);
            break;
        }
    }
    let failed_at = failed_at.expect("no write failed on a full disk");
    assert!(
        unpoisoned(store.shared.health.lock()).sled_failed,
        "the guard refused first: sled never met the full disk"
    );
    assert!(store.check().is_err());
    assert!(store
        .append_update(SESSION, failed_at + 1, &update)
        .is_err());
    std::fs::remove_file(&filler).unwrap();
    wait_until_writable(&store);
    store
        .append_update(SESSION, failed_at + 2, &text_update("after"))
        .unwrap();
    store.flush().unwrap();
    let loaded = store.load_whiteboard(SESSION).unwrap();
    let text = text_of(
        &loaded
            .updates
            .iter()
            .filter(|u| u.len() != 2000)
            .cloned()
            .collect::<Vec<_>>(),
    );
    assert!(text.contains("kept") && text.contains("after"), "{text}");
    // The entry whose write failed is not there to be replayed as accepted.
    assert!(store
        .t()
        .updates
        .get(numbered_key(SESSION, failed_at))
        .unwrap()
        .is_none());
}

#[test]
fn stale_generating_snapshot_files_do_not_stop_an_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.append_update(SESSION, 1, &text_update("a")).unwrap();
        store.close().unwrap();
    }
    // What sled leaves when a start meets a full disk.
    std::fs::write(dir.path().join("snap.FFFFFFFFFFFFFFFF.generating"), b"").unwrap();
    let store = open(dir.path());
    assert_eq!(store.load_whiteboard(SESSION).unwrap().updates.len(), 1);
}

#[test]
fn snapshot_whose_state_is_not_yjs_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (state, sv) = merged_state(&[text_update("good")]);
    store.write_snapshot(SESSION, &state, &sv, 1, 0).unwrap();
    store
        .write_snapshot(SESSION, &[0xff; 16], &sv, 1, 0)
        .unwrap();
    let loaded = store.load_whiteboard(SESSION).unwrap();
    assert_eq!(loaded.snapshot_version, 1);
    assert_eq!(loaded.updates, vec![state]);
}

#[test]
fn chat_is_ordered_trimmed_and_keeps_its_last_seq() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        assert_eq!(store.last_chat_seq(SESSION).unwrap(), 0);
        for seq in 1..=300 {
            store.append_chat(SESSION, &chat(seq), 1000).unwrap();
        }
        // Big-endian keys keep numeric order across byte boundaries (255 -> 256).
        let all = store.chat_after(SESSION, 0, 1000).unwrap();
        assert_eq!(seqs(&all), (1..=300).collect::<Vec<_>>());
        assert_eq!(all[0], chat(1));

        store.append_chat(SESSION, &chat(301), 5).unwrap();
        assert_eq!(
            seqs(&store.chat_after(SESSION, 0, 100).unwrap()),
            vec![297, 298, 299, 300, 301]
        );
        assert_eq!(
            seqs(&store.chat_after(SESSION, 298, 2).unwrap()),
            vec![299, 300]
        );
        assert!(store.chat_after(SESSION, u64::MAX, 10).unwrap().is_empty());
        assert_eq!(
            seqs(&store.chat_before(SESSION, 301, 2).unwrap()),
            vec![299, 300]
        );
        assert_eq!(
            seqs(&store.chat_before(SESSION, u64::MAX, 3).unwrap()),
            vec![299, 300, 301]
        );
        assert!(store.chat_before(SESSION, 297, 10).unwrap().is_empty());
        assert!(store.chat_after("other", 0, 10).unwrap().is_empty());
        store.close().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.last_chat_seq(SESSION).unwrap(), 301);
    store.append_chat(SESSION, &chat(302), 0).unwrap();
    assert!(store.chat_after(SESSION, 0, 10).unwrap().is_empty());
    assert_eq!(store.last_chat_seq(SESSION).unwrap(), 302);
    assert_eq!(store.last_chat_seq("other").unwrap(), 0);
}

#[test]
fn second_open_of_a_held_directory_is_a_locked_error() {
    let dir = tempfile::tempdir().unwrap();
    let _held = open(dir.path());
    let Err(e) = SledStore::open(dir.path(), 10, 3, None) else {
        panic!("a second open of a held directory succeeded");
    };
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    let message = e.to_string();
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("--server URL --token JWT"), "{message}");
}

#[test]
fn lists_sessions_with_size_activity_and_snapshot_count() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert!(store.list_sessions().unwrap().is_empty());
    let (state, sv) = merged_state(&[text_update("x")]);
    store.append_update("b", 1, &text_update("y")).unwrap();
    store.write_snapshot("a", &state, &sv, 1, 0).unwrap();
    store.write_snapshot("a", &state, &sv, 1, 0).unwrap();
    store.append_chat("c", &chat(1), 10).unwrap();

    let sessions = store.list_sessions().unwrap();
    let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, vec!["a", "b", "c"]);
    assert_eq!(
        sessions.iter().map(|s| s.snapshots).collect::<Vec<_>>(),
        vec![2, 0, 0]
    );
    assert!(sessions[0].bytes > 2 * state.len() as u64);
    assert!(sessions
        .iter()
        .all(|s| s.bytes > 0 && s.last_activity_ms > 0));
}

#[test]
fn rejects_session_ids_that_would_break_the_key_layout() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for bad in ["", "a\0b", "a/b", &"x".repeat(129)] {
        assert!(store.append_update(bad, 1, b"").is_err(), "{bad:?}");
        assert!(store.load_whiteboard(bad).is_err(), "{bad:?}");
    }
    store.check().unwrap();
}

#[test]
fn records_round_trip_and_reject_unknown_formats() {
    assert_eq!(decode_counter(&encode_counter(42)), Ok(42));
    assert!(decode_counter(&[2, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
    assert!(decode_counter(&[1, 0]).is_err());
    assert_eq!(decode_update(&encode_update(b"abc")), Ok(&b"abc"[..]));
    assert!(decode_update(&[]).is_err());
    // A run: format 2, each update after its u32 BE length; one update stays format 1.
    let run = encode_updates(&[b"ab", b"", b"cde"]);
    assert_eq!(
        run,
        [&[2, 0, 0, 0, 2][..], b"ab", &[0; 4], &[0, 0, 0, 3], b"cde"].concat()
    );
    assert_eq!(decode_updates(&run), Ok(vec![&b"ab"[..], b"", b"cde"]));
    assert_eq!(encode_updates(&[b"abc"]), encode_update(b"abc"));
    assert_eq!(
        decode_updates(&encode_update(b"abc")),
        Ok(vec![&b"abc"[..]])
    );
    // Damage: a length past the end, a length cut short, an empty run, an unknown format.
    assert!(decode_updates(&[2, 0, 0, 0, 9, 1, 2]).is_err());
    assert!(decode_updates(&[2, 0, 0, 0, 1, 7, 0, 0]).is_err());
    assert!(decode_updates(&[2]).is_err());
    assert!(decode_updates(&[3, 1, 2]).is_err());
    assert_eq!(decode_chat(&encode_chat(&chat(7)).unwrap()), Ok(chat(7)));
    assert_eq!(versions_to_prune(&[1, 2, 3], 4, 3), vec![1]);
    assert_eq!(versions_to_prune(&[], 1, 3), Vec::<u64>::new());
    assert_eq!(describe_key(&numbered_key("s", 3)), "s/3");
    assert_eq!(
        describe_key(&named_key("s", LAST_CHAT_SEQ)),
        "s/last_chat_seq"
    );
}

/// An 8 MiB tmpfs (a disk that fills in milliseconds), unmounted on drop; `None`, with a
/// note, when this process may not mount (not root).
struct SmallTmpfs {
    path: PathBuf,
    _parent: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount() -> Option<Self> {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("fs");
        std::fs::create_dir_all(&path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs (not root?)");
            return None;
        }
        Some(Self {
            path,
            _parent: parent,
        })
    }

    /// Writes a filler file until the file system refuses a byte more.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
        while f.write_all(&[0u8; 1]).is_ok() {}
        filler
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// The race CI met: an update acknowledged in batch durability, then the disk fills before
/// the next flush, and the free-space check (not a sled write) is what refuses writes. sled's
/// background flush has failed meanwhile and keeps that error in its handle, so resuming
/// must reopen it, and the reopen must carry the acknowledged update over: it exists only
/// in the failed handle's memory, and the live document already shows it.
#[test]
fn an_acknowledged_unflushed_update_survives_the_reopen_after_a_full_disk() {
    let Some(fs) = SmallTmpfs::mount() else {
        return;
    };
    let store = SledStore::open(&fs.path, 60_000, 3, None).unwrap();
    store
        .append_update(SESSION, 1, &text_update("flushed "))
        .unwrap();
    store.flush().unwrap();
    let filler = fs.fill();
    // Small enough for the write gate (no space check), large enough to need new pages.
    let acknowledged = text_update(&"acknowledged ".repeat(600));
    store.append_update(SESSION, 2, &acknowledged).unwrap();
    assert!(
        store.t().db.flush().is_err(),
        "sled flushed on a full disk: this test needs the flush to fail"
    );
    store.shared.fail("disk full (test)".into(), false);
    assert!(store.check().is_err());

    std::fs::remove_file(&filler).unwrap();
    wait_until_writable(&store);
    let text = text_of(&store.load_whiteboard(SESSION).unwrap().updates);
    assert!(
        text.contains("flushed") && text.contains("acknowledged"),
        "{text}"
    );
    store.flush().unwrap();
    drop(store);
    let reopened = open(&fs.path);
    let text = text_of(&reopened.load_whiteboard(SESSION).unwrap().updates);
    assert!(
        text.contains("flushed") && text.contains("acknowledged"),
        "{text}"
    );
}

/// Waits (15 s at most) for the store's monitor to resume writing.
fn wait_until_writable(store: &SledStore) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while store.check().is_err() {
        assert!(
            Instant::now() < deadline,
            "the store did not resume: {:?}",
            store.check()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
