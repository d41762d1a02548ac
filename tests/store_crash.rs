//! The relay store after crashes, on real files: cut back to the durable length,
//! exactly once after the agent resends, corrupt state quarantined, and a real SIGKILL.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use soclink::relay::sink::file::{
    AppendOutcome, Store, StoreError, StoreOptions, StoreRecovery, TruncatedFile,
};

fn gz(ndjson: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(ndjson).unwrap();
    e.finish().unwrap()
}

fn zcat(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    MultiGzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn opts(root: &Path) -> StoreOptions {
    StoreOptions {
        store_dir: root.join("store"),
        state_dir: root.join("state"),
    }
}

fn event(seq: u64) -> Vec<u8> {
    format!("{{\"ts\":\"2026-11-26T01:00:00Z\",\"host\":\"h\",\"source\":\"app\",\"message\":\"batch {seq}\"}}\n")
        .into_bytes()
}

fn expected_raw(seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    seqs.flat_map(event).collect()
}

const DAY: &str = "2026-11-26";

fn data_file(root: &Path, day: &str) -> PathBuf {
    root.join("store/agent/app")
        .join(format!("{day}.ndjson.gz"))
}

fn append_range(store: &mut Store, seqs: std::ops::RangeInclusive<u64>, day: &str) {
    for s in seqs {
        assert_eq!(
            store
                .append("agent", "st", s, "app", day, &gz(&event(s)))
                .unwrap(),
            AppendOutcome::Appended,
            "seq {s}"
        );
    }
}

#[test]
fn uncommitted_appends_are_cut_back_and_resent_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = data_file(dir.path(), DAY);
    let (mut store, _) = Store::open(opts(dir.path())).unwrap();
    append_range(&mut store, 1..=3, DAY);
    store.commit().unwrap();
    let durable = std::fs::metadata(&file).unwrap().len();
    append_range(&mut store, 4..=5, DAY);
    let written = std::fs::metadata(&file).unwrap().len();
    assert!(written > durable);
    drop(store); // crash: never committed, never acknowledged

    let (mut store, recovery) = Store::open(opts(dir.path())).unwrap();
    assert_eq!(
        recovery,
        StoreRecovery {
            truncated: vec![TruncatedFile {
                path: file.clone(),
                from: written,
                to: durable
            }],
            ..Default::default()
        }
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), durable);
    assert_eq!(store.stored_seq("agent", "st"), 3);
    // The agent resends everything after 3 (and maybe some it already sent).
    assert_eq!(
        store
            .append("agent", "st", 3, "app", DAY, &gz(&event(3)))
            .unwrap(),
        AppendOutcome::Duplicate
    );
    append_range(&mut store, 4..=6, DAY);
    store.commit().unwrap();
    assert_eq!(zcat(&file), expected_raw(1..=6));
}

#[test]
fn a_new_file_created_after_the_last_commit_is_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = Store::open(opts(dir.path())).unwrap();
    append_range(&mut store, 1..=2, DAY);
    store.commit().unwrap();
    // The next day's file and a new source directory appear, then the relay dies.
    append_range(&mut store, 3..=4, "2026-11-27");
    assert_eq!(
        store
            .append("agent", "other", 1, "new-src", DAY, &gz(&event(9)))
            .unwrap(),
        AppendOutcome::Appended
    );
    let next = data_file(dir.path(), "2026-11-27");
    let new_src = dir.path().join("store/agent/new-src/2026-11-26.ndjson.gz");
    assert!(std::fs::metadata(&next).unwrap().len() > 0);
    drop(store);

    let (mut store, recovery) = Store::open(opts(dir.path())).unwrap();
    let mut cut: Vec<_> = recovery
        .truncated
        .iter()
        .map(|t| (t.path.clone(), t.to))
        .collect();
    cut.sort();
    let mut want = vec![(next.clone(), 0), (new_src.clone(), 0)];
    want.sort();
    assert_eq!(cut, want);
    assert_eq!(std::fs::metadata(&next).unwrap().len(), 0);
    assert_eq!(store.stored_seq("agent", "st"), 2);
    assert_eq!(store.stored_seq("agent", "other"), 0);
    append_range(&mut store, 3..=4, "2026-11-27");
    store.commit().unwrap();
    assert_eq!(zcat(&data_file(dir.path(), DAY)), expected_raw(1..=2));
    assert_eq!(zcat(&next), expected_raw(3..=4));
}

