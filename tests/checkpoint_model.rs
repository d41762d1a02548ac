//! The agent's checkpoint protocol under crashes, on a simulated file system that
//! loses every write and directory entry not fsynced (optionally tearing the last
//! ones). A source reads numbered lines; batches carry their cursor into the spool
//! (group commit), the checkpoint file is written now and then and lags, the relay
//! takes durable batches in order and acknowledges them, and segments go once acked
//! and checkpointed. After any crash the positions are recovered as the agent does
//! (`Checkpoints::load_with` + `replay`), and the source resumes there.
//!
//! Proves: the recovered position is never behind a committed batch nor past what was
//! read; a sequence number the relay has seen is never reused for other lines; in the
//! end the relay holds every line read, exactly once, in order (so no line was lost at
//! a crash and none was read twice).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use soclink::agent::sources::checkpoint::{Checkpoints, FilePos};
use soclink::batch::BatchMeta;
use soclink::fs::Fs;
use soclink::fs::sim::SimFs;
use soclink::spool::{Spool, SpoolError, SpoolOptions};

#[derive(Debug, Clone)]
enum Op {
    /// The source reads this many lines into a batch and appends it.
    Batch(u8),
    /// Group commit: fsync, then positions advance in memory.
    Commit,
    /// Write the checkpoint file and tell the spool (`set_checkpointed`).
    StoreCheckpoint,
    /// The relay stores and acknowledges up to this many more durable batches.
    Deliver(u8),
    Crash {
        torn: bool,
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..40).prop_map(Op::Batch),
        3 => Just(Op::Commit),
        2 => Just(Op::StoreCheckpoint),
        3 => (1u8..6).prop_map(Op::Deliver),
        1 => (any::<bool>(), any::<u64>()).prop_map(|(torn, seed)| Op::Crash { torn, seed }),
    ]
}

const SOURCE: &str = "app";

/// Every line of this model's "file" is 100 bytes long.
fn offset_after(lines: u64) -> u64 {
    lines * 100
}

fn cursor(lines: u64) -> serde_json::Value {
    serde_json::to_value(vec![FilePos {
        dev: 1,
        ino: 1,
        fp_len: 0,
        fp: 0,
        path: "/var/log/app.log".into(),
        offset: offset_after(lines),
        gone: false,
    }])
    .unwrap()
}

fn lines_at(ck: &Checkpoints) -> u64 {
    ck.sources
        .get(SOURCE)
        .and_then(|m| m.values().next())
        .map_or(0, |p| p.offset / 100)
}

struct Agent {
    spool: Spool,
    /// Positions as the write stage keeps them: applied after each commit.
    ck: Checkpoints,
    /// Lines read by the source (the next batch starts after these).
    read: u64,
    /// Batches appended since the last commit: (seq, first line, last line).
    pending: Vec<(u64, u64, u64)>,
    /// Last line of the newest durable batch.
    durable_lines: u64,
}

fn open(fs: &SimFs, dir: &Path, ck_path: &Path) -> Agent {
    let (spool, _) = Spool::open_with_fs(
        dir,
        SpoolOptions {
            max_size: 1 << 20,
            segment_size: 512,
            gate_on_checkpoint: true,
        },
        Arc::new(fs.clone()),
    )
    .expect("recovery never fails");
    let mut ck = Checkpoints::load_with(fs, ck_path).expect("checkpoint file is whole");
    ck.replay(&spool).expect("replay");
    let read = lines_at(&ck);
    Agent {
        spool,
        ck,
        read,
        pending: Vec::new(),
        durable_lines: read,
    }
}

