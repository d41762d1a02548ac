//! Shared helpers for integration tests: real `soclink` processes, real files, and
//! reading back what landed in the spool.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_soclink")
}

/// A tool the test needs is missing: in CI (`CI` set, as `.ci/run` runs) that fails the
/// test, since `.ci/run` installs every tool the tests use; elsewhere the test is
/// skipped, saying so loudly. Callers return right after.
pub fn skip_unless_ci(test: &str, why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why} (CI installs it: see .ci/run and the README's test command)");
    }
    eprintln!("\n*** SKIPPED {test}: {why} ***\n");
}

/// An agent process with its config and state in a temporary directory.
pub struct AgentProc {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub state: PathBuf,
    pub child: Option<Child>,
    /// Extra environment for the process (on top of the test's own).
    pub env: Vec<(String, String)>,
}

impl AgentProc {
    /// `sources` is the TOML of the `[[source]]` tables; `extra` goes at the top level end.
    pub fn new(dir: &Path, sources: &str, extra: &str) -> AgentProc {
        let state = dir.join("state");
        let config = dir.join("agent.toml");
        let text = format!(
            "id = \"test-agent\"\nstate_dir = {:?}\ncontrol_socket = {:?}\n\n{sources}\n\n[spool]\nbatch_max_bytes = \"256KiB\"\nbatch_max_delay = \"100ms\"\ncompression_level = 1\n{extra}\n",
            state.to_str().unwrap(),
            dir.join("control.sock").to_str().unwrap(),
        );
        std::fs::write(&config, text).unwrap();
        AgentProc {
            dir: dir.to_path_buf(),
            config,
            state,
            child: None,
            env: Vec::new(),
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = Command::new(bin())
            .args(["agent", "-c"])
            .arg(&self.config)
            .env("SOCLINK_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigterm(c.id());
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = c.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "agent exited with {status}; log:\n{}",
                        self.log()
                    );
                    return;
                }
                if Instant::now() > deadline {
                    c.kill().unwrap();
                    panic!(
                        "agent did not stop within 20s after SIGTERM; log:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Every spooled event (works while the agent runs).
    pub fn events(&self) -> Vec<serde_json::Value> {
        spool_events(&self.state)
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

pub fn spool_events(state: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(bin())
        .args(["spool", "dump", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "spool dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("spool dump prints JSON lines"))
        .collect()
}

/// Original bytes of an event's message.
pub fn message(ev: &serde_json::Value) -> Vec<u8> {
    soclink::event::message_bytes(ev).expect("event has message or message_base64")
}

/// Poll until `pred(events)` holds, or panic with `what` after `timeout`.
pub fn wait_events(
    agent: &AgentProc,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let evs = agent.events();
        if pred(&evs) {
            return evs;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}: have {} events; agent log:\n{}",
                evs.len(),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Assert that the messages are exactly `expected`, each once (order across files is
/// free; the first difference is reported).
pub fn assert_exactly_once(events: &[serde_json::Value], expected: &[Vec<u8>]) {
    let mut counts: HashMap<Vec<u8>, i64> = HashMap::new();
    for e in expected {
        *counts.entry(e.clone()).or_default() += 1;
    }
    for ev in events {
        *counts.entry(message(ev)).or_default() -= 1;
    }
    let missing: Vec<_> = counts.iter().filter(|(_, c)| **c > 0).collect();
    let extra: Vec<_> = counts.iter().filter(|(_, c)| **c < 0).collect();
    if !missing.is_empty() || !extra.is_empty() {
        let show = |v: &[(&Vec<u8>, &i64)]| {
            v.iter()
                .take(5)
                .map(|(k, c)| format!("{:?}x{c}", String::from_utf8_lossy(&k[..k.len().min(80)])))
                .collect::<Vec<_>>()
                .join(", ")
        };
        panic!(
            "{} expected lines missing (e.g. {}), {} duplicated or unexpected (e.g. {}); {} events, {} expected",
            missing.len(),
            show(&missing),
            extra.len(),
            show(&extra),
            events.len(),
            expected.len()
        );
    }
}

/// A realistic, unique log line for writer `w`, number `n`.
pub fn line(w: &str, n: u64) -> String {
    const APPS: [&str; 5] = ["sshd", "nginx", "kernel", "cron", "postfix/smtpd"];
    let app = APPS[(n % 5) as usize];
    format!(
        "Nov 26 01:{:02}:{:02} web-01 {app}[{}]: id={w}-{n} event {} from 10.{}.{}.{} port {}",
        (n / 60) % 60,
        n % 60,
        1000 + n % 7919,
        if n.is_multiple_of(3) {
            "accepted"
        } else {
            "rejected"
        },
        n % 256,
        (n / 256) % 256,
        (n * 7) % 256,
        1024 + n % 60000
    )
}

pub fn file_source(name: &str, include: &[&Path], extra: &str) -> String {
    let inc: Vec<String> = include
        .iter()
        .map(|p| format!("{:?}", p.to_str().unwrap()))
        .collect();
    format!(
        "[[source]]\nname = \"{name}\"\ntype = \"file\"\ninclude = [{}]\nrescan_interval = \"200ms\"\nrotate_wait = \"1s\"\npartial_line_timeout = \"1s\"\n{extra}\n",
        inc.join(", ")
    )
}

// ---------------------------------------------------------------------------------------
// Relay side
// ---------------------------------------------------------------------------------------

/// A CA plus files for a relay and any number of agents, in `dir/certs`.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: soclink::certs::Ca,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let d = dir.join("certs");
        std::fs::create_dir_all(&d).unwrap();
        let ca = soclink::certs::Ca::new("soclink test CA").unwrap();
        std::fs::write(d.join("ca.pem"), &ca.cert_pem).unwrap();
        Pki { dir: d, ca }
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// Issue `<name>.pem` / `<name>-key.pem`; returns (cert, key).
    pub fn issue(&self, name: &str, kind: soclink::certs::CertKind) -> (PathBuf, PathBuf) {
        let sans: &[&str] = match kind {
            soclink::certs::CertKind::Server => &["localhost", "127.0.0.1"],
            _ => &[],
        };
        let cn = if matches!(kind, soclink::certs::CertKind::Server) {
            "localhost"
        } else {
            name
        };
        let p = soclink::certs::IssueParams::new(cn, sans, kind);
        self.issue_with(name, &p)
    }
    pub fn issue_with(&self, name: &str, p: &soclink::certs::IssueParams) -> (PathBuf, PathBuf) {
        let i = self.ca.issue(p).unwrap();
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert, &i.cert_pem).unwrap();
        write_key(&key, &i.key_pem);
        (cert, key)
    }
}

/// A private key file as soclink accepts it: readable by its owner only.
pub fn write_key(path: &Path, pem: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, pem).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A relay process with its config, state and store in a temporary directory.
pub struct RelayProc {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub store: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
    /// Extra environment for the process (on top of the test's own).
    pub env: Vec<(String, String)>,
}

impl RelayProc {
    pub fn new(dir: &Path, pki: &Pki, name: &str, extra: &str) -> RelayProc {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = pki.issue(name, soclink::certs::CertKind::Server);
        let port = free_port();
        let store = dir.join("store");
        let config = dir.join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "id = {name:?}\nlisten = [\"127.0.0.1:{port}\"]\nstate_dir = {:?}\nstore_dir = {:?}\ncontrol_socket = {:?}\nca = {:?}\ncert = {:?}\nkey = {:?}\nidle_timeout = \"20s\"\nhandshake_timeout = \"2s\"\n{extra}\n",
                dir.join("state").to_str().unwrap(),
                store.to_str().unwrap(),
                dir.join("relay.sock").to_str().unwrap(),
                pki.ca().to_str().unwrap(),
                cert.to_str().unwrap(),
                key.to_str().unwrap(),
            ),
        )
        .unwrap();
        RelayProc {
            dir,
            config,
            store,
            port,
            child: None,
            env: Vec::new(),
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("relay.log"))
            .unwrap();
        let child = Command::new(bin())
            .args(["relay", "-c"])
            .arg(&self.config)
            .env("SOCLINK_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Wait until it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(self.address()).is_err() {
            assert!(
                Instant::now() < deadline,
                "relay did not start; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigterm(c.id());
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "relay exited with {status}; log:\n{}",
                self.log()
            );
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default()
    }

    /// Every stored event of `agent` (all sources, all days).
    pub fn events(&self, agent: &str) -> Vec<serde_json::Value> {
        store_events(&self.store.join(agent))
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Read every `*.ndjson.gz` under `dir` (recursively) as concatenated gzip members.
pub fn store_events(dir: &Path) -> Vec<serde_json::Value> {
    use std::io::BufRead;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".ndjson.gz") {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in files {
        let rd = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(
            std::fs::File::open(&f).unwrap(),
        ));
        for l in rd.lines() {
            let l = l.unwrap_or_else(|e| panic!("{} does not inflate: {e}", f.display()));
            out.push(serde_json::from_str(&l).unwrap());
        }
    }
    out
}

/// `[upstream]` TOML for an agent (or relay) shipping to `relay` with `name`'s cert.
pub fn upstream_toml(pki: &Pki, relay_addr: &str, name: &str) -> String {
    let p = soclink::certs::IssueParams::new(name, &[], soclink::certs::CertKind::Client);
    let (cert, key) = pki.issue_with(&format!("{name}-client"), &p);
    format!(
        "[upstream]\naddress = {relay_addr:?}\nserver_name = \"localhost\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        pki.ca().to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap()
    )
}

/// Poll the relay store until `pred` holds.
pub fn wait_store(
    relay: &RelayProc,
    agent: &str,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let evs = relay.events(agent);
        if pred(&evs) {
            return evs;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}: {} events stored; relay log:\n{}",
                evs.len(),
                relay.log()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------------------
// Writers and seeds
// ---------------------------------------------------------------------------------------

/// Append lines `from..to` of writer `tag` to `path`; returns them (without newline).
pub fn append(path: &Path, from: u64, to: u64, tag: &str) -> Vec<Vec<u8>> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut buf = String::new();
    let mut out = Vec::new();
    for n in from..to {
        let l = line(tag, n);
        buf.push_str(&l);
        buf.push('\n');
        out.push(l.into_bytes());
    }
    f.write_all(buf.as_bytes()).unwrap();
    out
}

/// The seed of a randomized test: `SOCLINK_SEED` replays one, else a fresh one. Printed
/// either way, so a failure names the seed that reproduces it.
pub fn seed() -> u64 {
    let s = std::env::var("SOCLINK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("SOCLINK_SEED={s}");
    s
}

/// A writer thread appending `per_tick` numbered lines every 10 ms until stopped;
/// returns what it wrote.
pub fn writer(
    path: PathBuf,
    tag: impl Into<String>,
    per_tick: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    let tag = tag.into();
    std::thread::spawn(move || {
        let mut n = 0;
        let mut all = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            all.extend(append(&path, n, n + per_tick, &tag));
            n += per_tick;
            std::thread::sleep(Duration::from_millis(10));
        }
        all
    })
}

// ---------------------------------------------------------------------------------------
// Hostile-peer helpers: a raw TLS client, memory readings, and a witness agent
// ---------------------------------------------------------------------------------------

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`, ...).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

pub fn client_config(
    pki: &Pki,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> std::sync::Arc<rustls::ClientConfig> {
    soclink::tls::client_config(&pki.ca(), cert, key).unwrap()
}

/// Connect with TLS as `cfg` and say Hello; returns the stream after the relay's
/// HelloAck, or the error text (TLS 1.3 client-auth failures surface on the first read).
pub async fn tls_connect(
    addr: &str,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let c = tokio_rustls::TlsConnector::from(cfg);
    let mut s = c
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .map_err(|e| soclink::tls::explain(&e))?;
    let hello = soclink::protocol::Frame::Hello(soclink::protocol::Hello {
        versions: vec![1],
        agent_version: "test".into(),
        streams: vec!["logs".into()],
    });
    soclink::protocol::write_frame(&mut s, &hello)
        .await
        .map_err(|e| e.to_string())?;
    match soclink::protocol::read_frame(&mut s, &Default::default()).await {
        Ok(soclink::protocol::Frame::HelloAck(_)) => Ok(s),
        Ok(other) => Err(format!("unexpected {other:?}")),
        Err(soclink::protocol::ProtocolError::Io(e)) => Err(soclink::tls::explain(&e)),
        Err(e) => Err(e.to_string()),
    }
}

/// An agent that keeps writing and must keep delivering while hostile things happen.
pub struct Witness {
    pub agent: AgentProc,
    pub log: std::path::PathBuf,
    pub written: Vec<Vec<u8>>,
}

impl Witness {
    pub fn start(dir: &std::path::Path, pki: &Pki, relay: &RelayProc) -> Witness {
        let adir = dir.join("witness");
        std::fs::create_dir_all(&adir).unwrap();
        let log = adir.join("w.log");
        let mut agent = AgentProc::new(
            &adir,
            &file_source("w", &[&log], ""),
            &upstream_toml(pki, &relay.address(), "witness"),
        );
        agent.start();
        Witness {
            agent,
            log,
            written: Vec::new(),
        }
    }
    pub fn write(&mut self, n: usize) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        for _ in 0..n {
            let l = line("witness", self.written.len() as u64);
            writeln!(f, "{l}").unwrap();
            self.written.push(l.into_bytes());
        }
    }
    pub fn check(&self, relay: &RelayProc) {
        let want = self.written.len();
        let evs = wait_store(
            relay,
            "witness",
            Duration::from_secs(60),
            "the witness agent's lines",
            |e| e.len() >= want,
        );
        assert_exactly_once(&evs, &self.written);
    }
}

// ---------------------------------------------------------------------------------------
// Disk full
// ---------------------------------------------------------------------------------------

/// A tmpfs mounted for one test, unmounted (lazily, so a straggler cannot block it)
/// when dropped.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Needs root (CI runs as root); callers skip on failure outside CI
    /// ([`skip_unless_ci`]).
    pub fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| format!("id -u: {e}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not root: cannot mount a tmpfs".into());
        }
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    /// Take every free byte with a filler file; deleting it frees the space again.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.path.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0x5au8; 64 << 10];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", p.display()),
            }
        }
        // Byte-sized leftovers too: the smallest write must fail.
        while matches!(f.write(&chunk[..1]), Ok(1)) {}
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
