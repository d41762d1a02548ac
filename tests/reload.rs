//! SIGHUP reloads the agent's config in the same process: sources added and removed,
//! invalid configs refused with their location, and every line at the relay exactly once
//! across reloads, while a writer keeps appending. Real agent, real relay, mutual TLS.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);
const AGENT: &str = "agent-r";

fn sighup(pid: u32) {
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// Appends `line(tag, n)` for n = 0, 1, ... to `path`, `per_tick` lines every `tick`,
/// until stopped; `written` counts the lines already in the file.
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
    tag: String,
}

impl Writer {
    fn start(path: &Path, tag: &str, per_tick: u64, tick: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (s, w, p, t) = (
            stop.clone(),
            written.clone(),
            path.to_path_buf(),
            tag.to_string(),
        );
        let handle = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .unwrap();
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                let mut chunk = String::new();
                for _ in 0..per_tick {
                    chunk.push_str(&line(&t, n));
                    chunk.push('\n');
                    n += 1;
                }
                f.write_all(chunk.as_bytes()).unwrap();
                w.store(n, Ordering::SeqCst);
                std::thread::sleep(tick);
            }
        });
        Writer {
            stop,
            written,
            handle: Some(handle),
            tag: tag.to_string(),
        }
    }

    fn count(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Stop writing; returns every line written, in order.
    fn finish(&mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        (0..self.count())
            .map(|n| line(&self.tag, n).into_bytes())
            .collect()
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    relay: RelayProc,
    agent: AgentProc,
    upstream: String,
}

impl Setup {
    fn new(sources: &str) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let pki = Pki::new(&dir);
        let mut relay = RelayProc::new(&dir, &pki, "relay", "");
        relay.start();
        let upstream = upstream_toml(&pki, &relay.address(), AGENT);
        let adir = dir.join("agent");
        std::fs::create_dir_all(&adir).unwrap();
        let mut agent = AgentProc::new(&adir, sources, &upstream);
        agent.start();
        let s = Setup {
            _tmp: tmp,
            dir,
            relay,
            agent,
            upstream,
        };
        s.wait_log("started: the first generation", |l| {
            l.contains("agent \"test-agent\" started")
        });
        s
    }

    fn pid(&self) -> u32 {
        self.agent.child.as_ref().unwrap().id()
    }

    /// Rewrite the agent's config file with other sources (same state_dir, upstream).
    fn rewrite(&self, sources: &str, extra: &str) {
        let upstream = format!("{extra}\n{}", self.upstream);
        drop(AgentProc::new(&self.agent.dir, sources, &upstream));
    }

    fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + T;
        while !pred(&self.agent.log()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; agent log:\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGHUP, then wait for `expect` to appear once more in the log.
    fn reload(&self, expect: &str) {
        let before = self.agent.log().matches(expect).count();
        let pid = self.pid();
        sighup(pid);
        self.wait_log(expect, |l| l.matches(expect).count() > before);
        assert_eq!(self.pid(), pid);
        assert!(
            std::fs::metadata(format!("/proc/{pid}")).is_ok(),
            "the agent process is gone after SIGHUP; log:\n{}",
            self.agent.log()
        );
    }

    fn stored(&self) -> Vec<serde_json::Value> {
        self.relay.events(AGENT)
    }
}

fn source_of(ev: &serde_json::Value) -> &str {
    ev["source"].as_str().unwrap_or("")
}

/// The numbers n of `id=<tag>-n` lines stored, with how often each was stored.
fn numbers(evs: &[serde_json::Value], tag: &str) -> HashMap<u64, u32> {
    let needle = format!("id={tag}-");
    let mut out = HashMap::new();
    for e in evs {
        let m = String::from_utf8(message(e)).unwrap();
        if let Some(i) = m.find(&needle) {
            let rest = &m[i + needle.len()..];
            let n: u64 = rest.split(' ').next().unwrap().parse().unwrap();
            *out.entry(n).or_default() += 1;
        }
    }
    out
}

#[test]
fn sighup_adds_then_removes_sources_without_loss_or_duplicates() {
    let tmp_a = tempfile::tempdir().unwrap();
    let a = tmp_a.path().join("a.log");
    let b = tmp_a.path().join("b.log");
    let src_a = file_source("a", &[&a], "");
    let src_b = file_source("b", &[&b], "");
    let mut wa = Writer::start(&a, "a", 200, Duration::from_millis(10));
    let mut s = Setup::new(&src_a);
    let pid = s.pid();
    wait_store(&s.relay, AGENT, T, "the first lines of a", |e| {
        e.len() > 1000
    });

    // (a) Add source b: its file already holds lines (start_at "beginning"), and more come.
    std::fs::write(&b, "").unwrap();
    let mut wb = Writer::start(&b, "b", 100, Duration::from_millis(10));
    s.rewrite(&format!("{src_a}\n{src_b}"), "");
    s.reload("SIGHUP: the new config is running");
    assert!(
        s.agent
            .log()
            .contains("SIGHUP: applying the new config (sources added: \"b\")"),
        "{}",
        s.agent.log()
    );
    wait_store(&s.relay, AGENT, T, "lines of b", |e| {
        e.iter().filter(|e| source_of(e) == "b").count() > 500
    });

    // (b) Remove source a while its writer goes on.
    s.rewrite(&src_b, "");
    s.reload("SIGHUP: the new config is running");
    let written_at_removal = wa.count();
    let expected_b_so_far = wb.count();
    wait_store(&s.relay, AGENT, T, "b caught up", |e| {
        e.iter().filter(|e| source_of(e) == "b").count() as u64 >= expected_b_so_far
    });
    // a's writer keeps going for a while: none of that may be shipped.
    std::thread::sleep(Duration::from_secs(1));
    let all_a = wa.finish();
    let all_b = wb.finish();
    let evs = wait_store(&s.relay, AGENT, T, "every line of b", |e| {
        e.iter().filter(|e| source_of(e) == "b").count() >= all_b.len()
    });
    assert_eq!(s.pid(), pid, "a reload must not start a new process");
    s.agent.stop();

    let b_evs: Vec<_> = evs
        .iter()
        .filter(|e| source_of(e) == "b")
        .cloned()
        .collect();
    assert_exactly_once(&b_evs, &all_b);
    // a: exactly the lines 0..k, each once, where k is at most what was written when the
    // removal took effect; everything after is in the file but not shipped.
    let got = numbers(&evs, "a");
    let k = got.len() as u64;
    assert!(k > 1000, "only {k} lines of a stored");
    assert!(
        k <= written_at_removal,
        "{k} lines of a stored, but only {written_at_removal} were written when it was removed"
    );
    assert!(
        (all_a.len() as u64) > k + 1000,
        "the writer did not go on after the removal"
    );
    for n in 0..k {
        assert_eq!(
            got.get(&n),
            Some(&1),
            "line a-{n} stored {:?} times",
            got.get(&n)
        );
    }
}

#[test]
fn sighup_with_an_invalid_config_keeps_the_running_one() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.log");
    let src_a = file_source("a", &[&a], "");
    let mut wa = Writer::start(&a, "a", 100, Duration::from_millis(10));
    let s = Setup::new(&src_a);
    let pid = s.pid();
    let cfg = s.agent.config.to_str().unwrap().to_string();
    let good = std::fs::read_to_string(&s.agent.config).unwrap();

    // A syntax error: the log names the file, line and column.
    std::fs::write(
        &s.agent.config,
        format!("{good}\n[[source]\nname = \"x\"\n"),
    )
    .unwrap();
    s.reload("SIGHUP: keeping the running config");
    let syntax_line = good.lines().count() + 2;
    assert!(
        s.agent.log().contains(&format!(
            "SIGHUP: keeping the running config: {cfg}:{syntax_line}:"
        )),
        "no location for the syntax error (line {syntax_line}):\n{}",
        s.agent.log()
    );

    // A semantic error: an unknown source type, located too.
    let bad_type = src_a.replace("type = \"file\"", "type = \"nosuch\"");
    s.rewrite(&bad_type, "");
    s.reload("SIGHUP: keeping the running config");
    let text = std::fs::read_to_string(&s.agent.config).unwrap();
    let type_line = text.lines().position(|l| l.contains("nosuch")).unwrap() + 1;
    let log = s.agent.log();
    let last = log
        .lines()
        .rfind(|l| l.contains("SIGHUP: keeping the running config"))
        .unwrap();
    assert!(
        last.contains(&format!("{cfg}:{type_line}:")) && last.contains("nosuch"),
        "unknown source type not located at line {type_line}: {last}"
    );

    // Moving state_dir needs a restart.
    std::fs::write(
        &s.agent.config,
        good.replace("agent/state", "agent/elsewhere"),
    )
    .unwrap();
    s.reload("needs a restart");

    // Valid, but it cannot start (its metrics port is taken): the previous config runs
    // again.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    s.rewrite(
        &src_a,
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    s.reload("starting the previous config again");
    s.wait_log("the previous config running", |l| {
        l.matches("agent \"test-agent\" started").count() == 2
    });
    assert!(
        s.agent.log().contains(&format!(
            "SIGHUP: the new config cannot start: cannot listen for metrics scrapes on 127.0.0.1:{port}"
        )),
        "{}",
        s.agent.log()
    );
    drop(taken);

    // The running config kept collecting through all of it.
    let before = s.stored().len();
    wait_store(
        &s.relay,
        AGENT,
        T,
        "more lines after the refused reloads",
        |e| e.len() > before + 500,
    );
    std::fs::write(&s.agent.config, &good).unwrap();
    let all_a = wa.finish();
    let evs = wait_store(&s.relay, AGENT, T, "every line", |e| e.len() >= all_a.len());
    assert_exactly_once(&evs, &all_a);
    assert_eq!(s.pid(), pid);
    assert!(
        !s.agent.log().contains("the new config is running"),
        "a refused config was applied:\n{}",
        s.agent.log()
    );
    assert!(!s.dir.join("agent/elsewhere").exists());
}

