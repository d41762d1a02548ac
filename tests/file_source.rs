//! File source end to end: a real `soclink agent` process tails real files that rotate,
//! get truncated, deleted and created, and is killed with SIGKILL; every line must be
//! in the spool exactly once, byte for byte.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::time::Duration;

use common::*;
use rand::{RngExt, SeedableRng};

const T: Duration = Duration::from_secs(60);

fn append(path: &std::path::Path, lines: &[String]) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut buf = String::new();
    for l in lines {
        buf.push_str(l);
        buf.push('\n');
    }
    f.write_all(buf.as_bytes()).unwrap();
}

fn bytes(lines: &[String]) -> Vec<Vec<u8>> {
    lines.iter().map(|l| l.as_bytes().to_vec()).collect()
}

#[test]
fn rename_rotation_while_writing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut agent = AgentProc::new(dir.path(), &file_source("app", &[&log], ""), "");
    agent.start();
    let mut all = Vec::new();
    for chunk in 0..12u64 {
        for part in 0..5u64 {
            let lines: Vec<String> = (0..600)
                .map(|i| line("rot", chunk * 3000 + part * 600 + i))
                .collect();
            append(&log, &lines);
            all.extend(lines);
            if all.len() == 600 {
                // The agent must be tailing the file before the first rename: a file
                // renamed away before the agent (still starting) ever saw it is not
                // in `include`, so its lines would rightly never be read.
                wait_events(&agent, T, "the first lines", |e| e.len() >= 600);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // logrotate's default: rename, then the writer creates a new file.
        fs::rename(&log, dir.path().join(format!("app.log.{chunk}"))).unwrap();
    }
    let evs = wait_events(&agent, T, "all rotated lines", |e| e.len() >= all.len());
    agent.stop();
    assert_exactly_once(&evs, &bytes(&all));
    let evs = agent.events();
    assert_exactly_once(&evs, &bytes(&all));
    // Events name the file and offset each line came from.
    let first = evs
        .iter()
        .find(|e| message(e) == all[0].as_bytes())
        .unwrap();
    assert_eq!(first["path"], log.to_str().unwrap());
    assert_eq!(first["offset"], 0);
    assert_eq!(first["source"], "app");
    assert!(first["host"].as_str().is_some());
}

#[test]
fn copytruncate_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut agent = AgentProc::new(dir.path(), &file_source("app", &[&log], ""), "");
    agent.start();
    let mut all = Vec::new();
    for round in 0..6u64 {
        let lines: Vec<String> = (0..2000).map(|i| line("ct", round * 3000 + i)).collect();
        append(&log, &lines);
        all.extend(lines);
        std::thread::sleep(Duration::from_millis(300));
        // Lines written just before the rotation: the agent has likely not read them
        // when the file is truncated; they must be taken from the copy.
        let late: Vec<String> = (2000..2050).map(|i| line("ct", round * 3000 + i)).collect();
        append(&log, &late);
        all.extend(late);
        // copytruncate: copy aside, truncate in place (the writer keeps its fd).
        fs::copy(&log, dir.path().join(format!("app.log.{round}"))).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(0)
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let tail: Vec<String> = (0..100).map(|i| line("ct-tail", i)).collect();
    append(&log, &tail);
    all.extend(tail);
    let evs = wait_events(&agent, T, "all copytruncated lines", |e| {
        e.len() >= all.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    let _ = evs;
    assert_exactly_once(&agent.events(), &bytes(&all));
}

#[test]
fn deleted_while_open_is_read_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gone.log");
    let mut agent = AgentProc::new(dir.path(), &file_source("g", &[&log], ""), "");
    let mut all: Vec<String> = (0..1000).map(|i| line("del", i)).collect();
    append(&log, &all);
    agent.start();
    let mut f = OpenOptions::new().append(true).open(&log).unwrap();
    wait_events(&agent, T, "first lines", |e| e.len() >= 1000);
    fs::remove_file(&log).unwrap();
    // The writer still holds the file open and keeps writing.
    let more: Vec<String> = (1000..3000).map(|i| line("del", i)).collect();
    for l in &more {
        writeln!(f, "{l}").unwrap();
    }
    all.extend(more);
    let evs = wait_events(&agent, T, "lines written after unlink", |e| {
        e.len() >= all.len()
    });
    agent.stop();
    assert_exactly_once(&evs, &bytes(&all));
}

#[test]
fn new_files_under_a_glob_are_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let pattern = logs.join("*.log");
    let mut agent = AgentProc::new(
        dir.path(),
        &file_source("glob", &[&pattern], "exclude = [\"skip-*\"]"),
        "",
    );
    agent.start();
    std::thread::sleep(Duration::from_millis(300));
    let mut all = Vec::new();
    for f in 0..20u64 {
        let lines: Vec<String> = (0..200).map(|i| line(&format!("f{f}"), i)).collect();
        append(&logs.join(format!("app{f}.log")), &lines);
        all.extend(lines);
    }
    // Excluded and non-matching files are ignored.
    append(&logs.join("skip-me.log"), &["excluded".to_string()]);
    append(&logs.join("notes.txt"), &["not matched".to_string()]);
    let evs = wait_events(
        &agent,
        Duration::from_secs(20),
        "lines of 20 new files",
        |e| e.len() >= all.len(),
    );
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    let _ = evs;
    assert_exactly_once(&agent.events(), &bytes(&all));
}

#[test]
fn sigkill_at_random_moments_during_heavy_writing() {
    let seed: u64 = std::env::var("SOCLINK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("SOCLINK_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("busy.log");
    // The glob also matches rotated names, as the README recommends: under a loaded
    // machine a file can be created and rotated away entirely while the agent is down
    // (rotation while down is covered for an exact name in
    // `rotation_while_the_agent_is_down`). Identity tracking keeps it exactly once.
    let pattern = dir.path().join("busy.log*");
    let mut agent = AgentProc::new(dir.path(), &file_source("busy", &[&pattern], ""), "");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let log = log.clone();
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let mut n = 0u64;
            let mut rotations = 0;
            let mut all = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let lines: Vec<String> = (0..500).map(|i| line("kill", n + i)).collect();
                n += 500;
                append(&log, &lines);
                all.extend(lines);
                if n.is_multiple_of(20_000) {
                    rotations += 1;
                    fs::rename(&log, dir.join(format!("busy.log.{rotations}"))).unwrap();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            all
        })
    };
    for _ in 0..12 {
        agent.start();
        std::thread::sleep(Duration::from_millis(rng.random_range(150..700)));
        agent.kill9();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let all = writer.join().unwrap();
    agent.start();
    let evs = wait_events(&agent, T, "every line after 12 SIGKILLs", |e| {
        e.len() >= all.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    let _ = evs;
    assert_exactly_once(&agent.events(), &bytes(&all));
}

#[test]
fn rotation_while_the_agent_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut agent = AgentProc::new(dir.path(), &file_source("app", &[&log], ""), "");
    let first: Vec<String> = (0..1000).map(|i| line("down", i)).collect();
    append(&log, &first);
    agent.start();
    wait_events(&agent, T, "first lines", |e| e.len() >= 1000);
    agent.stop();
    // While the agent is down: more lines, rotation to a name the glob does not match,
    // and lines in the new file.
    let before_rotation: Vec<String> = (1000..1500).map(|i| line("down", i)).collect();
    append(&log, &before_rotation);
    fs::rename(&log, dir.path().join("app.log.1")).unwrap();
    let after: Vec<String> = (1500..2000).map(|i| line("down", i)).collect();
    append(&log, &after);
    agent.start();
    let mut all = first;
    all.extend(before_rotation);
    all.extend(after);
    let evs = wait_events(&agent, T, "lines rotated while down", |e| {
        e.len() >= all.len()
    });
    std::thread::sleep(Duration::from_millis(300));
    agent.stop();
    let _ = evs;
    assert_exactly_once(&agent.events(), &bytes(&all));
}

#[test]
fn huge_lines_binary_nul_and_crlf_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("odd.log");
    let mut agent = AgentProc::new(
        dir.path(),
        &file_source("odd", &[&log], "max_line_bytes = \"8MiB\""),
        "",
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let huge: Vec<u8> = (0..5_000_000)
        .map(|_| rng.random_range(b' '..=b'~'))
        .collect();
    let expected: Vec<Vec<u8>> = vec![
        huge.clone(),
        b"\xff\xfe not utf-8 \xc3\x28".to_vec(),
        b"nul \0 in \0 the middle".to_vec(),
        b"windows line".to_vec(),
        "中文 日誌 UTF-8".as_bytes().to_vec(),
        b"".to_vec(),
        huge[..4_999_999].to_vec(),
    ];
    let mut f = File::create(&log).unwrap();
    f.write_all(&huge).unwrap();
    f.write_all(b"\n\xff\xfe not utf-8 \xc3\x28\nnul \0 in \0 the middle\nwindows line\r\n")
        .unwrap();
    f.write_all("中文 日誌 UTF-8\n\n".as_bytes()).unwrap();
    f.write_all(&huge[..4_999_999]).unwrap();
    f.write_all(b"\n").unwrap();
    drop(f);
    agent.start();
    let evs = wait_events(&agent, T, "odd lines", |e| e.len() >= expected.len());
    agent.stop();
    assert_exactly_once(&evs, &expected);
    let bin = evs
        .iter()
        .find(|e| e.get("message_base64").is_some())
        .unwrap();
    assert_eq!(message(bin), b"\xff\xfe not utf-8 \xc3\x28");
}

#[test]
fn overlong_lines_are_truncated_and_marked_and_partial_lines_wait() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("long.log");
    let mut agent = AgentProc::new(
        dir.path(),
        &file_source("long", &[&log], "max_line_bytes = \"1KiB\""),
        "",
    );
    let long = "x".repeat(5000);
    let mut f = File::create(&log).unwrap();
    writeln!(f, "short before").unwrap();
    writeln!(f, "{long}").unwrap();
    writeln!(f, "short after").unwrap();
    write!(f, "no newline yet").unwrap();
    f.flush().unwrap();
    agent.start();
    let evs = wait_events(&agent, T, "3 complete lines", |e| e.len() >= 3);
    assert_eq!(
        evs.len(),
        3,
        "the partial line must wait for its newline or the timeout"
    );
    let t = evs
        .iter()
        .find(|e| e["truncated"] == true)
        .expect("a truncated event");
    assert_eq!(message(t), &long.as_bytes()[..1024]);
    assert_eq!(t["offset"], 13);
    // After partial_line_timeout (1s) of idleness the last line is emitted whole.
    let evs = wait_events(&agent, T, "the partial line", |e| e.len() >= 4);
    assert_eq!(message(&evs[3]), b"no newline yet");
    agent.stop();
    let expected: Vec<Vec<u8>> = vec![
        b"short before".to_vec(),
        long.as_bytes()[..1024].to_vec(),
        b"short after".to_vec(),
        b"no newline yet".to_vec(),
    ];
    assert_exactly_once(&agent.events(), &expected);
}

#[test]
fn start_at_end_skips_existing_content_only() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("old.log");
    append(&log, &["old line".to_string()]);
    let mut agent = AgentProc::new(
        dir.path(),
        &file_source("e", &[&log], "start_at = \"end\""),
        "",
    );
    agent.start();
    std::thread::sleep(Duration::from_millis(500));
    append(&log, &["new line".to_string()]);
    let evs = wait_events(&agent, T, "the new line", |e| !e.is_empty());
    agent.stop();
    assert_exactly_once(&evs, &[b"new line".to_vec()]);
}