fn lines_of(payload: &[u8]) -> (u64, u64) {
    let s = std::str::from_utf8(payload).unwrap();
    let (a, b) = s.split_once('-').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

/// The relay takes up to `max` durable batches after its position, in order, and
/// acknowledges each; a seq it has seen must come back with the same lines.
fn deliver(
    a: &Agent,
    store: &mut BTreeMap<u64, (u64, u64)>,
    relay_pos: &mut u64,
    max: usize,
) -> Result<(), TestCaseError> {
    for _ in 0..max {
        let Some(r) = a.spool.read(*relay_pos + 1).unwrap() else {
            break;
        };
        let got = lines_of(&r.payload);
        if let Some(seen) = store.get(&r.seq) {
            prop_assert_eq!(*seen, got, "seq {} reused for other lines", r.seq);
        }
        store.insert(r.seq, got);
        *relay_pos = r.seq;
        a.spool.ack(r.seq).unwrap();
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let fs = SimFs::new();
    let root = PathBuf::from("/state");
    let dir = root.join("spool");
    let ck_path = Checkpoints::path(&root);
    fs.create_dir_all(&root).unwrap();
    let mut a = open(&fs, &dir, &ck_path);
    // The relay's store: seq -> the lines of that batch; its position.
    let mut store: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut relay_pos = 0u64;
    for op in ops {
        match op {
            Op::Batch(n) => {
                let (first, last) = (a.read + 1, a.read + n as u64);
                let meta = BatchMeta {
                    source: SOURCE.into(),
                    day: "2026-11-26".into(),
                    events: n as u32,
                    raw_bytes: 0,
                    origin: None,
                    item: None,
                    cursor: Some(cursor(last)),
                };
                match a.spool.append(
                    &serde_json::to_vec(&meta).unwrap(),
                    format!("{first}-{last}").as_bytes(),
                ) {
                    Ok(seq) => {
                        a.pending.push((seq, first, last));
                        a.read = last;
                    }
                    Err(SpoolError::Full { .. }) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("append: {e}"))),
                }
            }
            Op::Commit => {
                a.spool
                    .commit()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                for (seq, _, last) in a.pending.drain(..) {
                    a.ck.apply(SOURCE, &cursor(last));
                    a.ck.spool_seq = seq;
                    a.durable_lines = last;
                }
            }
            Op::StoreCheckpoint => {
                a.ck.store_with(&fs, &ck_path).unwrap();
                a.spool.set_checkpointed(a.ck.spool_seq).unwrap();
            }
            Op::Deliver(k) => deliver(&a, &mut store, &mut relay_pos, k as usize)?,
            Op::Crash { torn, seed } => {
                let (durable, read) = (a.durable_lines, a.read);
                drop(a);
                if torn {
                    fs.crash_torn(seed);
                } else {
                    fs.crash();
                }
                a = open(&fs, &dir, &ck_path);
                // Never behind a committed batch (its lines would be read twice), never
                // past what was read. Between the two is right too: a batch can become
                // durable before its commit when its segment is sealed; the final check
                // proves each line then arrives once.
                prop_assert!(
                    (durable..=read).contains(&a.read),
                    "resumed after line {} but committed up to {durable} and read up to {read}",
                    a.read
                );
            }
        }
    }
    // Drain: commit, deliver everything.
    a.spool.commit().unwrap();
    for (seq, _, last) in a.pending.drain(..) {
        a.ck.apply(SOURCE, &cursor(last));
        a.ck.spool_seq = seq;
    }
    deliver(&a, &mut store, &mut relay_pos, usize::MAX)?;
    // Every line read is at the relay exactly once, in order.
    let mut next = 1;
    for (seq, (first, last)) in &store {
        prop_assert_eq!(
            *first,
            next,
            "batch #{} starts at line {} (expected {})",
            seq,
            first,
            next
        );
        next = last + 1;
    }
    prop_assert_eq!(
        next - 1,
        a.read,
        "the relay ends at line {} but the source read {}",
        next - 1,
        a.read
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("SOCLINK_MODEL_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(3000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn checkpoints_and_spool_survive_any_crash(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}

#[test]
fn recovered_position_is_the_last_durable_batch_exactly() {
    // A fixed schedule: durable batches beyond a lagging checkpoint file are replayed,
    // an unsynced one is not.
    let fs = SimFs::new();
    let root = PathBuf::from("/state");
    fs.create_dir_all(&root).unwrap();
    let ck_path = Checkpoints::path(&root);
    let dir = root.join("spool");
    let mut a = open(&fs, &dir, &ck_path);
    let append = |a: &mut Agent, first: u64, last: u64| {
        let meta = BatchMeta {
            source: SOURCE.into(),
            day: "2026-11-26".into(),
            events: 1,
            raw_bytes: 0,
            origin: None,
            item: None,
            cursor: Some(cursor(last)),
        };
        a.spool
            .append(
                &serde_json::to_vec(&meta).unwrap(),
                format!("{first}-{last}").as_bytes(),
            )
            .unwrap()
    };
    let s1 = append(&mut a, 1, 10);
    a.spool.commit().unwrap();
    a.ck.apply(SOURCE, &cursor(10));
    a.ck.spool_seq = s1;
    a.ck.store_with(&fs, &ck_path).unwrap();
    append(&mut a, 11, 20);
    a.spool.commit().unwrap(); // durable, but the checkpoint file still says 10
    append(&mut a, 21, 30); // never committed
    drop(a);
    fs.crash();
    let a = open(&fs, &dir, &ck_path);
    assert_eq!(a.read, 20);
}
