//! The shipper: sends spooled batches upstream over mutual TLS and frees them when the
//! relay acknowledges them.
//!
//! Invariants:
//! - A batch leaves the spool only after the relay's `Ack` covered it (the relay sends
//!   an ack only once the batch is durable on its side).
//! - At most `WINDOW_BATCHES` / `WINDOW_BYTES` are unacknowledged in flight; on any
//!   connection failure everything unacknowledged is sent again from the spool (the
//!   relay drops what it already has by sequence).
//! - After a reconnect, the relay's `HelloAck` says where it is; the shipper resumes
//!   after `max(local acked, relay's position)`.
//! - Failures back off exponentially with jitter. The first failure is logged; the same
//!   failure again is logged at most once a minute with a count (crate::util::LogLimiter),
//!   a different one at once, and a working link resets that.
//! - With batches in flight, a link that answers nothing for `ACK_TIMEOUT` (or takes
//!   no bytes for as long) is dead, e.g. half-open: it is given up and redialled.

use crate::util::lock;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use rand::RngExt;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::batch::BatchMeta;
use crate::config::UpstreamConfig;
use crate::protocol::{self, Batch, BatchHeader, Frame, Hello, Limits};
use crate::spool::Spool;
use crate::tls::{ClientOptions, ReloadableClientConfig, TlsFiles};

/// Most batches unacknowledged at once.
pub const WINDOW_BATCHES: usize = 64;
/// Most compressed bytes unacknowledged at once.
pub const WINDOW_BYTES: u64 = 32 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// With nothing received for this long, ping; twice this long, give the link up.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// With batches in flight, silence this long means a dead link (a half-open TCP
/// connection swallows what we send and never answers): give it up and reconnect.
/// Also bounds a single frame write, so a peer that stopped reading cannot hang us.
const ACK_TIMEOUT: Duration = Duration::from_secs(15);
/// Most frames from the relay handled together (their acks cost one ledger write).
const ACK_BURST: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What `soclink status` shows about the upstream link.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UpstreamStatus {
    pub connected: bool,
    pub relay_id: Option<String>,
    /// Since when the link is down (None while connected or before the first try).
    pub down_since: Option<SystemTime>,
    pub last_error: Option<String>,
    pub last_ack: Option<SystemTime>,
    pub acked_seq: u64,
    pub reconnects: u64,
}

/// One spool shipped as one stream. Lanes are served in order: while the first lane
/// (the priority lane: incidents and evidence) has durable records, the window is
/// theirs; routine logs use what is left.
#[derive(Clone)]
pub struct Lane {
    /// The stream name on the wire (an agent: "priority", "logs"; a relay: "fwd").
    pub stream: String,
    pub spool: Spool,
}

pub struct Shipper {
    upstream: UpstreamConfig,
    lanes: Vec<Lane>,
    tls: Arc<ReloadableClientConfig>,
    status: Arc<Mutex<UpstreamStatus>>,
}

/// Per-session state of a lane.
#[derive(Debug, Clone)]
struct LaneState {
    next: u64,
    inflight: VecDeque<(u64, u64)>, // (seq, bytes)
}

/// The batches one session sent and the relay has not acknowledged yet, per lane.
///
/// Kept apart from the socket code so `tests/interleavings.rs` can drive the very logic
/// the session runs (send, ack, reconnect) under every interleaving with the spool's
/// writer. A window lives for one session: after a reconnect a new one starts after
/// the spool's acknowledged seq, so everything unacknowledged is sent again.
#[derive(Debug, Clone)]
pub struct Window {
    max_batches: usize,
    max_bytes: u64,
    lanes: Vec<LaneState>,
    count: usize,
    bytes: u64,
}

impl Window {
    /// A window for one session; `acked[i]` is lane `i`'s acknowledged seq.
    pub fn new(acked: &[u64], max_batches: usize, max_bytes: u64) -> Window {
        Window {
            max_batches,
            max_bytes,
            lanes: acked
                .iter()
                .map(|a| LaneState {
                    next: a + 1,
                    inflight: VecDeque::new(),
                })
                .collect(),
            count: 0,
            bytes: 0,
        }
    }

    /// No more batches may be sent until an ack frees some.
    pub fn is_full(&self) -> bool {
        self.count >= self.max_batches || self.bytes >= self.max_bytes
    }

    /// The seq lane `lane` sends next (the spool may hand out a later one).
    pub fn next(&self, lane: usize) -> u64 {
        self.lanes[lane].next
    }

    /// Batches in flight, all lanes.
    pub fn in_flight(&self) -> usize {
        self.count
    }

    /// Record `seq` of `lane` (`bytes` long) as sent.
    pub fn sent(&mut self, lane: usize, seq: u64, bytes: u64) {
        let st = &mut self.lanes[lane];
        st.inflight.push_back((seq, bytes));
        st.next = seq + 1;
        self.count += 1;
        self.bytes += bytes;
    }

