//! The journald source inside the real `soclink agent`: SIGKILLed again and again while
//! it reads (and while journal files are added), every entry still lands in the spool
//! exactly once, because the cursor is checkpointed only with durable batches.

mod common;
mod journald_common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{AgentProc, assert_exactly_once, wait_events};
use journald_common::*;
use rand::{RngExt, SeedableRng};

/// Total size of the agent's state files: grows when a batch is spooled. Much cheaper
/// than dumping the spool, so the test can kill right after the first progress.
fn state_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => state_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[test]
fn sigkill_during_reading_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    std::fs::create_dir(&jdir).unwrap();
    let mut expected = Vec::new();
    let first = entries("k0", NEAR_MIDNIGHT - 3_600_000_000, 1_000, 12_000);
    write_journal(&jdir.join("system.journal"), &first);
    expected.extend(messages(&first));

    let source = format!(
        "[[source]]\nname = \"journal\"\ntype = \"journald\"\ndirectory = {:?}\n",
        jdir.to_str().unwrap()
    );
    let mut agent = AgentProc::new(dir.path(), &source, "");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for round in 1..=4u64 {
        let more = entries(
            &format!("k{round}"),
            NEAR_MIDNIGHT - 3_000_000_000 + round * 100_000_000,
            round * 1_000_000_000,
            3_000,
        );
        let name = format!("system@{round}.journal");
        let before = state_bytes(&agent.state);
        agent.start();
        let t = Instant::now();
        // A file arrives while the agent runs (reading the older ones, or not yet).
        place_journal(&jdir, &name, &more);
        if round % 2 == 1 {
            // Kill at a random moment, durable or not ...
            std::thread::sleep(Duration::from_millis(rng.random_range(100..700)));
        } else {
            // ... or right after a batch group became durable, while more is in flight.
            while state_bytes(&agent.state) <= before && t.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(rng.random_range(0..30)));
        }
        agent.kill9();
        expected.extend(messages(&more));
    }
    agent.start();
    let n = expected.len();
    let evs = wait_events(&agent, Duration::from_secs(8), "every entry", |e| {
        e.len() >= n
    });
    agent.stop();
    let evs = if evs.len() == n { agent.events() } else { evs };
    assert_exactly_once(&evs, &expected);
    for e in &evs {
        assert_eq!(e["source"], "journal");
        assert_eq!(e["unit"], "sshd.service");
        assert_eq!(e["priority"], 6);
    }
}
