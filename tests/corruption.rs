//! Corruption of every on-disk format, in process, against the real open and recovery
//! functions: agent spool segments and ack ledger ([`Spool::open_with_fs`] on
//! [`SimFs`]), source checkpoints ([`Checkpoints::load_or_quarantine`] on [`SimFs`]) and
//! the relay's dedupe state ([`Store::open_with_fs`] on an in-memory [`StoreFs`]).
//!
//! Two kinds of cases: every header byte flipped (three masks) and truncated at, and
//! seeded random mutations (bit flips, truncations, splices, zeroed ranges, appended
//! garbage), [`RANDOM_PER_FORMAT`] per format group. Each must open without panic or
//! error, report the damage (a quarantined file or a cut or skipped region), and keep
//! every record or batch whose bytes the mutation did not touch. Reproduce a run
//! with the `SOCLINK_SEED` it prints; `SOCLINK_CORRUPTION_CASES=N` changes the count.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::{RngExt, SeedableRng};
use soclink::agent::sources::checkpoint::{Checkpoints, FilePos};
use soclink::fs::sim::SimFs;
use soclink::relay::sink::file::{Store, StoreFs, StoreOptions};
use soclink::spool::{Fs, Spool, SpoolOptions};

/// Random mutations per format group (spool, checkpoints, dedupe state): 3 x 3400 =
/// 10,200 per run.
const RANDOM_PER_FORMAT: usize = 3400;

fn cases() -> usize {
    std::env::var("SOCLINK_CORRUPTION_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(RANDOM_PER_FORMAT)
}

/// Seeded from `SOCLINK_SEED`, so a failing mutation replays.
type Rng = rand::rngs::StdRng;

/// A uniform index below `n` (0 when `n` is 0).
fn below(rng: &mut Rng, n: usize) -> usize {
    rng.random_range(0..n.max(1))
}

/// One way to damage a file.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte with a non-zero mask.
    Flip {
        at: usize,
        mask: u8,
    },
    Truncate {
        len: usize,
    },
    /// Copy `len` bytes from `from` over `at` (a misdirected write).
    Splice {
        from: usize,
        at: usize,
        len: usize,
    },
    Zero {
        at: usize,
        len: usize,
    },
    Append {
        garbage: Vec<u8>,
    },
}

impl Mutation {
    fn random(rng: &mut Rng, len: usize) -> Mutation {
        let span = |rng: &mut Rng| {
            let max = if below(rng, 4) == 0 { 256 } else { 16 };
            1 + below(rng, max)
        };
        match below(rng, 5) {
            0 => Mutation::Flip {
                at: below(rng, len),
                mask: 1 << below(rng, 8),
            },
            1 => Mutation::Truncate {
                len: below(rng, len),
            },
            2 => Mutation::Splice {
                from: below(rng, len),
                at: below(rng, len),
                len: span(rng),
            },
            3 => Mutation::Zero {
                at: below(rng, len),
                len: span(rng),
            },
            _ => {
                let n = span(rng);
                Mutation::Append {
                    garbage: (0..n).map(|_| rng.random::<u8>()).collect(),
                }
            }
        }
    }

    /// Applies the mutation; returns the byte range of the original it changed or cut
    /// (`usize::MAX` as end: through the end of the file). An in-place mutation is
    /// narrowed to the bytes that really differ: a splice or zeroing may write some
    /// bytes with the value they already had, and those carry no damage to report.
    fn apply(&self, data: &mut Vec<u8>) -> (usize, usize) {
        let before = data.clone();
        let (from, to) = self.apply_nominal(data);
        if to == usize::MAX {
            return (from, to);
        }
        let differs = |i: &usize| before[*i] != data[*i];
        match (from..to).find(differs) {
            Some(first) => (first, (from..to).rev().find(differs).unwrap() + 1),
            None => (from, from),
        }
    }

    fn apply_nominal(&self, data: &mut Vec<u8>) -> (usize, usize) {
        match *self {
            Mutation::Flip { at, mask } => {
                data[at] ^= mask;
                (at, at + 1)
            }
            Mutation::Truncate { len } => {
                data.truncate(len);
                (len, usize::MAX)
            }
            Mutation::Splice { from, at, len } => {
                let src: Vec<u8> = data[from..(from + len).min(data.len())].to_vec();
                let end = (at + src.len()).min(data.len());
                data[at..end].copy_from_slice(&src[..end - at]);
                (at, end)
            }
            Mutation::Zero { at, len } => {
                let end = (at + len).min(data.len());
                data[at..end].fill(0);
                (at, end)
            }
            Mutation::Append { ref garbage } => {
                let n = data.len();
                data.extend_from_slice(garbage);
                (n, usize::MAX)
            }
        }
    }
}

