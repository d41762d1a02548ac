//! The smaller holes of issue 17 (item 8), each against real processes: a key others
//! can read, control characters in upstream settings, a full relay, idle sockets of one
//! address, a syslog port below 1024 without the capability, and `/proc` mounted with
//! hidepid.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

fn wait_log(what: &str, timeout: Duration, log: impl Fn() -> String) -> Duration {
    let t = Instant::now();
    while !log().contains(what) {
        assert!(t.elapsed() < timeout, "no {what:?} in:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

#[test]
fn a_key_others_can_read_is_refused_naming_file_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let up = upstream_toml(&pki, "127.0.0.1:9", "loose");
    let key = pki.dir.join("loose-client-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = dir.path().join("app.log");
    append(&log, 0, 1, "k");
    let agent = AgentProc::new(dir.path(), &file_source("app", &[&log], ""), &up);
    let out = Command::new(bin())
        .args(["agent", "-c"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&key.display().to_string()) && err.contains("mode 0644"),
        "{err}"
    );
}

#[test]
fn check_config_refuses_control_characters_in_upstream() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value, line) in [
        ("address", r#""relay.example:6514\r\nX-Injected: 1""#, 7),
        ("proxy", r#""http://proxy.example:3128\nHost: evil""#, 8),
    ] {
        let cfg = dir.path().join(format!("{key}.toml"));
        let mut text = String::from(
            "[[source]]\nname = \"a\"\ntype = \"file\"\ninclude = [\"/var/log/a.log\"]\n\n[upstream]\n",
        );
        if key == "address" {
            text.push_str(&format!("address = {value}\n"));
        } else {
            text.push_str("address = \"relay.example:6514\"\n");
            text.push_str(&format!("proxy = {value}\n"));
        }
        text.push_str("ca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n");
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(bin())
            .args(["check-config", "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{}:{line}:", cfg.display()))
                && err.contains(&format!("upstream.{key}"))
                && err.contains("control character U+000"),
            "{err}"
        );
    }
}

/// A TCP connection from the loopback address `from` that never says a word (std
/// cannot bind before connecting; nix's socket calls can).
fn idle_from(from: &str, to: std::net::SocketAddr) -> std::net::TcpStream {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    let local: std::net::SocketAddrV4 = format!("{from}:0").parse().unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(local),
    )
    .unwrap();
    let std::net::SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to)).unwrap();
    std::net::TcpStream::from(fd)
}

/// Still open: a read does not see the end of the stream within a moment.
fn is_open(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
}

#[test]
fn a_full_relay_answers_busy_at_once_and_one_address_cannot_hold_every_slot() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(
        dir.path(),
        &pki,
        "relay",
        "max_connections = 3\nmax_unauthenticated_per_address = 2",
    );
    relay.start();
    // Idle sockets from 127.0.0.2: two hold slots, the rest are closed at once.
    let relay_addr: std::net::SocketAddr = relay.address().parse().unwrap();
    let mut holders: Vec<std::net::TcpStream> = (0..10)
        .map(|_| idle_from("127.0.0.2", relay_addr))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let alive = holders.iter_mut().map(is_open).filter(|o| *o).count();
    assert_eq!(
        alive, 2,
        "only two unauthenticated sockets of 127.0.0.2 stay open"
    );
    wait_log("are already waiting for their TLS handshake", T, || {
        relay.log()
    });
    // An agent from 127.0.0.1 still gets in and delivers.
    let adir = dir.path().join("a1");
    std::fs::create_dir_all(&adir).unwrap();
    let log = adir.join("app.log");
    let expected = append(&log, 0, 100, "a1");
    let mut a1 = AgentProc::new(
        &adir,
        &file_source("app", &[&log], ""),
        &upstream_toml(&pki, &relay.address(), "agent-1"),
    );
    a1.start();
    let evs = wait_store(&relay, "agent-1", T, "agent-1", |e| e.len() >= 100);
    assert_exactly_once(&evs, &expected);
    // Now all three slots are taken (two idle, one agent): a second agent is told
    // "busy, retry" at once instead of waiting in the accept queue.
    let bdir = dir.path().join("a2");
    std::fs::create_dir_all(&bdir).unwrap();
    let log2 = bdir.join("app.log");
    let expected2 = append(&log2, 0, 50, "a2");
    let mut a2 = AgentProc::new(
        &bdir,
        &file_source("app", &[&log2], ""),
        &upstream_toml(&pki, &relay.address(), "agent-2"),
    );
    a2.start();
    let took = wait_log(
        "relay busy: all 3 connections",
        Duration::from_secs(10),
        || a2.log(),
    );
    assert!(took < Duration::from_secs(5), "busy took {took:?}");
    assert!(a2.log().contains("retry in about 30 s"), "{}", a2.log());
    // When the idle sockets go (the handshake timeout closes them anyway), it gets in.
    drop(holders);
    let evs = wait_store(&relay, "agent-2", Duration::from_secs(90), "agent-2", |e| {
        e.len() >= 50
    });
    assert_exactly_once(&evs, &expected2);
    a1.stop();
    a2.stop();
    relay.stop();
}