#[test]
fn reloads_in_a_row_during_heavy_writing_keep_every_line_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.log");
    let src_a = file_source("a", &[&a], "");
    let idle = tmp.path().join("idle.log");
    std::fs::write(&idle, "").unwrap();
    let src_idle = file_source("idle", &[&idle], "");
    // Every generation binds these again: a syslog listener, the metrics port, the
    // control socket (and the state_dir lock).
    let syslog_port = free_port();
    let metrics_port = free_port();
    let src_net = format!(
        "[[source]]\nname = \"net\"\ntype = \"syslog\"\nlisten = [\"tcp://127.0.0.1:{syslog_port}\"]\n"
    );
    let metrics = format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n");
    // About 50k lines/s (~6 MB/s).
    let mut wa = Writer::start(&a, "a", 500, Duration::from_millis(10));
    let s = Setup::new(&format!("{src_a}\n{src_net}"));
    // The first reload adds the metrics endpoint.
    s.rewrite(&format!("{src_a}\n{src_net}"), &metrics);
    s.reload("SIGHUP: the new config is running");
    let pid = s.pid();
    let mut probes = Vec::new();
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        // Alternate between two configs that differ (one more source), so each SIGHUP
        // replaces the running generation.
        if i % 2 == 0 {
            s.rewrite(&format!("{src_a}\n{src_net}\n{src_idle}"), &metrics);
        } else {
            s.rewrite(&format!("{src_a}\n{src_net}"), &metrics);
        }
        s.reload("SIGHUP: the new config is running");
        let probe = format!("reload-probe-{i}");
        syslog_send(syslog_port, &probe);
        probes.push(probe);
        assert!(
            scrape(metrics_port).contains("soclink_"),
            "no metrics after reload {i}; agent log:\n{}",
            s.agent.log()
        );
    }
    let out = Command::new(bin())
        .args(["status", "--json", "--socket"])
        .arg(s.agent.dir.join("control.sock"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "soclink status after the reloads: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all_a = wa.finish();
    let total = all_a.len() + probes.len();
    let evs = wait_store(&s.relay, AGENT, T, "every line", |e| e.len() >= total);
    // Let anything duplicated arrive too before judging.
    std::thread::sleep(Duration::from_millis(500));
    let evs = if s.stored().len() > evs.len() {
        s.stored()
    } else {
        evs
    };
    assert!(all_a.len() > 50_000, "only {} lines written", all_a.len());
    let (net, file): (Vec<_>, Vec<_>) = evs.into_iter().partition(|e| source_of(e) == "net");
    assert_exactly_once(&file, &all_a);
    for p in &probes {
        let n = net
            .iter()
            .filter(|e| String::from_utf8_lossy(&message(e)).contains(p.as_str()))
            .count();
        assert_eq!(n, 1, "syslog message {p} stored {n} times");
    }
    assert_eq!(s.pid(), pid);
    let log = s.agent.log();
    assert_eq!(log.matches("SIGHUP: the new config is running").count(), 7);
    for bad in ["control socket disabled", "cannot listen", "ERROR"] {
        assert!(!log.contains(bad), "{bad:?} in the agent log:\n{log}");
    }
}

/// One syslog message over a new TCP connection (retried while the listener rebinds).
fn syslog_send(port: u16, msg: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut c) => {
                c.write_all(format!("<13>Nov 26 01:00:00 web-01 app: {msg}\n").as_bytes())
                    .unwrap();
                return;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "syslog port {port}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `GET /metrics` (empty when it fails).
fn scrape(port: u16) -> String {
    use std::io::Read;
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let mut body = String::new();
    let _ = c.read_to_string(&mut body);
    body
}