/// Runs one case, turning a panic into a failure that names the case.
fn guard(what: &str, case: &dyn Fn()) {
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(case)) {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{what}: {msg}");
    }
}

// ---------------------------------------------------------------------------------------
// Spool segments and ledger
// ---------------------------------------------------------------------------------------

const SPOOL: &str = "/spool";
const SEG_HEADER: usize = 32;
const REC_HEADER: usize = 32;
const RECORDS: u64 = 14;

fn meta(seq: u64) -> Vec<u8> {
    format!("{{\"source\":\"app\",\"day\":\"2026-11-26\",\"n\":{seq}}}").into_bytes()
}
fn payload(seq: u64) -> Vec<u8> {
    (0..(20 + seq * 7))
        .map(|i| (i as u8) ^ (seq as u8))
        .collect()
}

/// A spool with several segments and a ledger (record 1 acknowledged); returns its
/// files and, per segment file, the byte range of each record.
struct SpoolBase {
    files: BTreeMap<String, Vec<u8>>,
    ranges: BTreeMap<String, Vec<(u64, usize, usize)>>,
}

fn spool_opts() -> SpoolOptions {
    SpoolOptions {
        max_size: 1 << 20,
        segment_size: 400,
        gate_on_checkpoint: false,
    }
}

fn spool_base() -> SpoolBase {
    let fs = SimFs::new();
    let (spool, rec) = Spool::open_with_fs(Path::new(SPOOL), spool_opts(), Arc::new(fs.clone()))
        .expect("open a new spool");
    assert!(rec.is_clean());
    for seq in 1..=RECORDS {
        assert_eq!(spool.append(&meta(seq), &payload(seq)).unwrap(), seq);
        if seq % 3 == 0 {
            spool.commit().unwrap();
        }
    }
    spool.commit().unwrap();
    spool.ack(1).unwrap();
    drop(spool);
    let mut files = BTreeMap::new();
    let mut ranges = BTreeMap::new();
    for name in fs.files(Path::new(SPOOL)) {
        if name == "lock" {
            continue;
        }
        let data = fs.read(&Path::new(SPOOL).join(&name)).unwrap();
        if let Some(first) = name.strip_suffix(".seg") {
            let mut seq: u64 = first.parse().unwrap();
            let mut at = SEG_HEADER;
            let mut recs = Vec::new();
            while at < data.len() {
                let len = REC_HEADER + meta(seq).len() + payload(seq).len();
                recs.push((seq, at, at + len));
                at += len;
                seq += 1;
            }
            assert_eq!(at, data.len(), "{name}: records as expected");
            ranges.insert(name.clone(), recs);
        }
        files.insert(name, data);
    }
    assert!(ranges.len() >= 4, "several segments: {:?}", ranges.keys());
    assert!(files.contains_key("acked"));
    SpoolBase { files, ranges }
}