    /// The relay acknowledged every batch of `lane` up to `seq`: frees them and returns
    /// the highest seq freed, the one to acknowledge in the spool (None if nothing was).
    pub fn ack(&mut self, lane: usize, seq: u64) -> Option<u64> {
        let st = &mut self.lanes[lane];
        let mut upto = None;
        while let Some(&(s, size)) = st.inflight.front() {
            if s > seq {
                break;
            }
            st.inflight.pop_front();
            self.count -= 1;
            self.bytes -= size;
            upto = Some(s);
        }
        upto
    }
}

/// What a lane acknowledges in its spool when the relay's `HelloAck` reports
/// `relay_pos`: the relay stored batches whose ack this side never saw. Capped at the
/// spool's durable seq (a relay ahead of it has seen another spool's batches).
pub fn resume_ack(relay_pos: u64, acked: u64, durable: u64) -> Option<u64> {
    (relay_pos > acked).then(|| relay_pos.min(durable))
}

impl Shipper {
    pub fn new(upstream: UpstreamConfig, spool: Spool, stream: &str) -> Result<Shipper> {
        Self::with_lanes(
            upstream,
            vec![Lane {
                stream: stream.to_string(),
                spool,
            }],
        )
    }

    pub fn with_lanes(upstream: UpstreamConfig, lanes: Vec<Lane>) -> Result<Shipper> {
        let tls = ReloadableClientConfig::new(
            TlsFiles {
                ca: upstream.ca.clone(),
                cert: upstream.cert.clone(),
                key: upstream.key.clone(),
            },
            ClientOptions::default(),
        )
        .context("cannot load the upstream TLS certificates")?;
        Ok(Shipper {
            upstream,
            lanes,
            tls: Arc::new(tls),
            status: Arc::default(),
        })
    }

    pub fn status(&self) -> Arc<Mutex<UpstreamStatus>> {
        self.status.clone()
    }

    pub fn tls(&self) -> Arc<ReloadableClientConfig> {
        self.tls.clone()
    }

