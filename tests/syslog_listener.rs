//! The syslog listeners end to end on loopback: util-linux `logger` as a real sender
//! over UDP and TCP (both framings), a TLS client with a client certificate, bounds
//! (message size, connections, idle timeout), backpressure and UDP drop counting.

mod syslog_common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use soclink::agent::sources::file::BatchLimits;
use soclink::agent::sources::syslog::{SyslogLimits, tls_server_config};
use syslog_common::{Opts, by_id, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(8);

fn lines(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix} id={prefix}-{i:04} \"quoted\" back\\slash 中文 end"))
        .collect()
}

/// Feed `lines` to one `logger` process on stdin (one message per line).
async fn logger(args: &[&str], port: u16, lines: &[String]) {
    let mut child = tokio::process::Command::new("logger")
        .args(args)
        .args([
            "-n",
            "127.0.0.1",
            "-P",
            &port.to_string(),
            "-t",
            "soclinktest",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("logger (util-linux) must be installed");
    let mut stdin = child.stdin.take().unwrap();
    let mut input = lines.join("\n");
    input.push('\n');
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let status = child.wait().await.unwrap();
    assert!(status.success(), "logger {args:?} failed");
}

fn check_logger_events(events: &[serde_json::Value], sent: &[String], format: &str, peer_ip: &str) {
    let got = by_id(events);
    assert_eq!(got.len(), sent.len());
    let hostname = hostname::get().unwrap().into_string().unwrap();
    for line in sent {
        let id = line
            .split_whitespace()
            .find(|w| w.starts_with("id="))
            .unwrap();
        let e = &got[id];
        assert_eq!(e["message"].as_str().unwrap(), line, "byte for byte");
        assert_eq!(e["app"], "soclinktest");
        assert_eq!(e["facility"], "user");
        assert_eq!(e["severity"], "notice");
        assert_eq!(e["format"], format);
        assert!(e["syslog_ts"].as_str().is_some_and(|t| !t.is_empty()));
        assert_eq!(e["hostname"].as_str().unwrap(), hostname.trim());
        assert!(e.get("parse_error").is_none());
        assert!(e["remote_addr"].as_str().unwrap().starts_with(peer_ip));
    }
}

async fn wait_for(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logger_over_udp_rfc5424() {
    let mut r = start(Opts::default()).await;
    // 100 datagrams in a burst stay well inside the kernel's default receive buffer.
    let sent = lines("udp", 100);
    logger(&["-d", "--rfc5424"], r.udp.port(), &sent).await;
    let events = r.events(sent.len(), T).await;
    check_logger_events(&events, &sent, "rfc5424", "127.0.0.1:");
    // logger's default RFC 5424 structured data.
    assert!(
        events[0]["sd"]
            .as_str()
            .unwrap()
            .starts_with("[timeQuality ")
    );
    let rest = r.shutdown().await;
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logger_over_tcp_octet_counted_and_lf() {
    let mut r = start(Opts::default()).await;
    let counted = lines("tcpoc", 300);
    logger(
        &["-T", "--octet-count", "--rfc5424"],
        r.tcp.port(),
        &counted,
    )
    .await;
    let events = r.events(counted.len(), T).await;
    check_logger_events(&events, &counted, "rfc5424", "127.0.0.1:");

    let lf = lines("tcplf", 300);
    logger(&["-T", "--rfc3164"], r.tcp.port(), &lf).await;
    let events = r.events(lf.len(), T).await;
    check_logger_events(&events, &lf, "rfc3164", "127.0.0.1:");
    let s = &r.stats;
    assert_eq!(s.received.load(Ordering::Relaxed), 600);
    assert_eq!(s.connections.load(Ordering::Relaxed), 2);
    assert_eq!(s.parse_errors.load(Ordering::Relaxed), 0);
    assert!(r.shutdown().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_unparseable_and_binary_messages() {
    let mut opts = Opts::default();
    opts.limits.max_message_bytes = 1024;
    let mut r = start(opts).await;
    let big = format!("<13>1 - h app - - - id=big {}", "x".repeat(100_000));
    let mut stream = Vec::new();
    stream.extend_from_slice(format!("{} {}", big.len(), big).as_bytes());
    let junk: &[u8] = b"\xff\xfe id=junk \x00 not syslog";
    stream.extend_from_slice(format!("{} ", junk.len()).as_bytes());
    stream.extend_from_slice(junk);
    stream.extend_from_slice(b"23 <13>1 - - - - - - ");
    let mut tcp = tokio::net::TcpStream::connect(r.tcp).await.unwrap();
    // A frame split mid-message across writes must come out whole.
    tcp.write_all(&stream).await.unwrap();
    tcp.write_all(b"id=ok").await.unwrap();
    drop(tcp);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dgram = format!("<14>Nov 26 01:02:03 fw id=udpbig {}\n", "y".repeat(5000));
    udp.send_to(dgram.as_bytes(), r.udp).unwrap();

    let events = r.events(4, T).await;
    let got = by_id(&events);
    let e = &got["id=big"];
    assert_eq!(e["truncated"], true);
    let msg = soclink::event::message_bytes(e).unwrap();
    // The first 1024 bytes of the frame were parsed; its MSG part is what is left of them.
    assert_eq!(msg, big.as_bytes()[20..1024]);
    let e = &got["id=junk"];
    assert_eq!(
        soclink::event::message_bytes(e).unwrap(),
        junk,
        "kept whole, byte for byte"
    );
    assert!(e.get("message").is_none());
    assert_eq!(e["parse_error"], "missing PRI");
    assert_eq!(e["format"], "unknown");
    let e = &got["id=ok"];
    assert_eq!(e["message"], "id=ok");
    assert!(e.get("truncated").is_none());
    let e = &got["id=udpbig"];
    assert_eq!(e["truncated"], true);
    assert_eq!(e["hostname"], "fw");
    assert_eq!(
        soclink::event::message_bytes(e).unwrap(),
        &dgram.as_bytes()[23..1024]
    );
    assert_eq!(r.stats.truncated.load(Ordering::Relaxed), 2);
    assert_eq!(r.stats.parse_errors.load(Ordering::Relaxed), 1);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_octet_count_closes_the_connection() {
    let mut r = start(Opts::default()).await;
    let mut tcp = tokio::net::TcpStream::connect(r.tcp).await.unwrap();
    tcp.write_all(b"9 <13>id=a\n99999999999 x").await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the server closes the connection");
    let events = r.events(1, T).await;
    assert_eq!(events[0]["message"], "id=a\n");
    assert_eq!(r.stats.connection_errors.load(Ordering::Relaxed), 1);
    // A 4 GiB declared frame is read and cut, never allocated.
    let mut tcp = tokio::net::TcpStream::connect(r.tcp).await.unwrap();
    tcp.write_all(b"4294967296 <13>id=huge ").await.unwrap();
    tcp.write_all(&vec![b'z'; 1 << 20]).await.unwrap();
    drop(tcp);
    let events = r.events(1, T).await;
    assert_eq!(events[0]["truncated"], true);
    assert_eq!(events[0]["message"].as_str().unwrap().len(), 64 * 1024 - 4);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_and_idle_timeout() {
    let mut opts = Opts::default();
    opts.limits.max_connections = 2;
    opts.limits.idle_timeout = Duration::from_millis(300);
    let mut r = start(opts).await;
    let mut a = tokio::net::TcpStream::connect(r.tcp).await.unwrap();
    a.write_all(b"<13>id=a\n").await.unwrap();
    let mut b = tokio::net::TcpStream::connect(r.tcp).await.unwrap();
    b.write_all(b"<13>id=b\n").await.unwrap();
    r.events(2, T).await;
    let mut c = tokio::net::TcpStream::connect(r.tcp).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(T, c.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "a third connection is refused");
    assert_eq!(r.stats.rejected_connections.load(Ordering::Relaxed), 1);
    // Idle connections are closed, which frees their slots.
    let started = Instant::now();
    assert_eq!(
        tokio::time::timeout(T, a.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0),
        0
    );
    assert_eq!(
        tokio::time::timeout(T, b.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0),
        0
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    wait_for(|| r.stats.active_connections.load(Ordering::Relaxed) == 0).await;
    let mut d = tokio::net::TcpStream::connect(r.tcp).await.unwrap();
    d.write_all(b"<13>id=d").await.unwrap(); // no LF: handed on when the connection ends
    let events = r.events(1, T).await;
    assert_eq!(events[0]["message"], "id=d");
    wait_for(|| r.stats.active_connections.load(Ordering::Relaxed) == 0).await;
    assert_eq!(r.stats.connections.load(Ordering::Relaxed), 3);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_on_partial_lines_and_the_open_batch() {
    let mut opts = Opts::default();
    opts.batch.max_delay = Duration::from_secs(3600);
    let r = start(opts).await;
    let mut tcp = tokio::net::TcpStream::connect(r.tcp).await.unwrap();
    tcp.write_all(b"<13>id=1 complete\n<13>id=2 partial")
        .await
        .unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(b"<13>id=3 udp", r.udp).unwrap();
    while r.stats.received.load(Ordering::Relaxed) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let events = r.shutdown().await;
    let got = by_id(&events);
    assert_eq!(got.len(), 3, "{events:?}");
    assert_eq!(got["id=2"]["message"], "id=2 partial");
    drop(tcp);
}

/// A full pipeline makes TCP stop reading (the sender blocks, nothing is lost) and
/// makes UDP drop, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_tcp_waits_udp_counts_drops() {
    let opts = Opts {
        limits: SyslogLimits {
            queue_chunks: 1,
            ..SyslogLimits::default()
        },
        batch: BatchLimits {
            max_bytes: 4096,
            max_delay: Duration::from_millis(10),
        },
        out_capacity: 1,
        tls: None,
        tcp_rcvbuf: Some(4096),
    };
    let mut r = start(opts).await;
    const N: usize = 20_000;
    let total_bytes = N * 100;
    let written = Arc::new(AtomicUsize::new(0));
    let addr: SocketAddr = r.tcp;
    let w = Arc::clone(&written);
    // Small kernel buffers on both sides, so a stalled reader shows within kilobytes.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_send_buffer_size(4096).unwrap();
    let s = sock.connect(addr).await.unwrap().into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    let writer = std::thread::spawn(move || {
        let mut s = s;
        for i in 0..N {
            let m = format!("<13>Nov 26 01:02:03 h app: id={i:06} {}\n", "p".repeat(60));
            s.write_all(m.as_bytes()).unwrap();
            w.fetch_add(m.len(), Ordering::Relaxed);
        }
    });
    // Nobody drains the pipeline: the writer must get stuck well before the end.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stuck_at = written.load(Ordering::Relaxed);
    eprintln!("writer stuck at {stuck_at} of {total_bytes} bytes");
    assert!(
        stuck_at < total_bytes / 2,
        "TCP kept reading into a full pipeline: {stuck_at} of {total_bytes} bytes written"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        written.load(Ordering::Relaxed),
        stuck_at,
        "the writer is blocked"
    );

    // UDP into the same full pipeline: dropped and counted, never silently.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200 {
        udp.send_to(format!("<13>id=u{i:03}").as_bytes(), r.udp)
            .unwrap();
    }
    let deadline = Instant::now() + T;
    while r.stats.udp_drops.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no UDP drop was counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Drain: every TCP message arrives exactly once.
    let mut tcp_ids = vec![0u8; N];
    let mut udp_seen = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tcp_ids.contains(&0) {
        let b = tokio::time::timeout_at(deadline, r.rx.recv())
            .await
            .expect("all TCP messages arrive")
            .unwrap();
        // Cheap scan (20k events): find each id without a JSON parse.
        for line in b.raw.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
            let s = std::str::from_utf8(line).unwrap();
            let at = s.find("id=").unwrap();
            let id = &s[at + 3..at + 9];
            if let Some(u) = id.strip_prefix('u') {
                assert!(u[..3].parse::<u32>().is_ok());
                udp_seen += 1;
                continue;
            }
            let i: usize = id.parse().unwrap();
            tcp_ids[i] += 1;
            assert_eq!(tcp_ids[i], 1, "id {i} twice");
        }
    }
    writer.join().unwrap();
    let drops = r.stats.udp_drops.load(Ordering::Relaxed);
    assert!(drops > 0);
    assert!(udp_seen + drops <= 200);
    let rest = r.shutdown().await;
    assert!(
        rest.iter()
            .all(|e| e["message"].as_str().unwrap().starts_with("id=u"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = soclink::certs::write_dev_certs(dir.path(), "device-1").unwrap();
    let server = tls_server_config(&certs.relay, &certs.relay_key, Some(&certs.ca)).unwrap();
    let client = soclink::tls::client_config(&certs.ca, &certs.agent, &certs.agent_key).unwrap();
    let opts = Opts {
        tls: Some(server),
        ..Opts::default()
    };
    let mut r = start(opts).await;
    let tls_addr = r.tls.unwrap();

    let connector = tokio_rustls::TlsConnector::from(client);
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, tcp).await.unwrap();
    let sent = lines("tls", 100);
    let mut wire = Vec::new();
    for l in &sent {
        let m = format!("<13>1 2026-11-26T01:02:03Z dev soclinktest - - - {l}");
        wire.extend_from_slice(format!("{} {m}", m.len()).as_bytes());
    }
    s.write_all(&wire).await.unwrap();
    s.shutdown().await.unwrap();
    let events = r.events(sent.len(), T).await;
    let got = by_id(&events);
    for l in &sent {
        let id = l.split_whitespace().nth(1).unwrap();
        assert_eq!(got[id]["message"].as_str().unwrap(), l);
        assert_eq!(got[id]["hostname"], "dev");
    }

    // Without a client certificate the handshake fails, and that is counted.
    let no_cert = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates({
        let mut roots = rustls::RootCertStore::empty();
        for c in soclink::tls::load_certs(&certs.ca).unwrap() {
            roots.add(c).unwrap();
        }
        roots
    })
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(no_cert));
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    if let Ok(mut s) = connector.connect(name, tcp).await {
        // TLS 1.3: the client learns of the refusal on its first read.
        let _ = s.write_all(b"9 <13>id=no").await;
        let mut buf = [0u8; 8];
        assert!(!matches!(s.read(&mut buf).await, Ok(n) if n > 0));
    }
    let deadline = Instant::now() + T;
    while r.stats.connection_errors.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "handshake failure not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rest = r.shutdown().await;
    assert!(
        rest.is_empty(),
        "nothing from an unauthenticated client: {rest:?}"
    );
}

/// Without `tls_ca`, any sender may connect, over TLS 1.2 too (RFC 5425 devices).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_without_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = soclink::certs::write_dev_certs(dir.path(), "device-1").unwrap();
    let server = tls_server_config(&certs.relay, &certs.relay_key, None).unwrap();
    let mut r = start(Opts {
        tls: Some(server),
        ..Opts::default()
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    for c in soclink::tls::load_certs(&certs.ca).unwrap() {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(r.tls.unwrap())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, tcp).await.unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    // LF framing works over TLS as well.
    s.write_all(b"<13>Nov 26 01:02:03 sw1 app: id=t12a\n<13>Nov 26 01:02:03 sw1 app: id=t12b\n")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let events = r.events(2, T).await;
    let got = by_id(&events);
    assert_eq!(got["id=t12a"]["hostname"], "sw1");
    assert_eq!(got["id=t12b"]["message"], "id=t12b");
    assert!(r.shutdown().await.is_empty());
}
