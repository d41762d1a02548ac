//! Agent → relay over real mutual TLS on loopback, with real processes killed by
//! SIGKILL: every line must be in the relay's store exactly once, byte for byte.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use rand::{RngExt, SeedableRng};

const T: Duration = Duration::from_secs(120);

#[test]
fn a_million_lines_arrive_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let log = dir.path().join("big.log");
    let mut expected = Vec::new();
    for chunk in 0..10 {
        expected.extend(append(&log, chunk * 100_000, (chunk + 1) * 100_000, "m"));
    }
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let mut agent = AgentProc::new(
        &adir,
        &file_source("big", &[&log], ""),
        &upstream_toml(&pki, &relay.address(), "agent-1"),
    );
    agent.start();
    let evs = wait_store(&relay, "agent-1", T, "1M lines", |e| {
        e.len() >= expected.len()
    });
    agent.stop();
    relay.stop();
    assert_exactly_once(&evs, &expected);
    // The store is what ARCHITECTURE.md promises: one file per source and UTC day.
    let day = &evs[0]["ts"].as_str().unwrap()[..10];
    assert!(
        relay
            .store
            .join("agent-1")
            .join("big")
            .join(format!("{day}.ndjson.gz"))
            .exists()
    );
    // The agent's spool is empty once everything is acknowledged.
    assert!(
        agent.events().is_empty(),
        "acknowledged batches must leave the spool"
    );
}

#[test]
fn agent_killed_ten_times_mid_stream() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let log = dir.path().join("app.log");
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let mut agent = AgentProc::new(
        &adir,
        &file_source("app", &[&log], ""),
        &upstream_toml(&pki, &relay.address(), "agent-k"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(log.clone(), "ak", 300, stop.clone());
    for _ in 0..10 {
        agent.start();
        std::thread::sleep(Duration::from_millis(rng.random_range(200..800)));
        agent.kill9();
    }
    stop.store(true, Ordering::Relaxed);
    let expected = w.join().unwrap();
    agent.start();
    let evs = wait_store(&relay, "agent-k", T, "every line", |e| {
        e.len() >= expected.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    relay.stop();
    let _ = evs;
    assert_exactly_once(&relay.events("agent-k"), &expected);
}

#[test]
fn relay_killed_five_times_mid_stream() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let log = dir.path().join("app.log");
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let mut agent = AgentProc::new(
        &adir,
        &file_source("app", &[&log], ""),
        &upstream_toml(&pki, &relay.address(), "agent-r"),
    );
    agent.start();
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(log.clone(), "rk", 500, stop.clone());
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..900)));
        relay.kill9();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        relay.start();
    }
    stop.store(true, Ordering::Relaxed);
    let expected = w.join().unwrap();
    let evs = wait_store(&relay, "agent-r", T, "every line", |e| {
        e.len() >= expected.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    relay.stop();
    let _ = evs;
    assert_exactly_once(&relay.events("agent-r"), &expected);
}

#[test]
fn relay_down_for_a_long_stretch_then_catch_up_with_a_bounded_spool() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    let log = dir.path().join("app.log");
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    // A tiny spool: the agent must pause its sources rather than grow or drop.
    let mut agent = AgentProc::new(
        &adir,
        &file_source("app", &[&log], ""),
        &upstream_toml(&pki, &relay.address(), "agent-d").to_string(),
    );
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        cfg.replace("[spool]\n", "[spool]\nmax_size = \"1MiB\"\n"),
    )
    .unwrap();
    agent.start();
    // The relay is down while 300k lines (~40 MB) are written: far more than the spool.
    let expected = {
        let mut e = Vec::new();
        for c in 0..6 {
            e.extend(append(&log, c * 50_000, (c + 1) * 50_000, "down"));
            std::thread::sleep(Duration::from_millis(300));
        }
        e
    };
    let spool_bytes: u64 = std::fs::read_dir(agent.state.join("spool"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(
        spool_bytes < 3 << 20,
        "spool grew to {spool_bytes} bytes despite max_size = 1MiB"
    );
    assert!(
        agent.log().contains("spool is full"),
        "the pause must be logged:\n{}",
        agent.log()
    );
    relay.start();
    let evs = wait_store(&relay, "agent-d", T, "catch-up", |e| {
        e.len() >= expected.len()
    });
    agent.stop();
    relay.stop();
    assert_exactly_once(&evs, &expected);
}

#[test]
fn chain_agent_relay_relay_with_the_middle_killed() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
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
    let log = dir.path().join("app.log");
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let mut agent = AgentProc::new(
        &adir,
        &file_source("app", &[&log], ""),
        &upstream_toml(&pki, &mid.address(), "agent-c"),
    );
    agent.start();
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(log.clone(), "chain", 300, stop.clone());
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..900)));
        mid.kill9();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        mid.start();
    }
    stop.store(true, Ordering::Relaxed);
    let expected = w.join().unwrap();
    let evs = wait_store(&top, "agent-c", T, "every line at the top relay", |e| {
        e.len() >= expected.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    mid.stop();
    top.stop();
    let _ = evs;
    // Stored under the original agent's identity, exactly once, at the top.
    assert_exactly_once(&top.events("agent-c"), &expected);
    assert!(
        !top.store.join("mid").exists(),
        "the forwarding relay must not appear as an agent"
    );
}

#[test]
fn a_forged_origin_from_an_untrusted_agent_is_refused() {
    // An agent certificate that is not a trusted forwarder cannot speak for others:
    // a relay configured to forward, but whose identity the top does not trust.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut top = RelayProc::new(dir.path(), &pki, "top", "");
    top.start();
    let mut mid = RelayProc::new(
        dir.path(),
        &pki,
        "mid",
        &upstream_toml(&pki, &top.address(), "mid"),
    );
    mid.start();
    let log = dir.path().join("app.log");
    append(&log, 0, 100, "forge");
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let mut agent = AgentProc::new(
        &adir,
        &file_source("app", &[&log], ""),
        &upstream_toml(&pki, &mid.address(), "victim"),
    );
    agent.start();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        top.events("victim").is_empty(),
        "nothing may be stored for a forged origin"
    );
    assert!(
        top.log().contains("not a trusted forwarder"),
        "the top relay must say why:\n{}",
        top.log()
    );
    agent.stop();
    mid.stop();
    top.stop();
}