#[test]
fn bytes_past_the_durable_length_are_cut_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let file = data_file(dir.path(), DAY);
    let (mut store, _) = Store::open(opts(dir.path())).unwrap();
    append_range(&mut store, 1..=2, DAY);
    store.commit().unwrap();
    drop(store);
    let durable = std::fs::metadata(&file).unwrap().len();
    // A torn member of a batch that was being written when the power went.
    let torn = gz(&event(3));
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(&torn[..torn.len() / 2])
        .unwrap();

    let (mut store, recovery) = Store::open(opts(dir.path())).unwrap();
    assert_eq!(
        recovery.truncated,
        [TruncatedFile {
            path: file.clone(),
            from: durable + (torn.len() / 2) as u64,
            to: durable
        }]
    );
    append_range(&mut store, 3..=3, DAY);
    store.commit().unwrap();
    assert_eq!(zcat(&file), expected_raw(1..=3));
}

#[test]
fn a_missing_or_short_file_is_reported_and_never_leaves_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let file = data_file(dir.path(), DAY);
    let next = data_file(dir.path(), "2026-11-27");
    let (mut store, _) = Store::open(opts(dir.path())).unwrap();
    append_range(&mut store, 1..=2, DAY);
    append_range(&mut store, 3..=4, "2026-11-27");
    store.commit().unwrap();
    drop(store);
    // An operator archived one file; the disk lost the end of the other.
    std::fs::remove_file(&file).unwrap();
    let len = std::fs::metadata(&next).unwrap().len();
    let first_member = gz(&event(3)).len() as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&next)
        .unwrap()
        .set_len(first_member)
        .unwrap();

    let (mut store, recovery) = Store::open(opts(dir.path())).unwrap();
    assert_eq!(recovery.missing, std::slice::from_ref(&file));
    assert_eq!(
        recovery.short,
        [TruncatedFile {
            path: next.clone(),
            from: len,
            to: first_member
        }]
    );
    append_range(&mut store, 5..=5, DAY);
    append_range(&mut store, 6..=6, "2026-11-27");
    store.commit().unwrap();
    assert_eq!(zcat(&file), expected_raw(5..=5));
    assert_eq!(zcat(&next), [event(3), event(6)].concat());
    drop(store);
    let (_, recovery) = Store::open(opts(dir.path())).unwrap();
    assert!(recovery.is_clean(), "{recovery:?}");
}

/// Commits batches 1..=3, applies `edit` to the agent's state, reopens: returns the
/// state path, the corrupt bytes and the recovery, after checking what every corrupt
/// state must give: the file moved aside unchanged, the store file untouched, the
/// agent's dedupe restarted at 0 (its next batch stored, nothing acknowledged lost).
fn corrupt_and_open(edit: impl FnOnce(&mut Vec<u8>)) -> (PathBuf, Vec<u8>, StoreRecovery) {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = Store::open(opts(dir.path())).unwrap();
    append_range(&mut store, 1..=3, DAY);
    store.commit().unwrap();
    drop(store);
    let state = dir.path().join("state/dedupe/agent.state");
    let file = data_file(dir.path(), DAY);
    let stored = std::fs::read(&file).unwrap();
    let mut bytes = std::fs::read(&state).unwrap();
    edit(&mut bytes);
    std::fs::write(&state, &bytes).unwrap();
    let (mut store, recovery) = Store::open(opts(dir.path())).unwrap();
    let aside = dir.path().join("state/dedupe/agent.state.corrupt");
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        bytes,
        "quarantined unchanged"
    );
    assert_eq!(recovery.quarantined.len(), 1, "{recovery:?}");
    assert_eq!(recovery.quarantined[0].aside, aside);
    assert_eq!(recovery.quarantined[0].agent.as_deref(), Some("agent"));
    assert_eq!(
        std::fs::read(&file).unwrap(),
        stored,
        "store file untouched"
    );
    assert_eq!(store.stored_seq("agent", "st"), 0);
    // The agent resumes after its own acknowledged position (3): a gap, accepted.
    store
        .append_accepting_gap("agent", "st", 4, "app", DAY, &gz(&event(4)))
        .unwrap();
    store.commit().unwrap();
    assert_eq!(zcat(&file), expected_raw(1..=4));
    let resets = store.dedupe_resets();
    assert_eq!(resets.len(), 1);
    assert_eq!(resets[0].quarantined, "dedupe/agent.state.corrupt");
    assert_eq!(
        (resets[0].streams[0].from, resets[0].streams[0].through),
        (4, 4 + 63)
    );
    drop(store);
    // Logged and reported once: the next open is clean and keeps the mark and position.
    let (store, again) = Store::open(opts(dir.path())).unwrap();
    assert!(again.is_clean(), "{again:?}");
    assert_eq!(store.stored_seq("agent", "st"), 4);
    assert_eq!(store.dedupe_resets().len(), 1);
    (state, bytes, recovery)
}