/// Damages `target` with `m`, reopens, and checks the spool's promises.
fn spool_case(base: &SpoolBase, target: &str, m: &Mutation) {
    let fs = SimFs::new();
    let dir = Path::new(SPOOL);
    let mut damaged = base.files[target].clone();
    let (from, to) = m.apply(&mut damaged);
    for (name, data) in &base.files {
        let data = if name == target { &damaged } else { data };
        fs.write_durable(&dir.join(name), data);
    }
    let changed = damaged != base.files[target];
    let (spool, rec) = Spool::open_with_fs(dir, spool_opts(), Arc::new(fs.clone()))
        .unwrap_or_else(|e| panic!("open failed: {e}"));
    if !changed {
        assert!(rec.is_clean(), "nothing changed: {rec:?}");
        return;
    }
    // Segment header bytes 28..32 and ledger bytes 36..40 are reserved, carry nothing
    // and are not covered by the CRC (see the report): the only damage allowed unseen.
    let reserved_only = match target {
        "acked" => from >= 36 && to <= 40,
        _ => from >= 28 && to <= SEG_HEADER,
    };
    // A segment cut exactly at a record boundary looks like a complete segment: the
    // format records no segment length or record count, so this loss is not seen
    // (left open, see docs/OPERATIONS.md "Damaged files"); the records before the cut
    // are still checked below.
    let boundary_cut = match m {
        Mutation::Truncate { len } if target != "acked" => {
            *len == SEG_HEADER || base.ranges[target].iter().any(|r| r.2 == *len)
        }
        _ => false,
    };
    if !reserved_only && !boundary_cut {
        assert!(!rec.is_clean(), "damage not reported");
    }
    // Whatever was quarantined keeps the damaged bytes for an operator.
    for q in &rec.quarantined {
        assert!(fs.read(q).is_some(), "{} kept", q.display());
    }
    let segment_quarantined = rec
        .quarantined
        .iter()
        .any(|q| q.file_name().unwrap().to_string_lossy().starts_with(target));
    let ledger_lost = target == "acked" && !reserved_only;
    // Every record outside the damaged bytes (and not in a quarantined segment) is
    // still handed out, byte for byte.
    for (name, recs) in &base.ranges {
        for &(seq, a, b) in recs {
            let touched = name == target && (segment_quarantined || (a < to && from < b));
            let got = spool
                .read(seq)
                .unwrap_or_else(|e| panic!("read {seq}: {e}"))
                .filter(|r| r.seq == seq);
            if seq == 1 && !ledger_lost {
                assert!(got.is_none(), "acknowledged record 1 handed out again");
                continue;
            }
            match got {
                Some(r) => {
                    assert_eq!(
                        (r.meta, r.payload),
                        (meta(seq), payload(seq)),
                        "record {seq}"
                    )
                }
                None => assert!(touched, "intact record {seq} lost"),
            }
        }
    }
    // Still usable, and a seq that may have been handed out is never reused, except
    // in two known cases of the newest segment (left open; see docs/OPERATIONS.md
    // "Damaged files"): cut below its header it is taken for a torn creation (the
    // common crash) and removed; cut at a record boundary it looks complete. Either
    // way the seqs of the lost records are given again.
    let newest = base.ranges.keys().last().map(String::as_str) == Some(target);
    let torn_creation = matches!(m, Mutation::Truncate { len } if *len < SEG_HEADER);
    let next = spool.append(b"{}", b"after").unwrap();
    assert!(
        next > RECORDS || (newest && (torn_creation || boundary_cut)),
        "seq {next} reused"
    );
    spool.commit().unwrap();
}

#[test]
fn spool_every_header_byte_flipped_or_truncated() {
    let base = spool_base();
    let mut n = 0;
    for (target, header) in [
        (base.ranges.keys().next().unwrap().clone(), SEG_HEADER),
        (base.ranges.keys().nth(1).unwrap().clone(), SEG_HEADER),
        (base.ranges.keys().last().unwrap().clone(), SEG_HEADER),
        ("acked".to_string(), 40),
    ] {
        for at in 0..header {
            for m in [
                Mutation::Flip { at, mask: 0x01 },
                Mutation::Flip { at, mask: 0x80 },
                Mutation::Flip { at, mask: 0xff },
                Mutation::Truncate { len: at },
            ] {
                guard(&format!("{target} {m:?}"), &|| {
                    spool_case(&base, &target, &m)
                });
                n += 1;
            }
        }
        // The first record's header, too.
        if target != "acked" {
            for at in SEG_HEADER..SEG_HEADER + REC_HEADER {
                for m in [
                    Mutation::Flip { at, mask: 0x10 },
                    Mutation::Truncate { len: at },
                ] {
                    guard(&format!("{target} {m:?}"), &|| {
                        spool_case(&base, &target, &m)
                    });
                    n += 1;
                }
            }
        }
    }
    eprintln!("spool header cases: {n}");
}

#[test]
fn spool_random_mutations() {
    let seed = common::seed();
    let mut rng = Rng::seed_from_u64(seed);
    let base = spool_base();
    let targets: Vec<&String> = base.files.keys().collect();
    let total = cases();
    for i in 0..total {
        let target = targets[below(&mut rng, targets.len())];
        let m = Mutation::random(&mut rng, base.files[target].len());
        guard(&format!("seed {seed} case {i}: {target} {m:?}"), &|| {
            spool_case(&base, target, &m)
        });
    }
    eprintln!("spool random cases: {total}");
}

