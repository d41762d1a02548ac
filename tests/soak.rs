//! The soak: one agent and one relay, real processes over real mutual TLS through the
//! fault proxy, for a long time while everything that happens to a production host
//! happens on a schedule: the log file rotates every 30 s (renamed, ten generations
//! kept, matched by the glob), the relay restarts every 5 min (alternately SIGTERM and
//! SIGKILL), the link is partitioned for 60 s (at minutes 6 and 21), and the agent's
//! disk is full for 60 s (at minutes 3 and 39). At the end every line written must be in
//! the store exactly once, byte for byte, and the agent's memory must be flat: its peak
//! RSS (`VmRSS`) after the first 10 minutes within +10 % of its peak during them. The
//! heap and stacks alone (`RssAnon`, where a leak would show first) are reported
//! beside it, and so is the agent's peak before the first fault.
//!
//! Each kind of fault comes once inside the first 10 minutes: a catch-up after a full
//! disk legitimately fills whole batches, so a baseline without one would measure an
//! idle agent's memory, not its working set. Each comes again later, and the second
//! catch-up must need no more than the first.
//!
//! `SOCLINK_SOAK=1` runs the full 60 minutes; `SOCLINK_SOAK_MINUTES=<m>` any other
//! length (every interval scales with it; `SOCLINK_SOAK_FAULT_SECS=<s>` keeps the
//! partition and the full disk at a fixed length). The default CI run is the same schedule
//! compressed into one minute (memory is then reported, not judged: a minute has no
//! steady state). `SOCLINK_SOAK_RATE=<lines/s>` sets the writer (default 2,000).

mod common;
mod fault_proxy;

use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use fault_proxy::{FaultProxy, Mode};

const TAG: &str = "soak";
/// Rotated generations kept (`app.log.1` .. `app.log.10`): at 30 s per rotation a file
/// lives 5 min after its rotation, far longer than the 60 s the agent is paused.
const KEEP: u32 = 10;

/// The schedule, scaled from the 60-minute original.
struct Plan {
    total: Duration,
    rotate_every: Duration,
    restart_every: Duration,
    /// When the link is partitioned, and for how long each time.
    partitions: Vec<Duration>,
    partition_len: Duration,
    /// When the agent's disk fills up, and for how long each time.
    fulls: Vec<Duration>,
    full_len: Duration,
    sample_every: Duration,
    /// Memory is judged against the peak seen during this first stretch.
    baseline: Duration,
    judge_memory: bool,
}

fn plan() -> Plan {
    let minutes: f64 = std::env::var("SOCLINK_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(if std::env::var("SOCLINK_SOAK").is_ok_and(|v| v == "1") {
            60.0
        } else {
            1.0
        });
    let s = minutes / 60.0;
    let d = |secs: f64, floor: f64| Duration::from_secs_f64((secs * s).max(floor));
    let total = d(3600.0, 30.0);
    // A short run with full-length faults reproduces the full run's catch-ups.
    let fault = std::env::var("SOCLINK_SOAK_FAULT_SECS")
        .ok()
        .and_then(|f| f.parse().ok())
        .map_or(d(60.0, 4.0), Duration::from_secs_f64);
    Plan {
        total,
        rotate_every: d(30.0, 1.5),
        restart_every: d(300.0, 8.0),
        // Each kind of fault once in the first 10 minutes, so the baseline is the
        // agent's working set and not an idle agent's, and once more after it: a
        // repeated fault must not take more memory than the first did.
        partitions: vec![total.mul_f64(0.10), total.mul_f64(0.35)],
        partition_len: fault,
        fulls: vec![total.mul_f64(0.05), total.mul_f64(0.65)],
        full_len: fault,
        sample_every: d(10.0, 0.5),
        baseline: d(600.0, 5.0),
        judge_memory: minutes >= 30.0,
    }
}

