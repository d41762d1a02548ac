//! Shared helpers for the journald tests: real journal files written by
//! `systemd-journal-remote` from the Journal Export Format, and a `JournaldSource` run on
//! its own thread with the batches it seals collected.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use soclink::agent::sources::SealedBatch;
use soclink::agent::sources::file::BatchLimits;
use soclink::agent::sources::journald::{JournaldSource, JournaldStats};
use soclink::config::{JournaldSourceConfig, StartAt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const BOOT: &str = "0123456789abcdef0123456789abcdef";
/// 2026-11-25T23:59:59Z in µs: entries written from here cross a UTC midnight.
pub const NEAR_MIDNIGHT: u64 = 1_764_115_199_000_000;

/// One journal entry as the export format carries it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub realtime: u64,
    pub mono: u64,
    pub boot: String,
    pub fields: Vec<(String, Vec<u8>)>,
}

impl Entry {
    pub fn new(realtime: u64, mono: u64, message: &[u8]) -> Entry {
        Entry {
            realtime,
            mono,
            boot: BOOT.to_string(),
            fields: vec![
                ("MESSAGE".into(), message.to_vec()),
                ("_HOSTNAME".into(), b"web-01".to_vec()),
            ],
        }
    }

    pub fn with(mut self, name: &str, value: &[u8]) -> Entry {
        self.fields.push((name.to_string(), value.to_vec()));
        self
    }

    pub fn message(&self) -> &[u8] {
        &self
            .fields
            .iter()
            .find(|(n, _)| n == "MESSAGE")
            .expect("entry has a MESSAGE")
            .1
    }
}

/// Journal Export Format: text form for printable values, binary form otherwise.
pub fn export(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(
            format!(
                "__REALTIME_TIMESTAMP={}\n__MONOTONIC_TIMESTAMP={}\n_BOOT_ID={}\n",
                e.realtime, e.mono, e.boot
            )
            .as_bytes(),
        );
        for (name, value) in &e.fields {
            let printable =
                std::str::from_utf8(value).is_ok() && !value.iter().any(|&b| b < 0x20 || b == 0x7f);
            out.extend_from_slice(name.as_bytes());
            if printable {
                out.push(b'=');
                out.extend_from_slice(value);
            } else {
                out.push(b'\n');
                out.extend_from_slice(&(value.len() as u64).to_le_bytes());
                out.extend_from_slice(value);
            }
            out.push(b'\n');
        }
        out.push(b'\n');
    }
    out
}

