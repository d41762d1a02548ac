//! The spool checked against a tiny in-memory model under random operations, on a
//! simulated file system that loses everything unsynced (optionally tearing writes) at
//! a crash. Proves: committed, unacknowledged records survive every crash byte for
//! byte; nothing <= acked is handed out after a restart; seqs grow by one between
//! crashes and are never reused for a committed record; recovery never fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use soclink::fs::sim::SimFs;
use soclink::spool::{Record, Spool, SpoolError, SpoolOptions};

#[derive(Debug, Clone)]
enum Op {
    Append {
        meta_len: usize,
        payload_len: usize,
        fill: u8,
    },
    Commit,
    ReadNext,
    Ack(usize),
    SetCheckpointed(usize),
    Crash {
        torn: bool,
        seed: u64,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..24, 0usize..120, any::<u8>())
            .prop_map(|(meta_len, payload_len, fill)| Op::Append { meta_len, payload_len, fill }),
        3 => Just(Op::Commit),
        3 => Just(Op::ReadNext),
        2 => any::<usize>().prop_map(Op::Ack),
        2 => any::<usize>().prop_map(Op::SetCheckpointed),
        1 => (any::<bool>(), any::<u64>()).prop_map(|(torn, seed)| Op::Crash { torn, seed }),
        1 => Just(Op::Restart),
    ]
}

fn content(seq_hint: u64, len: usize, fill: u8) -> Vec<u8> {
    (0..len)
        .map(|i| fill.wrapping_add(i as u8).wrapping_mul(seq_hint as u8 | 1))
        .collect()
}

struct Model {
    /// Durable records not yet released (seq -> (meta, payload)), acked or not.
    durable: BTreeMap<u64, (Vec<u8>, Vec<u8>)>,
    /// Appended but not committed, in order.
    pending: Vec<(u64, Vec<u8>, Vec<u8>)>,
    acked: u64,
    checkpointed: u64,
    /// Highest seq that was ever durable or acked: must never be handed out again.
    max_committed: u64,
    last_appended: u64,
    reopened_since_append: bool,
    cursor: u64,
    gate: bool,
}

fn opts() -> SpoolOptions {
    SpoolOptions {
        max_size: 1 << 30,
        segment_size: 400,
        gate_on_checkpoint: true,
    }
}

fn open(fs: &SimFs, dir: &Path) -> Spool {
    open_gated(fs, dir, true)
}

fn open_gated(fs: &SimFs, dir: &Path, gate: bool) -> Spool {
    let o = SpoolOptions {
        gate_on_checkpoint: gate,
        ..opts()
    };
    match Spool::open_with_fs(dir, o, Arc::new(fs.clone())) {
        Ok((s, _)) => s,
        Err(e) => panic!("recovery failed: {e}"),
    }
}

