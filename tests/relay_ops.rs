//! Operations around the link: certificate rotation by SIGHUP on both sides, and
//! shipping through an HTTP CONNECT proxy.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use soclink::certs::{CertKind, IssueParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(60);

fn sighup(pid: u32) {
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

fn write_lines(path: &std::path::Path, tag: &str, n: u64) -> Vec<Vec<u8>> {
    let mut text = String::new();
    let mut out = Vec::new();
    for i in 0..n {
        let l = line(tag, i);
        text.push_str(&l);
        text.push('\n');
        out.push(l.into_bytes());
    }
    std::fs::write(path, text).unwrap();
    out
}

#[test]
fn sighup_reloads_certificates_on_agent_and_relay_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    // The relay starts with a certificate for the wrong name: the agent refuses it.
    let wrong = IssueParams::new("wrong.example", &["wrong.example"], CertKind::Server);
    pki.issue_with("relay", &wrong);
    relay.start();
    let log = dir.path().join("app.log");
    let expected = write_lines(&log, "hup", 5000);
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    // The agent starts with a certificate from a CA the relay does not trust.
    let rogue = soclink::certs::Ca::new("rogue CA").unwrap();
    let up = upstream_toml(&pki, &relay.address(), "agent-h");
    let bad = rogue
        .issue(&IssueParams::new("agent-h", &[], CertKind::Client))
        .unwrap();
    let cert = pki.dir.join("agent-h-client.pem");
    let key = pki.dir.join("agent-h-client-key.pem");
    let good_cert = std::fs::read(&cert).unwrap();
    let good_key = std::fs::read(&key).unwrap();
    std::fs::write(&cert, &bad.cert_pem).unwrap();
    std::fs::write(&key, &bad.key_pem).unwrap();
    let mut agent = AgentProc::new(&adir, &file_source("app", &[&log], ""), &up);
    agent.start();
    std::thread::sleep(Duration::from_secs(2));
    assert!(relay.events("agent-h").is_empty());
    assert!(
        agent.log().contains("not valid for name localhost"),
        "{}",
        agent.log()
    );

    // Fix the relay's certificate and reload it.
    pki.issue("relay", CertKind::Server);
    sighup(relay.pid());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        relay.log().contains("TLS certificates reloaded"),
        "{}",
        relay.log()
    );
    // Now the relay refuses the agent's rogue certificate...
    std::thread::sleep(Duration::from_secs(2));
    assert!(relay.events("agent-h").is_empty());
    // ...until the agent's certificate is replaced and reloaded.
    std::fs::write(&cert, good_cert).unwrap();
    std::fs::write(&key, good_key).unwrap();
    sighup(agent.child.as_ref().unwrap().id());
    let evs = wait_store(&relay, "agent-h", T, "lines after the reload", |e| {
        e.len() >= expected.len()
    });
    assert!(
        agent.log().contains("TLS certificates reloaded"),
        "{}",
        agent.log()
    );
    agent.stop();
    relay.stop();
    assert_exactly_once(&evs, &expected);
}

/// A minimal HTTP CONNECT proxy on loopback that counts the tunnels it opened.
fn start_proxy(
    rt: &tokio::runtime::Runtime,
    tunnels: Arc<AtomicUsize>,
    targets: Arc<std::sync::Mutex<Vec<String>>>,
) -> u16 {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move {
        loop {
            let Ok((mut c, _)) = listener.accept().await else {
                return;
            };
            let tunnels = tunnels.clone();
            let targets = targets.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if c.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let target = text.split_whitespace().nth(1).unwrap_or("").to_string();
                targets
                    .lock()
                    .unwrap()
                    .push(text.lines().next().unwrap_or("").to_string());
                let Ok(mut up) = tokio::net::TcpStream::connect(&target).await else {
                    let _ = c.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                tunnels.fetch_add(1, Ordering::Relaxed);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            });
        }
    });
    port
}

#[test]
fn ships_through_an_http_connect_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tunnels = Arc::new(AtomicUsize::new(0));
    let targets = Arc::new(std::sync::Mutex::new(Vec::new()));
    let port = start_proxy(&rt, tunnels.clone(), targets.clone());
    let log = dir.path().join("app.log");
    let expected = write_lines(&log, "proxy", 3000);
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let up = format!(
        "{}proxy = \"http://127.0.0.1:{port}\"\n",
        upstream_toml(&pki, &relay.address(), "agent-p")
    );
    let mut agent = AgentProc::new(&adir, &file_source("app", &[&log], ""), &up);
    agent.start();
    let evs = wait_store(&relay, "agent-p", T, "lines through the proxy", |e| {
        e.len() >= expected.len()
    });
    agent.stop();
    relay.stop();
    assert_exactly_once(&evs, &expected);
    assert!(tunnels.load(Ordering::Relaxed) >= 1);
    let t = targets.lock().unwrap();
    assert!(
        t[0].starts_with(&format!("CONNECT {} HTTP/1.1", relay.address())),
        "{t:?}"
    );
}
