//! The relay store on real files: layout, byte-exact content, dedupe, hostile names.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use soclink::relay::sink::file::{
    AppendOutcome, NameField, RealFs, Store, StoreError, StoreFs, StoreOptions,
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

fn line(agent: &str, source: &str, day: &str, n: u32) -> Vec<u8> {
    format!(
        "{{\"ts\":\"{day}T00:00:{:02}Z\",\"host\":\"{agent}\",\"source\":\"{source}\",\"message\":\"event {n}\"}}\n",
        n % 60
    )
    .into_bytes()
}

/// Every file holds the members as sent, byte for byte, and decompresses to the
/// concatenated NDJSON; positions and status follow.
#[test]
fn two_agents_two_sources_two_days_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, recovery) = Store::open(opts(dir.path())).unwrap();
    assert!(recovery.is_clean());
    let mut expected: std::collections::BTreeMap<PathBuf, (Vec<u8>, Vec<u8>)> = Default::default();
    let mut seq = std::collections::BTreeMap::<String, u64>::new();
    for round in 0..3u32 {
        for agent in ["agent-a", "agent-b.example"] {
            for source in ["auth", "nginx"] {
                for day in ["2026-11-25", "2026-11-26"] {
                    // Two streams per agent, each covering both days and sources.
                    let stream = if source == "auth" { "s1" } else { "s2" };
                    let s = seq.entry(format!("{agent}/{stream}")).or_default();
                    *s += 1;
                    let mut raw = line(agent, source, day, round);
                    raw.extend(line(agent, source, day, round + 100));
                    let member = gz(&raw);
                    let out = store
                        .append(agent, stream, *s, source, day, &member)
                        .unwrap();
                    assert_eq!(out, AppendOutcome::Appended);
                    let path = dir
                        .path()
                        .join("store")
                        .join(agent)
                        .join(source)
                        .join(format!("{day}.ndjson.gz"));
                    let e = expected.entry(path).or_default();
                    e.0.extend(&member);
                    e.1.extend(&raw);
                }
            }
        }
        // Not durable before commit.
        assert_eq!(store.stored_seq("agent-a", "s1"), 2 * round as u64);
        store.commit().unwrap();
        assert_eq!(store.stored_seq("agent-a", "s1"), 2 * (round as u64 + 1));
    }
    assert_eq!(expected.len(), 8);
    for (path, (gzip, raw)) in &expected {
        assert_eq!(&std::fs::read(path).unwrap(), gzip, "{}", path.display());
        assert_eq!(&zcat(path), raw, "{}", path.display());
    }
    assert_eq!(store.stored_seq("agent-b.example", "s2"), 6);
    assert_eq!(store.stored_seq("agent-b.example", "nope"), 0);
    assert_eq!(store.stored_seq("nobody", "s1"), 0);

    let status = store.agents();
    assert_eq!(
        status.iter().map(|a| a.agent.as_str()).collect::<Vec<_>>(),
        ["agent-a", "agent-b.example"]
    );
    let a = &status[0];
    assert_eq!(
        a.streams
            .iter()
            .map(|s| (s.stream.as_str(), s.stored_seq))
            .collect::<Vec<_>>(),
        [("s1", 6), ("s2", 6)]
    );
    let bytes_a: u64 = expected
        .iter()
        .filter(|(p, _)| p.starts_with(dir.path().join("store/agent-a")))
        .map(|(_, (g, _))| g.len() as u64)
        .sum();
    assert_eq!(a.bytes, bytes_a);
    assert!(a.last_write.is_some());

    // Reopen: positions survive, nothing to repair.
    drop(store);
    let (store, recovery) = Store::open(opts(dir.path())).unwrap();
    assert!(recovery.is_clean(), "{recovery:?}");
    assert_eq!(store.stored_seq("agent-a", "s2"), 6);
    assert_eq!(store.agents()[0].bytes, bytes_a);
}