fn run(ops: Vec<Op>, gate: bool) {
    let fs = SimFs::new();
    let dir = PathBuf::from("/spool");
    let mut spool = open_gated(&fs, &dir, gate);
    let mut m = Model {
        durable: BTreeMap::new(),
        pending: Vec::new(),
        acked: 0,
        checkpointed: 0,
        max_committed: 0,
        last_appended: 0,
        reopened_since_append: false,
        cursor: 0,
        gate,
    };
    for op in ops {
        match op {
            Op::Append {
                meta_len,
                payload_len,
                fill,
            } => {
                let meta = content(1, meta_len, fill);
                let payload = content(2, payload_len, fill ^ 0x5a);
                let seq = spool.append(&meta, &payload).unwrap();
                assert!(
                    seq > m.max_committed,
                    "seq {seq} reused (max committed {})",
                    m.max_committed
                );
                if !m.reopened_since_append && m.last_appended != 0 {
                    assert_eq!(seq, m.last_appended + 1, "seqs not contiguous");
                }
                m.last_appended = seq;
                m.reopened_since_append = false;
                m.pending.push((seq, meta, payload));
            }
            Op::Commit => {
                let d = spool.commit().unwrap();
                if let Some(last) = m.pending.last() {
                    assert_eq!(d, last.0);
                }
                for (seq, meta, payload) in m.pending.drain(..) {
                    m.durable.insert(seq, (meta, payload));
                    m.max_committed = m.max_committed.max(seq);
                }
                assert_eq!(spool.stats().durable_seq, d);
            }
            Op::ReadNext => {
                let from = m.cursor.max(m.acked + 1);
                let expected = m.durable.range(from..).next();
                let got = spool.read(m.cursor).unwrap();
                match (got, expected) {
                    (Some(r), Some((seq, (meta, payload)))) => {
                        assert_eq!(
                            r,
                            Record {
                                seq: *seq,
                                meta: meta.clone(),
                                payload: payload.clone()
                            }
                        );
                        m.cursor = r.seq + 1;
                    }
                    (None, None) => {}
                    (got, exp) => panic!("read({}) = {got:?}, model expects {exp:?}", m.cursor),
                }
            }
            Op::Ack(i) => {
                let candidates: Vec<u64> =
                    m.durable.keys().copied().filter(|s| *s > m.acked).collect();
                if candidates.is_empty() {
                    continue;
                }
                let seq = candidates[i % candidates.len()];
                spool.ack(seq).unwrap();
                m.acked = seq;
                m.max_committed = m.max_committed.max(seq);
                release(&mut m);
            }
            Op::SetCheckpointed(i) => {
                let candidates: Vec<u64> = m
                    .durable
                    .keys()
                    .copied()
                    .filter(|s| *s > m.checkpointed)
                    .collect();
                if candidates.is_empty() {
                    continue;
                }
                let seq = candidates[i % candidates.len()];
                spool.set_checkpointed(seq).unwrap();
                m.checkpointed = seq;
                release(&mut m);
            }
            Op::Crash { torn, seed } => {
                drop(spool);
                if torn {
                    fs.crash_torn(seed);
                } else {
                    fs.crash();
                }
                spool = reopen(&fs, &dir, &mut m);
            }
            Op::Restart => {
                drop(spool);
                spool = reopen(&fs, &dir, &mut m);
            }
        }
        // Beyond this bound it would be a bug: the model never writes more than a few KiB.
        assert!(spool.stats().segments < 200);
    }
    // A final crash must also keep every committed record.
    drop(spool);
    fs.crash_torn(7);
    reopen(&fs, &dir, &mut m);
}

/// Records <= min(acked, checkpointed) may be gone; the model stops expecting them.
fn release(m: &mut Model) {
    let limit = if m.gate {
        m.acked.min(m.checkpointed)
    } else {
        m.acked
    };
    m.durable.retain(|s, _| *s > limit);
}

fn reopen(fs: &SimFs, dir: &Path, m: &mut Model) -> Spool {
    let spool = open(fs, dir);
    assert_eq!(
        spool.acked(),
        m.acked,
        "ack lost or invented across restart"
    );
    assert_eq!(spool.checkpointed(), m.checkpointed);
    // Everything present from the checkpoint on: the committed records, then a prefix
    // of the uncommitted ones (whatever reached the disk).
    let from = if m.gate {
        m.acked.min(m.checkpointed)
    } else {
        m.acked
    } + 1;
    let present: Vec<Record> = spool
        .records_from(from)
        .collect::<Result<_, SpoolError>>()
        .unwrap();
    let committed: Vec<Record> = m
        .durable
        .range(from..)
        .map(|(seq, (meta, payload))| Record {
            seq: *seq,
            meta: meta.clone(),
            payload: payload.clone(),
        })
        .collect();
    assert!(
        present.len() >= committed.len(),
        "committed records lost: have {present:?}, want {committed:?}"
    );
    assert_eq!(
        present[..committed.len()],
        committed[..],
        "committed records differ"
    );
    let extra = &present[committed.len()..];
    assert!(
        extra.len() <= m.pending.len(),
        "records appeared from nowhere: {extra:?}"
    );
    for (r, (seq, meta, payload)) in extra.iter().zip(&m.pending) {
        assert_eq!(
            (&r.seq, &r.meta, &r.payload),
            (seq, meta, payload),
            "survivor is not a prefix of the uncommitted records"
        );
    }
    for r in extra {
        m.durable.insert(r.seq, (r.meta.clone(), r.payload.clone()));
        m.max_committed = m.max_committed.max(r.seq);
    }
    m.pending.clear();
    // read() never hands out anything acknowledged.
    if let Some(r) = spool.read(0).unwrap() {
        assert!(r.seq > m.acked, "acked record {} handed out again", r.seq);
    }
    let stats = spool.stats();
    assert!(stats.next_seq > m.max_committed);
    assert_eq!(stats.durable_seq, stats.next_seq - 1);
    m.cursor = 0;
    m.reopened_since_append = true;
    spool
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn spool_matches_model_across_crashes(ops in prop::collection::vec(op(), 1..60), gate in any::<bool>()) {
        run(ops, gate);
    }
}

