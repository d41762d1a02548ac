//! Fault injection with real processes over real mutual TLS on loopback: a writer
//! appends uniquely numbered lines while the link between agent and relay misbehaves
//! (tests/fault_proxy), a disk fills up (a small tmpfs), or either side is SIGKILLed
//! at random moments. After each scenario the relay's store must hold every line
//! exactly once, byte for byte.
//!
//! Every random choice comes from one seed, printed as `SOCLINK_SEED=`; setting that
//! variable replays it. `SOCLINK_SOAK=1` runs the long variants (minute-long faults,
//! 1,000 kill rounds); see docs/TESTING.md.

mod common;
mod fault_proxy;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use fault_proxy::{FaultProxy, Mode};
use rand::{RngExt, SeedableRng};

/// Wait for the store to catch up after a scenario.
const CATCH_UP: Duration = Duration::from_secs(90);
/// Lines per 10 ms tick: ~5,000 lines/s, ~0.7 MB/s of log text.
const PER_TICK: u64 = 50;

fn soak() -> bool {
    std::env::var("SOCLINK_SOAK").is_ok_and(|v| v == "1")
}

/// `short` in the CI run, `long` under `SOCLINK_SOAK=1`.
fn pick(short: Duration, long: Duration) -> Duration {
    if soak() { long } else { short }
}

/// Relay, optional fault proxy in front of it, agent shipping a file that a writer
/// thread keeps appending to.
/// Fields drop in order: processes first, then mounts, then the directory.
struct Rig {
    relay: RelayProc,
    proxy: Option<FaultProxy>,
    agent: AgentProc,
    id: String,
    log: PathBuf,
    stop: Arc<AtomicBool>,
    writer: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
    mounts: Vec<Tmpfs>,
    dir: tempfile::TempDir,
}

impl Rig {
    fn new(id: &str, with_proxy: bool, spool: &str) -> Rig {
        Rig::try_new(id, with_proxy, spool, PER_TICK, |_, _| Ok(Vec::new())).unwrap()
    }

    /// `mount(agent state_dir, relay store_dir)` runs once those directories exist and
    /// before anything starts; when it fails the test is skipped (None), saying why, or
    /// fails in CI, which runs as root with `mount` (see [`skip_unless_ci`]).
    fn try_new(
        id: &str,
        with_proxy: bool,
        spool: &str,
        per_tick: u64,
        mount: impl FnOnce(&Path, &Path) -> Result<Vec<Tmpfs>, String>,
    ) -> Option<Rig> {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
        let adir = dir.path().join("agent");
        std::fs::create_dir_all(adir.join("state")).unwrap();
        std::fs::create_dir_all(&relay.store).unwrap();
        let mounts = match mount(&adir.join("state"), &relay.store) {
            Ok(m) => m,
            Err(why) => {
                skip_unless_ci(id, &why);
                return None;
            }
        };
        relay.start();
        let proxy = with_proxy.then(|| FaultProxy::start(&relay.address()));
        let target = proxy
            .as_ref()
            .map_or_else(|| relay.address(), |p| p.address());
        let log = dir.path().join("app.log");
        let agent = AgentProc::new(
            &adir,
            &file_source("app", &[&log], ""),
            &upstream_toml(&pki, &target, id),
        );
        if !spool.is_empty() {
            let cfg = std::fs::read_to_string(&agent.config).unwrap();
            std::fs::write(
                &agent.config,
                cfg.replace("[spool]\n", &format!("[spool]\n{spool}\n")),
            )
            .unwrap();
        }
        let mut rig = Rig {
            relay,
            proxy,
            agent,
            id: id.to_string(),
            log,
            stop: Arc::new(AtomicBool::new(false)),
            writer: None,
            mounts,
            dir,
        };
        rig.agent.start();
        rig.writer = Some(writer(rig.log.clone(), id, per_tick, rig.stop.clone()));
        Some(rig)
    }

    fn proxy(&self) -> &FaultProxy {
        self.proxy.as_ref().unwrap()
    }

    fn stored(&self) -> usize {
        self.relay.events(&self.id).len()
    }

    /// Wait until the store grows past what it holds now (the link works).
    fn wait_progress(&self, what: &str) {
        let before = self.stored();
        wait_store(&self.relay, &self.id, CATCH_UP, what, |e| e.len() > before);
    }