#[test]
fn duplicates_are_dropped_and_gaps_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = Store::open(opts(dir.path())).unwrap();
    let day = "2026-11-26";
    let path = dir.path().join("store/a/syslog/2026-11-26.ndjson.gz");
    let m1 = gz(b"{\"message\":\"one\"}\n");
    let m2 = gz(b"{\"message\":\"two\"}\n");
    assert_eq!(
        store.append("a", "s", 2, "syslog", day, &m1).unwrap(),
        AppendOutcome::Gap { expected: 1 }
    );
    assert!(!path.exists(), "a refused batch creates nothing");
    assert_eq!(
        store.append("a", "s", 1, "syslog", day, &m1).unwrap(),
        AppendOutcome::Appended
    );
    // Duplicate of an appended but not yet committed batch.
    assert_eq!(
        store.append("a", "s", 1, "syslog", day, &m1).unwrap(),
        AppendOutcome::Duplicate
    );
    assert_eq!(
        store.append("a", "s", 0, "syslog", day, &m1).unwrap(),
        AppendOutcome::Duplicate
    );
    store.commit().unwrap();
    assert_eq!(
        store.append("a", "s", 3, "syslog", day, &m2).unwrap(),
        AppendOutcome::Gap { expected: 2 }
    );
    assert_eq!(
        store
            .append("a", "s", u64::MAX, "syslog", day, &m2)
            .unwrap(),
        AppendOutcome::Gap { expected: 2 }
    );
    assert_eq!(std::fs::read(&path).unwrap(), m1);
    drop(store);

    // Duplicate after a restart, from the persisted position.
    let (mut store, _) = Store::open(opts(dir.path())).unwrap();
    assert_eq!(
        store.append("a", "s", 1, "syslog", day, &m1).unwrap(),
        AppendOutcome::Duplicate
    );
    assert_eq!(
        store.append("a", "s", 2, "syslog", day, &m2).unwrap(),
        AppendOutcome::Appended
    );
    store.commit().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), [m1, m2].concat());
    assert_eq!(
        zcat(&path),
        b"{\"message\":\"one\"}\n{\"message\":\"two\"}\n"
    );
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if p.is_dir() {
            walk(&p, out);
        }
    }
}

#[test]
fn hostile_names_are_refused_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("r");
    std::fs::create_dir(&root).unwrap();
    let (mut store, _) = Store::open(opts(&root)).unwrap();
    let m = gz(b"{}\n");
    let long = "x".repeat(201);
    let ok = "2026-11-26";
    let bad_names = [
        "..", ".", "", "a/b", "/abs", "a\\b", "a\0b", "a\nb", "\u{7f}", ".hidden", &long,
    ];
    for bad in bad_names {
        let e = store.append(bad, "s", 1, "src", ok, &m).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::InvalidName {
                    field: NameField::Agent,
                    ..
                }
            ),
            "agent {bad:?}: {e}"
        );
        let e = store.append("a", "s", 1, bad, ok, &m).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::InvalidName {
                    field: NameField::Source,
                    ..
                }
            ),
            "source {bad:?}: {e}"
        );
    }
    for bad in ["", "a\0b", &long] {
        let e = store.append("a", bad, 1, "src", ok, &m).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::InvalidName {
                    field: NameField::Stream,
                    ..
                }
            ),
            "stream {bad:?}: {e}"
        );
    }
    for reserved in ["incidents", "intel"] {
        let e = store.append("a", "s", 1, reserved, ok, &m).unwrap_err();
        assert!(matches!(e, StoreError::InvalidName { .. }), "{e}");
    }
    for bad in [
        "2026-13-45",
        "2026-02-29",
        "../../etc",
        "2026-11-26/../x",
        "2026-11-2\0",
        "",
        "26-11-26",
    ] {
        let e = store.append("a", "s", 1, "src", bad, &m).unwrap_err();
        assert!(
            matches!(e, StoreError::InvalidDay { .. }),
            "day {bad:?}: {e}"
        );
    }
    // The error names the offending value, cut short.
    let e = store.append(&long, "s", 1, "src", ok, &m).unwrap_err();
    assert!(e.to_string().contains("too long"), "{e}");
    assert!(e.to_string().len() < 200, "{e}");
    store.commit().unwrap();

    // Nothing escaped store_dir/state_dir, and the store itself is still empty.
    let mut all = Vec::new();
    walk(dir.path(), &mut all);
    all.sort();
    let rel: Vec<_> = all
        .iter()
        .map(|p| {
            p.strip_prefix(dir.path())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        rel,
        [
            "r",
            "r/state",
            "r/state/dedupe",
            "r/state/store.lock",
            "r/store"
        ]
    );
    // A valid append afterwards still starts the stream at 1.
    assert_eq!(
        store.append("a", "s", 1, "src", ok, &m).unwrap(),
        AppendOutcome::Appended
    );
}

#[test]
fn second_open_is_refused_while_the_store_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(opts(dir.path())).unwrap();
    let e = Store::open(opts(dir.path())).unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    drop(store);
    Store::open(opts(dir.path())).unwrap();
}

/// Counts syncs on the real file system.
#[derive(Default)]
struct CountingFs {
    file_syncs: std::sync::Mutex<Vec<PathBuf>>,
    dir_syncs: std::sync::Mutex<Vec<PathBuf>>,
}

