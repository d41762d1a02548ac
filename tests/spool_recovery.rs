//! The spool on the real file system: recovery from torn tails, flipped bytes, garbage
//! headers and a garbage ledger; the size limit; checkpoint gating; sequence numbers
//! that survive the deletion of everything; and a 10k-record round trip.

use std::fs;
use std::path::{Path, PathBuf};

use soclink::spool::{Record, Spool, SpoolError, SpoolOptions};

fn opts() -> SpoolOptions {
    SpoolOptions {
        max_size: 1 << 30,
        segment_size: 64 * 1024 * 1024,
        gate_on_checkpoint: false,
    }
}

fn rec(seq: u64) -> Record {
    Record {
        seq,
        meta: format!("{{\"source\":\"s{seq}\"}}").into_bytes(),
        payload: (0..100u32).map(|i| (i as u64 * 31 + seq) as u8).collect(),
    }
}

fn append(spool: &Spool, seq: u64) {
    let r = rec(seq);
    assert_eq!(spool.append(&r.meta, &r.payload).unwrap(), seq);
}

fn all(spool: &Spool) -> Vec<Record> {
    spool.records_from(0).map(Result::unwrap).collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Record length on disk: 32-byte header + meta + payload.
fn disk_len(seq: u64) -> u64 {
    let r = rec(seq);
    32 + r.meta.len() as u64 + r.payload.len() as u64
}

#[test]
fn layout_is_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, recovery) = Spool::open(dir.path(), opts()).unwrap();
    assert!(recovery.is_clean());
    append(&spool, 1);
    assert_eq!(spool.commit().unwrap(), 1);
    let seg = dir.path().join("00000000000000000001.seg");
    let bytes = fs::read(&seg).unwrap();
    assert_eq!(&bytes[..8], b"SOCLSPOL");
    assert_eq!(&bytes[32..36], b"SLR\xA7");
    assert_eq!(u64::from_le_bytes(bytes[40..48].try_into().unwrap()), 1);
    assert_eq!(bytes.len() as u64, 32 + disk_len(1));
    assert_eq!(&bytes[bytes.len() - 100..], &rec(1).payload[..]);
}

#[test]
fn torn_tail_at_every_byte_of_last_record_is_truncated() {
    let src = tempfile::tempdir().unwrap();
    {
        let (spool, _) = Spool::open(src.path(), opts()).unwrap();
        for seq in 1..=3 {
            append(&spool, seq);
        }
        spool.commit().unwrap();
    }
    let name = "00000000000000000001.seg";
    let full = fs::read(src.path().join(name)).unwrap();
    let last_start = full.len() - disk_len(3) as usize;
    for keep in 0..disk_len(3) as usize {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(name), &full[..last_start + keep]).unwrap();
        let (spool, recovery) = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(recovery.truncated_bytes, keep as u64, "keep {keep}");
        assert_eq!(recovery.corrupt_records, 0);
        assert_eq!(recovery.messages.is_empty(), keep == 0);
        if keep > 0 {
            assert!(
                recovery.messages[0].contains("truncated"),
                "{:?}",
                recovery.messages
            );
        }
        assert_eq!(all(&spool), vec![rec(1), rec(2)], "keep {keep}");
        assert_eq!(
            fs::metadata(dir.path().join(name)).unwrap().len(),
            last_start as u64
        );
        // The cut bytes might have been a record already sent: never reuse its seq.
        let next = spool.stats().next_seq;
        assert_eq!(next, 3 + (keep as u64).div_ceil(32));
        let r = rec(9);
        assert_eq!(spool.append(&r.meta, &r.payload).unwrap(), next);
        spool.commit().unwrap();
        drop(spool);
        let (spool, recovery) = Spool::open(dir.path(), opts()).unwrap();
        assert!(recovery.is_clean(), "{:?}", recovery.messages);
        let got = all(&spool);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].seq, next);
    }
}

