//! Incidents end to end: `soclink incident declare` on a host with file sources, a
//! running agent and relay over real TLS; the relay must hold the record, the evidence
//! bundle (byte-identical members, hashes `sha256sum` confirms) and the timeline.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);

fn declare(agent: &AgentProc, args: &[&str]) -> String {
    declare_full(agent, args).0
}

/// The incident id and everything the command printed.
fn declare_full(agent: &AgentProc, args: &[&str]) -> (String, String) {
    let out = Command::new(bin())
        .args(["incident", "declare", "-c"])
        .arg(&agent.config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "declare failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();

    let id = text
        .split_whitespace()
        .find(|w| w.starts_with("INC-"))
        .unwrap_or_else(|| panic!("no incident id in {text:?}"))
        .to_string();
    (id, text)
}

fn incident_dir(relay: &RelayProc, agent: &str, id: &str) -> PathBuf {
    relay.store.join(agent).join("incidents").join(id)
}

/// Wait until the relay's copy of the record has `event` in its timeline.
fn wait_record_event(relay: &RelayProc, agent: &str, id: &str, event: &str) -> serde_json::Value {
    let path = incident_dir(relay, agent, id).join("record.json");
    let deadline = Instant::now() + T;
    loop {
        if let Ok(b) = std::fs::read(&path) {
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            if v["timeline"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["event"] == event)
            {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {event:?} in {}; relay log:\n{}",
            path.display(),
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn setup(dir: &Path, pki: &Pki, relay: &RelayProc, name: &str) -> (AgentProc, Vec<PathBuf>) {
    let adir = dir.join(name);
    let logs = adir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let app = logs.join("app.log");
    let mut text = String::new();
    for i in 0..20_000 {
        text.push_str(&line("inc", i));
        text.push('\n');
    }
    std::fs::write(&app, &text).unwrap();
    std::fs::write(logs.join("app.log.1"), "rotated yesterday\n".repeat(1000)).unwrap();
    let auth = logs.join("auth.log");
    std::fs::write(
        &auth,
        "Nov 26 01:00:00 web-01 sshd[1]: Failed password for root\n",
    )
    .unwrap();
    let sources = format!(
        "{}{}",
        file_source("app", &[&app], ""),
        file_source("auth", &[&auth], "")
    );
    let agent = AgentProc::new(&adir, &sources, &upstream_toml(pki, &relay.address(), name));
    (agent, vec![app, logs.join("app.log.1"), auth])
}

#[test]
fn level_3_ships_a_verified_bundle_whose_members_match_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let (mut agent, files) = setup(dir.path(), &pki, &relay, "host-3");
    agent.start();
    // The agent's control socket answers only once it is up.
    let deadline = Instant::now() + T;
    while !agent.dir.join("control.sock").exists() {
        assert!(
            Instant::now() < deadline,
            "no control socket:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (id, out) = declare_full(
        &agent,
        &[
            "--level",
            "3",
            "--summary",
            "ransomware on web-01",
            "--drill",
        ],
    );
    // With the agent running, the declaration goes through its control socket.
    assert!(
        out.contains("the agent is building the evidence bundle"),
        "{out}"
    );
    let rec = wait_record_event(&relay, "host-3", &id, "acknowledged");
    assert_eq!(rec["level"], 3);
    assert_eq!(
        rec["drill"], true,
        "drills are marked as drills in the store"
    );
    for ev in ["declared", "bundle_built", "delivered", "acknowledged"] {
        assert!(
            rec["timeline"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["event"] == ev),
            "timeline lacks {ev}: {rec}"
        );
    }
    let idir = incident_dir(&relay, "host-3", &id);
    let bundle = idir.join("bundle.tar.gz");
    assert!(bundle.exists(), "relay log:\n{}", relay.log());
    assert!(idir.join("manifest.json").exists());
    // `soclink bundle verify` on the relay's copy.
    let v = Command::new(bin())
        .args(["bundle", "verify"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    // Extract with GNU tar; every file member equals its source file, and sha256sum
    // confirms the manifest independently.
    let x = dir.path().join("extract");
    std::fs::create_dir_all(&x).unwrap();
    assert!(
        Command::new("tar")
            .arg("-xzf")
            .arg(&bundle)
            .arg("-C")
            .arg(&x)
            .status()
            .unwrap()
            .success()
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(idir.join("manifest.json")).unwrap()).unwrap();
    let mut sums = String::new();
    let mut matched = 0;
    for m in manifest["members"].as_array().unwrap() {
        let path = m["path"].as_str().unwrap();
        sums.push_str(&format!("{}  {}\n", m["sha256"].as_str().unwrap(), path));
        if let Some(orig) = m["original_path"].as_str()
            && let Some(f) = files.iter().find(|f| f.to_str() == Some(orig))
        {
            assert_eq!(
                std::fs::read(x.join(path)).unwrap(),
                std::fs::read(f).unwrap(),
                "{path}"
            );
            matched += 1;
        }
    }
    assert_eq!(
        matched,
        files.len(),
        "every source file and rotated sibling is in the bundle: {manifest}"
    );
    std::fs::write(x.join("SHA256SUMS"), sums).unwrap();
    let c = Command::new("sha256sum")
        .args(["--strict", "-c", "SHA256SUMS"])
        .current_dir(&x)
        .output()
        .unwrap();
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));
    agent.stop();
    relay.stop();
}

#[test]
fn level_1_ships_a_record_and_no_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let (mut agent, _) = setup(dir.path(), &pki, &relay, "host-1");
    agent.start();
    let id = declare(&agent, &["--level", "1", "--summary", "port scan"]);
    let rec = wait_record_event(&relay, "host-1", &id, "acknowledged");
    assert_eq!(rec["drill"], false);
    let idir = incident_dir(&relay, "host-1", &id);
    assert!(!idir.join("bundle.tar.gz").exists());
    assert!(!idir.join("bundle.tar.gz.part").exists());
    agent.stop();
    relay.stop();
}

#[test]
fn declared_while_the_relay_is_down_is_delivered_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    let (mut agent, _) = setup(dir.path(), &pki, &relay, "host-d");
    agent.start();
    std::thread::sleep(Duration::from_secs(1));
    let (id, out) = declare_full(&agent, &["--level", "4", "--summary", "data exfiltration"]);
    assert!(
        out.contains("UPSTREAM DOWN"),
        "declare must say the incident is not delivered yet: {out}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(!incident_dir(&relay, "host-d", &id).exists());
    relay.start();
    let rec = wait_record_event(&relay, "host-d", &id, "acknowledged");
    assert_eq!(rec["level"], 4);
    assert!(
        incident_dir(&relay, "host-d", &id)
            .join("bundle.tar.gz")
            .exists()
    );
    agent.stop();
    relay.stop();
}

#[test]
fn a_tampered_bundle_is_refused_by_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let (mut agent, _) = setup(dir.path(), &pki, &relay, "host-t");
    // Declared while the agent is stopped; then the bundle is tampered with on disk.
    let id = declare(&agent, &["--level", "3", "--summary", "tamper test"]);
    let local = agent
        .state
        .join("incidents")
        .join(&id)
        .join("bundle.tar.gz");
    let mut bytes = std::fs::read(&local).unwrap();
    // Flip a byte inside the compressed stream (past the gzip header).
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(&local, &bytes).unwrap();
    let v = Command::new(bin())
        .args(["bundle", "verify"])
        .arg(&local)
        .output()
        .unwrap();
    assert!(!v.status.success(), "a tampered bundle must fail verify");
    agent.start();
    let idir = incident_dir(&relay, "host-t", &id);
    let deadline = Instant::now() + T;
    while !idir.join("bundle.rejected.txt").exists() {
        assert!(Instant::now() < deadline, "relay log:\n{}", relay.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !idir.join("bundle.tar.gz").exists(),
        "a tampered bundle is never stored as evidence"
    );
    // The relay writes bundle.rejected.txt before it logs the refusal.
    while !relay.log().contains("REFUSED") {
        assert!(Instant::now() < deadline, "relay log:\n{}", relay.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.stop();
    relay.stop();
}

#[test]
fn relay_killed_mid_bundle_resumes_instead_of_restarting() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let (mut agent, files) = setup(dir.path(), &pki, &relay, "host-k");
    // A bundle of several chunks: ~30 MB of incompressible-ish log.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&files[0])
            .unwrap();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut buf = String::new();
        for _ in 0..300_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.push_str(&format!(
                "noise {x:016x} {:016x} {:016x}\n",
                x.rotate_left(7),
                x.rotate_left(19)
            ));
        }
        f.write_all(buf.as_bytes()).unwrap();
    }
    let id = declare(&agent, &["--level", "3", "--summary", "big"]);
    agent.start();
    let idir = incident_dir(&relay, "host-k", &id);
    let part = idir.join("bundle.tar.gz.part");
    let deadline = Instant::now() + T;
    while std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "{}", relay.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    relay.kill9();
    relay.start();
    wait_record_event(&relay, "host-k", &id, "acknowledged");
    assert!(idir.join("bundle.tar.gz").exists());
    let v = Command::new(bin())
        .args(["bundle", "verify"])
        .arg(idir.join("bundle.tar.gz"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    // The chunks acknowledged before the kill left the agent's spool for good; the
    // relay kept its partial file and the rest completed it (the hashes prove it).
    agent.stop();
    relay.stop();
}

/// Append ~`mb` MB of poorly compressible lines to `path`.
fn noise(path: &Path, mb: usize) {
    use std::io::Write;
    let mut f =
        std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let lines = mb * 1_000_000 / 57;
    for _ in 0..lines {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        writeln!(
            f,
            "noise {x:016x} {:016x} {:016x}",
            x.rotate_left(7),
            x.rotate_left(19)
        )
        .unwrap();
    }
}

#[test]
fn agent_killed_mid_bundle_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let (mut agent, files) = setup(dir.path(), &pki, &relay, "host-ak");
    noise(&files[0], 30);
    let id = declare(
        &agent,
        &["--level", "3", "--summary", "agent dies mid-bundle"],
    );
    agent.start();
    let idir = incident_dir(&relay, "host-ak", &id);
    let part = idir.join("bundle.tar.gz.part");
    let deadline = Instant::now() + T;
    while std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "{}", relay.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    agent.kill9();
    agent.start();
    wait_record_event(&relay, "host-ak", &id, "acknowledged");
    let v = Command::new(bin())
        .args(["bundle", "verify"])
        .arg(idir.join("bundle.tar.gz"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    agent.stop();
    relay.stop();
}

#[test]
fn incidents_and_bundles_cross_a_relay_chain() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut top = RelayProc::new(dir.path(), &pki, "top", "trusted_forwarders = [\"mid\"]");
    top.start();
    let mut mid = RelayProc::new(
        dir.path(),
        &pki,
        "mid",
        &upstream_toml(&pki, &top.address(), "mid"),
    );
    mid.start();
    let (mut agent, _) = setup(dir.path(), &pki, &mid, "host-c");
    agent.start();
    let id = declare(
        &agent,
        &["--level", "3", "--summary", "through the agency SOC"],
    );
    let rec = wait_record_event(&top, "host-c", &id, "acknowledged");
    assert_eq!(rec["id"], id.as_str());
    let idir = incident_dir(&top, "host-c", &id);
    let v = Command::new(bin())
        .args(["bundle", "verify"])
        .arg(idir.join("bundle.tar.gz"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    assert!(
        !top.store.join("mid").exists(),
        "stored under the agent's identity, not the hop's"
    );
    agent.stop();
    mid.stop();
    top.stop();
}

/// Manual: `cargo test --release --test incident_e2e two_gib -- --ignored --nocapture`.
/// The agent first catches up with a 2.2 GB log (as on a host that was already being
/// collected); the peak RSS is then reset and measured over building, spooling and
/// shipping the bundle alone.
#[test]
#[ignore]
fn two_gib_bundle_ships_in_bounded_agent_memory() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let (mut agent, files) = setup(dir.path(), &pki, &relay, "host-big");
    noise(&files[0], 2200);
    let lines = count_lines(std::fs::File::open(&files[0]).unwrap());
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        format!("{cfg}\n[incident]\nmax_bundle_size = \"4GiB\"\n"),
    )
    .unwrap();
    agent.start();
    let pid = agent.child.as_ref().unwrap().id();
    let hwm = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    let t0 = Instant::now();
    // Count stored lines by streaming (parsing 2.2 GB of events would not fit).
    let stored = || -> usize {
        let dir = relay.store.join("host-big").join("app");
        std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        count_lines(flate2::read::MultiGzDecoder::new(
                            std::fs::File::open(e.path()).unwrap(),
                        ))
                    })
                    .sum()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(900);
    while stored() < lines {
        assert!(Instant::now() < deadline, "{}", relay.log());
        std::thread::sleep(Duration::from_secs(2));
    }
    let tail_peak = hwm();
    // Reset the peak (Linux: writing 5 to clear_refs resets VmHWM).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let store = soclink::incident::record::IncidentStore::open(&agent.state).unwrap();
    let inc = store
        .declare(
            soclink::incident::record::DeclareRequest::new(3, "big".to_string()),
            "host-big",
            "h",
        )
        .unwrap();
    let t = Instant::now();
    let idir = incident_dir(&relay, "host-big", &inc.id);
    let deadline = Instant::now() + Duration::from_secs(900);
    while !idir.join("bundle.tar.gz").exists() {
        assert!(Instant::now() < deadline, "{}", relay.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    let size = std::fs::metadata(idir.join("bundle.tar.gz")).unwrap().len();
    let peak = hwm();
    eprintln!(
        "catch-up of {lines} lines: {:.1}s, agent peak RSS {} MiB; bundle of {size} bytes built, shipped and verified in {:.1}s, agent peak RSS during it {} MiB",
        (t - t0).as_secs_f64(),
        tail_peak / 1024,
        t.elapsed().as_secs_f64(),
        peak / 1024
    );
    assert!(peak < 64 * 1024, "agent peak RSS {peak} KiB");
    agent.stop();
    relay.stop();
}

fn count_lines(r: impl std::io::Read) -> usize {
    use std::io::BufRead;
    let mut rd = std::io::BufReader::with_capacity(1 << 20, r);
    let mut n = 0;
    loop {
        let buf = match rd.fill_buf() {
            Ok(b) if !b.is_empty() => b,
            _ => return n,
        };
        n += buf.iter().filter(|&&b| b == b'\n').count();
        let len = buf.len();
        rd.consume(len);
    }
}
