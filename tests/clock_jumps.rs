//! The wall clock jumping back 1 hour and then forward 1 day under a real agent and a
//! real relay over mutual TLS: every line arrives once, byte for byte and in file
//! order; batches keep flowing within seconds of each jump (no timer waits for the wall
//! clock); an incident keeps its recorded discovery time and deadline; intel periods
//! are never closed twice and a forward jump closes each skipped period once. And
//! syslog across New Year in Taipei: device times without year or zone become full UTC
//! times in the right year, and batches are filed by the receive day, held across a
//! step back over midnight.
//!
//! The processes' realtime clock is moved with libfaketime (Debian package `faketime`)
//! through its timestamp file, re-read on every call, while their monotonic clock stays
//! real: exactly what a step of the system clock (an operator, an NTP step, a bad RTC)
//! does to a running process. When libfaketime cannot be loaded the tests fail in CI
//! (`CI` set) and are skipped, saying why, elsewhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const AGENT: &str = "clock-agent";
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;
/// How soon after a jump new lines must be stored. batch_max_delay is 100 ms and the
/// lines take well under a second on an idle machine; after the forward jump they share
/// the link with 23 caught-up intel items (sent first), and CI runs other tests beside
/// this one. A timer waiting for the wall clock would take an hour or a day.
const FLOW: Duration = Duration::from_secs(15);

fn real_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A realtime offset for processes, driven through libfaketime's timestamp file.
struct FakeClock {
    lib: PathBuf,
    file: PathBuf,
}

impl FakeClock {
    /// None (after printing why) when libfaketime is not installed or does not work;
    /// in CI that fails the test instead.
    fn new(test: &str, dir: &Path) -> Option<FakeClock> {
        let lib = match std::env::var_os("SOCLINK_LIBFAKETIME") {
            Some(p) => PathBuf::from(p),
            None => {
                let arch = format!("{}-linux-gnu", std::env::consts::ARCH);
                let found = [
                    format!("/usr/lib/{arch}/faketime/libfaketime.so.1"),
                    "/usr/lib/faketime/libfaketime.so.1".to_string(),
                    "/usr/local/lib/faketime/libfaketime.so.1".to_string(),
                ]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.exists());
                match found {
                    Some(p) => p,
                    None => {
                        skip_unless_ci(
                            test,
                            "libfaketime.so.1 not found (apt-get install faketime, or set SOCLINK_LIBFAKETIME)",
                        );
                        return None;
                    }
                }
            }
        };
        let clock = FakeClock {
            lib,
            file: dir.join("faketime.rc"),
        };
        // Prove the preload moves a real process's clock before relying on it.
        clock.set(10 * DAY);
        let out = Command::new("date").arg("+%s").envs(clock.env()).output();
        let shifted = out
            .as_ref()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<i64>()
                    .ok()
            })
            .map(|t| t - real_now());
        if !shifted.is_some_and(|d| (10 * DAY - 5..=10 * DAY + 5).contains(&d)) {
            skip_unless_ci(
                test,
                &format!(
                    "libfaketime at {} does not move the clock of `date` (got {out:?})",
                    clock.lib.display()
                ),
            );
            return None;
        }
        clock.set(0);
        Some(clock)
    }

    /// Make the processes' wall clock `offset` seconds from the real one, at once.
    fn set(&self, offset: i64) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset:+}\n")).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("LD_PRELOAD", self.lib.to_str().unwrap()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.to_str().unwrap()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

