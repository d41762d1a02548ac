//! sd_notify as systemd sees it: the real `soclink agent` and `soclink relay` processes
//! are started with `NOTIFY_SOCKET` pointing at a datagram socket this test owns, and
//! `WATCHDOG_USEC` set, exactly as systemd starts a `Type=notify` unit with
//! `WatchdogSec=`. The test asserts what systemd relies on: READY=1 once set up,
//! WATCHDOG=1 well within the timeout, STATUS= with live figures, RELOADING=1 then
//! READY=1 around SIGHUP, STOPPING=1 on SIGTERM, and a clean exit.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// What the service manager received, one `KEY=VALUE` per entry, in order.
struct Notifications {
    sock: UnixDatagram,
    got: Vec<(Instant, String)>,
}

impl Notifications {
    fn bind(path: &Path) -> Notifications {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notifications {
            sock,
            got: Vec::new(),
        }
    }

    /// Receive until an entry satisfies `pred`; return it. Panics with everything
    /// received after `within`.
    fn wait(&mut self, within: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        let mut seen = self.got.len();
        loop {
            if let Some((_, hit)) = self.got[seen..].iter().find(|(_, m)| pred(m)) {
                return hit.clone();
            }
            seen = self.got.len();
            assert!(
                Instant::now() < deadline,
                "no {what} within {within:?}; received: {:#?}",
                self.got.iter().map(|(_, m)| m).collect::<Vec<_>>()
            );
            let mut buf = [0u8; 4096];
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8(buf[..n].to_vec()).unwrap();
                    for l in text.lines() {
                        self.got.push((Instant::now(), l.to_string()));
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    /// Receive (and timestamp on arrival) everything sent during `d`.
    fn collect_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.sock.recv(&mut buf) {
                let text = String::from_utf8(buf[..n].to_vec()).unwrap();
                for l in text.lines() {
                    self.got.push((Instant::now(), l.to_string()));
                }
            }
        }
    }

    fn count(&self, entry: &str) -> usize {
        self.got.iter().filter(|(_, m)| m == entry).count()
    }

    fn position(&self, entry: &str) -> Option<usize> {
        self.got.iter().position(|(_, m)| m == entry)
    }
}

/// A child process that is killed if the test fails before it exits.
struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Start `soclink <role> -c <config>` as systemd would for a Type=notify unit with
/// WatchdogSec=500ms (WATCHDOG_PID unset: libsystemd then accepts the watchdog for
/// whichever process reads it, which is this child).
fn spawn_notified(role: &str, config: &Path, notify: &Path, log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(bin())
        .args([role, "-c"])
        .arg(config)
        .env("SOCLINK_LOG", "info")
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", "500000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(Some(child))
}

fn signal(p: &Proc, sig: &str) {
    let pid = p.0.as_ref().unwrap().id();
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

fn wait_exit(mut p: Proc, log: &Path) {
    let child = p.0.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            p.0 = None;
            assert!(
                status.success(),
                "exited with {status}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            return;
        }
        if Instant::now() > deadline {
            panic!("did not stop within 20s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Arrival times of the watchdog pets received from `from` on.
fn pets_since(n: &Notifications, from: Instant) -> Vec<Instant> {
    n.got
        .iter()
        .filter(|(t, m)| *t >= from && m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect()
}

#[test]
fn agent_notifies_ready_watchdog_status_reload_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(dir);
    let mut relay = RelayProc::new(dir, &pki, "center", "");
    relay.start();

    let logfile = dir.join("app.log");
    std::fs::write(&logfile, "").unwrap();
    let agent = AgentProc::new(
        dir,
        &file_source("app", &[&logfile], ""),
        &upstream_toml(&pki, &relay.address(), "agent-1"),
    );
    let mut n = Notifications::bind(&dir.join("notify.sock"));
    let log = dir.join("agent.log");
    let child = spawn_notified("agent", &agent.config, &dir.join("notify.sock"), &log);

    n.wait(Duration::from_secs(10), "READY=1", |m| m == "READY=1");
    let ready = n.position("READY=1").unwrap();
    let first_status = n.got[..ready]
        .iter()
        .map(|(_, m)| m.as_str())
        .find(|m| m.starts_with("STATUS="));
    assert!(
        matches!(first_status, Some(s) if s.starts_with("STATUS=started: 1 source(s); upstream ")),
        "a STATUS= before READY=1 says what started: {first_status:?}"
    );

    // Lines written now are counted in a later STATUS= as a rate.
    let text: String = (0..2000).map(|i| line("w", i) + "\n").collect();
    std::fs::write(&logfile, text).unwrap();
    let status = n.wait(Duration::from_secs(10), "STATUS= with a rate", |m| {
        m.starts_with("STATUS=")
            && !m.starts_with("STATUS=0 lines/s")
            && m.contains(" lines/s, spool ")
    });
    // The link state is reported too (the next STATUS= at the latest).
    if !status.ends_with(", upstream connected to relay \"center\"") {
        n.wait(Duration::from_secs(10), "STATUS= with the link up", |m| {
            m.starts_with("STATUS=") && m.ends_with(", upstream connected to relay \"center\"")
        });
    }
    let rate: u64 = status["STATUS=".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=2000).contains(&rate),
        "rate {rate} from 2000 lines in a 2 s window: {status}"
    );

    // The watchdog is petted steadily. Timeout 500 ms, pets every 250 ms: about 6 in
    // 1.6 s (pets only once per timeout would give 3). The gap bound allows one late
    // tick on a loaded 2-core CI machine.
    let now = Instant::now();
    n.collect_for(Duration::from_millis(1600));
    let pets = pets_since(&n, now);
    assert!(pets.len() >= 4, "{} pets in 1.6 s: {:?}", pets.len(), n.got);
    let mut prev = now;
    for t in pets {
        assert!(
            t - prev < Duration::from_millis(1000),
            "{:?} without WATCHDOG=1: {:?}",
            t - prev,
            n.got
        );
        prev = t;
    }

    // SIGHUP reloads the certificates: RELOADING=1, then READY=1 again.
    let readies = n.count("READY=1");
    signal(&child, "-HUP");
    n.wait(Duration::from_secs(5), "RELOADING=1", |m| {
        m == "RELOADING=1"
    });
    n.wait(Duration::from_secs(5), "READY=1 after the reload", |m| {
        m == "READY=1"
    });
    assert_eq!(n.count("READY=1"), readies + 1);

    // A changed config replaces the running agent inside the process: RELOADING=1, then
    // READY=1, and never STOPPING=1 (systemd would take the service for stopping).
    let other = dir.join("other.log");
    std::fs::write(&other, "").unwrap();
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let changed = format!("{text}\n{}", file_source("other", &[&other], ""));
    for (what, config) in [
        ("a changed config", changed),
        ("an invalid config", "[[source]\n".into()),
    ] {
        std::fs::write(&agent.config, config).unwrap();
        let readies = n.count("READY=1");
        signal(&child, "-HUP");
        n.wait(Duration::from_secs(5), "RELOADING=1", |m| {
            m == "RELOADING=1"
        });
        n.wait(Duration::from_secs(10), "READY=1 after the reload", |m| {
            m == "READY=1"
        });
        assert_eq!(n.count("READY=1"), readies + 1, "{what}");
        assert_eq!(
            n.count("STOPPING=1"),
            0,
            "STOPPING=1 during the reload of {what}"
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("SIGHUP: applying the new config (sources added: \"other\")")
            && text.contains("SIGHUP: keeping the running config"),
        "{text}"
    );

    signal(&child, "-TERM");
    n.wait(Duration::from_secs(10), "STOPPING=1", |m| m == "STOPPING=1");
    wait_exit(child, &log);
    relay.stop();
}

#[test]
fn relay_notifies_ready_watchdog_connections_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(dir);
    let mut relay = RelayProc::new(dir, &pki, "center", "");
    let sock = dir.join("relay-notify.sock");
    let mut n = Notifications::bind(&sock);
    let log = dir.join("relay-notified.log");
    let child = spawn_notified("relay", &relay.config, &sock, &log);

    n.wait(Duration::from_secs(10), "READY=1", |m| m == "READY=1");
    let ready = n.position("READY=1").unwrap();
    assert!(
        n.got[..ready]
            .iter()
            .any(|(_, m)| m == "STATUS=0 agent connection(s)"),
        "{:?}",
        n.got
    );
    // READY=1 means bound: an agent can connect right away.
    std::net::TcpStream::connect(relay.address()).unwrap();

    let logfile = dir.join("app.log");
    std::fs::write(&logfile, "one line\n").unwrap();
    let mut agent = AgentProc::new(
        dir,
        &file_source("app", &[&logfile], ""),
        &upstream_toml(&pki, &relay.address(), "agent-1"),
    );
    agent.start();
    n.wait(Duration::from_secs(10), "STATUS= with the agent", |m| {
        m == "STATUS=1 agent connection(s)"
    });
    assert!(n.count("WATCHDOG=1") >= 2, "{:?}", n.got);

    agent.stop();
    signal(&child, "-TERM");
    n.wait(Duration::from_secs(10), "STOPPING=1", |m| m == "STOPPING=1");
    wait_exit(child, &log);
    // RelayProc must not try to stop a process it did not start.
    relay.child = None;
}

/// Without `[upstream]` there is nothing to reload, but `systemctl reload` (SIGHUP)
/// must not kill the agent (SIGHUP's default action).
#[test]
fn agent_without_upstream_survives_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let logfile = dir.join("app.log");
    std::fs::write(&logfile, "one line\n").unwrap();
    let agent = AgentProc::new(dir, &file_source("app", &[&logfile], ""), "");
    let sock = dir.join("notify.sock");
    let mut n = Notifications::bind(&sock);
    let log = dir.join("agent.log");
    let mut child = spawn_notified("agent", &agent.config, &sock, &log);
    n.wait(Duration::from_secs(10), "READY=1", |m| m == "READY=1");
    assert!(
        n.got.iter().any(|(_, m)| m
            == "STATUS=started: 1 source(s); no upstream configured (batches stay in the spool)"),
        "{:?}",
        n.got
    );
    signal(&child, "-HUP");
    n.wait(Duration::from_secs(5), "RELOADING=1", |m| {
        m == "RELOADING=1"
    });
    n.wait(Duration::from_secs(5), "READY=1 after the reload", |m| {
        m == "READY=1"
    });
    n.collect_for(Duration::from_millis(300));
    assert!(
        child.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "SIGHUP killed the agent"
    );
    signal(&child, "-TERM");
    n.wait(Duration::from_secs(10), "STOPPING=1", |m| m == "STOPPING=1");
    wait_exit(child, &log);
}
