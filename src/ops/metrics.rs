//! The Prometheus scrape endpoint (`[metrics] listen = "127.0.0.1:9273"`, off by default).
//!
//! It owns two things:
//! - [`encode_agent`] / [`encode_relay`]: the figures of `soclink status` as OpenMetrics
//!   text. Each scrape takes a fresh [`crate::ops::status`] snapshot and builds a new
//!   `prometheus_client` [`Registry`] from it, so the endpoint can never disagree with
//!   `soclink status` and keeps no state of its own (the counters stay where the
//!   pipeline updates them).
//! - [`start`]: a deliberately minimal HTTP/1.1 responder (not hyper: one GET route does
//!   not justify a full HTTP stack). It answers `GET /metrics` and 404 otherwise, always
//!   with `Connection: close`. Invariant: bounded on any input — at most
//!   [`MAX_CONCURRENT`] scrapes at once (others wait in the kernel's accept queue), a
//!   request head of at most [`MAX_HEAD`] bytes read within [`IO_TIMEOUT`], the response
//!   written within [`IO_TIMEOUT`]. Whatever a client sends, the agent's pipeline is not
//!   touched: a scrape only reads counters (on the blocking pool, as the spool's and the
//!   store's locks can be held across an fsync).
//!
//! Format: `prometheus_client` writes the OpenMetrics 1.0 text format. It is served as
//! such to clients that ask for it (`Accept: application/openmetrics-text`, which
//! Prometheus ≥ 2.5 sends); everyone else (curl, older scrapers) gets the Prometheus
//! text exposition format 0.0.4, derived by [`to_text_004`]. Counters' samples carry
//! the `_total` suffix in both; timestamps are Unix seconds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::ops::status::{
    AgentHandles, AgentStatus, LinkStatus, RelayHandles, RelayStatus, SpoolStatus,
};

/// Most scrapes served at once.
pub const MAX_CONCURRENT: usize = 16;
/// Largest request head read (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Time allowed to read the request head, and again to write the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The live figures a scrape reads.
#[derive(Clone)]
pub enum Figures {
    Agent(AgentHandles),
    Relay(Arc<RelayHandles>),
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics scrapes on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Bind `addr` now (so a taken port is a startup error naming it) and serve scrapes on a
/// task until `shutdown`. Returns the bound address (useful with port 0).
pub async fn start(
    addr: SocketAddr,
    figures: Figures,
    shutdown: CancellationToken,
) -> Result<SocketAddr, MetricsError> {
    let listener = bind(addr).await?;
    let local = listener.local_addr().unwrap_or(addr);
    tokio::spawn(run(listener, figures, shutdown));
    Ok(local)
}

/// Bind `addr` for [`run`]: the agent binds before it starts anything, so a taken port
/// fails a start (or a reload) before any source runs.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!("metrics: serving http://{local}/metrics");
    Ok(listener)
}

/// Serve scrapes on an already-bound `listener` until `shutdown`.
pub async fn run(listener: TcpListener, figures: Figures, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        // Take a slot before accepting: excess scrapers wait in the accept queue
        // instead of costing us a task and a socket each.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // the semaphore is never closed
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: back off rather than spin.
                    tracing::warn!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let figures = figures.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = handle(stream, figures).await {
                tracing::debug!("metrics: scrape failed: {e}");
            }
        });
    }
}

/// What the request head asked for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `openmetrics`: the client accepts the OpenMetrics text format.
    Metrics {
        openmetrics: bool,
    },
    NotFound,
    Bad,
}

/// Read until the end of the head (`\r\n\r\n`), at most [`MAX_HEAD`] bytes.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Request> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    loop {
        let Some(free) = buf.get_mut(len..) else {
            return Ok(Request::Bad);
        };
        if free.is_empty() {
            return Ok(Request::Bad); // head too large
        }
        let n = stream.read(free).await?;
        if n == 0 {
            return Ok(Request::Bad);
        }
        len += n;
        let head = buf.get(..len).unwrap_or_default();
        if memchr::memmem::find(head, b"\r\n\r\n").is_some() {
            return Ok(parse_request_line(head));
        }
    }
}