/// The number after `id=<tag>-` in a stored line.
fn line_no(ev: &serde_json::Value, tag: &str) -> Option<u64> {
    let m = message(ev);
    let s = String::from_utf8_lossy(&m);
    let rest = s.split(&format!("id={tag}-")).nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Append lines `from..to` and wait until the relay holds all of them; returns how long
/// that took and the lines.
fn ship(relay: &RelayProc, app: &Path, from: u64, to: u64, tag: &str) -> (Duration, Vec<Vec<u8>>) {
    let t = Instant::now();
    let lines = append(app, from, to, tag);
    wait_store(
        relay,
        AGENT,
        Duration::from_secs(30),
        "lines after a jump",
        |evs| {
            evs.iter()
                .filter(|e| line_no(e, tag).is_some_and(|n| n >= from && n < to))
                .count()
                >= (to - from) as usize
        },
    );
    (t.elapsed(), lines)
}

/// Every line once, byte for byte, and the lines of the file in order in the store.
fn check_store(relay: &RelayProc, tag: &str, expected: &[Vec<u8>]) -> Vec<serde_json::Value> {
    let evs: Vec<serde_json::Value> = relay
        .events(AGENT)
        .into_iter()
        .filter(|e| e["source"] == "app")
        .collect();
    assert_exactly_once(&evs, expected);
    let nos: Vec<u64> = evs.iter().filter_map(|e| line_no(e, tag)).collect();
    for w in nos.windows(2) {
        assert!(
            w[0] < w[1],
            "line {} stored after line {}: file order broken",
            w[1],
            w[0]
        );
    }
    evs
}

/// Seconds since the epoch of an event's `ts`.
fn ts_of(ev: &serde_json::Value) -> i64 {
    let t = soclink::incident::record::parse_time(ev["ts"].as_str().unwrap()).unwrap();
    soclink::intel::unix(t) as i64
}

fn run(args: &[&str], env: &[(String, String)]) -> String {
    let out = Command::new(bin())
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "soclink {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `field` line of `soclink incident show`.
fn show_field(show: &str, field: &str) -> String {
    show.lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field:?} in:\n{show}"))
        .to_string()
}

fn wait_acknowledged(relay: &RelayProc, id: &str) {
    let path = relay
        .store
        .join(AGENT)
        .join("incidents")
        .join(id)
        .join("record.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(b) = std::fs::read(&path)
            && String::from_utf8_lossy(&b).contains("\"acknowledged\"")
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "incident {id} never acknowledged; relay log:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Names of the full (not partial) intel items the relay stored, sorted.
fn intel_items(relay: &RelayProc) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(relay.store.join(AGENT).join("intel"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.ends_with(".json.gz") && !n.contains(".partial-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Header and record lines of a stored item.
fn intel_item(relay: &RelayProc, name: &str) -> (soclink::intel::item::Header, Vec<String>) {
    use std::io::BufRead;
    let p = relay.store.join(AGENT).join("intel").join(name);
    let header = soclink::intel::item::verify(
        std::io::BufReader::new(std::fs::File::open(&p).unwrap()),
        u64::MAX,
    )
    .unwrap_or_else(|e| panic!("{name} does not verify: {e}"));
    let records = std::io::BufReader::new(flate2::read::GzDecoder::new(
        std::fs::File::open(&p).unwrap(),
    ))
    .lines()
    .skip(1)
    .map(|l| String::from_utf8(message(&serde_json::from_str(&l.unwrap()).unwrap())).unwrap())
    .collect();
    (header, records)
}

fn wait_items(relay: &RelayProc, n: usize, what: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let items = intel_items(relay);
        if items.len() >= n {
            return items;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n} intel items stored ({items:?}); relay log:\n{}",
            items.len(),
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn alerts(path: &Path, tag: &str, n: usize) -> Vec<String> {
    use std::io::Write;
    let lines: Vec<String> = (0..n)
        .map(|i| format!("{{\"alert\":\"{tag}-{i}\"}}"))
        .collect();
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(format!("{}\n", lines.join("\n")).as_bytes())
        .unwrap();
    lines
}

/// The agent's wall clock goes back 1 h, then forward 1 day, while it tails a file,
/// holds a declared incident and runs 1-hour intel periods placed so that one period
/// ends during the test.
#[test]
fn agent_clock_jumps_back_an_hour_then_forward_a_day() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Some(clock) = FakeClock::new("agent_clock_jumps_back_an_hour_then_forward_a_day", dir)
    else {
        return;
    };
    let pki = Pki::new(dir);
    let mut relay = RelayProc::new(dir, &pki, "relay", "");
    relay.start();

    // A period boundary B a few seconds ahead of the agent's clock, at UTC midnight, so
    // that the step back also crosses midnight.
    let now = real_now();
    let b = (now / DAY + 1) * DAY;
    let lead = 8;
    let mut offset = b - lead - now;
    clock.set(offset);

    let app = dir.join("app.log");
    std::fs::write(&app, "").unwrap();
    let eve = dir.join("eve.json");
    std::fs::write(&eve, "").unwrap();
    let extra = format!(
        "{}\n[intel]\nevery = \"1h\"\ninclude = [{:?}]\n",
        upstream_toml(&pki, &relay.address(), AGENT),
        eve.to_str().unwrap()
    );
    let mut agent = AgentProc::new(dir, &file_source("app", &[&app], ""), &extra);
    let env = clock.env();
    agent.env = env.clone();
    agent.start();
    let config = agent.config.to_str().unwrap().to_string();

    // Before any jump: lines, alerts and an incident.
    let (_, mut expected) = ship(&relay, &app, 0, 500, "clk");
    let a = alerts(&eve, "before", 5);
    let out = run(
        &[
            "incident",
            "declare",
            "-c",
            &config,
            "--level",
            "1",
            "--summary",
            "clock test",
        ],
        &env,
    );
    let id = out
        .split_whitespace()
        .find(|w| w.starts_with("INC-"))
        .unwrap()
        .to_string();
    wait_acknowledged(&relay, &id);
    let show0 = run(&["incident", "show", "-c", &config, &id], &env);
    let discovered = show_field(&show0, "discovered");
    let deadline_at = |s: &str| {
        // "deadline 07:13 UTC": the recorded deadline, whatever the time left says.
        let l = show_field(s, "status");
        assert!(l.contains("within deadline"), "incident status: {l}");
        let rec = relay
            .store
            .join(AGENT)
            .join("incidents")
            .join(&id)
            .join("record.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(rec).unwrap()).unwrap();
        (
            v["discovered_at"].as_str().unwrap().to_string(),
            v["deadline"].as_str().unwrap().to_string(),
        )
    };
    let recorded = deadline_at(&show0);
    assert_eq!(
        secs(&recorded.1) - secs(&recorded.0),
        HOUR,
        "deadline is discovery + 1 h: {recorded:?}"
    );

    // The period [B-1h, B) closes when the agent's clock passes B.
    let items = wait_items(&relay, 1, "the period before the jumps");
    assert_eq!(
        items,
        vec![soclink::intel::item_name((b - HOUR) as u64, None)]
    );
    let (_, recs) = intel_item(&relay, &items[0]);
    assert_eq!(recs, a, "the first item holds the alerts staged before B");
    // Lines of the new day, then the step back to the previous day.
    let (_, l) = ship(&relay, &app, 500, 600, "clk");
    expected.extend(l);

    // Back one hour: the agent's clock is now just after B - 1h.
    offset -= HOUR;
    clock.set(offset);
    let t_back = real_now();
    let (took, l) = ship(&relay, &app, 600, 1100, "clk");
    expected.extend(l);
    eprintln!("agent clock back 1 h: 500 lines stored {took:?} after they were written");
    assert!(
        took < FLOW,
        "lines took {took:?} to arrive after the backward jump"
    );
    let bw = alerts(&eve, "backward", 5);
    let show1 = run(&["incident", "show", "-c", &config, &id], &env);
    assert_eq!(show_field(&show1, "discovered"), discovered);
    assert_eq!(deadline_at(&show1), recorded);
    let list1 = run(&["incident", "list", "-c", &config], &env);
    assert!(
        list1.contains(&id) && list1.contains("within deadline"),
        "{list1}"
    );
    // A few ticks of the intel task in the past: no period closes again.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        intel_items(&relay),
        items,
        "a period was closed again after the backward jump"
    );
    let status = run(&["status", "-c", &config, "--json"], &env);
    let st: serde_json::Value = serde_json::from_str(&status).unwrap();
    let next_due = st["intel"]["next_due"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        secs(&next_due),
        b + HOUR,
        "the open period is still [B, B+1h): {status}"
    );

    // Forward one day: the agent's clock is now B + 23 h and a few seconds.
    offset += DAY;
    clock.set(offset);
    let t_fwd = real_now();
    let (took, l) = ship(&relay, &app, 1100, 1600, "clk");
    expected.extend(l);
    eprintln!("agent clock forward 1 day: 500 lines stored {took:?} after they were written");
    assert!(
        took < FLOW,
        "lines took {took:?} to arrive after the forward jump"
    );
    let show2 = run(&["incident", "show", "-c", &config, &id], &env);
    assert_eq!(show_field(&show2, "discovered"), discovered);
    assert_eq!(deadline_at(&show2), recorded);

    // Each skipped period closed once: [B, B+1h) .. [B+22h, B+23h).
    let items = wait_items(&relay, 24, "the periods skipped by the forward jump");
    std::thread::sleep(Duration::from_secs(2));
    let items2 = intel_items(&relay);
    assert_eq!(items2, items, "more items than periods");
    let want: Vec<String> = (0..24)
        .map(|k| soclink::intel::item_name((b - HOUR + k * HOUR) as u64, None))
        .collect();
    assert_eq!(items, want, "one item per period, none twice");
    let (h, recs) = intel_item(&relay, &items[1]);
    assert_eq!(
        recs, bw,
        "alerts staged while the clock was behind go into the open period [B, B+1h)"
    );
    assert!(!h.partial);
    for name in &items[2..] {
        let (_, recs) = intel_item(&relay, name);
        assert!(
            recs.is_empty(),
            "{name} holds records of no period of its own: {recs:?}"
        );
    }

    agent.stop();
    // Regression (day partition): the lines read after the step back across midnight
    // stay under the later day, after the lines filed there before the step.
    let day = |t: i64| {
        soclink::incident::record::format_time(soclink::intel::from_unix(t as u64))[..10]
            .to_string()
    };
    let mut files: Vec<String> = std::fs::read_dir(relay.store.join(AGENT).join("app"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec![
            format!("{}.ndjson.gz", day(b - 1)),
            format!("{}.ndjson.gz", day(b))
        ],
        "store files of the agent's days"
    );
    let evs = check_store(&relay, "clk", &expected);
    // The jumps really reached the agent: collection times follow its clock.
    for e in &evs {
        let n = line_no(e, "clk").unwrap();
        let skew = ts_of(e) - real_now();
        let want = match n {
            0..600 => offset - DAY + HOUR,
            600..1100 => offset - DAY,
            _ => offset,
        };
        assert!(
            (skew - want).abs() < 120,
            "line {n} collected at {} which is not the agent's clock (offset {want}s, jumps at {t_back}/{t_fwd})",
            e["ts"]
        );
    }
}

fn secs(rfc3339: &str) -> i64 {
    soclink::intel::unix(soclink::incident::record::parse_time(rfc3339).unwrap()) as i64
}

/// The relay's wall clock goes back 1 h, then forward 1 day, while an agent ships to it.
#[test]
fn relay_clock_jumps_back_an_hour_then_forward_a_day() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Some(clock) = FakeClock::new("relay_clock_jumps_back_an_hour_then_forward_a_day", dir)
    else {
        return;
    };
    let pki = Pki::new(dir);
    let mut relay = RelayProc::new(dir, &pki, "relay", "");
    relay.env = clock.env();
    relay.start();
    let app = dir.join("app.log");
    std::fs::write(&app, "").unwrap();
    let mut agent = AgentProc::new(
        dir,
        &file_source("app", &[&app], ""),
        &upstream_toml(&pki, &relay.address(), AGENT),
    );
    agent.start();

    let (_, mut expected) = ship(&relay, &app, 0, 500, "rly");
    clock.set(-HOUR);
    let (took, l) = ship(&relay, &app, 500, 1000, "rly");
    eprintln!("relay clock back 1 h: 500 lines stored {took:?} after they were written");
    expected.extend(l);
    assert!(
        took < FLOW,
        "lines took {took:?} to arrive after the relay's backward jump"
    );
    clock.set(-HOUR + DAY);
    let (took, l) = ship(&relay, &app, 1000, 1500, "rly");
    eprintln!("relay clock forward 1 day: 500 lines stored {took:?} after they were written");
    expected.extend(l);
    assert!(
        took < FLOW,
        "lines took {took:?} to arrive after the relay's forward jump"
    );
    // A new connection after the jump: the handshake checks certificates against the
    // relay's clock, which is a day ahead now.
    relay.stop();
    relay.start();
    let (took, l) = ship(&relay, &app, 1500, 2000, "rly");
    expected.extend(l);
    assert!(took < Duration::from_secs(15), "reconnecting took {took:?}");
    agent.stop();
    check_store(&relay, "rly", &expected);
}

/// Spooled batches as (day, events), in spool order (`soclink spool dump --batches`).
fn batch_days(state: &Path) -> Vec<(String, u64)> {
    let out = Command::new(bin())
        .args(["spool", "dump", "--batches", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["meta"]["day"].as_str().unwrap().to_string(),
                v["meta"]["events"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Syslog across New Year in Taipei through a real agent whose wall clock libfaketime
/// sets (issue 16): RFC 3164 times without year or zone come out as full UTC `ts` in
/// the right year, devices whose clocks are hours off keep their own time (with the
/// receive time beside it), and batches are filed by the receive day, held across a
/// step back over midnight UTC.
#[test]
fn syslog_new_year_in_taipei_with_device_clocks_off() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Some(clock) = FakeClock::new("syslog_new_year_in_taipei_with_device_clocks_off", dir)
    else {
        return;
    };
    let set = |utc: &str| {
        let t = soclink::incident::record::parse_time(utc).unwrap();
        clock.set(soclink::intel::unix(t) as i64 - real_now());
    };
    let (tcp, udp) = (free_port(), {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    });
    let adir = dir.join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let mut agent = AgentProc::new(
        &adir,
        &format!(
            "[[source]]\nname = \"devices\"\ntype = \"syslog\"\nlisten = [\"udp://127.0.0.1:{udp}\", \"tcp://127.0.0.1:{tcp}\"]\ntimezone = \"Asia/Taipei\"\n"
        ),
        "",
    );
    agent.env = clock.env();
    // 1 January 2027, 00:00:01 in Taipei.
    set("2026-12-31T16:00:01Z");
    agent.start();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", tcp)).is_err() {
        assert!(Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let send = |msgs: &[&str], total: usize| {
        for m in msgs {
            sock.send_to(m.as_bytes(), ("127.0.0.1", udp)).unwrap();
        }
        wait_events(&agent, Duration::from_secs(10), "syslog events", |e| {
            e.len() >= total
        });
    };
    send(
        &[
            "<13>Dec 31 23:59:59 fw01 app: id=old sent 2 s before New Year",
            "<13>Jan  1 00:00:01 fw01 app: id=new sent on time",
            "<13>Dec 31 19:00:01 fw02 app: id=slow device 5 h behind",
            "<13>Jan  1 15:00:01 fw03 app: id=fast device 15 h ahead",
        ],
        4,
    );
    // 31 December 23:59:58 in Taipei: a device 2 s ahead is already in the new year.
    set("2026-12-31T15:59:58Z");
    send(
        &["<13>Jan  1 00:00:00 fw04 app: id=ahead device 2 s ahead"],
        5,
    );
    // Past midnight UTC, then the agent's clock steps back an hour across it.
    set("2027-01-01T00:00:05Z");
    send(
        &["<13>Jan  1 08:00:05 fw01 app: id=utc-day after midnight UTC"],
        6,
    );
    set("2026-12-31T23:00:05Z");
    send(
        &["<13>Jan  1 07:00:05 fw01 app: id=back clock stepped back"],
        7,
    );
    agent.stop();

    let evs = agent.events();
    let by_id = |id: &str| {
        evs.iter()
            .find(|e| String::from_utf8_lossy(&message(e)).starts_with(&format!("id={id} ")))
            .unwrap_or_else(|| panic!("no id={id} in {evs:?}"))
            .clone()
    };
    let secs = |e: &serde_json::Value, k: &str| {
        soclink::intel::unix(soclink::incident::record::parse_time(e[k].as_str().unwrap()).unwrap())
            as i64
    };
    for (id, ts, received_about) in [
        (
            "old",
            "2026-12-31T15:59:59.000000000Z",
            "2026-12-31T16:00:01Z",
        ),
        (
            "new",
            "2026-12-31T16:00:01.000000000Z",
            "2026-12-31T16:00:01Z",
        ),
        (
            "slow",
            "2026-12-31T11:00:01.000000000Z",
            "2026-12-31T16:00:01Z",
        ),
        (
            "fast",
            "2027-01-01T07:00:01.000000000Z",
            "2026-12-31T16:00:01Z",
        ),
        (
            "ahead",
            "2026-12-31T16:00:00.000000000Z",
            "2026-12-31T15:59:58Z",
        ),
        (
            "utc-day",
            "2027-01-01T00:00:05.000000000Z",
            "2027-01-01T00:00:05Z",
        ),
        (
            "back",
            "2026-12-31T23:00:05.000000000Z",
            "2026-12-31T23:00:05Z",
        ),
    ] {
        let e = by_id(id);
        assert_eq!(e["ts"], ts, "{id}: {e}");
        let want =
            soclink::intel::unix(soclink::incident::record::parse_time(received_about).unwrap())
                as i64;
        assert!(
            (secs(&e, "received") - want).abs() <= 5,
            "{id}: received {} (expected about {received_about})",
            e["received"]
        );
        assert_eq!(e["hostname"].as_str().map(|h| &h[..2]), Some("fw"));
    }
    // Filed by the receive day: everything before midnight UTC under 31 December, the
    // message after it and the one after the step back under 1 January.
    let mut days = Vec::new();
    for (day, n) in batch_days(&agent.state) {
        days.extend(std::iter::repeat_n(day, n as usize));
    }
    let day_of = |id: &str| {
        let i = evs
            .iter()
            .position(|e| String::from_utf8_lossy(&message(e)).starts_with(&format!("id={id} ")))
            .unwrap();
        days[i].clone()
    };
    for id in ["old", "new", "slow", "fast", "ahead"] {
        assert_eq!(day_of(id), "2026-12-31", "{id}");
    }
    assert_eq!(day_of("utc-day"), "2027-01-01");
    assert_eq!(
        day_of("back"),
        "2027-01-01",
        "a step back must not reopen the closed day"
    );
}