#[test]
fn flipped_byte_in_middle_record_skips_only_that_record() {
    let src = tempfile::tempdir().unwrap();
    {
        let (spool, _) = Spool::open(src.path(), opts()).unwrap();
        for seq in 1..=5 {
            append(&spool, seq);
        }
        spool.commit().unwrap();
    }
    let name = "00000000000000000001.seg";
    let full = fs::read(src.path().join(name)).unwrap();
    let start = 32 + (disk_len(1) + disk_len(2)) as usize;
    for i in 0..disk_len(3) as usize {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = full.clone();
        bytes[start + i] ^= 0x41;
        fs::write(dir.path().join(name), &bytes).unwrap();
        let (spool, recovery) = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(recovery.corrupt_records, 1, "flip at {i}");
        assert_eq!(recovery.truncated_bytes, 0);
        assert_eq!(
            all(&spool),
            vec![rec(1), rec(2), rec(4), rec(5)],
            "flip at {i}"
        );
        // A reader asking for the lost seq gets the next one and can see the gap.
        assert_eq!(spool.read(3).unwrap(), Some(rec(4)));
        assert_eq!(spool.stats().next_seq, 6);
        // The damaged bytes are kept, not rewritten.
        assert_eq!(fs::read(dir.path().join(name)).unwrap(), bytes);
    }
}

#[test]
fn garbage_segment_header_is_quarantined_and_neighbours_survive() {
    let dir = tempfile::tempdir().unwrap();
    let small = SpoolOptions {
        segment_size: 400,
        ..opts()
    };
    {
        let (spool, _) = Spool::open(dir.path(), small.clone()).unwrap();
        for seq in 1..=9 {
            append(&spool, seq);
        }
        spool.commit().unwrap();
    }
    let segs = segments(dir.path());
    assert!(segs.len() >= 3, "{segs:?}");
    let original = fs::read(&segs[0]).unwrap();
    let mut bad = original.clone();
    bad[..8].copy_from_slice(b"GARBAGE!");
    fs::write(&segs[0], &bad).unwrap();

    let (spool, recovery) = Spool::open(dir.path(), small.clone()).unwrap();
    let mut corrupt = segs[0].clone().into_os_string();
    corrupt.push(".corrupt");
    assert_eq!(recovery.quarantined, vec![PathBuf::from(&corrupt)]);
    assert_eq!(
        fs::read(&corrupt).unwrap(),
        bad,
        "quarantined bytes kept as they were"
    );
    assert!(!segs[0].exists());
    let got = all(&spool);
    let first_kept = got[0].seq;
    assert!(first_kept > 1);
    let want: Vec<Record> = (first_kept..=9).map(rec).collect();
    assert_eq!(got, want);
    drop(spool);

    // The newest segment's header damaged: its seqs must not be handed out again.
    let segs = segments(dir.path());
    let newest = segs.last().unwrap().clone();
    fs::write(
        &newest,
        b"\0\0\0\0 not a segment header at all, but long enough",
    )
    .unwrap();
    let (spool, recovery) = Spool::open(dir.path(), small).unwrap();
    assert_eq!(recovery.quarantined.len(), 1);
    let next = spool.append(b"m", b"p").unwrap();
    assert!(
        next >= 10,
        "seq {next} may reuse a quarantined record's seq"
    );
}

#[test]
fn garbage_ledger_is_quarantined_and_everything_present_is_resent() {
    for garbage in [
        &b"definitely not a ledger, but forty bytes."[..],
        b"",
        b"SOCLACKD",
    ] {
        let dir = tempfile::tempdir().unwrap();
        {
            let (spool, _) = Spool::open(dir.path(), opts()).unwrap();
            for seq in 1..=5 {
                append(&spool, seq);
            }
            spool.commit().unwrap();
            spool.ack(3).unwrap();
        }
        let ledger = dir.path().join("acked");
        fs::write(&ledger, garbage).unwrap();
        let (spool, recovery) = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(recovery.quarantined, vec![dir.path().join("acked.corrupt")]);
        assert!(
            recovery.messages.iter().any(|m| m.contains("ledger")),
            "{:?}",
            recovery.messages
        );
        // Safe fallback: re-send from the oldest present record (relay dedupes by seq).
        assert_eq!(spool.acked(), 0);
        assert_eq!(spool.read(0).unwrap(), Some(rec(1)));
        // And the next seq still continues after every record ever written.
        assert_eq!(spool.append(b"m", b"p").unwrap(), 6);
    }
}

