//! The `[metrics]` endpoint against real agent and relay processes: the figures follow
//! delivery exactly, only `GET /metrics` is served, hostile requests do not hurt, and a
//! taken port is a clear startup error.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{AgentProc, Pki, RelayProc, file_source, free_port, line, upstream_toml};

/// One HTTP exchange over a plain socket: (status code, headers, body).
fn http(port: u16, request: &[u8]) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // The server may answer and close before it read everything we send (oversized
    // requests): a failed write is not the test's concern, the answer is.
    let _ = s.write_all(request);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).expect("the response is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .expect("a complete response head");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    Ok((code, head.to_string(), body.to_string()))
}

fn scrape(port: u16) -> Option<String> {
    match http(port, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n") {
        Ok((200, _, body)) => Some(body),
        _ => None,
    }
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Every sample whose series starts with `prefix`.
fn samples<'a>(body: &'a str, prefix: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    body.lines()
        .filter(move |l| l.starts_with(prefix))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            Some((series, v.parse().ok()?))
        })
}

/// Scrape `port` until `pred` holds on the body.
fn wait_scrape(
    port: u16,
    what: &str,
    log: impl Fn() -> String,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(b) = scrape(port) {
            if pred(&b) {
                return b;
            }
            last = Some(b);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "timed out waiting for {what}; last scrape:\n{}\nlog:\n{}",
        last.unwrap_or_default(),
        log()
    );
}

#[test]
fn agent_and_relay_metrics_follow_delivery() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(dir);
    let relay_port = free_port();
    let mut relay = RelayProc::new(
        dir,
        &pki,
        "relay1",
        &format!("[metrics]\nlisten = \"127.0.0.1:{relay_port}\"\n"),
    );
    relay.start();
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    const N: u64 = 300;
    let text: String = (0..N).map(|n| line("mx", n) + "\n").collect();
    std::fs::write(logs.join("app.log"), &text).unwrap();
    let agent_port = free_port();
    let mut agent = AgentProc::new(
        dir,
        &file_source("app", &[&logs.join("*.log")], ""),
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{agent_port}\"\n\n{}",
            upstream_toml(&pki, &relay.address(), "test-agent")
        ),
    );
    agent.start();

    let body = wait_scrape(
        agent_port,
        "all lines delivered",
        || agent.log(),
        |b| {
            sample(
                b,
                "soclink_source_lines_total{source=\"app\",type=\"file\"}",
            ) == Some(N as f64)
                && sample(b, "soclink_spool_depth_batches") == Some(0.0)
                && sample(b, "soclink_upstream_connected") == Some(1.0)
                && sample(b, "soclink_upstream_last_ack_timestamp_seconds").is_some()
        },
    );
    let bytes: usize = text.len() - N as usize; // without the newlines
    assert_eq!(
        sample(
            &body,
            "soclink_source_bytes_total{source=\"app\",type=\"file\"}"
        ),
        Some(bytes as f64),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "soclink_source_errors_total{source=\"app\",type=\"file\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&body, "soclink_spool_oldest_unacked_seconds"),
        Some(0.0)
    );
    assert_eq!(
        sample(&body, "soclink_upstream_reconnects_total"),
        Some(0.0)
    );
    let version = format!(
        "soclink_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&body, &version), Some(1.0), "{body}");
    assert!(sample(&body, "soclink_uptime_seconds").is_some());
    // Without an Accept header: the Prometheus text format 0.0.4.
    let (code, head, plain) = http(agent_port, b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(code, 200);
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(head.contains("Connection: close"), "{head}");
    assert!(
        plain.contains("# TYPE soclink_source_lines_total counter\n"),
        "{plain}"
    );
    assert!(!plain.contains("# EOF"), "{plain}");
    // Prometheus asks for OpenMetrics.
    let (code, head, om) = http(
        agent_port,
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3\r\n\r\n",
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(
        head.contains(
            "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
        ),
        "{head}"
    );
    assert!(om.contains("# TYPE soclink_source_lines counter\n"), "{om}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert_eq!(
        sample(
            &om,
            "soclink_source_lines_total{source=\"app\",type=\"file\"}"
        ),
        Some(N as f64)
    );

    let rbody = wait_scrape(
        relay_port,
        "the agent's batches stored",
        || relay.log(),
        |b| {
            sample(b, "soclink_relay_connections") == Some(1.0)
                && samples(
                    b,
                    "soclink_relay_agent_stored_seq{agent=\"test-agent\",stream=",
                )
                .any(|(_, v)| v > 0.0)
        },
    );
    assert_eq!(
        sample(
            &rbody,
            "soclink_relay_agent_connected{agent=\"test-agent\"}"
        ),
        Some(1.0),
        "{rbody}"
    );
    assert!(
        sample(
            &rbody,
            "soclink_relay_agent_stored_bytes{agent=\"test-agent\"}"
        ) > Some(0.0),
        "{rbody}"
    );
    let seen = sample(
        &rbody,
        "soclink_relay_agent_last_seen_timestamp_seconds{agent=\"test-agent\"}",
    )
    .expect("last seen");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - 120.0..=now + 1.0).contains(&seen), "{seen} vs {now}");
    assert_eq!(sample(&rbody, &version), Some(1.0), "{rbody}");

    // Only GET /metrics is served.
    for req in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET /metricsx HTTP/1.1\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    ] {
        let (code, head, _) = http(agent_port, req).unwrap();
        assert_eq!(code, 404, "{}", String::from_utf8_lossy(req));
        assert!(head.contains("Connection: close"), "{head}");
    }
    // 1 MiB of garbage: refused (or the connection cut), and the next scrape works.
    let garbage: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    if let Ok((code, _, _)) = http(agent_port, &garbage) {
        assert_eq!(code, 400);
    }
    let mut huge_header = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    huge_header.extend(std::iter::repeat_n(b'a', 1 << 20));
    huge_header.extend(b"\r\n\r\n");
    if let Ok((code, _, _)) = http(relay_port, &huge_header) {
        assert_eq!(code, 400);
    }
    let after = scrape(agent_port).expect("scrape after garbage");
    assert_eq!(
        sample(
            &after,
            "soclink_source_lines_total{source=\"app\",type=\"file\"}"
        ),
        Some(N as f64)
    );
    assert!(scrape(relay_port).is_some());
    agent.stop();
    relay.stop();
}

#[test]
fn silent_clients_cannot_block_scrapes_for_long() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let port = free_port();
    let mut agent = AgentProc::new(
        dir,
        &file_source("app", &[&logs.join("*.log")], ""),
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    agent.start();
    wait_scrape(port, "the endpoint", || agent.log(), |_| true);
    // Fill every slot with connections that never send a byte; the read timeout frees them.
    let idle: Vec<TcpStream> = (0..soclink::ops::metrics::MAX_CONCURRENT)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let body = scrape(port).expect("a scrape after the idle clients time out");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(9),
        "waited {waited:?}"
    );
    // No [upstream]: no upstream figures.
    assert!(!body.contains("soclink_upstream_connected"), "{body}");
    drop(idle);
    agent.stop();
}

#[test]
fn taken_port_is_a_startup_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut agent = AgentProc::new(
        dir,
        &file_source("app", &[&logs.join("*.log")], ""),
        &format!("[metrics]\nlisten = \"{addr}\"\n"),
    );
    agent.start();
    let mut child = agent.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the agent kept running:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains(&format!("cannot listen for metrics scrapes on {addr}")),
        "{log}"
    );
}