fn is_root() -> bool {
    nix_uid() == "0"
}

fn nix_uid() -> String {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_syslog_port_below_1024_needs_the_capability_and_says_where_to_get_it() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "needs root; CI runs it");
        return;
    }
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    assert!(
        start >= 1000,
        "unprivileged ports start at {start}: nothing to show"
    );
    // A free privileged UDP port.
    let port = (900..999)
        .find(|p| std::net::UdpSocket::bind(("127.0.0.1", *p)).is_ok())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let bin = dir.path().join("soclink");
    std::fs::copy(common::bin(), &bin).unwrap();
    let src = format!(
        "[[source]]\nname = \"dev\"\ntype = \"syslog\"\nlisten = [\"udp://127.0.0.1:{port}\"]\n"
    );
    let agent = AgentProc::new(dir.path(), &src, "");
    std::fs::set_permissions(&agent.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run_as_nobody = |caps: bool| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]);
        if caps {
            c.args([
                "--inh-caps",
                "+net_bind_service",
                "--ambient-caps",
                "+net_bind_service",
            ]);
        }
        c.arg(&bin).args(["agent", "-c"]).arg(&agent.config);
        c
    };
    let out = run_as_nobody(false).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs CAP_NET_BIND_SERVICE")
            && err.contains(soclink::agent::LOW_PORT_DROPIN_DOC),
        "{err}"
    );
    // With the capability (what the drop-in grants), it listens.
    let log = std::fs::File::create(dir.path().join("cap.log")).unwrap();
    let mut child = run_as_nobody(true).stderr(log).spawn().unwrap();
    let took = wait_log("syslog listening on", T, || {
        std::fs::read_to_string(dir.path().join("cap.log")).unwrap_or_default()
    });
    assert!(took < T);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn host_facts_say_when_hidepid_hid_processes() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "needs root; CI runs it");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    append(&logs.join("app.log"), 0, 5, "h");
    let agent = AgentProc::new(
        dir.path(),
        &file_source("app", &[&logs.join("app.log")], ""),
        "",
    );
    // What systemd's ProtectProc=invisible does: /proc mounted with hidepid=invisible,
    // in a mount namespace of the command's own.
    let script = format!(
        "mount -t proc -o hidepid=invisible proc /proc && exec {} incident declare -c {} --level 3 --summary hidden",
        bin(),
        agent.config.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = find_bundle(&agent.state);
    let gz = flate2::read::GzDecoder::new(std::fs::File::open(&bundle).unwrap());
    let mut ar = tar::Archive::new(gz);
    let mut procs = String::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy() == "host/processes.txt" {
            std::io::Read::read_to_string(&mut e, &mut procs).unwrap();
        }
    }
    assert!(
        procs.starts_with("# PARTIAL: /proc is mounted with hidepid=invisible"),
        "{procs}"
    );
}

fn find_bundle(state: &Path) -> std::path::PathBuf {
    let inc = state.join("incidents");
    for e in std::fs::read_dir(&inc).unwrap().flatten() {
        let b = e.path().join("bundle.tar.gz");
        if b.exists() {
            return b;
        }
    }
    panic!("no bundle in {}", inc.display());
}
