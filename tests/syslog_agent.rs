//! Syslog through the real `soclink agent` binary: `logger` sends over UDP and TCP
//! (octet-counted and LF), every message must be in the agent's spool exactly once,
//! byte for byte, with its syslog fields.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn logger(args: &[&str], port: u16, lines: &[String]) {
    let mut child = Command::new("logger")
        .args(args)
        .args(["-n", "127.0.0.1", "-P", &port.to_string(), "-t", "myapp"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("logger (util-linux) must be installed");
    let mut stdin = child.stdin.take().unwrap();
    for l in lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn logger_over_udp_and_tcp_lands_in_the_spool_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let tcp = free_port();
    let udp = free_udp_port();
    let mut agent = AgentProc::new(
        dir.path(),
        &format!(
            "[[source]]\nname = \"devices\"\ntype = \"syslog\"\nlisten = [\"udp://127.0.0.1:{udp}\", \"tcp://127.0.0.1:{tcp}\"]\n"
        ),
        "",
    );
    agent.start();
    // Wait for the listeners.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", tcp)).is_err() {
        assert!(std::time::Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let udp_lines: Vec<String> = (0..200)
        .map(|i| format!("udp message id={i} äöü"))
        .collect();
    let oc_lines: Vec<String> = (0..2000)
        .map(|i| format!("tcp octet-counted id={i}"))
        .collect();
    let lf_lines: Vec<String> = (0..2000).map(|i| format!("tcp lf id={i}")).collect();
    // Slow UDP a little: it is unacknowledged by nature (see README, Guarantees).
    for chunk in udp_lines.chunks(20) {
        logger(&["-d", "--rfc5424"], udp, chunk);
        std::thread::sleep(Duration::from_millis(5));
    }
    logger(&["-T", "--octet-count", "--rfc5424"], tcp, &oc_lines);
    logger(&["-T", "--rfc3164"], tcp, &lf_lines);
    let total = udp_lines.len() + oc_lines.len() + lf_lines.len();
    let evs = wait_events(
        &agent,
        Duration::from_secs(30),
        "all syslog messages",
        |e| e.len() >= total,
    );
    agent.kill9();
    // Restart: TCP/UDP syslog has no resume position, so nothing is read twice.
    agent.start();
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    let evs2 = agent.events();
    assert_eq!(
        evs2.len(),
        evs.len(),
        "a restart must not duplicate syslog events"
    );
    let expected: Vec<Vec<u8>> = udp_lines
        .iter()
        .chain(&oc_lines)
        .chain(&lf_lines)
        .map(|l| l.as_bytes().to_vec())
        .collect();
    assert_exactly_once(&evs2, &expected);
    let e = evs2
        .iter()
        .find(|e| message(e) == b"tcp octet-counted id=7")
        .unwrap();
    assert_eq!(e["app"], "myapp");
    assert_eq!(e["format"], "rfc5424");
    assert_eq!(e["source"], "devices");
    assert!(e["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        e["facility"].is_string() && e["severity"].is_string(),
        "{e}"
    );
    let e = evs2.iter().find(|e| message(e) == b"tcp lf id=9").unwrap();
    assert_eq!(e["format"], "rfc3164");
}

/// `check-config` names a misspelt time zone at its line and column (as every config
/// error), and the real binary accepts an IANA name.
#[test]
fn check_config_locates_an_unknown_time_zone() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    let src =
        "[[source]]\nname = \"devices\"\ntype = \"syslog\"\nlisten = [\"udp://127.0.0.1:5514\"]\n";
    std::fs::write(&cfg, format!("{src}timezone = \"Asia/Taipie\"\n")).unwrap();
    let out = Command::new(bin())
        .args(["check-config", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}:5:12: error: unknown time zone \"Asia/Taipie\"",
        cfg.display()
    );
    assert!(err.contains(&want), "{err}");
    std::fs::write(&cfg, format!("{src}timezone = \"Asia/Taipei\"\n")).unwrap();
    let out = Command::new(bin())
        .args(["check-config", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read as Asia/Taipei"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