/// `GET /metrics HTTP/1.x` (a query string is ignored) is the only route.
fn parse_request_line(head: &[u8]) -> Request {
    let line_end = memchr::memmem::find(head, b"\r\n").unwrap_or(head.len());
    let line = head.get(..line_end).unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with(b"HTTP/1.") {
        return Request::Bad;
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if method == b"GET" && path == b"/metrics" {
        Request::Metrics {
            openmetrics: accepts_openmetrics(head),
        }
    } else {
        Request::NotFound
    }
}

/// Whether an `Accept` header of `head` names the OpenMetrics text format.
fn accepts_openmetrics(head: &[u8]) -> bool {
    head.split(|&b| b == b'\n').skip(1).any(|line| {
        let mut kv = line.splitn(2, |&b| b == b':');
        match (kv.next(), kv.next()) {
            (Some(name), Some(value)) => {
                name.trim_ascii().eq_ignore_ascii_case(b"accept")
                    && memchr::memmem::find(
                        &value.to_ascii_lowercase(),
                        b"application/openmetrics-text",
                    )
                    .is_some()
            }
            _ => false,
        }
    })
}

/// OpenMetrics text → Prometheus text format 0.0.4: counters' `# HELP`/`# TYPE` lines
/// name the `_total` series their samples use, and there is no `# EOF`.
pub fn to_text_004(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for l in openmetrics.lines() {
        if l == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, l.strip_prefix(p)?)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(p);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

async fn handle(mut stream: TcpStream, figures: Figures) -> std::io::Result<()> {
    let req = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => Request::Bad,
    };
    let (status, ctype, body) = match req {
        Request::Metrics { openmetrics } => match scrape(figures).await {
            Ok(body) if openmetrics => ("200 OK", OPENMETRICS, body),
            Ok(body) => ("200 OK", TEXT_004, to_text_004(&body)),
            Err(e) => (
                "500 Internal Server Error",
                "text/plain; charset=utf-8",
                format!("{e}\n"),
            ),
        },
        Request::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".into(),
        ),
        Request::Bad => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "bad or oversized request\n".into(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        stream.write_all(resp.as_bytes()).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(IO_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => Ok(()), // a client that does not read gets dropped
    }
}

/// Take a snapshot (on the blocking pool) and encode it.
async fn scrape(figures: Figures) -> Result<String, String> {
    tokio::task::spawn_blocking(move || match figures {
        Figures::Agent(h) => encode_agent(&h.snapshot()),
        Figures::Relay(h) => encode_relay(&h.snapshot()),
    })
    .await
    .map_err(|e| format!("snapshot failed: {e}"))?
    .map_err(|e| format!("cannot encode the metrics: {e}"))
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: u64) {
    let g: Gauge = Gauge::default();
    g.set(i64_of(v));
    r.register(name, help, g);
}

fn gauge_f(r: &mut Registry, name: &str, help: &str, v: f64) {
    let g: Gauge<f64, AtomicU64> = Gauge::default();
    g.set(v);
    r.register(name, help, g);
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    r.register(name, help, c);
}

fn common(r: &mut Registry, version: &str, uptime_secs: u64) {
    let info: Family<Labels, Gauge> = Family::default();
    info.get_or_create(&labels(&[("version", version)])).set(1);
    r.register("soclink_build_info", "soclink's version (always 1)", info);
    gauge(
        r,
        "soclink_uptime_seconds",
        "Seconds since this process started",
        uptime_secs,
    );
}

fn spool(r: &mut Registry, s: &SpoolStatus) {
    gauge(
        r,
        "soclink_spool_depth_batches",
        "Batches durable in the spool and not yet acknowledged upstream",
        s.depth_batches,
    );
    gauge(r, "soclink_spool_bytes", "Bytes in the spool", s.bytes);
    gauge(
        r,
        "soclink_spool_max_bytes",
        "The spool's size limit in bytes",
        s.max_bytes,
    );
    gauge(
        r,
        "soclink_spool_full",
        "1 while the spool is full and the sources are paused",
        u64::from(s.full),
    );
    // 0 when nothing waits: an alert on age then needs no special case for "none".
    gauge(
        r,
        "soclink_spool_oldest_unacked_seconds",
        "Age of the oldest batch not yet acknowledged (0 when none)",
        s.oldest_unacked_age_secs.unwrap_or(0),
    );
}

fn upstream(r: &mut Registry, l: &LinkStatus) {
    gauge(
        r,
        "soclink_upstream_connected",
        "1 while connected to the upstream relay",
        u64::from(l.connected),
    );
    counter(
        r,
        "soclink_upstream_reconnects",
        "Reconnections to the upstream relay since start",
        l.reconnects,
    );
    gauge(
        r,
        "soclink_upstream_acked_seq",
        "Highest batch sequence the upstream acknowledged",
        l.acked_seq,
    );
    // Absent until the first acknowledgement, rather than a misleading 1970.
    if let Some(t) = l.last_ack {
        gauge_f(
            r,
            "soclink_upstream_last_ack_timestamp_seconds",
            "When the upstream last acknowledged a batch (Unix seconds)",
            unix_secs(t),
        );
    }
}

/// The agent's figures as OpenMetrics text.
pub fn encode_agent(s: &AgentStatus) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    common(&mut r, &s.version, s.uptime_secs);
    let lines: Family<Labels, Counter> = Family::default();
    let bytes: Family<Labels, Counter> = Family::default();
    let errors: Family<Labels, Counter> = Family::default();
    let truncated: Family<Labels, Counter> = Family::default();
    let drops: Family<Labels, Counter> = Family::default();
    let parse_errors: Family<Labels, Counter> = Family::default();
    let gaps: Family<Labels, Counter> = Family::default();
    let vanished: Family<Labels, Counter> = Family::default();
    for src in &s.sources {
        let l = labels(&[("source", &src.name), ("type", &src.kind)]);
        lines.get_or_create(&l).inc_by(src.lines);
        bytes.get_or_create(&l).inc_by(src.bytes);
        errors.get_or_create(&l).inc_by(src.errors);
        truncated.get_or_create(&l).inc_by(src.truncated);
        // Only the source types that have them, as in `soclink status`.
        if let Some(d) = src.drops {
            drops.get_or_create(&l).inc_by(d);
        }
        if let Some(n) = src.parse_errors {
            parse_errors.get_or_create(&l).inc_by(n);
        }
        if let Some(n) = src.gaps {
            gaps.get_or_create(&l).inc_by(n);
        }
        if let Some(n) = src.vanished {
            vanished.get_or_create(&l).inc_by(n);
        }
    }
    r.register(
        "soclink_source_lines",
        "Lines (file), messages (syslog) or entries (journald) turned into events",
        lines,
    );
    r.register(
        "soclink_source_bytes",
        "Bytes of those lines as read, without terminators",
        bytes,
    );
    r.register("soclink_source_errors", "Source errors", errors);
    r.register(
        "soclink_source_truncated",
        "Lines cut at the source's size limit",
        truncated,
    );
    r.register(
        "soclink_source_drops",
        "Syslog UDP datagrams dropped because the pipeline was full",
        drops,
    );
    r.register(
        "soclink_source_parse_errors",
        "Syslog messages that did not parse (kept raw)",
        parse_errors,
    );
    r.register(
        "soclink_source_gaps",
        "Journald resumptions whose saved cursor was gone (entries may be missing)",
        gaps,
    );
    r.register(
        "soclink_source_vanished",
        "Files gone before the file source could open or reopen them (lines after that not collected)",
        vanished,
    );
    spool(&mut r, &s.spool);
    if let Some(l) = &s.upstream {
        upstream(&mut r, l);
    }
    let mut out = String::new();
    encode(&mut out, &r)?;
    Ok(out)
}

/// The relay's figures as OpenMetrics text.
pub fn encode_relay(s: &RelayStatus) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    common(&mut r, &s.version, s.uptime_secs);
    gauge(
        &mut r,
        "soclink_relay_connections",
        "Live agent (or downstream relay) connections",
        s.connections.len() as u64,
    );
    let last_seen: Family<Labels, Gauge<f64, AtomicU64>> = Family::default();
    let stored_bytes: Family<Labels, Gauge> = Family::default();
    let stored_seq: Family<Labels, Gauge> = Family::default();
    let connected: Family<Labels, Gauge> = Family::default();
    for a in &s.agents {
        let l = labels(&[("agent", &a.identity)]);
        connected.get_or_create(&l).set(i64::from(a.connected));
        if let Some(t) = a.last_seen {
            last_seen.get_or_create(&l).set(unix_secs(t));
        }
        if let Some(b) = a.stored_bytes {
            stored_bytes.get_or_create(&l).set(i64_of(b));
        }
        for st in &a.streams {
            stored_seq
                .get_or_create(&labels(&[("agent", &a.identity), ("stream", &st.stream)]))
                .set(i64_of(st.stored_seq));
        }
    }
    r.register(
        "soclink_relay_agent_connected",
        "1 while the agent has a live connection",
        connected,
    );
    r.register(
        "soclink_relay_agent_last_seen_timestamp_seconds",
        "Last frame from the agent since this relay started (Unix seconds)",
        last_seen,
    );
    r.register(
        "soclink_relay_agent_stored_bytes",
        "Compressed bytes stored for the agent",
        stored_bytes,
    );
    r.register(
        "soclink_relay_agent_stored_seq",
        "Highest batch sequence stored per agent and stream",
        stored_seq,
    );
    if let Some(l) = &s.upstream {
        upstream(&mut r, l);
    }
    if let Some(sp) = &s.spool {
        spool(&mut r, sp);
    }
    let mut out = String::new();
    encode(&mut out, &r)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let p = |s: &str| parse_request_line(s.as_bytes());
        let m = |openmetrics| Request::Metrics { openmetrics };
        assert_eq!(p("GET /metrics HTTP/1.1\r\n\r\n"), m(false));
        assert_eq!(p("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), m(false));
        assert_eq!(
            p(
                "GET /metrics HTTP/1.1\r\nHost: x\r\naccept: Application/OpenMetrics-Text;version=1.0.0;q=0.5,*/*;q=0.1\r\n\r\n"
            ),
            m(true)
        );
        assert_eq!(
            p("GET /metrics HTTP/1.1\r\nX-Note: application/openmetrics-text\r\n\r\n"),
            m(false)
        );
        assert_eq!(p("GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(p("POST /metrics HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(p("GET /metrics\r\n\r\n"), Request::Bad);
        assert_eq!(p("GET /metrics SPDY/3\r\n\r\n"), Request::Bad);
        assert_eq!(p("\u{0}\u{ff}"), Request::Bad);
    }

    #[test]
    fn relay_text() {
        use crate::ops::status::{AgentSeen, StreamSeq};
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let st = RelayStatus {
            id: "r1".into(),
            version: "0.1.0".into(),
            generated_at: t0,
            uptime_secs: 60,
            connections: Vec::new(),
            agents: vec![
                AgentSeen {
                    identity: "A12345-web01".into(),
                    connected: false,
                    last_seen: Some(t0),
                    streams: vec![StreamSeq {
                        stream: "main".into(),
                        stored_seq: 42,
                    }],
                    stored_bytes: Some(4096),
                    last_write: None,
                },
                // Only known from the store: no last-seen sample rather than 1970.
                AgentSeen {
                    identity: "臺北-db".into(),
                    connected: false,
                    last_seen: None,
                    streams: Vec::new(),
                    stored_bytes: Some(0),
                    last_write: None,
                },
            ],
            upstream: None,
            spool: None,
            recovery: Default::default(),
        };
        let t = to_text_004(&encode_relay(&st).unwrap());
        for want in [
            "soclink_relay_connections 0\n",
            "soclink_relay_agent_connected{agent=\"A12345-web01\"} 0\n",
            "soclink_relay_agent_last_seen_timestamp_seconds{agent=\"A12345-web01\"} 1700000000.0\n",
            "soclink_relay_agent_stored_bytes{agent=\"A12345-web01\"} 4096\n",
            "soclink_relay_agent_stored_seq{agent=\"A12345-web01\",stream=\"main\"} 42\n",
            "soclink_relay_agent_stored_bytes{agent=\"臺北-db\"} 0\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in:\n{t}");
        }
        assert!(
            !t.contains("last_seen_timestamp_seconds{agent=\"臺北-db\"}"),
            "{t}"
        );
        assert!(!t.contains("soclink_spool_"), "{t}");
        assert!(!t.contains("soclink_upstream_"), "{t}");
    }

    #[test]
    fn agent_text() {
        use crate::ops::status::SourceStatus;
        let st = AgentStatus {
            id: "web-01".into(),
            version: "0.1.0".into(),
            generated_at: SystemTime::UNIX_EPOCH,
            uptime_secs: 7,
            sources: vec![SourceStatus {
                name: "a\"b".into(),
                kind: "file".into(),
                lines: 1000,
                bytes: 88_000,
                errors: 0,
                truncated: 2,
                drops: None,
                files: Some(1),
                parse_errors: None,
                gaps: None,
                vanished: Some(0),
            }],
            spool: SpoolStatus {
                depth_batches: 3,
                bytes: 4096,
                max_bytes: 1 << 30,
                acked_seq: 9,
                durable_seq: 12,
                oldest_unacked_age_secs: None,
                full: false,
            },
            upstream: Some(LinkStatus {
                address: "relay:6514".into(),
                connected: true,
                relay_id: None,
                down_since: None,
                last_error: None,
                last_ack: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_500)),
                acked_seq: 9,
                reconnects: 4,
            }),
            intel: None,
            recovery: Default::default(),
        };
        let t = encode_agent(&st).unwrap();
        for want in [
            "soclink_build_info{version=\"0.1.0\"} 1\n",
            "soclink_uptime_seconds 7\n",
            "# TYPE soclink_source_lines counter\n",
            "soclink_source_lines_total{source=\"a\\\"b\",type=\"file\"} 1000\n",
            "soclink_source_truncated_total{source=\"a\\\"b\",type=\"file\"} 2\n",
            "soclink_source_vanished_total{source=\"a\\\"b\",type=\"file\"} 0\n",
            "soclink_spool_depth_batches 3\n",
            "soclink_spool_oldest_unacked_seconds 0\n",
            "soclink_upstream_connected 1\n",
            "soclink_upstream_reconnects_total 4\n",
            "soclink_upstream_last_ack_timestamp_seconds 1.5\n",
            "# EOF\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in:\n{t}");
        }
        assert!(!t.contains("soclink_source_drops_total{"), "{t}");
        let old = to_text_004(&t);
        assert!(
            old.contains("# HELP soclink_source_lines_total Lines (file)"),
            "{old}"
        );
        assert!(
            old.contains("# TYPE soclink_source_lines_total counter\nsoclink_source_lines_total{"),
            "{old}"
        );
        assert!(old.contains("# TYPE soclink_spool_bytes gauge\n"), "{old}");
        assert!(!old.contains("# EOF"), "{old}");
        assert_eq!(
            old.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
        );
    }
}
