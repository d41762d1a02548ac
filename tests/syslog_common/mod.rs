//! Helpers for the syslog tests: run a real `SyslogSource` on 127.0.0.1:0 and collect
//! the batches it seals, checking every batch's invariants on the way.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use soclink::agent::sources::SealedBatch;
use soclink::agent::sources::file::BatchLimits;
use soclink::agent::sources::syslog::{SyslogLimits, SyslogListen, SyslogSource, SyslogStats};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const SOURCE: &str = "devices";
pub const HOST: &str = "agent-01";

pub struct Opts {
    pub limits: SyslogLimits,
    pub batch: BatchLimits,
    /// Capacity of the channel of sealed batches (the pipeline).
    pub out_capacity: usize,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// SO_RCVBUF of TCP connections (small values make backpressure visible quickly).
    pub tcp_rcvbuf: Option<u32>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            limits: SyslogLimits::default(),
            batch: BatchLimits {
                max_bytes: 256 * 1024,
                max_delay: Duration::from_millis(50),
            },
            out_capacity: 16,
            tls: None,
            tcp_rcvbuf: None,
        }
    }
}

pub struct Running {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub rx: mpsc::Receiver<SealedBatch>,
    pub stats: Arc<SyslogStats>,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

fn tcp_listener(rcvbuf: Option<u32>) -> TcpListener {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n).unwrap();
    }
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    sock.listen(128).unwrap()
}

pub async fn start(opts: Opts) -> Running {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = tcp_listener(opts.tcp_rcvbuf);
    let mut listeners = vec![SyslogListen::Udp(udp), SyslogListen::Tcp(tcp)];
    if let Some(cfg) = opts.tls {
        listeners.push(SyslogListen::Tls(tcp_listener(opts.tcp_rcvbuf), cfg));
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let (tx, rx) = mpsc::channel(opts.out_capacity);
    let stats = Arc::new(SyslogStats::default());
    let source = SyslogSource {
        name: SOURCE.to_string(),
        host: HOST.to_string(),
        listeners,
        limits: opts.limits,
        batch: opts.batch,
        out: tx,
        stats: Arc::clone(&stats),
        // The host's zone, as a source without `timezone` has: `logger` sends local time.
        timezone: jiff::tz::TimeZone::system(),
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(source.run(stop.clone()));
    Running {
        udp: addrs[0],
        tcp: addrs[1],
        tls: addrs.get(2).copied(),
        rx,
        stats,
        stop,
        task,
    }
}

/// Check one sealed batch and return its events.
pub fn batch_events(b: &SealedBatch) -> Vec<serde_json::Value> {
    assert_eq!(b.source, SOURCE);
    assert!(b.cursor.is_none(), "syslog batches have no resume position");
    assert_eq!(b.raw.last(), Some(&b'\n'));
    let events: Vec<serde_json::Value> = b
        .raw
        .split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("every line is one JSON object"))
        .collect();
    assert_eq!(events.len() as u32, b.events);
    for e in &events {
        // Filed by the receive time; `ts` is the device's time in UTC.
        let received = e["received"].as_str().unwrap();
        assert_eq!(&received[..10], b.day, "a batch never spans two UTC days");
        assert!(e["ts"].as_str().unwrap().ends_with('Z'));
        assert_eq!(e["host"], HOST);
        assert_eq!(e["source"], SOURCE);
    }
    events
}

impl Running {
    /// Collect events until `n` have arrived (or panic after `timeout`).
    pub async fn events(&mut self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(b)) => out.extend(batch_events(&b)),
                Ok(None) => break,
                Err(_) => break,
            }
        }
        assert!(
            out.len() >= n,
            "expected {n} events, got {}: {:?}",
            out.len(),
            out.last()
        );
        out
    }

    /// Stop the source and return the events still sealed on the way out.
    pub async fn shutdown(mut self) -> Vec<serde_json::Value> {
        self.stop.cancel();
        let mut out = Vec::new();
        while let Some(b) = self.rx.recv().await {
            out.extend(batch_events(&b));
        }
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("run returns promptly after shutdown")
            .unwrap();
        out
    }
}

/// Events keyed by the unique id each test message carries (`id=NNNN`); every id must
/// appear exactly once.
pub fn by_id(events: &[serde_json::Value]) -> HashMap<String, serde_json::Value> {
    let mut map = HashMap::new();
    for e in events {
        let msg = soclink::event::message_bytes(e).unwrap();
        let msg = String::from_utf8_lossy(&msg);
        let id = msg
            .split_whitespace()
            .find(|w| w.starts_with("id="))
            .unwrap_or_else(|| panic!("no id in {e}"))
            .to_string();
        assert!(
            map.insert(id.clone(), e.clone()).is_none(),
            "{id} arrived twice"
        );
    }
    map
}