/// Appends numbered lines at `rate` lines/s and rotates the file every `rotate_every`;
/// returns how many lines it wrote (line `n` is `line(TAG, n)`).
fn rotating_writer(
    log: PathBuf,
    rate: u64,
    rotate_every: Duration,
    stop: Arc<AtomicBool>,
    rotations: Arc<AtomicU64>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let per_tick = (rate / 100).max(1);
        let mut n = 0u64;
        let mut next_rotation = Instant::now() + rotate_every;
        let mut buf = String::new();
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() >= next_rotation {
                rotate(&log);
                rotations.fetch_add(1, Ordering::Relaxed);
                next_rotation += rotate_every;
            }
            buf.clear();
            for i in n..n + per_tick {
                buf.push_str(&line(TAG, i));
                buf.push('\n');
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
            f.write_all(buf.as_bytes()).unwrap();
            n += per_tick;
            std::thread::sleep(Duration::from_millis(10));
        }
        n
    })
}

/// logrotate's default: shift the generations, rename the live file; the writer
/// creates a new one on its next append.
fn rotate(log: &Path) {
    let gen_path = |k: u32| PathBuf::from(format!("{}.{k}", log.display()));
    let _ = std::fs::remove_file(gen_path(KEEP));
    for k in (1..KEEP).rev() {
        let _ = std::fs::rename(gen_path(k), gen_path(k + 1));
    }
    std::fs::rename(log, gen_path(1)).unwrap();
}

fn status_json(agent: &AgentProc) -> Option<serde_json::Value> {
    let out = Command::new(bin())
        .args(["status", "--json", "-c"])
        .arg(&agent.config)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Lines the agent has read and whether its spool is drained (all acknowledged).
fn agent_progress(agent: &AgentProc) -> Option<(u64, u64)> {
    let s = status_json(agent)?;
    let lines = s["sources"]
        .as_array()?
        .iter()
        .map(|s| s["lines"].as_u64().unwrap_or(0))
        .sum();
    Some((lines, s["spool"]["depth_batches"].as_u64()?))
}

/// Every stored line of the agent, checked in one streaming pass: each must be
/// `line(TAG, n)` for some `n < written`, byte for byte. Returns how often each `n`
/// was stored, plus the first few lines that were not a written line at all.
fn scan_store(dir: &Path, written: u64) -> (Vec<u8>, Vec<String>) {
    let mut seen = vec![0u8; written as usize];
    let mut alien = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if !p.to_string_lossy().ends_with(".ndjson.gz") {
                continue;
            }
            let rd = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(
                std::fs::File::open(&p).unwrap(),
            ));
            for l in rd.lines() {
                let l = l.unwrap_or_else(|e| panic!("{} does not inflate: {e}", p.display()));
                let ev: serde_json::Value = serde_json::from_str(&l).unwrap();
                let msg = message(&ev);
                let n = std::str::from_utf8(&msg)
                    .ok()
                    .and_then(|m| m.split(&format!("id={TAG}-")).nth(1))
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .filter(|&n| n < written && line(TAG, n).as_bytes() == msg.as_slice());
                match n {
                    Some(n) => seen[n as usize] = seen[n as usize].saturating_add(1),
                    None if alien.len() < 5 => alien.push(String::from_utf8_lossy(&msg).into()),
                    None => {}
                }
            }
        }
    }
    (seen, alien)
}

#[derive(Default)]
struct Memory {
    /// Peak `RssAnon` during the baseline stretch and after it, KiB.
    baseline_peak: u64,
    later_peak: u64,
    /// The same for total RSS (`VmRSS`), the figure the rule judges.
    baseline_rss: u64,
    later_rss: u64,
    /// (seconds, VmRSS KiB, RssAnon KiB)
    samples: Vec<(f64, u64, u64)>,
}