/// The model test would pass vacuously if the simulated file system kept everything;
/// this pins that a crash really drops unsynced appends and unsynced directory entries.
#[test]
fn simfs_crash_drops_unsynced_state() {
    let fs = SimFs::new();
    let dir = PathBuf::from("/spool");
    let spool = open(&fs, &dir);
    spool.append(b"m", b"committed").unwrap();
    spool.commit().unwrap();
    spool.append(b"m", b"lost").unwrap();
    // Force the second record out of the buffer into the (unsynced) file.
    drop(spool);
    fs.crash();
    let spool = open(&fs, &dir);
    let all: Vec<Record> = spool.records_from(0).map(Result::unwrap).collect();
    assert_eq!(
        all,
        vec![Record {
            seq: 1,
            meta: b"m".to_vec(),
            payload: b"committed".to_vec()
        }]
    );
    assert!(fs.sync_counts().0 > 0 && fs.sync_counts().1 > 0);
}

#[derive(Debug, Clone)]
enum Damage {
    Flip { at: usize, xor: u8 },
    Truncate(usize),
    Insert { at: usize, bytes: Vec<u8> },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, xor)| Damage::Flip { at, xor }),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..80))
            .prop_map(|(at, bytes)| Damage::Insert { at, bytes }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Whatever happens to the bytes of a segment or the ledger, open succeeds, hands
    /// out only records that were written (byte for byte, in seq order), and the
    /// next seq is above every record it hands out.
    #[test]
    fn recovery_survives_arbitrary_damage(
        sizes in prop::collection::vec((0usize..20, 0usize..200), 1..12),
        seg_damage in prop::collection::vec(damage(), 0..4),
        ledger_damage in prop::collection::vec(damage(), 0..2),
    ) {
        let fs = SimFs::new();
        let dir = PathBuf::from("/spool");
        let mut written = BTreeMap::new();
        {
            let spool = open(&fs, &dir);
            for (i, (ml, pl)) in sizes.iter().enumerate() {
                let meta = content(3, *ml, i as u8);
                let payload = content(4, *pl, i as u8);
                let seq = spool.append(&meta, &payload).unwrap();
                written.insert(seq, (meta, payload));
            }
            spool.commit().unwrap();
            spool.set_checkpointed(1).unwrap();
        }
        let apply = |mut b: Vec<u8>, ds: &[Damage]| {
            for d in ds {
                match d {
                    Damage::Flip { at, xor } if !b.is_empty() => { let n = b.len(); b[at % n] ^= xor }
                    Damage::Truncate(at) => b.truncate(at % (b.len() + 1)),
                    Damage::Insert { at, bytes } => { let at = at % (b.len() + 1); b.splice(at..at, bytes.iter().copied()); }
                    _ => {}
                }
            }
            b
        };
        for name in fs.files(&dir) {
            let path = dir.join(&name);
            let ds = if name == "acked" { &ledger_damage } else { &seg_damage };
            let Some(bytes) = fs.read(&path) else { continue };
            fs.write_durable(&path, &apply(bytes, ds));
        }
        let (spool, _recovery) = Spool::open_with_fs(&dir, opts(), Arc::new(fs.clone()))
            .unwrap_or_else(|e| panic!("recovery failed: {e}"));
        let mut last = 0;
        for r in spool.records_from(0) {
            let r = r.unwrap();
            prop_assert!(r.seq > last);
            last = r.seq;
            let (meta, payload) = written.get(&r.seq).expect("invented record");
            prop_assert_eq!((&r.meta, &r.payload), (meta, payload));
        }
        let seq = spool.append(b"m", b"p").unwrap();
        prop_assert!(seq > last);
        if seg_damage.is_empty() {
            prop_assert_eq!(last, written.len() as u64, "undamaged segments lost records");
        }
    }
}