    /// Stop the writer, let everything arrive, stop both sides and check the store.
    fn finish(mut self) {
        if let Some(p) = &self.proxy {
            p.set(Mode::Pass);
        }
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        let expected = self.writer.take().unwrap().join().unwrap();
        let t0 = Instant::now();
        let log = self.agent.log();
        wait_store(&self.relay, &self.id, CATCH_UP, "every line", |e| {
            e.len() >= expected.len()
        });
        // Anything extra (a duplicate) would arrive right behind the last line.
        std::thread::sleep(Duration::from_millis(500));
        eprintln!(
            "{}: {} lines, caught up {:.1}s after the writer stopped",
            self.id,
            expected.len(),
            t0.elapsed().as_secs_f64()
        );
        self.agent.stop();
        self.relay.stop();
        let evs = self.relay.events(&self.id);
        if evs.len() != expected.len() {
            eprintln!("agent log:\n{log}");
        }
        assert_exactly_once(&evs, &expected);
        let _ = &self.mounts;
        if std::env::var_os("SOCLINK_KEEP").is_some() {
            // Logs and stores for a post-mortem (mounts are still unmounted).
            eprintln!("{}: kept {}", self.id, self.dir.path().display());
            std::mem::forget(self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Link faults through the proxy
// ---------------------------------------------------------------------------------------

#[test]
fn link_reset_repeatedly() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let rig = Rig::new("f-reset", true, "");
    rig.wait_progress("first lines");
    let rounds = if soak() { 100 } else { 4 };
    let before = rig.proxy().accepted();
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(rng.random_range(100..1000)));
        rig.proxy().reset_all();
    }
    rig.wait_progress("lines after the resets");
    assert!(
        rig.proxy().accepted() > before,
        "the agent must have reconnected"
    );
    assert!(
        rig.agent.log().contains("retrying in"),
        "the agent must notice the resets:\n{}",
        rig.agent.log()
    );
    rig.finish();
}

#[test]
fn link_stalled_both_ways() {
    let rig = Rig::new("f-stall", true, "");
    rig.wait_progress("first lines");
    rig.proxy().set(Mode::Stall);
    std::thread::sleep(pick(Duration::from_secs(4), Duration::from_secs(90)));
    rig.proxy().set(Mode::Pass);
    rig.wait_progress("lines after the stall");
    rig.finish();
}

/// Regression: a link whose far end silently swallows what the agent sends (a dead
/// NAT entry, a crashed middlebox) was never given up while a writer kept the agent
/// busy: the shipper's 1 s check was a sleep made anew on every loop turn, and each
/// spooled batch woke the loop first, so the 60 s keepalive never ran. Now the check
/// is a session-long interval, and with batches in flight `ACK_TIMEOUT` (15 s) without
/// an answer ends the link.
#[test]
fn half_open_link_is_given_up_after_the_ack_timeout() {
    let rig = Rig::new("f-halfopen", true, "");
    rig.wait_progress("first lines");
    let before = rig.proxy().accepted();
    rig.proxy().set(Mode::HalfOpen);
    let t0 = Instant::now();
    // The shipper must give the dead link up and dial again, within the ack timeout
    // plus slack (not the 60 s idle keepalive).
    while rig.proxy().accepted() == before {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the shipper did not notice the half-open link within 30s; agent log:\n{}",
            rig.agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "half-open link given up after {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        rig.agent
            .log()
            .contains("no acknowledgement from the relay"),
        "the reason must be logged:\n{}",
        rig.agent.log()
    );
    if soak() {
        std::thread::sleep(Duration::from_secs(60));
    }
    rig.proxy().set(Mode::Pass);
    rig.wait_progress("lines after the half-open link");
    rig.finish();
}

#[test]
fn link_with_a_very_slow_reader() {
    let rig = Rig::new("f-slow", true, "");
    rig.wait_progress("first lines");
    rig.proxy().set(Mode::SlowReader);
    std::thread::sleep(pick(Duration::from_secs(4), Duration::from_secs(60)));
    rig.proxy().set(Mode::Pass);
    rig.wait_progress("lines after the slow reader");
    rig.finish();
}

#[test]
fn link_with_added_latency() {
    let rig = Rig::new("f-latency", true, "");
    rig.wait_progress("first lines");
    rig.proxy().set(Mode::Latency(Duration::from_millis(80)));
    std::thread::sleep(pick(Duration::from_secs(4), Duration::from_secs(60)));
    rig.wait_progress("lines through the slow link");
    rig.proxy().set(Mode::Pass);
    rig.finish();
}

#[test]
fn link_partitioned() {
    let rig = Rig::new("f-partition", true, "");
    rig.wait_progress("first lines");
    let before = rig.proxy().accepted();
    rig.proxy().set(Mode::Partition);
    std::thread::sleep(pick(Duration::from_secs(5), Duration::from_secs(60)));
    assert!(
        rig.proxy().accepted() > before,
        "the agent must keep trying (and be refused) during the partition"
    );
    rig.proxy().set(Mode::Pass);
    rig.wait_progress("lines after the partition");
    rig.finish();
}

// ---------------------------------------------------------------------------------------
// Disk full: a small tmpfs as the agent's state_dir or the relay's store_dir
// ---------------------------------------------------------------------------------------

fn wait_log(what: &str, timeout: Duration, log: impl Fn() -> String, pred: impl Fn(&str) -> bool) {
    let t0 = Instant::now();
    loop {
        let l = log();
        if pred(&l) {
            return;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out waiting for {what}; log:\n{l}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const PAUSED: &str = "the pipeline is paused";

/// The agent's disk fills up: it pauses (one log line), keeps running, resumes once
/// space is freed; then again, this time SIGKILLed while paused (a torn record may be
/// on disk) and restarted. Every line arrives once.
#[test]
fn agent_state_dir_full_pauses_then_resumes() {
    // 2 MiB of spool (1 MiB segments) fits the 8 MiB tmpfs until the filler comes.
    let Some(mut rig) = Rig::try_new(
        "d-agent",
        false,
        "max_size = \"2MiB\"",
        PER_TICK,
        |state, _| Ok(vec![Tmpfs::mount(state, "8m")?]),
    ) else {
        return;
    };
    rig.wait_progress("first lines");
    let filler = rig.mounts[0].fill();
    wait_log(
        "the pause",
        Duration::from_secs(30),
        || rig.agent.log(),
        |l| l.contains(PAUSED),
    );
    std::thread::sleep(Duration::from_secs(2));
    let child = rig.agent.child.as_mut().unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent exited on a full disk:\n{}",
        rig.agent.log()
    );
    assert_eq!(
        rig.agent.log().matches(PAUSED).count(),
        1,
        "one line per pause, not one per retry"
    );
    std::fs::remove_file(&filler).unwrap();
    wait_log(
        "the resume",
        Duration::from_secs(10),
        || rig.agent.log(),
        |l| l.contains("has room again"),
    );
    rig.wait_progress("lines after the space came back");

    let filler = rig.mounts[0].fill();
    wait_log(
        "the second pause",
        Duration::from_secs(30),
        || rig.agent.log(),
        |l| l.matches(PAUSED).count() >= 2,
    );
    std::thread::sleep(Duration::from_millis(700));
    rig.agent.kill9();
    std::fs::remove_file(&filler).unwrap();
    rig.agent.start();
    rig.wait_progress("lines after the restart");
    rig.finish();
}

/// The relay's store fills up: it must not acknowledge what it could not write, the
/// agent keeps those batches spooled, and once space is freed they all arrive once.
#[test]
fn relay_store_full_refuses_acks_then_catches_up() {
    let Some(rig) = Rig::try_new("d-relay", false, "", PER_TICK, |_, store| {
        Ok(vec![Tmpfs::mount(store, "8m")?])
    }) else {
        return;
    };
    rig.wait_progress("first lines");
    let filler = rig.mounts[0].fill();
    wait_log(
        "the refusal",
        Duration::from_secs(30),
        || rig.relay.log(),
        |l| l.contains("cannot store batch"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let stored = rig.stored();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        rig.stored(),
        stored,
        "nothing can be stored while the disk is full"
    );
    let spooled = rig.agent.events().len();
    assert!(
        spooled > 0,
        "the agent must keep the refused batches spooled"
    );
    assert!(
        !rig.relay
            .log()
            .contains("never arrived and cannot be resent"),
        "a refused batch must not be skipped over:\n{}",
        rig.relay.log()
    );
    std::fs::remove_file(&filler).unwrap();
    rig.wait_progress("lines after the space came back");
    rig.finish();
}

// ---------------------------------------------------------------------------------------
// SIGKILL rounds
// ---------------------------------------------------------------------------------------

/// Agent, relay or both SIGKILLed at random moments and restarted after a random
/// pause, round after round (20 in CI; 1,000 with SOCLINK_SOAK=1; SOCLINK_KILL_ROUNDS
/// overrides). relay_e2e kills each side a few times; this is the long mixed variant.
#[test]
fn agent_and_relay_sigkilled_at_random_moments() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let rounds: u32 = std::env::var("SOCLINK_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if soak() { 1000 } else { 20 });
    let t0 = Instant::now();
    // ~500 lines/s in the soak: 1,000 rounds must fit in memory twice (written, stored).
    let per_tick = if rounds > 100 { 5 } else { PER_TICK };
    let mut rig = Rig::try_new("k-rounds", false, "", per_tick, |_, _| Ok(Vec::new())).unwrap();
    let (mut agent_kills, mut relay_kills) = (0, 0);
    for round in 1..=rounds {
        std::thread::sleep(Duration::from_millis(rng.random_range(50..700)));
        let (agent, relay) = match rng.random_range(0..3) {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        if agent {
            rig.agent.kill9();
            agent_kills += 1;
        }
        if relay {
            rig.relay.kill9();
            relay_kills += 1;
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        if relay {
            rig.relay.start();
        }
        if agent {
            rig.agent.start();
        }
        if round % 50 == 0 {
            eprintln!(
                "round {round}/{rounds}: {} lines stored, {:.0}s",
                rig.stored(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    eprintln!(
        "{rounds} rounds ({agent_kills} agent kills, {relay_kills} relay kills) in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    rig.finish();
    eprintln!("total {:.1}s", t0.elapsed().as_secs_f64());
}
