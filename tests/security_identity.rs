//! One certificate, one identity (issue 17, item 4), against a running relay with real
//! agents and certificates made at test time:
//! - a certificate with two Common Names is refused (it once passed as the trusted
//!   forwarder named by its first CN);
//! - wildcard DNS names, invisible characters and look-alike names are refused; the
//!   refused agent is told why, and nothing of it reaches the store;
//! - ASCII case folds to one identity; CN wins over DNS names;
//! - a bundle whose manifest names another agent is refused as evidence.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use soclink::certs::{CertKind, IssueParams};

const T: Duration = Duration::from_secs(30);

/// `[upstream]` TOML with a certificate issued from `p`, files named after `file`.
fn upstream_with(pki: &Pki, relay: &RelayProc, file: &str, p: &IssueParams) -> String {
    let (cert, key) = pki.issue_with(file, p);
    format!(
        "[upstream]\naddress = {:?}\nserver_name = \"localhost\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        relay.address(),
        pki.ca().to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap()
    )
}

/// An agent in `dir/<file>` tailing one log with `lines` lines, shipping with `p`.
fn agent_with(
    dir: &Path,
    pki: &Pki,
    relay: &RelayProc,
    file: &str,
    p: &IssueParams,
    lines: u64,
) -> (AgentProc, Vec<Vec<u8>>) {
    let adir = dir.join(file);
    std::fs::create_dir_all(&adir).unwrap();
    let log = adir.join("app.log");
    let expected = append(&log, 0, lines, file);
    let agent = AgentProc::new(
        &adir,
        &file_source("app", &[&log], ""),
        &upstream_with(pki, relay, file, p),
    );
    (agent, expected)
}