// ---------------------------------------------------------------------------------------
// Source checkpoints
// ---------------------------------------------------------------------------------------

fn checkpoint_base() -> Vec<u8> {
    let mut c = Checkpoints {
        spool_seq: 4711,
        ..Checkpoints::default()
    };
    for ino in 1..=4 {
        let p = FilePos {
            dev: 2049,
            ino,
            fp_len: 64,
            fp: 0xdead_beef ^ ino,
            path: format!("/var/log/app-{ino}.log"),
            offset: 1000 * ino,
            gone: false,
        };
        c.sources
            .entry("app".into())
            .or_default()
            .insert(p.key(), p);
    }
    c.cursors
        .insert("journal".into(), serde_json::json!("s=abc;i=42"));
    c.encode()
}

fn checkpoint_case(base: &[u8], m: &Mutation) {
    let fs = SimFs::new();
    let dir = Path::new("/state");
    let path = dir.join("checkpoints.json");
    fs.create_dir_all(dir).unwrap();
    // An earlier quarantined copy must survive a second one.
    fs.write_durable(&dir.join("checkpoints.json.corrupt"), b"earlier");
    let mut damaged = base.to_vec();
    m.apply(&mut damaged);
    fs.write_durable(&path, &damaged);
    let (c, reset) = Checkpoints::load_or_quarantine(&fs, &path);
    if damaged == base {
        assert!(reset.is_none());
        assert_eq!(c.spool_seq, 4711);
        return;
    }
    let (e, aside) = reset.expect("damage not detected");
    assert!(
        e.to_string().contains("checkpoints.json"),
        "names the file: {e}"
    );
    let aside = aside.expect("moved aside");
    assert_eq!(aside, dir.join("checkpoints.json.corrupt.1"));
    assert_eq!(fs.read(&aside).unwrap(), damaged, "kept as found");
    assert_eq!(
        fs.read(&dir.join("checkpoints.json.corrupt")).unwrap(),
        b"earlier"
    );
    assert!(fs.read(&path).is_none(), "no longer in place");
    assert_eq!(c, Checkpoints::default());
    // Logged once: the next start finds nothing to report.
    let (_, again) = Checkpoints::load_or_quarantine(&fs, &path);
    assert!(again.is_none());
}

#[test]
fn checkpoints_every_header_byte_flipped_or_truncated() {
    let base = checkpoint_base();
    let header = base.iter().position(|&b| b == b'\n').unwrap() + 1;
    let mut n = 0;
    for at in 0..header {
        for m in [
            Mutation::Flip { at, mask: 0x01 },
            Mutation::Flip { at, mask: 0x20 },
            Mutation::Flip { at, mask: 0x80 },
            Mutation::Flip { at, mask: 0xff },
            Mutation::Truncate { len: at },
        ] {
            guard(&format!("checkpoints {m:?}"), &|| {
                checkpoint_case(&base, &m)
            });
            n += 1;
        }
    }
    eprintln!("checkpoint header cases: {n}");
}

#[test]
fn checkpoints_random_mutations() {
    let seed = common::seed();
    let mut rng = Rng::seed_from_u64(seed ^ 0xC4EC);
    let base = checkpoint_base();
    let total = cases();
    for i in 0..total {
        let m = Mutation::random(&mut rng, base.len());
        guard(&format!("seed {seed} case {i}: {m:?}"), &|| {
            checkpoint_case(&base, &m)
        });
    }
    eprintln!("checkpoint random cases: {total}");
}

// ---------------------------------------------------------------------------------------
// The relay's dedupe state
// ---------------------------------------------------------------------------------------

/// The file system as the store sees it, in memory. Syncs are no-ops: these cases are
/// about damage, not power loss (tests/store_model.rs models that).
#[derive(Clone, Default)]
struct MemFs(Arc<Mutex<MemState>>);

#[derive(Clone, Default)]
struct MemState {
    dirs: BTreeSet<PathBuf>,
    files: BTreeMap<PathBuf, Vec<u8>>,
}

