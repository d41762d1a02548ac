//! The relay store on real files: layout, byte-exact content, dedupe, hostile names.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use soclink::relay::store::{AppendOutcome, NameField, Store, StoreError, StoreOptions};

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