#[test]
fn a_corrupt_state_is_quarantined_and_the_agent_restarts_at_zero() {
    let flip = |b: &mut Vec<u8>| {
        let i = b.len() - 5;
        b[i] ^= 0x01;
    };
    let torn = |b: &mut Vec<u8>| b.truncate(b.len() - 3);
    let empty = |b: &mut Vec<u8>| b.clear();
    let garbage = |b: &mut Vec<u8>| *b = b"{\"streams\":{}}".to_vec();
    for (name, edit) in [
        ("bit flip", &flip as &dyn Fn(&mut Vec<u8>)),
        ("torn", &torn),
        ("empty", &empty),
        ("no header", &garbage),
    ] {
        let (_, _, recovery) = corrupt_and_open(edit);
        assert!(!recovery.quarantined[0].reason.is_empty(), "{name}");
    }
}

#[test]
fn a_state_naming_a_path_outside_the_store_is_quarantined() {
    let (_, _, recovery) = corrupt_and_open(|b| {
        // Rewrite the body with a hostile source, with a valid header and CRC.
        let text = String::from_utf8(b.clone()).unwrap();
        let body = text
            .split_once('\n')
            .unwrap()
            .1
            .replace("\"app\"", "\"../../x\"");
        *b = format!(
            "soclink-store-state v1 crc32={:08x} len={}\n{body}",
            crc32fast::hash(body.as_bytes()),
            body.len()
        )
        .into_bytes();
    });
    assert!(
        recovery.quarantined[0].reason.contains("invalid source"),
        "{recovery:?}"
    );
}