#[test]
fn seqs_survive_deletion_of_every_acked_segment_and_of_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let small = SpoolOptions {
        segment_size: 300,
        ..opts()
    };
    {
        let (spool, _) = Spool::open(dir.path(), small.clone()).unwrap();
        for seq in 1..=20 {
            append(&spool, seq);
        }
        assert_eq!(spool.commit().unwrap(), 20);
        spool.ack(20).unwrap();
        assert_eq!(segments(dir.path()).len(), 1, "acked segments not deleted");
        assert_eq!(spool.read(0).unwrap(), None);
    }
    let (spool, recovery) = Spool::open(dir.path(), small.clone()).unwrap();
    assert!(recovery.is_clean());
    assert_eq!(spool.acked(), 20);
    assert_eq!(
        spool.read(0).unwrap(),
        None,
        "acked record handed out after restart"
    );
    assert_eq!(spool.append(b"m", b"p").unwrap(), 21);
    drop(spool);
    // Even without the ledger the newest segment carries the counter.
    fs::remove_file(dir.path().join("acked")).unwrap();
    let (spool, _) = Spool::open(dir.path(), small).unwrap();
    assert_eq!(spool.acked(), 0);
    // What is left of the newest segment is sent again (safe: the relay dedupes).
    assert_eq!(spool.read(0).unwrap().map(|r| r.seq), Some(20));
    assert_eq!(spool.append(b"m", b"p").unwrap(), 21);
}

#[test]
fn resync_finds_next_record_across_a_large_damaged_record() {
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    {
        let (spool, _) = Spool::open(dir.path(), opts()).unwrap();
        append(&spool, 1);
        assert_eq!(spool.append(b"big", &big).unwrap(), 2);
        append(&spool, 3);
        spool.commit().unwrap();
    }
    let seg = dir.path().join("00000000000000000001.seg");
    let mut bytes = fs::read(&seg).unwrap();
    let start = 32 + disk_len(1) as usize;
    bytes[start + 1] ^= 0xff; // the record magic of the big record
    fs::write(&seg, &bytes).unwrap();
    let (spool, recovery) = Spool::open(dir.path(), opts()).unwrap();
    assert_eq!(recovery.corrupt_records, 1);
    assert_eq!(all(&spool), vec![rec(1), rec(3)]);
}

#[test]
fn checkpoint_gate_keeps_acked_segments_until_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let gated = SpoolOptions {
        segment_size: 300,
        gate_on_checkpoint: true,
        ..opts()
    };
    let (spool, _) = Spool::open(dir.path(), gated.clone()).unwrap();
    for seq in 1..=10 {
        append(&spool, seq);
    }
    spool.commit().unwrap();
    let before = segments(dir.path()).len();
    assert!(before >= 3);
    spool.ack(10).unwrap();
    assert_eq!(
        segments(dir.path()).len(),
        before,
        "deleted before checkpoint"
    );
    // Unacked readers see nothing, the checkpoint replay sees everything.
    assert_eq!(spool.read(0).unwrap(), None);
    assert_eq!(all(&spool), (1..=10).map(rec).collect::<Vec<_>>());
    drop(spool);
    let (spool, _) = Spool::open(dir.path(), gated).unwrap();
    assert_eq!(all(&spool).len(), 10);
    spool.set_checkpointed(10).unwrap();
    assert_eq!(segments(dir.path()).len(), 1);
    assert_eq!(spool.checkpointed(), 10);
}

#[test]
fn size_limit_blocks_appends_until_ack_frees_segments() {
    let dir = tempfile::tempdir().unwrap();
    let limited = SpoolOptions {
        max_size: 4096,
        ..opts()
    };
    let (spool, _) = Spool::open(dir.path(), limited).unwrap();
    let mut seq = 0;
    while !spool.is_full() {
        seq += 1;
        append(&spool, seq);
        assert!(seq < 100, "never became full");
    }
    assert!(spool.stats().bytes >= 4096);
    assert!(matches!(
        spool.append(b"m", b"p"),
        Err(SpoolError::Full { max_size: 4096, .. })
    ));
    // Not durable yet: cannot be acknowledged.
    assert!(matches!(
        spool.ack(seq),
        Err(SpoolError::BeyondDurable { .. })
    ));
    assert_eq!(spool.commit().unwrap(), seq);
    let mut acked = spool.watch_acked();
    spool.ack(seq).unwrap();
    assert!(acked.has_changed().unwrap());
    assert_eq!(*acked.borrow_and_update(), seq);
    assert!(!spool.is_full(), "{:?}", spool.stats());
    append(&spool, seq + 1);
}

