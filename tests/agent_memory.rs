//! The agent's memory: it re-executes itself once with glibc's mmap threshold fixed
//! (same pid, same arguments), leaves an operator's own threshold alone, and catching up
//! a backlog at full speed through the whole pipeline (tail, gzip, spool, TLS, relay)
//! keeps its peak resident memory bounded. Its own test binary, so the figures are
//! not blurred by other tests running beside it.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);
const OURS: &str = "glibc.malloc.mmap_threshold=131072:glibc.malloc.arena_max=2";

/// GLIBC_TUNABLES as the process was started with it. glibc 2.36 parses the variable
/// in place in the memory /proc shows, turning each ':' into a NUL: the pieces after it
/// that name a `glibc.` tunable are joined back.
fn tunables_of(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let i = vars.iter().position(|v| v.starts_with("GLIBC_TUNABLES="))?;
    let mut value = vars[i]["GLIBC_TUNABLES=".len()..].to_string();
    for piece in vars[i + 1..].iter().take_while(|v| v.starts_with("glibc.")) {
        value.push(':');
        value.push_str(piece);
    }
    Some(value)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Start an agent on a small file with `tunables` as GLIBC_TUNABLES, wait until it has
/// spooled the file, and return the GLIBC_TUNABLES it runs with.
fn running_tunables(tunables: &str) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let lines: Vec<Vec<u8>> = (0..100).map(|n| line("t", n).into_bytes()).collect();
    let mut f = std::fs::File::create(&log).unwrap();
    for l in &lines {
        f.write_all(l).unwrap();
        f.write_all(b"\n").unwrap();
    }
    let mut agent = AgentProc::new(dir.path(), &file_source("app", &[&log], ""), "");
    agent.env.push(("GLIBC_TUNABLES".into(), tunables.into()));
    agent.start();
    let pid = agent.child.as_ref().unwrap().id();
    let evs = wait_events(&agent, T, "the file spooled", |e| e.len() >= lines.len());
    assert_exactly_once(&evs, &lines);
    // Same process (exec keeps the pid), same arguments.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    assert_eq!(&args[1..3], &[&b"agent"[..], b"-c"], "{args:?}");
    assert_eq!(args[3], agent.config.to_str().unwrap().as_bytes());
    let found = tunables_of(pid);
    agent.stop();
    found
}

#[test]
fn the_agent_runs_with_a_fixed_mmap_threshold_in_the_same_process() {
    // Empty counts as unset (unset itself: the other test).
    assert_eq!(running_tunables("").as_deref(), Some(OURS));
    // Other tunables are kept; ours is added.
    assert_eq!(
        running_tunables("glibc.malloc.tcache_count=0").as_deref(),
        Some(format!("glibc.malloc.tcache_count=0:{OURS}").as_str())
    );
    // An operator's own threshold wins.
    let own = "glibc.malloc.mmap_threshold=262144";
    assert_eq!(running_tunables(own).as_deref(), Some(own));
}

/// Before the fixed threshold and the reused buffers, this catch-up left about 50 MiB
/// of anonymous memory in malloc arenas (the benchmark's agent: 55-65 MiB peak RSS);
/// now it stays near 20 MiB. Anonymous memory is what the code controls: the peak
/// minus the mapped binary and libraries, which differ between build profiles.
#[test]
fn catching_up_a_backlog_at_full_speed_keeps_agent_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let log = dir.path().join("backlog.log");
    let mut expected = Vec::new();
    let mut w = std::io::BufWriter::new(std::fs::File::create(&log).unwrap());
    for n in 0..400_000 {
        let l = line("b", n);
        w.write_all(l.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        expected.push(l.into_bytes());
    }
    w.into_inner().unwrap().sync_all().unwrap();
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let mut agent = AgentProc::new(
        &adir,
        &file_source("backlog", &[&log], ""),
        &upstream_toml(&pki, &relay.address(), "agent-m"),
    );
    // The shipped defaults (1 MiB batches), not the small batches other tests use.
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        cfg.replace("batch_max_bytes = \"256KiB\"", "batch_max_bytes = \"1MiB\""),
    )
    .unwrap();
    agent.start();
    let pid = agent.child.as_ref().unwrap().id();
    let evs = wait_store(&relay, "agent-m", T, "the backlog", |e| {
        e.len() >= expected.len()
    });
    let hwm = status_kib(pid, "VmHWM:");
    let file = status_kib(pid, "RssFile:");
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        assert_eq!(tunables_of(pid).as_deref(), Some(OURS));
    }
    agent.stop();
    relay.stop();
    assert_exactly_once(&evs, &expected);
    eprintln!(
        "agent peak RSS {} MiB, of which mapped files {} MiB",
        hwm / 1024,
        file / 1024
    );
    assert!(
        hwm.saturating_sub(file) < 32 * 1024,
        "agent peak RSS {hwm} KiB, {file} KiB of it mapped files: anonymous peak over 32 MiB"
    );
}