impl StoreFs for CountingFs {
    fn create_dir(&self, p: &Path) -> std::io::Result<bool> {
        RealFs.create_dir(p)
    }
    fn file_len(&self, p: &Path) -> std::io::Result<Option<u64>> {
        RealFs.file_len(p)
    }
    fn write_at(&self, p: &Path, off: u64, d: &[u8]) -> std::io::Result<()> {
        RealFs.write_at(p, off, d)
    }
    fn set_len(&self, p: &Path, len: u64) -> std::io::Result<()> {
        RealFs.set_len(p, len)
    }
    fn sync_file(&self, p: &Path) -> std::io::Result<()> {
        self.file_syncs.lock().unwrap().push(p.to_path_buf());
        RealFs.sync_file(p)
    }
    fn sync_dir(&self, p: &Path) -> std::io::Result<()> {
        self.dir_syncs.lock().unwrap().push(p.to_path_buf());
        RealFs.sync_dir(p)
    }
    fn read_limited(&self, p: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
        RealFs.read_limited(p, limit)
    }
    fn write_file(&self, p: &Path, d: &[u8]) -> std::io::Result<()> {
        RealFs.write_file(p, d)
    }
    fn rename(&self, a: &Path, b: &Path) -> std::io::Result<()> {
        RealFs.rename(a, b)
    }
    fn remove_file(&self, p: &Path) -> std::io::Result<()> {
        RealFs.remove_file(p)
    }
    fn list_dir(&self, p: &Path) -> std::io::Result<Vec<String>> {
        RealFs.list_dir(p)
    }
}

/// One commit of many batches: one fsync per touched store file, one per touched
/// agent's state, one of the state directory; no directory syncs for existing files.
#[test]
fn group_commit_syncs_each_file_once() {
    let dir = tempfile::tempdir().unwrap();
    let fs = std::sync::Arc::new(CountingFs::default());
    let (mut store, _) = Store::open_with_fs(opts(dir.path()), fs.clone()).unwrap();
    let day = "2026-11-26";
    // First batch of each file: directories and intents.
    for agent in ["a", "b"] {
        store.append(agent, "s", 1, "x", day, &gz(b"{}\n")).unwrap();
    }
    store.commit().unwrap();
    fs.file_syncs.lock().unwrap().clear();
    fs.dir_syncs.lock().unwrap().clear();

    for seq in 2..=21 {
        for agent in ["a", "b"] {
            store
                .append(agent, "s", seq, "x", day, &gz(b"{}\n"))
                .unwrap();
        }
    }
    assert_eq!(store.uncommitted(), 40);
    store.commit().unwrap();
    assert_eq!(store.uncommitted(), 0);
    let mut files = fs.file_syncs.lock().unwrap().clone();
    files.sort();
    let st = dir.path().join("store");
    let state = dir.path().join("state/dedupe");
    assert_eq!(
        files,
        [
            state.join("a.state.tmp"),
            state.join("b.state.tmp"),
            st.join("a/x/2026-11-26.ndjson.gz"),
            st.join("b/x/2026-11-26.ndjson.gz"),
        ]
    );
    assert_eq!(*fs.dir_syncs.lock().unwrap(), [state]);
    assert_eq!(store.stored_seq("a", "s"), 21);
    // Nothing to do: no syncs at all.
    fs.dir_syncs.lock().unwrap().clear();
    store.commit().unwrap();
    assert!(fs.dir_syncs.lock().unwrap().is_empty());
}

#[test]
fn streams_per_agent_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = Store::open(opts(dir.path())).unwrap();
    let m = gz(b"{}\n");
    let max = soclink::relay::sink::file::MAX_STREAMS;
    for i in 0..max {
        store
            .append("a", &format!("s{i}"), 1, "x", "2026-11-26", &m)
            .unwrap();
    }
    let e = store
        .append("a", "one-more", 1, "x", "2026-11-26", &m)
        .unwrap_err();
    assert!(
        matches!(e, StoreError::LimitExceeded { limit, .. } if limit == max),
        "{e}"
    );
    // Known streams and other agents go on.
    assert_eq!(
        store.append("a", "s0", 2, "x", "2026-11-26", &m).unwrap(),
        AppendOutcome::Appended
    );
    assert_eq!(
        store.append("b", "s0", 1, "x", "2026-11-26", &m).unwrap(),
        AppendOutcome::Appended
    );
    store.commit().unwrap();
    drop(store);
    let (mut store, _) = Store::open(opts(dir.path())).unwrap();
    let e = store
        .append("a", "one-more", 1, "x", "2026-11-26", &m)
        .unwrap_err();
    assert!(matches!(e, StoreError::LimitExceeded { .. }), "{e}");
}