impl MemFs {
    fn read(&self, p: &Path) -> Option<Vec<u8>> {
        self.0.lock().unwrap().files.get(p).cloned()
    }
    fn write(&self, p: &Path, data: &[u8]) {
        self.0.lock().unwrap().files.insert(p.into(), data.to_vec());
    }
    fn deep_clone(&self) -> MemFs {
        MemFs(Arc::new(Mutex::new(self.0.lock().unwrap().clone())))
    }
}

fn nf() -> io::Error {
    io::Error::from(io::ErrorKind::NotFound)
}

impl StoreFs for MemFs {
    fn create_dir(&self, path: &Path) -> io::Result<bool> {
        let mut s = self.0.lock().unwrap();
        if s.dirs.contains(path) {
            return Ok(false);
        }
        match path.parent() {
            Some(p) if p == Path::new("/") || s.dirs.contains(p) => {
                s.dirs.insert(path.into());
                Ok(true)
            }
            _ => Err(nf()),
        }
    }
    fn file_len(&self, path: &Path) -> io::Result<Option<u64>> {
        Ok(self.read(path).map(|d| d.len() as u64))
    }
    fn write_at(&self, path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        let f = s.files.entry(path.into()).or_default();
        let end = offset as usize + data.len();
        if f.len() < end {
            f.resize(end, 0);
        }
        f[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        s.files
            .get_mut(path)
            .ok_or_else(nf)?
            .resize(len as usize, 0);
        Ok(())
    }
    fn sync_file(&self, _: &Path) -> io::Result<()> {
        Ok(())
    }
    fn sync_dir(&self, _: &Path) -> io::Result<()> {
        Ok(())
    }
    fn read_limited(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
        let mut d = self.read(path).ok_or_else(nf)?;
        d.truncate(limit as usize + 1);
        Ok(d)
    }
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        self.write(path, data);
        Ok(())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        let d = s.files.remove(from).ok_or_else(nf)?;
        s.files.insert(to.into(), d);
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.0
            .lock()
            .unwrap()
            .files
            .remove(path)
            .map(|_| ())
            .ok_or_else(nf)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let s = self.0.lock().unwrap();
        Ok(s.files
            .keys()
            .chain(s.dirs.iter())
            .filter(|k| k.parent() == Some(path))
            .filter_map(|k| k.file_name()?.to_str().map(str::to_string))
            .collect())
    }
}

fn store_opts() -> StoreOptions {
    StoreOptions {
        store_dir: "/store".into(),
        state_dir: "/state".into(),
    }
}

const DAY: &str = "2026-11-26";
const AGENTS: [&str; 2] = ["web-01", "db-01"];

fn batch(agent: &str, seq: u64) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    writeln!(e, "{{\"agent\":\"{agent}\",\"n\":{seq}}}").unwrap();
    e.finish().unwrap()
}

fn state_path(agent: &str) -> PathBuf {
    PathBuf::from(format!("/state/dedupe/{agent}.state"))
}
fn store_file(agent: &str, source: &str) -> PathBuf {
    PathBuf::from(format!("/store/{agent}/{source}/{DAY}.ndjson.gz"))
}

/// Two agents with two streams and two source files each, 1..=5 committed per stream.
fn store_base() -> MemFs {
    let fs = MemFs::default();
    fs.0.lock().unwrap().dirs.insert("/".into());
    let (mut st, rec) = Store::open_with_fs(store_opts(), Arc::new(fs.clone())).unwrap();
    assert!(rec.is_clean());
    for seq in 1..=5 {
        for agent in AGENTS {
            for (stream, source) in [("main", "app"), ("prio", "auth")] {
                st.append(agent, stream, seq, source, DAY, &batch(agent, seq))
                    .unwrap();
            }
        }
        st.commit().unwrap();
    }
    fs
}