/// Regression: every inotify event (one per `write()`) used to trigger a full rescan —
/// glob expansion, a stat and a fingerprint read of every file — so a logger writing
/// line by line kept the agent's file thread busy: a whole core at 2,000 lines/s.
/// Appends now only wake the reader; creations and renames still rescan at once.
#[test]
fn a_writer_appending_line_by_line_does_not_keep_the_agent_busy() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let glob = dir.path().join("app.log*");
    let mut agent = AgentProc::new(dir.path(), &file_source("app", &[&glob], ""), "");
    agent.start();
    let pid = agent.child.as_ref().unwrap().id();
    let cpu = || {
        let st = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = st.rsplit(')').next().unwrap().split_whitespace().collect();
        // utime and stime, fields 14 and 15 of stat(5), in clock ticks (100 per second).
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu();
    let t0 = std::time::Instant::now();
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let mut written = Vec::new();
    while t0.elapsed() < Duration::from_secs(5) {
        for _ in 0..20 {
            let l = line("lbl", written.len() as u64);
            f.write_all(format!("{l}\n").as_bytes()).unwrap();
            written.push(l.into_bytes());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let evs = wait_events(&agent, T, "every line", |e| e.len() >= written.len());
    let ticks = cpu() - before;
    let secs = t0.elapsed().as_secs_f64();
    agent.stop();
    assert_exactly_once(&evs, &written);
    let share = ticks as f64 / 100.0 / secs;
    eprintln!(
        "{} lines written one write() each in {secs:.1}s: agent CPU {:.0}% of a core",
        written.len(),
        share * 100.0
    );
    // Measured: 2 % now, 100 % before the fix.
    assert!(
        share < 0.3,
        "the agent used {:.0}% of a core to tail {} lines written one by one",
        share * 100.0,
        written.len()
    );
}
