//! Periodic intel uploads through real agent and relay processes over mutual TLS, with
//! periods of 1–2 s: one item per period holding exactly the alert records staged in
//! it, summaries that match what was fed in, catch-up of the periods missed while the
//! agent was stopped, and no duplicate after SIGKILLs at random moments.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use rand::{RngExt, SeedableRng};

const AGENT: &str = "intel-agent";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn secs(rfc3339: &str) -> u64 {
    soclink::intel::unix(soclink::incident::record::parse_time(rfc3339).unwrap())
}

/// One stored item: its file name, header and records (as events).
struct Stored {
    name: String,
    header: soclink::intel::item::Header,
    records: Vec<serde_json::Value>,
}

fn stored_items(relay: &RelayProc) -> Vec<Stored> {
    let dir = relay.store.join(AGENT).join("intel");
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.ends_with(".json.gz") {
            continue;
        }
        let f = std::fs::File::open(e.path()).unwrap();
        let header = soclink::intel::item::verify(std::io::BufReader::new(f), u64::MAX)
            .unwrap_or_else(|err| panic!("stored item {name} does not verify: {err}"));
        let rd = std::io::BufReader::new(flate2::read::GzDecoder::new(
            std::fs::File::open(e.path()).unwrap(),
        ));
        let records = rd
            .lines()
            .skip(1)
            .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
            .collect();
        out.push(Stored {
            name,
            header,
            records,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The full (not partial) items, checked to be contiguous periods without overlap.
fn full_items(relay: &RelayProc) -> Vec<Stored> {
    let items: Vec<Stored> = stored_items(relay)
        .into_iter()
        .filter(|i| !i.header.partial)
        .collect();
    for w in items.windows(2) {
        assert_eq!(
            w[0].header.period_end, w[1].header.period_start,
            "periods {} and {} are not contiguous (a period missing or repeated)",
            w[0].name, w[1].name
        );
    }
    items
}

/// Wait until full items cover everything up to `written_ms` and the read latency after
/// it (a line is staged up to ~1.5 s after it was written).
fn wait_items_until(relay: &RelayProc, agent: &AgentProc, written_ms: u64) -> Vec<Stored> {
    let until = written_ms / 1000 + 3;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let items = full_items(relay);
        if items
            .last()
            .is_some_and(|i| secs(&i.header.period_end) >= until)
        {
            return items;
        }
        assert!(
            Instant::now() < deadline,
            "intel items did not reach {until}: {:?}\nagent log:\n{}\nrelay log:\n{}",
            items.iter().map(|i| &i.name).collect::<Vec<_>>(),
            agent.log(),
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An alert line as an IDS writes it; `n` is unique, `ms` is when it was written.
fn alert(n: u64, ms: u64) -> String {
    format!(
        "{{\"timestamp\":{ms},\"event_type\":\"alert\",\"n\":{n},\"src_ip\":\"10.0.{}.{}\",\"alert\":{{\"signature_id\":{},\"signature\":\"ET SCAN suspicious inbound {n}\"}}}}",
        n % 256,
        (n * 7) % 256,
        2_000_000 + n % 977
    )
}

/// Appends alerts to `path` until stopped (rotating it once after `rotate_at` lines);
/// returns every line written with its write time.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<(String, u64)>>>,
}

impl Writer {
    fn start(path: PathBuf, first: u64, rotate_at: Option<u64>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut n = first;
            while !s.load(Ordering::Relaxed) {
                if rotate_at == Some(n - first) {
                    std::fs::rename(&path, path.with_extension("json.1")).unwrap();
                }
                let ms = now_ms();
                let l = alert(n, ms);
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .unwrap();
                f.write_all(format!("{l}\n").as_bytes()).unwrap();
                out.push((l, ms));
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            out
        });
        Writer {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<(String, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

fn setup(dir: &Path, every: &str, app_log: &Path) -> (RelayProc, AgentProc, PathBuf) {
    let pki = Pki::new(dir);
    let mut relay = RelayProc::new(dir, &pki, "relay", "");
    relay.start();
    let alerts = dir.join("eve.json");
    std::fs::write(&alerts, "").unwrap();
    let intel = format!(
        "{}\n[intel]\nevery = {every:?}\ninclude = [{:?}]\nmax_upload_size = \"64MiB\"\n",
        upstream_toml(&pki, &relay.address(), AGENT),
        alerts.to_str().unwrap()
    );
    let agent = AgentProc::new(dir, &file_source("app", &[app_log], ""), &intel);
    (relay, agent, alerts)
}

/// Every written alert is in exactly one full item, byte for byte.
fn assert_records_exactly_once(items: &[Stored], written: &[(String, u64)]) {
    let mut seen: BTreeMap<Vec<u8>, &str> = BTreeMap::new();
    for it in items {
        for r in &it.records {
            let m = message(r);
            if let Some(first) = seen.insert(m.clone(), &it.name) {
                panic!(
                    "record {} is in {first} and again in {}",
                    String::from_utf8_lossy(&m),
                    it.name
                );
            }
        }
    }
    let want: HashSet<Vec<u8>> = written.iter().map(|(l, _)| l.as_bytes().to_vec()).collect();
    let missing: Vec<_> = want.iter().filter(|w| !seen.contains_key(*w)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} alert records never arrived, e.g. {}",
        missing.len(),
        want.len(),
        String::from_utf8_lossy(missing[0])
    );
    let extra = seen.keys().filter(|k| !want.contains(*k)).count();
    assert_eq!(extra, 0, "records arrived that were never written");
}

fn soclink(args: &[&str], config: &Path) -> (bool, String) {
    let out = Command::new(bin())
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn one_item_per_period_with_exactly_its_records_and_true_counts() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app.log");
    std::fs::write(&app, "").unwrap();
    let (relay, mut agent, alerts) = setup(dir.path(), "2s", &app);
    agent.start();
    std::thread::sleep(Duration::from_millis(1500));
    let writer = Writer::start(alerts.clone(), 0, Some(150));
    // Routine lines, for the summary: a known number, in known periods.
    let mut f = std::fs::OpenOptions::new().append(true).open(&app).unwrap();
    for n in 0..3000 {
        writeln!(f, "{}", line("app", n)).unwrap();
    }
    drop(f);
    std::thread::sleep(Duration::from_secs(2));
    let (ok, out) = soclink(
        &[
            "incident",
            "declare",
            "--level",
            "1",
            "--summary",
            "phishing mail reported",
        ],
        &agent.config,
    );
    assert!(ok, "{out}");
    // run-now: a partial preview of the open period.
    let (ok, out) = soclink(&["intel", "run-now"], &agent.config);
    assert!(ok, "run-now failed: {out}");
    assert!(out.contains("partial"), "{out}");
    std::thread::sleep(Duration::from_secs(3));
    let written = writer.finish();
    let last_ms = written.last().unwrap().1;
    let items = wait_items_until(&relay, &agent, last_ms);

    assert!(
        items.len() >= 3,
        "expected several periods, got {}",
        items.len()
    );
    assert_records_exactly_once(&items, &written);
    // Each record is in the period in which it was staged: after it was written, and
    // within the read latency (rescan 1 s, batch delay 100 ms) of it.
    let by_line: BTreeMap<&[u8], u64> = written.iter().map(|(l, ms)| (l.as_bytes(), *ms)).collect();
    for it in &items {
        let (start, end) = (secs(&it.header.period_start), secs(&it.header.period_end));
        assert_eq!(end - start, 2, "{}: period length", it.name);
        assert_eq!(
            it.name,
            format!("{}.json.gz", soclink::intel::compact(start))
        );
        for r in &it.records {
            let ms = by_line[message(r).as_slice()];
            assert!(
                ms < end * 1000 && ms + 3000 >= start * 1000,
                "record written at {ms} ms is in period {start}..{end} of {}",
                it.name
            );
        }
    }
    // The summaries add up to what was fed in.
    let app_lines: u64 = items
        .iter()
        .map(|i| {
            i.header.summary["sources"]["app"]["lines"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(
        app_lines, 3000,
        "summary lines of source app over all periods"
    );
    let app_bytes: u64 = items
        .iter()
        .map(|i| {
            i.header.summary["sources"]["app"]["bytes"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    // A source's bytes are its lines' bytes, without the newlines.
    let want_bytes: u64 = (0..3000).map(|n| line("app", n).len() as u64).sum();
    assert_eq!(app_bytes, want_bytes, "summary bytes of source app");
    let declared: Vec<&serde_json::Value> = items
        .iter()
        .flat_map(|i| i.header.summary["incidents_declared"].as_array().unwrap())
        .collect();
    assert_eq!(
        declared.len(),
        1,
        "the declared incident is in exactly one period"
    );
    assert_eq!(declared[0]["level"], 1);
    for it in &items {
        assert_eq!(it.header.records as usize, it.records.len());
        assert_eq!(it.header.agent, "test-agent");
    }
    // The partial preview: marked, and its records are also in the full items.
    let partial: Vec<Stored> = stored_items(&relay)
        .into_iter()
        .filter(|i| i.header.partial)
        .collect();
    assert_eq!(partial.len(), 1, "one run-now item");
    assert!(partial[0].name.contains(".partial-"));
    let full: HashSet<Vec<u8>> = items
        .iter()
        .flat_map(|i| i.records.iter().map(message))
        .collect();
    assert!(
        partial[0]
            .records
            .iter()
            .all(|r| full.contains(&message(r)))
    );
    // Status shows the last delivered period and the next one due.
    let out = Command::new(bin())
        .args(["status", "--json", "-c"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let intel = &st["intel"];
    assert_eq!(intel["every_secs"], 2);
    assert!(intel["last_delivered"]["period_end"].is_string(), "{intel}");
    assert!(secs(intel["next_due"].as_str().unwrap()) > secs(&items[0].header.period_end));
    let table = soclink(&["status"], &agent.config).1;
    assert!(
        table.contains("INTEL (every 2s)") && table.contains("next due"),
        "{table}"
    );
    agent.stop();
}

#[test]
fn missed_periods_are_caught_up_once_in_order_after_a_stop() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app.log");
    std::fs::write(&app, "").unwrap();
    let (relay, mut agent, alerts) = setup(dir.path(), "1s", &app);
    agent.start();
    std::thread::sleep(Duration::from_millis(1500));
    let w1 = Writer::start(alerts.clone(), 0, None);
    std::thread::sleep(Duration::from_secs(2));
    agent.stop();
    let stopped = now_ms() / 1000;
    // Down for several periods while alerts keep coming.
    std::thread::sleep(Duration::from_secs(5));
    agent.start();
    std::thread::sleep(Duration::from_secs(3));
    let mut written = w1.finish();
    let items = wait_items_until(&relay, &agent, written.last().unwrap().1);
    written.sort();
    assert_records_exactly_once(&items, &written);
    let missed: Vec<&Stored> = items
        .iter()
        .filter(|i| {
            let s = secs(&i.header.period_start);
            s > stopped && s + 1 < stopped + 5
        })
        .collect();
    assert!(missed.len() >= 2, "the periods while stopped have items");
    for m in missed {
        assert_eq!(
            m.header.summary["agent_running_seconds"], 0,
            "{}: the agent was not running",
            m.name
        );
    }
    let log = agent.log();
    assert!(log.contains("caught up"), "{log}");
    agent.stop();
}

#[test]
fn sigkill_at_random_moments_never_duplicates_or_loses_a_period() {
    let seed: u64 = std::env::var("SOCLINK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(now_ms);
    println!("seed {seed} (SOCLINK_SEED={seed} replays the kill schedule)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app.log");
    std::fs::write(&app, "").unwrap();
    let (mut relay, mut agent, alerts) = setup(dir.path(), "1s", &app);
    agent.start();
    std::thread::sleep(Duration::from_millis(1200));
    let w = Writer::start(alerts.clone(), 0, Some(400));
    for round in 0..10 {
        std::thread::sleep(Duration::from_millis(rng.random_range(100..1600)));
        if round % 4 == 3 {
            relay.kill9();
            relay.start();
        } else {
            agent.kill9();
            agent.start();
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let written = w.finish();
    let items = wait_items_until(&relay, &agent, written.last().unwrap().1);
    assert_records_exactly_once(&items, &written);
    let names: HashSet<&str> = items.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names.len(), items.len());
    agent.stop();
}
