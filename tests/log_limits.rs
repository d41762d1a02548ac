//! Repeated warnings do not flood the journal: an agent whose upstream refuses every
//! connection keeps retrying with backoff, but logs the failure once (then at most once
//! a minute), however many batches wait and however many attempts fail.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn an_unreachable_upstream_is_logged_once_not_per_attempt_or_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(dir);
    // Nothing listens on this port: every attempt is refused.
    let address = format!("127.0.0.1:{}", free_port());
    let log = dir.join("app.log");
    let text: String = (0..50_000).map(|n| line("u", n) + "\n").collect();
    std::fs::write(&log, text).unwrap();
    let mut agent = AgentProc::new(
        dir,
        &file_source("app", &[&log], ""),
        &upstream_toml(&pki, &address, "agent-u"),
    );
    agent.start();
    let sock = dir.join("control.sock");
    let started = Instant::now();
    let mut reconnects = 0;
    while started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(500));
        let out = Command::new(bin())
            .args(["status", "--json", "--socket"])
            .arg(&sock)
            .output()
            .unwrap();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            reconnects = v["upstream"]["reconnects"].as_u64().unwrap_or(0);
        }
    }
    agent.stop();
    let log = agent.log();
    let spooled = agent.events().len();
    assert_eq!(spooled, 50_000, "every line waits in the spool");
    // Backoff from 0.2s doubling: about 6 attempts in 10 s, all refused.
    assert!(
        reconnects >= 4,
        "only {reconnects} failed attempts in 10s; log:\n{log}"
    );
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("upstream {address}")))
        .collect();
    assert!(
        failures.len() == 1,
        "{} log lines about {reconnects} failed attempts (want 1 within a minute):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        failures[0].contains("Connection refused") || failures[0].contains("connection refused"),
        "{}",
        failures[0]
    );
}