/// After a failed fsync nothing more is accepted until a reopen, and the reopen keeps
/// every record committed before the failure.
#[test]
fn failed_fsync_stops_writes_until_reopen() {
    let fs = SimFs::new();
    let dir = PathBuf::from("/spool");
    let spool = open(&fs, &dir);
    spool.append(b"m", b"one").unwrap();
    assert_eq!(spool.commit().unwrap(), 1);
    spool.append(b"m", b"two").unwrap();
    fs.set_fail_syncs(true);
    assert!(matches!(spool.commit(), Err(SpoolError::Io { .. })));
    assert_eq!(spool.stats().durable_seq, 1, "durable moved without fsync");
    assert!(matches!(
        spool.append(b"m", b"three"),
        Err(SpoolError::Failed(_))
    ));
    assert!(matches!(spool.ack(1), Err(SpoolError::Failed(_))));
    fs.set_fail_syncs(false);
    assert!(matches!(spool.commit(), Err(SpoolError::Failed(_))));
    drop(spool);
    fs.crash();
    let spool = open(&fs, &dir);
    let got: Vec<Record> = spool.records_from(0).map(Result::unwrap).collect();
    assert_eq!(
        got,
        vec![Record {
            seq: 1,
            meta: b"m".to_vec(),
            payload: b"one".to_vec()
        }]
    );
    assert_eq!(spool.append(b"m", b"again").unwrap(), 2);
}

/// A full disk (ENOSPC) at any byte of an append or commit — torn record, torn segment
/// header, between segments — discards exactly what was not committed, leaves the
/// spool usable, and a crash right after it recovers exactly the committed records.
#[test]
fn disk_full_discards_the_uncommitted_and_the_spool_stays_usable() {
    let dir = PathBuf::from("/spool");
    for cap in (200..6000).step_by(37) {
        let fs = SimFs::new();
        let spool = open(&fs, &dir);
        let mut committed: Vec<Record> = Vec::new();
        let mut group: Vec<Record> = Vec::new();
        let mut full = 0;
        fs.set_capacity(Some(cap));
        for i in 0..200u64 {
            let payload = vec![b'a' + (i % 26) as u8; 20 + (i as usize * 7) % 90];
            let r = spool.append(b"m", &payload).and_then(|seq| {
                group.push(Record {
                    seq,
                    meta: b"m".to_vec(),
                    payload,
                });
                if i % 3 == 2 {
                    spool.commit().map(|_| ())
                } else {
                    Ok(())
                }
            });
            match r {
                Ok(()) if i % 3 == 2 => committed.append(&mut group),
                Ok(()) => {}
                Err(SpoolError::NoSpace { .. }) => {
                    full += 1;
                    group.clear();
                    let st = spool.stats();
                    assert_eq!(
                        st.next_seq,
                        st.durable_seq + 1,
                        "cap {cap}: seqs not rolled back"
                    );
                    if full == 3 {
                        // Room again, as after an operator freed space.
                        fs.set_capacity(None);
                    }
                }
                Err(e) => panic!("cap {cap}: {e}"),
            }
        }
        spool.commit().unwrap();
        committed.append(&mut group);
        let seqs: Vec<u64> = committed.iter().map(|r| r.seq).collect();
        let want: Vec<u64> = (1..=committed.len() as u64).collect();
        assert_eq!(
            seqs, want,
            "cap {cap}: seqs must stay dense after a discard"
        );
        let got: Vec<Record> = spool.records_from(0).map(Result::unwrap).collect();
        assert_eq!(got, committed, "cap {cap}: running spool");
        drop(spool);
        fs.crash();
        let spool = open(&fs, &dir);
        let got: Vec<Record> = spool.records_from(0).map(Result::unwrap).collect();
        assert_eq!(got, committed, "cap {cap}: after a crash");
        assert!(full > 0 || cap > 5000, "cap {cap}: the disk never filled");
    }
}