fn store_case(base: &MemFs, m: &Mutation) {
    let fs = base.deep_clone();
    let victim = AGENTS[0];
    let original = fs.read(&state_path(victim)).unwrap();
    let files_before: Vec<_> = AGENTS
        .iter()
        .flat_map(|a| [store_file(a, "app"), store_file(a, "auth")])
        .map(|p| fs.read(&p).unwrap())
        .collect();
    let mut damaged = original.clone();
    m.apply(&mut damaged);
    fs.write(&state_path(victim), &damaged);
    let (mut st, rec) = Store::open_with_fs(store_opts(), Arc::new(fs.clone()))
        .unwrap_or_else(|e| panic!("open failed (the relay would not start): {e}"));
    // No store file is cut or changed: they may hold acknowledged batches.
    let files_after: Vec<_> = AGENTS
        .iter()
        .flat_map(|a| [store_file(a, "app"), store_file(a, "auth")])
        .map(|p| fs.read(&p).unwrap())
        .collect();
    assert_eq!(files_after, files_before, "store files changed");
    // The neighbour keeps its exact dedupe position.
    for stream in ["main", "prio"] {
        assert_eq!(st.stored_seq(AGENTS[1], stream), 5);
    }
    if damaged == original {
        assert!(rec.is_clean(), "{rec:?}");
        return;
    }
    assert_eq!(rec.quarantined.len(), 1, "damage not quarantined: {rec:?}");
    let q = &rec.quarantined[0];
    assert_eq!(q.agent.as_deref(), Some(victim));
    assert_eq!(
        q.aside,
        PathBuf::from(format!("/state/dedupe/{victim}.state.corrupt"))
    );
    assert_eq!(fs.read(&q.aside).unwrap(), damaged, "kept as found");
    assert_eq!(st.stored_seq(victim, "main"), 0);
    // The victim's next batch (after its own acknowledged 5) is stored after the
    // intact ones; a resend of an old one stored twice is the documented price.
    st.append_accepting_gap(victim, "main", 6, "app", DAY, &batch(victim, 6))
        .unwrap();
    st.commit().unwrap();
    let mut want = files_before[0].clone();
    want.extend_from_slice(&batch(victim, 6));
    assert_eq!(fs.read(&store_file(victim, "app")).unwrap(), want);
    let resets = st.dedupe_resets();
    assert_eq!(resets.len(), 1);
    assert_eq!(
        (resets[0].streams[0].from, resets[0].streams[0].through),
        (6, 69)
    );
    drop(st);
    // Reported once: the next open is clean, the position and the mark persist.
    let (st, again) = Store::open_with_fs(store_opts(), Arc::new(fs.clone())).unwrap();
    assert!(again.is_clean(), "{again:?}");
    assert_eq!(st.stored_seq(victim, "main"), 6);
    assert_eq!(st.dedupe_resets().len(), 1);
}

#[test]
fn dedupe_state_every_header_byte_flipped_or_truncated() {
    let base = store_base();
    let data = base.read(&state_path(AGENTS[0])).unwrap();
    let header = data.iter().position(|&b| b == b'\n').unwrap() + 1;
    let mut n = 0;
    for at in 0..header {
        for m in [
            Mutation::Flip { at, mask: 0x01 },
            Mutation::Flip { at, mask: 0x20 },
            Mutation::Flip { at, mask: 0x80 },
            Mutation::Flip { at, mask: 0xff },
            Mutation::Truncate { len: at },
        ] {
            guard(&format!("dedupe state {m:?}"), &|| store_case(&base, &m));
            n += 1;
        }
    }
    eprintln!("dedupe state header cases: {n}");
}

#[test]
fn dedupe_state_random_mutations() {
    let seed = common::seed();
    let mut rng = Rng::seed_from_u64(seed ^ 0xDEDE);
    let base = store_base();
    let len = base.read(&state_path(AGENTS[0])).unwrap().len();
    let total = cases();
    for i in 0..total {
        let m = Mutation::random(&mut rng, len);
        guard(&format!("seed {seed} case {i}: {m:?}"), &|| {
            store_case(&base, &m)
        });
    }
    eprintln!("dedupe state random cases: {total}");
}

/// A state file whose name is no agent id is set aside too, not a reason to stop.
#[test]
fn a_state_file_with_an_unsafe_name_is_set_aside() {
    let fs = store_base();
    fs.write(Path::new("/state/dedupe/.hidden.state"), b"whatever");
    let (st, rec) = Store::open_with_fs(store_opts(), Arc::new(fs.clone())).unwrap();
    assert_eq!(rec.quarantined.len(), 1, "{rec:?}");
    assert_eq!(rec.quarantined[0].agent, None);
    assert!(
        fs.read(Path::new("/state/dedupe/.hidden.state.corrupt"))
            .is_some()
    );
    assert_eq!(st.stored_seq(AGENTS[0], "main"), 5);
}

// ---------------------------------------------------------------------------------------
// Real processes: a relay whose dedupe state is corrupt
// ---------------------------------------------------------------------------------------