#[test]
fn oversized_record_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), opts()).unwrap();
    // Zeroed allocations stay virtual: this costs no real memory.
    let half = vec![0u8; 128 * 1024 * 1024];
    let more = vec![0u8; 128 * 1024 * 1024 + 1];
    assert!(matches!(
        spool.append(&half, &more),
        Err(SpoolError::TooLarge { .. })
    ));
    assert_eq!(spool.stats().next_seq, 1);
}

#[test]
fn ten_thousand_records_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let o = SpoolOptions {
        segment_size: 256 * 1024,
        ..opts()
    };
    let payload = |seq: u64| -> Vec<u8> {
        let len = (seq % 300) as usize;
        (0..len).map(|i| (seq as usize * 7 + i) as u8).collect()
    };
    let (spool, _) = Spool::open(dir.path(), o.clone()).unwrap();
    let mut durable = spool.watch_durable();
    for seq in 1..=10_000u64 {
        let meta = seq.to_string().into_bytes();
        assert_eq!(spool.append(&meta, &payload(seq)).unwrap(), seq);
        if seq % 100 == 0 {
            assert_eq!(spool.commit().unwrap(), seq);
        }
    }
    assert_eq!(*durable.borrow_and_update(), 10_000);
    assert!(spool.stats().segments > 5);
    let mut next = 1;
    while let Some(r) = spool.read(next).unwrap() {
        assert_eq!(r.seq, next);
        assert_eq!(r.meta, next.to_string().into_bytes());
        assert_eq!(r.payload, payload(next));
        next += 1;
    }
    assert_eq!(next, 10_001);
    drop(spool);
    let (spool, recovery) = Spool::open(dir.path(), o).unwrap();
    assert!(recovery.is_clean());
    let mut n = 0;
    for (i, r) in spool.records_from(1).enumerate() {
        let r = r.unwrap();
        assert_eq!(r.seq, i as u64 + 1);
        assert_eq!(r.payload, payload(r.seq));
        n += 1;
    }
    assert_eq!(n, 10_000);
    spool.ack(5_000).unwrap();
    assert_eq!(spool.read(1).unwrap().map(|r| r.seq), Some(5_001));
    assert_eq!(spool.stats().first_unacked, 5_001);
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<Spool>();
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), opts()).unwrap();
    let clone = spool.clone();
    assert!(matches!(
        Spool::open(dir.path(), opts()),
        Err(SpoolError::Locked { .. })
    ));
    drop(spool);
    // A clone keeps the lock; the last drop releases it.
    assert!(Spool::open(dir.path(), opts()).is_err());
    drop(clone);
    let (spool, recovery) = Spool::open(dir.path(), opts()).unwrap();
    assert!(recovery.is_clean());
    drop(spool);
}

#[test]
fn newer_format_version_is_refused_not_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (spool, _) = Spool::open(dir.path(), opts()).unwrap();
        append(&spool, 1);
        spool.commit().unwrap();
    }
    let seg = dir.path().join("00000000000000000001.seg");
    let mut bytes = fs::read(&seg).unwrap();
    // Version 2 with a correct header checksum: intact, just newer.
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32fast::hash(&bytes[0..24]);
    bytes[24..28].copy_from_slice(&crc.to_le_bytes());
    fs::write(&seg, &bytes).unwrap();
    match Spool::open(dir.path(), opts()) {
        Err(SpoolError::Corrupt { path, detail }) => {
            assert_eq!(path, seg);
            assert!(detail.contains("version 2"), "{detail}");
        }
        other => panic!("expected refusal, got {other:?}"),
    }
    assert_eq!(fs::read(&seg).unwrap(), bytes, "file touched");
}