#[test]
fn soak_rotation_restarts_partition_disk_full() {
    let plan = plan();
    let rate: u64 = std::env::var("SOCLINK_SOAK_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2000);
    eprintln!(
        "soak: {:.0}s, {rate} lines/s, rotation every {:.1}s, relay restart every {:.0}s, \
         partition {:.0}s at {:?}s, disk full {:.0}s at {:?}s",
        plan.total.as_secs_f64(),
        plan.rotate_every.as_secs_f64(),
        plan.restart_every.as_secs_f64(),
        plan.partition_len.as_secs_f64(),
        plan.partitions
            .iter()
            .map(Duration::as_secs)
            .collect::<Vec<_>>(),
        plan.full_len.as_secs_f64(),
        plan.fulls.iter().map(Duration::as_secs).collect::<Vec<_>>(),
    );

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let proxy = FaultProxy::start(&relay.address());
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(adir.join("state")).unwrap();
    // The disk-full phase needs a small filesystem of its own (root, as in CI).
    let tmpfs = match Tmpfs::mount(&adir.join("state"), "64m") {
        Ok(t) => Some(t),
        Err(why) => {
            eprintln!("soak: no disk-full phase: {why}");
            None
        }
    };
    let log = dir.path().join("app.log");
    let glob = dir.path().join("app.log*");
    let mut agent = AgentProc::new(
        &adir,
        &file_source("app", &[&glob], ""),
        &upstream_toml(&pki, &proxy.address(), TAG),
    );
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        cfg.replace("[spool]\n", "[spool]\nmax_size = \"32MiB\"\n"),
    )
    .unwrap();
    agent.start();
    let agent_pid = agent.child.as_ref().unwrap().id();

    let stop = Arc::new(AtomicBool::new(false));
    let rotations = Arc::new(AtomicU64::new(0));
    let writer = rotating_writer(
        log.clone(),
        rate,
        plan.rotate_every,
        stop.clone(),
        rotations.clone(),
    );

    let t0 = Instant::now();
    let mut next_restart = plan.restart_every;
    let mut next_sample = Duration::ZERO;
    let mut next_report = Duration::from_secs(60);
    let (mut restarts, mut kills) = (0u32, 0u32);
    let mut partitioned: Option<Instant> = None;
    let mut partitions = plan.partitions.iter().peekable();
    let mut filler: Option<PathBuf> = None;
    let mut full_since = Duration::ZERO;
    let no_fulls = Vec::new();
    let mut fulls = if tmpfs.is_some() {
        plan.fulls.iter().peekable()
    } else {
        no_fulls.iter().peekable()
    };
    let mut pauses = 0;
    let mut mem = Memory::default();
    let mut relay_peak = 0u64;
    loop {
        let now = t0.elapsed();
        if now >= plan.total {
            break;
        }
        if now >= next_sample {
            let rss = rss_kib(agent_pid);
            let anon = proc_kib(agent_pid, "RssAnon");
            mem.samples.push((now.as_secs_f64(), rss, anon));
            if now < plan.baseline {
                mem.baseline_peak = mem.baseline_peak.max(anon);
                mem.baseline_rss = mem.baseline_rss.max(rss);
            } else {
                mem.later_peak = mem.later_peak.max(anon);
                mem.later_rss = mem.later_rss.max(rss);
            }
            if relay.child.is_some() {
                relay_peak = relay_peak.max(rss_kib(relay.pid()));
            }
            next_sample += plan.sample_every;
        }
        if now >= next_restart {
            // Alternate a clean restart and a crash.
            if restarts.is_multiple_of(2) {
                relay.stop();
            } else {
                relay.kill9();
                kills += 1;
            }
            restarts += 1;
            std::thread::sleep(Duration::from_secs(1));
            relay.start();
            next_restart += plan.restart_every;
        }
        if partitioned.is_none() && partitions.next_if(|at| now >= **at).is_some() {
            eprintln!("soak {:.0}s: partition", now.as_secs_f64());
            proxy.set(Mode::Partition);
            partitioned = Some(Instant::now());
        }
        if let Some(p) = partitioned
            && p.elapsed() >= plan.partition_len
        {
            proxy.set(Mode::Pass);
            partitioned = None;
            eprintln!("soak {:.0}s: partition healed", now.as_secs_f64());
        }
        if filler.is_none() && fulls.next_if(|at| now >= **at).is_some() {
            eprintln!("soak {:.0}s: disk full", now.as_secs_f64());
            filler = Some(tmpfs.as_ref().unwrap().fill());
            full_since = now;
            pauses += 1;
        }
        if filler.is_some() && now >= full_since + plan.full_len {
            std::fs::remove_file(filler.take().unwrap()).unwrap();
            eprintln!("soak {:.0}s: disk has room again", now.as_secs_f64());
        }
        if now >= next_report {
            let (lines, depth) = agent_progress(&agent).unwrap_or_default();
            eprintln!(
                "soak {:.0}s: agent read {lines} lines, {depth} batches unacknowledged, \
                 RSS {} KiB (anonymous {} KiB), {} rotations, {restarts} relay restarts",
                now.as_secs_f64(),
                rss_kib(agent_pid),
                proc_kib(agent_pid, "RssAnon"),
                rotations.load(Ordering::Relaxed),
            );
            next_report += Duration::from_secs(60);
        }
        let child = agent.child.as_mut().unwrap();
        assert!(
            child.try_wait().unwrap().is_none(),
            "the agent exited during the soak; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(f) = filler.take() {
        std::fs::remove_file(f).unwrap();
    }
    proxy.set(Mode::Pass);
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    let ran = t0.elapsed();

    // Drain: the agent has read every line and the relay acknowledged every batch.
    let t1 = Instant::now();
    loop {
        if let Some((lines, 0)) = agent_progress(&agent)
            && lines >= written
        {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(300),
            "not drained 300 s after the writer stopped: {:?} of {written}; agent log:\n{}",
            agent_progress(&agent),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let drained = t1.elapsed();
    assert_eq!(
        agent.log().matches("the pipeline is paused").count(),
        pauses,
        "each pause logged once"
    );
    agent.stop();
    relay.stop();
    let agent_log = agent.log();
    drop(tmpfs);

    let (seen, alien) = scan_store(&relay.store.join(TAG), written);
    let missing: Vec<usize> = (0..seen.len()).filter(|&i| seen[i] == 0).collect();
    let doubled: Vec<usize> = (0..seen.len()).filter(|&i| seen[i] > 1).collect();
    let bytes: u64 = (0..written).map(|n| line(TAG, n).len() as u64 + 1).sum();
    eprintln!(
        "soak: {written} lines ({:.1} MB) in {:.0}s, {} rotations, {restarts} relay restarts \
         ({kills} SIGKILL), drained {:.1}s after the writer stopped; {} missing, {} duplicated; \
         agent peak anonymous RSS {} KiB in the first {:.0}s, {} KiB after (total RSS {} / {} KiB); \
         relay peak RSS {} KiB",
        bytes as f64 / 1e6,
        ran.as_secs_f64(),
        rotations.load(Ordering::Relaxed),
        drained.as_secs_f64(),
        missing.len(),
        doubled.len(),
        mem.baseline_peak,
        plan.baseline.as_secs_f64(),
        mem.later_peak,
        mem.baseline_rss,
        mem.later_rss,
        relay_peak,
    );
    if std::env::var_os("SOCLINK_SOAK_RSS").is_some() {
        for (t, rss, anon) in &mem.samples {
            eprintln!("rss {t:.0} {rss} {anon}");
        }
    }
    assert!(
        missing.is_empty() && doubled.is_empty() && alien.is_empty(),
        "{} lines missing (first {:?}), {} stored more than once (first {:?}), unexpected: {alien:?}; agent log:\n{agent_log}",
        missing.len(),
        &missing[..missing.len().min(5)],
        doubled.len(),
        &doubled[..doubled.len().min(5)],
    );
    assert!(
        rotations.load(Ordering::Relaxed) >= 10 && restarts >= 3,
        "the schedule did not run"
    );
    // Also the agent before any fault (steady traffic only), for the record: the
    // catch-up's working set is the difference.
    let first_fault = plan.fulls[0].min(plan.partitions[0]).as_secs_f64();
    let before_faults = mem
        .samples
        .iter()
        .filter(|s| s.0 < first_fault)
        .fold((0, 0), |m, s| (m.0.max(s.1), m.1.max(s.2)));
    eprintln!(
        "soak: before the first fault ({first_fault:.0}s) the agent peaked at {} KiB RSS, {} KiB anonymous",
        before_faults.0, before_faults.1
    );
    if plan.judge_memory {
        // The rule: peak RSS within +10 % of the first 10 minutes' peak. The
        // anonymous part is reported beside it: it is where a leak would show first,
        // and a growth of it is named in the failure.
        assert!(
            mem.later_rss <= mem.baseline_rss + mem.baseline_rss / 10,
            "agent memory grew: peak RSS {} KiB after the first {:.0}s, {} KiB during them \
             (limit: +10 %); anonymous {} KiB after, {} KiB during",
            mem.later_rss,
            plan.baseline.as_secs_f64(),
            mem.baseline_rss,
            mem.later_peak,
            mem.baseline_peak
        );
    }
}