fn relay_status(relay: &common::RelayProc, json: bool) -> String {
    // The control socket opens just after the listener: retry briefly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut cmd = std::process::Command::new(common::bin());
        cmd.arg("status").arg("-c").arg(&relay.config);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status: {}; relay log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            relay.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The relay comes up on a corrupt dedupe state, sets it aside (logged once, shown in
/// `soclink status`), keeps serving the other agent exactly as before, and the damaged
/// agent's old lines stay stored while each new one is stored once.
#[test]
fn a_relay_with_a_corrupt_dedupe_state_starts_and_keeps_every_line() {
    use common::*;
    use std::time::Duration;
    const T: Duration = Duration::from_secs(60);
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let mut agents = Vec::new();
    let mut expected: Vec<Vec<Vec<u8>>> = Vec::new();
    for name in ["victim", "neighbour"] {
        let adir = dir.path().join(name);
        std::fs::create_dir_all(&adir).unwrap();
        let log = adir.join("app.log");
        expected.push(append(&log, 0, 300, name));
        let mut a = AgentProc::new(
            &adir,
            &file_source("app", &[&log], ""),
            &upstream_toml(&pki, &relay.address(), name),
        );
        a.start();
        agents.push((a, log));
    }
    for (i, name) in ["victim", "neighbour"].into_iter().enumerate() {
        wait_store(&relay, name, T, "first 300 lines", |e| {
            e.len() >= expected[i].len()
        });
    }
    // Let the acknowledgements arrive, so nothing is in flight when the state is lost.
    std::thread::sleep(Duration::from_secs(1));
    for (a, _) in &mut agents {
        a.stop();
    }
    relay.stop();

    let state = relay.dir.join("state/dedupe/victim.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() - 10;
    bytes[mid] ^= 0x04;
    std::fs::write(&state, &bytes).unwrap();

    relay.start();
    let v: serde_json::Value = serde_json::from_str(&relay_status(&relay, true)).unwrap();
    let r = &v["recovery"];
    assert_eq!(
        r["quarantined"],
        serde_json::json!(["dedupe/victim.state.corrupt"]),
        "{r}"
    );
    assert_eq!(r["dedupe_resets"][0]["agent"], "victim", "{r}");
    assert_eq!(r["dedupe_resets"][0]["duplicates_possible"], true, "{r}");
    assert!(
        r["dedupe_resets"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("CRC"),
        "{r}"
    );
    let table = relay_status(&relay, false);
    assert!(table.contains("RECOVERY"), "{table}");
    assert!(
        table.contains("set aside   dedupe/victim.state.corrupt"),
        "{table}"
    );
    assert!(table.contains("DEDUPE RESET \"victim\""), "{table}");
    assert_eq!(
        std::fs::read(relay.dir.join("state/dedupe/victim.state.corrupt")).unwrap(),
        bytes
    );

    for (i, (a, log)) in agents.iter_mut().enumerate() {
        let name = ["victim", "neighbour"][i];
        expected[i].extend(append(log, 300, 600, name));
        a.start();
    }
    for (i, name) in ["victim", "neighbour"].into_iter().enumerate() {
        wait_store(&relay, name, T, "all 600 lines", |e| {
            e.len() >= expected[i].len()
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    for (i, name) in ["victim", "neighbour"].into_iter().enumerate() {
        assert_exactly_once(&relay.events(name), &expected[i]);
    }
    let v: serde_json::Value = serde_json::from_str(&relay_status(&relay, true)).unwrap();
    let reset = &v["recovery"]["dedupe_resets"][0];
    assert!(reset["streams"][0]["from"].as_u64().unwrap() > 1, "{reset}");
    for (a, _) in &mut agents {
        a.stop();
    }
    // A restart reports nothing new and logs nothing again; the reset stays visible.
    relay.stop();
    relay.start();
    let v: serde_json::Value = serde_json::from_str(&relay_status(&relay, true)).unwrap();
    assert_eq!(v["recovery"]["quarantined"], serde_json::json!([]));
    assert_eq!(v["recovery"]["dedupe_resets"][0]["agent"], "victim");
    relay.stop();
    let log = relay.log();
    assert_eq!(
        log.matches("corrupt store state").count(),
        1,
        "logged once:\n{log}"
    );
}