fn agent_dirs(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Start `agent` and wait until its log shows the relay's refusal containing `why`.
fn assert_refused(agent: &mut AgentProc, relay: &RelayProc, why: &str) {
    agent.start();
    let deadline = Instant::now() + T;
    while !agent.log().contains("refuses this certificate's identity") {
        assert!(
            Instant::now() < deadline,
            "the agent was not told it is refused; agent log:\n{}\nrelay log:\n{}",
            agent.log(),
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        agent.log().contains(why) && relay.log().contains(why),
        "expected {why:?} in both logs; agent:\n{}\nrelay:\n{}",
        agent.log(),
        relay.log()
    );
    agent.stop();
}

#[test]
fn one_certificate_one_identity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(
        dir.path(),
        &pki,
        "relay",
        "trusted_forwarders = [\"agency-soc-relay\"]",
    );
    relay.start();

    // A real agent first: `web-01`, with mixed case in its CN and DNS names beside it.
    // The CN wins over the DNS names, and ASCII case folds.
    let p = IssueParams::new(
        "WEB-01",
        &["web-01.agency.gov.tw", "other.example"],
        CertKind::Client,
    );
    let (mut good, expected) = agent_with(dir.path(), &pki, &relay, "web-01", &p, 200);
    good.start();
    let evs = wait_store(&relay, "web-01", T, "web-01's lines", |e| e.len() >= 200);
    assert_exactly_once(&evs, &expected);
    good.stop();

    // CN=agency-soc-relay,CN=A12345-web01: two identities in one certificate.
    let mut p = IssueParams::new("agency-soc-relay", &[], CertKind::Client);
    p.second_common_name = Some("A12345-web01".into());
    let (mut two_cn, _) = agent_with(dir.path(), &pki, &relay, "two-cn", &p, 10);
    assert_refused(&mut two_cn, &relay, "2 Common Names");

    // A wildcard DNS name and no CN.
    let mut p = IssueParams::new("", &["*.agency.gov.tw"], CertKind::Client);
    p.cn = String::new();
    let (mut wild, _) = agent_with(dir.path(), &pki, &relay, "wildcard", &p, 10);
    assert_refused(&mut wild, &relay, "contains `*`");

    // Several DNS names and no CN: which one is the agent?
    let mut p = IssueParams::new(
        "",
        &["a.agency.gov.tw", "b.agency.gov.tw"],
        CertKind::Client,
    );
    p.cn = String::new();
    let (mut many, _) = agent_with(dir.path(), &pki, &relay, "many-dns", &p, 10);
    assert_refused(&mut many, &relay, "2 DNS names");

    // A zero-width space and a right-to-left override.
    let p = IssueParams::new("web\u{200B}-01", &[], CertKind::Client);
    let (mut zw, _) = agent_with(dir.path(), &pki, &relay, "zwsp", &p, 10);
    assert_refused(&mut zw, &relay, "U+200B");
    let p = IssueParams::new("web-\u{202E}10", &[], CertKind::Client);
    let (mut rlo, _) = agent_with(dir.path(), &pki, &relay, "rlo", &p, 10);
    assert_refused(&mut rlo, &relay, "U+202E");

    // Look-alikes of web-01: letter l for digit one, letter O for zero; a Cyrillic е
    // among Latin letters is refused whatever else exists.
    for (file, cn, why) in [
        (
            "alike-l",
            "web-0l",
            "looks like the existing agent \"web-01\"",
        ),
        (
            "alike-o",
            "WEB-O1",
            "looks like the existing agent \"web-01\"",
        ),
        ("alike-cyr", "w\u{0435}b-01", "mixes scripts"),
    ] {
        let p = IssueParams::new(cn, &[], CertKind::Client);
        let (mut alike, _) = agent_with(dir.path(), &pki, &relay, file, &p, 10);
        assert_refused(&mut alike, &relay, why);
    }
    // A different name is fine.
    let p = IssueParams::new("web-02", &[], CertKind::Client);
    let (mut other, expected) = agent_with(dir.path(), &pki, &relay, "web-02", &p, 50);
    other.start();
    let evs = wait_store(&relay, "web-02", T, "web-02's lines", |e| e.len() >= 50);
    assert_exactly_once(&evs, &expected);
    other.stop();

    assert_eq!(agent_dirs(&relay.store), ["web-01", "web-02"]);
    // The relay knows the store's agents after a restart, too.
    relay.stop();
    relay.start();
    let p = IssueParams::new("WEB-0L", &[], CertKind::Client);
    let (mut after, _) = agent_with(dir.path(), &pki, &relay, "alike-after", &p, 10);
    assert_refused(
        &mut after,
        &relay,
        "looks like the existing agent \"web-01\"",
    );
    assert_eq!(agent_dirs(&relay.store), ["web-01", "web-02"]);
    relay.stop();
}

fn declare(config: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(["incident", "declare", "-c"])
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "declare failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("INC-"))
        .unwrap()
        .to_string()
}

#[test]
fn a_bundle_built_as_another_agent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    // The bundle is built (agent stopped) while the configuration names the victim's
    // certificate, so its manifest says `agent.id = victim-01`; then the agent ships it
    // with its own certificate, `mallory-01`.
    let victim = IssueParams::new("victim-01", &[], CertKind::Client);
    let (agent, _) = agent_with(dir.path(), &pki, &relay, "mallory", &victim, 100);
    let id = declare(&agent.config, &["--level", "3", "--summary", "framed"]);
    let own = upstream_with(
        &pki,
        &relay,
        "mallory-own",
        &IssueParams::new("mallory-01", &[], CertKind::Client),
    );
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let text = text[..text.find("[upstream]").unwrap()].to_string() + &own;
    std::fs::write(&agent.config, text).unwrap();
    let mut agent = agent;
    agent.start();
    let idir: PathBuf = relay.store.join("mallory-01").join("incidents").join(&id);
    let deadline = Instant::now() + T;
    while !idir.join("bundle.rejected.txt").exists() {
        assert!(
            Instant::now() < deadline,
            "relay log:\n{}\nagent log:\n{}",
            relay.log(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let why = std::fs::read_to_string(idir.join("bundle.rejected.txt")).unwrap();
    assert!(
        why.contains("names agent \"victim-01\"") && why.contains("\"mallory-01\""),
        "{why}"
    );
    assert!(!idir.join("bundle.tar.gz").exists());
    // Nothing was stored under the victim's name.
    assert!(!relay.store.join("victim-01").exists());
    agent.stop();

    // The honest case: the same agent, its own certificate from the start, is accepted.
    let id = declare(&agent.config, &["--level", "3", "--summary", "honest"]);
    agent.start();
    let idir = relay.store.join("mallory-01").join("incidents").join(&id);
    while !idir.join("bundle.tar.gz").exists() {
        assert!(Instant::now() < deadline + T, "relay log:\n{}", relay.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(idir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["agent"]["id"], "mallory-01");
    agent.stop();
    relay.stop();
}