    /// Ship until `shutdown`; reconnects forever.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let mut backoff = BACKOFF_MIN;
        let warn = crate::util::LogLimiter::default();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let started = Instant::now();
            let err = match self.session(&shutdown).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let msg = format!("{err:#}");
            {
                let mut st = lock(&self.status);
                if st.connected {
                    warn.clear_all(); // the link worked: its next failure is news
                }
                if st.connected || st.down_since.is_none() {
                    st.down_since = Some(crate::clock::now());
                }
                st.connected = false;
                st.last_error = Some(msg.clone());
                st.reconnects += 1;
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff = BACKOFF_MIN; // the link worked for a while: retry quickly
            }
            let jitter = rand::rng().random_range(0.8..1.2);
            let wait = backoff.mul_f64(jitter);
            match warn.check(&msg) {
                Some(repeated) => tracing::warn!(
                    "upstream {}: {msg}; retrying in {:.1}s{repeated}",
                    self.upstream.address,
                    wait.as_secs_f64()
                ),
                None => tracing::debug!(
                    "upstream {}: {msg}; retrying in {:.1}s",
                    self.upstream.address,
                    wait.as_secs_f64()
                ),
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// One connection: handshake, then stream batches until an error or shutdown.
    async fn session(&self, shutdown: &CancellationToken) -> Result<()> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, self.connect_tcp())
            .await
            .map_err(|_| anyhow!("connection timed out"))??;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.upstream.server_name.clone())
            .map_err(|_| anyhow!("invalid server_name {:?}", self.upstream.server_name))?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.current());
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake timed out"))?
            .map_err(|e| anyhow!("TLS handshake failed: {}", crate::tls::explain(&e)))?;
        let (rd, mut wr) = tokio::io::split(tls);
        let mut rd = BufReader::with_capacity(64 << 10, rd);
        let limits = Limits::default();
        protocol::write_frame(
            &mut wr,
            &Frame::Hello(Hello {
                versions: protocol::SUPPORTED_VERSIONS.to_vec(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                streams: self.lanes.iter().map(|l| l.stream.clone()).collect(),
            }),
        )
        .await?;
        let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, protocol::read_frame(&mut rd, &limits))
            .await
            .map_err(|_| anyhow!("the relay did not answer Hello"))??;
        let ack = match reply {
            Frame::HelloAck(a) => a,
            Frame::Refuse(r) => bail!(
                "the relay refused the connection: {} (relay supports protocol versions {:?}, we support {:?})",
                r.reason,
                r.versions,
                protocol::SUPPORTED_VERSIONS
            ),
            Frame::Error(e) => bail!("the relay reported an error: {}", e.message),
            other => bail!(
                "unexpected {:?} frame instead of HelloAck",
                other.frame_type()
            ),
        };
        let mut acked = Vec::with_capacity(self.lanes.len());
        for lane in &self.lanes {
            let relay_pos = ack
                .resume
                .iter()
                .find(|r| r.stream == lane.stream)
                .map_or(0, |r| r.last_seq);
            let stats = lane.spool.stats();
            if let Some(upto) = resume_ack(relay_pos, stats.acked, stats.durable_seq) {
                let sp = lane.spool.clone();
                tokio::task::spawn_blocking(move || sp.ack(upto)).await??;
            }
            acked.push(lane.spool.acked());
        }
        let mut window = Window::new(&acked, WINDOW_BATCHES, WINDOW_BYTES);
        {
            let mut st = lock(&self.status);
            st.connected = true;
            st.down_since = None;
            st.last_error = None;
            st.relay_id = Some(ack.relay_id.clone());
        }
        tracing::info!(
            "connected to relay {:?} at {} (protocol v{}); resuming {}",
            ack.relay_id,
            self.upstream.address,
            ack.version,
            self.lanes
                .iter()
                .map(|l| format!("{} after batch {}", l.stream, l.spool.acked()))
                .collect::<Vec<_>>()
                .join(", ")
        );

        // Frames from the relay arrive on their own task so a large write never keeps
        // acknowledgements from being read.
        let (ftx, mut frx) = mpsc::channel::<Result<Frame, protocol::ProtocolError>>(256);
        let reader = tokio::spawn(async move {
            loop {
                let f = protocol::read_frame(&mut rd, &limits).await;
                let end = f.is_err();
                if ftx.send(f).await.is_err() || end {
                    break;
                }
            }
        });
        let _reader_guard = AbortOnDrop(reader);
        // Any lane's new durable records wake the send loop.
        let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
        let mut _wakers = Vec::new();
        for lane in &self.lanes {
            let mut durable = lane.spool.watch_durable();
            let wake = wake_tx.clone();
            _wakers.push(AbortOnDrop(tokio::spawn(async move {
                while durable.changed().await.is_ok() {
                    let _ = wake.try_send(());
                }
            })));
        }

        let mut last_rx = Instant::now();
        // When the window last went from empty to busy: an ack is due from then on.
        let mut busy_since = Instant::now();
        let mut pinged = false;
        let mut draining: Option<Instant> = None;
        // One interval for the whole session: a sleep made anew per loop turn would be
        // reset by every wake-up, and a steady writer would keep the checks from running.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Fill the window from the lanes, first lane first.
            'fill: for (i, lane) in self.lanes.iter().enumerate() {
                while draining.is_none()
                    && !window.is_full()
                    && window.next(i) <= lane.spool.stats().durable_seq
                {
                    let sp = lane.spool.clone();
                    let want = window.next(i);
                    let rec = tokio::task::spawn_blocking(move || sp.read(want)).await??;
                    let Some(rec) = rec else { break };
                    let meta: BatchMeta = serde_json::from_slice(&rec.meta).with_context(|| {
                        format!(
                            "spooled batch {}#{} has unreadable metadata",
                            lane.stream, rec.seq
                        )
                    })?;
                    let size = rec.payload.len() as u64;
                    let frame = Frame::Batch(Batch {
                        header: BatchHeader::from_meta(&lane.stream, rec.seq, &meta),
                        gzip: Bytes::from(rec.payload),
                    });
                    tokio::time::timeout(ACK_TIMEOUT, protocol::write_frame(&mut wr, &frame))
                        .await
                        .map_err(|_| {
                            anyhow!(
                                "the relay took no data for {}s (sending batch {}#{})",
                                ACK_TIMEOUT.as_secs(),
                                lane.stream,
                                rec.seq
                            )
                        })??;
                    if let Frame::Batch(b) = frame
                        && let Ok(buf) = b.gzip.try_into_mut()
                    {
                        crate::pool::GZIP.give(buf.into());
                    }
                    if window.in_flight() == 0 {
                        busy_since = Instant::now();
                    }
                    window.sent(i, rec.seq, size);
                }
                if window.is_full() {
                    break 'fill;
                }
            }
            if draining.is_some() && window.in_flight() == 0 {
                let _ = wr.shutdown().await;
                return Ok(());
            }
            tokio::select! {
                f = frx.recv() => {
                    // The relay acknowledges every batch of a group commit at once. Take
                    // all frames already here and write each lane's ack ledger (an fsync
                    // of the file and one of the directory) once for the burst, not once
                    // per batch.
                    let mut frames = vec![f];
                    while frames.len() < ACK_BURST {
                        match frx.try_recv() {
                            Ok(f) => frames.push(Some(f)),
                            Err(_) => break,
                        }
                    }
                    let mut acked = vec![0u64; self.lanes.len()];
                    let mut failed = None;
                    for f in frames {
                        let f = match f {
                            Some(Ok(f)) => f,
                            Some(Err(protocol::ProtocolError::Closed)) | None => {
                                failed = Some(anyhow!("the relay closed the connection"));
                                break;
                            }
                            Some(Err(e)) => {
                                failed = Some(e.into());
                                break;
                            }
                        };
                        match f {
                            Frame::Ack(a) => {
                                let Some(i) = self.lanes.iter().position(|l| l.stream == a.stream) else {
                                    failed = Some(anyhow!("the relay acknowledged unknown stream {:?}", a.stream));
                                    break;
                                };
                                if let Some(upto) = window.ack(i, a.seq) {
                                    acked[i] = upto;
                                }
                            }
                            Frame::Ping(n) => {
                                if let Err(e) = protocol::write_frame(&mut wr, &Frame::Pong(n)).await {
                                    failed = Some(e.into());
                                    break;
                                }
                            }
                            Frame::Pong(_) => {}
                            Frame::Error(e) => {
                                failed = Some(anyhow!("the relay closed the connection: {} ({:?})", e.message, e.code));
                                break;
                            }
                            other => {
                                failed = Some(anyhow!("unexpected {:?} frame from the relay", other.frame_type()));
                                break;
                            }
                        }
                    }
                    last_rx = Instant::now();
                    pinged = false;
                    // Acknowledgements taken before a failure are still recorded.
                    for (i, upto) in acked.into_iter().enumerate() {
                        if upto == 0 {
                            continue;
                        }
                        let sp = self.lanes[i].spool.clone();
                        tokio::task::spawn_blocking(move || sp.ack(upto)).await??;
                        let mut st = lock(&self.status);
                        st.last_ack = Some(crate::clock::now());
                        if i + 1 == self.lanes.len() {
                            st.acked_seq = upto;
                        }
                    }
                    if let Some(e) = failed {
                        return Err(e);
                    }
                }
                _ = wake_rx.recv() => {}
                _ = tick.tick() => {
                    let quiet = last_rx.elapsed();
                    let inflight_count = window.in_flight();
                    let waited = last_rx.max(busy_since).elapsed();
                    if inflight_count > 0 && waited > ACK_TIMEOUT {
                        bail!("no acknowledgement from the relay for {}s with {inflight_count} batches in flight", waited.as_secs());
                    }
                    if quiet > KEEPALIVE * 2 {
                        bail!("no answer from the relay for {}s", quiet.as_secs());
                    }
                    if quiet > KEEPALIVE && !pinged {
                        protocol::write_frame(&mut wr, &Frame::Ping(rand::random())).await?;
                        pinged = true;
                    }
                    if draining.is_some_and(|d| d.elapsed() > Duration::from_secs(3)) {
                        tracing::info!("{inflight_count} batches still unacknowledged at shutdown; they stay in the spool and are sent after the restart");
                        return Ok(());
                    }
                }
                _ = shutdown.cancelled(), if draining.is_none() => {
                    draining = Some(Instant::now());
                }
            }
        }
    }

    /// TCP to the relay, or to the proxy followed by `CONNECT`.
    async fn connect_tcp(&self) -> Result<TcpStream> {
        let Some(proxy) = &self.upstream.proxy else {
            return TcpStream::connect(&self.upstream.address)
                .await
                .with_context(|| format!("cannot connect to {}", self.upstream.address));
        };
        let mut s = TcpStream::connect(proxy)
            .await
            .with_context(|| format!("cannot connect to proxy {proxy}"))?;
        http_connect(&mut s, &self.upstream.address)
            .await
            .with_context(|| format!("proxy {proxy} did not open a tunnel"))?;
        Ok(s)
    }
}

/// Ask an HTTP proxy for a tunnel (`CONNECT host:port`); the reply head is bounded.
pub async fn http_connect(s: &mut TcpStream, target: &str) -> Result<()> {
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: soclink/{}\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    s.write_all(req.as_bytes()).await?;
    // Read byte-wise so nothing after the header (the relay's TLS bytes) is consumed.
    let mut head = Vec::new();
    let mut limited = (&mut *s).take(8192);
    let mut br = BufReader::with_capacity(1, &mut limited);
    loop {
        let mut line = Vec::new();
        let n = br.read_until(b'\n', &mut line).await?;
        if n == 0 {
            bail!("proxy closed the connection during CONNECT");
        }
        let end = line == b"\r\n" || line == b"\n";
        head.extend_from_slice(&line);
        if end {
            break;
        }
    }
    let status = String::from_utf8_lossy(head.split(|&b| b == b'\n').next().unwrap_or(b""));
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        bail!("proxy answered {:?}", status.trim());
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