fn journal_remote() -> PathBuf {
    for p in [
        "/lib/systemd/systemd-journal-remote",
        "/usr/lib/systemd/systemd-journal-remote",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("systemd-journal-remote is not installed (Debian package systemd-journal-remote)");
}

/// Write `entries` into the journal file `path` (name must end in `.journal`).
pub fn write_journal(path: &Path, entries: &[Entry]) {
    let mut child = Command::new(journal_remote())
        .arg(format!("--output={}", path.to_str().unwrap()))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data = export(entries);
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "systemd-journal-remote failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Write a journal file elsewhere, then rename it into `dir` (appears whole at once).
pub fn place_journal(dir: &Path, name: &str, entries: &[Entry]) {
    let staging = dir.parent().unwrap().join(format!("staging-{name}"));
    std::fs::create_dir_all(&staging).unwrap();
    let tmp = staging.join(name);
    write_journal(&tmp, entries);
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

pub fn cfg(dir: &Path) -> JournaldSourceConfig {
    JournaldSourceConfig {
        directory: Some(dir.to_path_buf()),
        units: Vec::new(),
        max_priority: None,
        start_at: StartAt::Beginning,
    }
}

/// A running source and what it sealed so far.
pub struct Running {
    pub stop: CancellationToken,
    pub stats: Arc<JournaldStats>,
    pub rx: mpsc::Receiver<SealedBatch>,
    pub thread: Option<std::thread::JoinHandle<()>>,
    pub batches: Vec<SealedBatch>,
}

pub fn start(cfg: JournaldSourceConfig, cursor: Option<String>, max_bytes: u64) -> Running {
    let (tx, rx) = mpsc::channel(4);
    let stop = CancellationToken::new();
    let stats = Arc::new(JournaldStats::default());
    let src = JournaldSource::new(
        "journal".into(),
        "agent-host".into(),
        cfg,
        BatchLimits {
            max_bytes,
            max_delay: Duration::from_millis(100),
        },
        cursor,
        tx,
        stop.clone(),
        stats.clone(),
    );
    let thread = std::thread::spawn(move || src.run());
    Running {
        stop,
        stats,
        rx,
        thread: Some(thread),
        batches: Vec::new(),
    }
}

impl Running {
    /// Collect batches until `n` events arrived in all; panics after `timeout`.
    pub fn collect(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            match self.rx.try_recv() {
                Ok(b) => self.batches.push(b),
                Err(mpsc::error::TryRecvError::Empty) => {
                    assert!(
                        Instant::now() < deadline,
                        "timed out: {} of {n} events",
                        self.count()
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("source ended early: {e}"),
            }
        }
    }

    /// Collect whatever else arrives within `quiet` (used to prove nothing more comes).
    pub fn drain_for(&mut self, quiet: Duration) {
        let deadline = Instant::now() + quiet;
        while Instant::now() < deadline {
            match self.rx.try_recv() {
                Ok(b) => self.batches.push(b),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    pub fn count(&self) -> usize {
        self.batches.iter().map(|b| b.events as usize).sum()
    }

    /// Stop the source and wait for its thread (batches sealed at stop are dropped).
    pub fn shutdown(mut self) -> Vec<SealedBatch> {
        self.stop.cancel();
        // Keep draining so a source blocked on a full channel can see `stop`.
        let t = self.thread.take().unwrap();
        while !t.is_finished() {
            while self.rx.try_recv().is_ok() {}
            std::thread::sleep(Duration::from_millis(5));
        }
        t.join().unwrap();
        std::mem::take(&mut self.batches)
    }

    /// Every event so far, parsed, with batch invariants checked.
    pub fn events(&self) -> Vec<serde_json::Value> {
        check_batches(&self.batches)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            self.rx.close();
            while self.rx.try_recv().is_ok() {}
            let _ = t.join();
        }
    }
}

/// Parse the events of `batches`, asserting what every batch must hold: its count, one
/// UTC day (the events' own), and the cursor of its last event.
pub fn check_batches(batches: &[SealedBatch]) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    for b in batches {
        assert_eq!(b.source, "journal");
        let evs: Vec<serde_json::Value> = b
            .raw
            .split(|&c| c == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("each line is one JSON object"))
            .collect();
        assert_eq!(b.raw.last(), Some(&b'\n'));
        assert_eq!(evs.len(), b.events as usize);
        for e in &evs {
            assert_eq!(&e["ts"].as_str().unwrap()[..10], b.day, "batch spans days");
        }
        let last = evs.last().unwrap();
        assert_eq!(
            b.cursor,
            Some(last["cursor"].clone()),
            "batch cursor is its last entry's"
        );
        all.extend(evs);
    }
    all
}

pub fn message(ev: &serde_json::Value) -> Vec<u8> {
    soclink::event::message_bytes(ev).expect("event has message or message_base64")
}

/// Assert the events' messages are exactly `expected`, in order.
pub fn assert_messages(events: &[serde_json::Value], expected: &[Vec<u8>]) {
    let got: Vec<Vec<u8>> = events.iter().map(message).collect();
    if got != expected {
        let first = got
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(expected.len()));
        panic!(
            "{} events, {} expected; first difference at {first}: got {:?}, expected {:?}",
            got.len(),
            expected.len(),
            got.get(first)
                .map(|m| String::from_utf8_lossy(m).into_owned()),
            expected
                .get(first)
                .map(|m| String::from_utf8_lossy(m).into_owned()),
        );
    }
}

/// `n` entries with unique ids, 100 µs apart from `start`.
pub fn entries(tag: &str, start: u64, mono: u64, n: usize) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            Entry::new(
                start + i as u64 * 100,
                mono + i as u64 * 100,
                format!("id={tag}-{i} sshd[42]: Accepted publickey for root").as_bytes(),
            )
            .with("_SYSTEMD_UNIT", b"sshd.service")
            .with("PRIORITY", b"6")
        })
        .collect()
}

pub fn messages(entries: &[Entry]) -> Vec<Vec<u8>> {
    entries.iter().map(|e| e.message().to_vec()).collect()
}