/// The child half of `sigkill_at_any_moment_loses_and_duplicates_nothing`: appends and
/// commits as fast as it can, printing each committed (= acknowledgeable) position.
#[test]
fn sigkill_child_writer() {
    let Ok(root) = std::env::var("SOCLINK_STORE_CHILD_DIR") else {
        return;
    };
    let (mut store, _) = Store::open(opts(Path::new(&root))).unwrap();
    let mut seq = store.stored_seq("agent", "st");
    let mut out = std::io::stdout();
    loop {
        for _ in 0..3 {
            seq += 1;
            let day = if seq % 7 < 4 { DAY } else { "2026-11-27" };
            store
                .append("agent", "st", seq, "app", day, &gz(&event(seq)))
                .unwrap();
        }
        store.commit().unwrap();
        writeln!(out, "acked {seq}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_at_any_moment_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked = 0u64;
    for round in 0..4u64 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "sigkill_child_writer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SOCLINK_STORE_CHILD_DIR", dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // Let it run a few commits (and a varying bit more), then SIGKILL it.
        let want = acked + 6 + 3 * round;
        while acked < want {
            let l = lines.next().unwrap().unwrap();
            if let Some(n) = l.strip_prefix("acked ") {
                acked = n.parse().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(3 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        // Lines printed before the kill but not yet read were acknowledged too.
        for l in lines.map_while(Result::ok) {
            if let Some(n) = l.strip_prefix("acked ") {
                acked = n.parse().unwrap();
            }
        }

        let (store, _) = Store::open(opts(dir.path())).unwrap();
        let stored = store.stored_seq("agent", "st");
        assert!(stored >= acked, "acknowledged {acked} but stored {stored}");
        let (mut d1, mut d2) = (Vec::new(), Vec::new());
        for s in 1..=stored {
            if s % 7 < 4 { &mut d1 } else { &mut d2 }.extend(event(s));
        }
        assert_eq!(zcat(&data_file(dir.path(), DAY)), d1, "round {round}");
        assert_eq!(
            zcat(&data_file(dir.path(), "2026-11-27")),
            d2,
            "round {round}"
        );
        acked = stored;
    }
}

/// Rewrites an agent's state body with a valid header, as a test of what open trusts.
fn rewrite_state(root: &Path, agent: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = root.join(format!("state/dedupe/{agent}.state"));
    let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
    let mut body: serde_json::Value =
        serde_json::from_str(text.split_once('\n').unwrap().1).unwrap();
    edit(&mut body);
    let body = serde_json::to_string(&body).unwrap();
    std::fs::write(
        &path,
        format!(
            "soclink-store-state v1 crc32={:08x} len={}\n{body}",
            crc32fast::hash(body.as_bytes()),
            body.len()
        ),
    )
    .unwrap();
}

/// A file whose entry was pruned (an old day the agent backfills) is recorded at its
/// current length before the first new byte, so a crash cuts only the new bytes.
#[test]
fn a_pruned_file_that_is_written_again_is_cut_back_to_its_old_end() {
    let dir = tempfile::tempdir().unwrap();
    let file = data_file(dir.path(), DAY);
    let (mut store, _) = Store::open(opts(dir.path())).unwrap();
    append_range(&mut store, 1..=2, DAY);
    store.commit().unwrap();
    drop(store);
    let old_end = std::fs::metadata(&file).unwrap().len();
    rewrite_state(dir.path(), "agent", |b| {
        b["files"] = serde_json::json!([]);
    });

    let (mut store, recovery) = Store::open(opts(dir.path())).unwrap();
    assert!(recovery.is_clean(), "{recovery:?}");
    append_range(&mut store, 3..=4, DAY);
    drop(store);
    let (mut store, recovery) = Store::open(opts(dir.path())).unwrap();
    assert_eq!(recovery.truncated.len(), 1);
    assert_eq!(recovery.truncated[0].to, old_end);
    append_range(&mut store, 3..=4, DAY);
    store.commit().unwrap();
    assert_eq!(zcat(&file), expected_raw(1..=4));
}

/// An operator moving the current file away while the relay runs must not make the next
/// append leave a hole of zeros (unreadable by zcat).
#[test]
fn a_file_moved_away_while_running_restarts_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let file = data_file(dir.path(), DAY);
    let (mut store, _) = Store::open(opts(dir.path())).unwrap();
    append_range(&mut store, 1..=2, DAY);
    store.commit().unwrap();
    std::fs::rename(&file, dir.path().join("archived.gz")).unwrap();
    append_range(&mut store, 3..=3, DAY);
    // Crash before commit: the new file must be cut to nothing, not kept.
    drop(store);
    let (mut store, recovery) = Store::open(opts(dir.path())).unwrap();
    assert!(recovery.missing.is_empty(), "{recovery:?}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);
    append_range(&mut store, 3..=4, DAY);
    store.commit().unwrap();
    assert_eq!(zcat(&file), expected_raw(3..=4));
    assert_eq!(zcat(&dir.path().join("archived.gz")), expected_raw(1..=2));
}

#[test]
fn overlapping_store_and_state_dirs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    for (state, ok) in [
        (store_dir.clone(), false),
        (store_dir.join("state"), false),
        (store_dir.join(".state"), true),
        (dir.path().join("state"), true),
    ] {
        let r = Store::open(StoreOptions {
            store_dir: store_dir.clone(),
            state_dir: state.clone(),
        });
        match r {
            Ok(_) => assert!(ok, "{} accepted", state.display()),
            Err(StoreError::Options(_)) => assert!(!ok, "{} refused", state.display()),
            Err(e) => panic!("{e}"),
        }
    }
    let e = Store::open(StoreOptions {
        store_dir: dir.path().join("s2/dedupe/x"),
        state_dir: dir.path().join("s2"),
    })
    .unwrap_err();
    assert!(matches!(e, StoreError::Options(_)), "{e}");
}

#[test]
fn the_store_can_move_to_a_blocking_task() {
    fn send<T: Send + 'static>() {}
    send::<Store>();
    send::<StoreError>();
}
